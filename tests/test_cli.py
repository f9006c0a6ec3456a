"""murmur-peer as a user runs it: subprocesses, real key files, a real Mosquitto for provision."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest

from crypto.admission import AdmissionKey, verify_certificate
from crypto.identity import Identity
from peer.provision import (
    ProvisionError,
    load_certificate,
    load_public_identity,
    parse_peer_list,
    provision,
)
from sim.broker import LOOPBACK, MosquittoBroker, free_loopback_port, wait_until_accepting
from tests.conftest import require_mosquitto

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parents[1]


def murmur_peer(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh interpreter, as the console script would."""
    return subprocess.run(
        [sys.executable, "-m", "peer.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=False,
    )


def assert_user_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    """Exit code 2, one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("murmur-peer: error:"), result.stderr
    assert fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_network_identity_enroll_round_trip(tmp_path: Path) -> None:
    created = murmur_peer("network", "create", "--network", "demo", "--out", "admission.key",
                          cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    public_hex = created.stdout.strip()
    admission = AdmissionKey.load(tmp_path / "admission.key")
    assert public_hex == admission.public_key.hex()
    assert (tmp_path / "admission.pub").read_text().strip() == public_hex
    assert mode(tmp_path / "admission.key") == 0o600

    made = murmur_peer("identity", "create", "--peer", "alice", "--out", "keys", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    identity = Identity.load(tmp_path / "keys" / "alice.key")
    assert mode(tmp_path / "keys" / "alice.key") == 0o600
    assert load_public_identity(tmp_path / "keys" / "alice.pub") == identity.public

    enrolled = murmur_peer("enroll", "--admission", "admission.key", "--public",
                           "keys/alice.pub", "--out", "keys/alice.cert", "--days", "2",
                           cwd=tmp_path)
    assert enrolled.returncode == 0, enrolled.stderr
    cert = load_certificate(tmp_path / "keys" / "alice.cert")
    assert cert.public == identity.public and cert.network_id == "demo"
    assert cert.expires_at - cert.issued_at == pytest.approx(2 * 86_400)
    verify_certificate(cert, network_id="demo", admission_public_key=admission.public_key,
                       now=cert.issued_at + 60)

    # Re-enrolling needs --force; then the certificate is replaced.
    again = murmur_peer("enroll", "--admission", "admission.key", "--public", "keys/alice.pub",
                        "--out", "keys/alice.cert", cwd=tmp_path)
    assert_user_error(again, "--force")
    forced = murmur_peer("enroll", "--admission", "admission.key", "--public",
                         "keys/alice.pub", "--out", "keys/alice.cert", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert load_certificate(tmp_path / "keys" / "alice.cert").issued_at >= cert.issued_at


def test_secrets_are_never_overwritten(tmp_path: Path) -> None:
    assert murmur_peer("network", "create", "--network", "demo", "--out", "admission.key",
                       cwd=tmp_path).returncode == 0
    original = (tmp_path / "admission.key").read_bytes()
    again = murmur_peer("network", "create", "--network", "demo", "--out", "admission.key",
                        cwd=tmp_path)
    assert_user_error(again, "refusing to overwrite")
    assert (tmp_path / "admission.key").read_bytes() == original

    assert murmur_peer("identity", "create", "--peer", "bob", "--out", ".",
                       cwd=tmp_path).returncode == 0
    key_before = (tmp_path / "bob.key").read_bytes()
    again = murmur_peer("identity", "create", "--peer", "bob", "--out", ".", cwd=tmp_path)
    assert_user_error(again, "bob.key")
    assert (tmp_path / "bob.key").read_bytes() == key_before


def test_error_paths_are_one_line(tmp_path: Path) -> None:
    assert_user_error(
        murmur_peer("identity", "create", "--peer", "Not-Valid", "--out", "k", cwd=tmp_path),
        "peer id")
    assert not (tmp_path / "k").exists()  # nothing written for a bad name
    assert_user_error(
        murmur_peer("network", "create", "--network", "bad/net", "--out", "a.key", cwd=tmp_path),
        "network id")
    assert_user_error(
        murmur_peer("enroll", "--admission", "missing.key", "--public", "x.pub", "--out",
                    "x.cert", cwd=tmp_path),
        "missing.key")
    # A secret key passed where the public identity belongs is named as such.
    assert murmur_peer("network", "create", "--network", "demo", "--out", "admission.key",
                       cwd=tmp_path).returncode == 0
    assert murmur_peer("identity", "create", "--peer", "carol", "--out", ".",
                       cwd=tmp_path).returncode == 0
    assert_user_error(
        murmur_peer("enroll", "--admission", "admission.key", "--public", "carol.key",
                    "--out", "carol.cert", cwd=tmp_path),
        "secret key file")
    # The wrong kind of key file as the admission key.
    assert_user_error(
        murmur_peer("enroll", "--admission", "carol.key", "--public", "carol.pub",
                    "--out", "carol.cert", cwd=tmp_path),
        "admission-key")
    assert_user_error(
        murmur_peer("enroll", "--admission", "admission.key", "--public", "carol.pub",
                    "--out", "carol.cert", "--days", "-1", cwd=tmp_path),
        "days")
    assert_user_error(murmur_peer("run", "--config", "nope.toml", cwd=tmp_path), "nope.toml")
    (tmp_path / "bad.toml").write_text("peer_id = \n")
    assert_user_error(murmur_peer("run", "--config", "bad.toml", cwd=tmp_path), "TOML")
    # argparse usage errors also exit with 2.
    assert murmur_peer("enroll", cwd=tmp_path).returncode == 2


def test_provision_writes_everything_once_and_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "net"
    result = provision("demo", ["alice", "bob", "carol"], out, days=10)
    admission = AdmissionKey.load(result.admission_key)
    assert result.admission_public_hex == admission.public_key.hex()
    assert mode(result.admission_key) == 0o600 and mode(result.mosquitto_passwd) == 0o600
    for files in result.peers:
        identity = Identity.load(files.identity)
        cert = load_certificate(files.certificate)
        assert cert.public == identity.public == load_public_identity(files.public)
        verify_certificate(cert, network_id="demo", admission_public_key=admission.public_key,
                           now=cert.issued_at)
        assert mode(files.identity) == 0o600 and mode(files.broker_password) == 0o600
        assert len(files.broker_password.read_text().strip()) >= 24
    passwd_lines = result.mosquitto_passwd.read_text().splitlines()
    assert [line.split(":")[0] for line in passwd_lines] == ["alice", "bob", "carol"]
    assert all(line.split(":", 1)[1].startswith("$7$") for line in passwd_lines)  # hashed
    for files in result.peers:  # no plaintext password in the hashed file
        assert files.broker_password.read_text().strip() not in result.mosquitto_passwd.read_text()
    assert "pattern write murmur/demo/%u/#" in result.mosquitto_acl.read_text()

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ProvisionError, match="never overwrites"):
        provision("demo", ["alice", "dave"], out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not (out / "peers" / "dave.key").exists()

    for bad in ("", "a,a", "a,B"):
        with pytest.raises(ValueError):
            parse_peer_list(bad)


def test_provision_cli_and_generated_config_load(tmp_path: Path) -> None:
    run = murmur_peer("provision", "--network", "demo", "--peers", "a,b,c", "--out", "net",
                      "--broker-url", "mqtts://broker.example:8883", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "admission public key" in run.stdout
    config_text = (tmp_path / "net" / "peers" / "a.toml").read_text()
    assert 'url = "mqtts://broker.example:8883"' in config_text
    assert_user_error(
        murmur_peer("provision", "--network", "demo", "--peers", "a", "--out", "net",
                    cwd=tmp_path),
        "never overwrites")


@pytest.mark.mosquitto
async def test_provisioned_credentials_and_acl_hold_on_a_real_mosquitto(tmp_path: Path) -> None:
    """The generated passwd + ACL: wrong passwords are refused, a peer cannot publish under
    another peer's topics, nor read another peer's inbox."""
    require_mosquitto()
    result = provision("demo", ["alice", "bob"], tmp_path / "net")
    port = free_loopback_port()
    conf = tmp_path / "mosquitto.conf"
    lines = [f"listener {port} {LOOPBACK}"]
    if os.geteuid() == 0:
        lines.append("user root")  # else Mosquitto drops to `mosquitto`, which cannot read 0600
    lines += result.mosquitto_conf.read_text().splitlines()
    conf.write_text("\n".join(lines) + "\n")
    broker = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(conf)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        await wait_until_accepting(LOOPBACK, port, timeout_s=10)
        password = {f.peer_id: f.broker_password.read_text().strip() for f in result.peers}
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(LOOPBACK, port, username="alice", password="wrong"):
                pass
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(LOOPBACK, port):  # anonymous
                pass
        async with (
            aiomqtt.Client(LOOPBACK, port, username="alice", password=password["alice"],
                           identifier="alice") as alice,
            aiomqtt.Client(LOOPBACK, port, username="bob", password=password["bob"],
                           identifier="bob") as bob,
        ):
            await alice.subscribe("murmur/demo/+/to/alice", qos=1)
            await alice.subscribe("murmur/demo/+/to/bob", qos=1)  # not readable by alice
            await alice.subscribe("murmur/demo/+/announce", qos=1)
            await bob.publish("murmur/demo/alice/to/alice", b"forged sender", qos=1)
            await bob.publish("murmur/demo/alice/announce", b"forged announce", qos=1)
            await bob.publish("murmur/demo/bob/to/bob", b"bob's own inbox", qos=1)
            await bob.publish("murmur/demo/bob/announce", b"announce", qos=1)
            await bob.publish("murmur/demo/bob/to/alice", b"hello", qos=1)
            received: list[tuple[str, bytes]] = []
            async with asyncio.timeout(10):
                async for message in alice.messages:
                    assert isinstance(message.payload, bytes)
                    received.append((str(message.topic), message.payload))
                    if message.payload == b"hello":
                        break
            # Publishes from one client arrive in order: everything before "hello" was seen.
            assert received == [("murmur/demo/bob/announce", b"announce"),
                                ("murmur/demo/bob/to/alice", b"hello")]
    finally:
        broker.terminate()
        broker.wait(timeout=10)


def test_status_line_is_one_line_with_the_figures() -> None:
    from peer.network.counters import PeerStatus
    from peer.status import format_status, human_bytes, human_duration

    status = PeerStatus(
        peer_id="alice", connected=True, peers_live=4, round=37,
        sessions_done=21, sessions_aborted=2, accuracy=0.9134, epsilon=1.843,
        bytes_sent=3 * 1024 * 1024, bytes_received=1536,
        drops={"bad_signature": 2, "replay": 1, "malformed": 1, "stale": 1},
    )
    line = format_status(status, uptime_s=724, budget_epsilon=8.0)
    assert line == (
        "alice up 12m04s | peers 4 | rounds 37 | sessions 21 ok 2 aborted | acc 91.3% | "
        "eps 1.84/8.00 | sent 3.0 MiB recv 1.5 KiB | "
        "drops 5 (bad_signature 2, malformed 1, replay 1, +1 more)"
    )
    cut = format_status(status, uptime_s=724, budget_epsilon=8.0, max_width=40)
    assert len(cut) == 40 and cut.endswith("...")
    offline = format_status(PeerStatus(peer_id="bob", connected=False, budget_exhausted=True),
                            uptime_s=3.7, note="broker:\nunreachable")
    assert offline.endswith("budget spent: sharing stopped | broker: unreachable")
    assert offline.startswith("bob OFFLINE 3s |") and "acc - | eps off" in offline
    assert "drops 0" in offline and "\n" not in offline
    assert human_bytes(0) == "0 B" and human_bytes(1023) == "1023 B"
    assert human_duration(3723) == "1h02m03s" and human_duration(float("nan")) == "0s"


@pytest.mark.mosquitto
async def test_run_announces_then_leaves_cleanly_on_sigterm(
    tmp_path: Path, mosquitto: MosquittoBroker,
) -> None:
    """`run` on a real broker: a signed, retained announcement appears; SIGTERM makes the peer
    leave (retained announcement cleared), print its final status and exit 0."""
    import signal

    from protocol.codec import decode_message
    from protocol.topics import announce_topic

    result = provision("demo", ["alice"], tmp_path / "net", broker_url=mosquitto.url)
    config = result.peers[0].config
    config.write_text(
        config.read_text().replace("password_file", "# password_file").replace(
            "target_epsilon = 8.0", "dp = false\nlocal_steps = 2\nbatch_size = 16")
    )
    topic = announce_topic("demo", "alice")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "peer.cli", "run", "--config", str(config),
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="watch") as watch:
            await watch.subscribe(topic, qos=1)
            async with asyncio.timeout(90):  # includes the torch import on a loaded machine
                async for message in watch.messages:
                    assert isinstance(message.payload, bytes)
                    if message.payload:
                        announced = decode_message(message.payload)
                        break
            assert announced.header.sender == "alice"
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(60):
                async for message in watch.messages:
                    if message.payload == b"":  # the peer cleared its announcement
                        break
            async with asyncio.timeout(60):
                stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()[-2000:]
    final_line = stdout.decode().strip().splitlines()[-1]
    assert final_line.startswith("alice ") and "| drops " in final_line
    assert b"SIGTERM received" in stderr and b"Traceback" not in stderr
