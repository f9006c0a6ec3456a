"""Data sources for a peer's local training: digits, IDX images, CSV / .npz tables.

A peer's data never leaves it; this module only reads local files. Every loader returns a
:class:`Dataset` of float32 features and int64 labels 0..num_classes-1, and every problem with a
file (missing, truncated, wrong format, bad labels) raises :class:`DataError` naming the path
and the problem instead of crashing deep inside numpy or torch.

Security property: every record's model input and class number depend on that record and
on public constants only, never on the other records, so the ledger's epsilon covers the
pipeline that ran (docs/privacy.md, "Preprocessing: public constants only"). Images are
scaled by fixed constants (pixels / 255, digits / 16). Tables (CSV, .npz) are standardised
with a public mean and scale, clipped to a public bound, and their labels mapped through a
public class list, all from the peer config's ``[table]`` or the file's metadata
(peer/training/tables.py); a table without them is refused with TableMetadataError.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import itertools
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from peer.training.idx import idx_file, read_idx

# DataError is defined in tables.py (which needs nothing from here) and used from here.
from peer.training.tables import (
    CSV_META_PREFIX,
    NPZ_META_KEYS,
    DataError,
    TableConfig,
    TablePreprocessing,
    csv_metadata,
    npz_metadata,
    resolve,
)
from peer.training.user_data import load_python

DEFAULT_FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
TABLE_TEST_FRACTION = 0.2
DIGITS_TEST_FRACTION = 0.25
SPLIT_SEED = 0  # fixed so every run (and every peer) sees the same train/test split


@dataclass
class Dataset:
    """Features ``x`` (float32, [N, ...]) and labels ``y`` (int64 in 0..num_classes-1)."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(f"{self.name}: {len(self.x)} feature rows but {len(self.y)} labels")
        if self.x.dtype != np.float32:
            self.x = self.x.astype(np.float32)
        if self.y.dtype != np.int64:
            self.y = self.y.astype(np.int64)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])

    def subset(self, indices: np.ndarray | list[int], name: str | None = None) -> Dataset:
        """The records at ``indices`` (copied), keeping ``num_classes``.

        Indexing with an integer array already copies; a second ``.copy()`` held a third
        copy of the records at the loading peak (+150 MB for Fashion-MNIST's training set)."""
        index = np.asarray(indices, dtype=np.int64)
        return Dataset(
            x=self.x[index],
            y=self.y[index],
            num_classes=self.num_classes,
            name=name or self.name,
        )


def _split_indices(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (kept, split-off) record indices: a seeded permutation cut at ``fraction``."""
    if not 0 < fraction < 1:
        raise ValueError(f"split fraction must be in (0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(count)
    cut = min(max(1, round(count * fraction)), count - 1)
    return np.sort(order[cut:]), np.sort(order[:cut])


def _split(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    if len(ds) < 2:
        raise DataError(f"{ds.name}: {len(ds)} records are too few to split")
    kept, split_off = _split_indices(len(ds), fraction, seed)
    return ds.subset(kept), ds.subset(split_off)


def split_holdout(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Deterministic (train, holdout) split: the same seed always gives the same records."""
    train, holdout = _split(ds, fraction, seed)
    train.name, holdout.name = f"{ds.name}/train", f"{ds.name}/holdout"
    return train, holdout


def _digits_file() -> Path:
    """scikit-learn's bundled ``digits.csv.gz``, located without importing scikit-learn."""
    package = importlib.util.find_spec("sklearn")  # finds the package; does not import it
    if package is None or not package.submodule_search_locations:
        raise DataError("digits: scikit-learn is not installed (it ships the digits file)")
    return Path(next(iter(package.submodule_search_locations))) / "datasets" / "data" / (
        "digits.csv.gz")


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 records, no download), scaled to [0, 1].

    Reads the CSV that ``sklearn.datasets.load_digits`` reads, the same way (the same
    records and values), but without importing scikit-learn: its import costs a peer about
    60 MB of memory and seconds of start-up, which matters on a small board.
    """
    path = _digits_file()
    try:
        with gzip.open(path, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",")
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(f"{path}: cannot read digits ({exc})") from exc
    if table.ndim != 2 or table.shape[1] != 65:
        raise DataError(f"{path}: expected 64 pixel columns and a label, got {table.shape}")
    return Dataset(
        x=(table[:, :-1] / 16.0).astype(np.float32),
        y=table[:, -1].astype(np.int64),
        num_classes=10,
        name="digits",
    )


def _permute_rows(x: np.ndarray, source: list[int]) -> None:
    """``x[:] = x[source]`` in place with one spare row, following the permutation's cycles
    (Fashion-MNIST's 60 000 images: about 0.05 s)."""
    done = bytearray(len(source))
    for start, first in enumerate(source):
        if done[start] or first == start:
            continue
        spare, row = x[start].copy(), start
        while source[row] != start:
            x[row] = x[source[row]]
            done[row], row = 1, source[row]
        x[row], done[row] = spare, 1


def split_holdout_consuming(ds: Dataset, fraction: float, seed: int
                            ) -> tuple[Dataset, Dataset]:
    """:func:`split_holdout`'s records, order and names, holding the set once.

    The rows of ``ds``'s own arrays are reordered in place to the kept records followed by
    the hold-out, and both parts are views of that one buffer (disjoint slices): the peak
    holds the set once (Fashion-MNIST's 60 000 images: 188 MB; copying the hold-out out
    added 38 MB). Training and evaluation only read the arrays. ``ds`` is consumed: it and
    any view of its arrays must not be used afterwards.
    """
    if len(ds) < 2:
        raise DataError(f"{ds.name}: {len(ds)} records are too few to split")
    kept, split_off = _split_indices(len(ds), fraction, seed)
    source = np.concatenate([kept, split_off])
    _permute_rows(ds.x, source.tolist())
    ds.y[:] = ds.y[source]
    cut = len(kept)
    return (Dataset(ds.x[:cut], ds.y[:cut], ds.num_classes, f"{ds.name}/train"),
            Dataset(ds.x[cut:], ds.y[cut:], ds.num_classes, f"{ds.name}/holdout"))


def load_idx(images: Path, labels: Path, name: str = "idx") -> Dataset:
    """MNIST-format IDX image + label files (raw or .gz) -> [N, 1, H, W] in [0, 1]."""
    x, targets = read_idx(Path(images), Path(labels))
    return Dataset(x=x, y=targets.astype(np.int64), num_classes=10, name=name)


def load_fashion_mnist(root: Path = DEFAULT_FASHION_MNIST_ROOT, train: bool = True) -> Dataset:
    """Fashion-MNIST (or MNIST: same file names) from a directory of IDX files."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected IDX files from dataset-fashion-mnist)")
    prefix = "train" if train else "t10k"
    return load_idx(
        idx_file(root, f"{prefix}-images-idx3-ubyte"),
        idx_file(root, f"{prefix}-labels-idx1-ubyte"),
        name=f"{root.name}/{prefix}",
    )


def _read_csv(path: Path, label_column: str | int
              ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(raw features, raw labels, the leading ``# murmur:`` metadata lines) of a CSV with an
    optional header row (the first row, when none of its cells is a number).

    Any other leading line that starts with ``#`` is refused, not skipped: it could be a record
    whose first cell (its label) starts with ``#``, and skipping it would make the record count,
    and so the sampling rate, depend on what that record holds (docs/privacy.md, "What the
    ledger's epsilon covers").
    """
    try:
        with path.open(newline="") as handle:
            comments: list[str] = []
            line = handle.readline()
            while line.startswith("#"):
                comments.append(line.rstrip("\r\n"))
                line = handle.readline()
            rows = [row for row in csv.reader(itertools.chain([line], handle)) if row]
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read CSV ({exc})") from exc
    for number, comment in enumerate(comments, start=1):
        if not comment.startswith(CSV_META_PREFIX):
            raise DataError(f"{path}: line {number} starts with '#' but is not a "
                            f"'{CSV_META_PREFIX} KEY = VALUE' line; only metadata lines may "
                            "precede the records (a record whose label starts with '#' would "
                            "look the same): remove the line")
    if not rows:
        raise DataError(f"{path}: empty CSV")
    header: list[str] | None = None
    if _is_header(rows[0]):
        header, rows = rows[0], rows[1:]
    if not rows:
        raise DataError(f"{path}: CSV has a header but no records")
    width = len(rows[0])
    if width < 2:
        raise DataError(f"{path}: need at least one feature column and a label column")
    first_line = len(comments) + (2 if header else 1)
    for number, row in enumerate(rows, start=first_line):
        if len(row) != width:
            raise DataError(f"{path}: line {number} has {len(row)} columns, expected {width}")
    label_index = _label_index(path, label_column, header, width)
    labels = np.array([row[label_index] for row in rows])
    try:
        features = np.array(
            [[float(v) for i, v in enumerate(row) if i != label_index] for row in rows],
            dtype=np.float32,
        )
    except ValueError as exc:
        raise DataError(f"{path}: non-numeric feature value ({exc})") from exc
    return features, labels, comments


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _is_header(row: list[str]) -> bool:
    """Whether a CSV's first row is a header: none of its cells is a number.

    A record's features are numbers, so a record is never taken for a header, whatever its
    label: the record count N, and so the sampling rate, does not depend on what the first
    record holds (docs/privacy.md, "What the ledger's epsilon covers").
    """
    return not any(_is_number(cell) for cell in row)


def _label_index(path: Path, label_column: str | int, header: list[str] | None,
                 width: int) -> int:
    if isinstance(label_column, str) and not label_column.lstrip("-").isdigit():
        if header is None or label_column not in header:
            raise DataError(f"{path}: no column named {label_column!r} in the header")
        return header.index(label_column)
    label_index = int(label_column)
    if not -width <= label_index < width:
        raise DataError(f"{path}: label column {label_index} out of range (width {width})")
    return label_index % width


def _npz_arrays(source: Path | BinaryIO, where: str, names: tuple[str, ...]
                ) -> dict[str, np.ndarray]:
    """The arrays among ``names`` that an ``.npz`` holds (``x`` and ``y`` required)."""
    try:
        archive = np.load(source, allow_pickle=False)
    except FileNotFoundError as exc:
        raise DataError(f"{where}: file not found") from exc
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{where}: cannot read .npz ({exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{where}: not an .npz archive (a single .npy array?)")
    with archive:
        if "x" not in archive.files or "y" not in archive.files:
            raise DataError(f"{where}: .npz must hold arrays 'x' (features) and 'y' (labels)")
        try:
            return {name: archive[name] for name in names if name in archive.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"{where}: cannot read arrays from .npz ({exc})") from exc


def read_npz_arrays(source: Path | BinaryIO, where: str
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(x, y, the ``num_classes`` array or None) of an ``.npz`` file or open byte stream,
    unchecked beyond being there; DataError naming ``where`` for anything unreadable."""
    arrays = _npz_arrays(source, where, ("x", "y", "num_classes"))
    return arrays["x"], arrays["y"], arrays.get("num_classes")


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, TableConfig]:
    """(x as a fresh float32 copy, raw labels, the file's metadata)."""
    arrays = _npz_arrays(path, str(path), ("x", "y", *NPZ_META_KEYS))
    x, y = arrays["x"], arrays["y"]
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{path}: need x [N, features...] and y [N], got {x.shape} and {y.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: x has non-numeric dtype {x.dtype}")
    meta = npz_metadata({k: arrays[k] for k in NPZ_META_KEYS if k in arrays}, str(path))
    return x.astype(np.float32), y, meta  # always a fresh copy: scaled in place


def _read_table(path: Path, label_column: str | int, table: TableConfig | None
                ) -> tuple[np.ndarray, np.ndarray, TablePreprocessing]:
    """(raw float32 features, raw labels, the resolved public constants). The constants come
    from ``table`` over the file's metadata and the record shape, never from record values."""
    path = Path(path)
    if path.suffix == ".npz":
        x, raw_labels, meta = _read_npz(path)
    elif path.suffix == ".csv":
        x, raw_labels, comments = _read_csv(path, label_column)
        meta = csv_metadata(comments, str(path))
    else:
        raise DataError(f"{path}: unsupported table format {path.suffix!r} (use .csv or .npz)")
    given = table.over(meta) if table is not None else meta
    num_features = int(np.prod(x.shape[1:]))
    return x, raw_labels, resolve(given, num_features, str(path))


def table_preprocessing(path: Path, label_column: str | int = "label",
                        table: TableConfig | None = None) -> TablePreprocessing:
    """The public constants :func:`load_table` uses for this file and ``table``: class list,
    per-feature mean and scale, clip bound. A read-out: the same for any records of the same
    shape, which is the property the privacy argument rests on."""
    return _read_table(path, label_column, table)[2]


def load_table(path: Path, label_column: str | int = "label",
               table: TableConfig | None = None) -> Dataset:
    """A user's own CSV (features + one label column) or .npz (arrays ``x`` and ``y``).

    CSV: leading ``# murmur: KEY = VALUE`` metadata lines, an optional header row (the first
    row is one exactly when none of its cells is a number);
    ``label_column`` is a header name or a column number (negative counts from the end).
    .npz: arrays ``x``, ``y`` and the metadata arrays (``num_classes`` alone: classes
    0..K-1, features as stored; what ``murmur-peer provision --demo`` writes).

    Each record is mapped on its own with public constants (``table``, a ``[table]`` config,
    over the file's metadata; peer/training/tables.py): features standardised and clipped,
    label to its position in the class list. TableMetadataError when a constant is missing,
    UnknownLabelError for a label outside the list.
    """
    path = Path(path)
    x, raw_labels, prep = _read_table(path, label_column, table)
    if len(x) < 2:
        raise DataError(f"{path}: {len(x)} records are too few")
    y = prep.labels(raw_labels, str(path))
    return Dataset(x=prep.features(x, str(path)), y=y, num_classes=prep.num_classes,
                   name=path.stem)


def _parse_spec(spec: str) -> tuple[str, str]:
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "python":
        return kind, rest  # checked by user_data.load_python
    if kind in ("digits", "fashion-mnist", "mnist", "csv", "npz"):
        if kind == "mnist" and not rest:
            raise DataError("mnist needs a directory: mnist:/path/to/idx/files")
        if kind in ("csv", "npz") and not rest:
            raise DataError(f"{kind} needs a path: {kind}:/path/to/file.{kind}")
        return kind, rest
    raise DataError(
        f"unknown data source {spec!r}: use digits, fashion-mnist[:DIR], mnist:DIR, "
        "csv:PATH[#LABEL], npz:PATH or python:MODULE:LOADER"
    )


def _load_whole(kind: str, rest: str, table: TableConfig | None) -> Dataset:
    """The digits or table source before its fixed test split."""
    if kind == "digits":
        return load_digits()
    if kind == "python":  # a user's loader, read like a table (user_data.py)
        x, y, num_classes, name = load_python(rest, table)
        return Dataset(x=x, y=y, num_classes=num_classes, name=name)
    path_text, _, label = rest.partition("#")
    path = Path(path_text)
    if path.suffix != f".{kind}":
        raise DataError(f"{path}: expected a .{kind} file for source {kind!r}")
    return load_table(path, label or "label", table)


def _test_fraction(kind: str) -> float:
    return DIGITS_TEST_FRACTION if kind == "digits" else TABLE_TEST_FRACTION


def load_source(spec: str, table: TableConfig | None = None) -> tuple[Dataset, Dataset]:
    """(train, test) for a source spec.

    ``digits`` | ``fashion-mnist[:ROOT]`` | ``mnist:ROOT`` | ``csv:PATH[#LABEL]`` |
    ``npz:PATH`` | ``python:MODULE:LOADER``. Digits, tables and loaders get a fixed
    deterministic test split. ``table``: the
    public constants of a table source (the config's ``[table]``; see :func:`load_table`).
    """
    kind, rest = _parse_spec(spec)
    if kind in ("fashion-mnist", "mnist"):
        root = Path(rest) if rest else DEFAULT_FASHION_MNIST_ROOT
        train, test = load_fashion_mnist(root, train=True), load_fashion_mnist(root, train=False)
    else:
        train, test = _split(_load_whole(kind, rest, table), _test_fraction(kind),
                             SPLIT_SEED)
    train.name, test.name = f"{train.name}/train", f"{test.name}/test"
    return train, test


def load_train_source(spec: str, table: TableConfig | None = None) -> Dataset:
    """Only the training part of ``load_source(spec)``: the same records, order and name.

    What a device loads: it never evaluates on the shared test split, so it neither reads
    the IDX test files nor keeps the test records of a table in memory.
    """
    kind, rest = _parse_spec(spec)
    if kind in ("fashion-mnist", "mnist"):
        train = load_fashion_mnist(Path(rest) if rest else DEFAULT_FASHION_MNIST_ROOT, True)
    else:
        whole = _load_whole(kind, rest, table)
        if len(whole) < 2:
            raise DataError(f"{whole.name}: {len(whole)} records are too few to split")
        kept, _test = _split_indices(len(whole), _test_fraction(kind), SPLIT_SEED)
        train = whole.subset(kept)
    train.name = f"{train.name}/train"
    return train
