"""bench/mixing_bench.py: the group-draw model runs the node's own view planning."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "mixing_bench.py"
spec = importlib.util.spec_from_file_location("mixing_bench", BENCH)
assert spec is not None and spec.loader is not None
mixing = importlib.util.module_from_spec(spec)
sys.modules["mixing_bench"] = mixing  # dataclasses look their module up there
spec.loader.exec_module(mixing)


def test_full_and_bounded_views_both_spread_an_update_to_everyone() -> None:
    full = mixing.run_row(256, 0, 3, 4, 40, 5, seed=2)
    bounded = mixing.run_row(256, 32, 3, 4, 40, 5, seed=2)
    assert full["mean_view_entries"] == 255 and full["full_view_peers"] == 256
    assert bounded["full_view_peers"] == 0 and 32 <= bounded["mean_view_entries"] < 64
    for row in (full, bounded):
        assert row["sources_not_everywhere"] == 0
        assert row["steps_to_half_mean"] <= row["steps_to_all_mean"] <= row["steps_to_all_max"]
    assert bounded["steps_to_all_mean"] < 2 * full["steps_to_all_mean"]


def test_groups_are_disjoint_and_drawn_from_the_view() -> None:
    import random

    everyone = [f"p{i}" for i in range(30)]
    views = {p: [q for q in everyone[:10] if q != p] for p in everyone}
    groups = mixing.form_groups(views, everyone, 3, random.Random(0))
    seen = [p for g in groups for p in g]
    assert len(seen) == len(set(seen))  # a peer is in at most one group per step
    assert all(set(g[1:]) <= set(views[g[0]]) for g in groups)
    assert all(len(g) == 3 for g in groups) and groups
