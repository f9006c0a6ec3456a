"""Throughput of Murmur's secret-sharing pipeline, in MB/s of float32 input.

For a vector of ``n`` float32 values (4n bytes of "input") and a group of ``g`` members with
threshold ``t = g // 2 + 1``, it times the work ONE member does:

share_seal   fixed-point encode its vector, Shamir-split it into g shares, and seal the g - 1
             shares that go to the other members (Box, context-bound). Its own share is kept.
open_add     receive g - 1 sealed shares (one per other member), open each, parse the field
             bytes (with the canonical-element check) and add them into its partial sum, which
             starts from its own share.
reconstruct  from t partial sums (field vectors), Lagrange-rebuild the group sum at 0 and
             fixed-point decode it to float64.

Reference rows measured in the same run (the machine may be shared, so compare against these):
box_ref       one Box seal of 4n bytes (libsodium crypto_box_easy_afternm) -> MB/s of plaintext
keystream_ref ChaCha20 keystream (randombytes_buf_deterministic, 32 KiB calls) -> MB/s

Each figure is the best of ``--reps`` repetitions, by wall clock (``mb_per_s``) and by this
process's CPU time (``mb_per_s_cpu``, less sensitive to other processes on a busy machine).

``--tune-malloc`` raises glibc's mmap and trim thresholds (mallopt) first. Why: every sealed
share is a fresh multi-megabyte ``bytes`` object; by default glibc maps each one fresh from the
kernel and unmaps it when freed, and on this VM the page faults of those mappings cost about as
much as the encryption. Rows then carry ``malloc: "tuned"`` instead of ``"default"``.

Usage: python bench/crypto_bench.py [--quick] [--n N] [--reps R] [--tune-malloc] [--out FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nacl.bindings
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crypto.field import FixedPoint, field_from_bytes, field_view, mod_add_into
from crypto.identity import Identity
from crypto.sealing import SealContext, open_sealed, seal
from crypto.shamir import Share, reconstruct, split

GROUP_SIZES = (3, 5, 8)


def best_of(reps: int, run: Callable[[], object]) -> tuple[float, float]:
    """Best wall-clock and best CPU seconds over ``reps`` runs."""
    best_wall = best_cpu = float("inf")
    for _ in range(reps):
        wall, cpu = time.perf_counter(), time.process_time()
        result = run()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
        del result
    return best_wall, best_cpu


def row(op: str, g: int, t: int, n: int, input_bytes: int, timing: tuple[float, float]) -> dict:
    wall, cpu = timing
    return {
        "op": op,
        "g": g,
        "t": t,
        "n": n,
        "ms": round(wall * 1e3, 2),
        "mb_per_s": round(input_bytes / wall / 1e6, 1),
        "mb_per_s_cpu": round(input_bytes / max(cpu, 1e-9) / 1e6, 1),
    }


def bench_group(g: int, n: int, reps: int, vector: np.ndarray) -> list[dict]:
    t = g // 2 + 1
    code = FixedPoint(frac_bits=16, max_summands=16)
    members = [Identity.generate(f"m{i}") for i in range(g)]
    box_keys = [m.public.box_key for m in members]
    session = os.urandom(16)
    me = members[0]

    def context(sender: int, recipient: int) -> SealContext:
        return SealContext("bench", session, f"m{sender}", f"m{recipient}", 1000 + recipient)

    def share_seal() -> tuple[Share, list[bytes]]:
        shares = split(code.encode(vector), n=g, t=t)
        sealed = [
            seal(me, box_keys[i], context(0, i), field_view(shares[i].values))
            for i in range(1, g)
        ]
        return shares[0], sealed

    # What member 0 receives: one sealed share from each other member.
    incoming = []
    for sender in range(1, g):
        shares = split(code.encode(vector), n=g, t=t)
        incoming.append(
            seal(members[sender], box_keys[0], context(sender, 0), field_view(shares[0].values))
        )
    own_share = split(code.encode(vector), n=g, t=t)[0]

    def open_add() -> np.ndarray:
        partial = own_share.values.copy()
        for sender, sealed in enumerate(incoming, start=1):
            plaintext = open_sealed(me, box_keys[sender], context(sender, 0), sealed)
            mod_add_into(partial, field_from_bytes(plaintext))
        return partial

    partials = split(code.encode(vector), n=g, t=t)[:t]

    def rebuild() -> np.ndarray:
        return code.decode(reconstruct(partials, t=t))

    input_bytes = 4 * n
    return [
        row("share_seal", g, t, n, input_bytes, best_of(reps, share_seal)),
        row("open_add", g, t, n, input_bytes, best_of(reps, open_add)),
        row("reconstruct", g, t, n, input_bytes, best_of(reps, rebuild)),
    ]


def bench_references(n: int, reps: int) -> list[dict]:
    key, nonce = os.urandom(32), os.urandom(24)
    plaintext = os.urandom(4 * n)

    def box() -> bytes:
        return nacl.bindings.crypto_box_easy_afternm(plaintext, nonce, key)

    def keystream() -> list[bytes]:
        piece = 32 * 1024
        return [
            nacl.bindings.randombytes_buf_deterministic(piece, os.urandom(32))
            for _ in range(4 * n // piece)
        ]

    return [
        row("box_ref", 0, 0, n, 4 * n, best_of(reps, box)),
        row("keystream_ref", 0, 0, n, 4 * n // (32 * 1024) * 32 * 1024, best_of(reps, keystream)),
    ]


def tune_malloc() -> bool:
    """Keep freed large blocks in the heap instead of returning them to the kernel (glibc)."""
    m_trim_threshold, m_mmap_threshold = -1, -3
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(m_mmap_threshold, 256 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        return False
    return bool(ok)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (< 60 s)")
    parser.add_argument("--n", type=int, default=1_000_000, help="vector length (float32)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per figure")
    parser.add_argument("--out", type=Path, default=None, help="write rows as JSON here")
    parser.add_argument("--tune-malloc", action="store_true", help="glibc mallopt, see doc")
    args = parser.parse_args(argv)
    malloc = "default"
    if args.tune_malloc:
        if not tune_malloc():
            print("mallopt unavailable (not glibc?): running with the default allocator")
        else:
            malloc = "tuned"
    reps = args.reps or (3 if args.quick else 9)
    # The values a DP update has: small, and well inside the fixed-point range.
    vector = (np.random.default_rng(0).standard_normal(args.n) * 0.05).astype(np.float32)

    rows = bench_references(args.n, reps)
    for g in GROUP_SIZES:
        rows.extend(bench_group(g, args.n, reps, vector))

    for r in rows:
        r["malloc"] = malloc
    print(f"malloc: {malloc}")
    print(f"{'op':<14}{'g':>3}{'t':>3}{'n':>10}{'ms':>9}{'MB/s':>9}{'MB/s cpu':>10}")
    for r in rows:
        print(f"{r['op']:<14}{r['g']:>3}{r['t']:>3}{r['n']:>10}{r['ms']:>9.1f}"
              f"{r['mb_per_s']:>9.1f}{r['mb_per_s_cpu']:>10.1f}")
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
