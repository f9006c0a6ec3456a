"""Throughput of Murmur's secure-aggregation crypto (Shamir and masked), in MB/s of float32 input.

For a vector of ``n`` float32 values (4n bytes of "input") and a group of ``g`` members with
threshold ``t = g // 2 + 1``, it times the work ONE member does:

share_seal   fixed-point encode its vector, Shamir-split it into g shares, and seal the g - 1
             shares that go to the other members (Box, context-bound). Its own share is kept.
open_add     receive g - 1 sealed shares (one per other member), open each, parse the field
             bytes (with the canonical-element check) and add them into its partial sum, which
             starts from its own share.
reconstruct  from t partial sums (field vectors), Lagrange-rebuild the group sum at 0 and
             fixed-point decode it to float64.

The masked session (crypto/masking.py, peer/network/session/masked.py) at the same g,
with the 4n-byte vector taken as the member's vector over the session's union coordinates:

mask+seal    fixed-point encode the vector plus the count slot (as float64, as the session
             does), mask it with crypto.masking.mask_vector (self mask, and g - 1 pair masks from
             X25519 of the ephemeral keys, each expanded and added or subtracted), and seal the
             result once under the session key (SecretBox, masked_messages.session_seal). The
             member sits at position g // 2 (half its pair masks added, half subtracted). Not
             included: the KEYS messages (two 32-byte secrets Shamir-shared, g - 1 small Boxes).
             Extra field ``ms_excl_pair_expand``: its ms minus the pair_expand row's ms.
pair_expand  only the pairwise stream expansion inside mask+seal: g - 1 pair seeds (X25519 +
             BLAKE2b) each expanded to n + 1 field elements (expand_field). Extra field
             ``ms_per_pair``. If mask+seal grows with g only through the expansion,
             ``ms_excl_pair_expand`` stays flat across g.
unmask       the receiving side once every masked vector is in: open the g - 1 session-sealed
             vectors (with the context check) and parse them, sum the g vectors mod p (the
             session's loop), remove the g self masks (crypto.masking.unmask_sum, no dropouts),
             and fixed-point decode. Checked once before timing: the result is g times the
             input, so the masks cancel.

Reference rows measured in the same run (the machine may be shared, so compare against these):
box_ref       one Box seal of 4n bytes (libsodium crypto_box_easy_afternm) -> MB/s of plaintext
keystream_ref ChaCha20 keystream (randombytes_buf_deterministic, 32 KiB calls) -> MB/s

Each figure is the best of ``--reps`` repetitions, by wall clock (``mb_per_s``) and by this
process's CPU time (``mb_per_s_cpu``, less sensitive to other processes on a busy machine).
Every row carries ``load_1m``, the 1-minute load average when its group started.

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

from crypto import masking
from crypto.field import (
    PRIME,
    FixedPoint,
    field_from_bytes,
    field_to_bytes,
    field_view,
    mod_add_into,
)
from crypto.identity import Identity
from crypto.sealing import SealContext, open_sealed, seal
from crypto.shamir import Share, reconstruct, split
from peer.network.session import masked_messages as mm
from protocol import messages as m

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


def bench_masked_group(g: int, n: int, reps: int, vector: np.ndarray) -> list[dict]:
    """The masked session's member work at group size ``g`` (see the module docstring).

    Every member masks the same ``vector`` (the cost does not depend on the values); before
    timing, the rebuilt sum is checked against ``g * vector``, so a bench that measured masks
    which do not cancel would fail instead of printing a figure.
    """
    t = g // 2 + 1
    code = FixedPoint(frac_bits=16, max_summands=16)
    ids = tuple(f"m{i}" for i in range(g))
    keys = {member: masking.EphemeralKey.generate() for member in ids}
    publics = {member: key.public for member, key in keys.items()}
    self_seeds = {member: masking.new_self_seed() for member in ids}
    session_id, session_key = os.urandom(16), os.urandom(mm.SESSION_KEY_BYTES)
    me = ids[g // 2]  # half its pair masks are added, half subtracted
    count = n + 1  # the count slot the session appends

    def seal_context(sender: str) -> mm.SessionSealContext:
        return mm.SessionSealContext("bench", session_id, sender, m.Kind.MASKED, 7)

    def masked_of(member: str, encoded: np.ndarray) -> np.ndarray:
        return masking.mask_vector(encoded, me=member, members=ids, key=keys[member],
                                   publics=publics, self_seed=self_seeds[member],
                                   session_id=session_id)

    def mask_seal() -> bytes:
        # as MaskedSession._begin_keys + _maybe_publish_masked: float64 union vector + count
        encoded = code.encode(np.concatenate([vector, np.ones(1)]))
        return mm.session_seal(session_key, seal_context(me),
                               field_to_bytes(masked_of(me, encoded)))

    def pair_expand() -> None:
        for other in ids:
            if other != me:
                seed = masking.pair_seed(keys[me], me, publics[other], other, session_id)
                masking.expand_field(seed, count)

    encoded = code.encode(np.concatenate([vector, np.ones(1)]))
    own_masked = masked_of(me, encoded)
    incoming = [(other, mm.session_seal(session_key, seal_context(other),
                                        field_to_bytes(masked_of(other, encoded))))
                for other in ids if other != me]

    def unmask() -> np.ndarray:
        # as MaskedSession._on_masked (open, parse) and _maybe_finish (sum, unmask, decode)
        masked = {me: own_masked}
        for sender, sealed in incoming:
            masked[sender] = field_from_bytes(mm.session_open(session_key, seal_context(sender),
                                                              sealed))
        total = np.zeros(count, dtype=np.uint64)
        for member in ids:
            total = (total + masked[member]) % PRIME
        field_sum = masking.unmask_sum(total.astype(np.uint32), members=ids, survivors=ids,
                                       publics=publics, self_seeds=self_seeds,
                                       dropped_keys={}, session_id=session_id)
        return code.decode(field_sum)

    rebuilt = unmask()
    expected = g * code.decode(encoded)
    if not np.array_equal(rebuilt, expected):
        raise AssertionError(f"masks did not cancel at g = {g}")

    input_bytes = 4 * n
    mask_row = row("mask+seal", g, t, n, input_bytes, best_of(reps, mask_seal))
    expand_row = row("pair_expand", g, t, n, input_bytes, best_of(reps, pair_expand))
    expand_row["ms_per_pair"] = round(expand_row["ms"] / (g - 1), 2)
    mask_row["ms_excl_pair_expand"] = round(mask_row["ms"] - expand_row["ms"], 2)
    return [mask_row, expand_row, row("unmask", g, t, n, input_bytes, best_of(reps, unmask))]


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


def load_1m() -> float:
    """The 1-minute load average when a group of rows starts (the 2-core VM is shared)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


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

    runs: list[Callable[[], list[dict]]] = [lambda: bench_references(args.n, reps)]
    runs += [lambda g=g: bench_group(g, args.n, reps, vector) for g in GROUP_SIZES]
    runs += [lambda g=g: bench_masked_group(g, args.n, reps, vector) for g in GROUP_SIZES]
    rows = []
    for run in runs:
        load = load_1m()
        for r in run():
            r["load_1m"] = load
            rows.append(r)

    for r in rows:
        r["malloc"] = malloc
    print(f"malloc: {malloc}")
    print(f"{'op':<14}{'g':>3}{'t':>3}{'n':>10}{'ms':>9}{'MB/s':>9}{'MB/s cpu':>10}  extra")
    for r in rows:
        extra = "  ".join(f"{k} {r[k]}" for k in ("ms_excl_pair_expand", "ms_per_pair") if k in r)
        print(f"{r['op']:<14}{r['g']:>3}{r['t']:>3}{r['n']:>10}{r['ms']:>9.1f}"
              f"{r['mb_per_s']:>9.1f}{r['mb_per_s_cpu']:>10.1f}  {extra}")
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
