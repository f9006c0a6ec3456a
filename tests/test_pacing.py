"""peer/network/pacing.py: when a peer trains, privately or for free."""

from __future__ import annotations

import dataclasses

import pytest

from peer.network.pacing import (
    PacingConfig,
    PacingState,
    RoundKind,
    next_round,
    private_round_interval,
    stranded,
)

GROUPED = PacingState(now=100.0, connected=True, eligible_peers=2, update_pending=False,
                      budget_spent=False, can_average=True, next_private_at=0.0,
                      next_averaging_at=0.0)


def decide(**changes: object) -> RoundKind:
    return next_round(dataclasses.replace(GROUPED, **changes), PacingConfig()).kind


def test_no_private_step_while_offline_or_alone() -> None:
    assert decide() is RoundKind.PRIVATE
    assert decide(connected=False) is RoundKind.WAIT_FOR_PEERS
    assert decide(eligible_peers=1) is RoundKind.WAIT_FOR_PEERS
    lonely = next_round(dataclasses.replace(GROUPED, eligible_peers=0),
                        PacingConfig(train_only_when_grouped=False))
    assert lonely.kind is RoundKind.PRIVATE  # the opt-out trains anyway


def test_paced_private_rounds_leave_room_for_free_averaging() -> None:
    later = {"next_private_at": 160.0}
    assert decide(**later) is RoundKind.AVERAGING
    # the previous update is not shared yet: nothing new to offer, wait
    waiting = next_round(dataclasses.replace(GROUPED, update_pending=True, **later),
                         PacingConfig())
    assert waiting.kind is RoundKind.WAIT and 0 < waiting.wait_s <= 5.0
    assert decide(next_averaging_at=130.0, **later) is RoundKind.WAIT
    # a strategy that cannot average waits for its next private round
    assert decide(can_average=False, **later) is RoundKind.WAIT


def test_spent_budget_averages_and_retries_private_only_when_due() -> None:
    spent = {"budget_spent": True, "next_private_at": 150.0}
    assert decide(**spent) is RoundKind.AVERAGING
    assert decide(budget_spent=True, next_private_at=90.0) is RoundKind.PRIVATE  # new data?


def test_private_round_interval_spreads_the_plan() -> None:
    assert private_round_interval(None, 100) == 0.0
    assert private_round_interval(24.0, 100) == pytest.approx(864.0)
    assert private_round_interval(0.25, 90) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        private_round_interval(0.0, 100)
    with pytest.raises(ValueError):
        private_round_interval(1.0, 0)
    with pytest.raises(ValueError):
        PacingConfig(private_round_interval_s=-1.0)


def test_a_group_noise_peer_is_stranded_only_with_too_few_private_and_enough_tail_peers() -> None:
    # min_sum 4: a private release needs 3 other private-step peers
    def is_stranded(private: int, tail: int) -> bool:
        return stranded(dataclasses.replace(GROUPED, eligible_peers=private, tail_peers=tail), 4)

    assert is_stranded(2, 3)
    assert is_stranded(0, 7)
    assert is_stranded(2, 1)  # the two others are stranded alike: the four average together
    assert not is_stranded(3, 5)  # a private release can still form
    assert not is_stranded(1, 1)  # too few to average either: keep the share
    assert not is_stranded(2, 0)  # nobody in the tail: a network still starting
    assert not is_stranded(0, 0)  # nobody seen yet (a peer just started)
    with pytest.raises(ValueError, match="stranded_tail_s"):
        PacingConfig(stranded_tail_s=-1.0)
