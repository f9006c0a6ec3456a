"""The sum invariant of docs/sessions.md section 3.3, on the real state machines and crypto.

A sum is revealed only if it holds at least max(3, c + 2) contributions (c = max_colluders),
and a member whose vector went out never confirms a sum without itself. Findings 1 and 2 of
the outside review are here as tests, then one test per row of the tolerance table, then a
property test over random dropouts, delays, a lying initiator and colluders: whatever happens,
no coalition of c members can solve for one honest member's vector from what was revealed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer.network.session import masked_messages as mm
from peer.network.session.common import min_contributors
from peer.network.session.masked import MaskedPhase
from peer.network.session.shamir import Outgoing, Phase, Session, SessionParams
from protocol import messages as m
from tests.test_masked_session import Router, assert_same_correct_sum, wire_header
from tests.test_session import Envelope, Harness, assert_done_and_consistent

# ----------------------------------------------------------------------------- helpers


def masked_to_or_from(*peers: str) -> Callable[[str, str, Outgoing], bool]:
    """A broker that withholds every MASKED sent by or to ``peers``."""
    return lambda sender, rcpt, out: not (
        out.kind is m.Kind.MASKED and (sender in peers or rcpt in peers))


def assert_nothing_revealed(r: Router) -> None:
    for p, s in r.sessions.items():
        assert s.result is None and s.revealed_for is None
        assert p in r.dead or s.phase is MaskedPhase.ABORTED, (p, s.phase)
    assert not [o for _, o in r.sent if o.kind is m.Kind.REVEAL]


def survivors_from_initiator(r: Router, rcpt: str, survivors: tuple[str, ...]) -> list[str]:
    """Hand ``rcpt`` a SURVIVORS list signed by the initiator (a lying initiator's); returns
    the kinds ``rcpt`` sends in answer."""
    header = wire_header(m.Kind.SURVIVORS, "p0", r.sid, 10**6)
    step = r.sessions[rcpt].handle(header, mm.Survivors(survivors), 10.0)
    return [o.kind.name for o in step.out]


# ----------------------------------------------------------------------- the findings


def test_finding_1_a_masked_sum_of_two_is_never_revealed() -> None:
    """g = 3, t = 2: p2's MASKED, and every MASKED to p2, are held back. The survivors would
    be p0 and p1, and p0's sum minus its own vector would be p1's whole vector."""
    r = Router(3, 2, link=masked_to_or_from("p2"))
    r.start()
    r.settle()
    assert_nothing_revealed(r)
    assert r.sessions["p0"].abort_reason == "too_few_contributors"
    assert not [o for _, o in r.sent if o.kind in (m.Kind.SURVIVORS, m.Kind.CONFIRM)]


def test_finding_1_a_lying_initiator_cannot_make_a_member_confirm_two() -> None:
    r = Router(3, 2, link=masked_to_or_from("p2"))
    r.start()
    r.run(0.0)
    assert r.sessions["p1"].phase is MaskedPhase.MASKED  # its vector is out
    answer = survivors_from_initiator(r, "p1", ("p0", "p1"))
    assert "CONFIRM" not in answer
    assert r.sessions["p1"].phase is MaskedPhase.ABORTED
    assert r.sessions["p1"].abort_reason == "too_few_contributors"


def test_a_member_never_confirms_a_list_without_itself() -> None:
    r = Router(5, 3, link=lambda sender, rcpt, out: out.kind is not m.Kind.MASKED)
    r.start()
    r.run(0.0)
    assert r.sessions["p1"].phase is MaskedPhase.MASKED
    answer = survivors_from_initiator(r, "p1", ("p0", "p2", "p3", "p4"))
    assert "CONFIRM" not in answer
    assert r.sessions["p1"].abort_reason == "excluded_from_survivors"
    assert r.sessions["p1"].revealed_for is None


def test_finding_2_with_two_colluders_three_survivors_are_refused() -> None:
    """g = 5, t = 3: p3's and p4's MASKEDs are lost. With c = 2 a sum of three would hand two
    colluding survivors the third's vector, so it is refused: the initiator (its own c = 2)
    never sends the list."""
    r = Router(5, 3, c=2, link=lambda s, rcpt, out: not (
        out.kind is m.Kind.MASKED and s in ("p3", "p4")))
    r.start()
    r.settle()
    assert_nothing_revealed(r)
    assert r.sessions["p0"].abort_reason == "too_few_contributors"


def test_finding_2_members_with_two_colluders_refuse_an_initiators_short_list() -> None:
    """The initiator allows three (its c = 1); p1 and p2 run with c = 2 and refuse."""
    r = Router(5, 3, c=2, c_of={"p0": 1}, link=lambda s, rcpt, out: not (
        out.kind is m.Kind.MASKED and s in ("p3", "p4")))
    r.start()
    r.settle()
    assert_nothing_revealed(r)
    assert r.sessions["p1"].abort_reason == "too_few_contributors"
    assert r.sessions["p2"].abort_reason == "too_few_contributors"
    assert r.sessions["p3"].abort_reason == "excluded_from_survivors"


def test_finding_2_with_one_colluder_three_survivors_miss_the_quorum() -> None:
    """With the default c = 1 a sum of three is allowed by the invariant (two colluders are
    outside the trust model), but the excluded members may not confirm it, so the three
    survivors miss the quorum of 4 and nothing is revealed."""
    r = Router(5, 3, link=lambda s, rcpt, out: not (
        out.kind is m.Kind.MASKED and s in ("p3", "p4")))
    r.start()
    r.settle()
    assert_nothing_revealed(r)
    assert r.sessions["p1"].abort_reason == "timeout_confirming"
    assert r.sessions["p4"].abort_reason == "excluded_from_survivors"


def test_settings_that_cannot_keep_the_invariant_are_refused() -> None:
    for g, t, c in ((3, 2, 2), (5, 2, 2), (4, 3, 3), (5, 3, 0)):
        with pytest.raises(ValueError, match="max_colluders"):
            SessionParams("net", "mlp", 100, group_size=g, threshold=t, max_colluders=c)
    assert min_contributors(1) == 3 and min_contributors(2) == 4 and min_contributors(5) == 7


def test_invites_and_starts_below_a_members_invariant_are_refused() -> None:
    strict = SessionParams("net", "mlp-test", 4000, group_size=5, threshold=3, max_colluders=2)
    invite = m.Invite(group_size=3, threshold=3, model_id="mlp-test", param_count=4000,
                      frac_bits=strict.fixed_point.frac_bits)
    assert Session.check_invite(strict, invite) == "bad_group_size"
    lax = SessionParams("net", "mlp-test", 4000, group_size=4, threshold=2)
    invite = m.Invite(group_size=4, threshold=2, model_id="mlp-test", param_count=4000,
                      frac_bits=strict.fixed_point.frac_bits)
    assert Session.check_invite(strict, invite) == "bad_threshold"
    assert Session.check_invite(lax, invite) is None


@pytest.mark.parametrize("kind", ["shamir", "masked"])
def test_a_member_with_two_colluders_never_shares_into_a_group_of_three(kind: str) -> None:
    """p0 (c = 1) forms a group of three from five invitees' answers; p1 (c = 2) aborts at
    START before any share or mask of its vector exists."""
    if kind == "shamir":
        h = Harness(n=5, group_size=5, threshold=3, c=2, c_of={"p0": 1})
        h.link = lambda env: not (env.out.kind is m.Kind.ACCEPT and env.sender in ("p3", "p4"))
        h.start("p0", ["p1", "p2", "p3", "p4"])
        h.run()
        h.tick(1.5)  # invite timeout: the group is p0, p1, p2
        assert h.sessions["p1"].abort_reason == "too_few_members"
        assert not [e for e in h.sent if e.sender == "p1" and e.out.kind is m.Kind.SHARE]
        return
    r = Router(5, 3, c=2, c_of={"p0": 1}, link=lambda s, rcpt, out: not (
        out.kind is m.Kind.MASKED_ACCEPT and s in ("p3", "p4")))
    r.start()
    r.run(0.0)
    r.queue.extend(("p0", o) for o in r.sessions["p0"].on_timeout(1.5).out)
    r.run(1.5)
    assert r.sessions["p1"].abort_reason == "too_few_members"
    assert not [o for s, o in r.sent if s == "p1" and o.kind is m.Kind.KEYS]


# ------------------------------------------------------------ the tolerance table rows

#: (g, t, c) of docs/sessions.md section 3.3's table, with the masked quorum q.
TABLE = [(3, 2, 1, 3), (5, 3, 1, 4), (5, 3, 2, 4), (8, 5, 1, 7), (8, 5, 3, 7)]


@pytest.mark.parametrize(("g", "t", "c", "q"), TABLE)
def test_table_masked_quorum_and_dropouts(g: int, t: int, c: int, q: int) -> None:
    assert mm.confirm_quorum(g, t) == q
    tolerated = g - q
    for dropouts, finishes in ((tolerated, True), (tolerated + 1, False)):
        dying = [f"p{g - 1 - i}" for i in range(dropouts)]
        r = Router(g, t, c=c, die_on=dict.fromkeys(dying, m.Kind.MASKED))
        r.start()
        r.settle()
        alive = [p for p in r.members if p not in dying]
        if finishes:
            assert_same_correct_sum(r, alive, alive)
            assert len(alive) >= min_contributors(c)
        else:
            assert_nothing_revealed(r)


@pytest.mark.parametrize(("g", "t", "c", "q"), TABLE)
def test_table_shamir_dropouts_after_shares(g: int, t: int, c: int, q: int) -> None:
    tolerated = g - t
    for dropouts, finishes in ((tolerated, True), (tolerated + 1, False)):
        gone = {f"p{g - 1 - i}" for i in range(dropouts)}
        h = Harness(n=g, group_size=g, threshold=t, c=c)
        h.link = lambda env, gone=gone: not (env.sender in gone
                                             and env.out.kind is m.Kind.PARTIAL)
        h.start("p0", [f"p{i}" for i in range(1, g)])
        h.run()
        h.tick(10.0)
        alive = [f"p{i}" for i in range(g) if f"p{i}" not in gone]
        if finishes:
            assert_done_and_consistent(h, alive)
            result = h.sessions["p0"].result
            assert result is not None and len(result.contributors) == g  # gone ones included
        else:
            assert all(h.sessions[p].phase is Phase.ABORTED for p in alive)
            assert all(h.sessions[p].result is None for p in alive)


# --------------------------------------------------------------------- property test


def exposed_sets(g: int, t: int, coalition: set[str], published: set[str],
                 revealed: list[tuple[str, ...]]) -> list[frozenset[str]]:
    """Every set S of members whose summed vectors the coalition can unmask from what the
    honest members revealed (``revealed``: one list per honest REVEAL) and its own secrets.

    The coalition holds every masked vector that was published, its own seeds and ephemeral
    keys, and one share of everyone's. A member's self seed is known with t shares (honest
    self-seed reveals plus the coalition's own), its ephemeral key likewise. S's masked sum
    unmasks if every seed in S is known and, for every pair across S's border, one of the two
    ephemeral keys is (pairs inside S cancel).
    """
    members = [f"p{i}" for i in range(g)]
    c = len(coalition)

    def seed_known(v: str) -> bool:
        return v in coalition or sum(v in lst for lst in revealed) + c >= t

    def key_known(v: str) -> bool:
        return v in coalition or sum(v not in lst for lst in revealed) + c >= t

    out = []
    candidates = sorted(published)
    for size in range(1, len(candidates) + 1):
        for combo in itertools.combinations(candidates, size):
            s = set(combo)
            if all(seed_known(v) for v in s) and all(
                    key_known(a) or key_known(b)
                    for a in s for b in members if b not in s):
                out.append(frozenset(s))
    return out


def solvable(members: list[str], coalition: set[str], sets: list[frozenset[str]]) -> set[str]:
    """Honest members whose vector is a linear combination of the exposed sums, once the
    coalition subtracts its own vectors."""
    honest = [p for p in members if p not in coalition]
    rows = np.array([[1.0 if p in s else 0.0 for p in honest] for s in sets] or
                    [[0.0] * len(honest)])
    rank = np.linalg.matrix_rank(rows)
    found = set()
    for i, p in enumerate(honest):
        unit = np.zeros((1, len(honest)))
        unit[0, i] = 1.0
        if np.linalg.matrix_rank(np.vstack([rows, unit])) == rank:
            found.add(p)
    return found


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    """A group, each member's own max_colluders, a coalition, each member's fate, which
    recipients lose whose MASKED, and (when the initiator colludes) a split view."""
    g = draw(st.integers(3, 6))
    t = draw(st.integers(2, g))
    most = min(t - 1, g - 2)  # the largest c a member of this group may run with
    members = [f"p{i}" for i in range(g)]
    c_of = {p: draw(st.integers(1, most)) for p in members}
    size = draw(st.integers(1, most))
    if draw(st.booleans()):  # half the cases: the initiator is one of the colluders
        coalition = {"p0", *draw(st.permutations(members[1:]))[:size - 1]}
    else:
        coalition = set(draw(st.permutations(members))[:size])
    fates = {p: draw(st.sampled_from(["ok"] * 5 + ["die_keys", "die_masked", "die_confirm",
                                                   "lost", "late"])) for p in members[1:]}
    hidden_from = {p: set(draw(st.lists(st.sampled_from(members), unique=True)))
                   for p in members[1:]}
    split = "p0" in coalition and draw(st.booleans())
    return {"g": g, "t": t, "c_of": c_of, "coalition": coalition, "fates": fates,
            "hidden_from": hidden_from, "split": split, "split_at": draw(st.integers(0, g)),
            "seed": draw(st.integers(0, 3))}


def run_scenario(sc: dict) -> Router:
    """One masked session under the drawn dropouts, delays, losses and (when the initiator
    colludes) a split view with forged CONFIRMs delivered per recipient."""
    g, t, coalition, fates = sc["g"], sc["t"], sc["coalition"], sc["fates"]
    die_kind = {"die_keys": m.Kind.KEYS, "die_masked": m.Kind.MASKED,
                "die_confirm": m.Kind.CONFIRM}
    die_on = {p: die_kind[f] for p, f in fates.items() if f in die_kind}
    held: list[tuple[str, str, Outgoing]] = []
    released = [False]
    honest = [f"p{i}" for i in range(g) if f"p{i}" not in coalition]
    victim = next((p for p in honest if p != "p0"), None)
    side_b = set(honest[sc.get("split_at", len(honest) // 2):]) - {"p0"}

    def link(sender: str, rcpt: str, out: Outgoing) -> bool:
        if sc["split"] and out.kind is m.Kind.ABORT and sender in coalition:
            return False  # a lying initiator never calls its split off
        if sc["split"] and out.kind is m.Kind.CONFIRM and sender not in coalition:
            return (sender in side_b) == (rcpt in side_b)  # the broker keeps the sides apart
        if out.kind is not m.Kind.MASKED or released[0]:
            return True
        fate = fates.get(sender, "ok")
        hidden = fate == "lost" and rcpt in sc["hidden_from"].get(sender, set())
        if sc["split"] and sender == victim and rcpt in side_b | {"p0"}:
            hidden = True  # the colluding broker keeps the victim's vector from one side
        if fate == "late" or (hidden and fate != "lost"):
            held.append((sender, rcpt, out))
            return False
        return not hidden

    # The lying initiator's two lists: everyone who may have a masked vector out (L1), and
    # L1 without the victim (L2) for side B; the colluders confirm each side's list to it.
    full = tuple(p for p in (f"p{i}" for i in range(g))
                 if fates.get(p, "ok") in ("ok", "late", "die_confirm"))
    lists = {"a": full, "b": tuple(p for p in full if p != victim)}

    def tamper(sender: str, rcpt: str, out: Outgoing) -> Outgoing:
        if not sc["split"] or victim is None:
            return out
        listed = lists["b" if rcpt in side_b else "a"]
        if sender == "p0" and out.kind is m.Kind.SURVIVORS:
            return Outgoing(out.recipient, out.kind, mm.Survivors(listed), out.seq)
        if sender in coalition and out.kind is m.Kind.CONFIRM:
            return Outgoing(out.recipient, out.kind, mm.Confirm(listed), out.seq)
        return out

    r = Router(g, t, c_of=sc["c_of"], die_on=die_on, link=link, tamper=tamper,
               seed=sc["seed"])
    r.start()
    now = 0.0
    r.run(now)
    for step in range(200):  # one deadline at a time, the earliest first (initiator on ties)
        live = [(p, s) for p, s in r.sessions.items() if p not in r.dead and not s.finished]
        if not live:
            break
        p, s = min(live, key=lambda ps: (ps[1].deadline, ps[0]))
        now = max(now, s.deadline)
        r.queue.extend((p, o) for o in s.on_timeout(now).out)
        r.run(now)
        if step == 0:  # the late messages arrive after the first deadline
            released[0] = True
            for sender, rcpt, out in held:
                r.deliver(sender, rcpt, out, now)
            r.run(now)
    return r


def check_no_protected_vector_solvable(r: Router, sc: dict) -> None:
    """What the test promises for one finished session: every honest member that finished is
    in its sum and the sum holds at least max(t, its c + 2) contributions; honest members
    finish with one sum; and no honest member whose own c covers the coalition has a vector
    the coalition can solve for from what the honest members revealed."""
    g, t, coalition, c_of = sc["g"], sc["t"], sc["coalition"], sc["c_of"]
    honest = [p for p in r.members if p not in coalition]
    contributor_sets = set()
    for p in honest:
        s = r.sessions.get(p)
        if s is None or s.result is None:
            continue
        contributors = s.result.contributors
        assert p in contributors, (p, contributors)
        assert len(contributors) >= max(t, min_contributors(c_of[p])), (p, contributors)
        contributor_sets.add(contributors)
        expected = sum(r.dense(q, s.result.coordinates) for q in contributors)
        np.testing.assert_allclose(s.result.group_sum, expected, atol=g * 2.0**-16)
    assert len(contributor_sets) <= 1, contributor_sets  # one sum per session, never two
    revealed = [s.revealed_for for p, s in r.sessions.items()
                if p in honest and s.revealed_for is not None]
    for p, s in r.sessions.items():
        if p in honest and s.revealed_for is not None:
            assert p in s.revealed_for and len(s.revealed_for) >= min_contributors(c_of[p])
    published = {sender for sender, o in r.sent if o.kind is m.Kind.MASKED}
    sets = exposed_sets(g, t, coalition, published, revealed)
    protected = {p for p in honest if c_of[p] >= len(coalition)}
    assert not solvable(r.members, coalition, sets) & protected, (sc, revealed, sets)


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_no_coalition_of_c_solves_for_an_honest_vector(sc: dict) -> None:
    check_no_protected_vector_solvable(run_scenario(sc), sc)


def all_ok(g: int) -> dict:
    return {"fates": {f"p{i}": "ok" for i in range(1, g)},
            "hidden_from": {f"p{i}": set() for i in range(1, g)}, "seed": 0, "split": True}


@pytest.mark.parametrize("sc", [
    # the lone lying initiator at the simulation's g = 5
    {"g": 5, "t": 3, "c_of": dict.fromkeys(["p0", "p1", "p2", "p3", "p4"], 1),
     "coalition": {"p0"}, **all_ok(5)},
    # two colluders at g = 6: a quorum that ignored c (floor((g + 1)/2) + 1 = 4) let p2 be
    # solved; q = 5 does not
    {"g": 6, "t": 3, "c_of": {f"p{i}": 2 for i in range(6)}, "coalition": {"p0", "p1"},
     **all_ok(6)},
    # members with different c: p3, p4 assume 3 colluders, p5 assumes 1. A quorum from each
    # member's own c (5 and 4) let both sides reveal and exposed all three; one q = 6 for
    # the session (from t - 1 = 3) does not
    {"g": 6, "t": 4, "c_of": {"p0": 1, "p1": 1, "p2": 1, "p3": 3, "p4": 3, "p5": 1},
     "coalition": {"p0", "p1", "p2"}, "split_at": 2, **all_ok(6)},
], ids=["g5-lone-initiator", "g6-two-colluders", "g6-mixed-c"])
def test_a_split_view_with_forged_confirms_reveals_nothing_to_solve(sc: dict) -> None:
    """The lying initiator with the withholding broker: each side is told its own list and
    sees forged CONFIRMs for it; the quorum keeps at least one side from revealing."""
    r = run_scenario(sc)
    revealed = {r.sessions[p].revealed_for for p in r.members
                if p not in sc["coalition"] and r.sessions[p].revealed_for is not None}
    assert len(revealed) <= 1, revealed
    check_no_protected_vector_solvable(r, sc)


def test_a_shamir_start_with_another_member_order_aborts_before_any_partial() -> None:
    """A lone lying initiator tells p2 the order (p0, p2, p1) and p1 the true one. Their shares
    would be evaluated at points the partials mix up, and the two partials could be solved for
    both vectors; the START-view digest in every SHARE stops both before a partial exists."""
    h = Harness(n=3, group_size=3, threshold=2)

    def reorder(env: Envelope) -> Outgoing:
        out = env.out
        if env.sender == "p0" and out.kind is m.Kind.START and out.recipient == "p2":
            assert isinstance(out.body, m.Start)
            body = m.Start(("p0", "p2", "p1"), out.body.threshold, out.body.coordinates)
            return Outgoing(out.recipient, out.kind, body, out.seq)
        return out

    h.tamper = reorder
    h.start("p0", ["p1", "p2"])
    h.run()
    h.tick(10.0)
    assert not [e for e in h.sent if e.out.kind is m.Kind.PARTIAL and e.sender != "p0"]
    for p in ("p1", "p2"):
        assert h.sessions[p].phase is Phase.ABORTED and h.sessions[p].result is None
        assert h.sessions[p].abort_reason == "inconsistent_view"


def test_the_property_check_catches_a_sum_of_two() -> None:
    """The checker itself: a revealed list of two, one of them a colluder, exposes the other."""
    sets = exposed_sets(3, 2, {"p0"}, {"p0", "p1", "p2"}, [("p0", "p1"), ("p0", "p1")])
    assert solvable(["p0", "p1", "p2"], {"p0"}, sets) == {"p1"}
    sets = exposed_sets(3, 2, {"p0"}, {"p0", "p1", "p2"}, [("p0", "p1", "p2")] * 2)
    assert solvable(["p0", "p1", "p2"], {"p0"}, sets) == set()
