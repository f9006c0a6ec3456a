"""The examples of examples/ run as their README says, CI-sized: a user's model and loader
through ``murmur-sim`` (sim/cli.py, the same scenario keys) with real peers, a real broker and
real DP-SGD."""

from __future__ import annotations

from pathlib import Path

import pytest

from peer.training.data import DEFAULT_FASHION_MNIST_ROOT
from sim.cli import EXIT_USAGE, main
from sim.metrics import read_metrics
from sim.runner import run_simulation
from sim.scenario_io import scenario_from_dict
from tests.conftest import require_installed

pytestmark = pytest.mark.timeout(240)

FAST_PAUSE_S = 0.5  # pauses between local rounds shortened, as in test_sim_run.py


def _engines(metrics: Path) -> set[str]:
    """The engines the peers' status rows report."""
    return {r.extra["engine"] for r in read_metrics(metrics) if r.extra and "engine" in r.extra}


def _clipped_adaptively(metrics: Path) -> bool:
    """Whether the peers' status rows report a current clipping norm C (adaptive clipping:
    a fixed C reports none), with every peer's C moved from its start."""
    norms: dict[str, float] = {}
    for r in read_metrics(metrics):
        if r.extra and r.extra.get("clip_norm") is not None:
            norms[r.peer] = r.extra["clip_norm"]
    return bool(norms) and all(c != 1.0 for c in norms.values())


async def _run(tmp_path: Path, **changes: object):
    base: dict[str, object] = dict(peers=4, rounds=5, local_steps=8, duration_s=60.0,
                                   partition="iid", noise_multiplier=0.6, out_dir=tmp_path)
    base.update(changes)
    return await run_simulation(scenario_from_dict(base), progress=False, baselines=False,
                                round_pause_s=FAST_PAUSE_S)


async def test_the_sensor_example_learns_on_the_general_engine(tmp_path: Path) -> None:
    # CI-sized: few rounds, a large step (lr 1.0) and little noise (sigma 0.6).
    result = await _run(tmp_path, model="examples.sensor.model:build",
                        dataset="python:examples.sensor.data:load", lr=1.0, rounds=6,
                        local_steps=10)
    assert result.summary.sessions_done > 0
    assert result.summary.mean_accuracy is not None
    # Five machine states: chance is 20 %; three checks of this run gave 43-56 %.
    assert result.summary.mean_accuracy > 1 / 5 + 0.10
    assert _engines(result.metrics_path) == {"vmap"}
    # A model of one's own clips adaptively by default, as the README's command does.
    assert _clipped_adaptively(result.metrics_path)


async def test_the_fashion_example_learns_on_the_fast_engine(tmp_path: Path) -> None:
    root = DEFAULT_FASHION_MNIST_ROOT
    require_installed((root / "t10k-labels-idx1-ubyte.gz").exists(), "Fashion-MNIST",
                      "dataset-fashion-mnist")
    result = await _run(tmp_path, model="examples.fashion.model:build",
                        dataset="fashion-mnist", batch_size=32)
    assert result.summary.sessions_done > 0
    assert result.summary.mean_accuracy is not None
    assert result.summary.mean_accuracy > 1 / 10 + 0.15
    assert _engines(result.metrics_path) == {"ghost"}
    assert _clipped_adaptively(result.metrics_path)


def test_a_model_path_that_is_not_one_is_a_usage_error(capsys) -> None:
    assert main(["--model", "examples.sensor.model:", "--no-progress"]) == EXIT_USAGE
    assert "not an import path" in capsys.readouterr().err
