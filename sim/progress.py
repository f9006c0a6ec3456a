"""Watching a run: the progress bar and the loop that decides when the run is over.

Both engines describe their network with the same snapshot (a dict: ``alive``, ``rounds``,
``sessions``, ``accuracy``, ``epsilon``, ``finished``, ``in_session``); :func:`watch` shows it
and ends the run when every peer is done, the time is up, or a stop was requested.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from peer.waiting import wait_event
from sim.scenario import Scenario
from sim.setup import averaging_rounds

#: After every peer finished its rounds, wait at most this long for sessions in flight.
DRAIN_S = 3.0

Snapshot = dict[str, Any]


class Progress:
    """tqdm bar over local rounds (peers x rounds) with live network figures."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="round", dynamic_ncols=True, file=sys.stderr,
                            desc="murmur-sim")

    def update(self, done: int, *, alive: int, sessions: int, accuracy: float | None,
               epsilon: float | None) -> None:
        if self.bar is None:
            return
        self.bar.n = min(done, self.bar.total)
        self.bar.set_postfix(
            alive=alive,
            sessions=sessions,
            acc="-" if accuracy is None else f"{accuracy:.3f}",
            eps="-" if epsilon is None else f"{epsilon:.2f}",
            refresh=False,
        )
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def peers_finished(s: Scenario, done: list[bool]) -> bool:
    """Whether a run's peers are done (``done``: each peer's plan or budget is spent). With
    group noise and no averaging tail, also when those still training are too few ever to hold
    a release again (fewer than max(3, c + 2, h + c)): they would only wait for the time cap.
    With a tail such peers are stranded and move to it (docs/privacy.md, "The averaging
    tail"), where peers whose own tail is done still answer them, so every peer finishes."""
    left = sum(1 for d in done if not d)
    if s.noise == "group" and not averaging_rounds(s.rounds, s.averaging_fraction):
        floor = max(3, s.max_colluders + 2, s.honest_min + s.max_colluders)
        return left < floor
    return left == 0


def mean(values: list[float]) -> float | None:
    """The mean of ``values``, or None for none (a snapshot figure nobody reported yet)."""
    return float(np.mean(values)) if values else None


async def watch(s: Scenario, started: float, stop_requested: asyncio.Event,
                progress: Progress, snapshot: Callable[[], Snapshot]) -> str:
    """Update the progress bar until rounds are done, time is up, or a stop is requested.

    Returns why the run ended: "rounds", "duration" or "interrupt".
    """
    drain_until: float | None = None
    while True:
        await wait_event(stop_requested, 0.5)
        snap = snapshot()
        progress.update(snap["rounds"], alive=snap["alive"], sessions=snap["sessions"],
                        accuracy=snap["accuracy"], epsilon=snap["epsilon"])
        if stop_requested.is_set():
            return "interrupt"
        now = time.monotonic()
        if now - started >= s.duration_s:
            return "duration"
        if snap["finished"]:
            # Let sessions in flight finish so the last updates are merged.
            drain_until = drain_until or now + DRAIN_S
            if not snap["in_session"] or now >= drain_until:
                return "rounds"
