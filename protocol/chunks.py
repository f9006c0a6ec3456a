"""Chunked wire messages: split a signed message to fit a size limit, reassemble it in
bounded memory. docs/protocol.md section 11 is the normative description.

A peer configured with ``max_message_bytes`` (default 256 KiB, so that EMQX, RabbitMQ and most
cloud brokers carry every payload) sends a larger message as CHUNK messages
(:class:`protocol.messages.Chunk`). Each chunk is a complete signed envelope of its own, from
the same sender, on the same topic and with the same session id as the inner message, with a
fresh sequence number.

Security properties:

* **No new exposure.** The inner message is the complete signed wire message, sealed where its
  content is private; a chunk carries a slice of those bytes and nothing else.
* **Nothing unauthenticated is buffered.** The receiver runs a chunk through every inbound
  check (known sender, signature, replay window) *before* :meth:`ChunkReassembler.add`, so a
  stranger cannot make a peer hold a byte, and a replayed chunk is dropped like any replay.
* **Bounded memory, shared fairly.** :class:`ChunkReassembler` holds at most
  ``max_buffered_bytes`` (T) of chunk data in all, ``max_sender_bytes`` (S) and
  ``max_partial_per_sender`` unfinished messages per sender, refuses at once a message longer
  than S (it could never complete), and forgets an unfinished message ``max_age_s`` after its
  first chunk. When a chunk does not fit T, the sender holding the most bytes among the others
  loses its oldest unfinished message (``chunk_evicted``), but only while it holds more than
  the newcomer would; otherwise the chunk is refused (``chunk_overflow``). With n senders
  holding chunks, a sender is therefore never refused room, nor evicted, for what it holds
  within T / n: k flooding senders cannot crowd out the others as long as
  T >= (k + others) x S (:meth:`ReassemblyLimits.for_sessions`, docs/protocol.md section 11).
* **Every bad chunk is a counted drop.** :class:`ChunkError` names the reason
  (:data:`DROP_REASONS`); the first chunk of a message fixes its count, size, digest, topic and
  session, and the reassembled bytes must hash to the digest.

Pure: no asyncio, no MQTT, no crypto (signing is the caller's ``sign`` callback); time is
passed in as ``now``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from protocol.codec import encode_message
from protocol.errors import ProtocolError, SizeLimitError
from protocol.fields import chunk_span
from protocol.limits import (
    CHUNK_DIGEST_BYTES,
    CHUNK_OVERHEAD_BYTES,
    FLOOD_SENDERS,
    MAX_PAYLOAD_BYTES,
    MIN_MESSAGE_BYTES_LIMIT,
    session_message_bound,
)
from protocol.messages import PROTOCOL_VERSION, Chunk, Header, Kind

__all__ = [
    "DROP_REASONS",
    "ChunkError",
    "ChunkReassembler",
    "ReassemblyLimits",
    "check_max_message_bytes",
    "encode_chunked",
    "split_wire",
    "wire_digest",
]

#: Drop reasons, one per way a chunk is refused (the node counts them in status().drops).
CHUNK_INCONSISTENT: Final = "chunk_inconsistent"  # disagrees with the message's first chunk
CHUNK_DUPLICATE: Final = "chunk_duplicate"  # this index of this message is already held
CHUNK_OVERFLOW: Final = "chunk_overflow"  # would exceed a memory bound
CHUNK_EVICTED: Final = "chunk_evicted"  # the largest sender's oldest message made room
CHUNK_EXPIRED: Final = "chunk_expired"  # an unfinished message outlived max_age_s
CHUNK_DIGEST: Final = "chunk_digest"  # the reassembled bytes do not hash to the digest
DROP_REASONS: Final = (CHUNK_INCONSISTENT, CHUNK_DUPLICATE, CHUNK_OVERFLOW, CHUNK_EVICTED,
                       CHUNK_EXPIRED, CHUNK_DIGEST)


class ChunkError(ProtocolError):
    """A chunk refused by the reassembler; ``drop_reason`` is one of :data:`DROP_REASONS`."""

    code = "chunk"

    def __init__(self, drop_reason: str, message: str) -> None:
        super().__init__(message, "chunk")
        self.drop_reason = drop_reason


def wire_digest(wire: bytes) -> bytes:
    """BLAKE2b-256 of a whole wire message: what CHUNK.digest names."""
    return hashlib.blake2b(wire, digest_size=CHUNK_DIGEST_BYTES).digest()


def check_max_message_bytes(value: int) -> int:
    """``value`` if it is a usable maximum message size, else ValueError.

    At least MIN_MESSAGE_BYTES_LIMIT (so every chunk carries at least MIN_CHUNK_DATA_BYTES, as
    receivers require) and at most MAX_PAYLOAD_BYTES (what any receiver accepts whole).
    """
    if type(value) is not int or not MIN_MESSAGE_BYTES_LIMIT <= value <= MAX_PAYLOAD_BYTES:
        raise ValueError(f"max_message_bytes must be an integer in {MIN_MESSAGE_BYTES_LIMIT}.."
                         f"{MAX_PAYLOAD_BYTES} (got {value!r})")
    return value


def split_wire(wire: bytes, max_message_bytes: int) -> list[Chunk]:
    """The CHUNK bodies of ``wire``, in order, each of whose signed envelope fits
    ``max_message_bytes`` (at most ``max_message_bytes - CHUNK_OVERHEAD_BYTES`` data bytes,
    split evenly by :func:`protocol.fields.chunk_span`).

    ValueError if ``wire`` fits whole (send it as it is), is larger than MAX_PAYLOAD_BYTES, or
    the limit is unusable (:func:`check_max_message_bytes`).
    """
    check_max_message_bytes(max_message_bytes)
    total = len(wire)
    if total <= max_message_bytes:
        raise ValueError(f"{total} bytes fit max_message_bytes={max_message_bytes}: no chunks")
    if total > MAX_PAYLOAD_BYTES:
        raise ValueError(f"{total} bytes exceed MAX_PAYLOAD_BYTES={MAX_PAYLOAD_BYTES}")
    per_chunk = max_message_bytes - CHUNK_OVERHEAD_BYTES
    count = -(-total // per_chunk)
    digest = wire_digest(wire)
    view = memoryview(wire)
    chunks = []
    for index in range(count):
        start, end = chunk_span(index, count, total)
        chunks.append(Chunk(digest, index, count, total, bytes(view[start:end])))
    return chunks


def encode_chunked(
    wire: bytes,
    *,
    max_message_bytes: int,
    network: str,
    sender: str,
    session: bytes,
    sign: Callable[[bytes], bytes],
    next_seq: Callable[[], int],
) -> list[bytes]:
    """What to publish for the signed message ``wire``: ``[wire]`` when it fits
    ``max_message_bytes``, else its CHUNK envelopes in order, each signed with ``sign`` under a
    fresh ``next_seq()`` and the inner message's ``session`` (16 bytes: only session messages
    are ever chunked). Every returned payload is at most ``max_message_bytes`` long.
    """
    if len(wire) <= max_message_bytes:
        return [wire]
    payloads = []
    for body in split_wire(wire, max_message_bytes):
        header = Header(PROTOCOL_VERSION, network, Kind.CHUNK, sender, session, next_seq())
        payload = encode_message(header, body, sign)
        if len(payload) > max_message_bytes:  # CHUNK_OVERHEAD_BYTES is an upper bound
            raise SizeLimitError(f"chunk of {len(payload)} bytes exceeds {max_message_bytes}",
                                 "chunk")
        payloads.append(payload)
    return payloads


# -------------------------------------------------------------------------------- receiving
@dataclass(frozen=True)
class ReassemblyLimits:
    """Memory bounds of a :class:`ChunkReassembler`.

    ``max_buffered_bytes`` (T): chunk data held in all; ``max_sender_bytes`` (S): held for one
    sender, which is also the longest message accepted; ``max_partial_per_sender``: unfinished
    messages per sender (an honest sender completes one message per topic before the next, so
    a few suffice); ``max_age_s``: an unfinished message is forgotten this long after its first
    chunk (a hard bound: a sender cannot keep a message alive by trickling chunks).

    The defaults suit a receiver that does not know its model (S one maximal message, T two);
    a peer uses :meth:`for_sessions`.
    """

    max_buffered_bytes: int = 2 * MAX_PAYLOAD_BYTES
    max_sender_bytes: int = MAX_PAYLOAD_BYTES
    max_partial_per_sender: int = 4
    max_age_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.max_sender_bytes <= self.max_buffered_bytes:
            raise ValueError("need 0 < max_sender_bytes <= max_buffered_bytes")
        if self.max_partial_per_sender < 1 or not self.max_age_s > 0:
            raise ValueError("need max_partial_per_sender >= 1 and max_age_s > 0")

    @classmethod
    def for_sessions(cls, param_count: int, group_size: int,
                     flood_senders: int = FLOOD_SENDERS) -> ReassemblyLimits:
        """What a peer of a ``param_count``-parameter model in groups of ``group_size`` needs:
        S = the largest honest session message (:func:`protocol.limits.session_message_bound`)
        and T = (g - 1 + flood_senders) x S, so the g - 1 other members of its session each
        complete one message while ``flood_senders`` more senders hold all they can."""
        if group_size < 2 or flood_senders < 0:
            raise ValueError("need group_size >= 2 and flood_senders >= 0")
        per_sender = session_message_bound(param_count)
        return cls(max_buffered_bytes=(group_size - 1 + flood_senders) * per_sender,
                   max_sender_bytes=per_sender)


@dataclass
class _Unfinished:
    """One message being reassembled; its first chunk fixed everything but ``parts``."""

    topic: str
    session: bytes
    count: int
    total_bytes: int
    started_at: float
    parts: dict[int, bytes] = field(default_factory=dict)
    held: int = 0  # data bytes in parts


class ChunkReassembler:
    """Collects authenticated chunks per (sender, digest) and returns each message once it is
    whole. Owned by one event loop (not thread-safe); see the module docstring for its bounds.
    """

    def __init__(self, limits: ReassemblyLimits | None = None) -> None:
        self.limits = limits or ReassemblyLimits()
        self._unfinished: dict[tuple[str, bytes], _Unfinished] = {}
        self._sender_bytes: dict[str, int] = {}
        self._sender_partials: dict[str, int] = {}
        self.buffered_bytes = 0
        self.evicted_total = 0  # unfinished messages evicted to make room (chunk_evicted)
        self._evicted_untaken = 0

    def __len__(self) -> int:
        """Unfinished messages held."""
        return len(self._unfinished)

    def held_by(self, sender: str) -> tuple[int, int]:
        """(unfinished messages, data bytes) held for ``sender``."""
        return self._sender_partials.get(sender, 0), self._sender_bytes.get(sender, 0)

    def take_evicted(self) -> int:
        """Messages evicted since the last call (each is one ``chunk_evicted`` drop)."""
        taken, self._evicted_untaken = self._evicted_untaken, 0
        return taken

    def add(self, sender: str, topic: str, session: bytes, chunk: Chunk,
            now: float) -> bytes | None:
        """Hold one chunk that already passed the inbound checks (sender known, signature,
        replay window). Returns the inner wire message when this chunk completes it (its digest
        verified), else None; ChunkError when the chunk is refused. A refused chunk leaves
        the rest of its message held, except on overflow and digest mismatch, which drop the
        whole message (it can no longer complete). Room for the chunk may cost another
        sender its oldest unfinished message (module docstring; :meth:`take_evicted`).
        """
        key = (sender, chunk.digest)
        entry = self._unfinished.get(key)
        limits = self.limits
        if entry is None:
            if chunk.total_bytes > limits.max_sender_bytes:
                raise ChunkError(CHUNK_OVERFLOW, f"a message of {chunk.total_bytes} bytes "
                                 f"exceeds the {limits.max_sender_bytes} one sender may hold")
            if self._sender_partials.get(sender, 0) >= limits.max_partial_per_sender:
                raise ChunkError(CHUNK_OVERFLOW, f"{sender} already has "
                                 f"{limits.max_partial_per_sender} unfinished messages")
            entry = _Unfinished(topic, session, chunk.count, chunk.total_bytes, now)
        elif (topic, session, chunk.count, chunk.total_bytes) != (
                entry.topic, entry.session, entry.count, entry.total_bytes):
            raise ChunkError(CHUNK_INCONSISTENT, "count, size, topic or session differ from "
                             "the message's first chunk")
        elif chunk.index in entry.parts:
            raise ChunkError(CHUNK_DUPLICATE, f"index {chunk.index} of {chunk.count} again")
        size = len(chunk.data)
        if (self._sender_bytes.get(sender, 0) + size > limits.max_sender_bytes
                or not self._make_room(sender, size)):
            held = self.buffered_bytes
            self._forget(key)
            raise ChunkError(CHUNK_OVERFLOW, f"{size} more bytes do not fit ({held} held)")
        if key not in self._unfinished:
            self._unfinished[key] = entry
            self._sender_partials[sender] = self._sender_partials.get(sender, 0) + 1
        entry.parts[chunk.index] = chunk.data
        entry.held += size
        self.buffered_bytes += size
        self._sender_bytes[sender] = self._sender_bytes.get(sender, 0) + size
        if len(entry.parts) < entry.count:
            return None
        self._forget(key)
        wire = b"".join(entry.parts[i] for i in range(entry.count))
        if wire_digest(wire) != chunk.digest:
            raise ChunkError(CHUNK_DIGEST, "reassembled bytes do not match the digest")
        return wire

    def expire(self, now: float) -> int:
        """Forget every unfinished message older than ``max_age_s``; returns how many (each is
        one ``chunk_expired`` drop)."""
        old = [key for key, entry in self._unfinished.items()
               if now - entry.started_at > self.limits.max_age_s]
        for key in old:
            self._forget(key)
        return len(old)

    def _make_room(self, sender: str, size: int) -> bool:
        """Evict until ``size`` more bytes of ``sender`` fit the total: each time the oldest
        unfinished message of the other sender holding the most, as long as that one holds
        more than ``sender`` would with the chunk. False when the chunk cannot fit.

        Why this is fair: if every other sender held at most what ``sender`` would, the n
        senders would hold at most n times that, so a sender staying within T / n always
        finds a larger one to evict, and is itself never the one evicted.
        """
        while self.buffered_bytes + size > self.limits.max_buffered_bytes:
            mine = self._sender_bytes.get(sender, 0) + size
            others = [s for s in self._sender_bytes if s != sender]
            largest = max(others, key=self._sender_bytes.__getitem__, default=None)
            if largest is None or self._sender_bytes[largest] <= mine:
                return False
            oldest = min((k for k in self._unfinished if k[0] == largest),
                         key=lambda k: self._unfinished[k].started_at)
            self._forget(oldest)
            self.evicted_total += 1
            self._evicted_untaken += 1
        return True

    def _forget(self, key: tuple[str, bytes]) -> None:
        entry = self._unfinished.pop(key, None)
        if entry is None:
            return
        sender = key[0]
        self.buffered_bytes -= entry.held
        left_bytes = self._sender_bytes[sender] - entry.held
        left_partials = self._sender_partials[sender] - 1
        if left_partials:
            self._sender_bytes[sender] = left_bytes
            self._sender_partials[sender] = left_partials
        else:
            del self._sender_bytes[sender], self._sender_partials[sender]
