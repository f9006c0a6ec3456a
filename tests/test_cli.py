"""murmur-peer as a user runs it: subprocesses, real key files, a real Mosquitto for provision."""

from __future__ import annotations

import asyncio
import os
import pwd
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
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


def broker_user_exists() -> bool:
    """Whether a Mosquitto started as root has the user `mosquitto` to drop to."""
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        return False
    return True


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


def test_provision_directories_let_the_broker_through_and_keep_keys_private(
        tmp_path: Path) -> None:
    """The output and mosquitto/ directories are 0711 (the broker's user passes through,
    nobody else lists them), peers/ and data/ 0700, whatever the umask; every secret file is
    0600; an output directory that exists keeps its mode."""
    previous = os.umask(0o077)  # the modes must not depend on the operator's umask
    try:
        result = provision("demo", ["alice", "bob", "carol"], tmp_path / "net", demo=True)
    finally:
        os.umask(previous)
    out = tmp_path / "net"
    assert mode(out) == 0o711 and mode(out / "mosquitto") == 0o711
    assert mode(out / "peers") == 0o700 and mode(out / "data") == 0o700
    assert mode(result.admission_key) == 0o600 and mode(result.mosquitto_passwd) == 0o600
    assert mode(result.mosquitto_acl) == 0o644 and mode(result.mosquitto_conf) == 0o644
    for files in result.peers:
        assert files.data is not None and mode(files.data) == 0o600
        assert mode(files.identity) == 0o600 and mode(files.broker_password) == 0o600
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o750)
    os.chmod(mine, 0o750)
    provision("demo", ["alice"], mine)
    assert mode(mine) == 0o750 and mode(mine / "mosquitto") == 0o711


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


def test_provision_clients_and_the_refusal_to_serve_an_mlp(tmp_path: Path) -> None:
    run = murmur_peer("provision", "--network", "demo", "--peers", "a,b,c", "--clients", "erin",
                      "--out", "net", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    from peer.provision import load_certificate

    assert load_certificate(tmp_path / "net" / "clients" / "erin.cert").role == "client"
    assert load_certificate(tmp_path / "net" / "peers" / "a.cert").role == "peer"
    assert "user erin\ntopic write murmur/demo/erin/to/+\n" in (
        tmp_path / "net" / "mosquitto" / "acl").read_text()
    config = tmp_path / "net" / "peers" / "a.toml"
    config.write_text(config.read_text().replace("[training]\n", '[training]\nmodel = "mlp"\n'))
    assert_user_error(
        murmur_peer("publish-snapshot", "--config", str(config), "--servers", "b,c,a",
                    cwd=tmp_path),
        "cannot be served privately")


@pytest.fixture
def broker_reachable_dir() -> Iterator[Path]:
    """A directory every user can pass through (pytest's tmp_path sits under a 0700 one), so
    a Mosquitto that dropped to its own user reaches what is provisioned inside it."""
    with tempfile.TemporaryDirectory(prefix="murmur-provision-") as name:
        os.chmod(name, 0o711)
        yield Path(name)


@pytest.mark.mosquitto
async def test_provisioned_credentials_and_acl_hold_on_a_real_mosquitto(
        broker_reachable_dir: Path) -> None:
    """The generated passwd + ACL: wrong passwords are refused, a peer cannot publish under
    another peer's topics, nor read another peer's inbox. Started as root, Mosquitto drops to
    user `mosquitto`; the test then takes docs/peer.md's one step, `chown mosquitto passwd`,
    and nothing else, so the provisioned directory modes are what lets the broker in."""
    require_mosquitto()
    base = broker_reachable_dir
    result = provision("demo", ["alice", "bob"], base / "net")
    port = free_loopback_port()
    conf = base / "mosquitto.conf"
    lines = [f"listener {port} {LOOPBACK}"]
    if os.geteuid() == 0:
        if broker_user_exists():
            subprocess.run(["chown", "mosquitto", str(result.mosquitto_passwd)], check=True)
        else:
            lines.append("user root")  # no `mosquitto` user to drop to
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
            await alice.subscribe("murmur/demo/+/announce/+", qos=1)  # every bucket
            await bob.publish("murmur/demo/alice/to/alice", b"forged sender", qos=1)
            await bob.publish("murmur/demo/alice/announce/2a", b"forged announce", qos=1)
            await bob.publish("murmur/demo/bob/to/bob", b"bob's own inbox", qos=1)
            await bob.publish("murmur/demo/bob/announce/20", b"announce", qos=1)
            await bob.publish("murmur/demo/bob/to/alice", b"hello", qos=1)
            received: list[tuple[str, bytes]] = []
            async with asyncio.timeout(10):
                async for message in alice.messages:
                    assert isinstance(message.payload, bytes)
                    received.append((str(message.topic), message.payload))
                    if message.payload == b"hello":
                        break
            # Publishes from one client arrive in order: everything before "hello" was seen.
            assert received == [("murmur/demo/bob/announce/20", b"announce"),
                                ("murmur/demo/bob/to/alice", b"hello")]
    finally:
        broker.terminate()
        broker.wait(timeout=10)


def test_status_line_is_one_line_with_the_figures() -> None:
    from peer.network.counters import STATE_CONNECTING, STATE_TRAINING, PeerStatus
    from peer.status import format_status, human_bytes, human_duration

    # A restarted peer: totals since it was created, this run's share in brackets.
    status = PeerStatus(
        peer_id="alice", connected=True, state=STATE_TRAINING, peers_live=4,
        round=924, rounds_total=1501, sessions_done=21, sessions_total=210,
        sessions_aborted=2, accuracy=0.9134, dp=True, epsilon=1.843, budget_epsilon=8.0,
        bytes_sent=3 * 1024 * 1024, bytes_received=1536,
        drops={"bad_signature": 2, "replay": 1, "malformed": 1, "stale": 1},
    )
    line = format_status(status, uptime_s=724)
    assert line == (
        "alice training 12m04s | peers 4 | rounds 1501 (+924 this run) | "
        "sessions 210 (+21 this run), 2 aborted | acc 91.3% | eps 1.84/8.00 | "
        "sent 3.0 MiB recv 1.5 KiB | drops 5 (bad_signature 2, malformed 1, replay 1, +1 more)"
    )
    assert format_status(status, uptime_s=724, budget_epsilon=3.0).count("eps 1.84/3.00") == 1
    cut = format_status(status, uptime_s=724, max_width=40)
    assert len(cut) == 40 and cut.endswith("...")

    # At start-up, before the first round: DP is on, so never "eps off".
    fresh = format_status(PeerStatus(peer_id="bob", dp=True, epsilon=None, budget_epsilon=8.0),
                          uptime_s=3.7, note="broker:\nunreachable\tn\u00e9")
    assert fresh.startswith(f"bob {STATE_CONNECTING} 3s | peers 0 | rounds 0 | "
                            "sessions 0, 0 aborted | acc - | eps -/8.00 |")
    assert fresh.endswith("| drops 0 | broker: unreachable n?")  # one line of ASCII
    after_restart = format_status(
        PeerStatus(peer_id="bob", dp=True, epsilon=8.0, budget_epsilon=8.0,
                   budget_exhausted=True, rounds_total=300, state="budget spent: averaging only"),
        uptime_s=1)
    assert after_restart.startswith("bob budget spent: averaging only 1s |")
    assert "| rounds 300 (+0 this run) |" in after_restart and "| eps 8.00/8.00 |" in after_restart
    measured = format_status(PeerStatus(peer_id="erin", peak_rss_mb=287.4), uptime_s=1)
    assert measured.endswith("| drops 0 | peak rss 287 MiB")
    no_dp = format_status(PeerStatus(peer_id="carol", dp=False, epsilon=None), uptime_s=1)
    assert "| eps off |" in no_dp
    unlimited = format_status(PeerStatus(peer_id="dave", epsilon=0.5), uptime_s=1)
    assert "| eps 0.50 (no budget) |" in unlimited
    assert human_bytes(0) == "0 B" and human_bytes(1023) == "1023 B"
    assert human_duration(3723) == "1h02m03s" and human_duration(float("nan")) == "0s"


def test_peak_rss_is_the_kernels_high_water_mark() -> None:
    """peer.resources.peak_rss_mb reads VmHWM: never below the resident set read now, and it
    does not fall when memory is freed."""
    import psutil

    from peer.resources import peak_rss_mb

    rss_before = psutil.Process().memory_info().rss / (1024 * 1024)
    block = b"\x01" * (96 * 1024 * 1024)  # written: resident
    with_block = peak_rss_mb()
    assert with_block is not None and with_block >= rss_before + 90
    del block
    after = peak_rss_mb()  # the block is gone, its peak is not
    assert after is not None and after >= rss_before + 90
    assert psutil.Process().memory_info().rss / (1024 * 1024) < rss_before + 90


def test_plain_report_prints_on_events_not_at_start() -> None:
    """Without a terminal: no line before the peer connects, a line per event that matters,
    sessions at most once per interval with their count, and a slow heartbeat."""
    from peer.network.node import PeerEvent
    from peer.status import PlainReport

    def event(kind: str, **data: object) -> PeerEvent:
        return PeerEvent(kind, "alice", 0.0, dict(data))

    report = PlainReport(started=100.0, heartbeat_s=60.0, sessions_every_s=10.0)
    assert report.due(100.0, connected=False) == []  # never "OFFLINE 0s" at t=0
    assert report.due(130.0, connected=False) == []
    report.on_event(event("connected"))
    assert report.due(131.0, connected=True) == ["connected to the broker"]
    assert report.due(132.0, connected=True) == []
    report.on_event(event("round", round=1, epsilon=0.1, accuracy=0.5, steps=20))  # no line
    report.on_event(event("session_done", members=["alice", "bob", "carol"], duration_s=1.25))
    assert report.due(133.0, connected=True) == ["session done (3 members, 1.2s)"]
    for _ in range(4):
        report.on_event(event("session_done", members=["alice", "bob", "carol"],
                              duration_s=1.0))
    assert report.due(140.0, connected=True) == []  # rate-limited: 7 s since the last one
    report.on_event(event("budget_milestone", epsilon=2.0, budget_epsilon=8.0, fraction=0.25))
    report.on_event(event("disconnected"))
    assert report.due(143.5, connected=False) == [
        "25% of the privacy budget spent (eps 2.00)", "lost the broker; reconnecting",
        "4 sessions done since the last line"]
    assert report.due(200.0, connected=True) == []
    assert report.due(203.5, connected=True) == [None]  # heartbeat: 60 s after the last line
    report.on_event(event("budget_exhausted", epsilon=8.0))
    report.on_event(event("training_failed", error="RuntimeError('out of\nmemory')"))
    report.on_event(event("session_done", members=["alice", "bob", "carol"], duration_s=2.0))
    assert report.flush() == [
        "privacy budget spent (eps 8.00): no more private training",
        "training failed: RuntimeError('out of\nmemory')", "session done (3 members, 2.0s)"]
    assert report.flush() == []

    never = PlainReport(started=0.0, heartbeat_s=60.0)
    assert never.due(59.0, connected=False) == []
    assert never.due(60.0, connected=False) == [None]  # still connecting after a minute


@pytest.mark.mosquitto
async def test_run_announces_then_leaves_cleanly_on_sigterm(
    tmp_path: Path, mosquitto: MosquittoBroker,
) -> None:
    """`run` on a real broker: a signed, retained announcement appears; SIGTERM makes the peer
    leave (a signed LEAVE replaces it), print its final status and exit 0. stdout is a pipe,
    so the status comes as whole lines: the first once connected, the last when stopped."""
    import signal

    from protocol.codec import decode_message
    from protocol.messages import Kind
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
            # stdout is a pipe: the first line comes once connected (not "connecting 0s").
            assert process.stdout is not None
            async with asyncio.timeout(30):
                first_line = (await process.stdout.readline()).decode()
            assert first_line.startswith("alice ")
            assert first_line.rstrip("\n").endswith("| connected to the broker")
            assert "| eps off |" in first_line  # DP is off in this config, and says so
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(60):
                async for message in watch.messages:
                    assert isinstance(message.payload, bytes)
                    left = decode_message(message.payload)
                    if left.header.kind is Kind.LEAVE:  # the peer's signed, retained leave
                        break
            assert left.header.sender == "alice"
            async with asyncio.timeout(60):
                stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()[-2000:]
    lines = stdout.decode().strip().splitlines()
    assert lines[-1].startswith("alice ") and "| drops " in lines[-1]
    assert lines[-1].endswith(" | stopped")
    assert b"SIGTERM received" in stderr and b"Traceback" not in stderr
