"""The aggregation session state machine (peer/network/session/shamir.py), sans IO.

Simulated members exchange the sessions' outgoing messages in memory, each one encoded,
signed and decoded with the real codec and sealed with the real crypto. This is the protocol
unit itself, not a fake broker: the node integration runs over Mosquitto
(tests/test_node_mosquitto.py).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from crypto.field import FixedPoint
from crypto.identity import Identity
from crypto.sealing import SealContext, seal
from peer.network.session.shamir import (
    Contribution,
    Outgoing,
    Phase,
    Session,
    SessionContext,
    SessionParams,
    SessionTimeouts,
)
from protocol import messages as m
from protocol.codec import decode_message, encode_message

NET = "testnet"
PARAMS_N = 500
RESOLUTION = 2.0**-16


@dataclass
class Envelope:
    sender: str
    session_id: bytes
    out: Outgoing


@dataclass
class Harness:
    """n peers, each with identity, context, contribution and at most one session."""

    n: int
    group_size: int = 3
    threshold: int = 2
    k: int = 20
    ids: dict[str, Identity] = field(default_factory=dict)
    ctx: dict[str, SessionContext] = field(default_factory=dict)
    contrib: dict[str, Contribution] = field(default_factory=dict)
    sessions: dict[str, Session] = field(default_factory=dict)
    drops: dict[str, list[str]] = field(default_factory=dict)
    queue: deque[Envelope] = field(default_factory=deque)
    #: filters: return False to lose a message in transit
    link: Callable[[Envelope], bool] = lambda env: True
    tamper: Callable[[Envelope], Outgoing] | None = None
    sent: list[Envelope] = field(default_factory=list)
    #: max_colluders c of every peer, and of some peers when ``c_of`` names them
    c: int = 1
    c_of: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(1)
        for i in range(self.n):
            pid = f"p{i}"
            params = SessionParams(
                network_id=NET, model_id="mlp-test", param_count=PARAMS_N,
                group_size=self.group_size, threshold=self.threshold,
                fixed_point=FixedPoint(), timeouts=SessionTimeouts(1.0, 2.0, 3.0, 3.0),
                max_colluders=self.c_of.get(pid, self.c),
            )
            ident = Identity.generate(pid)
            self.ids[pid] = ident
            self.ctx[pid] = SessionContext(ident, params, self._box_key, m.SequenceCounter().next)
            idx = np.sort(rng.choice(PARAMS_N, size=self.k, replace=False)).astype(np.uint32)
            vals = rng.normal(0, 0.05, size=self.k).astype(np.float32)
            self.contrib[pid] = Contribution(idx, vals, round=0)
            self.drops[pid] = []

    def _box_key(self, peer: str) -> bytes | None:
        ident = self.ids.get(peer)
        return None if ident is None else ident.public.box_key

    def enqueue(self, sender: str, session_id: bytes, outs: list[Outgoing]) -> None:
        for out in outs:
            self.queue.append(Envelope(sender, session_id, out))

    def start(self, initiator: str, invitees: list[str], now: float = 0.0) -> bytes:
        sid = os.urandom(16)
        s, step = Session.initiate(self.ctx[initiator], sid, self.contrib[initiator], invitees,
                                   now)
        self.sessions[initiator] = s
        self.enqueue(initiator, sid, step.out)
        return sid

    def header(self, env: Envelope) -> m.Header:
        return m.Header(m.PROTOCOL_VERSION, NET, env.out.kind, env.sender, env.session_id,
                        env.out.seq)

    def deliver(self, env: Envelope, now: float) -> None:
        out = self.tamper(env) if self.tamper is not None else env.out
        wire = encode_message(self.header(Envelope(env.sender, env.session_id, out)), out.body,
                              self.ids[env.sender].sign)
        msg = decode_message(wire)  # the real codec validates every body
        rcpt = out.recipient
        if msg.header.kind is m.Kind.INVITE:
            assert isinstance(msg.body, m.Invite)
            if rcpt in self.sessions and not self.sessions[rcpt].finished:
                self.enqueue(rcpt, env.session_id, [Outgoing(env.sender, m.Kind.DECLINE,
                                                             m.Decline("busy"), 1)])
                return
            reason = Session.check_invite(self.ctx[rcpt].params, msg.body)
            assert reason is None, reason
            s, step = Session.join(self.ctx[rcpt], msg.header, msg.body, self.contrib[rcpt], now)
            self.sessions[rcpt] = s
            self.enqueue(rcpt, env.session_id, step.out)
            return
        s = self.sessions.get(rcpt)
        if s is None or s.session_id != env.session_id:
            self.drops[rcpt].append("unknown_session")
            return
        step = s.handle(msg.header, msg.body, now)
        self.drops[rcpt].extend(step.drops)
        self.enqueue(rcpt, env.session_id, step.out)

    def run(self, now: float = 0.0) -> None:
        while self.queue:
            env = self.queue.popleft()
            self.sent.append(env)
            if self.link(env):
                self.deliver(env, now)

    def tick(self, now: float) -> None:
        for pid, s in list(self.sessions.items()):
            step = s.on_timeout(now)
            self.enqueue(pid, s.session_id, step.out)
        self.run(now)

    def expected_sum(self, members: tuple[str, ...], coords: np.ndarray) -> np.ndarray:
        total = np.zeros(coords.size)
        for p in members:
            c = self.contrib[p]
            total[np.searchsorted(coords, c.indices)] += c.values.astype(np.float64)
        return total


def assert_done_and_consistent(h: Harness, members: list[str]) -> None:
    results = []
    for p in members:
        s = h.sessions[p]
        assert s.phase is Phase.DONE, (p, s.phase, s.abort_reason)
        assert s.result is not None
        results.append(s.result)
    first = results[0]
    for r in results[1:]:
        np.testing.assert_array_equal(r.coordinates, first.coordinates)
        np.testing.assert_array_equal(r.group_sum, first.group_sum)  # bit-identical
        assert r.contributors == first.contributors
    expected = h.expected_sum(first.members, first.coordinates)
    np.testing.assert_allclose(first.group_sum, expected, atol=len(members) * RESOLUTION)
    # coordinates are the union of the members' index sets
    union = np.unique(np.concatenate([h.contrib[p].indices for p in first.members]))
    np.testing.assert_array_equal(first.coordinates, union)
    for r, p in zip(results, members, strict=True):
        own = np.zeros(r.coordinates.size)
        c = h.contrib[p]
        own[np.searchsorted(r.coordinates, c.indices)] = c.values
        np.testing.assert_allclose(r.own_values, own, atol=RESOLUTION)


@pytest.mark.parametrize(("g", "t"), [(3, 2), (3, 3), (4, 2), (4, 3), (5, 3), (5, 5)])
def test_happy_path(g: int, t: int) -> None:
    h = Harness(n=g, group_size=g, threshold=t)
    members = [f"p{i}" for i in range(g)]
    h.start("p0", members[1:])
    h.run()
    assert_done_and_consistent(h, members)
    # surplus partials (beyond t) reach members that already rebuilt: expected, not an error
    assert all(set(d) <= {"session_finished"} for d in h.drops.values()), h.drops


def test_share_plaintext_never_travels() -> None:
    """Every share and partial plaintext and every member's encoded vector, read from the
    sessions' audit tap before sealing, is absent from the wire bytes of every message sent."""
    h = Harness(n=3)
    tapped: list[tuple[str, bytes]] = []
    for pid, ctx in h.ctx.items():
        h.ctx[pid] = SessionContext(ctx.identity, ctx.params, ctx.box_key_of, ctx.next_seq,
                                    secret_tap=lambda label, secret: tapped.append((label, secret)))
    h.start("p0", ["p1", "p2"])
    h.run()
    assert_done_and_consistent(h, ["p0", "p1", "p2"])
    labels = [label for label, _ in tapped]
    # each member: two shares and one partial, and its own vector
    assert (labels.count("share_plaintext"), labels.count("own_vector")) == (9, 3)
    wires = [encode_message(h.header(env), env.out.body, h.ids[env.sender].sign)
             for env in h.sent]
    assert sum(isinstance(env.out.body, m.Share | m.Partial) for env in h.sent) == 12
    for label, secret in tapped:
        assert all(wire.find(secret) == -1 for wire in wires), label


def test_early_shares_are_buffered_until_start() -> None:
    h = Harness(n=3)
    held: list[Envelope] = []

    def hold_start(env: Envelope) -> bool:
        # Delay the Start to p2 until after p1's share reached p2.
        if env.out.kind is m.Kind.START and env.out.recipient == "p2":
            held.append(env)
            return False
        return True

    h.link = hold_start
    h.start("p0", ["p1", "p2"])
    h.run()
    assert h.sessions["p2"].phase is Phase.ACCEPTED
    h.link = lambda env: True
    h.queue.extend(held)
    h.run()
    assert_done_and_consistent(h, ["p0", "p1", "p2"])


def test_decline_leaves_too_few_members_and_aborts_everyone() -> None:
    h = Harness(n=3)
    h.sessions["p2"] = Session.initiate(h.ctx["p2"], os.urandom(16), h.contrib["p2"],
                                        ["p1", "p0"][:2], 0.0)[0]  # p2 is busy
    sid = h.start("p0", ["p1", "p2"])
    h.run()
    s0 = h.sessions["p0"]
    assert s0.phase is Phase.ABORTED and s0.abort_reason == "too_few_members"
    s1 = h.sessions["p1"]
    assert s1.session_id == sid
    assert s1.phase is Phase.ABORTED and s1.abort_reason == "aborted_by_initiator"
    assert s0.result is None and s1.result is None


def test_invite_timeout_fixes_group_with_those_who_answered() -> None:
    h = Harness(n=4, group_size=4, threshold=2)
    h.link = lambda env: not (env.out.kind is m.Kind.INVITE and env.out.recipient == "p3")
    h.start("p0", ["p1", "p2", "p3"])
    h.run()
    assert h.sessions["p0"].phase is Phase.INVITING
    h.tick(0.5)  # before the deadline: nothing happens
    assert h.sessions["p0"].phase is Phase.INVITING
    h.tick(1.1)
    assert_done_and_consistent(h, ["p0", "p1", "p2"])
    assert h.sessions["p0"].members == ("p0", "p1", "p2")


def test_member_gone_after_shares_is_tolerated_down_to_t() -> None:
    h = Harness(n=4, group_size=4, threshold=3)
    # p3 sends its shares, then vanishes: none of its partials arrive.
    h.link = lambda env: not (env.sender == "p3" and env.out.kind is m.Kind.PARTIAL)
    h.start("p0", ["p1", "p2", "p3"])
    h.run()
    assert_done_and_consistent(h, ["p0", "p1", "p2"])
    # the group sum still includes p3's contribution: its shares were out
    assert h.sessions["p0"].result is not None
    assert "p3" in h.sessions["p0"].result.contributors


def test_member_gone_after_shares_below_threshold_aborts_on_timeout() -> None:
    h = Harness(n=4, group_size=4, threshold=4)
    h.link = lambda env: not (env.sender == "p3" and env.out.kind is m.Kind.PARTIAL)
    h.start("p0", ["p1", "p2", "p3"])
    h.run()
    for p in ("p0", "p1", "p2"):
        assert h.sessions[p].phase is Phase.PARTIALS
    h.tick(10.0)
    for p in ("p0", "p1", "p2"):
        s = h.sessions[p]
        assert s.phase is Phase.ABORTED and s.abort_reason == "timeout_partials"
        assert s.result is None
        held = s.held_counts()
        assert held["shares"] == held["partials"] == 0  # nothing kept after an abort


def test_member_gone_before_shares_aborts_everyone() -> None:
    h = Harness(n=3)
    h.link = lambda env: not (env.sender == "p2" and env.out.kind is m.Kind.SHARE)
    h.start("p0", ["p1", "p2"])
    h.run()
    assert h.sessions["p0"].phase is Phase.SHARING
    h.tick(10.0)
    for p in ("p0", "p1"):
        s = h.sessions[p]
        assert s.phase is Phase.ABORTED and s.abort_reason == "timeout_sharing"
        assert s.result is None


def test_abort_from_member_without_share_aborts_at_once() -> None:
    h = Harness(n=3)
    h.link = lambda env: not (env.sender == "p2" and env.out.kind is m.Kind.SHARE)
    h.start("p0", ["p1", "p2"])
    h.run()
    h.enqueue("p2", h.sessions["p2"].session_id, h.sessions["p2"].abort("stopping").out)
    h.run()
    for p in ("p0", "p1"):
        assert h.sessions[p].phase is Phase.ABORTED
        assert (h.sessions[p].abort_reason or "").startswith("member_aborted")


def test_wrong_contributor_set_is_dropped() -> None:
    h = Harness(n=3, threshold=3)

    def shrink(env: Envelope) -> Outgoing:
        body = env.out.body
        if isinstance(body, m.Partial) and env.sender == "p1":
            body = m.Partial(body.recipient, ("p0", "p1"), body.sealed)
            return Outgoing(env.out.recipient, env.out.kind, body, env.out.seq)
        return env.out

    h.tamper = shrink
    h.start("p0", ["p1", "p2"])
    h.run()
    assert "wrong_contributors" in h.drops["p0"]
    assert "wrong_contributors" in h.drops["p2"]
    h.tick(10.0)
    assert h.sessions["p0"].phase is Phase.ABORTED
    assert h.sessions["p0"].result is None


def test_tampered_and_misbound_seals_are_dropped() -> None:
    h = Harness(n=3)

    def corrupt(env: Envelope) -> Outgoing:
        body = env.out.body
        if isinstance(body, m.Share) and env.sender == "p1" and env.out.recipient == "p2":
            sealed = bytearray(body.sealed)
            sealed[-1] ^= 1
            return Outgoing(env.out.recipient, env.out.kind, m.Share(body.recipient,
                                                                     bytes(sealed)), env.out.seq)
        if isinstance(body, m.Share) and env.sender == "p2" and env.out.recipient == "p0":
            # same sealed bytes under another seq: the seal's bound context no longer matches
            return Outgoing(env.out.recipient, env.out.kind, body, env.out.seq + 1)
        return env.out

    h.tamper = corrupt
    h.start("p0", ["p1", "p2"])
    h.run()
    assert h.drops["p2"].count("bad_seal") == 1
    assert h.drops["p0"].count("bad_seal") == 1


def test_garbage_partial_from_a_member_is_detected() -> None:
    h = Harness(n=3, threshold=3)  # every partial is needed, p1's garbage one too

    def garbage(env: Envelope) -> Outgoing:
        body = env.out.body
        if isinstance(body, m.Partial) and env.sender == "p1":
            size = h.sessions["p1"].coordinates.size + 1
            junk = np.random.default_rng(7).integers(0, 2**31 - 1, size, dtype=np.uint32)
            ctx = SealContext(NET, env.session_id, "p1", env.out.recipient, env.out.seq)
            sealed = seal(h.ids["p1"], h.ids[env.out.recipient].public.box_key, ctx,
                          junk.astype("<u4").tobytes())
            return Outgoing(env.out.recipient, env.out.kind,
                            m.Partial(body.recipient, body.contributors, sealed), env.out.seq)
        return env.out

    h.tamper = garbage
    h.start("p0", ["p1", "p2"])
    h.run()
    for p in ("p0", "p2"):
        s = h.sessions[p]
        assert s.phase is Phase.ABORTED and s.abort_reason == "inconsistent_sum"
        assert s.result is None


def test_start_checks() -> None:
    h = Harness(n=4)
    sid = os.urandom(16)
    invite = m.Invite(3, 2, "mlp-test", PARAMS_N, 16)
    hdr = m.Header(1, NET, m.Kind.INVITE, "p0", sid, 1)
    s, _ = Session.join(h.ctx["p1"], hdr, invite, h.contrib["p1"], 0.0)

    def start_from(sender: str, members: tuple[str, ...], coords: np.ndarray, t: int = 2) -> list:
        header = m.Header(1, NET, m.Kind.START, sender, sid, 2)
        return s.handle(header, m.Start(members, t, coords), 0.0).drops

    full = np.unique(np.concatenate([h.contrib[p].indices for p in ("p0", "p1", "p2")]))
    assert start_from("p2", ("p2", "p1", "p0"), full) == ["start_not_from_initiator"]
    assert start_from("p0", ("p0", "p2", "p3"), full) == ["bad_members"]
    assert start_from("p0", ("p0", "p1", "p2", "p3"), full) == ["bad_members"]  # > group size
    assert start_from("p0", ("p0", "p1", "p2"), full, t=3) == ["bad_threshold"]
    missing_own = np.setdiff1d(full, h.contrib["p1"].indices[:1]).astype(np.uint32)
    assert start_from("p0", ("p0", "p1", "p2"), missing_own) == ["bad_coordinates"]
    assert s.phase is Phase.ACCEPTED
    assert start_from("p0", ("p0", "p1", "p2"), full) == []
    assert s.phase is Phase.SHARING


def test_check_invite_reasons() -> None:
    h = Harness(n=1, group_size=3, threshold=2)
    params = h.ctx["p0"].params
    assert Session.check_invite(params, m.Invite(3, 2, "mlp-test", PARAMS_N, 16)) is None
    assert Session.check_invite(params, m.Invite(3, 2, "cnn", PARAMS_N, 16)) == "model_mismatch"
    assert Session.check_invite(params, m.Invite(3, 2, "mlp-test", 7, 16)) == "model_mismatch"
    assert Session.check_invite(params, m.Invite(3, 2, "mlp-test", PARAMS_N, 20)) == (
        "encoding_mismatch"
    )
    assert Session.check_invite(params, m.Invite(17, 2, "mlp-test", PARAMS_N, 16)) == (
        "bad_group_size"
    )
    strict = SessionParams(NET, "mlp-test", PARAMS_N, group_size=4, threshold=3)
    assert Session.check_invite(strict, m.Invite(4, 2, "mlp-test", PARAMS_N, 16)) == (
        "bad_threshold"
    )


def test_late_accept_is_released_and_duplicates_dropped() -> None:
    h = Harness(n=4, group_size=4)
    held: list[Envelope] = []

    def hold_p3_accept(env: Envelope) -> bool:
        if env.out.kind is m.Kind.ACCEPT and env.sender == "p3":
            held.append(env)
            return False
        return True

    h.link = hold_p3_accept
    h.start("p0", ["p1", "p2", "p3"])
    h.run()
    h.tick(1.5)  # invite timeout: group is p0, p1, p2
    assert_done_and_consistent(h, ["p0", "p1", "p2"])
    # p0 is done: a late accept now is a finished-session message
    h.link = lambda env: True
    h.queue.extend(held)
    h.run()
    assert "session_finished" in h.drops["p0"]


def test_unanswered_invitee_is_released_when_group_is_fixed() -> None:
    h = Harness(n=4, group_size=4)
    held: list[Envelope] = []

    def hold(env: Envelope) -> bool:
        if env.out.kind is m.Kind.ACCEPT and env.sender == "p3":
            held.append(env)
            return False
        return True

    h.link = hold
    h.start("p0", ["p1", "p2", "p3"])
    h.run()
    h.tick(1.5)  # invite timeout: group p0, p1, p2; p3 is released at once
    s3 = h.sessions["p3"]
    assert s3.phase is Phase.ABORTED and s3.abort_reason == "not_selected"
    assert_done_and_consistent(h, ["p0", "p1", "p2"])


def test_over_inviting_takes_the_first_acceptors() -> None:
    h = Harness(n=5, group_size=3)
    sid = h.start("p0", ["p1", "p2", "p3", "p4"])
    assert all(env.out.body == m.Invite(3, 2, "mlp-test", PARAMS_N, 16) for env in h.queue)
    h.run()
    s0 = h.sessions["p0"]
    assert s0.members == ("p0", "p1", "p2")  # accepts arrive in invite order here
    assert_done_and_consistent(h, ["p0", "p1", "p2"])
    for p in ("p3", "p4"):
        s = h.sessions[p]
        assert s.session_id == sid
        assert s.phase is Phase.ABORTED and s.abort_reason == "not_selected"
    assert all(set(d) <= {"session_finished"} for d in h.drops.values()), h.drops


def test_accepted_member_times_out_without_start() -> None:
    h = Harness(n=3)
    h.link = lambda env: env.out.kind is not m.Kind.START
    h.start("p0", ["p1", "p2"])
    h.run()
    h.tick(2.5)
    for p in ("p1", "p2"):
        assert h.sessions[p].phase is Phase.ABORTED
        assert h.sessions[p].abort_reason == "timeout_accepted"


def test_residual_fill_makes_every_member_contribute_on_every_coordinate() -> None:
    h = Harness(n=3)
    residuals = {p: np.random.default_rng(i + 10).normal(0, 0.01, PARAMS_N).astype(np.float32)
                 for i, p in enumerate(("p0", "p1", "p2"))}
    for p, c in list(h.contrib.items()):
        h.contrib[p] = Contribution(c.indices, c.values, 0,
                                    fill=lambda idx, r=residuals[p]: r[idx])
    h.start("p0", ["p1", "p2"])
    h.run()
    results = {p: h.sessions[p].result for p in ("p0", "p1", "p2")}
    assert all(r is not None for r in results.values())
    coords = results["p0"].coordinates
    expected = h.expected_sum(("p0", "p1", "p2"), coords)
    for p, r in results.items():
        own = set(h.contrib[p].indices.tolist())
        assert r.filled_indices.tolist() == [c for c in coords.tolist() if c not in own]
        np.testing.assert_array_equal(r.filled_values, residuals[p][r.filled_indices])
        expected[np.searchsorted(coords, r.filled_indices)] += r.filled_values
    for r in results.values():
        np.testing.assert_allclose(r.group_sum, expected, atol=3 * RESOLUTION)


def test_failing_fill_falls_back_to_zeros() -> None:
    h = Harness(n=3)

    def broken(idx: np.ndarray) -> np.ndarray:
        raise RuntimeError("trainer bug")

    c = h.contrib["p1"]
    h.contrib["p1"] = Contribution(c.indices, c.values, 0, fill=broken)
    h.start("p0", ["p1", "p2"])
    h.run()
    assert_done_and_consistent(h, ["p0", "p1", "p2"])
    assert h.sessions["p1"].result.filled_indices.size == 0


def test_hostile_members_never_crash_a_session() -> None:
    """Random, well-formed but hostile bodies from members: dropped or aborted, never raised."""
    rng = np.random.default_rng(5)
    phases: set[Phase] = set()
    for trial in range(40):
        h = Harness(n=3, threshold=3)
        # lose some of p2's traffic so p0 and p1 wait in each phase in turn while attacked
        lost = [None, m.Kind.SHARE, m.Kind.PARTIAL][trial % 3]
        h.link = lambda env, lost=lost: env.sender != "p2" or (
            lost is not None and env.out.kind is not lost)
        h.start("p0", ["p1", "p2"])
        h.run()
        target = h.sessions["p1"] if trial % 2 else h.sessions["p0"]
        phases.add(target.phase)
        sid = target.session_id
        for _ in range(6):
            kind = [m.Kind.SHARE, m.Kind.PARTIAL, m.Kind.START, m.Kind.ACCEPT,
                    m.Kind.DECLINE, m.Kind.ABORT][int(rng.integers(0, 6))]
            sender = ["p0", "p1", "p2", "zed"][int(rng.integers(0, 4))]
            blob = rng.bytes(int(rng.integers(16, 200)))
            idx = np.unique(rng.integers(0, PARAMS_N + 5, int(rng.integers(1, 30)))).astype(
                np.uint32)
            body = {
                m.Kind.SHARE: m.Share(target.ctx.self_id, blob),
                m.Kind.PARTIAL: m.Partial(target.ctx.self_id, ("p0", "p1", "p2"), blob),
                m.Kind.START: m.Start((sender, "p1", "p0"), 2, idx),
                m.Kind.ACCEPT: m.Accept(idx),
                m.Kind.DECLINE: m.Decline("x"),
                m.Kind.ABORT: m.Abort("x"),
            }[kind]
            header = m.Header(1, NET, kind, sender, sid, int(rng.integers(0, 2**40)))
            step = target.handle(header, body, 0.0)
            assert isinstance(step.drops, list)
        assert target.phase in set(Phase)
        assert target.result is None  # nothing hostile ever completes a rebuild
    assert {Phase.INVITING, Phase.ACCEPTED, Phase.SHARING, Phase.PARTIALS} <= phases
