"""The shipped broker configuration (docs/deploy/) really is a wall.

Mosquitto is started with exactly ``docs/deploy/mosquitto.conf`` and ``docs/deploy/murmur.acl``;
only the directory of the secrets, the listener port (bound to loopback) and the network id are
filled in. The test makes its own certificate authority and server certificate, hashes the peer
passwords with ``mosquitto_passwd`` and then shows, over TLS, that

* a plain-text client, a client without credentials and a client with a wrong password are
  refused, and a client that does not trust the network's CA refuses the broker;
* a peer that publishes into another peer's topics (its announcement, its direct messages) is
  silently dropped by the broker, while the same peer's publishes under its own prefix arrive;
* a peer cannot read another peer's inbox, not even with a wildcard subscription.

Mosquitto drops unauthorised QoS 0/1 publishes without telling an MQTT 3.1.1 client, so "not
delivered" is shown with a legitimate subscriber: a marker the attacker publishes legitimately
*after* the forged message arrives, and the forged one never does (per-connection order is
kept by the broker), plus a short grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
from aiomqtt.exceptions import MqttConnectError

from peer.network.transport import BrokerSettings
from protocol.topics import announce_filter, announce_topic
from sim.broker import (
    DEFAULT_MOSQUITTO_BINARY,
    LOOPBACK,
    BrokerStartError,
    free_loopback_port,
    wait_until_accepting,
)
from tests.conftest import require_installed, require_mosquitto, wait_until

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(120)]

DEPLOY_DIR = Path(__file__).resolve().parent.parent / "docs" / "deploy"
SHIPPED_CONFIG = DEPLOY_DIR / "mosquitto.conf"
SHIPPED_ACL = DEPLOY_DIR / "murmur.acl"
# The two values of the shipped configuration that a test run has to change.
SHIPPED_SECRETS_DIR = "/etc/mosquitto/murmur/"
SHIPPED_LISTENER_LINE = "listener 8883\n"

MOSQUITTO_PASSWD = Path("/usr/bin/mosquitto_passwd")
NETWORK = "testnet"
PASSWORDS = {"alice": "alice-secret-1", "bob": "bob-secret-2", "carol": "carol-secret-3"}

# Bound on every wait for a message that should arrive; and the extra time we keep listening
# for one that must not.
DELIVERY_TIMEOUT_S = 5.0
GRACE_S = 0.5


# --------------------------------------------------------------------------- certificates
@dataclass(frozen=True)
class BrokerPki:
    """The files of a throw-away certificate authority and the broker's certificate."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_broker_pki(directory: Path, *, common_name: str = "localhost") -> BrokerPki:
    """Create a CA and a server certificate for ``localhost`` / 127.0.0.1 under ``directory``.

    The server certificate carries both names in subjectAltName, because the peer's TLS
    context (peer.network.transport.BrokerSettings) checks the host name.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Murmur test network CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName(common_name),
                x509.IPAddress(ipaddress.ip_address(LOOPBACK)),
            ]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    pki = BrokerPki(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    pki.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    pki.server_key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pki.server_key.chmod(0o600)
    return pki


# ------------------------------------------------------------------------ shipped config
def render_broker_config(shipped: str, secrets_dir: Path, port: int) -> str:
    """The shipped configuration with only the secrets directory and the listener changed.

    Fails loudly if the shipped file no longer has the shape this test relies on, so the test
    can never silently run a configuration other than the one we ship.
    """
    if SHIPPED_LISTENER_LINE not in shipped or SHIPPED_SECRETS_DIR not in shipped:
        raise AssertionError(
            f"{SHIPPED_CONFIG} no longer contains {SHIPPED_LISTENER_LINE!r} and "
            f"{SHIPPED_SECRETS_DIR!r}; update this test together with the shipped file"
        )
    rendered = shipped.replace(SHIPPED_LISTENER_LINE, f"listener {port} {LOOPBACK}\n")
    return rendered.replace(SHIPPED_SECRETS_DIR, f"{secrets_dir}/")


def render_acl(template: str, network: str) -> str:
    if "{network}" not in template:
        raise AssertionError(f"{SHIPPED_ACL} has no {{network}} placeholder")
    return template.replace("{network}", network)


def write_password_file(path: Path, passwords: dict[str, str]) -> None:
    """Hash the passwords into a Mosquitto password file with ``mosquitto_passwd -b``."""
    path.touch(mode=0o600)
    for username, password in passwords.items():
        subprocess.run(
            [str(MOSQUITTO_PASSWD), "-b", str(path), username, password],
            check=True, capture_output=True, timeout=30,
        )


def _hand_to_broker_user(directory: Path, pki: BrokerPki) -> None:
    """Give the broker's files the owners and modes the install guide gives them.

    Started as root, Mosquitto drops to the `mosquitto` user (as under systemd on a Debian
    broker host) and reads the password and ACL files after that, so they belong to that user,
    mode 0600, in a directory root:mosquitto 0750 (docs/deploy/raspberry-pi.md).
    """
    secrets = {directory / "passwd", directory / "acl", pki.server_key}
    for path in secrets:
        path.chmod(0o600)
    for path in (pki.ca_cert, pki.server_cert):
        path.chmod(0o644)
    if os.geteuid() != 0:
        return
    try:
        entry = pwd.getpwnam("mosquitto")
    except KeyError:
        return
    directory.chmod(0o750)
    os.chown(directory, 0, entry.pw_gid)
    for path in secrets:
        os.chown(path, entry.pw_uid, entry.pw_gid)


class SecuredMosquitto:
    """A Mosquitto process running the shipped Murmur configuration on a loopback port."""

    def __init__(
        self,
        directory: Path,
        network: str,
        passwords: dict[str, str] | None = None,
        *,
        port: int | None = None,
        password_file: Path | None = None,
        acl_file: Path | None = None,
        pki: BrokerPki | None = None,
    ) -> None:
        """Hash ``passwords`` and render the shipped ACL, or use the given (provisioned)
        password file and ACL instead; make a CA and server certificate unless ``pki`` (files
        inside ``directory``) is given."""
        self.directory = directory
        self.network = network
        self.port = port or free_loopback_port()
        self.pki = pki or make_broker_pki(directory)
        if password_file is not None:
            shutil.copyfile(password_file, directory / "passwd")
        else:
            write_password_file(directory / "passwd", passwords or {})
        if acl_file is not None:
            shutil.copyfile(acl_file, directory / "acl")
        else:
            (directory / "acl").write_text(render_acl(SHIPPED_ACL.read_text(), network))
        self.config_path = directory / "mosquitto.conf"
        self.config_path.write_text(
            render_broker_config(SHIPPED_CONFIG.read_text(), directory, self.port)
        )
        self.log_path = directory / "mosquitto.log"
        _hand_to_broker_user(directory, self.pki)
        self._process: subprocess.Popen[bytes] | None = None

    def settings(self, username: str | None, password: str | None) -> BrokerSettings:
        """How a peer reaches this broker (TLS, the network CA, these credentials)."""
        return BrokerSettings(
            url=f"mqtts://{LOOPBACK}:{self.port}",
            username=username,
            password=password,
            ca_file=self.pki.ca_cert,
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def start(self, timeout_s: float = 10.0) -> None:
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [str(DEFAULT_MOSQUITTO_BINARY), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self._process.poll() is not None:
                raise BrokerStartError(f"mosquitto exited: {self.log_text()[-1500:]}")
            try:
                await wait_until_accepting(LOOPBACK, self.port, timeout_s=0.25)
                break
            except BrokerStartError as exc:
                if time.monotonic() > deadline:
                    await self.stop()
                    raise BrokerStartError(f"{exc}; log: {self.log_text()[-1500:]}") from exc
        # The shipped configuration and the guide's file modes must load without complaint,
        # except for the warnings the ACL explains (all-peers read rules have no %u).
        # The readiness probe (a bare TCP connect, no TLS handshake) leaves two expected lines.
        expected = (f"'murmur/{self.network}/+/announce/+' does not contain",
                    f"'murmur/{self.network}/+/session/+' does not contain",
                    "unexpected eof while reading", "Client <unknown> disconnected")
        problems = [line for line in self.log_text().splitlines()
                    if ("warning" in line.lower() or "error" in line.lower())
                    and not any(known in line for known in expected)]
        if problems:
            await self.stop()  # a failed start must not leave a broker running
        assert not problems, problems

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 5.0)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait, 5.0)


@pytest.fixture
def secrets_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: its parent is private to root, and Mosquitto reads these files as
    # the `mosquitto` user.
    directory = Path(tempfile.mkdtemp(prefix="murmur-secured-broker-"))
    # Traverse-only for others: the broker (as `mosquitto`) reaches its own subdirectory; the
    # provisioned network secrets next to it stay in a 0700 directory.
    directory.chmod(0o711)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def broker(secrets_dir: Path) -> AsyncIterator[SecuredMosquitto]:
    require_mosquitto()
    require_installed(MOSQUITTO_PASSWD.is_file(), "mosquitto_passwd", "mosquitto")
    secured = SecuredMosquitto(secrets_dir, NETWORK, PASSWORDS)
    await secured.start()
    try:
        yield secured
    finally:
        await secured.stop()


# ------------------------------------------------------------------------------ clients
def client_for(
    broker: SecuredMosquitto,
    username: str | None,
    *,
    password: str | None = None,
    tls: bool = True,
    timeout_s: float = DELIVERY_TIMEOUT_S,
) -> aiomqtt.Client:
    """An MQTT 3.1.1 client for ``username`` (its real password unless one is given)."""
    if password is None and username is not None:
        password = PASSWORDS[username]
    tls_context = broker.settings(username, password).tls_context() if tls else None
    return aiomqtt.Client(
        LOOPBACK,
        broker.port,
        username=username,
        password=password,
        identifier=f"test-{username or 'anonymous'}-{os.urandom(4).hex()}",
        protocol=aiomqtt.ProtocolVersion.V311,
        tls_context=tls_context,
        timeout=timeout_s,
    )


def topic(*levels: str) -> str:
    return "/".join(("murmur", NETWORK, *levels))


async def collect_until(
    client: aiomqtt.Client, marker_topic: str, marker_payload: bytes
) -> list[tuple[str, bytes]]:
    """Every message ``client`` receives until the marker, then for GRACE_S more seconds."""
    received: list[tuple[str, bytes]] = []

    async def until_marker() -> None:
        async for message in client.messages:
            payload = bytes(message.payload)  # type: ignore[arg-type]
            received.append((str(message.topic), payload))
            if str(message.topic) == marker_topic and payload == marker_payload:
                return

    await asyncio.wait_for(until_marker(), timeout=DELIVERY_TIMEOUT_S)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(until_marker(), timeout=GRACE_S)
    return received


# CONNACK codes as paho reports them (MQTT 5 numbering, also for a 3.1.1 connection): "bad
# user name or password" and "not authorised".
CREDENTIAL_REFUSALS = {134, 135}


def assert_refused_for_credentials(error: MqttConnectError) -> None:
    reason = getattr(error.rc, "value", error.rc)
    assert reason in CREDENTIAL_REFUSALS, f"refused for another reason: {error.rc}"


# -------------------------------------------------------------------------------- tests
async def test_plain_text_client_is_refused(broker: SecuredMosquitto) -> None:
    # The broker waits for a TLS ClientHello and never answers the MQTT CONNECT.
    with pytest.raises(aiomqtt.MqttError):
        async with client_for(broker, "alice", tls=False, timeout_s=1.5):
            pass


async def test_client_without_credentials_is_refused(broker: SecuredMosquitto) -> None:
    with pytest.raises(MqttConnectError) as refused:
        async with client_for(broker, None):
            pass
    assert_refused_for_credentials(refused.value)


@pytest.mark.parametrize(("username", "password"), [
    ("alice", "not-alices-password"),
    ("alice", PASSWORDS["bob"]),
    ("mallory", "any-password"),
])
async def test_wrong_password_is_refused(
    broker: SecuredMosquitto, username: str, password: str
) -> None:
    with pytest.raises(MqttConnectError) as refused:
        async with client_for(broker, username, password=password):
            pass
    assert_refused_for_credentials(refused.value)


async def test_peer_refuses_broker_outside_the_network_ca(
    broker: SecuredMosquitto, secrets_dir: Path
) -> None:
    # The system trust store does not contain the network's CA: the handshake must fail.
    settings = BrokerSettings(url=f"mqtts://{LOOPBACK}:{broker.port}", username="alice",
                              password=PASSWORDS["alice"])
    client = aiomqtt.Client(LOOPBACK, broker.port, username="alice", password=PASSWORDS["alice"],
                            protocol=aiomqtt.ProtocolVersion.V311,
                            tls_context=settings.tls_context(), timeout=DELIVERY_TIMEOUT_S)
    with pytest.raises(aiomqtt.MqttError):
        async with client:
            pass


async def test_peer_with_credentials_connects_and_talks(broker: SecuredMosquitto) -> None:
    async with client_for(broker, "bob") as bob, client_for(broker, "alice") as alice:
        await bob.subscribe(announce_filter(NETWORK), qos=1)
        await bob.subscribe(topic("+", "to", "bob"), qos=1)
        await alice.publish(topic("alice", "to", "bob"), b"hello bob", qos=1)
        await alice.publish(announce_topic(NETWORK, "alice"), b"alice here", qos=1)
        received = await collect_until(bob, announce_topic(NETWORK, "alice"), b"alice here")
    assert (topic("alice", "to", "bob"), b"hello bob") in received


async def test_peer_cannot_publish_into_another_peers_topics(broker: SecuredMosquitto) -> None:
    async with client_for(broker, "carol") as carol, client_for(broker, "alice") as alice:
        await carol.subscribe(announce_filter(NETWORK), qos=1)
        await carol.subscribe(topic("+", "to", "carol"), qos=1)
        # Alice pretends to be Bob: his announcement, a direct message from him, and a topic
        # outside the Murmur tree altogether.
        forged = [
            (announce_topic(NETWORK, "bob"), b"forged announcement"),
            (topic("bob", "to", "carol"), b"forged share"),
            (f"murmur/{NETWORK}/carol/to/carol", b"forged self-message"),
            (announce_topic("othernet", "alice"), b"other network"),
        ]
        for forged_topic, payload in forged:
            # QoS 1 is acknowledged (MQTT 3.1.1 has no way to say "denied") but not delivered.
            await alice.publish(forged_topic, payload, qos=1)
        await alice.publish(topic("alice", "to", "carol"), b"legit share", qos=1)
        await alice.publish(announce_topic(NETWORK, "alice"), b"legit announcement", qos=0)
        received = await collect_until(carol, announce_topic(NETWORK, "alice"),
                                       b"legit announcement")

    assert (topic("alice", "to", "carol"), b"legit share") in received
    delivered_payloads = {payload for _topic, payload in received}
    for forged_topic, payload in forged:
        assert payload not in delivered_payloads, f"forged publish on {forged_topic} delivered"
    assert all(t.split("/")[2] == "alice" for t, _payload in received), received


async def test_forged_retained_announcement_does_not_replace_the_real_one(
    broker: SecuredMosquitto,
) -> None:
    async with client_for(broker, "bob") as bob:
        await bob.publish(announce_topic(NETWORK, "bob"), b"bob real", qos=1, retain=True)
    async with client_for(broker, "alice") as alice:
        await alice.publish(announce_topic(NETWORK, "bob"), b"bob forged", qos=1, retain=True)
        # An empty retained payload would erase Bob's announcement (it means "peer gone").
        await alice.publish(announce_topic(NETWORK, "bob"), b"", qos=1, retain=True)
    async with client_for(broker, "carol") as carol:
        await carol.subscribe(announce_topic(NETWORK, "bob"), qos=1)
        message = await asyncio.wait_for(anext(aiter(carol.messages)), DELIVERY_TIMEOUT_S)
        assert bytes(message.payload) == b"bob real"  # type: ignore[arg-type]
        assert message.retain


async def abandon_connection(client: aiomqtt.Client) -> None:
    """Cut the client's TCP connection without an MQTT DISCONNECT, as a crash or power cut
    would; the broker then publishes the client's last will."""
    sock = client._client.socket()  # aiomqtt has no public accessor; paho's client does
    assert isinstance(sock, socket.socket | ssl.SSLSocket), sock
    sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(aiomqtt.MqttError, OSError):
        await client.__aexit__(None, None, None)


async def test_last_will_on_another_peers_topic_is_not_published(
    broker: SecuredMosquitto,
) -> None:
    # A will is published by the broker on the client's behalf, so the write rule applies to
    # it too: Alice's will on Bob's announce topic (an empty payload would tell every peer
    # that Bob left) is dropped, while her will on her own topic is delivered.
    forged = client_for(broker, "alice")
    forged._client.will_set(announce_topic(NETWORK, "bob"), b"", qos=1, retain=True)
    honest = client_for(broker, "alice")
    honest._client.will_set(announce_topic(NETWORK, "alice"), b"alice gone", qos=1, retain=False)
    async with client_for(broker, "carol") as carol:
        await carol.subscribe(announce_filter(NETWORK), qos=1)
        await forged.__aenter__()
        await abandon_connection(forged)
        await honest.__aenter__()
        await abandon_connection(honest)
        received = await collect_until(carol, announce_topic(NETWORK, "alice"), b"alice gone")
    assert received == [(announce_topic(NETWORK, "alice"), b"alice gone")]


async def test_peer_cannot_read_another_peers_inbox(broker: SecuredMosquitto) -> None:
    async with (
        client_for(broker, "alice") as alice,
        client_for(broker, "bob") as bob,
        client_for(broker, "carol") as carol,
    ):
        await bob.subscribe(topic("+", "to", "bob"), qos=1)
        grants = {}
        for snoop in (topic("+", "to", "bob"), topic("carol", "to", "bob"), topic("#"), "#"):
            grants[snoop] = await alice.subscribe(snoop, qos=1)
        # Alice may subscribe to her own inbox; the marker proves her subscriptions are live.
        await alice.subscribe(topic("+", "to", "alice"), qos=1)

        await carol.publish(topic("carol", "to", "bob"), b"for bob only", qos=1)
        await carol.publish(topic("carol", "to", "alice"), b"for alice", qos=1)
        bob_got = await collect_until(bob, topic("carol", "to", "bob"), b"for bob only")
        alice_got = await collect_until(alice, topic("carol", "to", "alice"), b"for alice")

    assert (topic("carol", "to", "bob"), b"for bob only") in bob_got
    assert alice_got == [(topic("carol", "to", "alice"), b"for alice")], (grants, alice_got)


async def test_certificates_from_the_shipped_script_work(secrets_dir: Path) -> None:
    # The guide tells operators to make the broker's TLS files with make-broker-certs.sh; the
    # peer's TLS context (host name + chain verification) must accept what it makes.
    require_mosquitto()
    require_installed(shutil.which("openssl") is not None, "openssl", "openssl")
    subprocess.run(["sh", str(DEPLOY_DIR / "make-broker-certs.sh"), str(secrets_dir),
                    "localhost", LOOPBACK], check=True, capture_output=True, timeout=60)
    (secrets_dir / "ca.key").unlink()  # the broker never holds the CA key
    (secrets_dir / "ca.srl").unlink()
    pki = BrokerPki(secrets_dir / "ca.crt", secrets_dir / "server.crt", secrets_dir / "server.key")
    secured = SecuredMosquitto(secrets_dir, NETWORK, PASSWORDS, pki=pki)
    await secured.start()
    try:
        for url in (f"mqtts://{LOOPBACK}:{secured.port}", f"mqtts://localhost:{secured.port}"):
            settings = BrokerSettings(url=url, username="alice", password=PASSWORDS["alice"],
                                      ca_file=pki.ca_cert)
            host, port, _tls = settings.endpoint()
            async with aiomqtt.Client(host, port, username="alice", password=PASSWORDS["alice"],
                                      protocol=aiomqtt.ProtocolVersion.V311,
                                      tls_context=settings.tls_context(),
                                      timeout=DELIVERY_TIMEOUT_S) as alice:
                await alice.subscribe(topic("+", "to", "alice"), qos=1)
                await alice.publish(topic("alice", "to", "alice"), b"ping", qos=1)
                message = await asyncio.wait_for(anext(aiter(alice.messages)),
                                                 DELIVERY_TIMEOUT_S)
                assert bytes(message.payload) == b"ping"  # type: ignore[arg-type]
    finally:
        await secured.stop()


def acl_rules(text: str) -> set[str]:
    return {line.strip() for line in text.splitlines() if line.strip() and
            not line.lstrip().startswith("#")}


def test_provisioned_acl_has_exactly_the_shipped_rules() -> None:
    # `murmur-peer provision` writes the ACL a real broker gets; it must grant no more and no
    # less than the template this file tests against the real Mosquitto.
    from peer.provision import mosquitto_acl

    shipped = acl_rules(render_acl(SHIPPED_ACL.read_text(), NETWORK))
    assert acl_rules(mosquitto_acl(NETWORK)) == shipped
    assert shipped == {
        f"pattern write murmur/{NETWORK}/%u/#",
        f"pattern read murmur/{NETWORK}/+/announce/+",
        f"pattern read murmur/{NETWORK}/+/to/%u",
        f"pattern read murmur/{NETWORK}/+/session/+",
    }


# ------------------------------------------------------------------- real peers over TLS
def provisioned_peer_config(files: Any, broker: SecuredMosquitto, base: Path) -> Any:
    """The TOML `murmur-peer provision` wrote for one peer, pointed at the TLS broker, with
    short timings and tiny training rounds so the test runs in seconds."""
    import tomllib

    from peer.config import parse_config

    document = tomllib.loads(files.config.read_text())
    document["broker"]["ca_file"] = str(broker.pki.ca_cert)
    document["announce_interval_s"] = 2.0
    document["silence_expiry_s"] = 20.0
    document["session"].update(invite_timeout_s=2.0, start_timeout_s=3.0, share_timeout_s=3.0,
                               partial_timeout_s=3.0)
    document["training"].pop("target_epsilon", None)  # fixed noise instead: same every run
    document["training"].update(model="mlp", batch_size=32, local_steps=2, dp=True,
                                noise_multiplier=1.0, budget_epsilon=1e6, topk_fraction=0.1)
    return parse_config(document, base, files.config)


# Drop reasons that honest peers can cause by timing alone (a message of a session that
# already ended here, a peer not yet admitted when its first message arrives).
BENIGN_DROPS = {"unknown_session", "unknown_sender"}


async def test_three_provisioned_peers_complete_a_session_over_tls(
    secrets_dir: Path, one_torch_thread: None,
) -> None:
    """The deployment path end to end: `murmur-peer provision` makes the network (admission
    key, identities, certificates, broker passwords, ACL); Mosquitto runs the shipped TLS
    configuration with that password file and ACL; three real peers built from their
    provisioned configs find each other and complete aggregation sessions."""
    require_mosquitto()
    # three peers in one process: one intra-op torch thread each (the one_torch_thread fixture)
    from peer.assembly import peer_from_config
    from peer.provision import provision

    port = free_loopback_port()
    names = ["pi-01", "pi-02", "pi-03"]
    network = provision(NETWORK, names, secrets_dir / "network",
                        broker_url=f"mqtts://{LOOPBACK}:{port}")
    broker_dir = secrets_dir / "broker"
    broker_dir.mkdir()
    secured = SecuredMosquitto(broker_dir, NETWORK, port=port,
                               password_file=network.mosquitto_passwd,
                               acl_file=network.mosquitto_acl)
    await secured.start()
    peers = []
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        for files in network.peers:
            cfg = provisioned_peer_config(files, secured, files.config.parent)
            assert cfg.broker.url.startswith("mqtts://") and cfg.broker.password
            peers.append(peer_from_config(cfg))
        tasks = [asyncio.create_task(peer.run(stop)) for peer in peers]
        await wait_until(lambda: all(p.status().peers_live == 2 for p in peers), 30,
                         "every peer to admit the two others")
        await wait_until(lambda: all(p.status().sessions_done >= 1
                                     and p.status().merges_applied >= 1 for p in peers), 60,
                         "every peer to complete a session and merge its result")
        statuses = [peer.status() for peer in peers]  # before shutdown noise (leaves, aborts)
    finally:
        stop.set()
        if tasks:
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=30)
        await secured.stop()
    for status in statuses:
        assert status.connected and status.peers_live == 2, status
        # Honest peers through an honest broker: no message failed a security check. (A late
        # message of a session that ended elsewhere may legitimately arrive.)
        assert set(status.drops) <= BENIGN_DROPS, status


def test_device_config_template_loads(secrets_dir: Path) -> None:
    # docs/deploy/peer.toml must stay in step with peer/config.py: filled in as the guide
    # says (ids, paths), it loads and its credentials check out.
    from peer.assembly import load_credentials
    from peer.config import load_config
    from peer.provision import provision

    network = provision("farm", ["pi-01"], secrets_dir / "network",
                        broker_url="mqtts://broker.lan:8883")
    etc = secrets_dir / "etc"
    etc.mkdir()
    files = network.peers[0]
    for source in (files.identity, files.certificate, files.broker_password,
                   network.admission_public):
        shutil.copy(source, etc / source.name)
    pki = make_broker_pki(secrets_dir)
    shutil.copy(pki.ca_cert, etc / "ca.crt")
    text = (DEPLOY_DIR / "peer.toml").read_text()
    text = (text.replace("PEER-ID", "pi-01").replace("NETWORK-ID", "farm")
            .replace("/etc/murmur", str(etc)).replace("/var/lib/murmur", str(secrets_dir)))
    data_dir = secrets_dir / "data"
    data_dir.mkdir()
    np.savez(data_dir / "shard.npz", x=np.random.default_rng(0).random((40, 8)),
             y=np.arange(40) % 2)
    (etc / "peer.toml").write_text(text)

    cfg = load_config(etc / "peer.toml")
    identity, certificate = load_credentials(cfg)
    assert identity.peer_id == certificate.peer_id == "pi-01"
    assert cfg.broker.url == "mqtts://broker.lan:8883" and cfg.broker.password
    assert cfg.state_dir == secrets_dir and cfg.data == f"npz:{data_dir / 'shard.npz'}"
    assert cfg.training.dp
