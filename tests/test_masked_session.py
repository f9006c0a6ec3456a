"""The masked session state machine (peer/network/session/masked.py), sans IO, in memory.

A tiny router hands each member's outgoing messages to their recipients (direct) or to every
other member of the session (session topic); every seal, share and mask is the real crypto.
The envelope is not modelled: a message's header sender stands for its signature.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np
import pytest

from crypto.field import FixedPoint, field_to_bytes
from crypto.identity import Identity
from crypto.sealing import SealContext, open_sealed
from peer.network.session import masked_messages as mm
from peer.network.session.common import Outgoing
from peer.network.session.masked import MaskedPhase, MaskedSession
from peer.network.session.shamir import Contribution, SessionContext, SessionParams
from protocol import messages as m

NET = "testnet"
PARAMS_N = 4000
K = 300
RESOLUTION = 2.0**-16
TIMEOUTS = mm.MaskedTimeouts(1.0, 2.0, 3.0, 3.0, 5.0, 3.0, 3.0)
Link = Callable[[str, str, Outgoing], bool]
Tamper = Callable[[str, str, Outgoing], Outgoing]


def wire_header(kind: m.Kind, sender: str, session: bytes, seq: int) -> m.Header:
    """The signed envelope's header of a message of this test network."""
    return m.Header(m.PROTOCOL_VERSION, NET, kind, sender, session, seq)


def fill_of(i: int) -> Callable[[np.ndarray], np.ndarray]:
    """A deterministic, non-zero residual fill, so every member's vector is dense."""
    return lambda idx: (0.01 + 0.02 * np.sin(idx.astype(np.float64) * (i + 1))).astype(
        np.float32)


@dataclass
class Router:
    g: int
    t: int
    ids: dict[str, Identity] = field(default_factory=dict)
    ctx: dict[str, SessionContext] = field(default_factory=dict)
    contrib: dict[str, Contribution] = field(default_factory=dict)
    sessions: dict[str, MaskedSession] = field(default_factory=dict)
    drops: dict[str, list[str]] = field(default_factory=dict)
    sent: list[tuple[str, Outgoing]] = field(default_factory=list)
    queue: deque[tuple[str, Outgoing]] = field(default_factory=deque)
    #: a member dies (sends and receives nothing more) when it would send this kind
    die_on: dict[str, m.Kind] = field(default_factory=dict)
    dead: set[str] = field(default_factory=set)
    link: Link = lambda sender, rcpt, out: True
    tamper: Tamper | None = None
    sid: bytes = b""
    #: max_colluders c of every member, and of some members when ``c_of`` names them
    c: int = 1
    c_of: dict[str, int] = field(default_factory=dict)
    seed: int = 7

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        for i in range(self.g):
            pid = f"p{i}"
            params = SessionParams(network_id=NET, model_id="mlp-test", param_count=PARAMS_N,
                                   group_size=self.g, threshold=self.t, fixed_point=FixedPoint(),
                                   max_colluders=self.c_of.get(pid, self.c))
            self.ids[pid] = Identity.generate(pid)
            self.ctx[pid] = SessionContext(self.ids[pid], params, self._box_key,
                                           m.SequenceCounter().next)
            idx = np.sort(rng.choice(PARAMS_N, size=K, replace=False)).astype(np.uint32)
            vals = rng.normal(0, 0.05, size=K).astype(np.float32)
            self.contrib[pid] = Contribution(idx, vals, round=0, fill=fill_of(i))
            self.drops[pid] = []

    @property
    def members(self) -> list[str]:
        return [f"p{i}" for i in range(self.g)]

    def _box_key(self, peer: str) -> bytes | None:
        ident = self.ids.get(peer)
        return None if ident is None else ident.public.box_key

    def start(self) -> bytes:
        self.sid = os.urandom(16)
        s, step = MaskedSession.initiate(self.ctx["p0"], self.sid, self.contrib["p0"],
                                         self.members[1:], 0.0, TIMEOUTS)
        self.sessions["p0"] = s
        self.queue.extend(("p0", out) for out in step.out)
        return self.sid

    def deliver(self, sender: str, rcpt: str, out: Outgoing, now: float) -> None:
        if rcpt in self.dead or not self.link(sender, rcpt, out):
            return
        if self.tamper is not None:
            out = self.tamper(sender, rcpt, out)
        header = wire_header(out.kind, sender, self.sid, out.seq)
        if out.kind is m.Kind.INVITE:
            assert isinstance(out.body, m.Invite)
            assert MaskedSession.check_invite(self.ctx[rcpt].params, out.body) is None
            s, step = MaskedSession.join(self.ctx[rcpt], header, out.body, self.contrib[rcpt],
                                         now, TIMEOUTS)
            self.sessions[rcpt] = s
        else:
            step = self.sessions[rcpt].handle(header, out.body, now)
        self.drops[rcpt].extend(step.drops)
        self.queue.extend((rcpt, o) for o in step.out)

    def run(self, now: float) -> None:
        while self.queue:
            sender, out = self.queue.popleft()
            if sender in self.dead:
                continue
            if self.die_on.get(sender) is out.kind:
                self.dead.add(sender)
                continue
            self.sent.append((sender, out))
            rcpts = [out.recipient] if out.recipient is not None else [
                p for p in self.sessions if p != sender]
            for rcpt in rcpts:
                assert rcpt is not None
                self.deliver(sender, rcpt, out, now)

    def settle(self) -> None:
        """Deliver everything, then advance the clock deadline by deadline until all finish."""
        now = 0.0
        self.run(now)
        for _ in range(20):
            live = [(p, s) for p, s in self.sessions.items()
                    if p not in self.dead and not s.finished]
            if not live:
                return
            now = max(now, min(s.deadline for _, s in live))
            for p, s in live:
                self.queue.extend((p, o) for o in s.on_timeout(now).out)
            self.run(now)
        raise AssertionError("sessions did not finish")

    def dense(self, pid: str, coords: np.ndarray) -> np.ndarray:
        c = self.contrib[pid]
        out = np.zeros(coords.size)
        outside = np.setdiff1d(coords, c.indices)
        assert c.fill is not None
        out[np.searchsorted(coords, outside)] = c.fill(outside).astype(np.float64)
        out[np.searchsorted(coords, c.indices)] = c.values.astype(np.float64)
        return out

    def sent_by(self, pid: str) -> list[Outgoing]:
        return [out for sender, out in self.sent if sender == pid]

    def reveals_by(self, pid: str, key: bytes) -> list[list[tuple[mm.RevealKind, np.ndarray]]]:
        """The REVEAL payloads ``pid`` emitted, opened with the session key."""
        opened = []
        for out in self.sent_by(pid):
            if out.kind is m.Kind.REVEAL:
                ctx = mm.SessionSealContext(NET, self.sid, pid, out.kind, out.seq)
                assert isinstance(out.body, mm.Reveal)
                opened.append(mm.decode_reveal(mm.session_open(key, ctx, out.body.sealed),
                                               self.g))
        return opened


def assert_same_correct_sum(r: Router, finishers: list[str], survivors: list[str]) -> None:
    results = []
    for p in finishers:
        s = r.sessions[p]
        assert s.phase is MaskedPhase.DONE, (p, s.phase, s.abort_reason, r.drops[p])
        assert s.result is not None
        results.append(s.result)
    first = results[0]
    assert first.contributors == tuple(survivors)
    for res in results[1:]:
        np.testing.assert_array_equal(res.group_sum, first.group_sum)  # bit-identical
        assert res.contributors == first.contributors
    union = np.unique(np.concatenate([r.contrib[p].indices for p in r.members]))
    np.testing.assert_array_equal(first.coordinates, union)
    expected = sum(r.dense(p, union) for p in survivors)
    np.testing.assert_allclose(first.group_sum, expected, atol=len(survivors) * RESOLUTION)
    assert np.abs(first.group_sum).max() > 0.1  # a real sum, not zeros


def body_bytes(body: object) -> bytes:
    """Every byte a message body would carry (its bytes, arrays and strings)."""
    parts: list[bytes] = []
    for f in fields(body):  # type: ignore[arg-type]
        value = getattr(body, f.name)
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            if isinstance(item, bytes):
                parts.append(item)
            elif isinstance(item, np.ndarray):
                parts.append(item.tobytes())
            elif isinstance(item, str):
                parts.append(item.encode())
            else:
                parts.append(int(item).to_bytes(8, "big"))
    return b"".join(parts)


# ---------------------------------------------------------------------------- (a)
@pytest.mark.parametrize(("g", "t"), [(3, 2), (3, 3), (5, 3), (5, 5)])
def test_every_member_gets_the_same_correct_sum(g: int, t: int) -> None:
    r = Router(g, t)
    r.start()
    r.settle()
    assert_same_correct_sum(r, r.members, r.members)
    assert all(set(d) <= {"session_finished"} for d in r.drops.values()), r.drops
    for p in r.members:  # one REVEAL each, of self-seed shares only (nobody dropped)
        (entries,) = r.reveals_by(p, captured_key(r))
        assert {kind for kind, _ in entries} == {mm.RevealKind.SELF_SEED}


def test_quorum_counts_the_initiator_in_both_halves_of_a_split() -> None:
    assert mm.confirm_quorum(3, 2) == 3
    assert mm.confirm_quorum(5, 3) == 4
    assert mm.confirm_quorum(7, 4) == 6
    assert mm.confirm_quorum(8, 5) == 7
    assert mm.confirm_quorum(5, 5) == 5
    for g in range(3, 17):
        for t in range(2, g + 1):
            q = mm.confirm_quorum(g, t)
            # no two lists both reach q while up to t - 1 members (any member's c) collude
            assert 2 * q > g + t - 1 and q >= t


# ---------------------------------------------------------------------------- (b)
@pytest.mark.parametrize(("g", "t", "dying"), [(5, 3, ["p3"]), (5, 3, ["p1"]),
                                               (7, 4, ["p5"]), (7, 3, ["p1", "p6"])])
def test_members_dropping_after_keys_are_recovered(g: int, t: int, dying: list[str]) -> None:
    r = Router(g, t, die_on=dict.fromkeys(dying, m.Kind.MASKED))
    r.start()
    r.settle()
    alive = [p for p in r.members if p not in dying]
    assert_same_correct_sum(r, alive, alive)
    for p in dying:  # they shared their keys, but no masked vector of theirs ever travelled
        kinds = [o.kind for o in r.sent_by(p)]
        assert m.Kind.KEYS in kinds and m.Kind.MASKED not in kinds


@pytest.mark.parametrize(("g", "t", "dying", "reason"), [
    (5, 3, ["p2", "p4", "p1"], "below_threshold"),  # 2 survivors < t: initiator aborts
    (3, 2, ["p2"], "too_few_contributors"),  # 2 survivors >= t, but a sum of two
    (5, 3, ["p1", "p2"], "timeout_confirming"),  # 3 survivors >= t, but < quorum 4
])
def test_too_few_survivors_abort_and_nothing_is_revealed(g: int, t: int, dying: list[str],
                                                         reason: str) -> None:
    r = Router(g, t, die_on=dict.fromkeys(dying, m.Kind.MASKED))
    r.start()
    r.settle()
    alive = [p for p in r.members if p not in dying]
    for p in alive:
        assert r.sessions[p].phase is MaskedPhase.ABORTED
        assert r.sessions[p].result is None
    assert r.sessions["p0"].abort_reason == reason
    assert not [o for _, o in r.sent if o.kind is m.Kind.REVEAL]
    for p in alive:  # an aborted member keeps no share and no masked vector
        held = r.sessions[p].held_counts()
        assert held["keys"] == held["masked"] == 0


def test_a_member_whose_keys_never_arrive_aborts_before_anyone_masks() -> None:
    r = Router(5, 3, die_on={"p2": m.Kind.KEYS})
    r.start()
    r.settle()
    assert all(r.sessions[p].phase is MaskedPhase.ABORTED for p in r.members if p != "p2")
    assert not [o for _, o in r.sent if o.kind is m.Kind.MASKED]


# ---------------------------------------------------------------------------- (c)
def split_view(r: Router, views: dict[str, tuple[str, ...]], partition: bool) -> None:
    """p0 sends each honest member its own SURVIVORS list and confirms each list to its
    holders only; the broker (colluding) withholds from each member the MASKED of those its
    list leaves out, so no member holds them all and adopts the full list itself; with
    ``partition`` the broker also keeps CONFIRMs and REVEALs within a view."""

    def tamper(sender: str, rcpt: str, out: Outgoing) -> Outgoing:
        if sender == "p0" and out.kind is m.Kind.SURVIVORS:
            return Outgoing(rcpt, out.kind, mm.Survivors(views[rcpt]), out.seq)
        if sender == "p0" and out.kind is m.Kind.CONFIRM:
            return Outgoing(None, out.kind, mm.Confirm(views[rcpt]), out.seq)
        return out

    def link(sender: str, rcpt: str, out: Outgoing) -> bool:
        if sender == "p0" and out.kind is m.Kind.ABORT:
            return False  # the adversary never gives up
        if out.kind is m.Kind.MASKED and rcpt != "p0" and sender not in views[rcpt]:
            return False
        if partition and rcpt != "p0" and sender != "p0" and out.kind in (
                m.Kind.CONFIRM, m.Kind.REVEAL, m.Kind.ABORT):
            return views[sender] == views[rcpt]
        return True

    r.tamper, r.link = tamper, link


def adversary_can_unmask(r: Router, key: bytes, honest: list[str]) -> list[str]:
    """Members for which p0 (holding its own share of everything) gets t shares of both kinds."""
    exposed = []
    for i, v in enumerate(r.members):
        counts = {kind: 1 for kind in mm.RevealKind}  # p0's own share of each secret
        for p in honest:
            for entries in r.reveals_by(p, key):
                counts[entries[i][0]] += 1
        if min(counts.values()) >= r.t:
            exposed.append(v)
    return exposed


@pytest.mark.parametrize("partition", [True, False])
def test_split_view_at_g5_t3_aborts_without_any_reveal(partition: bool) -> None:
    r = Router(5, 3)
    views = {"p1": ("p0", "p1", "p2"), "p2": ("p0", "p1", "p2"),
             "p3": ("p0", "p3", "p4"), "p4": ("p0", "p3", "p4")}
    split_view(r, views, partition)
    r.start()
    r.settle()
    honest = ["p1", "p2", "p3", "p4"]
    for p in honest:
        s = r.sessions[p]
        assert s.phase is MaskedPhase.ABORTED and s.result is None
        expected = "timeout_confirming" if partition else "conflicting_confirm"
        assert s.abort_reason == expected, (p, s.abort_reason)
        assert not [o for o in r.sent_by(p) if o.kind is m.Kind.REVEAL]


def test_lopsided_split_reveals_only_one_kind_of_share_per_member() -> None:
    r = Router(5, 3)
    most = ("p0", "p1", "p2", "p3")  # p4 "dropped" for these, though its MASKED arrived
    views = {"p1": most, "p2": most, "p3": most, "p4": tuple(r.members)}
    split_view(r, views, partition=True)
    r.start()
    r.settle()
    honest = ["p1", "p2", "p3", "p4"]
    # the majority view reaches quorum (p0 + 3) and completes without p4 ...
    assert_same_correct_sum(r, ["p1", "p2", "p3"], list(most))
    # ... p4, alone with p0, never reveals; p4's self seed stays behind t - 1 shares
    assert r.sessions["p4"].phase is MaskedPhase.ABORTED
    assert not [o for o in r.sent_by("p4") if o.kind is m.Kind.REVEAL]
    assert adversary_can_unmask(r, captured_key(r), honest) == []
    for p in ["p1", "p2", "p3"]:
        (entries,) = r.reveals_by(p, captured_key(r))
        assert entries[4][0] is mm.RevealKind.EPHEMERAL_KEY
        assert all(kind is mm.RevealKind.SELF_SEED for kind, _ in entries[:4])


def captured_key(r: Router) -> bytes:
    """K as the initiator drew it (the adversary holds it): p1's copy, opened from START."""
    start = next(o for s, o in r.sent if s == "p0" and o.kind is m.Kind.MASKED_START
                 and o.recipient == "p1")
    assert isinstance(start.body, mm.Start)
    ctx = SealContext(NET, r.sid, "p0", "p1", start.seq)
    return open_sealed(r.ids["p1"], r.ids["p0"].public.box_key, ctx, start.body.session_key)


# ---------------------------------------------------------------------------- (d)
def snapshot(s: MaskedSession) -> tuple:
    return (s.phase, s.deadline, s.survivors, s.held_counts())


def test_forged_replayed_and_misrouted_messages_are_counted_drops() -> None:
    r = Router(5, 3)
    outcomes: list[tuple[str, list[str], int]] = []  # (case, drops, messages sent)
    state = {"forged": False, "replayed": False}

    def inject(case: str, header: m.Header, body: mm.MaskedBody) -> None:
        s = r.sessions["p1"]
        before = snapshot(s)
        step = s.handle(header, body, 0.0)
        assert snapshot(s) == before, case  # a refused message changes nothing
        outcomes.append((case, step.drops, len(step.out)))

    def link(sender: str, rcpt: str, out: Outgoing) -> bool:
        s = r.sessions.get("p1")
        if rcpt == "p1" and sender == "p2" and out.kind is m.Kind.MASKED and not state[
                "forged"]:
            state["forged"] = True
            assert s is not None and s.phase in (MaskedPhase.KEYS, MaskedPhase.MASKED)
            h = wire_header(out.kind, "p2", r.sid, out.seq)
            inject("wrong_session", wire_header(out.kind, "p2", os.urandom(16), out.seq),
                   out.body)
            inject("wrong_sender", wire_header(out.kind, "p3", r.sid, out.seq), out.body)
            inject("wrong_seq", wire_header(out.kind, "p2", r.sid, out.seq + 1), out.body)
            inject("as_reveal", wire_header(m.Kind.REVEAL, "p2", r.sid, out.seq),
                   mm.Reveal(out.body.sealed))  # type: ignore[union-attr]
            inject("non_member", wire_header(out.kind, "p9", r.sid, out.seq), out.body)
            inject("garbage", h, mm.Masked(os.urandom(len(out.body.sealed))))  # type: ignore
            inject("kind_body_mismatch", h, mm.Confirm(("p0",)))
            keys = next(o for snd, o in r.sent if snd == "p2" and o.kind is m.Kind.KEYS
                        and o.recipient == "p3")
            inject("misrouted_keys", wire_header(m.Kind.KEYS, "p2", r.sid, keys.seq),
                   keys.body)
            inject("early_reveal", wire_header(m.Kind.REVEAL, "p2", r.sid, out.seq + 5),
                   mm.Reveal(os.urandom(400)))
            inject("survivors_not_from_initiator",
                   wire_header(m.Kind.SURVIVORS, "p2", r.sid, out.seq + 6),
                   mm.Survivors(tuple(r.members)))
            inject("stranger_confirmed", wire_header(m.Kind.CONFIRM, "p2", r.sid, 1),
                   mm.Confirm(("p0", "p1", "p9")))
            inject("unordered_confirm", wire_header(m.Kind.CONFIRM, "p2", r.sid, 1),
                   mm.Confirm(("p1", "p0", "p2")))
        elif (rcpt == "p1" and s is not None and not state["replayed"]
              and "p2" in s.masked_from and out.kind is m.Kind.MASKED):
            state["replayed"] = True
            genuine = next(o for snd, o in r.sent if snd == "p2" and o.kind is out.kind)
            inject("replay", wire_header(genuine.kind, "p2", r.sid, genuine.seq), genuine.body)
        return True

    r.link = link
    r.start()
    r.settle()
    assert state == {"forged": True, "replayed": True}
    assert outcomes == [
        ("wrong_session", ["wrong_session"], 0),
        ("wrong_sender", ["bad_seal"], 0),
        ("wrong_seq", ["bad_seal"], 0),
        ("as_reveal", ["reveal_before_confirm"], 0),
        ("non_member", ["not_a_member"], 0),
        ("garbage", ["bad_seal"], 0),
        ("kind_body_mismatch", ["body_mismatch"], 0),
        ("misrouted_keys", ["wrong_recipient"], 0),
        ("early_reveal", ["reveal_before_confirm"], 0),
        ("survivors_not_from_initiator", ["not_from_initiator"], 0),
        ("stranger_confirmed", ["bad_survivors"], 0),
        ("unordered_confirm", ["bad_survivors"], 0),
        ("replay", ["duplicate_masked"], 0),
    ]
    assert_same_correct_sum(r, r.members, r.members)  # and the session still completes


def test_a_second_different_survivors_list_aborts_before_any_reveal() -> None:
    r = Router(5, 3)
    other = ("p0", "p1", "p2", "p3")

    def link(sender: str, rcpt: str, out: Outgoing) -> bool:
        # p0's CONFIRM follows its SURVIVORS: p1 holds the genuine list, and has not revealed
        if sender == "p0" and out.kind is m.Kind.CONFIRM and rcpt == "p1":
            s = r.sessions["p1"]
            assert s.phase is MaskedPhase.CONFIRMING and s.survivors == tuple(r.members)
            step = s.handle(wire_header(m.Kind.SURVIVORS, "p0", r.sid, out.seq + 100),
                            mm.Survivors(other), 0.0)
            assert step.drops == [] and s.phase is MaskedPhase.ABORTED
        return True

    r.link = link
    r.start()
    r.settle()
    assert r.sessions["p1"].abort_reason == "initiator_equivocated"
    assert not [o for o in r.sent_by("p1") if o.kind is m.Kind.REVEAL]
    # the four others still hold a quorum on the genuine list and finish with p1's vector
    assert_same_correct_sum(r, ["p0", "p2", "p3", "p4"], r.members)


def test_an_initiator_cannot_give_members_different_ephemeral_keys() -> None:
    r = Router(3, 2)
    fake = mm.EPHEMERAL_PUBLIC_BYTES * b"\x09"

    def tamper(sender: str, rcpt: str, out: Outgoing) -> Outgoing:
        if out.kind is m.Kind.MASKED_START and rcpt == "p1":
            b = out.body
            assert isinstance(b, mm.Start)
            publics = (b.ephemeral_publics[0], b.ephemeral_publics[1], fake)
            return Outgoing(rcpt, out.kind, mm.Start(b.members, b.threshold,
                                  b.coordinates, publics, b.recipient, b.session_key), out.seq)
        return out

    r.tamper = tamper
    r.start()
    r.settle()
    # p1 and p2 compare START views inside their sealed KEYS and stop before masking
    assert {r.sessions[p].abort_reason for p in ("p1", "p2")} >= {"inconsistent_view"}
    assert not [o for _, o in r.sent if o.kind is m.Kind.MASKED and _ != "p0"]


# ---------------------------------------------------------------------------- (e), (f)
def test_no_message_carries_an_input_in_the_clear() -> None:
    r = Router(5, 3)
    r.start()
    r.settle()
    union = r.sessions["p0"].coordinates
    fp = FixedPoint()
    for p in r.members:
        wire = b"".join(body_bytes(o.body) for o in r.sent_by(p))
        encoded = field_to_bytes(fp.encode(np.concatenate([r.dense(p, union), [1.0]])))
        raw = r.contrib[p].values.tobytes()
        assert len(encoded) > 4000
        for start in range(0, len(encoded) - 16, 400):
            assert encoded[start:start + 16] not in wire
        for start in range(0, len(raw) - 16, 160):
            assert raw[start:start + 16] not in wire


@pytest.mark.parametrize(("g", "t"), [(3, 2), (5, 3)])
def test_a_member_sends_one_vector_sized_payload(g: int, t: int) -> None:
    r = Router(g, t)
    r.start()
    r.settle()
    union = r.sessions["p0"].coordinates.size
    vector = 4 * (union + 1)  # field elements of the coordinates and the count slot
    for p in r.members:
        sizes = [(o.kind, len(body_bytes(o.body))) for o in r.sent_by(p)
                 if o.kind not in (m.Kind.MASKED_START, m.Kind.MASKED_ACCEPT)]  # index sets, as v2
        big = [kind for kind, size in sizes if size > vector // 4]
        assert big == [m.Kind.MASKED], (p, sizes)
        masked = next(size for kind, size in sizes if kind is m.Kind.MASKED)
        assert masked == vector + 32 + 40  # context digest, nonce, Poly1305 tag
        small = sum(size for kind, size in sizes) - masked
        assert small < 400 * g, (p, sizes)
        # wire v2 sends 2(g - 1) sealed vectors of this size; even this small union halves it
        assert 2 * sum(size for _, size in sizes) < 2 * (g - 1) * vector


def test_counting_t_confirms_would_let_a_lone_initiator_unmask(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Why the quorum exceeds t: with the design's first rule (t CONFIRMs, own included) the
    split {p0, p1, p2} / {p0, p3, p4} completes on both sides at g = 5, t = 3."""
    monkeypatch.setattr(mm, "confirm_quorum", lambda g, t: t)
    r = Router(5, 3)
    views = {"p1": ("p0", "p1", "p2"), "p2": ("p0", "p1", "p2"),
             "p3": ("p0", "p3", "p4"), "p4": ("p0", "p3", "p4")}
    split_view(r, views, partition=True)
    r.start()
    r.settle()
    assert adversary_can_unmask(r, captured_key(r), ["p1", "p2", "p3", "p4"]) == [
        "p1", "p2", "p3", "p4"]


def test_messages_that_overtake_start_are_held_until_it_arrives() -> None:
    r = Router(3, 2)
    held: list[Outgoing] = []

    def link(sender: str, rcpt: str, out: Outgoing) -> bool:
        if out.kind is m.Kind.MASKED_START and rcpt == "p2" and not held:
            held.append(out)
            return False
        if held and sender == "p1" and out.kind is m.Kind.KEYS and rcpt == "p2":
            r.queue.append(("p0", held[0]))  # START reaches p2 only after p0's and p1's KEYS
            assert r.sessions["p2"].phase is MaskedPhase.ACCEPTED
        return True

    r.link = link
    r.start()
    r.settle()
    assert held and len(r.sessions["p2"].members) == 3
    assert_same_correct_sum(r, r.members, r.members)
    assert set(r.drops["p2"]) <= {"session_finished"}, r.drops  # surplus REVEALs only


def test_a_member_holding_every_masked_confirms_without_waiting_for_survivors() -> None:
    """The happy path saves a broker hop: each member confirms the full list as soon as it
    holds every MASKED; the initiator's SURVIVORS, naming the same list, is no drop."""
    r = Router(5, 3)
    adopted_first: dict[str, bool] = {}

    def link(sender: str, rcpt: str, out: Outgoing) -> bool:
        if out.kind is m.Kind.SURVIVORS:
            adopted_first[rcpt] = r.sessions[rcpt].survivors == tuple(r.members)
        return True

    r.link = link
    r.start()
    r.settle()
    assert adopted_first == {p: True for p in r.members[1:]}
    assert_same_correct_sum(r, r.members, r.members)
    # surplus REVEALs (only t are needed) are the only leftovers: no duplicate_survivors
    assert all(set(drops) <= {"session_finished"} for drops in r.drops.values()), r.drops
    assert all(len([o for o in r.sent_by(p) if o.kind is m.Kind.CONFIRM]) == 1
               for p in r.members)


def test_a_shorter_survivors_list_after_adopting_the_full_one_is_equivocation() -> None:
    r = Router(5, 3)
    shorter = ("p0", "p1", "p2", "p3")

    def tamper(sender: str, rcpt: str, out: Outgoing) -> Outgoing:
        if sender == "p0" and out.kind is m.Kind.SURVIVORS and rcpt == "p1":
            return Outgoing(rcpt, out.kind, mm.Survivors(shorter), out.seq)
        return out

    r.tamper = tamper
    r.start()
    r.settle()
    s = r.sessions["p1"]
    assert s.phase is MaskedPhase.ABORTED and s.abort_reason == "initiator_equivocated"
    assert not [o for o in r.sent_by("p1") if o.kind is m.Kind.REVEAL]
    assert adversary_can_unmask(r, captured_key(r), ["p1", "p2", "p3", "p4"]) == []
