"""The benchmark rows for issue 13: the masked member's crypto rows and the session byte ratio.

The benches are scripts, not a package, so they are loaded from their files. The crypto rows run
on a small vector (fast); the byte ratio is a pure function of the index sets.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def crypto_bench() -> ModuleType:
    return _load("crypto_bench")


@pytest.fixture(scope="module")
def session_bench() -> ModuleType:
    return _load("session_bench")


@pytest.mark.parametrize("g", [3, 5])
def test_masked_rows_label_each_op_and_split_off_the_pair_expansion(crypto_bench, g):
    vector = (np.random.default_rng(1).standard_normal(2_000) * 0.05).astype(np.float32)
    rows = crypto_bench.bench_masked_group(g, vector.size, 1, vector)
    assert [r["op"] for r in rows] == ["mask+seal", "pair_expand", "unmask"]
    assert all(r["g"] == g and r["n"] == vector.size for r in rows)
    mask, expand = rows[0], rows[1]
    assert mask["ms_excl_pair_expand"] == pytest.approx(mask["ms"] - expand["ms"], abs=0.011)
    assert expand["ms_per_pair"] == pytest.approx(expand["ms"] / (g - 1), abs=0.011)
    assert mask["mb_per_s"] == pytest.approx(4 * vector.size / (mask["ms"] / 1e3) / 1e6, rel=0.05)


def test_masked_rows_fail_when_the_masks_do_not_cancel(crypto_bench, monkeypatch):
    real_unmask = crypto_bench.masking.unmask_sum

    def off_by_one(masked_sum, **kwargs):
        out = real_unmask(masked_sum, **kwargs).copy()
        out[0] = (int(out[0]) + 1) % crypto_bench.PRIME
        return out

    monkeypatch.setattr(crypto_bench.masking, "unmask_sum", off_by_one)
    vector = np.zeros(100, dtype=np.float32)
    with pytest.raises(AssertionError, match="masks did not cancel at g = 3"):
        crypto_bench.bench_masked_group(3, vector.size, 1, vector)


def test_own_vector_is_four_bytes_per_union_coordinate(session_bench):
    sets = [np.array([1, 2, 3], np.uint32), np.array([3, 4], np.uint32),
            np.array([9], np.uint32)]
    assert session_bench.own_vector_bytes(sets) == 4 * 5  # union {1, 2, 3, 4, 9}
    assert session_bench.bytes_vs_own_vector(40.0, sets) == pytest.approx(2.0)


def test_ratio_of_an_empty_union_is_an_error(session_bench):
    assert session_bench.own_vector_bytes([]) == 0
    with pytest.raises(ValueError, match="empty"):
        session_bench.bytes_vs_own_vector(10.0, [np.zeros(0, np.uint32)])
