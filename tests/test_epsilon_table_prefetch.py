"""Epsilon tables filled ahead of need (peer/training/privacy/table.py, table_prefetch.py):
the next chunk is computed in the background before a round needs it, the ledger's figures
stay the library's bit for bit, a round that needs a count being computed waits for that
child instead of starting another, and a failed background child is counted while the
foreground still gets a correct figure or an AccountingError. Every table is opened through
the ``epsilon_tables`` fixture, which closes it and checks that no child is left running."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from peer.training.ledger import PrivacyLedger
from peer.training.privacy import accountant as accountants
from peer.training.privacy.base import AccountingError
from peer.training.privacy.table import TABLE_FILE, EpsilonTable, TableKey
from peer.training.privacy.table_prefetch import chunk_counts, prefetch_counts
from tests.conftest import wait_until_sync

DELTA = 1e-5
RATE = 64 / 3840
#: A child computes a few PLD figures in seconds; this bounds a wait on a loaded machine.
CHILD_WAIT_S = 120.0

Tables = Callable[..., EpsilonTable]


def _ledger(table: EpsilonTable, sigma: float = 1.0) -> PrivacyLedger:
    ledger = PrivacyLedger(sigma=sigma, max_grad_norm=1.0, sample_rate=RATE, delta=DELTA,
                           accountant="pld")
    ledger.use_epsilons(table)
    return ledger


def _library(steps: int, sigma: float = 1.0) -> float:
    return accountants.epsilon_of_segments([(sigma, RATE, steps)], DELTA, "pld")


@dataclass(frozen=True)
class Switches:
    """Files that steer the wrapped interpreter: the child waits while ``hold`` exists,
    fails (exit 1) while ``fail`` exists, and fails once (removing it) if ``fail_once``
    exists; otherwise it runs the real interpreter."""

    hold: Path
    fail: Path
    fail_once: Path


def _wrapped_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Switches:
    """Stand the child's interpreter in with a script steered by :class:`Switches`."""
    switches = Switches(tmp_path / "hold", tmp_path / "fail", tmp_path / "fail-once")
    script = tmp_path / "wrapped-python"
    script.write_text(
        f"#!/bin/sh\n"
        f"while [ -e '{switches.hold}' ]; do sleep 0.02; done\n"
        f"if [ -e '{switches.fail}' ]; then echo 'made to fail' >&2; exit 1; fi\n"
        f"if [ -e '{switches.fail_once}' ]; then rm '{switches.fail_once}'; exit 1; fi\n"
        f"exec '{sys.executable}' \"$@\"\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(script))
    return switches


def test_next_chunk_is_computed_ahead_and_figures_equal_the_library(
        tmp_path: Path, epsilon_tables: Tables) -> None:
    """Rounds of 5 steps with chunks of 6 beyond the asked count and a margin of 3: only the
    first round waits for a child; the others are served from chunks computed in the
    background, and every figure is the in-process library's double."""
    table = epsilon_tables(tmp_path / TABLE_FILE, chunk=6, margin=3)
    ledger = _ledger(table)
    tabled, library = [], []
    for _ in range(12):  # 5 .. 60 steps: the first background chunk is 40 .. 70
        tabled.append(ledger.record(5))
        library.append(_library(ledger.steps))
        wait_until_sync(lambda: not table.child_running, CHILD_WAIT_S, "the child to end")
    assert tabled == library
    assert table.foreground_waits == 1 and table.foreground_children == 1
    assert table.background_chunks == 2  # started after serving 25 and after serving 60
    assert table.background_failures == 0 and table.children_run == 3
    key = TableKey("pld", DELTA, (), 1.0, RATE)
    assert sorted(table.entries(key)) == list(range(5, 106, 5))
    # Stored as computed: a table opened from the file holds the same doubles.
    assert EpsilonTable(tmp_path / TABLE_FILE, margin=0).entries(key) == table.entries(key)
    assert table.entries(key)[105] == _library(105)  # computed ahead, never used, still exact


def test_a_round_needing_a_count_being_computed_waits_for_that_child(
        tmp_path: Path, epsilon_tables: Tables, monkeypatch: pytest.MonkeyPatch) -> None:
    hold = _wrapped_python(tmp_path, monkeypatch).hold
    table = epsilon_tables(tmp_path / TABLE_FILE, chunk=3, margin=2)
    ledger = _ledger(table)
    for _ in range(4):  # 10 .. 40 from the first child; serving 30 starts 50 .. 80 ahead
        ledger.record(10)
        if ledger.steps == 20:
            hold.touch()  # the background child will wait while this file exists
    assert table.child_running and table.children_run == 2
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(ledger.record, 10)  # needs 50, which the held child computes
        wait_until_sync(lambda: table.foreground_waits == 2, CHILD_WAIT_S,
                        "the round to wait for the count")
        assert not pending.done() and table.children_run == 2  # waiting, no second child
        hold.unlink()
        figure = pending.result(timeout=CHILD_WAIT_S)
    assert figure == _library(50)
    assert table.children_run == 2 and table.foreground_children == 1
    assert table.background_chunks == 1 and table.background_failures == 0


def test_a_round_waiting_on_a_background_child_that_fails_runs_its_own(
        tmp_path: Path, epsilon_tables: Tables, monkeypatch: pytest.MonkeyPatch) -> None:
    switches = _wrapped_python(tmp_path, monkeypatch)
    table = epsilon_tables(tmp_path / TABLE_FILE, chunk=3, margin=2)
    ledger = _ledger(table)
    ledger.record(10)  # 10 .. 40 stored
    ledger.record(10)
    switches.hold.touch()
    switches.fail_once.touch()
    ledger.record(10)  # serving 30 starts 50 .. 80 ahead: held, then it will fail
    ledger.record(10)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(ledger.record, 10)  # needs 50: waits for the held child
        wait_until_sync(lambda: table.foreground_waits == 2, CHILD_WAIT_S,
                        "the round to wait for the count")
        switches.hold.unlink()
        figure = pending.result(timeout=CHILD_WAIT_S)
    assert figure == _library(50)  # from the round's own child, after the failure
    assert table.background_failures == 1 and table.background_chunks == 0
    assert table.foreground_children == 2 and table.children_run == 3


@pytest.mark.parametrize("child_recovers", [True, False])
def test_a_failed_background_child_is_counted_and_the_foreground_decides(
        tmp_path: Path, epsilon_tables: Tables, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, child_recovers: bool) -> None:
    """The failure is logged and counted and asking ahead pauses for the key; the round that
    misses then runs its own child: the library's figure if that works, else the typed
    error and no step recorded."""
    fail = _wrapped_python(tmp_path, monkeypatch).fail
    table = epsilon_tables(tmp_path / TABLE_FILE, chunk=3, margin=2)
    ledger = _ledger(table)
    ledger.record(10)  # 10 .. 40 stored
    ledger.record(10)
    fail.touch()
    ledger.record(10)  # serving 30 starts 50 .. 80 ahead, which fails
    wait_until_sync(lambda: table.background_failures == 1, CHILD_WAIT_S,
                    "the background failure to be counted")
    assert "computing epsilon figures ahead failed" in caplog.text
    assert ledger.record(10) == _library(40)  # stored: served; no new background child
    wait_until_sync(lambda: not table.child_running, CHILD_WAIT_S, "the child to end")
    assert table.children_run == 2 and table.background_chunks == 0
    if child_recovers:
        fail.unlink()
        assert ledger.record(10) == _library(50)
        assert ledger.steps == 50 and table.foreground_children == 2
    else:
        with pytest.raises(AccountingError, match="made to fail"):
            ledger.record(10)
        assert ledger.steps == 40 and table.foreground_children == 2
    assert table.background_failures == 1


def test_close_kills_a_running_background_child_and_lookups_go_on(
        tmp_path: Path, epsilon_tables: Tables, monkeypatch: pytest.MonkeyPatch) -> None:
    hold = _wrapped_python(tmp_path, monkeypatch).hold
    table = epsilon_tables(tmp_path / TABLE_FILE, chunk=2, margin=2)
    ledger = _ledger(table)
    ledger.record(10)  # 10, 20, 30
    hold.touch()
    ledger.record(10)  # serving 20 starts 40 .. 60 ahead, held
    assert table.child_running
    table.close()
    assert not table.child_running  # killed and its thread joined
    assert table.background_failures == 0 and table.background_chunks == 0
    hold.unlink()
    assert ledger.record(10) == _library(30)
    assert ledger.record(10) == _library(40)  # a miss after close: computed in the foreground
    assert not table.child_running and table.children_run == 3


def test_a_background_thread_that_cannot_start_frees_the_slot(
        tmp_path: Path, epsilon_tables: Tables, monkeypatch: pytest.MonkeyPatch) -> None:
    """No thread for the chunk ahead (a process or memory limit): the figure already stored
    is still served, the failure is counted like a failed child, and the next miss runs its
    own child instead of waiting on a slot nobody holds."""
    table = epsilon_tables(tmp_path / TABLE_FILE, chunk=2, margin=2)
    ledger = _ledger(table)
    ledger.record(10)  # 10, 20, 30

    def cannot_start(thread: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", cannot_start)
    assert ledger.record(10) == _library(20)  # serving 20 asks ahead for 40 .. 60: no thread
    assert not table.child_running
    assert table.background_failures == 1 and table.children_run == 1
    monkeypatch.undo()
    assert ledger.record(10) == _library(30)  # paused: no chunk ahead after a failure
    assert ledger.record(10) == _library(40)  # a miss: the round's own child
    assert table.foreground_children == 2 and table.children_run == 2


def test_a_failed_write_stores_and_serves_nothing(
        tmp_path: Path, epsilon_tables: Tables) -> None:
    """A chunk whose file write fails, ahead or in the foreground, leaves the table's entries
    as the file last held them: ahead it is a counted failure, in the foreground the round's
    AccountingError, and no step is recorded."""
    path = tmp_path / TABLE_FILE
    table = epsilon_tables(path, chunk=2, margin=2)
    ledger = _ledger(table)
    ledger.record(10)  # 10, 20, 30 written
    key = TableKey("pld", DELTA, (), 1.0, RATE)
    written = EpsilonTable(path, margin=0).entries(key)
    assert sorted(written) == [10, 20, 30]
    path.unlink()
    path.mkdir()  # the atomic rename onto the table's path now fails
    ledger.record(10)  # serving 20 asks ahead for 40 .. 60, whose write fails
    wait_until_sync(lambda: table.background_failures == 1, CHILD_WAIT_S,
                    "the failed write to be counted")
    assert table.entries(key) == written and table.background_chunks == 0
    assert ledger.record(10) == _library(30)
    with pytest.raises(AccountingError, match="not stored"):
        ledger.record(10)  # needs 40: its own child runs, its write fails
    assert ledger.steps == 30 and table.entries(key) == written
    assert table.foreground_children == 2


@pytest.mark.parametrize(("stored", "steps", "stride", "margin", "expected"), [
    ({10: 0.1, 20: 0.2, 30: 0.3}, 10, 10, 2, None),  # two left past 10: enough
    ({10: 0.1, 20: 0.2, 30: 0.3}, 20, 10, 2, (40, 50, 60)),  # continues past the last entry
    ({10: 0.1, 20: 0.2, 30: 0.3}, 30, 5, 2, (35, 40, 45)),  # the stride just served
    ({10: 0.1}, 10, 10, 0, None),  # margin 0: never ahead
    ({}, 7, 3, 1, (10, 13, 16)),  # nothing past the count served
])
def test_prefetch_counts(stored: dict[int, float], steps: int, stride: int, margin: int,
                         expected: tuple[int, ...] | None) -> None:
    counts = prefetch_counts(stored, steps, stride, chunk=2, margin=margin)
    assert counts == expected
    assert counts is None or not set(counts) & set(stored)


def test_chunk_counts_start_at_the_asked_count() -> None:
    assert chunk_counts(20, 20, 3) == (20, 40, 60, 80)
    assert chunk_counts(5, 0, 2) == (5, 6, 7)  # a stride below 1 is 1
