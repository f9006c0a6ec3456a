"""docs/protocol.md's worked MASKED example, byte for byte, against the code that sends one.

The test reads the three hex blocks of the section (seal context, sealed blob, signed bytes)
from the document itself, so the spec cannot drift from the encoder, the session sealing or
the envelope.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import nacl.secret
import numpy as np

from crypto.identity import Identity
from peer.network.session import masked_messages as mm
from protocol import messages as m
from protocol.codec import decode_message, encode_message
from protocol.limits import SEAL_OVERHEAD_BYTES
from protocol.topics import session_topic

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
HEADING = "#### Worked example: one MASKED message, byte for byte"
SESSION = bytes(range(16))
KEY = bytes([7]) * 32
NONCE = bytes([1]) * 24
PAYLOAD = np.array([1, 65536], dtype="<u4").tobytes()


def doc_blocks() -> list[bytes]:
    text = DOC.read_text(encoding="utf-8")
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```\n(.*?)```", section, flags=re.S)
    return [bytes.fromhex(block) for block in blocks]


def test_the_doc_has_the_three_blocks() -> None:
    context, sealed, signed = doc_blocks()
    assert (len(context), len(sealed), len(signed)) == (70, 80, 116)


def test_seal_context_and_sealed_blob_match_the_session_code() -> None:
    context_bytes, sealed, _signed = doc_blocks()
    ctx = mm.SessionSealContext("demo", SESSION, "alice", m.Kind.MASKED, 5)
    assert hashlib.blake2b(context_bytes, digest_size=32).digest() == ctx.digest()
    assert ctx.digest().hex() in DOC.read_text(encoding="utf-8")
    ours = bytes(nacl.secret.SecretBox(KEY).encrypt(ctx.digest() + PAYLOAD, NONCE))
    assert ours == sealed
    assert mm.session_open(KEY, ctx, sealed) == PAYLOAD
    assert len(sealed) - len(PAYLOAD) == SEAL_OVERHEAD_BYTES


def test_signed_bytes_match_the_encoder() -> None:
    _context, sealed, signed = doc_blocks()
    header = m.Header(m.PROTOCOL_VERSION, "demo", m.Kind.MASKED, "alice", SESSION, 5)
    wire = encode_message(header, m.Masked(sealed), Identity.generate("alice").sign)
    decoded = decode_message(wire)
    assert decoded.signed_bytes == signed
    assert wire[:3] == bytes.fromhex("92 c4 74")
    assert wire[3 + len(signed):5 + len(signed)] == bytes.fromhex("c4 40")
    assert session_topic("demo", "alice", SESSION) == "murmur/demo/alice/session/" + SESSION.hex()
