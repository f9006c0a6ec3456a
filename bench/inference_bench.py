"""Private predictions over a real Mosquitto on loopback (docs/inference.md).

g serve-only serving peers, a model owner and a client (``peer.inference.local``), each a real
MQTT client with its own identity and certificate, in one event loop. The model: a linear
head on the public ScatterNet features of Fashion-MNIST, trained by the bench without DP
(``peer.inference.features.train_reference_head``; the private arithmetic does not depend on
how the weights were obtained). The client computes the test images' features itself.

Rows:

* ``latency``: one-row queries one after another at (g, t); ``median_ms_per_query`` from
  ``predict`` called to logits rebuilt; ``bytes_per_query``: every MQTT payload the client
  sent and received per query (g sealed feature shares out, 2t - 1 or more answers back);
* ``batch``: one ``predict`` of ``rows`` test rows; ``median_ms_per_query`` is the wall time
  divided by rows, ``rows_per_s`` its inverse;
* every row: ``agreement_pct`` (private class = the float plaintext model's class),
  ``exact_pct`` (private logits bit-equal to the plaintext fixed-point logits),
  ``plain_model_bytes`` (the float32 layer a client would otherwise be handed), ``load_1m``.

    python bench/inference_bench.py [--quick] [--out FILE] [--full]

``--quick`` (< 60 s once the test split's features are in the disk cache): 500 training
images, 1 000 test images, 20 one-row queries at g = 3 and g = 5. Default: 5 000 training
images, the 1 000 batch plus g = 3, 5 latency with 50 queries. ``--full`` adds the agreement
on all 10 000 test images. The test split's features are kept in the disk cache of
peer/training/features.py (computed once per machine: ~1 min of CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crypto.inference import SnapshotCodes, fit_snapshot, fixed_point_logits
from peer.inference.features import client_features, train_reference_head
from peer.inference.local import local_serving
from peer.inference.serving import ServeLimits
from peer.network.transport import BrokerSettings
from peer.training.data import load_fashion_mnist
from peer.training.features import default_cache_dir
from sim.broker import MosquittoBroker


def traffic(client: object) -> int:
    transport = client.transport  # type: ignore[attr-defined]
    return int(transport.bytes_sent + transport.bytes_received)


def scores(logits: np.ndarray, snapshot: SnapshotCodes, features: np.ndarray,
           weights: np.ndarray, bias: np.ndarray) -> dict[str, float]:
    plain = features @ weights.T + bias
    agree = float((logits.argmax(axis=1) == plain.argmax(axis=1)).mean() * 100)
    exact = np.all(logits == fixed_point_logits(snapshot, features), axis=1)
    return {"agreement_pct": round(agree, 3), "exact_pct": round(float(exact.mean() * 100), 3),
            "max_abs_logit_error": float(np.abs(logits - plain).max())}


async def measure(url: str, snapshot: SnapshotCodes, features: np.ndarray, model: tuple,
                  *, g: int, t: int, singles: int, batch: int) -> list[dict[str, object]]:
    weights, bias = model
    rows: list[dict[str, object]] = []
    common = {"g": g, "t": t, "classes": snapshot.params.classes,
              "features": snapshot.params.features,
              "plain_model_bytes": 4 * snapshot.params.weight_elements,
              "load_1m": round(os.getloadavg()[0], 2)}
    limits = ServeLimits(rows_per_minute=10**9)
    async with local_serving(BrokerSettings(url=url), snapshot, servers=g, threshold=t,
                             limits=limits) as serving:
        client = serving.client
        if singles:
            times, got = [], []
            before = traffic(client)
            for i in range(singles):
                start = time.perf_counter()
                got.append(await client.predict(features[i:i + 1], serving.snapshot))
                times.append((time.perf_counter() - start) * 1000)
            used = traffic(client) - before
            rows.append({"row": "latency", **common, "rows": singles,
                         "median_ms_per_query": round(statistics.median(times), 2),
                         "p95_ms_per_query": round(sorted(times)[int(0.95 * (singles - 1))], 2),
                         "bytes_per_query": used // singles,
                         **scores(np.concatenate(got), snapshot, features[:singles], weights,
                                  bias)})
            print(f"  g={g} t={t}: {rows[-1]}", flush=True)
        if batch:
            before = traffic(client)
            start = time.perf_counter()
            logits = await client.predict(features[:batch], serving.snapshot, timeout_s=120)
            wall = time.perf_counter() - start
            rows.append({"row": "batch", **common, "rows": batch,
                         "median_ms_per_query": round(wall * 1000 / batch, 3),
                         "rows_per_s": round(batch / wall, 1),
                         "bytes_per_query": (traffic(client) - before) // batch,
                         **scores(logits, snapshot, features[:batch], weights, bias)})
            print(f"  g={g} t={t}: {rows[-1]}", flush=True)
    return rows


def load(train_images: int, test_images: int) -> tuple[np.ndarray, ...]:
    train, test = load_fashion_mnist(train=True), load_fashion_mnist(train=False)
    started = time.perf_counter()
    train_features = client_features(train.x[:train_images])
    # the whole test split's features are kept on disk like a trainer's (computed once)
    test_features = client_features(test.x, cache_dir=default_cache_dir())[:test_images]
    print(f"features of {train_images} + {test_images} images in "
          f"{time.perf_counter() - started:.1f} s")
    return train_features, train.y[:train_images], test_features


async def run(args: argparse.Namespace) -> list[dict[str, object]]:
    train_n = 500 if args.quick else 5000
    test_n = 10_000 if args.full else 1000
    train_x, train_y, test_x = load(train_n, test_n)
    weights, bias = train_reference_head(train_x, train_y, 10, epochs=60)
    # the bench is one client asking many rows: the per-client quota is lifted for it
    snapshot = fit_snapshot(weights, bias, max_rows_per_client=10**9)
    print(f"snapshot: frac_w={snapshot.params.frac_w} frac_x={snapshot.params.frac_x}, "
          f"max ‖W_c‖ = {np.linalg.norm(weights, axis=1).max():.3f}")
    singles = 20 if args.quick else 50
    rows: list[dict[str, object]] = []
    async with MosquittoBroker() as broker:
        rows += await measure(broker.url, snapshot, test_x, (weights, bias), g=3, t=2,
                              singles=singles, batch=1000)
        rows += await measure(broker.url, snapshot, test_x, (weights, bias), g=5, t=2,
                              singles=singles, batch=0)
        rows += await measure(broker.url, snapshot, test_x, (weights, bias), g=5, t=3,
                              singles=singles, batch=0)
        if args.full:
            rows += await measure(broker.url, snapshot, test_x, (weights, bias), g=3, t=2,
                                  singles=0, batch=len(test_x))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--full", action="store_true", help="agreement on all 10 000 test images")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    rows = asyncio.run(run(args))
    print(f"{'row':8} {'g':>2} {'t':>2} {'rows':>6} {'ms/query':>9} {'B/query':>9} "
          f"{'agree %':>8} {'exact %':>8}")
    for r in rows:
        print(f"{r['row']:8} {r['g']:>2} {r['t']:>2} {r['rows']:>6} "
              f"{r['median_ms_per_query']:>9} {r['bytes_per_query']:>9} "
              f"{r['agreement_pct']:>8} {r['exact_pct']:>8}")
    print(f"plaintext model: {rows[0]['plain_model_bytes']} bytes; "
          f"total {time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
