"""A hostile admitted client cannot make a peer hold more than its budget (issue 18, finding 3),
measured as the victim's resident memory over a real Mosquitto.

The victim is a real node in its own process (tests/memory_victim.py) with a model of
PARAM_COUNT parameters, so its largest honest session message is about 2 MiB. Two admitted
clients with real certificates, mallory and trudy: mallory invites it to a session that never
starts (twice, one after the other), and both send it, paced so that the broker and the
victim's MQTT client hold no backlog:

* early messages for that real session, model-sized (SHARE for Shamir, MASKED on the session
  topic for masked sessions), many more than one each;
* the same messages for session ids they made up;
* chunks of 8 MiB messages (more than any honest message of this model) and of model-sized
  messages, for made-up session ids, never completed.

The victim's RSS, read from /proc/<pid>/status every 5 ms, must rise by at most its budget
for early messages and chunks (peer/network/session/early.py, protocol/chunks.py: about 16 MiB here)
plus what handling one message in flight takes (4 x 2 MiB + 8 MiB), and everything refused
must be a counted drop. Measured on a 2-core machine: a rise of about 21 MiB; with the count
caps this replaced (32 or 64 early messages of any size per session, 16 MiB of chunks) the
same flood raised it by about 89 MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest

from crypto.admission import AdmissionKey
from crypto.field import FixedPoint
from crypto.identity import Identity
from peer.network.session.early import EarlyBudget
from peer.network.session.kinds import MASKED_MODEL_SUFFIX
from peer.network.transport import BrokerSettings
from protocol import messages as m
from protocol.chunks import ReassemblyLimits
from protocol.codec import decode_message, encode_message
from protocol.fields import chunk_span
from protocol.limits import (
    CHUNK_OVERHEAD_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_PAYLOAD_BYTES,
    SEAL_OVERHEAD_BYTES,
    session_message_bound,
)
from protocol.topics import announce_topic, direct_topic, inbox_filter, session_topic
from sim.idle_peer import write_identity
from tests.conftest import wait_until
from tests.memory_victim import ROOT, child_env, victim_args

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(120)]

NET = "memnet"
MODEL = "memtest"
PARAM_COUNT = 512_000  # the largest honest session message: about 2 MiB
VECTOR_BYTES = SEAL_OVERHEAD_BYTES + 4 * (PARAM_COUNT + 1)  # a model-sized sealed vector
START_TIMEOUT_S = 4.0  # the default: how long an accepted session waits for its START
EARLY_PER_HOSTILE = 16  # 32 in all: the old Shamir cap; each about 2 MiB
CHUNK_DATA = DEFAULT_MAX_MESSAGE_BYTES - CHUNK_OVERHEAD_BYTES
MIB = 1 << 20


def rss_bytes(pid: int) -> int:
    """The resident set size of process ``pid`` (VmRSS), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@dataclass
class Victim:
    """The victim process, its latest status line and its RSS samples."""

    proc: asyncio.subprocess.Process
    status: dict = field(default_factory=dict)
    samples: list[int] = field(default_factory=list)

    async def read_status(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.status = json.loads(line)

    async def sample_rss(self) -> None:
        while True:
            self.samples.append(rss_bytes(self.proc.pid))
            await asyncio.sleep(0.005)

    def drops(self, reason: str) -> int:
        return int(self.status.get("drops", {}).get(reason, 0))

    @property
    def received(self) -> int:
        return int(self.status.get("received", 0))


@dataclass
class Hostile:
    """An admitted client: a real identity and certificate, its own MQTT connection."""

    name: str
    identity: Identity
    client: aiomqtt.Client
    inbox: list[m.Header] = field(default_factory=list)
    seqs: itertools.count[int] = field(default_factory=lambda: itertools.count(time.time_ns()))

    def signed(self, kind: m.Kind, body: m.Body, session: bytes) -> bytes:
        header = m.Header(m.PROTOCOL_VERSION, NET, kind, self.name, session, next(self.seqs))
        return encode_message(header, body, self.identity.sign)

    async def collect(self) -> None:
        async for message in self.client.messages:
            assert isinstance(message.payload, bytes)
            self.inbox.append(decode_message(message.payload).header)


@contextlib.asynccontextmanager
async def hostile(name: str, admission: AdmissionKey, url: str) -> AsyncIterator[Hostile]:
    identity = Identity.generate(name)
    cert = admission.issue(identity.public, valid_for_s=3600, now=time.time())
    host, port, _ = BrokerSettings(url=url).endpoint()
    async with aiomqtt.Client(host, port, identifier=name,
                              protocol=aiomqtt.ProtocolVersion.V311) as client:
        h = Hostile(name, identity, client)
        # another model: the victim never invites it (it invites nobody anyway)
        announce = h.signed(m.Kind.ANNOUNCE, m.Announce(cert.to_bytes(), "other-model", 10,
                                                        os.urandom(16)), b"")
        await client.publish(announce_topic(NET, name), announce, qos=1, retain=True)
        await client.subscribe(inbox_filter(NET, name), qos=1)
        collector = asyncio.create_task(h.collect())
        try:
            yield h
        finally:
            collector.cancel()


class Flood:
    """Sends to the victim, never more than ``lag`` messages ahead of what it has taken."""

    def __init__(self, victim: Victim, victim_id: str) -> None:
        self.victim, self.victim_id = victim, victim_id
        self.sent = 0
        self.base = victim.received

    async def send(self, sender: Hostile, topic: str, payload: bytes, lag: int) -> None:
        await sender.client.publish(topic, payload, qos=1)
        self.sent += 1
        await wait_until(lambda: self.victim.received >= self.base + self.sent - lag, 20,
                         "the victim to take the flood in")

    async def invite(self, mallory: Hostile, kind: str) -> bytes:
        """A session the victim accepts (mallory initiates it and never sends START)."""
        sid = os.urandom(16)
        model = MODEL + (MASKED_MODEL_SUFFIX if kind == "masked" else "")
        invite = m.Invite(group_size=3, threshold=2, model_id=model, param_count=PARAM_COUNT,
                          frac_bits=FixedPoint().frac_bits)
        await wait_until(lambda: not self.victim.status.get("in_session"), 10,
                         "the victim free for a new session")
        await self.send(mallory, direct_topic(NET, mallory.name, self.victim_id),
                        mallory.signed(m.Kind.INVITE, invite, sid), lag=0)
        accept = m.Kind.MASKED_ACCEPT if kind == "masked" else m.Kind.ACCEPT
        await wait_until(lambda: any(h.session == sid and h.kind is accept
                                     for h in mallory.inbox), 10, "the victim's ACCEPT")
        return sid

    async def early(self, sender: Hostile, kind: str, sid: bytes, *, real: bool) -> None:
        """One model-sized early message: MASKED on the session topic of a real masked
        session, else a SHARE on the direct topic."""
        if kind == "masked" and real:
            topic = session_topic(NET, sender.name, sid)
            payload = sender.signed(m.Kind.MASKED, m.Masked(os.urandom(VECTOR_BYTES)), sid)
        else:
            topic = direct_topic(NET, sender.name, self.victim_id)
            payload = sender.signed(m.Kind.SHARE, m.Share(self.victim_id,
                                                          os.urandom(VECTOR_BYTES)), sid)
        await self.send(sender, topic, payload, lag=1)

    async def chunks(self, sender: Hostile, total: int, sent_chunks: int) -> None:
        """The first ``sent_chunks`` chunks of a ``total``-byte message for a made-up
        session, as an honest sender with the default max_message_bytes would split it."""
        sid, digest = os.urandom(16), os.urandom(32)
        count = -(-total // CHUNK_DATA)
        topic = direct_topic(NET, sender.name, self.victim_id)
        for index in range(min(sent_chunks, count - 1)):
            start, end = chunk_span(index, count, total)
            body = m.Chunk(digest, index, count, total, os.urandom(end - start))
            await self.send(sender, topic, sender.signed(m.Kind.CHUNK, body, sid), lag=4)


async def flood_window(flood: Flood, kind: str, mallory: Hostile, trudy: Hostile) -> None:
    """One session the victim accepted, filled with everything the two can send."""
    sid = await flood.invite(mallory, kind)
    started = time.monotonic()
    for _ in range(EARLY_PER_HOSTILE):
        for sender in (mallory, trudy):
            await flood.early(sender, kind, sid, real=True)
    # all of it arrived while the session waited for its START
    assert time.monotonic() - started < START_TIMEOUT_S - 0.5
    for sender in (mallory, trudy):
        for _ in range(2):
            await flood.early(sender, kind, os.urandom(16), real=False)
        for _ in range(4):  # four unfinished 8 MiB messages: the old per-sender bound
            await flood.chunks(sender, MAX_PAYLOAD_BYTES, 8)
        await flood.chunks(sender, session_message_bound(PARAM_COUNT) - 100, 8)


@pytest.mark.parametrize("kind", ["shamir", "masked"])
async def test_a_flood_of_early_messages_and_chunks_stays_within_the_budget(
        mosquitto, tmp_path: Path, kind: str) -> None:
    admission = AdmissionKey.generate(NET)
    key, cert = write_identity(admission, "victim", tmp_path)
    proc = await asyncio.create_subprocess_exec(
        *victim_args(mosquitto.url, NET, key, cert, admission.public_key.hex(), MODEL,
                     PARAM_COUNT, "--session-kind", kind,
                     "--start-timeout", str(START_TIMEOUT_S)),
        cwd=ROOT, env=child_env(), stdout=asyncio.subprocess.PIPE)
    victim = Victim(proc)
    tasks = [asyncio.create_task(victim.read_status())]
    try:
        async with hostile("mallory", admission, mosquitto.url) as mallory, \
                hostile("trudy", admission, mosquitto.url) as trudy:
            await wait_until(lambda: victim.status.get("view_peers", 0) >= 2, 20,
                             "the victim online, having admitted both")
            # warm-up: the same paths with small messages, so the baseline has every module
            # loaded and every code path run once
            warm = Flood(victim, "victim")
            await warm.invite(mallory, kind)
            await warm.chunks(mallory, 300_000, 1)
            await victim_aborts(victim)
            tasks.append(asyncio.create_task(victim.sample_rss()))
            await wait_until(lambda: len(victim.samples) >= 50, 10, "baseline samples")
            baseline = max(victim.samples)
            flood = Flood(victim, "victim")
            for _window in range(2):
                await flood_window(flood, kind, mallory, trudy)
                await victim_aborts(victim)
            peak = max(victim.samples)
    finally:
        for task in tasks:
            task.cancel()
        proc.kill()
        await proc.wait()
    budget = (EarlyBudget.for_session(PARAM_COUNT, 3).total_bytes
              + ReassemblyLimits.for_sessions(PARAM_COUNT, 3).max_buffered_bytes)
    # handling one message in flight: the MQTT client's buffer, the payload, the signed
    # part and the decoded body, each about one message
    in_flight = 4 * session_message_bound(PARAM_COUNT) + 8 * MIB
    growth = peak - baseline
    print(f"{kind}: baseline {baseline / MIB:.1f} MiB, peak {peak / MIB:.1f} MiB, growth "
          f"{growth / MIB:.1f} MiB, budget {budget / MIB:.1f} MiB")
    assert growth <= budget + in_flight, (growth / MIB, budget / MIB)
    # everything beyond the budget was a counted drop
    assert victim.drops("early_over_budget") >= 2 * 2 * (EARLY_PER_HOSTILE - 1)
    assert victim.drops("unknown_session") >= 2 * 2 * 2
    assert victim.drops("chunk_overflow") >= 2 * 2 * 4 * 8


async def victim_aborts(victim: Victim) -> None:
    await wait_until(lambda: not victim.status.get("in_session"), START_TIMEOUT_S + 5,
                     "the victim to give up the session that never started")
