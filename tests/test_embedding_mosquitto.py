"""The Python API for embedding (``from peer import build_peer, run_peer``), used as its
documentation says, with a model and a loader of the user's own, against a real Mosquitto."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from peer import build_peer, run_peer
from peer.config import ConfigError
from peer.network.settings import PeerEvent
from peer.provision import provision
from peer.training.user_model import ModelFactoryError
from tests.conftest import wait_until

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(240)]

PEERS = ["alice", "bob", "carol"]
TRAINING = '''[training]
model = "tests.user_factories:conv1d"
target_epsilon = 3.0
planned_rounds = 6
local_steps = 2
batch_size = 16

[pace]
budget_hours = 0.001
averaging_interval_s = 0.5
'''


def _configs(tmp_path: Path, port: int, data: str = "python:tests.user_factories:windows",
             model: str | None = None) -> list[Path]:
    """Provisioned configs of three peers, on the test's broker, with the user's code."""
    result = provision("embed", PEERS, tmp_path / "net")
    paths = []
    for files in result.peers:
        text = files.config.read_text()
        text = re.sub(r'url = "mqtt://127\.0\.0\.1:\d+"', f'url = "mqtt://127.0.0.1:{port}"',
                      text)
        text = re.sub(r"(username|password_file) = .*\n", "", text)
        text = text.replace('data = "digits"', f'data = "{data}"')
        training = TRAINING if model is None else TRAINING.replace(
            "tests.user_factories:conv1d", model)
        text = text.replace("[training]\n# DP-SGD; see docs/peer.example.toml for every "
                            "field.\ntarget_epsilon = 8.0\n", training)
        files.config.write_text(text)
        paths.append(files.config)
    return paths


async def test_three_embedded_peers_train_the_users_model_on_the_users_data(
        mosquitto, tmp_path: Path) -> None:
    configs = _configs(tmp_path, mosquitto.port)
    events: list[PeerEvent] = []
    stop = asyncio.Event()
    tasks = [asyncio.create_task(run_peer(path, stop=stop, on_event=events.append))
             for path in configs]

    def sessions_done_by_all() -> bool:
        done = {e.peer_id for e in events if e.kind == "session_done"}
        return done == set(PEERS) or any(t.done() for t in tasks)

    await wait_until(sessions_done_by_all, 180, "a completed session at every peer")
    stop.set()
    peers = await asyncio.gather(*tasks)
    for peer in peers:
        status = peer.status()
        assert status.sessions_done >= 1 and status.round >= 1
        assert status.engine == "vmap"  # Conv1d: the general engine
        assert status.epsilon is not None and 0 < status.epsilon <= 3.0 + 1e-6


async def test_build_peer_refuses_a_batchnorm_model_before_connecting(
        mosquitto, tmp_path: Path) -> None:
    config = _configs(tmp_path, mosquitto.port, model="tests.user_factories:batchnorm")[0]
    with pytest.raises(ModelFactoryError, match="GroupNorm"):
        build_peer(config)


async def test_build_peer_refuses_a_loader_with_ragged_records_before_connecting(
        mosquitto, tmp_path: Path) -> None:
    config = _configs(tmp_path, mosquitto.port, data="python:tests.user_factories:ragged")[0]
    with pytest.raises(ConfigError, match="ragged"):
        build_peer(config)
