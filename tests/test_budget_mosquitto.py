"""A budget that lasts and a peer that stays useful (issue 10), over a real Mosquitto.

* A peer alone on the broker spends nothing: no private step before it can form a group.
* A peer whose budget is spent keeps completing sessions with its current model (averaging
  rounds: post-processing, no epsilon) and its epsilon and step count never move again.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from peer.network.counters import (
    STATE_AVERAGING_ONLY,
    STATE_SHARING,
    STATE_WAITING,
    load_sessions_total,
)
from peer.network.node import Peer
from peer.network.pacing import PacingConfig
from tests.conftest import wait_until
from tests.test_node_mosquitto import FAST, NET, Network

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(150)]

#: Averaging rounds come quickly in a test; the daemon's default is 5 s.
QUICK = dataclasses.replace(FAST, pacing=PacingConfig(averaging_interval_s=0.3))


@pytest.fixture
def make_averaging_trainer(digits_source, one_torch_thread) -> Callable[[int, int], object]:
    """make(index, n): a LocalTrainer sharing its model ("model"), whose budget (epsilon 1)
    is calibrated for exactly three private rounds and no averaging tail."""
    from peer.training.data import split_holdout
    from peer.training.trainer import LocalTrainer, TrainerConfig

    train, _test = digits_source

    def make(index: int, n: int) -> LocalTrainer:
        shard = train.subset(np.arange(index, len(train.y), n))
        local, holdout = split_holdout(shard, 0.2, index)
        config = TrainerConfig(model="mlp", lr=0.1, batch_size=32, local_steps=2, dp=True,
                               target_epsilon=1.0, planned_rounds=3, delta=1e-5, seed=7,
                               share="model")
        return LocalTrainer(config, local, holdout, None)

    return make


async def test_alone_no_budget_is_spent_until_a_group_can_form(mosquitto,
                                                               make_averaging_trainer) -> None:
    from crypto.admission import AdmissionKey

    net = Network(mosquitto.url, AdmissionKey.generate(NET))
    first = net.add("first", make_averaging_trainer(0, 3), QUICK)
    try:
        await wait_until(lambda: first.transport.messages_sent >= 3, 20,
                         "three announcements while alone")
        assert first.trainer.ledger.steps == 0 and first.counters.round == 0
        assert first.status().state == STATE_WAITING
        net.add("second", make_averaging_trainer(1, 3), QUICK)
        await wait_until(lambda: first.status().peers_live == 1, 20, "a second peer")
        await wait_until(lambda: first.transport.messages_sent >= 5, 20, "two more announces")
        assert first.trainer.ledger.steps == 0  # two peers cannot form a group of three
        net.add("third", make_averaging_trainer(2, 3), QUICK)
        await wait_until(lambda: first.trainer.ledger.steps > 0, 30,
                         "private training once a group can form")
    finally:
        await net.close()


async def test_spent_budget_keeps_averaging_at_constant_epsilon(
        mosquitto, make_averaging_trainer, tmp_path: Path) -> None:
    from crypto.admission import AdmissionKey

    net = Network(mosquitto.url, AdmissionKey.generate(NET))
    peers: list[Peer] = [net.add(f"p{i}", make_averaging_trainer(i, 3), QUICK,
                                 totals_path=tmp_path / f"p{i}.totals.json")
                         for i in range(3)]
    try:
        await wait_until(lambda: all(p.status().budget_exhausted for p in peers), 60,
                         "every budget to be spent")
        spent_at = time.time()
        frozen = [(p.trainer.epsilon, p.trainer.ledger.steps) for p in peers]
        for eps, _steps in frozen:
            assert eps is not None and 0 < eps <= 1.0
        await wait_until(
            lambda: all(sum(1 for e in net.events if e.kind == "session_done"
                            and e.peer_id == p.peer_id and e.time > spent_at) >= 2
                        for p in peers),
            60, "two averaging sessions per peer after the budget was spent",
        )
        for p, (eps, steps) in zip(peers, frozen, strict=True):
            assert (p.trainer.epsilon, p.trainer.ledger.steps) == (eps, steps)
            assert p.status().state in (STATE_AVERAGING_ONLY, STATE_SHARING)
            assert p.status().epsilon == eps
        rounds = [e for e in net.events if e.kind == "round" and e.time > spent_at]
        assert rounds and all(e.data["steps"] == 0 for e in rounds)
        # The session total on disk follows each session (what a restart would show).
        await wait_until(lambda: all(
            load_sessions_total(tmp_path / f"{p.peer_id}.totals.json")
            >= p.counters.sessions_done - 1 > 0 for p in peers), 10, "totals on disk")
    finally:
        await net.close()


async def test_a_new_block_of_data_brings_a_fresh_budget(mosquitto, digits_source,
                                                         make_averaging_trainer,
                                                         tmp_path: Path) -> None:
    """A device whose first block is spent keeps averaging; a new block resumes private
    training with its own budget while block 1's epsilon never moves again."""
    from crypto.admission import AdmissionKey
    from peer.training.blocks import open_block_source, template_dataset
    from peer.training.trainer import LocalTrainer, TrainerConfig
    from tests.test_blocks import write_npz

    train, test = digits_source
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    write_npz(incoming, "0001.npz", train.x[:200], train.y[:200])
    config = TrainerConfig(model="mlp", lr=0.1, batch_size=32, local_steps=2,
                           target_epsilon=1.0, planned_rounds=3, seed=7, share="model",
                           min_block_records=150)
    device = LocalTrainer(config, template_dataset(train.input_shape, train.num_classes),
                          test, None, source=open_block_source(incoming, 150))
    pacing = dataclasses.replace(QUICK.pacing, retry_private_s=0.5)
    net = Network(mosquitto.url, AdmissionKey.generate(NET))
    sensor = net.add("sensor", device, dataclasses.replace(QUICK, pacing=pacing))
    for i in (1, 2):
        net.add(f"p{i}", make_averaging_trainer(i, 3), QUICK)
    try:
        await wait_until(lambda: sensor.status().budget_exhausted, 60, "block 1 spent")
        (first,) = device.blocks_status()
        assert first.retired and 0 < first.epsilon <= 1.0
        write_npz(incoming, "0002.npz", train.x[200:400], train.y[200:400])
        await wait_until(lambda: len(device.blocks_status()) == 2
                         and device.blocks_status()[1].steps > 0, 30,
                         "private training on block 2")
        await wait_until(lambda: device.blocks_status()[1].retired, 60, "block 2 spent")
        again, second = device.blocks_status()
        assert (again.epsilon, again.steps) == (first.epsilon, first.steps)
        assert 0 < second.epsilon <= 1.0 and second.records == 200
    finally:
        await net.close()
