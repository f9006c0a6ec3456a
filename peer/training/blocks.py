"""Data that keeps coming: an append-only directory of ``.npz`` files, cut into fixed blocks.

A device drops files of records (arrays ``x`` [N, features...] and ``y`` [N]) into one
directory, each written atomically (a temporary name, then a rename). :class:`BlockSource`
groups the files, in name order, into disjoint *blocks*: files that are not yet in a block are
*pending*, and as soon as the pending files (in name order) hold ``min_block_records`` records
they become the next block. Each block then gets its own privacy ledger
(peer/training/block_ledger.py, peer/training/block_schedule.py): by parallel composition a
record's guarantee is its own block's epsilon.

Rules, and why:

* **Ignored names**: names starting with "." or ending in ".tmp" / ".part" (a write in
  progress), and anything that is not a regular file. Other names that do not end in ``.npz``
  are refused (logged once, counted in :attr:`BlockSource.refused`).
* **A formed block is fixed forever**: its identity is every file's name, size and SHA-256,
  recorded in the ledger. Training reads a block's files, checks each digest against that
  record and parses *the bytes it hashed* (never a second read of the path, which a rename
  could have replaced in between), so the records trained on are exactly the records the
  block's epsilon is about. A file of a block that changes or vanishes makes the block
  *refused*: it is retired with the reason logged and persisted, and never trained on again
  (its epsilon stays; deleting the files of a retired block is fine and goes unnoticed).
  Between rounds, :meth:`BlockSource.poll` re-hashes a live block's file only when its
  (inode, size, mtime) changed, and hashes each once after a restart.
* **Refused files** (unreadable, malformed, wrong shape, labels outside 0..K-1, non-finite
  features, or a byte-for-byte duplicate of a file already seen, which would put the same
  records in two blocks) never join a block; each is logged once and counted. A refused file
  that is replaced (a new inode, size or mtime) is examined again. One record can cause a
  refusal, which moves every later block boundary and rate: the privacy claim holds over
  directories whose files are all valid and distinct (docs/privacy.md, "What is assumed
  public: record counts").
* **No standardisation.** Features are used as stored, apart from a clip to
  [-``feature_clip``, ``feature_clip``] (10 by default, as a table's; at most
  ``tables.MAX_FEATURE_CLIP``), and labels must already be the class numbers 0..K-1, K fixed
  by the public ``evaluate`` source. Each record's input then depends on that record and
  public constants alone, as the privacy argument needs, and no input can overflow a
  per-example norm (docs/privacy.md, "Preprocessing: public constants only", "Why clip").
  The device should scale features by fixed public constants (as pixels / 255); with a
  table as ``evaluate``, by the same ``[table]`` constants, which are not applied here.
  This is also why blocks have their own checks (:func:`parse_block_file`) around the shared
  archive reader ``data.read_npz_arrays``, fed with the bytes that were hashed, not the path.
* **Bounded memory**: examining a pending file holds that one file; loading a block holds the
  block plus one file. The source keeps only names, stat keys and digests.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from peer.training.block_ledger import BlockFile, BlockLedgers
from peer.training.data import DataError, Dataset, read_npz_arrays
from peer.training.tables import DEFAULT_FEATURE_CLIP, MAX_FEATURE_CLIP, clip_in_place

__all__ = [
    "BlockChangedError",
    "BlockSource",
    "BlockStatus",
    "FormedBlock",
    "SourceNotBoundError",
    "SourcePoll",
    "open_block_source",
    "template_dataset",
]

log = logging.getLogger(__name__)

DATA_SUFFIX = ".npz"
IGNORED_SUFFIXES = (".tmp", ".part")
_HASH_CHUNK = 1 << 20
#: (inode, size, mtime in ns): a file with the same key was not replaced or rewritten.
_StatKey = tuple[int, int, int]


class BlockChangedError(DataError):
    """A file of a formed block changed or vanished: the block is refused for training."""


class SourceNotBoundError(DataError):
    """A block was loaded before :meth:`BlockSource.bind` fixed the record shape and the
    class count: K must come from the public ``evaluate`` source, never from the labels."""


@dataclass(frozen=True)
class BlockStatus:
    """One block as the status shows it; ``reason`` says why a retired block stopped."""

    block_id: int
    records: int
    epsilon: float
    steps: int
    retired: bool
    reason: str | None = None


@dataclass(frozen=True)
class FormedBlock:
    """A block the source just formed (the trainer adds it to its ledgers)."""

    block_id: int
    files: tuple[BlockFile, ...]
    records: int


@dataclass(frozen=True)
class SourcePoll:
    """What one poll found: new blocks, and live blocks whose files changed (id -> why)."""

    new_blocks: list[FormedBlock]
    changed: dict[int, str]


@dataclass(frozen=True)
class _Examined:
    """A pending file as last examined: its stat key, and its records + digest or the error."""

    key: _StatKey
    size: int = 0
    records: int = 0
    sha256: str = ""
    error: str | None = None


def _stat_key(st: os.stat_result) -> _StatKey:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def parse_block_file(where: str, data: bytes, input_shape: tuple[int, ...] | None,
                     num_classes: int | None, feature_clip: float = DEFAULT_FEATURE_CLIP
                     ) -> tuple[np.ndarray, np.ndarray, int]:
    """(x float32 clipped to +-``feature_clip``, y int64, how many values the clip changed)
    from the bytes of one ``.npz``; DataError naming ``where``."""
    x, y, _declared = read_npz_arrays(io.BytesIO(data), where)
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        raise DataError(f"{where}: need x [N, features...] and y [N], N >= 1; got {x.shape} "
                        f"and {y.shape}")
    if not np.issubdtype(x.dtype, np.integer) and not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where}: x has non-numeric dtype {x.dtype}")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise DataError(f"{where}: records of shape {x.shape[1:]}, the model takes "
                        f"{tuple(input_shape)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: labels must be integer class numbers, got {y.dtype}")
    if int(y.min()) < 0 or (num_classes is not None and int(y.max()) >= num_classes):
        raise DataError(f"{where}: labels {int(y.min())}..{int(y.max())} outside "
                        f"0..{(num_classes or 0) - 1}")
    features = x.astype(np.float32)
    if not np.all(np.isfinite(features)):
        raise DataError(f"{where}: features contain NaN or infinite values")
    clipped = clip_in_place(features, feature_clip)
    return features, y.astype(np.int64), clipped


def template_dataset(input_shape: tuple[int, ...], num_classes: int, name: str = "blocks"
                     ) -> Dataset:
    """A record-less Dataset that only says the input shape and class count (the trainer's
    ``train`` argument when every record comes from a source)."""
    return Dataset(x=np.zeros((0, *input_shape), np.float32), y=np.zeros(0, np.int64),
                   num_classes=num_classes, name=name)


class BlockSource:
    """The append-only block directory; see the module docstring for the rules.

    Not thread-safe: the trainer polls and loads under its own lock.
    """

    def __init__(self, directory: Path, min_block_records: int,
                 feature_clip: float = DEFAULT_FEATURE_CLIP) -> None:
        if min_block_records < 1:
            raise ValueError(f"min_block_records must be >= 1, got {min_block_records}")
        if not 0 < feature_clip <= MAX_FEATURE_CLIP:
            raise ValueError(f"feature_clip must be in (0, {MAX_FEATURE_CLIP:g}], got "
                             f"{feature_clip}")
        self.directory = Path(directory)
        self.min_block_records = min_block_records
        self.feature_clip = float(feature_clip)
        self.input_shape: tuple[int, ...] | None = None
        self.num_classes: int | None = None
        #: Refused file name -> why (each logged once); ``refusals`` counts every refusal.
        self.refused: dict[str, str] = {}
        self.refusals = 0
        #: Records and files waiting for ``min_block_records`` after the last poll.
        self.pending_records = 0
        self.pending_files = 0
        self._examined: dict[str, _Examined] = {}
        self._verified: dict[str, _StatKey] = {}

    def bind(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        """Fix the record shape and class count every file must have (the trainer's model)."""
        shape = tuple(int(d) for d in input_shape)
        if self.input_shape is not None and (shape, num_classes) != (
                self.input_shape, self.num_classes):
            raise ValueError(f"{self.directory}: source already bound to {self.input_shape}, "
                             f"{self.num_classes} classes")
        self.input_shape, self.num_classes = shape, int(num_classes)

    def template(self, num_classes: int) -> Dataset:
        """A record-less Dataset with the shape of the first readable ``.npz`` (name order)."""
        for name, _st in sorted(self._visible().items()):
            if name.endswith(DATA_SUFFIX):
                try:
                    x, _y, _clipped = parse_block_file(
                        str(self.directory / name), (self.directory / name).read_bytes(), None,
                        num_classes, self.feature_clip)
                except (OSError, DataError):
                    continue
                return template_dataset(tuple(x.shape[1:]), num_classes, self.directory.name)
        raise DataError(f"{self.directory}: no readable .npz file yet, so the record shape "
                        "is unknown")

    # ------------------------------------------------------------------------- polling
    def poll(self, ledgers: BlockLedgers) -> SourcePoll:
        """Check the live blocks' files (stat; hash only if the stat changed) and form new
        blocks from pending files. Pure with respect to ``ledgers`` (the caller adds)."""
        visible = self._visible()
        changed: dict[int, str] = {}
        for entry in ledgers:
            if entry.retired is not None:
                continue  # never trained again: its files may go (retention) unnoticed
            for block_file in entry.files:
                problem = self._check(block_file, visible.get(block_file.name))
                if problem is not None:
                    changed[entry.block_id] = problem
                    break
        return SourcePoll(self._form(ledgers, visible), changed)

    def _visible(self) -> dict[str, os.stat_result]:
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError as exc:
            raise DataError(f"{self.directory}: block directory not found") from exc
        except NotADirectoryError as exc:
            raise DataError(f"{self.directory}: not a directory") from exc
        found: dict[str, os.stat_result] = {}
        for entry in entries:
            if entry.name.startswith(".") or entry.name.endswith(IGNORED_SUFFIXES):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue  # renamed away while we looked
            if stat.S_ISREG(st.st_mode):
                found[entry.name] = st
        return found

    def _check(self, block_file: BlockFile, st: os.stat_result | None) -> str | None:
        """None if ``block_file`` still has its recorded bytes, else why not."""
        if st is None:
            return f"{block_file.name} vanished"
        key = _stat_key(st)
        if self._verified.get(block_file.name) == key:
            return None
        if st.st_size != block_file.size:
            return f"{block_file.name} changed size ({block_file.size} -> {st.st_size} bytes)"
        try:
            digest = _file_sha256(self.directory / block_file.name)
        except OSError as exc:
            return f"{block_file.name} unreadable ({exc})"
        if digest != block_file.sha256:
            return f"{block_file.name} changed (SHA-256 differs)"
        self._verified[block_file.name] = key
        return None

    def _form(self, ledgers: BlockLedgers, visible: dict[str, os.stat_result]
              ) -> list[FormedBlock]:
        taken = {f.name for entry in ledgers for f in entry.files}
        seen_digests = ledgers.digests()
        pending: list[tuple[str, _Examined]] = []
        for name in sorted(visible):
            if name in taken:
                continue
            key = _stat_key(visible[name])
            if not name.endswith(DATA_SUFFIX):
                self._refuse(name, f"not a {DATA_SUFFIX} file")
                continue
            examined = self._examined.get(name)
            if examined is None or examined.key != key:
                examined = self._examine(name, key)
                self._examined[name] = examined
            if examined.error is not None:
                self._refuse(name, examined.error)
            elif examined.sha256 in seen_digests:
                self._refuse(name, "byte-for-byte duplicate of a file already seen")
            else:
                seen_digests.add(examined.sha256)
                self.refused.pop(name, None)
                pending.append((name, examined))
        for name in [n for n in self._examined if n not in visible or n in taken]:
            del self._examined[name]  # forget what is gone (bounded by the directory)
        for name in [n for n in self.refused if n not in visible]:
            del self.refused[name]
        formed: list[FormedBlock] = []
        group: list[BlockFile] = []
        records, next_id = 0, ledgers.next_id
        for name, examined in pending:
            group.append(BlockFile(name, examined.size, examined.sha256))
            records += examined.records
            if records >= self.min_block_records:
                formed.append(FormedBlock(next_id, tuple(group), records))
                for block_file in group:
                    self._verified[block_file.name] = self._examined.pop(block_file.name).key
                next_id, group, records = next_id + 1, [], 0
        self.pending_records, self.pending_files = records, len(group)
        for block in formed:
            log.info("block %d formed: %d records in %d files", block.block_id, block.records,
                     len(block.files))
        return formed

    def _examine(self, name: str, key: _StatKey) -> _Examined:
        path = self.directory / name
        try:
            data = path.read_bytes()
            x, _y, clipped = parse_block_file(str(path), data, self.input_shape,
                                              self.num_classes, self.feature_clip)
        except (OSError, DataError) as exc:
            return _Examined(key, error=str(exc))
        if clipped:  # local log only, once per examined file
            log.warning("%s: %d feature value(s) clipped to +-%g; write features scaled near "
                        "+-1", path, clipped, self.feature_clip)
        return _Examined(key, len(data), len(x), hashlib.sha256(data).hexdigest())

    def _refuse(self, name: str, reason: str) -> None:
        if self.refused.get(name) != reason:
            self.refused[name] = reason
            self.refusals += 1
            log.warning("%s: file %s refused: %s", self.directory, name, reason)

    # ------------------------------------------------------------------------- loading
    def load(self, block_id: int, files: tuple[BlockFile, ...], records: int) -> Dataset:
        """The block's records, read from bytes whose SHA-256 matches the recorded identity.

        Raises BlockChangedError if any file vanished, changed, or no longer parses, and
        SourceNotBoundError before :meth:`bind`.
        """
        if self.input_shape is None or self.num_classes is None:
            raise SourceNotBoundError(f"{self.directory}: block {block_id} loaded before the "
                                      "source was bound to the model's input shape and classes")
        x: np.ndarray | None = None
        y = np.empty(records, np.int64)
        offset = 0
        for block_file in files:
            path = self.directory / block_file.name
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise BlockChangedError(f"{path}: cannot read ({exc})") from exc
            if len(data) != block_file.size or (
                    hashlib.sha256(data).hexdigest() != block_file.sha256):
                raise BlockChangedError(f"{path}: changed since block {block_id} was formed")
            try:
                fx, fy, _clipped = parse_block_file(str(path), data, self.input_shape,
                                                    self.num_classes, self.feature_clip)
            except DataError as exc:
                raise BlockChangedError(str(exc)) from exc
            if offset + len(fy) > records:
                raise BlockChangedError(f"{path}: block {block_id} holds more records than "
                                        f"the {records} recorded")
            if x is None:
                x = np.empty((records, *fx.shape[1:]), np.float32)
            x[offset : offset + len(fy)] = fx
            y[offset : offset + len(fy)] = fy
            offset += len(fy)
        if x is None or offset != records:
            raise BlockChangedError(f"block {block_id}: {offset} records, {records} recorded")
        return Dataset(x=x, y=y, num_classes=self.num_classes,
                       name=f"{self.directory.name}/block-{block_id}")


def open_block_source(directory: Path, min_block_records: int,
                      feature_clip: float = DEFAULT_FEATURE_CLIP) -> BlockSource:
    """A :class:`BlockSource` over an existing directory (DataError if it is not one)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: block directory not found (or not a directory)")
    return BlockSource(directory, min_block_records, feature_clip)
