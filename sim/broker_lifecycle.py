"""The broker of one run: started for its length (embedded amqtt, managed Mosquitto) or an
external one checked to be listening, as the settings every peer connects with."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from peer.network.transport import BrokerSettings
from sim.broker import EmbeddedBroker, MosquittoBroker, wait_until_accepting
from sim.scenario import Scenario
from sim.setup import SimulationError


def broker_settings_for_url(s: Scenario) -> BrokerSettings:
    """Connection settings for the scenario's external broker URL."""
    return BrokerSettings(url=s.broker, username=s.broker_username,
                          password=s.broker_password, ca_file=s.broker_ca_file)


@contextlib.asynccontextmanager
async def open_broker(s: Scenario) -> AsyncIterator[BrokerSettings]:
    """Start the scenario's broker (or point at an external one) for the length of the run."""
    if s.broker == "embedded":
        async with EmbeddedBroker() as embedded:
            yield BrokerSettings(url=embedded.url)
    elif s.broker == "mosquitto":
        if not MosquittoBroker.available():
            raise SimulationError("broker = 'mosquitto' but /usr/sbin/mosquitto is not installed")
        async with MosquittoBroker() as mosquitto:
            yield BrokerSettings(url=mosquitto.url)
    else:
        settings = broker_settings_for_url(s)
        host, port, _tls = settings.endpoint()
        # Fail in seconds, not at duration_s, when nothing listens there.
        await wait_until_accepting(host, port, timeout_s=10.0)
        yield settings
