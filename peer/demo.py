"""The demo of ``murmur-peer provision --demo``: a label-skewed shard of digits per peer.

Every demo peer trains on its own non-IID shard of the digits training split and is measured
on the digits test split that all of them share, so the README's three peers can show what
gossip adds over each peer alone. Data placement for a demo, not cryptography: the generator
is seeded, so the same peers always get the same shards.
"""

from __future__ import annotations

from typing import Any

from peer.errors import PeerError


class DemoDataError(PeerError):
    """The demo data cannot be split as asked."""


#: The demo's data: each peer gets a label-skewed shard of this source's training split.
DEMO_SOURCE = "digits"
DEMO_ALPHA = 0.5  # Dirichlet concentration over labels: smaller, more skewed
DEMO_SEED = 0  # fixed: the same peers always get the same shards
# At least this many records per shard. The loader keeps 80 % of an .npz for training
# (peer.training.data.TABLE_TEST_FRACTION), so 60 leave 48 to train on.
DEMO_MIN_RECORDS = 60
DEMO_BUDGET_HOURS = 0.25  # [pace] budget_hours of a demo config: 15 minutes of private training
_DEMO_ATTEMPTS = 200


def demo_shards(labels: Any, n_peers: int, *, alpha: float = DEMO_ALPHA, seed: int = DEMO_SEED,
                min_records: int = DEMO_MIN_RECORDS) -> list[Any]:
    """Disjoint, label-skewed index sets, one per peer: each class's records are dealt out in
    Dirichlet(``alpha``) proportions, redrawn until every peer has ``min_records``.

    Data placement for a demo, not cryptography: the generator is seeded (``seed``).
    """
    import numpy as np

    labels = np.asarray(labels)
    if n_peers * min_records > len(labels):
        raise DemoDataError(f"the demo data has {len(labels)} training records: too few for "
                             f"{n_peers} peers of at least {min_records} each")
    rng = np.random.default_rng(seed)
    for _ in range(_DEMO_ATTEMPTS):
        parts: list[list[Any]] = [[] for _ in range(n_peers)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            cuts = np.round(np.cumsum(rng.dirichlet(np.full(n_peers, alpha)))[:-1]
                            * len(members)).astype(np.int64)
            for peer, piece in enumerate(np.split(members, cuts)):
                parts[peer].append(piece)
        shards = [np.sort(np.concatenate(pieces)) for pieces in parts]
        if min(len(shard) for shard in shards) >= min_records:
            return shards
    raise DemoDataError(f"no Dirichlet({alpha}) split gave {n_peers} peers {min_records} "
                         "records each; use fewer peers")


def demo_shard_bytes(n_peers: int) -> list[bytes]:
    """One .npz per peer: its records of the demo source's training split as a prepared split
    (``num_classes`` given: class indices kept, features as the source scaled them)."""
    import io

    import numpy as np

    from peer.training.data import load_source

    train, _test = load_source(DEMO_SOURCE)
    encoded = []
    for shard in demo_shards(train.y, n_peers):
        buffer = io.BytesIO()
        np.savez(buffer, x=train.x[shard], y=train.y[shard],
                 num_classes=np.int64(train.num_classes))
        encoded.append(buffer.getvalue())
    return encoded
