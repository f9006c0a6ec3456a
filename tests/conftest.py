"""Shared fixtures: real brokers on free loopback ports.

`mosquitto` starts the real Mosquitto binary for one test and removes it afterwards. Outside CI
a machine without Mosquitto skips those tests; in CI (`CI=true`) a missing binary is an error,
because a test that needs Mosquitto must run there, not skip.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from sim.broker import EmbeddedBroker, MosquittoBroker


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require_mosquitto() -> None:
    """Skip (locally) or fail (in CI) when the Mosquitto binary is missing."""
    if MosquittoBroker.available():
        return
    if _in_ci():
        pytest.fail("mosquitto is required in CI (apt-get install -y mosquitto)")
    pytest.skip("mosquitto binary not installed")


@pytest.fixture
async def mosquitto() -> AsyncIterator[MosquittoBroker]:
    """A running Mosquitto on a free loopback port; `await m.stop()` / `await m.start()`
    restart it on the same port."""
    require_mosquitto()
    broker = MosquittoBroker()
    await broker.start()
    try:
        yield broker
    finally:
        await broker.close()


@pytest.fixture
async def embedded_broker() -> AsyncIterator[EmbeddedBroker]:
    """The simulation's embedded amqtt broker on a kernel-chosen loopback port."""
    async with EmbeddedBroker() as broker:
        yield broker
