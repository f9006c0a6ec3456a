"""Data of the user's own, ``data = "python:package.module:loader"``: loaded and checked.

The loader is called with no arguments, on the device, and returns either a pair of arrays
``(features, labels)`` or a :class:`Dataset`, which also declares the class list and,
optionally, the standardisation. The records then go through exactly the public preprocessing
of a table (peer/training/tables.py): each value clip((x - mean) / scale, -clip, clip), each
label its position in the class list. The class list comes from the ``Dataset`` or from the
peer config's ``[table] classes``, never from the labels; a loader that returns bare arrays
needs ``[table]`` to say it (TableMetadataError otherwise).

Security property: every record's model input and class number depend on that record and on
public constants only, as for a table, provided the loader itself maps each record on its own
(docs/privacy.md, "Preprocessing: public constants only", states this trust model). Bad output
(not arrays, ragged rows, non-numeric or non-finite values, labels of the wrong kind or
outside the class list) raises a :class:`DataError` subclass naming the loader and the
problem, before the peer connects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from peer.training.import_path import ImportPathError, load_callable
from peer.training.tables import DataError, TableConfig, resolve

#: What ``data`` starts with for a user's loader.
PYTHON_PREFIX = "python:"


class LoaderError(DataError):
    """A user's data loader failed or returned something that is not usable records."""


@dataclass(frozen=True)
class Dataset:
    """What a loader may return: records and the public constants they are read with.

    ``features``: numeric array [N, ...] (one row per record, any record shape).
    ``labels``: [N] integers or strings, each one of ``classes``.
    ``classes``: the class list, declared (every peer of a network declares the same); the
    model's output size is its length and a label's class number its position.
    ``feature_mean``, ``feature_scale``: declared standardisation, one number for all
    features or one per feature of the flattened record; both None: features as stored.
    ``feature_clip``: each (standardised) value is clipped to [-clip, clip] (None: 10).
    None of them may be computed from the records (docs/privacy.md).
    """

    features: Any
    labels: Any
    classes: Sequence[str | int]
    feature_mean: float | Sequence[float] | None = None
    feature_scale: float | Sequence[float] | None = None
    feature_clip: float | None = None

    def table_config(self) -> TableConfig:
        """The declared constants as a table's (``[table]`` in the peer config wins)."""
        def floats(value: float | Sequence[float] | None) -> tuple[float, ...] | None:
            return None if value is None else tuple(np.ravel(np.asarray(value, dtype=float)))

        as_stored = self.feature_mean is None and self.feature_scale is None
        return TableConfig(classes=tuple(self.classes), feature_mean=floats(self.feature_mean),
                           feature_scale=floats(self.feature_scale),
                           standardise=False if as_stored else None,
                           feature_clip=self.feature_clip)


def _array(value: Any, what: str, where: str) -> np.ndarray:
    """``value`` as a numpy array; LoaderError for ragged or object data."""
    try:
        array = np.asarray(value)
    except ValueError as exc:  # numpy refuses ragged nested sequences
        raise LoaderError(f"{where}: {what} are ragged or not an array ({exc})") from None
    if array.dtype == object:
        raise LoaderError(f"{where}: {what} are ragged or of mixed types (an object array); "
                          "return one numeric array with the same shape for every record")
    return array


def _records(result: Any, where: str, table: TableConfig | None
             ) -> tuple[np.ndarray, np.ndarray, TableConfig]:
    """(features, raw labels, the declared constants, ``table`` over the loader's)."""
    if isinstance(result, Dataset):
        features, labels = result.features, result.labels
        try:
            declared = result.table_config()
        except ValueError as exc:  # TableConfig's checks: classes, scaling, clip
            raise LoaderError(f"{where}: {exc}") from None
    elif isinstance(result, tuple) and len(result) == 2:
        features, labels = result
        declared = TableConfig()
    else:
        raise LoaderError(f"{where}: returned a {type(result).__name__}; expected "
                          "(features, labels) or a peer.Dataset")
    given = table.over(declared) if table is not None else declared
    x, y = _array(features, "features", where), _array(labels, "labels", where)
    if x.dtype.kind not in "iuf":
        raise LoaderError(f"{where}: features have dtype {x.dtype}; expected numbers")
    if x.ndim < 2 or len(x) < 2:
        raise LoaderError(f"{where}: features must be [N, ...] with N >= 2 records, got shape "
                          f"{x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise LoaderError(f"{where}: labels must be [N] = [{len(x)}], got shape {y.shape}")
    if y.dtype.kind not in "iuUS":
        raise LoaderError(f"{where}: labels have dtype {y.dtype}; expected integers or "
                          "strings (class names)")
    return x, y, given


def load_python(target: str, table: TableConfig | None = None
                ) -> tuple[np.ndarray, np.ndarray, int, str]:
    """(float32 features, int64 class numbers, number of classes, a name) of the records
    ``target``'s loader returns, read with the public constants only."""
    where = f"loader {target!r}"
    try:
        loader = load_callable(target, "data")
    except ImportPathError as exc:
        raise LoaderError(str(exc)) from exc
    try:
        result = loader()
    except Exception as exc:  # the user's code: any error becomes one typed error
        raise LoaderError(f"{where} raised {type(exc).__name__}: {exc}") from exc
    x, raw_labels, given = _records(result, where, table)
    prep = resolve(given, int(np.prod(x.shape[1:])), where)
    features = prep.features(x.astype(np.float32), where)  # always a copy: scaled in place
    return features, prep.labels(raw_labels, where), prep.num_classes, target.rpartition(":")[2]
