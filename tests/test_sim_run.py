"""End-to-end simulation runs (sim/runner.py, sim/cli.py) at reduced size.

Real peers, real crypto, a real broker (embedded amqtt, or Mosquitto), real DP-SGD trainers
on digits. Sizes are small so the whole file stays well under two minutes on a busy machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sim.cli import EXIT_USAGE, main
from sim.metrics import read_metrics
from sim.runner import RunResult, run_simulation
from sim.scenario import Scenario
from sim.scenario_io import scenario_from_dict
from tests.conftest import require_mosquitto

pytestmark = pytest.mark.timeout(150)

CHANCE = 0.1  # ten digit classes

# Pauses between local rounds are shortened for tests; everything else is the real thing.
FAST_PAUSE_S = 0.5


def _small(tmp_path: Path, **changes: object) -> Scenario:
    base: dict[str, object] = dict(
        peers=4, rounds=5, local_steps=8, duration_s=45.0, partition="iid",
        noise_multiplier=0.6, lr=0.2, topk_fraction=0.2, out_dir=tmp_path,
    )
    base.update(changes)
    return scenario_from_dict(base)


def _finals(result: RunResult) -> dict[str, dict]:
    rows = read_metrics(result.metrics_path)
    return {r.peer: {"row": r} for r in rows if r.event == "stop"}


async def test_default_run_reduced_writes_report_and_learns(tmp_path: Path) -> None:
    result = await run_simulation(_small(tmp_path), progress=False, round_pause_s=FAST_PAUSE_S)
    assert result.report_path is not None and result.report_path.exists()
    assert result.metrics_path.exists()
    assert (result.run_dir / "scenario.toml").exists()
    assert "<img" in result.report_path.read_text()
    finals = _finals(result)
    assert sorted(finals) == ["p00", "p01", "p02", "p03"]
    assert result.summary.sessions_done > 0, "no aggregation session completed"
    assert result.summary.accuracy_source == "test set"
    assert result.summary.mean_accuracy is not None
    assert result.summary.mean_accuracy > CHANCE + 0.15
    assert result.summary.max_epsilon is not None and result.summary.max_epsilon > 0
    assert {"centralized", "standalone"} <= set(result.baselines)
    saved = json.loads((result.run_dir / "result.json").read_text())
    assert saved["stopped_by"] in ("rounds", "duration")


async def test_churn_and_hostile_peers_do_not_stop_the_run(tmp_path: Path) -> None:
    scenario = _small(
        tmp_path, rounds=14, churn_rate=20.0, churn_downtime_s=1.0, duration_s=40.0,
        hostile_peers=["garbage", "huge_norm"], seed=3,
    )
    result = await run_simulation(scenario, progress=False, baselines=False,
                                  round_pause_s=FAST_PAUSE_S)
    assert result.report_path is not None and result.report_path.exists()
    rows = read_metrics(result.metrics_path)
    events = {r.event for r in rows}
    assert "leave" in events and "join" in events, "churn did not happen"
    assert result.churn_events > 0
    # The hostile peers never appear as honest peers in the metrics.
    assert {r.peer for r in rows} == {"p00", "p01", "p02", "p03"}
    # Garbage is dropped and counted by the honest peers.
    assert sum(result.summary.drops.values()) > 0
    assert set(result.summary.drops) & {"malformed", "unknown_sender", "topic_mismatch"}
    garbage = next(h for h in result.hostile if h["kind"] == "garbage")
    assert garbage["published"] > 0
    # The huge-norm insider got into sessions with honest peers (14 rounds: it does, several
    # times), and each such peer's merge was clipped to the norm bound or rejected - never
    # applied at full size.
    huge = next(h for h in result.hostile if h["kind"] == "huge_norm")
    honest_done = [r for r in rows if r.event == "session_done"]
    assert honest_done, "no session completed under churn"
    assert huge["sessions_done"] > 0, huge
    contained = sum(1 for r in honest_done if r.extra.get("clipped"))
    contained += sum(sum(r.extra.get("merges_rejected", {}).values())
                     for r in rows if r.event == "stop")
    assert contained > 0
    # Every honest peer still finished with a test accuracy.
    assert len(_finals(result)) == 4


@pytest.mark.mosquitto
async def test_small_run_on_mosquitto(tmp_path: Path) -> None:
    require_mosquitto()
    scenario = _small(tmp_path, peers=3, rounds=4, broker="mosquitto")
    result = await run_simulation(scenario, progress=False, baselines=False,
                                  round_pause_s=FAST_PAUSE_S)
    assert result.summary.sessions_done > 0
    assert result.report_path is not None and result.report_path.exists()
    assert len(_finals(result)) == 3


async def test_processes_mode_runs_one_process_per_peer(tmp_path: Path) -> None:
    scenario = _small(tmp_path, peers=3, rounds=4, mode="processes", duration_s=60.0)
    result = await run_simulation(scenario, progress=False, baselines=False,
                                  round_pause_s=FAST_PAUSE_S)
    finals = _finals(result)
    assert sorted(finals) == ["p00", "p01", "p02"]
    assert result.summary.sessions_done > 0
    assert result.summary.accuracy_source == "test set"
    # keys were written for the processes, private to the user
    for key in (result.run_dir / "secrets").glob("*.key"):
        assert key.stat().st_mode & 0o077 == 0


def test_cli_bad_option_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--threshold", "6"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "threshold" in err and "murmur-sim" in err


def test_cli_bad_scenario_file_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("peers = 4\nalpah = 0.3\n")
    assert main(["--scenario", str(bad)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "alpah" in err and "alpha" in err and str(bad) in err
    assert main(["--scenario", str(tmp_path / "missing.toml")]) == EXIT_USAGE
    assert "cannot read" in capsys.readouterr().err
