"""peer/network/rounds.py gauges and the node's session totals on disk."""

from __future__ import annotations

from pathlib import Path

from peer.network.counters import load_sessions_total, save_sessions_total
from peer.network.rounds import TrainingGauges


def test_budget_milestones_are_reported_once_and_not_again_after_a_restart() -> None:
    gauges = TrainingGauges(dp=True, epsilon=1.0, budget_epsilon=8.0)
    assert gauges.new_milestones() == []
    gauges.epsilon = 4.5
    assert gauges.new_milestones() == [0.25, 0.5]
    assert gauges.new_milestones() == []
    gauges.epsilon = 7.0
    assert gauges.new_milestones() == [0.75]

    class Restarted:
        epsilon = 6.5
        budget_epsilon = 8.0

    resumed = TrainingGauges.of(Restarted())
    assert resumed.epsilon == 6.5 and resumed.new_milestones() == []  # passed in an earlier run
    assert TrainingGauges(dp=False, epsilon=9.0, budget_epsilon=8.0).new_milestones() == []


def test_sessions_total_survives_a_restart_and_a_bad_file_only_resets_it(
        tmp_path: Path) -> None:
    path = tmp_path / "totals.json"
    assert load_sessions_total(path) == 0
    save_sessions_total(path, 1501)
    assert load_sessions_total(path) == 1501
    assert path.stat().st_mode & 0o777 == 0o600
    for bad in (b"{", b'{"format": 1, "sessions_done": -3}', b'{"format": 2}', b"[]"):
        path.write_bytes(bad)
        assert load_sessions_total(path) == 0


def test_state_word_names_the_most_urgent_state() -> None:
    from peer.network.counters import state_word

    calm = {"stopping": False, "connected": True, "ever_connected": True, "in_session": False,
            "training": False, "training_failed": False, "budget_spent": False,
            "can_average": True, "grouped": True}
    assert state_word(**calm) == "idle"
    assert state_word(**{**calm, "grouped": False}) == "waiting for peers"
    assert state_word(**{**calm, "connected": False}) == "offline"
    assert state_word(**{**calm, "connected": False, "ever_connected": False}) == "connecting"
    assert state_word(**{**calm, "in_session": True, "training": True}) == "sharing"
    assert state_word(**{**calm, "budget_spent": True}) == "budget spent: averaging only"
    assert state_word(**{**calm, "budget_spent": True, "can_average": False}) == "serving only"
    assert state_word(**{**calm, "stopping": True, "in_session": True}) == "stopped"
