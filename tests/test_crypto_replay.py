"""Replay windows: duplicates, stale messages, reordering and bounded memory."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.errors import DuplicateMessageError, ReplayError, StaleMessageError
from crypto.replay import ReplayWindow


def test_duplicates_are_rejected_and_not_recorded_twice() -> None:
    window = ReplayWindow(window=8)
    window.check("a", 100)
    with pytest.raises(DuplicateMessageError):
        window.check("a", 100)
    window.check("a", 101)
    with pytest.raises(DuplicateMessageError):
        window.check("a", 100)
    window.check("b", 100)  # senders are independent


def test_reordering_within_the_window_is_accepted() -> None:
    window = ReplayWindow(window=8)
    for seq in (10, 14, 12, 11, 13, 7):
        window.check("a", seq)
    for seq in (10, 14, 12, 11, 13, 7):
        with pytest.raises(DuplicateMessageError):
            window.check("a", seq)


def test_stale_messages_are_rejected() -> None:
    window = ReplayWindow(window=8)
    window.check("a", 100)
    window.check("a", 93)  # highest - 7: still inside
    with pytest.raises(StaleMessageError):
        window.check("a", 92)
    window.check("a", 1000)  # big jump clears the bitmap
    with pytest.raises(StaleMessageError):
        window.check("a", 101)
    window.check("a", 999)


def test_bad_seq_values() -> None:
    window = ReplayWindow()
    for seq in (-1, 2**63, 1.5, True, "3"):
        with pytest.raises(ReplayError):
            window.check("a", seq)  # type: ignore[arg-type]
    assert "a" not in window


def test_least_recently_used_sender_is_evicted() -> None:
    window = ReplayWindow(max_senders=3, window=16)
    for sender in ("a", "b", "c"):
        window.check(sender, 1)
    window.check("a", 2)  # a is now the most recently used
    window.check("d", 1)  # evicts b
    assert len(window) == 3 and "b" not in window and window.evictions == 1
    for sender in ("a", "c", "d"):
        assert sender in window
    with pytest.raises(DuplicateMessageError):
        window.check("a", 2)
    window.check("b", 1)  # b was forgotten (documented limitation): accepted as new
    assert "c" not in window  # and c, now the LRU, went


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        ReplayWindow(max_senders=0)
    with pytest.raises(ValueError):
        ReplayWindow(window=0)


@settings(max_examples=200, deadline=None)
@given(
    seqs=st.lists(st.integers(0, 60), max_size=80),
    window_size=st.integers(1, 20),
)
def test_matches_a_reference_model(seqs: list[int], window_size: int) -> None:
    """Each seq accepted at most once; accepted iff new and above highest - window."""
    window = ReplayWindow(window=window_size)
    accepted: set[int] = set()
    highest: int | None = None
    for seq in seqs:
        if highest is not None and seq <= highest - window_size:
            expected: type[Exception] | None = StaleMessageError
        elif seq in accepted:
            expected = DuplicateMessageError
        else:
            expected = None
        if expected is None:
            window.check("s", seq)
            accepted.add(seq)
            highest = seq if highest is None else max(highest, seq)
        else:
            with pytest.raises(expected):
                window.check("s", seq)
