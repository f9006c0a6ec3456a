"""crypto/masking.py: pairwise and self masks cancel, dropouts are recovered, seeds stay bound."""

from __future__ import annotations

import numpy as np
import pytest

from crypto.field import PRIME
from crypto.masking import (
    EphemeralKey,
    MaskError,
    decode_secret,
    expand_field,
    mask_vector,
    new_self_seed,
    pair_seed,
    recover_secret,
    self_seed_key,
    share_secret,
    unmask_sum,
)
from crypto.shamir import Share, random_field

SESSION = bytes(range(16))
MEMBERS = ("alice", "bob", "carol", "dave", "erin")


def field_sum(vectors: list[np.ndarray]) -> np.ndarray:
    return (np.sum([v.astype(np.uint64) for v in vectors], axis=0) % PRIME).astype(np.uint32)


@pytest.fixture
def group() -> dict[str, object]:
    keys = {m: EphemeralKey.generate() for m in MEMBERS}
    return {
        "keys": keys,
        "publics": {m: k.public for m, k in keys.items()},
        "seeds": {m: new_self_seed() for m in MEMBERS},
        "inputs": {m: random_field((257,)) for m in MEMBERS},
    }


def masked(group: dict, member: str) -> np.ndarray:
    return mask_vector(group["inputs"][member], me=member, members=MEMBERS,
                       key=group["keys"][member], publics=group["publics"],
                       self_seed=group["seeds"][member], session_id=SESSION)


def test_masks_cancel_in_the_sum_of_the_whole_group(group: dict) -> None:
    vectors = {m: masked(group, m) for m in MEMBERS}
    for m in MEMBERS:  # nobody's vector leaves in the clear
        assert not np.array_equal(vectors[m], group["inputs"][m])
    total = unmask_sum(field_sum(list(vectors.values())), members=MEMBERS, survivors=MEMBERS,
                       publics=group["publics"], self_seeds=group["seeds"], dropped_keys={},
                       session_id=SESSION)
    np.testing.assert_array_equal(total, field_sum(list(group["inputs"].values())))


def test_dropped_members_masks_are_removed_with_their_recovered_keys(group: dict) -> None:
    survivors = ("alice", "carol", "erin")
    dropped = ("bob", "dave")  # their masked vectors never arrive
    # Each dropped member had shared its ephemeral key, 3 of 5; three survivors reveal theirs.
    recovered = {}
    for gone in dropped:
        shares = share_secret(group["keys"][gone].private, n=5, t=3)
        held = [shares[MEMBERS.index(s)] for s in survivors]
        recovered[gone] = EphemeralKey(recover_secret(held, t=3))
    total = unmask_sum(field_sum([masked(group, m) for m in survivors]), members=MEMBERS,
                       survivors=survivors, publics=group["publics"],
                       self_seeds={m: group["seeds"][m] for m in survivors},
                       dropped_keys=recovered, session_id=SESSION)
    np.testing.assert_array_equal(total, field_sum([group["inputs"][m] for m in survivors]))


def test_unmasking_refuses_sets_that_do_not_match(group: dict) -> None:
    summed = field_sum([masked(group, m) for m in MEMBERS])
    common = {"members": MEMBERS, "publics": group["publics"], "session_id": SESSION}
    with pytest.raises(MaskError):  # a survivor's self seed missing
        unmask_sum(summed, survivors=MEMBERS, dropped_keys={},
                   self_seeds={m: group["seeds"][m] for m in MEMBERS[:4]}, **common)
    with pytest.raises(MaskError):  # a dropped member's key missing
        unmask_sum(summed, survivors=MEMBERS[:4], dropped_keys={},
                   self_seeds={m: group["seeds"][m] for m in MEMBERS[:4]}, **common)
    with pytest.raises(MaskError):  # a stranger among the survivors
        unmask_sum(summed, survivors=("alice", "mallory"), dropped_keys={},
                   self_seeds={"alice": b"\0" * 32, "mallory": b"\0" * 32}, **common)


def test_pair_seeds_are_symmetric_and_bound_to_session_and_pair() -> None:
    a, b, c = EphemeralKey.generate(), EphemeralKey.generate(), EphemeralKey.generate()
    ab = pair_seed(a, "alice", b.public, "bob", SESSION)
    assert ab == pair_seed(b, "bob", a.public, "alice", SESSION)
    assert ab != pair_seed(a, "alice", b.public, "bob", bytes(16))
    assert ab != pair_seed(a, "alice", c.public, "carol", SESSION)
    # the same keys under other member names give other masks (ids are part of the seed)
    assert ab != pair_seed(a, "alice2", b.public, "bob", SESSION)
    with pytest.raises(MaskError):
        pair_seed(a, "alice", bytes(32), "bob", SESSION)  # a low-order point: no shared key
    with pytest.raises(MaskError):
        pair_seed(a, "alice", b.public[:31], "bob", SESSION)
    with pytest.raises(MaskError):
        pair_seed(a, "alice", b.public, "alice", SESSION)
    assert "private" not in repr(a) and a.private.hex() not in repr(a)


def test_expanded_masks_are_deterministic_canonical_and_look_uniform() -> None:
    seed = bytes(range(32))
    long, short = expand_field(seed, 200_000), expand_field(seed, 1000)
    np.testing.assert_array_equal(long[:1000], short)  # a prefix of the same stream
    assert long.dtype == np.uint32 and int(long.max()) < PRIME
    # mean of uniform [0, p) is p/2 with standard error p/sqrt(12 n) ~ 0.0013 p here
    assert abs(float(long.mean()) / PRIME - 0.5) < 0.01
    assert not np.array_equal(expand_field(bytes(32), 1000), short)
    assert expand_field(seed, 0).size == 0
    with pytest.raises(MaskError):
        expand_field(seed[:31], 10)


def test_secrets_round_trip_through_any_t_shares_and_forged_shares_are_caught() -> None:
    secret = EphemeralKey.generate().private
    shares = share_secret(secret, n=5, t=3)
    for picked in ((0, 1, 2), (4, 2, 0), (1, 3, 4)):
        assert recover_secret([shares[i] for i in picked], t=3) == secret
    forged = Share(x=shares[0].x, values=random_field((16,)))
    with pytest.raises(MaskError):  # 16-bit chunks: a random forgery rebuilds out of range
        recover_secret([forged, shares[1], shares[2]], t=3)
    with pytest.raises(MaskError):
        decode_secret(np.zeros(15, dtype=np.uint32))


def test_worked_example_in_docs_matches() -> None:
    """docs/crypto.md, "Masks (session protocol v2)": fixed keys give these exact values."""
    alice, bob = EphemeralKey(bytes(range(32))), EphemeralKey(bytes(range(32, 64)))
    assert alice.public.hex() == (
        "8f40c5adb68f25624ae5b214ea767a6ec94d829d3d7b5e1ad1ba6f3e2138285f")
    seed = pair_seed(alice, "alice", bob.public, "bob", SESSION)
    assert seed.hex() == "ab810763301cdf05d3dd749ceb68507055807d8654c845cacc00e29d7fcd2463"
    assert expand_field(seed, 4).tolist() == [1552555335, 774193824, 1073726309, 1605354589]
    self_key = self_seed_key(bytes(32), SESSION)
    assert self_key.hex() == (
        "b057b49dffce3f39c5737f73a044a6e42463d65d8ac3c8575996fbf1fa02ad92")
    assert expand_field(self_key, 2).tolist() == [1867816156, 310979912]


def test_combine_matches_modular_arithmetic_term_by_term() -> None:
    """The one-reduction sum equals adding and subtracting each vector mod p in turn,
    including at the edges of the field (0 and p - 1) and with more subtractions than adds."""
    from crypto.field import PRIME
    from crypto.masking import combine

    rng = np.random.default_rng(3)
    edges = np.array([0, 1, PRIME - 1, PRIME - 2], dtype=np.uint32)
    vectors = [np.concatenate([edges, rng.integers(0, PRIME, 60, dtype=np.uint32)])
               for _ in range(9)]
    base, added, subtracted = vectors[0], vectors[1:3], vectors[3:]
    expected = [int(x) for x in base]
    for v in added:
        expected = [(e + int(x)) % PRIME for e, x in zip(expected, v, strict=True)]
    for v in subtracted:
        expected = [(e - int(x)) % PRIME for e, x in zip(expected, v, strict=True)]
    got = combine(base, added, subtracted)
    assert got.dtype == np.uint32
    assert got.tolist() == expected
    assert combine(base).tolist() == base.tolist()
