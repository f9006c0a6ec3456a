"""`murmur-peer provision --demo`: each peer its own non-IID shard of the digits training split,
measured on the shared digits test split, its budget paced over a quarter of an hour."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from peer.assembly import load_local_data
from peer.config import load_config
from peer.demo import DEMO_BUDGET_HOURS, DEMO_MIN_RECORDS, DEMO_SOURCE, DemoDataError, demo_shards
from peer.provision import ProvisionError, provision
from peer.training.data import DataError, load_source, load_table

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parents[1]
PEERS = ["alice", "bob", "carol", "dave"]


def _label_mix(y: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(y, minlength=num_classes) / len(y)


def _rows(x: np.ndarray, y: np.ndarray) -> list[bytes]:
    """Each record as bytes (features and label), to compare records across files."""
    return sorted(row.tobytes() + bytes([label]) for row, label in zip(x, y, strict=True))


def test_demo_gives_each_peer_its_own_skewed_shard(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = provision("demo", PEERS, out, demo=True)
    train, test = load_source(DEMO_SOURCE)
    shards = {}
    for files in result.peers:
        assert files.data == out / "data" / f"{files.peer_id}.npz"
        assert oct(files.data.stat().st_mode & 0o777) == oct(0o600)
        with np.load(files.data, allow_pickle=False) as archive:
            shards[files.peer_id] = (archive["x"], archive["y"], int(archive["num_classes"]))
    # Disjoint and complete: every training record of the source is in exactly one shard.
    all_x = np.concatenate([x for x, _y, _k in shards.values()])
    all_y = np.concatenate([y for _x, y, _k in shards.values()])
    assert len(all_y) == len(train)
    assert _rows(all_x, all_y) == _rows(train.x, train.y)
    for x, y, num_classes in shards.values():
        assert num_classes == 10 and len(y) >= DEMO_MIN_RECORDS and x.shape[1:] == (64,)
        assert x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0  # digits / 16
    # Non-IID: every pair of label mixes differs by a wide margin (total variation).
    mixes = [_label_mix(y, 10) for _x, y, _k in shards.values()]
    for i in range(len(mixes)):
        for j in range(i + 1, len(mixes)):
            assert 0.5 * np.abs(mixes[i] - mixes[j]).sum() > 0.2, (PEERS[i], PEERS[j])

    for files in result.peers:
        cfg = load_config(files.config)
        assert files.data is not None
        assert cfg.data.startswith("npz:")
        assert Path(cfg.data.removeprefix("npz:")).resolve() == files.data.resolve()
        assert cfg.evaluate == DEMO_SOURCE
        assert cfg.pace.budget_hours == DEMO_BUDGET_HOURS == 0.25
        assert cfg.training.dp
        local, holdout = load_local_data(cfg)
        # Trains on (the loader's training part of) its own shard, keeps all ten classes...
        x, y, _k = shards[files.peer_id]
        assert local.num_classes == 10 and 0.75 * len(y) <= len(local) < len(y)
        assert set(_rows(local.x, local.y)) <= set(_rows(x, y))
        # ...and is measured on the test split every demo peer shares.
        assert np.array_equal(holdout.x, test.x) and np.array_equal(holdout.y, test.y)

    # Provisioning again never overwrites, shards included.
    before = {path: path.read_bytes() for path in (out / "data").iterdir()}
    with pytest.raises(ProvisionError, match="never overwrites"):
        provision("demo", PEERS, out, demo=True)
    assert {path: path.read_bytes() for path in (out / "data").iterdir()} == before


def test_plain_provision_writes_no_demo_data(tmp_path: Path) -> None:
    result = provision("demo", ["alice", "bob", "carol"], tmp_path / "net")
    assert not (tmp_path / "net" / "data").exists()
    cfg = load_config(result.peers[0].config)
    assert result.peers[0].data is None and cfg.data == "digits" and cfg.evaluate is None


def test_demo_shards_are_seeded_and_refuse_too_many_peers() -> None:
    labels = np.repeat(np.arange(10), 30)
    first, again = demo_shards(labels, 3), demo_shards(labels, 3)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert sum(len(s) for s in first) == len(labels)
    assert len(np.unique(np.concatenate(first))) == len(labels)
    with pytest.raises(DemoDataError, match="too few"):
        demo_shards(labels, 6)  # 6 x 60 > 300 records


def test_prepared_shard_keeps_its_classes_and_scale(tmp_path: Path) -> None:
    """An .npz with num_classes: labels stay class indices even when some class is absent,
    and features are not re-standardised, so shards and the test split share one scale."""
    shard = tmp_path / "shard.npz"
    x = np.linspace(0, 1, 40 * 3, dtype=np.float32).reshape(40, 3)
    np.savez(shard, x=x, y=np.array([2, 7] * 20), num_classes=np.int64(10))
    loaded = load_table(shard)
    assert loaded.num_classes == 10 and set(loaded.y.tolist()) == {2, 7}
    assert np.array_equal(loaded.x, x)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=x, y=np.array([2, 10] * 20), num_classes=np.int64(10))
    with pytest.raises(DataError, match=r"label '10' .* not in the public class list"):
        load_table(bad)


def test_evaluate_must_match_the_data(tmp_path: Path) -> None:
    """A hold-out of another shape is a config error at start-up, not a crash later."""
    from peer.config import ConfigError

    result = provision("demo", ["alice", "bob", "carol"], tmp_path / "net", demo=True)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros((30, 5), np.float32), y=np.arange(30) % 10,
             num_classes=np.int64(10))
    config = result.peers[0].config
    config.write_text(config.read_text().replace('evaluate = "digits"',
                                                 f'evaluate = "npz:{other}"'))
    with pytest.raises(ConfigError, match=r"evaluate: .* shape"):
        load_local_data(load_config(config))


def test_provision_demo_cli(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "peer.cli", "provision", "--network", "demo", "--peers",
         "alice,bob,carol", "--out", "net", "--demo"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert run.returncode == 0, run.stderr
    for name in ("alice", "bob", "carol"):
        assert f"data: net/data/{name}.npz (" in run.stdout
        assert (tmp_path / "net" / "data" / f"{name}.npz").is_file()
    assert run.stdout.count("records, mostly labels ") == 3
