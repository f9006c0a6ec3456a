"""Hostile peers for the simulation: what an attacker on the broker or in the network can do.

Three kinds, each meant to be *survived* by the honest peers (and counted by them):

* ``garbage`` - a raw MQTT client (not a Murmur peer) that publishes, at a bounded rate, random
  bytes, malformed msgpack, messages signed by an identity the network never admitted, forged
  announcements carrying a certificate from a foreign admission key, and messages whose signed
  sender does not own the topic. Honest peers count them as drops (``malformed``,
  ``unknown_sender``, ``topic_mismatch``, certificate reasons...).
* ``replay`` - a raw client subscribed to the whole network that records what others publish
  and re-publishes it verbatim later. The signatures are genuine, so only the replay windows
  (and announce ordering) stop them: drops ``replay`` / ``stale``.
* ``huge_norm`` - an *admitted* peer that runs the real protocol but inflates every update it
  contributes to just under the fixed-point range (the largest values the secure aggregation
  can carry without wrapping). Secure aggregation hides who sent it, so the defence is the
  merge rule's norm bound: honest members clip or reject the group sum (``merges_rejected``).

Nothing here weakens a real peer: hostile clients use only what any broker client can do. The
random choices of what to send use ``random.Random(seed)``; the unadmitted identity and the
foreign admission key are generated with the real crypto (os.urandom), as an attacker would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiomqtt
import msgpack
import numpy as np

from crypto.admission import AdmissionKey
from crypto.field import FixedPoint
from crypto.identity import Identity
from peer.network.transport import BrokerSettings
from peer.waiting import wait_event
from protocol import messages as m
from protocol.codec import encode_message
from protocol.topics import announce_topic, direct_topic

if TYPE_CHECKING:
    from sim.scenario import Scenario

log = logging.getLogger(__name__)

GARBAGE_ID = "x-garbage"
REPLAY_ID = "x-replay"
HUGE_NORM_ID = "x-huge-norm"

#: What fraction of the fixed-point range a huge_norm peer fills (just under the limit).
HUGE_FILL = 0.9


@dataclass
class HostileStats:
    """What a hostile client did (for the log and the run result)."""

    kind: str
    published: int = 0
    captured: int = 0
    errors: int = 0


def raw_client(settings: BrokerSettings, client_id: str) -> aiomqtt.Client:
    """A plain aiomqtt client to the simulation's broker (no Murmur checks of any kind)."""
    host, port, _tls = settings.endpoint()
    return aiomqtt.Client(
        host,
        port,
        username=settings.username,
        password=settings.password,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V311,
        clean_session=True,
        tls_context=settings.tls_context(),
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )


def _header(network: str, kind: m.Kind, sender: str, session: bytes) -> m.Header:
    return m.Header(version=m.PROTOCOL_VERSION, network=network, kind=kind, sender=sender,
                    session=session, seq=time.time_ns() // 1000)


class GarbageFactory:
    """Builds the garbage payloads (topic, bytes) aimed at the honest peers."""

    def __init__(self, network: str, targets: Sequence[str], rng: random.Random,
                 param_count: int = 1) -> None:
        self.network = network
        self.targets = list(targets)
        self.rng = rng
        self.param_count = param_count
        # Real keys, never admitted: an attacker can make all the identities it likes.
        self.stranger = Identity.generate(GARBAGE_ID)
        foreign = AdmissionKey.generate(network)
        self.foreign_certificate = foreign.issue(self.stranger.public, valid_for_s=3600,
                                                 now=time.time())

    def make(self) -> tuple[str, bytes]:
        target = self.rng.choice(self.targets)
        inbox = direct_topic(self.network, GARBAGE_ID, target)
        choice = self.rng.randrange(6)
        if choice == 0:  # random bytes
            return inbox, self.rng.randbytes(self.rng.randint(1, 512))
        if choice == 1:  # valid msgpack, not a Murmur envelope
            junk = [self.rng.randint(-5, 5), "x" * self.rng.randint(0, 40), {"a": 1}]
            return inbox, msgpack.packb(junk)
        if choice == 2:  # well-formed envelope, truncated
            payload = self._invite(target)
            return inbox, payload[: self.rng.randint(1, len(payload) - 1)]
        if choice == 3:  # well-formed and signed, by an identity the network never admitted
            return inbox, self._invite(target)
        if choice == 4:  # forged announcement: certificate from a foreign admission key
            body = m.Announce(certificate=self.foreign_certificate.to_bytes(),
                              model_id="mlp", param_count=self.param_count,
                              connection=os.urandom(16))
            header = _header(self.network, m.Kind.ANNOUNCE, GARBAGE_ID, b"")
            return (announce_topic(self.network, GARBAGE_ID),
                    encode_message(header, body, self.stranger.sign))
        # claims to be an honest peer, but published under our own topic
        victim = self.rng.choice(self.targets)
        header = _header(self.network, m.Kind.INVITE, victim, self.rng.randbytes(16))
        body = m.Invite(group_size=3, threshold=2, model_id="mlp",
                        param_count=self.param_count, frac_bits=16)
        return inbox, encode_message(header, body, self.stranger.sign)

    def _invite(self, target: str) -> bytes:
        header = _header(self.network, m.Kind.INVITE, GARBAGE_ID, self.rng.randbytes(16))
        body = m.Invite(group_size=3, threshold=2, model_id="mlp",
                        param_count=self.param_count, frac_bits=16)
        return encode_message(header, body, self.stranger.sign)


async def run_garbage(
    settings: BrokerSettings,
    network: str,
    targets: Sequence[str],
    stop: asyncio.Event,
    *,
    seed: int,
    rate_per_s: float = 5.0,
    param_count: int = 1,
) -> HostileStats:
    """Publish garbage at about ``rate_per_s`` messages per second until ``stop`` is set."""
    stats = HostileStats("garbage")
    rng = random.Random(seed)
    factory = GarbageFactory(network, targets, rng, param_count)
    while not stop.is_set():
        try:
            async with raw_client(settings, f"murmur-{network}-{GARBAGE_ID}") as client:
                while not stop.is_set():
                    topic, payload = factory.make()
                    await client.publish(topic, payload, qos=1)
                    stats.published += 1
                    await _sleep_or_stop(stop, 1.0 / rate_per_s)
        except aiomqtt.MqttError as exc:
            stats.errors += 1
            log.info("garbage client: connection lost (%s); retrying", exc)
            await _sleep_or_stop(stop, 1.0)
    return stats


async def run_replay(
    settings: BrokerSettings,
    network: str,
    stop: asyncio.Event,
    *,
    seed: int,
    replay_after_s: float = 3.0,
    rate_per_s: float = 10.0,
    capacity: int = 500,
) -> HostileStats:
    """Record every non-empty message on ``murmur/{network}/#`` and re-publish it (verbatim,
    same topic, not retained) ``replay_after_s`` or more later, at most ``rate_per_s``/s."""
    stats = HostileStats("replay")
    rng = random.Random(seed)
    captured: deque[tuple[float, str, bytes]] = deque(maxlen=capacity)

    async def record(client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if isinstance(payload, bytes | bytearray) and payload:
                captured.append((time.monotonic(), message.topic.value, bytes(payload)))
                stats.captured += 1

    while not stop.is_set():
        try:
            async with raw_client(settings, f"murmur-{network}-{REPLAY_ID}") as client:
                await client.subscribe(f"murmur/{network}/#", qos=1)
                recorder = asyncio.create_task(record(client))
                try:
                    while not stop.is_set():
                        await _sleep_or_stop(stop, 1.0 / rate_per_s)
                        ready = [c for c in captured if time.monotonic() - c[0] >= replay_after_s]
                        if not ready:
                            continue
                        _t, topic, payload = rng.choice(ready)
                        await client.publish(topic, payload, qos=1)
                        stats.published += 1
                finally:
                    recorder.cancel()
                    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                        await recorder
        except aiomqtt.MqttError as exc:
            stats.errors += 1
            log.info("replay client: connection lost (%s); retrying", exc)
            await _sleep_or_stop(stop, 1.0)
    return stats


def start_raw_clients(s: Scenario, broker: BrokerSettings, targets: list[str],
                      stop: asyncio.Event, *, param_count: int) -> list[asyncio.Task[Any]]:
    """Start the scenario's raw hostile clients (garbage, replay) as tasks until ``stop``."""
    tasks: list[asyncio.Task[Any]] = []
    if "garbage" in s.hostile_peers:
        tasks.append(asyncio.create_task(run_garbage(
            broker, s.network, targets, stop, seed=s.seed + 1, param_count=param_count)))
    if "replay" in s.hostile_peers:
        tasks.append(asyncio.create_task(run_replay(
            broker, s.network, stop, seed=s.seed + 2)))
    return tasks


async def collect_raw_clients(tasks: list[asyncio.Task[Any]]) -> list[dict[str, Any]]:
    """What the raw hostile clients did (after their stop was set), as result.json rows; one
    that failed is logged, never fatal to the run."""
    stats: list[dict[str, Any]] = []
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, HostileStats):
            stats.append(dataclasses.asdict(outcome))
        else:
            log.error("hostile client failed: %r", outcome)
    return stats


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    await wait_event(stop, seconds)


class HugeNormTrainer:
    """Wraps a real trainer; every update it hands to the protocol is scaled so that its
    largest entry is ``HUGE_FILL`` of the fixed-point limit ``FixedPoint.max_abs``.

    It trains honestly (so it has a real index set and passes every protocol check); only the
    values it contributes to sessions are inflated. All other attributes are the wrapped
    trainer's.
    """

    def __init__(self, inner: Any, fixed_point: FixedPoint | None = None,
                 on_update: Callable[[float], None] | None = None) -> None:
        self._inner = inner
        self._limit = HUGE_FILL * (fixed_point or FixedPoint()).max_abs
        self._on_update = on_update

    def train_round(self) -> Any:
        update = self._inner.train_round()
        values = np.asarray(update.values, dtype=np.float64)
        peak = float(np.max(np.abs(values))) if values.size else 0.0
        scale = self._limit / peak if peak > 0 else 0.0
        values = values * scale if peak > 0 else np.full_like(values, self._limit)
        scaled = values.astype(np.float32)
        # float32 rounding must not push an entry over the limit
        np.clip(scaled, -self._limit, self._limit, out=scaled)
        if self._on_update is not None:
            self._on_update(float(np.linalg.norm(scaled)))
        return dataclasses.replace(update, values=scaled)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
