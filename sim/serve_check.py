"""`murmur-sim --serve-check`: end a run by serving one peer's final model privately and
answering the test set through it, as a correctness check of private predictions
(docs/inference.md).

After the run, the first honest peer's final checkpoint is the owner's model; three serving
peers, the owner and a client (``peer.inference.local``) run on a fresh broker of the run's
kind; the client computes the test images' public features and asks for their logits. The
check reports how many private classes equal the plaintext model's and how many private
logits equal the plaintext fixed-point logits exactly. Only the ``scatter`` model can be
served (``peer.inference.owner.UnsupportedModelError``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sim.scenario import Scenario, resolve_model

#: Test rows answered at most (the client's default per-client quota is lifted for the check).
MAX_CHECK_ROWS = 10_000


@dataclass(frozen=True)
class ServeCheck:
    """What the check found."""

    rows: int
    agreement_pct: float
    exact_pct: float


async def serve_check(scenario: Scenario, run_dir: Path, *, max_rows: int = MAX_CHECK_ROWS,
                      peer_id: str = "p00") -> ServeCheck:
    """Serve ``peer_id``'s final model from ``run_dir`` and answer the test set privately."""
    from crypto.inference import fit_snapshot, fixed_point_logits
    from peer.inference.features import client_features
    from peer.inference.local import local_serving
    from peer.inference.owner import check_servable, linear_layer
    from peer.inference.serving import ServeLimits
    from peer.training.checkpoint import load_checkpoint
    from peer.training.data import load_source
    from peer.training.models import build_model
    from peer.training.trainer import CHECKPOINT_FILE
    from sim.broker_lifecycle import open_broker

    train, test = load_source(scenario.dataset)
    model_name = resolve_model(scenario.model, tuple(train.x.shape[1:]))
    check_servable(model_name)
    model = build_model(model_name, tuple(train.x.shape[1:]), train.num_classes)
    model.load_state_dict(load_checkpoint(run_dir / "peers" / peer_id / CHECKPOINT_FILE)
                          .model_state)
    weights, bias = linear_layer(model, model_name)
    snapshot = fit_snapshot(weights, bias, max_rows_per_client=max_rows)
    features = client_features(test.x[:max_rows])
    limits = ServeLimits(rows_per_minute=10**9)
    async with open_broker(scenario) as broker, local_serving(
            broker, snapshot, limits=limits) as serving:
        logits = await serving.client.predict(features, serving.snapshot, timeout_s=600)
    plain = features @ weights.T + bias
    agree = float((logits.argmax(axis=1) == plain.argmax(axis=1)).mean() * 100)
    exact = float(np.all(logits == fixed_point_logits(snapshot, features), axis=1).mean() * 100)
    return ServeCheck(rows=len(features), agreement_pct=agree, exact_pct=exact)

