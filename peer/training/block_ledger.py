"""One privacy ledger per block of records: the container the trainer persists as ledger.json.

A peer whose data keeps coming trains on disjoint *blocks* of records (peer/training/blocks.py).
Each block has its own :class:`~peer.training.ledger.PrivacyLedger`: by parallel composition a
record's guarantee is its own block's epsilon, and the peer's worst-case figure is the largest
epsilon of any block. :class:`BlockLedgers` holds those ledgers with each block's identity (its
files' names, sizes and SHA-256 digests) and why it stopped training, if it did.

Security properties:

* Persistence is one atomic, fsynced file (``ledger.json``), written by the trainer before any
  update derived from a step leaves it, exactly as for a single ledger; every block's epsilon
  and identity are in that one file, so a SIGKILL can never leave them disagreeing.
* A block's identity is fixed when it is formed and never rewritten; a block that stopped
  (``retired``) stays stopped: it is never offered for training again, so its epsilon never
  grows.
* File formats: a peer with one static training set and nothing retired writes format 1,
  byte for byte the file a single :class:`PrivacyLedger` writes; anything else writes
  format 2. Both load; a format-1 file becomes the static block (id 0).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from peer.files import atomic_write_bytes
from peer.training.ledger import LEDGER_FORMAT, LedgerError, PrivacyLedger, read_text

BLOCKS_FORMAT = 2
#: The id of the trainer's own (static) training set; blocks from a source count from 1.
STATIC_BLOCK = 0
#: Why a block stopped. Budget: its ledger cannot afford another round. Changed / vanished:
#: a file of the block no longer has the recorded digest, or is gone (never retrained on).
RETIRED_BUDGET = "budget"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class BlockFile:
    """One file of a block as it was when the block was formed."""

    name: str
    size: int
    sha256: str  # hex digest of the file's bytes


@dataclass
class BlockEntry:
    """One block: its identity, its ledger, and why it stopped training (None: it has not)."""

    block_id: int
    records: int
    files: tuple[BlockFile, ...]
    ledger: PrivacyLedger
    retired: str | None = None

    def to_body(self) -> dict[str, object]:
        ledger = asdict(self.ledger)
        ledger["format"] = LEDGER_FORMAT
        return {
            "id": self.block_id,
            "records": self.records,
            "files": [asdict(f) for f in self.files],
            "retired": self.retired,
            "ledger": ledger,
        }

    @classmethod
    def from_body(cls, body: object, source: str) -> BlockEntry:
        if not isinstance(body, dict) or set(body) != {"id", "records", "files", "retired",
                                                        "ledger"}:
            raise LedgerError(f"{source}: malformed block entry")
        block_id, records, retired = body["id"], body["records"], body["retired"]
        if not (isinstance(block_id, int) and block_id >= 0 and isinstance(records, int)
                and records >= 0 and (retired is None or isinstance(retired, str))):
            raise LedgerError(f"{source}: block entry with bad id, records or retired field")
        where = f"{source} block {block_id}"
        files = body["files"]
        if not isinstance(files, list):
            raise LedgerError(f"{where}: files must be a list")
        return cls(block_id, records, tuple(_file_from_body(f, where) for f in files),
                   PrivacyLedger.from_body(body["ledger"], where), retired)


def _file_from_body(body: object, where: str) -> BlockFile:
    if not isinstance(body, dict) or set(body) != {"name", "size", "sha256"}:
        raise LedgerError(f"{where}: malformed file entry")
    name, size, digest = body["name"], body["size"], body["sha256"]
    if not (isinstance(name, str) and name and "/" not in name and isinstance(size, int)
            and size >= 0 and isinstance(digest, str) and _SHA256.fullmatch(digest)):
        raise LedgerError(f"{where}: file entry with bad name, size or sha256")
    return BlockFile(name, size, digest)


@dataclass
class BlockLedgers:
    """Every block's ledger, in block-id order; see the module docstring."""

    entries: list[BlockEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        ids = [e.block_id for e in self.entries]
        if ids != sorted(set(ids)):
            raise LedgerError(f"block ids must be unique and ascending, got {ids}")
        names = [f.name for e in self.entries for f in e.files]
        if len(names) != len(set(names)):
            raise LedgerError("a file belongs to two blocks")
        if len({e.ledger.delta for e in self.entries}) > 1:
            raise LedgerError("blocks were kept at different deltas")

    def __iter__(self) -> Iterator[BlockEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, block_id: int) -> BlockEntry | None:
        return next((e for e in self.entries if e.block_id == block_id), None)

    def add(self, entry: BlockEntry) -> None:
        """Append a newly formed block (its id must be the largest so far)."""
        self.entries.append(entry)
        try:
            self.__post_init__()
        except LedgerError:
            self.entries.pop()
            raise

    @property
    def next_id(self) -> int:
        """The id the next block from a source gets (ids are never reused)."""
        return max((e.block_id for e in self.entries), default=STATIC_BLOCK) + 1

    @property
    def steps(self) -> int:
        return sum(e.ledger.steps for e in self.entries)

    @property
    def epsilon(self) -> float:
        """The worst record's epsilon: the largest of any block (0 before any step)."""
        return max((e.ledger.epsilon for e in self.entries), default=0.0)

    def digests(self) -> set[str]:
        """SHA-256 of every file of every block (a file with one of these is a duplicate)."""
        return {f.sha256 for e in self.entries for f in e.files}

    def is_single_static(self) -> bool:
        """Whether format 1 (one :class:`PrivacyLedger`) says everything there is to say."""
        return (len(self.entries) == 1 and self.entries[0].block_id == STATIC_BLOCK
                and not self.entries[0].files and self.entries[0].retired is None)

    def to_json(self) -> str:
        if self.is_single_static():
            return self.entries[0].ledger.to_json()
        body = {"format": BLOCKS_FORMAT, "blocks": [e.to_body() for e in self.entries]}
        return json.dumps(body, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "ledger", static_records: int = 0
                  ) -> BlockLedgers:
        """Format 2, or a format-1 single ledger as the static block of ``static_records``."""
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LedgerError(f"{source}: not valid JSON ({exc})") from exc
        if isinstance(body, dict) and body.get("format") == LEDGER_FORMAT:
            ledger = PrivacyLedger.from_body(body, source)
            return cls([BlockEntry(STATIC_BLOCK, static_records, (), ledger)])
        if not isinstance(body, dict) or body.get("format") != BLOCKS_FORMAT or set(body) != {
                "format", "blocks"} or not isinstance(body["blocks"], list):
            raise LedgerError(f"{source}: not a Murmur privacy ledger (format "
                              f"{LEDGER_FORMAT} or {BLOCKS_FORMAT})")
        entries = [BlockEntry.from_body(b, source) for b in body["blocks"]]
        try:
            return cls(entries)
        except LedgerError as exc:  # the container's own checks do not name the file
            raise LedgerError(f"{source}: {exc}") from exc

    def save(self, path: Path) -> None:
        """Atomic, durable write (tmp file + fsync + rename + directory fsync)."""
        atomic_write_bytes(Path(path), self.to_json().encode())

    @classmethod
    def load(cls, path: Path, static_records: int = 0) -> BlockLedgers:
        return cls.from_json(read_text(path), str(path), static_records)


def newest_ledgers(ledger_path: Path, in_checkpoint: BlockLedgers | None, static_records: int,
                   checkpoint_path: Path) -> BlockLedgers | None:
    """What a restarting trainer continues from: the ledger file, or the checkpoint's copy if
    that has more steps (it never should: the file is written first). None: a fresh start.

    Raises LedgerError if there is a checkpoint but no ledger file: falling back to the
    checkpoint's copy could under-count (it may be older), so the trainer refuses to start.
    """
    if not Path(ledger_path).exists():
        if in_checkpoint is None:
            return None
        raise LedgerError(
            f"{ledger_path}: ledger missing next to {checkpoint_path}; refusing to start rather "
            "than under-count epsilon (restore the ledger file, or start from an empty state "
            "directory deliberately)")
    on_disk = BlockLedgers.load(ledger_path, static_records)
    if in_checkpoint is None or on_disk.steps >= in_checkpoint.steps:
        return on_disk
    return in_checkpoint
