"""MQTT brokers for the simulation: an embedded amqtt broker and a managed Mosquitto process.

Both listen on loopback only and accept anonymous clients: they exist so that a simulation
(or a test) runs real peers over a real MQTT broker on one machine with no set-up. Neither is
a security boundary: Murmur's guarantees never rest on the broker (every payload is signed and
every share sealed for its one recipient), so all an open loopback broker ever holds is signed
announcements and ciphertext.

Payload sizes (measured on this machine under load from other jobs, loopback, QoS 1, one
publisher and one subscriber, best of 3): amqtt 0.12.1 carried 1 MiB in ~37 ms, 4 MiB in
~130 ms, 8 MiB in ~290 ms and 16 MiB in ~570 ms (≈ 30 MB/s; it has no packet-size limit), and
~1,300 small (200 B) messages/s. Mosquitto 2.0.11 carried 8 MiB in ~33 ms (≈ 260 MB/s). Mosquitto
here is configured with `max_packet_size` 16 MiB so a maximal 8 MiB protocol payload plus framing
always fits; larger packets make it disconnect the sender (measured). For runs bigger than the
default, Mosquitto is the better broker when it is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

_log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

# Mosquitto refuses packets larger than this; 16 MiB leaves room above the protocol's
# 8 MiB payload limit for the topic, MQTT framing and msgpack/NaCl overhead.
MOSQUITTO_MAX_PACKET_BYTES = 16 * 1024 * 1024

DEFAULT_MOSQUITTO_BINARY = Path("/usr/sbin/mosquitto")

# Loggers of the embedded broker's dependencies; at INFO they print a line per connection.
_NOISY_LOGGERS = ("amqtt", "transitions")


class BrokerStartError(RuntimeError):
    """A broker could not be started or did not start accepting connections in time."""


def free_loopback_port() -> int:
    """Return a TCP port on loopback that is free right now.

    There is a short window in which another process could take the port; callers that can
    bind port 0 themselves (the embedded broker does) should prefer that.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


async def wait_until_accepting(host: str, port: int, timeout_s: float) -> None:
    """Poll until a TCP connect to host:port succeeds; BrokerStartError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last_error: OSError | None = None
    while time.monotonic() < deadline:
        try:
            _reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), timeout=max(0.05, deadline - time.monotonic())
            )
        except (OSError, TimeoutError) as exc:
            last_error = exc if isinstance(exc, OSError) else None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise BrokerStartError(f"nothing accepted connections on {host}:{port} within {timeout_s:.1f} s"
                           f" (last error: {last_error})")


class EmbeddedBroker:
    """An amqtt (MQTT 3.1.1) broker running inside the current event loop.

    Usage::

        async with EmbeddedBroker() as broker:
            ...connect clients to broker.url / LOOPBACK:broker.port...

    With port=0 the listener binds an ephemeral port chosen by the kernel (no race with other
    processes) and `.port` reports it once started. Anonymous access, no persistence, no $SYS
    topics. Stopping disconnects every client and leaves no broker task running; `start()`
    after `stop()` (or `restart()`) listens on the same port again, for broker-restart tests.
    """

    def __init__(self, host: str = LOOPBACK, port: int = 0, *, quiet: bool = True) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._quiet = quiet
        self._broker: Any = None  # amqtt.broker.Broker; imported lazily (heavy import)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("broker not started")
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._broker is not None

    def _config(self, port: int) -> dict[str, Any]:
        return {
            "listeners": {
                "default": {"type": "tcp", "bind": f"{self.host}:{port}"},
            },
            # Only anonymous auth: the default plugin set also loads packet/event loggers and a
            # $SYS publisher that wakes every 20 s, none of which a simulation wants.
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }

    async def start(self) -> None:
        if self._broker is not None:
            raise RuntimeError("broker already started")
        if self._quiet:
            for name in _NOISY_LOGGERS:
                logging.getLogger(name).setLevel(logging.WARNING)
        from amqtt.broker import Broker, BrokerError

        # A restart reuses the port of the first start so connected clients can come back.
        port = self._port if self._port is not None else self._requested_port
        broker = Broker(self._config(port))
        try:
            await broker.start()
        except BrokerError as exc:
            raise BrokerStartError(f"embedded broker failed to start: {exc}") from exc
        self._broker = broker
        self._port = self._bound_port(broker, port)

    def _bound_port(self, broker: Any, requested: int) -> int:
        if requested != 0:
            return requested
        # amqtt keeps the asyncio.Server per listener; it is the only place the kernel-chosen
        # port is visible. If a future amqtt moves it, fail loudly rather than guess a port.
        try:
            sockets = broker._servers["default"].instance.sockets
            return int(sockets[0].getsockname()[1])
        except (AttributeError, KeyError, IndexError, TypeError) as exc:
            raise BrokerStartError("cannot read the embedded broker's bound port") from exc

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def mosquitto_bridge_config(
    name: str,
    host: str,
    port: int,
    *,
    topic: str = "murmur/#",
    qos: int = 1,
    restart_timeout_s: int = 1,
) -> str:
    """The mosquitto.conf(5) stanza that bridges the broker it is appended to (the *local*
    broker) to the broker at host:port (the *remote* one), for ``topic`` in both directions.

    This is the stanza tests/test_bridge_mosquitto.py runs Murmur over and the one
    docs/deploy/scaling.md ships. The bridge is a plain MQTT client of the remote broker, so it
    adds no trust: every Murmur payload is signed and every share sealed end to end, and a
    bridge can only drop, delay or duplicate messages, which the protocol already survives.
    No credentials here (loopback test brokers are anonymous); a deployment adds
    ``remote_username``/``remote_password`` and TLS options to the same stanza.
    """
    if not name or any(c.isspace() for c in name):
        raise ValueError(f"bridge name must be one word, got {name!r}")
    if not 0 < port <= 65535:
        raise ValueError(f"port must be in 1..65535, got {port}")
    if qos not in (0, 1, 2):
        raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
    if restart_timeout_s < 1:
        raise ValueError(f"restart_timeout_s must be >= 1, got {restart_timeout_s}")
    if not topic or any(c.isspace() for c in topic):
        raise ValueError(f"topic must be one non-empty pattern, got {topic!r}")
    lines = [
        # Starts the bridge section; the name also becomes the remote client id
        # (name.hostname), so two bridges into one broker need two names.
        f"connection {name}",
        f"address {host}:{port}",
        # Both directions, and QoS written out: a bridged topic's QoS defaults to 0, which
        # would let the bridge lose shares and the retained LEAVE of a will. Murmur publishes
        # and subscribes with QoS 1 only (docs/protocol.md section 2); QoS 1 may duplicate,
        # and the replay window drops the copy.
        f"topic {topic} both {qos}",
        # Murmur needs only MQTT 3.1.1, which every broker a bridge may point at speaks.
        "bridge_protocol_version mqttv311",
        # Tell the remote Mosquitto that this client is a bridge: it then keeps the retain
        # flag on what it forwards (so retained announcements and wills are retained on both
        # brokers, and a newcomer on either learns every live peer at once) and does not
        # echo the bridge's own messages back (loop detection).
        "try_private true",
        # A clean session on every bridge (re)connect: QoS 1 messages queued for a bridge
        # that was down belong to aggregation sessions that have timed out by then (peers use
        # clean sessions for the same reason), and re-subscribing brings the remote's retained
        # announcements across again - one per live peer, a burst that stays small.
        "cleansession true",
        # No $SYS/broker/connection/... state messages: they are not under murmur/, Murmur
        # never reads them, and they would need their own ACL lines on both brokers.
        "notifications false",
        # Connect when the broker starts and reconnect by itself after a failure...
        "start_type automatic",
        # ... after a short constant delay instead of the default backoff (5 s growing to
        # 30 s, with jitter), so a restarted broker rejoins the network within seconds.
        f"restart_timeout {restart_timeout_s}",
    ]
    return "\n".join(lines) + "\n"


class MosquittoBroker:
    """A Mosquitto process on a loopback port, with a generated minimal configuration.

    The configuration lives in a private temporary directory removed on `close()` (or on
    leaving the async context). `stop()` then `start()` restarts the broker on the *same* port,
    which is what broker-restart tests need; with persistence=True retained messages survive
    the restart. Anonymous access on loopback only (see the module docstring for why that is
    acceptable for a simulation).

    ``extra_config`` is appended verbatim after the generated lines, e.g. a bridge stanza from
    `mosquitto_bridge_config` so that this broker bridges to another one. It goes last
    because Mosquitto reads every option after a ``connection`` line as part of that bridge.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        binary: Path = DEFAULT_MOSQUITTO_BINARY,
        persistence: bool = False,
        start_timeout_s: float = 10.0,
        extra_config: str = "",
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        self.host = LOOPBACK
        self.port = port or free_loopback_port()
        self.binary = Path(binary)
        self.persistence = persistence
        self.start_timeout_s = start_timeout_s
        self.extra_config = extra_config
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @staticmethod
    def available(binary: Path = DEFAULT_MOSQUITTO_BINARY) -> bool:
        """True when the Mosquitto binary exists and is executable."""
        return Path(binary).is_file() and os.access(binary, os.X_OK)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path | None:
        return None if self._dir is None else self._dir / "mosquitto.log"

    def _prepare_dir(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="murmur-mosquitto-"))
            if self.persistence and os.geteuid() == 0:
                # Run as root, Mosquitto drops to the `mosquitto` user before writing its
                # persistence file, so that user must own the directory.
                with contextlib.suppress(KeyError):
                    entry = pwd.getpwnam("mosquitto")
                    os.chown(self._dir, entry.pw_uid, entry.pw_gid)
        return self._dir

    def config_text(self) -> str:
        """The Mosquitto configuration this broker runs with."""
        directory = self._prepare_dir()
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            f"max_packet_size {MOSQUITTO_MAX_PACKET_BYTES}",
            # Without it Nagle + delayed ACK hold small protocol messages back: a loopback
            # request/response took 44 ms instead of 1.5 ms with only the client's nodelay on.
            "set_tcp_nodelay true",
            # Peers publish bursts of shares; the defaults (1000 queued, 20 in flight) are
            # fine per client, but never drop QoS 1 messages for a slow subscriber on count.
            "max_queued_messages 10000",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
        ]
        if self.persistence:
            lines += ["persistence true", f"persistence_location {directory}/"]
        else:
            lines.append("persistence false")
        text = "\n".join(lines) + "\n"
        if self.extra_config:
            text += self.extra_config if self.extra_config.endswith("\n") else (
                self.extra_config + "\n")
        return text

    async def start(self) -> None:
        if self.running:
            raise RuntimeError("mosquitto already running")
        if not self.available(self.binary):
            raise BrokerStartError(f"mosquitto binary not found or not executable: {self.binary}")
        directory = self._prepare_dir()
        config_path = directory / "mosquitto.conf"
        config_path.write_text(self.config_text())
        log_path = directory / "mosquitto.log"
        self._log_file = open(log_path, "ab")  # noqa: SIM115 - held open for the process lifetime
        self._process = subprocess.Popen(
            [str(self.binary), "-c", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
        )
        try:
            await self._wait_ready()
        except BrokerStartError:
            await self.stop()
            raise

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise BrokerStartError(
                    f"mosquitto exited with code {self._process.returncode}: {self.log_tail()}"
                )
            try:
                await wait_until_accepting(self.host, self.port, timeout_s=0.25)
            except BrokerStartError:
                continue
            return
        raise BrokerStartError(
            f"mosquitto did not accept connections on port {self.port} within "
            f"{self.start_timeout_s:.1f} s: {self.log_tail()}"
        )

    def log_tail(self, max_chars: int = 800) -> str:
        """The last ``max_chars`` of the broker's log file, for error messages ("(no log)" when
        it has none yet)."""
        path = self.log_path
        if path is None or not path.exists():
            return "(no log)"
        text = path.read_text(errors="replace").strip()
        return text[-max_chars:] or "(empty log)"

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the process (SIGTERM, then SIGKILL after timeout_s); the port stays reserved."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait, timeout_s)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    async def kill(self) -> None:
        """Kill the process abruptly (SIGKILL), as a crash would."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        await self.stop()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def close(self) -> None:
        """Stop the process and delete the temporary directory."""
        await self.stop()
        directory, self._dir = self._dir, None
        if directory is not None:
            try:
                shutil.rmtree(directory)
            except OSError as exc:
                _log.warning("could not remove mosquitto temp dir %s: %s", directory, exc)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
