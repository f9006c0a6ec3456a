"""Tables with public preprocessing: constants from the config or the file, never the records.

The privacy argument (docs/privacy.md, "Preprocessing: public constants only") needs each
record's model input and class number to depend on that record and public constants only.
These tests check that property directly (change or remove one record: every other record's
input is bit-for-bit the same, and so are the constants and the class count), the typed errors
for a table without constants or with an unknown label, the config's ``[table]``, and that a
real CSV run's ledger epsilon is dp-accounting's for the (q, sigma, steps) that ran.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from crypto.admission import AdmissionKey
from crypto.identity import Identity
from peer.assembly import load_local_data
from peer.config import ConfigError, load_config
from peer.training.data import (
    DataError,
    load_source,
    load_table,
    table_preprocessing,
)
from peer.training.tables import (
    DEFAULT_FEATURE_CLIP,
    MAX_FEATURE_CLIP,
    TableConfig,
    TableMetadataError,
    UnknownLabelError,
)

CLASSES = ("walk", "run", "sit", "jump")
MEAN = (1.0, -2.0, 0.5)
SCALE = (3.0, 2.5, 4.0)
HEADER = (f"# murmur: classes = {', '.join(CLASSES)}\n"
          f"# murmur: feature_mean = {', '.join(map(str, MEAN))}\n"
          f"# murmur: feature_scale = {', '.join(map(str, SCALE))}\n")


def _records(count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, 3)).astype(np.float32) * 3
    labels = [CLASSES[i] for i in rng.integers(0, 3, count)]  # "jump" held by no record
    return x, labels


def _write_csv(path: Path, x: np.ndarray, labels: list[str], header: str = HEADER) -> Path:
    body = "".join(",".join([*(repr(float(v)) for v in row), label]) + "\n"
                   for row, label in zip(x, labels, strict=True))
    path.write_text(header + "a,b,c,label\n" + body)
    return path


def _expected(x: np.ndarray, clip: float = DEFAULT_FEATURE_CLIP) -> np.ndarray:
    mean, scale = np.float32(MEAN), np.float32(SCALE)
    return np.clip((x.astype(np.float32) - mean) / scale, -clip, clip)


def test_csv_loads_with_public_constants_from_its_header(tmp_path: Path) -> None:
    x, labels = _records(40, seed=1)
    ds = load_table(_write_csv(tmp_path / "t.csv", x, labels))
    np.testing.assert_allclose(ds.x, _expected(x), rtol=1e-6)
    assert ds.num_classes == 4  # from the list, though no record holds "jump"
    assert ds.y.tolist() == [CLASSES.index(label) for label in labels]
    prep = table_preprocessing(tmp_path / "t.csv")
    assert (prep.classes, prep.feature_mean, prep.feature_scale) == (CLASSES, MEAN, SCALE)


def test_npz_loads_with_public_constants_from_its_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 2, 3)) * 50
    path = tmp_path / "t.npz"
    np.savez(path, x=x, y=np.array(["b", "a", "c"] * 10), classes=np.array(["a", "b", "c"]),
             feature_mean=np.full((2, 3), 5.0), feature_scale=np.array(10.0),
             feature_clip=np.array(3.0))
    ds = load_table(path)
    assert ds.x.shape == (30, 2, 3) and ds.num_classes == 3
    np.testing.assert_allclose(ds.x, np.clip((x.astype(np.float32) - 5) / 10, -3, 3), rtol=1e-6)
    assert ds.y.tolist() == [1, 0, 2] * 10
    # A prepared split (num_classes alone): classes 0..K-1 and the features as stored.
    shard = tmp_path / "shard.npz"
    np.savez(shard, x=np.linspace(0, 1, 20).reshape(10, 2), y=np.arange(10) % 3,
             num_classes=np.int64(5))
    prepared = load_table(shard)
    assert prepared.num_classes == 5
    np.testing.assert_array_equal(prepared.x, np.linspace(0, 1, 20, dtype=np.float32)
                                  .reshape(10, 2))


@pytest.mark.parametrize("change", ["outlier", "new_label", "removed"])
@pytest.mark.parametrize("kind", ["csv", "npz"])
def test_one_record_never_moves_another_records_input(tmp_path: Path, kind: str,
                                                     change: str) -> None:
    """Neighbouring files (one record replaced or removed) give the same constants, the same
    class count and, bit for bit, the same input and label for every other record."""
    x, labels = _records(60, seed=3)
    other_x, other_labels = x.copy(), list(labels)
    j = 17
    if change == "outlier":
        other_x[j] = [1e30, -1e30, 3e4]
    elif change == "new_label":
        other_labels[j] = "jump"  # the only record with this class
    if kind == "csv":
        first = _write_csv(tmp_path / "a.csv", x, labels)
        second = tmp_path / "b.csv"
        if change == "removed":
            _write_csv(second, np.delete(x, j, axis=0), labels[:j] + labels[j + 1:])
        else:
            _write_csv(second, other_x, other_labels)
    else:
        first, second = tmp_path / "a.npz", tmp_path / "b.npz"
        meta = {"classes": np.array(CLASSES), "feature_mean": np.array(MEAN),
                "feature_scale": np.array(SCALE)}
        np.savez(first, x=x, y=np.array(labels), **meta)
        if change == "removed":
            np.savez(second, x=np.delete(x, j, axis=0),
                     y=np.array(labels[:j] + labels[j + 1:]), **meta)
        else:
            np.savez(second, x=other_x, y=np.array(other_labels), **meta)
    a, b = load_table(first), load_table(second)
    assert table_preprocessing(first) == table_preprocessing(second)
    assert a.num_classes == b.num_classes == len(CLASSES)
    keep = np.delete(np.arange(60), j)
    b_rows = np.arange(59) if change == "removed" else keep
    assert np.array_equal(a.x[keep], b.x[b_rows]) and np.array_equal(a.y[keep], b.y[b_rows])
    if change == "outlier":
        assert np.all(np.isfinite(b.x[j])) and np.abs(b.x[j]).max() == DEFAULT_FEATURE_CLIP


def test_table_without_constants_raises_what_to_add(tmp_path: Path) -> None:
    x, labels = _records(10, seed=4)
    bare = _write_csv(tmp_path / "bare.csv", x, labels, header="")
    with pytest.raises(TableMetadataError) as info:
        load_table(bare)
    message = str(info.value)
    assert isinstance(info.value, DataError) and "\n" not in message
    for hint in (str(bare), "no public class list", "[table]", "# murmur: classes",
                 'array "classes"'):
        assert hint in message, hint
    no_scale = _write_csv(tmp_path / "classes_only.csv", x, labels,
                          header="# murmur: classes = walk, run, sit\n")
    with pytest.raises(TableMetadataError) as info:
        load_source(f"csv:{no_scale}#label")
    for hint in ("feature_mean and feature_scale for its 3 features", "standardise = false",
                 "# murmur: feature_scale"):
        assert hint in str(info.value), hint
    npz = tmp_path / "bare.npz"
    np.savez(npz, x=x, y=np.arange(10) % 2)
    with pytest.raises(TableMetadataError, match="no public class list"):
        load_table(npz)
    wrong_count = _write_csv(tmp_path / "short.csv", x, labels, header=(
        "# murmur: classes = walk, run, sit\n# murmur: feature_mean = 0, 0\n"
        "# murmur: feature_scale = 1\n"))
    with pytest.raises(TableMetadataError, match="feature_mean has 2 values, the table has 3"):
        load_table(wrong_count)
    typo = _write_csv(tmp_path / "typo.csv", x, labels, header="# murmur: clases = a, b\n")
    with pytest.raises(TableMetadataError, match="bad metadata line"):
        load_table(typo)


def test_label_outside_the_class_list_stops_the_load(tmp_path: Path) -> None:
    x, labels = _records(12, seed=5)
    labels[4] = labels[9] = "crawl"
    path = _write_csv(tmp_path / "t.csv", x, labels)
    with pytest.raises(UnknownLabelError) as info:
        load_table(path)
    message = str(info.value)
    assert isinstance(info.value, DataError)
    for hint in ("'crawl'", "record 5", "2 record(s)", "Add it to classes", str(path)):
        assert hint in message, hint
    npz = tmp_path / "t.npz"
    np.savez(npz, x=x, y=np.array([0, 1, 7] * 4), num_classes=np.int64(3))
    with pytest.raises(UnknownLabelError, match="label '7'"):
        load_table(npz)


def test_clip_keeps_every_input_finite_and_non_finite_raw_values_stop(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("# murmur: classes = 0, 1\n# murmur: feature_mean = 0\n"
                    "# murmur: feature_scale = 1e-30\n# murmur: feature_clip = 2.5\n"
                    "a,b,label\n3e38,-3e38,0\n1e-31,0,1\n")
    ds = load_table(path)
    np.testing.assert_allclose(ds.x, [[2.5, -2.5], [0.1, 0.0]], rtol=1e-5)
    path.write_text("# murmur: classes = 0, 1\n# murmur: standardise = false\n"
                    "a,b,label\n1,2,0\n3,inf,1\n")
    with pytest.raises(DataError, match="record 2 has a NaN or infinite"):
        load_table(path)


def test_clip_bound_is_capped_so_no_input_can_overflow_a_norm(tmp_path: Path) -> None:
    """B <= 1e4: a record of the largest finite float32 values loads as +-B, and the squared
    norm of even a million such features stays far inside float32 (docs/privacy.md)."""
    assert MAX_FEATURE_CLIP == 1e4
    assert np.isfinite(np.float32(1e6) * np.float32(MAX_FEATURE_CLIP) ** 2)
    with pytest.raises(ValueError, match="feature_clip: must be in"):
        TableConfig(feature_clip=MAX_FEATURE_CLIP * 1.5)
    path = tmp_path / "t.csv"
    path.write_text("# murmur: classes = 0, 1\n# murmur: standardise = false\n"
                    "# murmur: feature_clip = 1e30\na,b,label\n1,2,0\n3,4,1\n")
    with pytest.raises(TableMetadataError, match="feature_clip: must be in"):
        load_table(path)
    path.write_text("# murmur: classes = 0, 1\n# murmur: standardise = false\n"
                    "# murmur: feature_clip = 1e4\na,b,label\n3e38,-1e20,0\n3,4,1\n")
    ds = load_table(path)
    assert ds.x.tolist() == [[1e4, -1e4], [3.0, 4.0]]
    assert np.isfinite(np.square(ds.x).sum(axis=1)).all()


def test_table_config_checks_its_values() -> None:
    with pytest.raises(ValueError, match="distinct"):
        TableConfig(classes=("a", "a"))
    with pytest.raises(ValueError, match="feature_scale"):
        TableConfig(feature_scale=(1.0, 0.0))
    with pytest.raises(ValueError, match="not both"):
        TableConfig(standardise=False, feature_mean=(0.0,))
    # A config value wins over the file's; "as stored" replaces the file's mean and scale.
    file_meta = TableConfig(classes=("a", "b"), feature_mean=(1.0,), feature_scale=(2.0,))
    merged = TableConfig(classes=(1, 0), standardise=False).over(file_meta)
    assert merged == TableConfig(classes=("1", "0"), standardise=False)


# ------------------------------------------------------------------------ the peer config
@pytest.fixture
def network_dir(tmp_path: Path) -> Path:
    """alice's key, certificate and the network's admission.pub (what load_config checks)."""
    admission = AdmissionKey.generate("demo")
    alice = Identity.generate("alice")
    alice.save(tmp_path / "alice.key")
    cert = admission.issue(alice.public, valid_for_s=86_400, now=time.time())
    (tmp_path / "alice.cert").write_bytes(cert.to_bytes())
    (tmp_path / "admission.pub").write_text(admission.public_key.hex() + "\n")
    return tmp_path


def _config(directory: Path, data: str, table: str) -> Path:
    path = directory / "peer.toml"
    path.write_text(
        'peer_id = "alice"\nnetwork_id = "demo"\nidentity_file = "alice.key"\n'
        'certificate_file = "alice.cert"\nadmission_public_key = "admission.pub"\n'
        f'data = "{data}"\n[training]\ntarget_epsilon = 8.0\n{table}')
    return path


def test_config_table_section_gives_the_constants(network_dir: Path) -> None:
    x, labels = _records(50, seed=6)
    _write_csv(network_dir / "t.csv", x, labels, header="# murmur: classes = sit, run, walk\n")
    table = ('[table]\nclasses = ["walk", "run", "sit", "jump"]\n'
             f"feature_mean = {list(MEAN)}\nfeature_scale = {list(SCALE)}\n")
    cfg = load_config(_config(network_dir, "csv:t.csv#label", table))
    assert cfg.table == TableConfig(classes=CLASSES, feature_mean=MEAN, feature_scale=SCALE)
    train, holdout = load_local_data(cfg)
    assert train.num_classes == holdout.num_classes == 4  # the config's list, not the file's
    whole = load_table(network_dir / "t.csv", table=cfg.table)
    np.testing.assert_allclose(whole.x, _expected(x), rtol=1e-6)
    assert whole.y.tolist() == [CLASSES.index(label) for label in labels]
    # Without [table] the file's class list alone is not enough: the error says what to add.
    with pytest.raises(ConfigError, match="no public feature_mean and feature_scale"):
        load_local_data(load_config(_config(network_dir, "csv:t.csv#label", "")))


@pytest.mark.parametrize(("data", "table", "message"), [
    ("digits", '[table]\nclasses = ["a", "b"]\n', "applies to csv: and npz: sources only"),
    ("csv:t.csv", "[table]\nclasses = 5\n", "table.classes"),
    ("csv:t.csv", '[table]\nclasses = ["a", "b"]\nfeature_scale = [0.0]\n', "feature_scale"),
    ("csv:t.csv", "[table]\nfeature_mea = [1.0]\n", "unknown key 'feature_mea'"),
])
def test_config_table_errors(network_dir: Path, data: str, table: str, message: str) -> None:
    (network_dir / "t.csv").write_text("a,label\n1,a\n2,b\n")
    with pytest.raises(ConfigError, match=message) as info:
        load_config(_config(network_dir, data, table))
    assert "\n" not in str(info.value)


# --------------------------------------------------------- the ledger of a real CSV run
@pytest.mark.usefixtures("one_torch_thread")
def test_csv_run_ledger_epsilon_is_dp_accountings_for_the_mechanism_that_ran(
        tmp_path: Path) -> None:
    """A short real DP-SGD run on a CSV loaded with public constants: its inputs are the
    record-wise transform of the rows, and its ledger's epsilon is dp-accounting's own
    (composed here from the library's public API) for the (q, sigma, steps) that ran."""
    import dp_accounting as dpa

    from peer.training.trainer import LocalTrainer, TrainerConfig

    x, labels = _records(240, seed=7)
    path = _write_csv(tmp_path / "sensor.csv", x, labels)
    train, test = load_source(f"csv:{path}#label")
    expected_rows = {tuple(row) for row in _expected(x).tolist()}
    assert {tuple(row) for row in train.x.tolist()} <= expected_rows
    cfg = TrainerConfig(model="mlp", local_steps=5, noise_multiplier=1.0, batch_size=32)
    trainer = LocalTrainer(cfg, train, test, tmp_path / "state")
    for _ in range(2):
        trainer.train_round()
    ledger = trainer.ledger
    assert ledger.sample_rate == 32 / len(train) and ledger.sigma == 1.0 and ledger.steps == 10
    reference = dpa.pld.PLDAccountant(
        neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
    reference.compose(dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(32 / len(train), dpa.GaussianDpEvent(1.0)), 10))
    expected = float(reference.get_epsilon(cfg.delta))
    assert expected > 1.0  # large enough that a wrong q, sigma or step count shows
    assert expected - 1e-6 <= trainer.epsilon <= expected + 0.01


def test_a_leading_hash_line_that_is_not_metadata_is_refused_not_skipped(tmp_path: Path) -> None:
    # Headerless, label first: a record whose label starts with '#' must not vanish as a
    # comment (the record count would then depend on that record's content).
    x, labels = _records(6, seed=4)
    cells = [",".join(repr(float(v)) for v in row) for row in x]
    rows = [f"#zz,{cells[0]}"] + [f"{label},{cell}" for cell, label in zip(cells[1:], labels[1:],
                                                                           strict=True)]
    path = tmp_path / "hash_label.csv"
    path.write_text(HEADER + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match="line 4 starts with '#'"):
        load_table(path, label_column=0)
    comment = tmp_path / "comment.csv"
    comment.write_text("# exported by the sensor tool\n" + HEADER + "\n".join(rows[1:]) + "\n")
    with pytest.raises(DataError, match="line 1 starts with '#'"):
        load_table(comment, label_column=0)
    clean = tmp_path / "clean.csv"
    clean.write_text(HEADER + "\n".join(rows[1:]) + "\n")
    assert len(load_table(clean, label_column=0)) == 5
