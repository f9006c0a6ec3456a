"""The public preprocessing of a CSV / ``.npz`` table: class list, feature scaling, clip bound.

Security property: a table record's model input and class number are functions of that
record and of public constants only, never of the other records. So two data sets that
differ in one record give DP-SGD inputs that differ in one record, and the ledger's epsilon
covers the pipeline that ran (docs/privacy.md, "Preprocessing: public constants only").

The constants are the class list ``classes`` (label -> its position; the model's output
size), per-feature ``feature_mean`` and ``feature_scale`` (or ``standardise = false``: mean 0,
scale 1) and ``feature_clip`` (each standardised value is clipped to [-clip, clip], at most
:data:`MAX_FEATURE_CLIP`, so no record's input can overflow a float32 norm; the DP step
also gives a gradient whose norm is not finite no weight, peer/training/dpsgd.py). They come
from the peer
config's ``[table]`` section, or from the file's metadata: ``# murmur: KEY = VALUE`` lines at
the top of a CSV, arrays of those names in an ``.npz``. A config key wins over the file's.
They are never estimated from the records: :func:`resolve` raises
:class:`TableMetadataError`, saying what to add, when any is missing.

:class:`DataError` lives here, not in ``data.py``, so this module needs nothing from the
loaders that use it; ``data.py`` re-exports it.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from peer.errors import PeerError

log = logging.getLogger(__name__)

DEFAULT_FEATURE_CLIP = 10.0
#: The largest clip bound B allowed. With |x| <= B a record's squared input norm is at most
#: F * B^2 = F * 1e8, 1e14 for a million features: 24 orders of magnitude below float32's
#: largest value (3.4e38), so no input alone can overflow the per-example norms that the
#: DP step computes from sums of squares (docs/privacy.md, "Why clip").
MAX_FEATURE_CLIP = 1e4
MAX_CLASSES = 100_000
#: A CSV metadata line: "# murmur: classes = walk, run, sit".
CSV_META_PREFIX = "# murmur:"
#: Array names an ``.npz`` may hold besides ``x`` and ``y``.
NPZ_META_KEYS = ("classes", "num_classes", "feature_mean", "feature_scale", "standardise",
                 "feature_clip")
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)
_CHUNK_ROWS = 4096  # rows standardised at a time: bounded temporaries for a large table

#: Where the constants go, for the errors: one line each (a ConfigError is one line).
HOW_TO_ADD_CLASSES = (
    'add classes to [table] in the peer config (classes = ["walk", "run"]), or a line '
    '"# murmur: classes = walk, run" at the top of the CSV, or an array "classes" to the '
    '.npz (docs/peer.md, "Tables")')
HOW_TO_ADD_SCALING = (
    "add feature_mean and feature_scale (one per feature, or one number for all) to [table] "
    "in the peer config (feature_mean = [0.0, 12.5], feature_scale = [1.0, 7.5]), or lines "
    '"# murmur: feature_mean = 0.0, 12.5" and "# murmur: feature_scale = 1.0, 7.5" at the top '
    "of the CSV, or arrays of those names to the .npz; or standardise = false to use the "
    'features as stored (docs/peer.md, "Tables")')


class DataError(PeerError):
    """A data file is missing or malformed; the message names the path and the problem."""


class TableMetadataError(DataError):
    """A table lacks a public constant (classes, or feature mean and scale) or has a bad one.

    The message says which keys to add and where; nothing is estimated from the records."""


class UnknownLabelError(DataError):
    """Some record's label is not in the public class list (the load stops: nothing trains)."""


def _text(value: Any) -> str:
    """A label as text: integers and integral floats without a fraction, strings stripped."""
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("utf-8", "replace").strip()
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


@dataclass(frozen=True)
class TableConfig:
    """Public preprocessing constants as given (``[table]``, or a file's metadata); None: not
    given here. ``classes`` are matched to labels as text (1 and "1" are the same class)."""

    classes: tuple[str | int, ...] | None = None
    feature_mean: tuple[float, ...] | None = None
    feature_scale: tuple[float, ...] | None = None
    standardise: bool | None = None
    feature_clip: float | None = None

    def __post_init__(self) -> None:
        if self.classes is not None:
            names = tuple(_text(c) for c in self.classes)
            if not 2 <= len(names) <= MAX_CLASSES:
                raise ValueError(f"classes: need 2..{MAX_CLASSES} classes, got {len(names)}")
            if len(set(names)) != len(names) or "" in names:
                raise ValueError(f"classes: names must be distinct and non-empty, got {names}")
            object.__setattr__(self, "classes", names)
        for name in ("feature_mean", "feature_scale"):
            values = getattr(self, name)
            if values is None:
                continue
            values = tuple(float(v) for v in values)
            if not values or not all(abs(v) <= _FLOAT32_MAX for v in values):
                raise ValueError(f"{name}: need one or more finite float32 numbers")
            object.__setattr__(self, name, values)
        if self.feature_scale is not None and min(self.feature_scale) < _FLOAT32_TINY:
            raise ValueError(f"feature_scale: every scale must be > 0, got "
                             f"{min(self.feature_scale)}")
        if self.feature_clip is not None and not 0 < self.feature_clip <= MAX_FEATURE_CLIP:
            raise ValueError(f"feature_clip: must be in (0, {MAX_FEATURE_CLIP:g}], got "
                             f"{self.feature_clip} (for features in a wider range, give a "
                             "feature_scale that brings them near +-1)")
        if self.standardise is False and (self.feature_mean or self.feature_scale):
            raise ValueError("give standardise = false or feature_mean and feature_scale, "
                             "not both")

    def over(self, base: TableConfig) -> TableConfig:
        """These values where given, ``base``'s elsewhere (config over file metadata)."""
        mine = {f.name: getattr(self, f.name) for f in fields(self)}
        given = {k: v for k, v in mine.items() if v is not None}
        # The scaling is one choice: "as stored" here replaces the file's mean and scale,
        # a mean or scale here replaces the file's "as stored".
        if self.standardise is False:
            given |= {"feature_mean": None, "feature_scale": None}
        elif self.feature_mean is not None or self.feature_scale is not None:
            given.setdefault("standardise", None)
        return replace(base, **given)


@dataclass(frozen=True)
class TablePreprocessing:
    """The resolved constants of one table: fixed before any record is read."""

    classes: tuple[str, ...]
    feature_mean: tuple[float, ...]  # one per feature (flattened record)
    feature_scale: tuple[float, ...]
    feature_clip: float

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_features(self) -> int:
        return len(self.feature_mean)

    def labels(self, raw: np.ndarray, where: str) -> np.ndarray:
        """Each label's position in ``classes`` (int64); UnknownLabelError for any other."""
        if raw.ndim != 1:
            raise DataError(f"{where}: labels must be one value per record, got {raw.shape}")
        values, inverse = np.unique(raw, return_inverse=True)
        index = {name: i for i, name in enumerate(self.classes)}
        table = np.array([index.get(_text(v), -1) for v in values], dtype=np.int64)
        unknown = np.flatnonzero(table < 0)
        if len(unknown):
            first = _text(values[unknown[0]])
            holders = np.isin(inverse, unknown)
            raise UnknownLabelError(
                f"{where}: label {first!r} (record {int(np.argmax(holders)) + 1}; "
                f"{int(holders.sum())} record(s) hold labels outside the list) is not in the "
                f"public class list {_shown(self.classes)}. Add it to classes (every peer of "
                "the network needs the same list) or remove those records")
        return table[inverse.reshape(-1)]

    def features(self, x: np.ndarray, where: str) -> np.ndarray:
        """``x`` (float32, [N, ...], owned by the caller) standardised and clipped in place.

        Each value becomes clip((x - mean) / scale, -clip, clip): a function of that value
        and the public constants only. Non-finite raw values raise DataError naming a record.
        """
        flat = x.reshape(len(x), -1)
        if flat.shape[1] != self.num_features:
            raise DataError(f"{where}: records have {flat.shape[1]} features, the public "
                            f"statistics {self.num_features}")
        mean = np.asarray(self.feature_mean, dtype=np.float32)
        scale = np.asarray(self.feature_scale, dtype=np.float32)
        identity = not mean.any() and bool(np.all(scale == 1))
        clipped = 0
        for start in range(0, len(flat), _CHUNK_ROWS):
            rows = flat[start:start + _CHUNK_ROWS]
            finite = np.isfinite(rows).all(axis=1)
            if not finite.all():
                bad = start + int(np.argmin(finite)) + 1
                raise DataError(f"{where}: record {bad} has a NaN or infinite feature value")
            if not identity:
                with np.errstate(over="ignore"):  # overflow gives +-inf, clipped just below
                    rows -= mean
                    rows /= scale
            clipped += clip_in_place(rows, self.feature_clip)
        if clipped:
            # Local log only: nothing of it leaves the peer.
            log.warning("%s: %d feature value(s) clipped to +-%g; if the features are not "
                        "standardised, set feature_clip to cover their range", where, clipped,
                        self.feature_clip)
        return flat.reshape(x.shape)


def clip_in_place(values: np.ndarray, bound: float) -> int:
    """Clip ``values`` (float32, no NaN) to [-bound, bound] in place; returns how many
    changed. A function of each value and the public bound only."""
    if not 0 < bound <= MAX_FEATURE_CLIP:
        raise ValueError(f"clip bound must be in (0, {MAX_FEATURE_CLIP:g}], got {bound}")
    changed = int(np.count_nonzero(np.abs(values) > bound))
    np.clip(values, -bound, bound, out=values)
    return changed


def _shown(classes: tuple[str, ...], limit: int = 12) -> str:
    """The class list for a message: whole when short, else its ends and its length."""
    if len(classes) <= limit:
        return str(list(classes))
    return f"[{', '.join(map(repr, classes[:3]))}, ..., {classes[-1]!r}] ({len(classes)} classes)"


def _per_feature(values: tuple[float, ...], count: int, key: str, where: str
                 ) -> tuple[float, ...]:
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise TableMetadataError(f"{where}: {key} has {len(values)} values, the table has "
                                 f"{count} features (give one per feature, or one for all)")
    return values


def resolve(given: TableConfig, num_features: int, where: str) -> TablePreprocessing:
    """The complete constants for a table of ``num_features`` features, from public values
    only; TableMetadataError saying what to add when the class list or the scaling is missing.
    """
    if given.classes is None:
        raise TableMetadataError(
            f"{where}: no public class list: the classes (and so the model's output size) "
            f"are never read from the records; {HOW_TO_ADD_CLASSES}")
    if given.standardise is False:
        mean, scale = (0.0,) * num_features, (1.0,) * num_features
    elif given.feature_mean is None or given.feature_scale is None:
        missing = [k for k in ("feature_mean", "feature_scale") if getattr(given, k) is None]
        raise TableMetadataError(
            f"{where}: no public {' and '.join(missing)} for its {num_features} features: "
            f"scaling never uses the records' own statistics; {HOW_TO_ADD_SCALING}")
    else:
        mean = _per_feature(given.feature_mean, num_features, "feature_mean", where)
        scale = _per_feature(given.feature_scale, num_features, "feature_scale", where)
    clip = given.feature_clip if given.feature_clip is not None else DEFAULT_FEATURE_CLIP
    return TablePreprocessing(tuple(str(c) for c in given.classes), mean, scale, clip)


def _meta_error(where: str, detail: str) -> TableMetadataError:
    return TableMetadataError(f"{where}: {detail}")


def _bool_text(text: str, where: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ("true", "false"):
        raise _meta_error(where, f"standardise must be true or false, got {text.strip()!r}")
    return lowered == "true"


def _floats(items: list[str], key: str, where: str) -> tuple[float, ...]:
    try:
        return tuple(float(item) for item in items)
    except ValueError:
        raise _meta_error(where, f"{key} must be numbers, got {items}") from None


def csv_metadata(comment_lines: list[str], where: str) -> TableConfig:
    """The ``# murmur: KEY = VALUE`` lines among a CSV's leading comment lines (others are
    ignored). List values are comma-separated, quoted like CSV fields where needed."""
    found: dict[str, Any] = {}
    for line in comment_lines:
        if not line.startswith(CSV_META_PREFIX):
            continue
        key, sep, value = line[len(CSV_META_PREFIX):].partition("=")
        key = key.strip()
        if not sep or key not in ("classes", "feature_mean", "feature_scale", "standardise",
                                  "feature_clip"):
            raise _meta_error(where, f"bad metadata line {line.strip()!r} (known keys: classes, "
                              "feature_mean, feature_scale, standardise, feature_clip)")
        if key in found:
            raise _meta_error(where, f"{key} given twice")
        items = [item.strip() for item in next(csv.reader([value.strip()],
                                                         skipinitialspace=True), [])]
        if key == "classes":
            found[key] = tuple(items)
        elif key == "standardise":
            found[key] = _bool_text(value, where)
        elif key == "feature_clip":
            found[key] = _floats([value.strip()], key, where)[0]
        else:
            found[key] = _floats(items, key, where)
    try:
        return TableConfig(**found)
    except ValueError as exc:
        raise _meta_error(where, str(exc)) from None


def _scalar(array: np.ndarray, key: str, kinds: str, where: str) -> Any:
    if array.shape != () or array.dtype.kind not in kinds:
        raise _meta_error(where, f"{key} must be a single value, got {array!r}")
    return array.item()


def npz_metadata(arrays: dict[str, np.ndarray], where: str) -> TableConfig:
    """A TableConfig from an ``.npz``'s metadata arrays.

    ``num_classes`` (a prepared split, as ``murmur-peer provision --demo`` writes) means
    classes 0..K-1 and, unless scaling is given too, features as stored.
    """
    found: dict[str, Any] = {}
    if "classes" in arrays:
        classes = arrays["classes"]
        if classes.ndim != 1 or classes.dtype.kind not in "iuUS":
            raise _meta_error(where, "classes must be a 1-D array of integers or strings")
        found["classes"] = tuple(_text(c) for c in classes.tolist())
    if "num_classes" in arrays:
        if "classes" in found:
            raise _meta_error(where, "give classes or num_classes, not both")
        count = _scalar(arrays["num_classes"], "num_classes", "iu", where)
        if not 2 <= count <= MAX_CLASSES:
            raise _meta_error(where, f"num_classes must be in 2..{MAX_CLASSES}, got {count}")
        found["classes"] = tuple(str(i) for i in range(count))
        if not {"feature_mean", "feature_scale", "standardise"} & set(arrays):
            found["standardise"] = False
    for key in ("feature_mean", "feature_scale"):
        if key in arrays:
            if arrays[key].dtype.kind not in "iuf":
                raise _meta_error(where, f"{key} must be numbers")
            found[key] = tuple(float(v) for v in np.ravel(arrays[key]))
    if "standardise" in arrays:
        found["standardise"] = bool(_scalar(arrays["standardise"], "standardise", "b", where))
    if "feature_clip" in arrays:
        found["feature_clip"] = float(_scalar(arrays["feature_clip"], "feature_clip", "iuf",
                                              where))
    try:
        return TableConfig(**found)
    except ValueError as exc:
        raise _meta_error(where, str(exc)) from None
