"""Hard limits and identifier rules of the Murmur wire format, written down once.

Every limit here is enforced by the decoder *before* the value is used, so a hostile peer
cannot make a receiver allocate more than about ``MAX_PAYLOAD_BYTES`` per message or
build an object outside these ranges. docs/protocol.md restates each one.
"""

from __future__ import annotations

import re
from typing import Final

#: Largest accepted wire message (the whole MQTT payload), checked before unpacking.
MAX_PAYLOAD_BYTES: Final = 8 * 1024 * 1024

#: Largest number of indices / coordinates in one index array.
MAX_VECTOR_LEN: Final = 1 << 22

#: Largest aggregation group (members of a session).
MAX_MEMBERS: Final = 16

#: Smallest aggregation group: with two members each would learn the other's vector.
MIN_GROUP_SIZE: Final = 3

#: Smallest Shamir threshold (a threshold of 1 would make every share the secret itself).
MIN_THRESHOLD: Final = 2

#: Longest free-text string (abort / decline / leave reasons), in characters.
MAX_STR: Final = 256

#: Longest model identifier, in characters.
MAX_MODEL_ID_LEN: Final = 128

#: Longest msgpack str the unpacker accepts, in bytes (UTF-8 needs at most 4 bytes per char).
MAX_STR_BYTES: Final = 4 * MAX_STR

#: Longest msgpack array the unpacker accepts; every legitimate array is much shorter
#: (index arrays travel as bin, not as msgpack arrays).
MAX_WIRE_ARRAY_LEN: Final = 64

#: Largest admission certificate carried in an ANNOUNCE, in bytes.
MAX_CERTIFICATE_BYTES: Final = 2048

#: Bounds of a sealed blob (SHARE / PARTIAL). The minimum is what every ``nacl.public.Box``
#: ciphertext carries: a 24-byte nonce and a 16-byte Poly1305 tag (crypto/sealing.py adds more,
#: and checks that itself); the maximum is bounded by the payload limit.
MIN_SEALED_BYTES: Final = 40
MAX_SEALED_BYTES: Final = MAX_PAYLOAD_BYTES

# Masked session (docs/design/masked-sessions.md). Both sealings it uses, Box for one
# recipient (crypto.sealing: SHARE, KEYS, MASKED_START.session_key) and SecretBox under the
# session key K (MASKED, REVEAL), encrypt ``BLAKE2b-256(context) || payload`` and prepend a
# 24-byte nonce and a 16-byte Poly1305 tag, so every such blob is exactly SEAL_OVERHEAD_BYTES
# longer than its payload. The payloads below have fixed layouts (docs/protocol.md section
# 5.5), which lets the decoder check exact sizes before anything is opened.
# tests/test_protocol_codec.py pins each constant to the crypto and session code that
# produces the bytes.

#: Bytes a sealed blob adds to its payload: nonce (24) + Poly1305 tag (16) + context digest (32).
SEAL_OVERHEAD_BYTES: Final = 72

#: A field element on the wire (crypto/field.py: little-endian uint32, < 2**31 - 1).
FIELD_ELEMENT_BYTES: Final = 4

#: MASKED_ACCEPT.ephemeral_public and each MASKED_START.ephemeral_publics entry (X25519).
EPHEMERAL_PUBLIC_BYTES: Final = 32

#: The session key K (a nacl.secret.SecretBox key).
SESSION_KEY_BYTES: Final = 32

#: MASKED_START.session_key: K sealed for the recipient.
SEALED_SESSION_KEY_BYTES: Final = SEAL_OVERHEAD_BYTES + SESSION_KEY_BYTES

#: One Shamir share of a 32-byte secret (crypto.masking.share_secret): 16 field elements.
SECRET_SHARE_BYTES: Final = 16 * FIELD_ELEMENT_BYTES

#: KEYS.sealed: START-view digest (32) + share of the ephemeral key + share of the self seed.
SEALED_KEYS_BYTES: Final = SEAL_OVERHEAD_BYTES + 32 + 2 * SECRET_SHARE_BYTES

#: MASKED.sealed: at least one coordinate plus the count slot, whole field elements, and no
#: more than a payload can carry.
MIN_SEALED_MASKED_BYTES: Final = SEAL_OVERHEAD_BYTES + 2 * FIELD_ELEMENT_BYTES
MAX_SEALED_MASKED_BYTES: Final = MAX_SEALED_BYTES

#: One REVEAL entry: a kind byte (1 = self seed, 2 = ephemeral key) and a secret share.
REVEAL_ENTRY_BYTES: Final = 1 + SECRET_SHARE_BYTES

#: REVEAL.sealed: one entry per member, MIN_GROUP_SIZE..MAX_MEMBERS members.
MIN_SEALED_REVEAL_BYTES: Final = SEAL_OVERHEAD_BYTES + MIN_GROUP_SIZE * REVEAL_ENTRY_BYTES
MAX_SEALED_REVEAL_BYTES: Final = SEAL_OVERHEAD_BYTES + MAX_MEMBERS * REVEAL_ENTRY_BYTES

# Chunked messages (docs/protocol.md section 11). A message larger than a peer's
# configured maximum travels as CHUNK messages, each a signed envelope of its own.

#: Smallest maximum message size a peer may be configured with (``max_message_bytes``).
MIN_MESSAGE_BYTES_LIMIT: Final = 16 * 1024

#: Default maximum message size: at most 256 KB, which EMQX, RabbitMQ and most cloud brokers
#: accept (Mosquitto's default is far larger).
DEFAULT_MAX_MESSAGE_BYTES: Final = 256 * 1024

#: An upper bound on what a CHUNK envelope adds to its data: header with 64-character ids, the
#: digest, three integers, the bin headers and the signature come to 281 bytes at most
#: (tests/test_chunks.py pins it); the rest is margin. A sender puts at most
#: ``max_message_bytes - CHUNK_OVERHEAD_BYTES`` data bytes in one chunk.
CHUNK_OVERHEAD_BYTES: Final = 512

#: Fewest data bytes per chunk a conforming sender can be configured down to. Chunks of one
#: message are split evenly, so a receiver requires ``count <= ceil(total_bytes /
#: MIN_CHUNK_DATA_BYTES)``: no flood of tiny chunks.
MIN_CHUNK_DATA_BYTES: Final = MIN_MESSAGE_BYTES_LIMIT - CHUNK_OVERHEAD_BYTES

#: CHUNK.digest: BLAKE2b-256 of the whole inner wire message.
CHUNK_DIGEST_BYTES: Final = 32

#: Most chunks one message can be split into (8 MiB in chunks of MIN_CHUNK_DATA_BYTES): 529.
MAX_CHUNKS: Final = -(-MAX_PAYLOAD_BYTES // MIN_CHUNK_DATA_BYTES)

# Memory a receiver holds for others (docs/protocol.md sections 6 and 11). What a peer holds
# before it can use it (chunks of unfinished messages, messages that overtook START, messages
# waiting for a lookup) is sized from the largest message an honest peer of its own model can
# send, not from MAX_PAYLOAD_BYTES: a peer of another model never sends it session messages.

#: An upper bound on what a session message adds to the field elements or indices it carries:
#: the header with 64-character ids and the largest seq, the signature, msgpack headers, a
#: seal, a list of MAX_MEMBERS 64-character ids (START, PARTIAL.contributors, CONFIRM) and, in
#: MASKED_START, MAX_MEMBERS ephemeral keys and the sealed session key: about 2.2 KB at most
#: (tests/test_held_memory.py encodes the largest of each kind); the rest is margin.
SESSION_ENVELOPE_BYTES: Final = 4096

#: Senders beyond its own group's g - 1 other members that a peer's buffers for others are
#: sized to absorb at once: with this many admitted peers flooding, each honest member still
#: gets its message through (protocol/chunks.py, peer/network/session/early.py).
FLOOD_SENDERS: Final = 2


def session_message_bound(param_count: int) -> int:
    """The largest wire size of a session message an honest peer sends for a model of
    ``param_count`` parameters, capped at MAX_PAYLOAD_BYTES.

    The largest bodies carry one 4-byte field element per coordinate plus the count slot
    (SHARE, PARTIAL, MASKED) or at most 4 bytes and a layout byte per index (ACCEPT, START),
    and a session's coordinates are distinct indices below ``param_count``.
    """
    if type(param_count) is not int or not 0 < param_count <= MAX_PARAM_COUNT:
        raise ValueError(f"param_count must be an integer in 1..{MAX_PARAM_COUNT}")
    vector = FIELD_ELEMENT_BYTES * (param_count + 1) + SEAL_OVERHEAD_BYTES
    return min(MAX_PAYLOAD_BYTES, vector + SESSION_ENVELOPE_BYTES)


#: Exact sizes of fixed-width fields.
SESSION_ID_BYTES: Final = 16
#: ANNOUNCE.connection / LEAVE.connection: a fresh random id per broker connection.
CONNECTION_ID_BYTES: Final = 16
SIGNATURE_BYTES: Final = 64

#: Sequence numbers are 0 <= seq < 2**63 (they fit a signed 64-bit integer).
MAX_SEQ_EXCLUSIVE: Final = 1 << 63

#: Indices are uint32, so a model may have at most 2**32 parameters.
MAX_PARAM_COUNT: Final = 1 << 32

#: Fixed-point fractional bits an INVITE may ask for (receivers may support fewer).
MAX_FRAC_BITS: Final = 60

#: Peer ids and network ids: lower-case ASCII letters, digits, '_' and '-', 1 to 64 characters,
#: starting with a letter or digit. Safe as an MQTT topic level and as a broker user name
#: (no '/', '+', '#', NUL or upper/lower-case ambiguity). This is the only definition of the
#: rule: the codec and topics here, crypto.identity / crypto.admission (key files and
#: certificates), peer.config and sim.scenario all use ``is_valid_id`` / ``ID_PATTERN``.
ID_PATTERN: Final = r"^[a-z0-9][a-z0-9_-]{0,63}$"
PEER_ID_RE: Final = re.compile(ID_PATTERN)
NETWORK_ID_RE: Final = PEER_ID_RE

#: Characters free text may not contain: C0 and C1 control characters and DEL. Rejecting
#: them keeps hostile reasons from forging log lines or terminal escape sequences.
CONTROL_CHARS_RE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def is_valid_id(value: object) -> bool:
    """True if ``value`` is a str that is a valid peer or network id.

    ``fullmatch`` is used rather than ``$`` so a trailing newline is not accepted.
    """
    return isinstance(value, str) and PEER_ID_RE.fullmatch(value) is not None
