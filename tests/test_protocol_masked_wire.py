"""The masked-session kinds (10-16) against the code that produces their bytes.

protocol/ must stay pure, so its exact sealed sizes (protocol.limits) are written down rather
than imported from crypto/ and peer/. These tests pin each one to the real sealing and payload
code, and run real masked sessions whose every message is signed, encoded, decoded, parsed
from its topic and bound to it before it reaches the receiving state machine: what
peer/network/session/masked.py sends is exactly what the codec accepts.
"""

from __future__ import annotations

import os
from collections import Counter, deque

import nacl.secret
import numpy as np
import pytest

from crypto.field import FIELD_BYTES, FixedPoint
from crypto.identity import Identity, verify_signature
from crypto.masking import EphemeralKey
from crypto.sealing import SEAL_OVERHEAD, SealContext, seal
from peer.network.session import masked_messages as mm
from peer.network.session.common import Outgoing, dense_contribution
from peer.network.session.masked import MaskedPhase, MaskedSession
from peer.network.session.shamir import Contribution, SessionContext, SessionParams
from protocol import limits
from protocol.codec import decode_message, encode_message
from protocol.messages import BODY_TYPES, PROTOCOL_VERSION, Header, Kind, SequenceCounter
from protocol.topics import check_topic_binding, direct_topic, parse_topic, session_topic

NET = "wirenet"
PARAMS_N = 3000
K = 200

def test_the_state_machine_bodies_are_the_protocol_bodies() -> None:
    for kind, body_type in mm.BODY_TYPES.items():
        assert body_type is BODY_TYPES[kind]


def test_sizes_match_the_crypto_and_payload_code() -> None:
    assert limits.SEAL_OVERHEAD_BYTES == SEAL_OVERHEAD
    assert limits.FIELD_ELEMENT_BYTES == FIELD_BYTES
    assert limits.EPHEMERAL_PUBLIC_BYTES == mm.EPHEMERAL_PUBLIC_BYTES
    assert len(EphemeralKey.generate().public) == limits.EPHEMERAL_PUBLIC_BYTES
    assert limits.SESSION_KEY_BYTES == mm.SESSION_KEY_BYTES == nacl.secret.SecretBox.KEY_SIZE
    assert limits.SECRET_SHARE_BYTES == mm.SECRET_SHARE_ELEMENTS * FIELD_BYTES

    alice, bob = Identity.generate("alice"), Identity.generate("bob")
    sid = os.urandom(16)
    box = SealContext(NET, sid, "alice", "bob", 7)
    sealed_key = seal(alice, bob.public.box_key, box, os.urandom(limits.SESSION_KEY_BYTES))
    assert len(sealed_key) == limits.SEALED_SESSION_KEY_BYTES

    share = np.ones(mm.SECRET_SHARE_ELEMENTS, dtype=np.uint32)
    keys_payload = mm.encode_keys(os.urandom(mm.DIGEST_BYTES), share, share)
    assert len(seal(alice, bob.public.box_key, box, keys_payload)) == limits.SEALED_KEYS_BYTES

    key = os.urandom(limits.SESSION_KEY_BYTES)
    ctx = mm.SessionSealContext(NET, sid, "alice", Kind.REVEAL, 7)
    for members in (limits.MIN_GROUP_SIZE, limits.MAX_MEMBERS):
        entries = [(mm.RevealKind.SELF_SEED, share)] * members
        sealed = mm.session_seal(key, ctx, mm.encode_reveal(entries))
        expected = limits.SEAL_OVERHEAD_BYTES + members * limits.REVEAL_ENTRY_BYTES
        assert len(sealed) == expected
    assert limits.MIN_SEALED_REVEAL_BYTES == limits.SEAL_OVERHEAD_BYTES + 3 * 65
    assert limits.MAX_SEALED_REVEAL_BYTES == limits.SEAL_OVERHEAD_BYTES + 16 * 65
    one_coordinate = np.zeros(2, dtype=np.uint32).tobytes()  # one coordinate + the count slot
    sealed = mm.session_seal(key, ctx, one_coordinate)
    assert len(sealed) == limits.MIN_SEALED_MASKED_BYTES


class WireRouter:
    """g members; every message crosses the real codec, topic parsing and topic binding."""

    def __init__(self, g: int, t: int, die_before: dict[str, Kind] | None = None) -> None:
        rng = np.random.default_rng(11)
        params = SessionParams(network_id=NET, model_id="mlp-wire", param_count=PARAMS_N,
                               group_size=g, threshold=t, fixed_point=FixedPoint())
        self.members = [f"p{i}" for i in range(g)]
        self.ids = {p: Identity.generate(p) for p in self.members}
        self.ctx = {p: SessionContext(self.ids[p], params, self._box_key,
                                      SequenceCounter().next) for p in self.members}
        self.contrib = {}
        for i, p in enumerate(self.members):
            idx = np.sort(rng.choice(PARAMS_N, size=K, replace=False)).astype(np.uint32)
            vals = rng.normal(0, 0.05, size=K).astype(np.float32)
            self.contrib[p] = Contribution(idx, vals, round=0,
                                           fill=lambda x, i=i: np.full(x.size, 0.01 * (i + 1),
                                                                       np.float32))
        self.sessions: dict[str, MaskedSession] = {}
        self.die_before = die_before or {}
        self.dead: set[str] = set()
        self.queue: deque[tuple[str, Outgoing]] = deque()
        self.sent_kinds: Counter[Kind] = Counter()
        self.drops: list[str] = []
        self.sid = os.urandom(16)

    def _box_key(self, peer: str) -> bytes | None:
        ident = self.ids.get(peer)
        return None if ident is None else ident.public.box_key

    def _wire(self, sender: str, out: Outgoing) -> tuple[str, bytes]:
        kind = out.kind
        header = Header(PROTOCOL_VERSION, NET, kind, sender, self.sid, out.seq)
        payload = encode_message(header, out.body, self.ids[sender].sign)
        self.sent_kinds[kind] += 1
        if out.recipient is None:
            return session_topic(NET, sender, self.sid), payload
        return direct_topic(NET, sender, out.recipient), payload

    def _receive(self, rcpt: str, topic: str, payload: bytes, now: float) -> None:
        msg = decode_message(payload)
        parsed = parse_topic(NET, topic)
        check_topic_binding(parsed, msg)
        assert parsed.recipient in (None, rcpt)
        verify_signature(self.ids[msg.header.sender].public.verify_key, msg.signed_bytes,
                         msg.signature)
        header = msg.header
        if header.kind is Kind.INVITE:
            s, step = MaskedSession.join(self.ctx[rcpt], header, msg.body,  # type: ignore[arg-type]
                                         self.contrib[rcpt], now)
            self.sessions[rcpt] = s
        else:
            step = self.sessions[rcpt].handle(header, msg.body, now)  # type: ignore[arg-type]
        self.drops.extend(step.drops)
        self.queue.extend((rcpt, o) for o in step.out)

    def run(self, now: float) -> None:
        while self.queue:
            sender, out = self.queue.popleft()
            if sender in self.dead or self.die_before.get(sender) is out.kind:
                self.dead.add(sender)
                continue
            topic, payload = self._wire(sender, out)
            rcpts = [out.recipient] if out.recipient is not None else [
                p for p in self.sessions if p != sender]
            for rcpt in rcpts:
                if rcpt is not None and rcpt not in self.dead:
                    self._receive(rcpt, topic, payload, now)

    def settle(self) -> None:
        s, step = MaskedSession.initiate(self.ctx["p0"], self.sid, self.contrib["p0"],
                                         self.members[1:], 0.0)
        self.sessions["p0"] = s
        self.queue.extend(("p0", o) for o in step.out)
        now = 0.0
        self.run(now)
        for _ in range(20):
            live = [x for p, x in self.sessions.items() if p not in self.dead and not x.finished]
            if not live:
                return
            now = max(now, min(x.deadline for x in live))
            for p, x in self.sessions.items():
                if p not in self.dead:
                    self.queue.extend((p, o) for o in x.on_timeout(now).out)
            self.run(now)
        raise AssertionError("sessions did not finish")


@pytest.mark.parametrize(("g", "t", "dying"), [(3, 2, None), (5, 3, "p4")])
def test_a_masked_session_runs_over_the_codec(g: int, t: int, dying: str | None) -> None:
    router = WireRouter(g, t, {dying: Kind.MASKED} if dying else None)
    router.settle()
    survivors = tuple(p for p in router.members if p != dying)
    results = []
    for p in survivors:
        session = router.sessions[p]
        assert session.phase is MaskedPhase.DONE, (p, session.abort_reason)
        assert session.result is not None
        assert session.result.contributors == survivors
        results.append(session.result.group_sum)
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])
    # the group sum is the survivors' sum (fixed-point resolution per member)
    coords = router.sessions["p0"].coordinates
    expected = np.zeros(coords.size)
    for p in survivors:
        dense, _ = dense_contribution(router.contrib[p], coords, FixedPoint().max_abs)
        expected += dense
    np.testing.assert_allclose(results[0], expected, atol=len(survivors) * 2.0**-15)
    # surplus REVEALs reach members that already finished; nothing else is refused
    assert set(router.drops) <= {"session_finished"}
    wire_kinds = {Kind.INVITE, Kind.MASKED_ACCEPT, Kind.MASKED_START, Kind.KEYS, Kind.MASKED,
                  Kind.SURVIVORS, Kind.CONFIRM, Kind.REVEAL}
    assert wire_kinds <= set(router.sent_kinds)
