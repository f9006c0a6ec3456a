"""Epsilon tables (peer/training/privacy/table.py): the ledger's figures are the library's,
bit for bit, step by step; the table persists, survives corruption, never guesses, and a
peer process that uses it never imports dp-accounting or scipy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from peer.training.ledger import PrivacyLedger
from peer.training.privacy import accountant as accountants
from peer.training.privacy import table as tables
from peer.training.privacy.base import AccountingError
from peer.training.privacy.table import TABLE_FILE, EpsilonTable, TableKey, method_fingerprint

REPO = Path(__file__).resolve().parent.parent
DELTA = 1e-5
RATE = 64 / 3840  # a 3,840-record shard at expected batch 64


def _ledger(table: EpsilonTable, sigma: float, accountant: str = "pld") -> PrivacyLedger:
    ledger = PrivacyLedger(sigma=sigma, max_grad_norm=1.0, sample_rate=RATE, delta=DELTA,
                           accountant=accountant)
    ledger.use_epsilons(table)
    return ledger


def test_ledger_matches_library_step_by_step_across_a_settings_change(
        tmp_path: Path, epsilon_tables: Callable[..., EpsilonTable]) -> None:
    table = epsilon_tables(tmp_path / TABLE_FILE, chunk=12)
    ledger = _ledger(table, sigma=1.0)
    library: list[float] = []
    tabled: list[float] = []
    for _ in range(12):
        tabled.append(ledger.record(1))
        library.append(accountants.epsilon_of_segments(ledger.segments, DELTA, "pld"))
    # A group-noise sigma_eff (any sigma the ledger records) and another rate: a new segment.
    ledger.update_settings(sigma=0.73, sample_rate=RATE / 2, max_grad_norm=1.0)
    for _ in range(6):
        tabled.append(ledger.record(2))
        library.append(accountants.epsilon_of_segments(ledger.segments, DELTA, "pld"))
    assert tabled == library  # exact equality: the table stores the library's doubles
    assert len(ledger.segments) == 2 and ledger.steps == 24
    # One foreground chunk per key, not one child per step (the first key's next chunk may
    # also have been computed ahead, in the background).
    assert table.foreground_children == 2


def test_rdp_ledger_matches_rdp_library(tmp_path: Path,
                                       epsilon_tables: Callable[..., EpsilonTable]) -> None:
    table = epsilon_tables(tmp_path / TABLE_FILE, chunk=4)
    ledger = _ledger(table, sigma=1.2, accountant="rdp")
    for _ in range(5):
        figure = ledger.record(20)
        assert figure == accountants.epsilon_of_segments(ledger.segments, DELTA, "rdp")


def test_stored_table_answers_without_a_child_and_a_miss_extends_it(
        tmp_path: Path, epsilon_tables: Callable[..., EpsilonTable]) -> None:
    first = epsilon_tables(tmp_path / TABLE_FILE, chunk=3)
    ledger = _ledger(first, sigma=1.0)
    ledger.record(20)
    key, _steps = TableKey.of(ledger.segments, DELTA, "pld") or (None, 0)
    assert key is not None
    assert sorted(first.entries(key)) == [20, 40, 60, 80]  # the asked count + 3 at stride 20

    again = epsilon_tables(tmp_path / TABLE_FILE, chunk=3)
    assert again.entries(key) == first.entries(key)
    resumed = _ledger(again, sigma=1.0)
    assert resumed.epsilon_after(60) == first.entries(key)[60]
    assert again.children_run == 0
    beyond = resumed.epsilon_after(100)  # not an entry: computed, never interpolated
    assert again.children_run == 1
    assert beyond == accountants.epsilon_of_segments([(1.0, RATE, 100)], DELTA, "pld")
    assert 100 in EpsilonTable(tmp_path / TABLE_FILE).entries(key)  # stored before use


def _stored_table(tmp_path: Path) -> dict[str, object]:
    """The body of a table the peer itself wrote: entries for 20 and 40 steps at sigma 1."""
    _ledger(EpsilonTable(tmp_path / TABLE_FILE, chunk=1), sigma=1.0).record(20)
    body = json.loads((tmp_path / TABLE_FILE).read_text())
    assert isinstance(body, dict)
    return body


def _understated(body: dict[str, object]) -> dict[str, object]:
    """The table with every figure halved: still finite, >= 0 and non-decreasing."""
    epsilons = body["epsilons"]
    assert isinstance(epsilons, dict) and len(epsilons) == 1
    return {**body, "epsilons": {k: {n: e / 2 for n, e in v.items()}
                                 for k, v in epsilons.items()}}


@pytest.mark.parametrize("damage", ["not json", "decreasing", "understated", "other method",
                                    "format 1", "a string figure"])
def test_damaged_or_foreign_table_is_counted_and_recomputed(tmp_path: Path,
                                                            damage: str) -> None:
    """A file the table would otherwise trust is refused: a halved-but-plausible table (the
    SHA-256 no longer matches), one made by other accountant code (another fingerprint, even
    with a matching digest), an old format, a figure that is not a number."""
    body = _stored_table(tmp_path)
    key = TableKey("pld", DELTA, (), 1.0, RATE).text()
    if damage == "not json":
        text = "{not json"
    elif damage == "decreasing":
        text = json.dumps({**body, "epsilons": {key: {"20": 0.9, "40": 0.5}}})
    elif damage == "understated":
        text = json.dumps(_understated(body))
    elif damage == "other method":  # well-formed, as other accountant code would write it
        foreign = {**_understated(body), "method": "0" * 64}
        foreign["sha256"] = tables.body_digest("0" * 64, foreign["sigmas"],
                                               foreign["epsilons"])
        text = json.dumps(foreign)
    elif damage == "format 1":
        text = json.dumps({"format": 1, "sigmas": {}, "epsilons": _understated(body)[
            "epsilons"]})
    else:
        text = json.dumps({**body, "epsilons": {key: {"20": "0.001", "40": "0.002"}}})
    (tmp_path / TABLE_FILE).write_text(text)
    table = EpsilonTable(tmp_path / TABLE_FILE, chunk=1)
    assert table.rebuilt_files == 1
    assert table.entries(TableKey("pld", DELTA, (), 1.0, RATE)) == {}
    ledger = _ledger(table, sigma=1.0)
    assert ledger.record(40) == accountants.epsilon_of_segments([(1.0, RATE, 40)], DELTA, "pld")
    assert table.children_run == 1


def test_intact_table_is_used_as_stored(tmp_path: Path,
                                       epsilon_tables: Callable[..., EpsilonTable]) -> None:
    body = _stored_table(tmp_path)
    assert body["method"] == method_fingerprint() and body["format"] == tables.TABLE_FORMAT
    table = epsilon_tables(tmp_path / TABLE_FILE)
    assert table.rebuilt_files == 0
    assert _ledger(table, sigma=1.0).epsilon_after(40) == accountants.epsilon_of_segments(
        [(1.0, RATE, 40)], DELTA, "pld")
    # Served as stored; the next chunk may have been started in the background since.
    assert table.foreground_waits == 0 and table.foreground_children == 0


def test_sigma_for_comes_from_the_child_and_equals_the_library(tmp_path: Path) -> None:
    table = EpsilonTable(tmp_path / TABLE_FILE)
    sigma = table.sigma_for(3.0, DELTA, RATE, 200, "pld")
    assert sigma == accountants.sigma_for(3.0, DELTA, RATE, 200, "pld")
    assert EpsilonTable(tmp_path / TABLE_FILE).sigma_for(3.0, DELTA, RATE, 200, "pld") == sigma
    assert table.children_run == 1


def test_a_child_that_cannot_run_is_an_accounting_error(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    table = EpsilonTable(tmp_path / TABLE_FILE)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    ledger = _ledger(table, sigma=1.0)
    with pytest.raises(AccountingError, match="did not run"):
        ledger.check_budget(20)
    assert ledger.steps == 0 and not (tmp_path / TABLE_FILE).exists()


def _fake_child(tmp_path: Path, body: str) -> str:
    """An executable that stands in for the child's interpreter (ignores its arguments)."""
    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize(("body", "message"), [
    ("echo oops >&2; exit 1", "failed \\(1\\): oops"),
    ("echo 'not json'", "no JSON"),
    ("echo '[1.0]'", "gave"),
    ("echo '{\"epsilons\": [0.1]}'", "gave"),  # no echo of key and counts, one figure
    ("exec sleep 30", "did not run"),  # hangs: the timeout (lowered here) ends it
])
def test_a_child_that_crashes_hangs_or_talks_garbage_is_an_accounting_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, message: str) -> None:
    table = EpsilonTable(tmp_path / TABLE_FILE, chunk=2)
    monkeypatch.setattr(sys, "executable", _fake_child(tmp_path, body))
    monkeypatch.setattr(tables, "CHILD_TIMEOUT_S", 1.0)
    ledger = _ledger(table, sigma=1.0)
    with pytest.raises(AccountingError, match=message):
        ledger.check_budget(20)
    with pytest.raises(AccountingError, match=message):
        ledger.record(20)  # no step is recorded with an unknown epsilon
    assert ledger.steps == 0 and ledger.epsilon == 0.0
    assert not (tmp_path / TABLE_FILE).exists()


def test_a_child_answering_another_key_is_an_accounting_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Well-formed figures for the wrong composition (sigma 2 instead of 1) are refused."""
    other = TableKey("pld", DELTA, (), 2.0, RATE).text()
    reply = json.dumps({"key": other, "steps": [20, 40], "epsilons": [0.01, 0.02]})
    monkeypatch.setattr(sys, "executable", _fake_child(tmp_path, f"echo '{reply}'"))
    ledger = _ledger(EpsilonTable(tmp_path / TABLE_FILE, chunk=1), sigma=1.0)
    with pytest.raises(AccountingError, match="gave"):
        ledger.check_budget(20)


def _child(request: dict[str, object], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "peer.training.privacy.table_child"],
                          input=json.dumps(request), capture_output=True, text=True, cwd=cwd,
                          env=env, check=False)


def test_child_refuses_a_bad_request() -> None:
    key = TableKey("pld", DELTA, (), 1.0, RATE).text()
    done = _child({"kind": "epsilons", "key": key, "steps": [0], "method": method_fingerprint()})
    assert done.returncode == 2
    assert "step count must be >= 1" in done.stderr
    done = _child({"kind": "epsilons", "key": key, "steps": [20], "method": "0" * 64})
    assert done.returncode == 2
    assert "method fingerprint" in done.stderr
    done = _child({"kind": "epsilons", "key": key, "steps": [20],
                   "method": method_fingerprint()})
    assert done.returncode == 0
    reply = json.loads(done.stdout)
    assert (reply["key"], reply["steps"]) == (key, [20])
    assert reply["epsilons"] == [accountants.epsilon_of_segments([(1.0, RATE, 20)], DELTA, "pld")]


PEER_PROCESS = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from peer.config import load_config
    from peer.assembly import build_trainer, load_local_data
    from peer.device import apply_process_settings
    cfg = load_config(Path(sys.argv[1]))
    apply_process_settings(cfg.device)
    train, holdout = load_local_data(cfg)
    trainer = build_trainer(cfg.training, train, holdout, cfg.state_dir)
    for _ in range(3):
        trainer.train_round()
    print(json.dumps({"epsilon": trainer.epsilon, "steps": trainer.ledger.steps,
                      "sigma": trainer.sigma, "rate": trainer.sample_rate,
                      "loaded": sorted(m for m in ("dp_accounting", "scipy", "torch")
                                       if m in sys.modules)}))
""")


def test_small_profile_peer_process_never_imports_the_library(tmp_path: Path) -> None:
    """The daemon's own assembly (config -> data -> trainer) under ``[device] profile =
    "small"`` and three private rounds: the figure is the library's, the library never
    loaded."""
    from peer.provision import provision

    network = provision("tbl", ["p0"], tmp_path / "net", broker_url="mqtt://127.0.0.1:1")
    config = network.peers[0].config
    text = config.read_text()
    assert "target_epsilon = 8.0\n" in text  # sigma_for runs in the child too
    config.write_text(text.replace("target_epsilon = 8.0\n", "target_epsilon = 8.0\n"
                                   'model = "mlp"\nlocal_steps = 5\n')
                      + '\n[device]\nprofile = "small"\n')  # the profile turns the table on
    done = subprocess.run([sys.executable, "-c", PEER_PROCESS, str(config)], cwd=REPO,
                          capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["loaded"] == ["torch"]
    assert report["steps"] == 15
    assert report["epsilon"] == accountants.epsilon_of_segments(
        [(report["sigma"], report["rate"], 15)], DELTA, "pld")
