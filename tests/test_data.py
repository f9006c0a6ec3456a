"""Data loaders: shapes, determinism, and a clear DataError for every bad file."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from peer.training.data import (
    DataError,
    Dataset,
    load_digits,
    load_fashion_mnist,
    load_idx,
    load_source,
    load_table,
    load_train_source,
    split_holdout,
)
from tests.conftest import require_installed


def _write_idx(path: Path, array: np.ndarray, magic: int, compress: bool) -> Path:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def _idx_pair(root: Path, prefix: str, n: int, compress: bool) -> None:
    rng = np.random.default_rng(1)
    _write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)),
               0x803, compress)
    _write_idx(root / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n), 0x801, compress)


def test_digits_default_source() -> None:
    ds = load_digits()
    assert ds.x.shape == (1797, 64) and ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0 and ds.num_classes == 10
    train, test = load_source("digits")
    assert len(train) + len(test) == 1797
    again, _ = load_source("digits")
    np.testing.assert_array_equal(train.y, again.y)


def test_digits_read_without_sklearn_match_sklearn() -> None:
    """The direct CSV read gives exactly scikit-learn's digits (which the tests may import)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    ds = load_digits()
    np.testing.assert_array_equal(ds.x, (bunch.data / 16.0).astype(np.float32))
    np.testing.assert_array_equal(ds.y, bunch.target)


def test_split_holdout_deterministic_and_disjoint() -> None:
    ds = Dataset(np.arange(100, dtype=np.float32)[:, None], np.arange(100) % 3, 3, "t")
    a_train, a_hold = split_holdout(ds, 0.2, seed=7)
    b_train, b_hold = split_holdout(ds, 0.2, seed=7)
    np.testing.assert_array_equal(a_hold.x, b_hold.x)
    np.testing.assert_array_equal(a_train.x, b_train.x)
    assert len(a_hold) == 20 and len(a_train) == 80
    assert not set(a_train.x.ravel()) & set(a_hold.x.ravel())
    _, c_hold = split_holdout(ds, 0.2, seed=8)
    assert not np.array_equal(a_hold.x, c_hold.x)
    sub = ds.subset([3, 1])
    assert sub.x.ravel().tolist() == [3.0, 1.0] and sub.num_classes == 3


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files_gz_and_raw(tmp_path: Path, compress: bool) -> None:
    _idx_pair(tmp_path, "train", 12, compress)
    _idx_pair(tmp_path, "t10k", 5, compress)
    train, test = load_source(f"mnist:{tmp_path}")
    assert train.x.shape == (12, 1, 28, 28) and test.x.shape == (5, 1, 28, 28)
    assert train.x.dtype == np.float32 and train.x.max() <= 1.0


def test_real_fashion_mnist_if_installed() -> None:
    root = Path("/usr/share/datasets/fashion-mnist")
    require_installed((root / "t10k-labels-idx1-ubyte.gz").exists(), "Fashion-MNIST",
                      "dataset-fashion-mnist")
    test = load_fashion_mnist(root, train=False)
    assert test.x.shape == (10000, 1, 28, 28) and set(np.unique(test.y)) == set(range(10))


def test_idx_errors_name_path_and_problem(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_source(f"fashion-mnist:{tmp_path}")
    with pytest.raises(DataError, match="not a directory"):
        load_fashion_mnist(tmp_path / "nope")
    labels = _write_idx(tmp_path / "l", np.zeros(3), 0x801, False)
    images = _write_idx(tmp_path / "i", np.zeros((3, 28, 28)), 0x803, False)
    truncated = tmp_path / "trunc"
    truncated.write_bytes(images.read_bytes()[:-10])
    with pytest.raises(DataError, match=f"{truncated}.*promises"):
        load_idx(truncated, labels)
    with pytest.raises(DataError, match="magic"):
        load_idx(labels, labels)
    bad_gz = tmp_path / "x.gz"
    bad_gz.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=str(bad_gz)):
        load_idx(bad_gz, labels)
    short = _write_idx(tmp_path / "l2", np.zeros(2), 0x801, False)
    with pytest.raises(DataError, match="2 labels"):
        load_idx(images, short)


# Public constants of a two-feature table, as CSV metadata lines (peer/training/tables.py).
META = ("# murmur: classes = lo, hi\n# murmur: feature_mean = 10, 2\n"
        "# murmur: feature_scale = 5, 0.5\n")


def test_csv_with_header_and_named_label(tmp_path: Path) -> None:
    path = tmp_path / "sensor.csv"
    rows = ["a,b,label"] + [f"{i},{i * 2 % 5},{'hi' if i % 2 else 'lo'}" for i in range(20)]
    path.write_text(META + "\n".join(rows) + "\n")
    ds = load_table(path, "label")
    assert ds.x.shape == (20, 2) and ds.num_classes == 2
    # Standardised with the file's public mean and scale, labels by their place in the list.
    raw = np.array([[i, i * 2 % 5] for i in range(20)], dtype=np.float32)
    np.testing.assert_allclose(ds.x, (raw - [10, 2]) / [5, 0.5], rtol=1e-6)
    assert ds.y.tolist() == [i % 2 for i in range(20)]
    train, test = load_source(f"csv:{path}#label")
    assert len(train) == 16 and len(test) == 4


def test_csv_without_header_uses_column_number(tmp_path: Path) -> None:
    path = tmp_path / "plain.csv"
    path.write_text("# murmur: classes = 2, 1, 0, 5\n# murmur: standardise = false\n"
                    + "".join(f"{i % 3},{i}.5,{i}\n" for i in range(9)))
    ds = load_table(path, 0)
    assert ds.x.shape == (9, 2) and ds.num_classes == 4  # class 5 has no record: still there
    assert ds.y.tolist() == [[2, 1, 0][i % 3] for i in range(9)]
    np.testing.assert_array_equal(ds.x[:, 1], np.arange(9, dtype=np.float32))


def test_csv_first_row_is_a_header_only_when_none_of_its_cells_is_a_number(
        tmp_path: Path) -> None:
    """A headerless CSV whose first record starts with a text label keeps every record: the
    record count (and so the sampling rate) never depends on what the first record holds."""
    meta = "# murmur: classes = walk, run\n# murmur: standardise = false\n"
    headerless = tmp_path / "headerless.csv"
    headerless.write_text(meta + "walk,0.5,1.5\nrun,2.5,3.5\nwalk,4.5,5.5\n")
    ds = load_table(headerless, 0)
    assert len(ds) == 3 and ds.y.tolist() == [0, 1, 0]
    np.testing.assert_array_equal(ds.x[:, 0], np.float32([0.5, 2.5, 4.5]))
    # The same records under a header row: the header is taken off, the records stay.
    with_header = tmp_path / "with_header.csv"
    with_header.write_text(meta + "activity,a,b\nwalk,0.5,1.5\nrun,2.5,3.5\nwalk,4.5,5.5\n")
    named = load_table(with_header, "activity")
    assert len(named) == 3 and np.array_equal(named.x, ds.x) and np.array_equal(named.y, ds.y)
    # A header with one numeric cell is a record, so it is never dropped silently: here its
    # label is not a class, which stops the load with the typed error.
    numeric_name = tmp_path / "numeric_name.csv"
    numeric_name.write_text(meta + "activity,2024,2025\nwalk,0.5,1.5\nrun,2.5,3.5\n")
    with pytest.raises(DataError, match="label 'activity'"):
        load_table(numeric_name, 0)


@pytest.mark.parametrize(
    ("content", "label", "message"),
    [
        ("a,label\n1,0\n2\n", "label", "line 3 has 1 columns"),
        ("a,label\nx,0\ny,1\n", "label", "non-numeric"),
        ("a,b\n1,0\n2,1\n", "label", "no column named 'label'"),
        ("", "label", "empty CSV"),
        (META + "a,b,label\n1,2,lo\n2,3,mid\n", "label", "label 'mid'"),
        (META + "a,b,label\n1,2,lo\nnan,3,hi\n", "label", "record 2 has a NaN"),
        ("# murmur: classes = a\na,label\n1,a\n2,a\n", "label", "need 2"),
    ],
)
def test_csv_errors(tmp_path: Path, content: str, label: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_table(path, label)
    assert str(path) in str(info.value)


def test_npz_tables_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, x=np.random.default_rng(0).normal(size=(10, 4, 3)), y=np.arange(10) % 2,
             classes=np.array([0, 1]), standardise=np.array(False))
    train, test = load_source(f"npz:{good}")
    assert train.x.shape[1:] == (4, 3) and len(train) + len(test) == 10
    missing = tmp_path / "missing.npz"
    np.savez(missing, features=np.zeros((3, 2)))
    with pytest.raises(DataError, match="'x'"):
        load_table(missing)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DataError, match=str(garbage)):
        load_table(garbage)
    with pytest.raises(DataError, match="not found"):
        load_table(tmp_path / "absent.npz")
    with pytest.raises(DataError, match="unsupported"):
        load_table(tmp_path / "data.parquet")


def test_unknown_source_spec() -> None:
    with pytest.raises(DataError, match="unknown data source"):
        load_source("imagenet")
    with pytest.raises(DataError, match="needs a path"):
        load_source("csv:")


def _same(a: Dataset, b: Dataset) -> bool:
    return (np.array_equal(a.x, b.x) and a.x.dtype == b.x.dtype and np.array_equal(a.y, b.y)
            and a.name == b.name and a.num_classes == b.num_classes)


def test_train_only_loader_matches_load_source(tmp_path: Path) -> None:
    """What a device loads (load_train_source) is exactly load_source's training part."""
    table = tmp_path / "t.npz"
    np.savez(table, x=np.random.default_rng(2).normal(size=(30, 5)), y=np.arange(30) % 3,
             num_classes=np.int64(3))
    csv_file = tmp_path / "t.csv"
    csv_file.write_text("# murmur: classes = 0, 1\n# murmur: feature_mean = 12, 2\n"
                        "# murmur: feature_scale = 7, 1.5\na,b,label\n"
                        + "".join(f"{i},{i * 7 % 5}.5,{i % 2}\n" for i in range(25)))
    _idx_pair(tmp_path, "train", 9, True)
    _idx_pair(tmp_path, "t10k", 4, True)
    for spec in ("digits", f"npz:{table}", f"csv:{csv_file}#label", f"mnist:{tmp_path}"):
        train, _test = load_source(spec)
        assert _same(load_train_source(spec), train), spec
    # The test files are never read: a device may hold only its training IDX files.
    only_train = tmp_path / "device"
    only_train.mkdir()
    _idx_pair(only_train, "train", 6, False)
    assert len(load_train_source(f"mnist:{only_train}")) == 6
    with pytest.raises(DataError, match="unknown data source"):
        load_train_source("imagenet")


def test_idx_pixels_scaled_exactly(tmp_path: Path) -> None:
    """The in-place scaling gives the same float32 values as a plain division."""
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    images = _write_idx(tmp_path / "i", pixels, 0x803, False)
    labels = _write_idx(tmp_path / "l", np.zeros(1), 0x801, False)
    ds = load_idx(images, labels)
    expected = (pixels.astype(np.float32) / 255.0)[:, None]
    assert ds.x.dtype == np.float32 and np.array_equal(ds.x, expected)


@pytest.mark.parametrize("fraction, seed", [(0.2, 0), (0.5, 7), (0.01, 3)])
def test_consuming_split_gives_split_holdouts_records(fraction: float, seed: int) -> None:
    """The in-place split (what a daemon uses) keeps the same records, order and names as
    split_holdout; the train arrays stop at the kept records."""
    from peer.training.data import split_holdout_consuming

    rng = np.random.default_rng(seed)
    x = rng.random((9000, 1, 4, 4), dtype=np.float32)
    y = rng.integers(0, 10, 9000)
    expected = split_holdout(Dataset(x.copy(), y.copy(), 10, "set"), fraction, seed)
    got = split_holdout_consuming(Dataset(x.copy(), y.copy(), 10, "set"), fraction, seed)
    for want, have in zip(expected, got, strict=True):
        assert np.array_equal(want.x, have.x) and np.array_equal(want.y, have.y)
        assert (want.name, want.num_classes) == (have.name, have.num_classes)
    assert got[0].x.shape == (len(expected[0]), 1, 4, 4)
    with pytest.raises(DataError, match="too few"):
        split_holdout_consuming(Dataset(x[:1].copy(), y[:1].copy(), 10, "one"), 0.2, 0)


def test_consuming_split_holds_the_set_once() -> None:
    """Both parts are disjoint views of the loaded set's own buffer (no hold-out copy), and
    together they are every record exactly once; a fixed seed picks the same hold-out."""
    from peer.training.data import split_holdout_consuming

    n = 5000
    x = np.arange(n, dtype=np.float32).repeat(4).reshape(n, 1, 2, 2)  # row i holds i
    y = np.arange(n) % 10
    source = Dataset(x, y.copy(), 10, "set")
    buffer = source.x
    train, holdout = split_holdout_consuming(source, 0.2, seed=11)
    assert np.shares_memory(train.x, buffer) and np.shares_memory(holdout.x, buffer)
    assert not np.shares_memory(train.x, holdout.x)
    assert not np.shares_memory(train.y, holdout.y)
    train_ids, holdout_ids = train.x[:, 0, 0, 0].astype(int), holdout.x[:, 0, 0, 0].astype(int)
    assert sorted([*train_ids, *holdout_ids]) == list(range(n))
    assert np.array_equal(train.y, train_ids % 10) and np.array_equal(holdout.y, holdout_ids % 10)
    assert len(holdout) == 1000
    again = split_holdout_consuming(Dataset(np.arange(n, dtype=np.float32), y.copy(), 10, "s"),
                                    0.2, seed=11)
    assert np.array_equal(again[1].x.astype(int), holdout_ids)
    # what is held out is the seed's permutation, not anything in the data
    _train, reference = split_holdout(Dataset(np.arange(n, dtype=np.float32), y, 10, "s"),
                                      0.2, seed=11)
    assert np.array_equal(reference.x.astype(int), holdout_ids)
