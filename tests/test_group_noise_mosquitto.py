"""Group noise over real sessions (real peers, real crypto, a real Mosquitto).

docs/privacy.md ("Group noise"): a private step is one session whose contributions are field
elements; a release needs h + c contributors, checked by every member before it helps reveal;
every share is a new batch and a new G, charged first; modes never mix.

* With zero clipped sums, the released sums' per-coordinate variance is m sigma^2 C^2 / h in
  value units (m the contributors), for groups of 3 and 5 (Shamir; masked at 5); the
  session's decoded sum equals ``group_noise.decode_sum`` of its field sum; every ledger
  equals the accountant's figure.
* Groups below h + c never form: nothing is encoded, shared or applied.
* Group-noise and local-noise peers never form a group together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from peer.network.session.common import SessionParams, check_invite
from peer.network.session.shamir import SessionTimeouts
from peer.network.settings import NodeConfig
from peer.training.group_noise import GroupNoise, decode_sum
from peer.training.privacy.accountant import epsilon
from protocol import messages as m
from tests.conftest import wait_until
from tests.test_node_mosquitto import NET, Network

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(60)]

SIGMA_EFF = 1.5
BATCH = 16

#: Quick sessions for a handful of peers on loopback.
GROUP_FAST = NodeConfig(
    group_size=3, threshold=2,
    timeouts=SessionTimeouts(invite_s=1.0, start_s=2.0, share_s=2.0, partial_s=2.0),
    announce_interval_s=1.0, silence_expiry_s=20.0, checkpoint_interval_s=3600.0,
    start_jitter_s=0.2, tick_s=0.02, round_pause_s=0.0, evaluate_every=0, cooldown_s=0.0,
)


class EmptyBatches:
    """A real group-noise LocalTrainer whose epochs sample nothing (rate 0), so every clipped
    sum is zero and a release is the noise alone. Its ledger is charged at the real rate."""

    def __init__(self, trainer: Any) -> None:
        self.inner = trainer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def begin_group_epoch(self, params: GroupNoise, steps: int) -> Any:
        return dataclasses.replace(self.inner.begin_group_epoch(params, steps),
                                   sample_rate=0.0)


@pytest.fixture
def make_group_trainer(digits_source, one_torch_thread) -> Callable[..., Any]:
    """make(index, n, h, noise="group"): a real LocalTrainer on a 1/n shard of digits."""
    from peer.training.data import split_holdout
    from peer.training.trainer import LocalTrainer, TrainerConfig

    train, _test = digits_source

    def make(index: int, n: int, h: int, noise: str = "group") -> Any:
        shard = train.subset(np.arange(index, len(train.y), n))
        local, holdout = split_holdout(shard, 0.2, index)
        config = TrainerConfig(model="mlp", lr=0.05, momentum=0.0, batch_size=BATCH,
                               local_steps=1, noise=noise, honest_min=h,
                               noise_multiplier=SIGMA_EFF, planned_rounds=10_000,
                               budget_epsilon=1e6, seed=7, share="delta")
        return LocalTrainer(config, local, holdout, None)

    return make


def _released(net: Network) -> list[dict[str, Any]]:
    return [e.data for e in net.events if e.kind == "session_done"]


@pytest.mark.parametrize(("group_size", "h", "kind"),
                         [(3, 2, "shamir"), (5, 3, "shamir"), (5, 3, "masked")])
async def test_released_noise_has_the_variance_of_one_gaussian(
        mosquitto, make_group_trainer, group_size: int, h: int, kind: str) -> None:
    from crypto.admission import AdmissionKey

    config = dataclasses.replace(GROUP_FAST, group_size=group_size,
                                 threshold=min(3, group_size - 1), session_kind=kind)
    net = Network(mosquitto.url, AdmissionKey.generate(NET))
    peers = [net.add(f"p{i}", EmptyBatches(make_group_trainer(i, group_size, h)), config)
             for i in range(group_size)]
    try:
        await wait_until(lambda: len({bytes(d["session_id"]) for d in _released(net)}) >= 4,
                         25, "four group releases")
    finally:
        await net.close()
    trainer = peers[0].trainer.inner
    noise = GroupNoise(honest_min=h, max_colluders=1, frac_bits=16, max_grad_norm=1.0,
                       dim=trainer.param_count)
    sigma = noise.sigma_for_effective(SIGMA_EFF)
    by_session = {bytes(d["session_id"]): d for d in _released(net)}
    assert len(by_session) >= 4
    for data in by_session.values():
        m_ = len(data["contributors"])
        assert m_ >= h + 1  # h + c contributors, c = 1
        # the session's fixed-point decoding of the field sum is group_noise's, exactly
        np.testing.assert_array_equal(data["group_sum"], decode_sum(data["field_sum"], 2**16))
        variance = float(np.var(data["group_sum"]))
        expected = m_ * sigma**2 / h  # C = 1; the grid's rounding adds m / (12 s^2): nothing
        # ~1.2k (g = 3) or ~1.7k coordinates per release: the sample variance is within
        # 4 standard errors (sqrt(2 / d) each) of its expectation
        assert variance == pytest.approx(expected, rel=4 * np.sqrt(2 / data["group_sum"].size))
    for peer in peers:  # (d) every ledger is the library accountant's figure for its steps
        inner = peer.trainer.inner
        steps = inner.ledger.steps
        # every session that formed used a share of its own: a new batch and a new G
        assert 1 <= peer.counters.sessions_done + peer.counters.sessions_aborted <= steps
        q = inner.ledger.sample_rate
        assert inner.epsilon == pytest.approx(epsilon(steps, SIGMA_EFF, q, 1e-5), rel=1e-9)


async def test_below_h_plus_c_nothing_is_shared_or_applied(mosquitto,
                                                          make_group_trainer) -> None:
    from crypto.admission import AdmissionKey

    taps: list[tuple[str, str]] = []
    net = Network(mosquitto.url, AdmissionKey.generate(NET))
    peers = []
    for i in range(3):  # h + c = 3 + 1 = 4 > 3 peers online, groups of up to 5 allowed
        config = dataclasses.replace(
            GROUP_FAST, group_size=5, threshold=3,
            secret_tap=lambda label, _secret, who=f"p{i}": taps.append((who, label)))
        peers.append(net.add(f"p{i}", make_group_trainer(i, 3, 3), config))
    before = [p.trainer.parameter_vector() for p in peers]
    try:
        await wait_until(lambda: sum(p.counters.sessions_not_formed for p in peers) >= 4, 20,
                         "invitations that cannot form a group")
    finally:
        await net.close()
    assert all(p.counters.sessions_done == 0 for p in peers)
    assert taps == []  # no vector encoded, no share or partial made: nothing to rebuild
    for peer, vector in zip(peers, before, strict=True):
        np.testing.assert_array_equal(peer.trainer.parameter_vector(), vector)
        assert peer.params.min_sum == 4
        assert peer.trainer.ledger.steps <= 1  # one share kept ready, never sent


async def test_group_and_local_noise_peers_never_group(mosquitto, make_group_trainer) -> None:
    from crypto.admission import AdmissionKey

    net = Network(mosquitto.url, AdmissionKey.generate(NET))
    group = [net.add(f"g{i}", make_group_trainer(i, 5, 2), GROUP_FAST) for i in range(3)]
    local = [net.add(f"l{i}", make_group_trainer(3 + i, 5, 2, noise="local"), GROUP_FAST)
             for i in range(2)]
    try:
        await wait_until(lambda: all(p.counters.sessions_done >= 2 for p in group), 25,
                         "the group-noise peers' releases")
    finally:
        await net.close()
    group_ids = {p.peer_id for p in group}
    for data in _released(net):
        members = set(data["members"])
        assert members <= group_ids or not members & group_ids
    assert all(p.counters.sessions_done == 0 for p in local)  # two local peers: no group
    assert {p.params.model_id for p in group} != {p.params.model_id for p in local}
    # an INVITE from the other mode is declined on the model id
    params: SessionParams = group[0].params
    invite = m.Invite(group_size=3, threshold=2, model_id=local[0].params.model_id,
                      param_count=params.param_count, frac_bits=16)
    assert check_invite(params, invite) == "model_mismatch"


def test_a_daemon_refuses_group_noise_its_groups_cannot_release() -> None:
    from types import SimpleNamespace

    from peer.assembly import check_group_noise
    from peer.config import ConfigError, SessionConfig
    from peer.training.config import TrainerConfig

    def cfg(group_size: int, noise: str = "group") -> Any:
        training = TrainerConfig(noise=noise, honest_min=3, noise_multiplier=1.0)
        session = SessionConfig(group_size=group_size, threshold=2, max_colluders=1)
        return SimpleNamespace(training=training, session=session)

    with pytest.raises(ConfigError, match="honest_min"):
        check_group_noise(cfg(3))
    check_group_noise(cfg(4))
    check_group_noise(cfg(3, noise="local"))
