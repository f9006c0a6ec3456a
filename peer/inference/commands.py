"""The command-line steps of private predictions (docs/inference.md, "Running it"):
``murmur-peer serve``, ``murmur-peer publish-snapshot`` and ``python -m peer.query``.

Each reads an ordinary peer config (``peer.config.load_config``): its identity, certificate,
network, admission key and ``[broker]``; a client's config is a peer config whose certificate
has the role ``client`` (``murmur-peer provision --clients``). Errors a user can fix are
``PeerError``/``ConfigError`` with one line; ``peer.cli`` prints them.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path
from typing import TextIO

import numpy as np

from peer.config import PeerConfig
from peer.errors import PeerError
from peer.inference.endpoint import InferenceEndpoint
from peer.inference.serving import ServeLimits


def endpoint_of(cfg: PeerConfig) -> InferenceEndpoint:
    """The party's endpoint from its config; the certificate is checked first (ConfigError)."""
    from peer.assembly import load_credentials

    identity, certificate = load_credentials(cfg)
    return InferenceEndpoint(identity, certificate.to_bytes(), cfg.network_id,
                             cfg.admission_public_key, clock_skew_s=cfg.clock_skew_s)


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    await stop.wait()


def serve(cfg: PeerConfig, *, owner: str, limits: ServeLimits, standalone: bool,
          out: TextIO = sys.stdout) -> int:
    """Run a serving peer until SIGINT/SIGTERM; prints what it served and dropped."""
    from peer.inference.server import ServingPeer

    async def main() -> None:
        peer = ServingPeer(endpoint_of(cfg), cfg.broker, owner=owner, limits=limits,
                           announce_presence=standalone)
        await peer.start()
        print(f"{cfg.peer_id}: serving snapshots of {owner!r} (Ctrl-C stops)", file=out)
        try:
            await _until_signalled()
        finally:
            await peer.stop()
        print(f"{cfg.peer_id}: {peer.queries_answered} queries answered, "
              f"{peer.state.rows_served} rows; drops {peer.drops}", file=out)

    asyncio.run(main())
    return 0


def owner_model(cfg: PeerConfig, out: TextIO) -> object:
    """The owner's model as its latest checkpoint holds it (the initial weights, with a
    warning, when it has none), built without featurising its data."""
    from peer.assembly import load_local_data
    from peer.training.checkpoint import CheckpointError, load_checkpoint
    from peer.training.models import build_model, seeded_init
    from peer.training.trainer import CHECKPOINT_FILE

    train, _ = load_local_data(cfg)
    model = build_model(cfg.training.model, train.input_shape, train.num_classes)
    seeded_init(model, cfg.training.seed)
    path = cfg.state_dir / CHECKPOINT_FILE
    if not path.exists():
        print(f"warning: no checkpoint at {path}: sharing the untrained initial weights",
              file=out)
        return model
    try:
        model.load_state_dict(load_checkpoint(path).model_state)
    except (CheckpointError, RuntimeError) as exc:
        raise PeerError(f"{path}: not a checkpoint of this model ({exc})") from None
    return model


def publish_snapshot(cfg: PeerConfig, *, servers: list[str], threshold: int,
                     max_rows_per_client: int, out: TextIO = sys.stdout) -> int:
    """Share the owner's current model (its checkpoint) to ``servers``; prints the id."""
    from crypto.inference import fit_snapshot
    from peer.inference.owner import SnapshotPublisher, check_servable, linear_layer

    check_servable(cfg.training.model)  # before loading data and model
    if len(servers) < 2 * threshold - 1:
        raise PeerError(f"{len(servers)} serving peers cannot answer at threshold {threshold}: "
                        f"need 2t - 1 = {2 * threshold - 1}")
    weights, bias = linear_layer(owner_model(cfg, out), cfg.training.model)
    snapshot = fit_snapshot(weights, bias, max_rows_per_client=max_rows_per_client)

    async def main() -> bytes:
        publisher = SnapshotPublisher(endpoint_of(cfg), cfg.broker, servers)
        await publisher.start()
        try:
            return await publisher.publish(snapshot, threshold=threshold)
        finally:
            await publisher.stop()

    snapshot_id = asyncio.run(main())
    print(f"snapshot {snapshot_id.hex()} of owner {cfg.peer_id} "
          f"(content {snapshot.content_hash.hex()[:16]}, "
          f"frac_w={snapshot.params.frac_w}, frac_x={snapshot.params.frac_x}) shared to "
          f"{', '.join(servers)} at threshold {threshold}", file=out)
    return 0


def load_images(path: Path) -> np.ndarray:
    """The ``x`` array (N x H x W images) of an .npz file; PeerError otherwise."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data:
                raise PeerError(f"{path}: no array named 'x'")
            x = np.asarray(data["x"], dtype=np.float32)
    except (OSError, ValueError) as exc:
        raise PeerError(f"{path}: not a readable .npz file ({exc})") from None
    if x.ndim not in (3, 4) or len(x) == 0:
        raise PeerError(f"{path}: 'x' must be N images (N x H x W), got shape {x.shape}")
    return x


def query(cfg: PeerConfig, images: Path, *, snapshot_hex: str | None, timeout_s: float,
          owner: str | None = None, out: TextIO = sys.stdout) -> int:
    """Private predictions of the images in ``images``: one line per image. ``owner``: the
    model owner whose signed snapshot descriptions to trust (or pin ``snapshot_hex``)."""
    from peer.inference.client import QueryClient
    from peer.inference.features import client_features

    features = client_features(load_images(images))
    wanted = bytes.fromhex(snapshot_hex) if snapshot_hex else None

    async def main() -> np.ndarray:
        client = QueryClient(endpoint_of(cfg), cfg.broker, owner=owner)
        await client.start()
        try:
            snapshot = await client.wait_for_snapshot(timeout_s, wanted)
            print(f"snapshot {snapshot.snapshot_id.hex()} of owner {snapshot.owner} served by "
                  f"{', '.join(snapshot.model.servers)} (t = {snapshot.model.threshold})",
                  file=out)
            return await client.predict(features, snapshot, timeout_s=timeout_s)
        finally:
            await client.stop()

    logits = asyncio.run(main())
    for index, row in enumerate(logits):
        values = " ".join(f"{v:.4f}" for v in row)
        print(f"{index} class {int(row.argmax())} logits {values}", file=out)
    return 0
