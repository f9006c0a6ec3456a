"""Power-cut drill: SIGKILL a real `murmur-peer run` at random points, restart it, repeat.

Each iteration starts the daemon exactly as systemd would (`python -m peer.cli run --config`)
against a real Mosquitto, kills it with SIGKILL (no handler runs: the same as a power cut for
the files the process wrote, since every write is fsynced before it is renamed into place),
and then checks the state directory from outside:

* the ledger parses, and its steps and epsilon never decrease from one iteration to the next;
* the checkpoint loads, and it is consistent with the ledger: the ledger is written first, so
  ``ledger steps >= checkpoint round * local_steps`` and the ledger is at most one round ahead
  of the copy embedded in the checkpoint;
* the daemon's own start-up path (``peer.assembly.peer_from_config``: credentials, data,
  trainer resume)
  resumes exactly that round, step count and epsilon;
* temp files left by a kill mid-write (and planted stale ones) do not break the restart;
* over the loop the restarted peer makes progress: the ledger's steps grow.

A single peer trains but never shares (sessions need 3 peers), which is all this test needs;
its config opts out of waiting for a group (``[pace] train_only_when_grouped = false``).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from peer.assembly import peer_from_config
from peer.config import load_config
from peer.provision import provision
from peer.training.checkpoint import load_checkpoint
from peer.training.ledger import LedgerError, PrivacyLedger
from peer.training.trainer import CHECKPOINT_FILE, LEDGER_FILE
from sim.broker import MosquittoBroker
from tests.conftest import wait_until_sync

pytestmark = [pytest.mark.timeout(150), pytest.mark.mosquitto]

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_STEPS = 2
ITERATIONS = 5
SEED = 20261122
START_TIMEOUT_S = 60.0  # spawn -> first ledger write, including torch import on a busy machine


@dataclass(frozen=True)
class DiskState:
    """What a restarted peer would find in its state directory."""

    ledger_steps: int
    ledger_epsilon: float
    checkpoint_round: int | None
    checkpoint_ledger_steps: int | None


def read_state(state_dir: Path) -> DiskState:
    """Parse the ledger and checkpoint exactly as written; fail the test if either is torn."""
    ledger_path, checkpoint_path = state_dir / LEDGER_FILE, state_dir / CHECKPOINT_FILE
    if not ledger_path.exists():
        # Killed before the first round finished: no training state may exist without it.
        assert not checkpoint_path.exists(), "a checkpoint without its ledger"
        return DiskState(0, 0.0, None, None)
    json.loads(ledger_path.read_text())  # whole JSON, not a torn prefix
    ledger = PrivacyLedger.load(ledger_path)
    if not checkpoint_path.exists():
        return DiskState(ledger.steps, ledger.epsilon, None, None)
    checkpoint = load_checkpoint(checkpoint_path)
    embedded = PrivacyLedger.from_json(checkpoint.ledger_json, str(checkpoint_path))
    return DiskState(ledger.steps, ledger.epsilon, checkpoint.round, embedded.steps)


def check_consistent(state: DiskState) -> None:
    if state.checkpoint_round is None or state.checkpoint_ledger_steps is None:
        return
    # The ledger file is written before the checkpoint of the same round.
    assert state.ledger_steps >= state.checkpoint_round * LOCAL_STEPS, state
    assert state.ledger_steps - state.checkpoint_ledger_steps in (0, LOCAL_STEPS), state
    assert state.checkpoint_ledger_steps >= state.checkpoint_round * LOCAL_STEPS, state


def ledger_steps_now(state_dir: Path) -> int:
    """The ledger's steps while the peer runs (os.replace makes every read whole)."""
    try:
        return PrivacyLedger.load(state_dir / LEDGER_FILE).steps
    except LedgerError:  # not written yet; the test's own checks come after the kill
        return 0


def temp_files(state_dir: Path) -> list[str]:
    return sorted(p.name for p in state_dir.iterdir() if p.name.endswith(".tmp"))


def spawn(config: Path, cwd: Path, stderr_path: Path) -> subprocess.Popen[bytes]:
    with open(stderr_path, "wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "peer.cli", "run", "--config", str(config)],
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def assert_running(process: subprocess.Popen[bytes], stderr_path: Path) -> None:
    """The peer never exits by itself: fail with its stderr if it did."""
    if process.poll() is not None:
        pytest.fail(f"peer exited by itself ({process.returncode}):\n"
                    f"{stderr_path.read_text()[-3000:]}")


def wait_alive(process: subprocess.Popen[bytes], seconds: float, stderr_path: Path) -> None:
    """Let the peer run ``seconds`` (the random kill point), watching that it keeps running."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert_running(process, stderr_path)
        time.sleep(0.05)
    assert_running(process, stderr_path)


def wait_for_progress(process: subprocess.Popen[bytes], state_dir: Path, after_steps: int,
                      stderr_path: Path) -> None:
    """Block until this run has recorded a round beyond ``after_steps`` (bounded)."""

    def progressed() -> bool:
        assert_running(process, stderr_path)
        return ledger_steps_now(state_dir) > after_steps

    try:
        wait_until_sync(progressed, START_TIMEOUT_S, f"a training round beyond {after_steps} steps")
    except AssertionError as exc:
        pytest.fail(f"{exc}:\n{stderr_path.read_text()[-3000:]}")


def resumed_line(stderr_text: str) -> tuple[int, int] | None:
    """(round, steps) from the trainer's 'resumed round R, S steps' log line, if it got there."""
    for line in stderr_text.splitlines():
        if "resumed round " in line:
            words = line.split("resumed round ", 1)[1].replace(",", "").split()
            return int(words[0]), int(words[1])
    return None


async def test_sigkill_loop_restarts_consistently(tmp_path: Path,
                                                  mosquitto: MosquittoBroker) -> None:
    rng = random.Random(SEED)
    result = provision("demo", ["alice"], tmp_path / "net", broker_url=mosquitto.url)
    config = result.peers[0].config
    config.write_text(
        config.read_text()
        .replace("password_file", "# password_file")  # the test broker takes anonymous clients
        .replace("target_epsilon = 8.0",
                 f"noise_multiplier = 1.0\nlocal_steps = {LOCAL_STEPS}\nbatch_size = 16")
        # Alone, a peer waits for a group before spending budget; this drill needs rounds.
        + "\n[pace]\ntrain_only_when_grouped = false\nbudget_hours = 0.01\n"
    )
    cfg = load_config(config)
    state_dir = cfg.state_dir
    history: list[DiskState] = [DiskState(0, 0.0, None, None)]
    leftovers_seen: list[str] = []
    resumes_seen: list[tuple[int, int] | None] = []
    process: subprocess.Popen[bytes] | None = None
    try:
        for iteration in range(ITERATIONS):
            before = history[-1]
            if iteration == 2:
                # A power cut can leave half-written temp files; plant stale ones, too.
                state_dir.mkdir(parents=True, exist_ok=True)
                (state_dir / f".{LEDGER_FILE}.stale.tmp").write_text('{"steps": 99')
                (state_dir / f".{CHECKPOINT_FILE}.stale.tmp").write_bytes(b"PK\x03\x04torn")
            stderr_path = tmp_path / f"run{iteration}.stderr"
            process = spawn(config, tmp_path, stderr_path)
            delay = rng.uniform(1.0, 4.0)
            if iteration % 2 == 0:
                # Anywhere, start-up and resume included: 1-4 s after the process started.
                wait_alive(process, delay, stderr_path)
            else:
                # Mid-training, where the ledger and checkpoint are rewritten every round:
                # 1-4 s after this run's first new round reached the disk.
                wait_for_progress(process, state_dir, before.ledger_steps, stderr_path)
                wait_alive(process, delay, stderr_path)
            process.send_signal(signal.SIGKILL)
            assert process.wait(timeout=30) == -signal.SIGKILL
            process = None

            state = read_state(state_dir)
            check_consistent(state)
            assert state.ledger_steps >= before.ledger_steps, (before, state)
            assert state.ledger_epsilon >= before.ledger_epsilon, (before, state)
            # A run that got as far as resuming resumed exactly what was there (and nothing
            # when there was no checkpoint); a run killed early may not have got that far.
            resumed = resumed_line(stderr_path.read_text())
            on_disk = (None if before.checkpoint_round is None
                       else (before.checkpoint_round, before.ledger_steps))
            assert resumed in (None, on_disk), (resumed, before)
            resumes_seen.append(resumed)
            if state_dir.exists():
                leftovers_seen += temp_files(state_dir)

            # The daemon's start-up path resumes exactly what is on disk.
            trainer = peer_from_config(load_config(config)).trainer
            assert trainer.round == (state.checkpoint_round or 0)
            assert trainer.ledger.steps == state.ledger_steps
            assert trainer.ledger.epsilon == pytest.approx(state.ledger_epsilon, rel=1e-12)
            del trainer
            history.append(state)
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=30)

    # A run killed after training (odd iterations) always resumed once a checkpoint existed:
    # the resume check above did run.
    assert any(resumes_seen), (resumes_seen, history)
    steps = [s.ledger_steps for s in history]
    gains = [after - before for before, after in itertools.pairwise(steps)]
    assert any(gain > 0 for gain in gains[1:]), steps  # a restart after a kill trained on
    assert history[-1].ledger_epsilon > 0
    assert f".{LEDGER_FILE}.stale.tmp" in leftovers_seen  # the planted files were there ...
    assert history[-1].ledger_steps > history[2].ledger_steps  # ... and training went on
