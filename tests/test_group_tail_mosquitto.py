"""The group-noise averaging tail over real sessions (real peers, crypto, a real Mosquitto).

docs/privacy.md ("The averaging tail"): once a group-noise peer's private steps are done or
its budget is spent, it joins sessions of the tail's model id that only average models.

* Peers that start from different models and can afford no private step average in the tail:
  their models move toward each other, and their ledgers record nothing.
* A tail release moves a member to the mean model and takes no optimizer step: peers whose
  models are equal when the tail starts (every private release held all three) keep them,
  although their optimizers hold momentum.
* Tail peers and private-step peers never meet in a session, formed or not: the tail's model
  id differs, and an INVITE across the two is declined on it.
* A peer whose own tail is done starts no session but answers a late peer's tail invitations.
* A stranded peer (too few private-step peers ever to release its share) withdraws the share
  it took, whose ledger charge stays (the epsilon shown over-, never under-states), and averages
  in the tail; a share of one stage is refused by a session of the other.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from peer.network.session.common import (
    GROUP_TAIL_SUFFIX,
    Contribution,
    SessionParams,
    averaging_tail_params,
    check_contribution,
    check_invite,
)
from peer.network.session.shamir import SessionTimeouts
from peer.network.settings import NodeConfig
from peer.training.privacy.accountant import epsilon
from protocol import messages as m
from tests.conftest import wait_until
from tests.test_node_mosquitto import NET, Network

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(90)]

SIGMA_EFF = 1.5
BATCH = 16
#: Long enough that no peer finishes its tail before a test has seen what it waits for.
TAIL_ROUNDS = 30

#: Quick sessions on loopback; h = 2 and c = 1 make every release hold at least 3.
TAIL_FAST = NodeConfig(
    group_size=4, threshold=2,
    timeouts=SessionTimeouts(invite_s=1.0, start_s=2.0, share_s=2.0, partial_s=2.0),
    announce_interval_s=1.0, silence_expiry_s=20.0, checkpoint_interval_s=3600.0,
    start_jitter_s=0.2, tick_s=0.02, round_pause_s=0.0, evaluate_every=0, cooldown_s=0.0,
)


@pytest.fixture
def make_trainer(digits_source, one_torch_thread) -> Callable[..., Any]:
    """make(index, n, seed, private_steps, budget): a real group-noise LocalTrainer (h = 2
    unless ``honest_min``) on a 1/n shard of digits whose plan is ``private_steps`` steps,
    then the tail."""
    from peer.training.data import split_holdout
    from peer.training.trainer import LocalTrainer, TrainerConfig

    train, _test = digits_source

    def make(index: int, n: int, *, seed: int, private_steps: int, budget: float,
             tail: int = TAIL_ROUNDS, honest_min: int = 2) -> Any:
        shard = train.subset(np.arange(index, len(train.y), n))
        local, holdout = split_holdout(shard, 0.2, index)
        config = TrainerConfig(model="mlp", lr=0.05, momentum=0.9, batch_size=BATCH,
                               local_steps=private_steps, noise="group", honest_min=honest_min,
                               noise_multiplier=SIGMA_EFF, planned_rounds=1 + tail,
                               averaging_rounds=tail, budget_epsilon=budget, seed=seed)
        return LocalTrainer(config, local, holdout, None)

    return make


def _sessions(net: Network) -> list[dict[str, Any]]:
    """Every session any peer saw formed: done ones and aborted ones that had members."""
    return [e.data for e in net.events
            if e.kind == "session_done" or (e.kind == "session_aborted" and e.data["members"])]


def _spread(models: list[np.ndarray]) -> float:
    return max(float(np.linalg.norm(a - b)) for a, b in itertools.combinations(models, 2))


@pytest.mark.parametrize("kind", ["shamir", "masked"])
async def test_tail_peers_average_and_their_ledgers_record_nothing(mosquitto, make_trainer,
                                                                   kind: str) -> None:
    from crypto.admission import AdmissionKey

    # A budget no step fits in: straight into the tail. The peers share one initial model
    # (part of the model id); each is moved apart from it first, by a different vector.
    trainers = [make_trainer(i, 4, seed=7, private_steps=1, budget=1e-9) for i in range(4)]
    rng = np.random.default_rng(0)
    for trainer in trainers:
        d = trainer.param_count
        trainer.apply_update(np.arange(d, dtype=np.uint32),
                             rng.normal(0.0, 0.1, d).astype(np.float32))
    before = [t.parameter_vector() for t in trainers]
    net = Network(mosquitto.url, AdmissionKey.generate(NET))
    config = dataclasses.replace(TAIL_FAST, session_kind=kind)
    peers = [net.add(f"t{i}", trainer, config) for i, trainer in enumerate(trainers)]
    try:
        await wait_until(lambda: all(p.group_steps.averaged >= 2 for p in peers), 40,
                         "every tail peer to apply two tail releases")
    finally:
        await net.close()
    after = [p.trainer.parameter_vector() for p in peers]
    # Every tail release moves a member into the convex hull of the members' models; two
    # each, in groups of at least 3 of the 4, shrink the spread far below half.
    assert _spread(after) < 0.5 * _spread(before)
    for peer in peers:
        assert peer.params.model_id.endswith(GROUP_TAIL_SUFFIX)
        assert peer.trainer.ledger.steps == 0
        assert peer.status().epsilon == 0.0
    done = [e.data for e in net.events if e.kind == "session_done"]
    assert done
    for data in done:
        assert data["field_sum"] is None  # a plain sum of models: no noise share in it
        assert len(data["contributors"]) >= peers[0].params.min_sum == 3


async def test_a_tail_release_takes_no_optimizer_step(mosquitto, make_trainer) -> None:
    from crypto.admission import AdmissionKey

    # Three peers, groups of three: every release holds all of them, so their models are
    # equal when the tail starts, and the tail's mean is that model again. A momentum step
    # (momentum 0.9 after two noised private steps) would move it by about lr * 0.9 * |v|.
    config = dataclasses.replace(TAIL_FAST, group_size=3)
    net = Network(mosquitto.url, AdmissionKey.generate(NET))
    peers = [net.add(f"p{i}", make_trainer(i, 3, seed=7, private_steps=2, budget=1e6), config)
             for i in range(3)]
    try:
        await wait_until(lambda: all(p.group_steps.averaged >= 3 for p in peers), 40,
                         "every peer to apply three tail releases")
    finally:
        await net.close()
    for peer in peers:
        tail_shares = [e.data["own_values"] for e in net.events
                       if e.kind == "session_done" and e.peer_id == peer.peer_id
                       and e.data["field_sum"] is None]
        assert len(tail_shares) >= 3
        # the model the peer shared in its first tail session is where it still is, up to
        # the session's fixed-point grid (2^-16)
        drift = np.max(np.abs(peer.trainer.parameter_vector() - tail_shares[0]))
        assert drift < 1e-4
        assert peer.group_steps.applied == 2  # its two private releases, nothing more
        ledger = peer.trainer.ledger
        assert ledger.steps == 2
        assert peer.trainer.epsilon == pytest.approx(
            epsilon(2, SIGMA_EFF, ledger.sample_rate, 1e-5), rel=1e-9)


async def test_tail_and_private_step_peers_never_share_a_session(mosquitto,
                                                                  make_trainer) -> None:
    from crypto.admission import AdmissionKey

    net = Network(mosquitto.url, AdmissionKey.generate(NET))
    tail = [net.add(f"t{i}", make_trainer(i, 6, seed=7, private_steps=1, budget=1e-9),
                    TAIL_FAST) for i in range(3)]
    private = [net.add(f"p{i}", make_trainer(3 + i, 6, seed=7, private_steps=10_000,
                                              budget=1e6), TAIL_FAST) for i in range(3)]
    try:
        await wait_until(lambda: all(p.group_steps.averaged >= 2 for p in tail)
                         and all(p.group_steps.applied >= 2 for p in private), 40,
                         "tail releases and private releases side by side")
    finally:
        await net.close()
    tail_ids, private_ids = {p.peer_id for p in tail}, {p.peer_id for p in private}
    sessions = _sessions(net)
    assert sessions
    for data in sessions:
        members = set(data["members"])
        assert members <= tail_ids or members <= private_ids
    for peer in private:
        assert not peer.group_steps.in_tail
    # an INVITE from a private-step peer is declined by a tail peer on the model id, and the
    # other way round
    tail_params: SessionParams = tail[0].params
    private_params: SessionParams = private[0].params
    assert tail_params == averaging_tail_params(private_params)
    for mine, theirs in ((tail_params, private_params), (private_params, tail_params)):
        invite = m.Invite(group_size=3, threshold=2, model_id=theirs.model_id,
                          param_count=mine.param_count, frac_bits=16)
        assert check_invite(mine, invite) == "model_mismatch"


async def test_a_peer_whose_tail_is_done_answers_a_late_peer_and_starts_nothing(
        mosquitto, make_trainer) -> None:
    from crypto.admission import AdmissionKey

    net = Network(mosquitto.url, AdmissionKey.generate(NET))
    early = [net.add(f"e{i}", make_trainer(i, 4, seed=7, private_steps=1, budget=1e-9,
                                           tail=2), TAIL_FAST) for i in range(3)]
    try:
        await wait_until(lambda: all(p.status().budget_exhausted for p in early), 30,
                         "the early peers' two-round tails")
        late = net.add("late", make_trainer(3, 4, seed=7, private_steps=1, budget=1e-9),
                       TAIL_FAST)
        # Each late session holds at least two early members; the early peers hold at most
        # three shares of their own tails, so four late releases need answering shares.
        await wait_until(lambda: late.group_steps.averaged >= 4, 30,
                         "four tail releases of the late peer")
    finally:
        await net.close()
    for peer in early:
        # Sessions it started that formed: each consumed one of its own tail's shares (an
        # invitation that never formed, e.g. one that yielded to a neighbour's, keeps the share
        # and may be retried, so it is not counted). An answering share never invites.
        started = [e for e in net.events if e.peer_id == peer.peer_id
                   and e.kind in ("session_done", "session_aborted")
                   and e.data["role"] == "initiator" and e.data["members"]]
        assert len(started) <= 2
        assert peer.group_steps.tail_made == 2
    late_ids = {bytes(e.data["session_id"]) for e in net.events
                if e.kind == "session_done" and e.peer_id == "late"}
    assert len(late_ids) >= 4


async def test_a_stranded_peer_withdraws_its_charged_share_and_its_epsilon_keeps_it(
        mosquitto, make_trainer) -> None:
    from crypto.admission import AdmissionKey

    # h = 3, c = 1: a private release needs 4. Three private-step peers see two others each,
    # enough to take a step (its share charged first) but never to release it; two peers are
    # in the tail. The three are stranded, withdraw the waiting share and average in the tail.
    net = Network(mosquitto.url, AdmissionKey.generate(NET))
    private = [net.add(f"p{i}", make_trainer(i, 5, seed=7, private_steps=10_000, budget=1e6,
                                             honest_min=3), TAIL_FAST) for i in range(3)]
    tail = [net.add(f"t{i}", make_trainer(3 + i, 5, seed=7, private_steps=1, budget=1e-9,
                                          honest_min=3), TAIL_FAST) for i in range(2)]
    try:
        await wait_until(lambda: all(p.group_steps.in_tail and p.group_steps.averaged >= 1
                                     for p in private), 40,
                         "the stranded peers to reach the tail and average there")
    finally:
        await net.close()
    for peer in private:
        assert peer.params.model_id.endswith(GROUP_TAIL_SUFFIX)
        assert peer.group_steps.applied == 0  # no private release ever formed
        ledger = peer.trainer.ledger
        # the share it took was charged before it existed and stays charged once withdrawn:
        # the epsilon shown counts a step that never left (over, never under, the truth)
        assert ledger.steps == 1
        assert peer.status().epsilon == pytest.approx(
            epsilon(1, SIGMA_EFF, ledger.sample_rate, 1e-5), rel=1e-9)
        assert peer.status().epsilon > 0.0
    sessions = _sessions(net)
    assert sessions
    for data in sessions:
        assert len(data["members"]) >= tail[0].params.min_sum == 4
    for data in (e.data for e in net.events if e.kind == "session_done"):
        assert data["field_sum"] is None  # only tail releases: the private shares never left


def test_a_share_of_one_stage_never_enters_a_session_of_the_other() -> None:
    # A share prepared before a switch cannot be used after it: a session refuses, when it is
    # made, a contribution whose layout is not its own (check_contribution, both kinds).
    private = SessionParams(network_id="n", model_id="mlp-c1", param_count=4, group_size=4,
                            threshold=2, min_sum=3, field_contributions=True)
    tail = averaging_tail_params(private)
    d = np.arange(4, dtype=np.uint32)
    private_share = Contribution(indices=d, values=np.zeros(4, np.float32),
                                 field_values=np.ones(4, np.uint32),
                                 model=np.zeros(4, np.float32))
    tail_share = Contribution(indices=d, values=np.zeros(4, np.float32))
    check_contribution(private_share, private)
    check_contribution(tail_share, tail)
    with pytest.raises(ValueError, match="field elements"):
        check_contribution(private_share, tail)
    with pytest.raises(ValueError, match="field elements"):
        check_contribution(tail_share, private)


def test_only_a_group_noise_peer_has_a_tail() -> None:
    params = SessionParams(network_id="n", model_id="mlp", param_count=10, group_size=4,
                           threshold=2)
    with pytest.raises(ValueError, match="averaging tail"):
        averaging_tail_params(params)
    group = dataclasses.replace(params, min_sum=3, field_contributions=True)
    tail = averaging_tail_params(group)
    assert (tail.model_id, tail.min_sum, tail.field_contributions) == ("mlp-tail", 3, False)
