"""The epsilon table's child runs: what a chunk asks for, when to ask ahead, how a child runs.

:class:`~.table.EpsilonTable` runs at most one child at a time. A run is a :class:`ChildJob`:
one key's step counts, asked for either by the training thread (a miss it waits on) or by a
background thread ahead of need (:func:`prefetch_counts` decides when and which counts).
Properties:

* Asking ahead changes when a figure is computed, never which: a background job's counts are
  computed by the same child, checked and stored by the same code as a foreground one's.
* :func:`prefetch_counts` is pure and only continues the stride the ledger is walking; it
  never proposes a count that is already stored.
* :class:`ChildProcess` holds the running child so it can be killed: a table that is closed
  (or a process that exits, :func:`close_at_exit`) leaves no background child behind. A
  foreground child is not killed: its caller is waiting for its figure, and it ends with its
  request or at its timeout.

This module imports neither the accountant's library nor :mod:`.table` (no cycle).
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from peer.training.privacy.base import AccountingError


@dataclass(frozen=True)
class ChildJob:
    """One child run: ``counts`` of the key whose canonical text is ``key``."""

    key: str
    counts: tuple[int, ...]
    #: True: started ahead of need by the background thread; False: a miss the caller waits on.
    background: bool

    def request(self) -> dict[str, object]:
        """The child's ``epsilons`` request (the parent adds its ``method``)."""
        return {"kind": "epsilons", "key": self.key, "steps": list(self.counts)}

    def covers(self, key: str, steps: int) -> bool:
        """Whether this run will store the figure of ``key`` at ``steps``."""
        return key == self.key and steps in self.counts


def chunk_counts(steps: int, stride: int, chunk: int) -> tuple[int, ...]:
    """A miss's counts: ``steps`` and the next ``chunk`` counts at ``stride``."""
    stride = max(1, stride)
    return tuple(steps + i * stride for i in range(chunk + 1))


def prefetch_counts(stored: Mapping[int, float], steps: int, stride: int, chunk: int,
                    margin: int) -> tuple[int, ...] | None:
    """The counts to compute ahead after serving ``steps``, or None if none are needed yet.

    Needed when fewer than ``margin`` stored entries lie past ``steps`` (``margin <= 0``:
    never). The counts then continue the ledger's stride past the last stored entry, so the
    chunk holds the counts the next rounds will ask for and none that is already stored.
    """
    if margin <= 0:
        return None
    ahead = [n for n in stored if n > steps]
    if len(ahead) >= margin:
        return None
    stride = max(1, stride)
    return chunk_counts(max(ahead, default=steps) + stride, stride, chunk)


class _Killable(Protocol):
    def kill(self) -> None: ...


class ChildProcess:
    """The child a table is running now, if any: :meth:`kill` ends it from another thread.

    A kill that comes before the process exists is remembered, and the process is killed as
    soon as it is started (:meth:`started`), so a close never misses a child being spawned.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: _Killable | None = None
        self._killed = False

    def started(self, process: _Killable) -> None:
        with self._lock:
            self._process = process
            if self._killed:
                process.kill()

    def kill(self) -> None:
        with self._lock:
            self._killed = True
            if self._process is not None:
                self._process.kill()

    @property
    def killed(self) -> bool:
        with self._lock:
            return self._killed


def run_child(request: dict[str, object], *, timeout: float,
              handle: ChildProcess | None = None) -> dict[str, object]:
    """Run ``python -m peer.training.privacy.table_child`` on one request and return its
    JSON reply; AccountingError if it cannot start, is killed, exits non-zero, runs past
    ``timeout`` or writes no JSON object. It runs with this ``peer`` package first on its
    path and at the package root: ``-m`` puts the working directory first on ``sys.path``,
    so elsewhere the child could import another ``peer`` package (the method fingerprint
    would then refuse it, but this one is the right one)."""
    cwd = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(cwd), os.environ.get("PYTHONPATH")) if p)}
    command = [sys.executable, "-m", "peer.training.privacy.table_child"]
    try:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    except OSError as exc:
        raise AccountingError(f"epsilon table child did not run: {exc}") from exc
    if handle is not None:
        handle.started(process)
    try:
        out, err = process.communicate(json.dumps(request), timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        process.kill()
        process.communicate()
        raise AccountingError(f"epsilon table child did not run: {exc}") from exc
    if handle is not None and handle.killed:
        raise AccountingError("epsilon table child was stopped (the table was closed)")
    if process.returncode != 0:
        tail = " | ".join(err.strip().splitlines()[-2:])
        raise AccountingError(f"epsilon table child failed ({process.returncode}): {tail}")
    try:
        reply = json.loads(out)
    except json.JSONDecodeError as exc:
        raise AccountingError(f"epsilon table child wrote no JSON: {exc}") from exc
    if not isinstance(reply, dict):
        raise AccountingError(f"epsilon table child gave {reply!r}")
    return reply


class _Closable(Protocol):
    def close(self) -> None: ...


_OPEN: weakref.WeakSet[_Closable] = weakref.WeakSet()


def close_at_exit(table: _Closable) -> None:
    """Close ``table`` when the interpreter exits (if it is still alive then), so a background
    child never outlives the peer; its thread is a daemon and never holds the exit up."""
    _OPEN.add(table)


@atexit.register
def _close_open_tables() -> None:
    for table in list(_OPEN):
        table.close()
