"""Shared fixtures and helpers for the whole suite.

* `wait_until` / `wait_until_sync`: wait for a condition with a deadline instead of sleeping a
  fixed time and hoping; a timeout is an AssertionError naming what was awaited.
* `mosquitto`: the real Mosquitto binary on a free loopback port for one test. Outside CI a
  machine without Mosquitto skips those tests; in CI (`CI=true`) a missing binary is an error,
  because a test that needs Mosquitto must run there, not skip (`require_mosquitto`). The same
  rule holds for every other program or data set a test needs (`require_installed`:
  `mosquitto_passwd`, `openssl`, Fashion-MNIST).
* `embedded_broker`: the simulation's embedded amqtt broker on a kernel-chosen port.
* `digits_source` / `digits`: the bundled digits data set, and its (train, holdout, test) split.
* `one_torch_thread`: one intra-op torch thread for the test, restored afterwards.
* `epsilon_tables`: opens epsilon tables and closes them after the test (no child left running).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import pytest

from sim.broker import EmbeddedBroker, MosquittoBroker

REPO = Path(__file__).resolve().parent.parent

if TYPE_CHECKING:
    from peer.training.data import Dataset
    from peer.training.privacy.table import EpsilonTable

#: How often the wait helpers look at their condition.
POLL_S = 0.02


def _timed_out(timeout_s: float, what: str) -> AssertionError:
    return AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


async def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str,
                     *, poll_s: float = POLL_S) -> None:
    """Return as soon as ``predicate()`` is true; raise AssertionError naming ``what`` when it
    is still false after ``timeout_s`` seconds. The event loop keeps running in between."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise _timed_out(timeout_s, what)
        await asyncio.sleep(poll_s)


def wait_until_sync(predicate: Callable[[], bool], timeout_s: float, what: str,
                    *, poll_s: float = POLL_S) -> None:
    """`wait_until` for synchronous tests (subprocesses, files): blocks the calling thread."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise _timed_out(timeout_s, what)
        time.sleep(poll_s)


# ------------------------------------------------------------------------------ brokers
def run_child_and_kill(script: str, args: list[str], min_lines: int,
                       timeout_s: float = 120.0) -> list[dict]:
    """Run ``python -c script args`` (one torch thread, the repo on the path), read the JSON
    lines it prints until ``min_lines`` arrived, SIGKILL it at once (so the kill lands inside
    whatever it does next), and return every line it printed."""
    import json
    import select
    import signal
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[dict] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(lines) < min_lines:
            assert time.monotonic() < deadline, "child produced too few lines in time"
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                text = proc.stdout.readline()
                assert text, f"child exited early: {proc.stderr.read()}"
                lines.append(json.loads(text))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    lines.extend(json.loads(t) for t in proc.stdout.read().splitlines() if t.strip())
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return lines


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require_installed(available: bool, what: str, package: str) -> None:
    """Skip (locally) or fail (in CI) when a program or data set a test needs is missing: in
    CI every test must run, and .ci/run installs the Debian ``package`` that provides it."""
    if available:
        return
    if _in_ci():
        pytest.fail(f"{what} is required in CI (apt-get install -y {package})")
    pytest.skip(f"{what} not installed")


def require_mosquitto() -> None:
    """Skip (locally) or fail (in CI) when the Mosquitto binary is missing."""
    require_installed(MosquittoBroker.available(), "mosquitto", "mosquitto")


@contextlib.asynccontextmanager
async def running_mosquitto(extra_config: str = "") -> AsyncIterator[MosquittoBroker]:
    """A Mosquitto started on a free loopback port for the block, closed after it (lines in
    ``extra_config`` come after the generated ones, so they override them)."""
    require_mosquitto()
    broker = MosquittoBroker(extra_config=extra_config)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.close()


@pytest.fixture
async def mosquitto() -> AsyncIterator[MosquittoBroker]:
    """A running Mosquitto on a free loopback port; `await m.stop()` / `await m.start()`
    restart it on the same port."""
    async with running_mosquitto() as broker:
        yield broker


@pytest.fixture
async def embedded_broker() -> AsyncIterator[EmbeddedBroker]:
    """The simulation's embedded amqtt broker on a kernel-chosen loopback port."""
    async with EmbeddedBroker() as broker:
        yield broker


# --------------------------------------------------------------------------- data, torch
class Digits(NamedTuple):
    """The digits data set split as the trainer tests use it (holdout: 10 %, seed 0)."""

    train: Dataset
    holdout: Dataset
    test: Dataset


@pytest.fixture(scope="module")
def digits_source() -> tuple[Dataset, Dataset]:
    """The bundled digits data set as `load_source` gives it: (train, test)."""
    from peer.training.data import load_source

    return load_source("digits")


@pytest.fixture(scope="module")
def digits(digits_source: tuple[Dataset, Dataset]) -> Digits:
    """Digits with 10 % of the training part held out (seed 0)."""
    from peer.training.data import split_holdout

    train, test = digits_source
    train, holdout = split_holdout(train, 0.1, seed=0)
    return Digits(train, holdout, test)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """The test machine is shared (and some tests run several peers in one process): one
    intra-op thread avoids OpenMP oversubscription. The previous setting comes back after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------- privacy
@pytest.fixture
def epsilon_tables() -> Iterator[Callable[..., EpsilonTable]]:
    """Opens epsilon tables (``EpsilonTable``'s arguments) and closes each after the test:
    a background child still running is killed and its thread joined, and none may be left
    running (``child_running``)."""
    from peer.training.privacy.table import EpsilonTable

    opened: list[EpsilonTable] = []

    def open_table(*args: object, **kwargs: object) -> EpsilonTable:
        table = EpsilonTable(*args, **kwargs)  # type: ignore[arg-type]
        opened.append(table)
        return table

    yield open_table
    for table in opened:
        table.close()
    assert [t.path for t in opened if t.child_running] == [], "epsilon table children left"
