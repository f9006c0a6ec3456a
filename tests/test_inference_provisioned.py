"""Private predictions on the deployment path: `murmur-peer provision --clients` makes the
network, Mosquitto runs the shipped TLS configuration with the provisioned password file and
per-user ACL, and the parties run from their provisioned configs (docs/inference.md).

The ACL must confine the client: it is answered by the serving peers, yet on its own broker
connection it receives no announcement and no session topic of the training network, only
the serve announcements and its inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tomllib
from pathlib import Path

import aiomqtt
import numpy as np
import pytest

from crypto.inference import SnapshotParams, encode_snapshot, fixed_point_logits
from peer.config import parse_config
from peer.inference.client import QueryClient
from peer.inference.client_config import QueryKeys, load_client_config
from peer.inference.commands import endpoint_of
from peer.inference.owner import SnapshotPublisher
from peer.inference.server import ServingPeer
from peer.provision import ProvisionError, provision
from peer.query import main as query_main
from sim.broker import free_loopback_port
from tests.conftest import require_mosquitto, wait_until
from tests.test_secured_broker import LOOPBACK, NETWORK, SecuredMosquitto, secrets_dir

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(240)]
__all__ = ["secrets_dir"]  # the fixture, imported for this module's tests


def tls_config_file(files, broker: SecuredMosquitto) -> Path:
    """The provisioned config with the broker's CA added (NAME-tls.toml next to it)."""
    config = files.config.with_name(f"{files.peer_id}-tls.toml")
    config.write_text(files.config.read_text().replace(
        "[broker]\n", f'[broker]\nca_file = "{broker.pki.ca_cert}"\n'))
    return config


def config_of(files, broker: SecuredMosquitto):
    if files.config.parent.name == "clients":  # a client.toml: its owner key is murmur-query's
        client = load_client_config(tls_config_file(files, broker))
        assert client.query == QueryKeys(owner="owner")  # provision --owner wrote it
        return client.peer
    document = tomllib.loads(files.config.read_text())
    document["broker"]["ca_file"] = str(broker.pki.ca_cert)
    return parse_config(document, files.config.parent, files.config)


async def run_query_command(files, broker: SecuredMosquitto, images: np.ndarray,
                            directory: Path) -> list[str]:
    """`python -m peer.query` with the client's provisioned config (plus the broker's CA) and
    no --owner: the config's owner key, written by provision --owner, names it. Returns the
    "INDEX class C" part of each prediction line."""
    config = tls_config_file(files, broker)
    np.savez(directory / "input.npz", x=images)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "peer.query", "--config", str(config),
        str(directory / "input.npz"), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=str(Path(__file__).resolve().parent.parent))
    out, err = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode == 0, err.decode()[-2000:]
    assert "of owner owner served by" in out.decode()
    return [" ".join(line.split()[:3]) for line in out.decode().splitlines()
            if " class " in line]


async def test_a_provisioned_client_is_answered_and_sees_nothing_else(secrets_dir: Path):
    require_mosquitto()
    port = free_loopback_port()
    network = provision(NETWORK, ["s1", "s2", "s3", "owner"], secrets_dir / "network",
                        broker_url=f"mqtts://{LOOPBACK}:{port}", clients=["erin"],
                        owner="owner")
    broker_dir = secrets_dir / "broker"
    broker_dir.mkdir()
    broker = SecuredMosquitto(broker_dir, NETWORK, port=port,
                              password_file=network.mosquitto_passwd,
                              acl_file=network.mosquitto_acl)
    await broker.start()
    configs = {f.peer_id: config_of(f, broker) for f in (*network.peers, *network.clients)}
    from peer.inference.features import client_features

    rng = np.random.default_rng(5)
    images = rng.uniform(0, 1, (3, 28, 28)).astype(np.float32)
    rows = client_features(images)  # what murmur-query computes from the same images
    params = SnapshotParams.for_unit_variance(10, rows.shape[1])
    snapshot = encode_snapshot(rng.normal(0, 0.05, (10, rows.shape[1])),
                               rng.normal(0, 0.1, 10), params)
    servers = [ServingPeer(endpoint_of(configs[n]), configs[n].broker, owner="owner",
                           announce_presence=True) for n in ("s1", "s2", "s3")]
    owner = SnapshotPublisher(endpoint_of(configs["owner"]), configs["owner"].broker,
                              ["s1", "s2", "s3"])
    client = QueryClient(endpoint_of(configs["erin"]), configs["erin"].broker)
    erin = configs["erin"].broker
    seen: list[str] = []
    started = []
    try:
        for party in (*servers, owner, client):
            await party.start()
            started.append(party)
        snapshot_id = await owner.publish(snapshot, threshold=2)
        known = await client.wait_for_snapshot(30, snapshot_id)
        logits = await client.predict(rows, known)
        assert np.array_equal(logits, fixed_point_logits(snapshot, rows))
        printed = await run_query_command(network.clients[0], broker, images, secrets_dir)
        assert printed == [f"{i} class {int(c)}" for i, c in enumerate(logits.argmax(axis=1))]
        # erin's own connection, subscribed to everything of the network
        tls = aiomqtt.TLSParameters(ca_certs=str(erin.ca_file))
        async with aiomqtt.Client(LOOPBACK, port, username="erin", password=erin.password,
                                  identifier="erin-probe", tls_params=tls) as probe:
            await probe.subscribe(f"murmur/{NETWORK}/#", qos=1)

            async def collect() -> None:
                async for message in probe.messages:
                    seen.append(str(message.topic))

            task = asyncio.create_task(collect())
            try:
                await wait_until(lambda: sum("/serve/" in t for t in seen) >= 3, 20,
                                 "the three retained SERVE announcements")
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        for party in reversed(started):
            await party.stop()
        await broker.stop()
    assert not [t for t in seen if "/announce/" in t]  # retained ANNOUNCEs exist, unread
    assert all("/serve/" in t or t.endswith("/to/erin") for t in seen)


@pytest.mark.parametrize(("line", "error"), [
    ('owner = "Bad Owner!"', "owner: 'Bad Owner!' must be a peer id"),
    ("owner = 5", "owner: expected a string"),
    ('owner = "owner"\nsnapshot = "beef"', "snapshot: 'beef' must be a snapshot id"),
])
def test_a_bad_owner_or_snapshot_in_client_toml_is_a_config_error(
        secrets_dir: Path, capsys: pytest.CaptureFixture[str], line: str, error: str):
    require_mosquitto()  # provisioning hashes broker passwords with mosquitto_passwd
    network = provision(NETWORK, ["s1", "owner"], secrets_dir / "network", clients=["erin"],
                        owner="owner")
    config = network.clients[0].config
    assert 'owner = "owner"\n' in config.read_text()
    config.write_text(config.read_text().replace('owner = "owner"', line))
    np.savez(secrets_dir / "input.npz", x=np.zeros((1, 28, 28), np.float32))
    for flags in ([], ["--owner", "owner"]):  # a flag does not excuse a bad file
        assert query_main(["--config", str(config), str(secrets_dir / "input.npz"),
                           *flags]) == 2
        assert f"murmur-query: error: {config}: {error}" in capsys.readouterr().err


def test_the_owner_flag_overrides_the_config_and_provision_checks_the_owner(
        secrets_dir: Path, capsys: pytest.CaptureFixture[str]):
    require_mosquitto()
    with pytest.raises(ProvisionError, match="'mallory': must be one of the peers"):
        provision(NETWORK, ["s1", "owner"], secrets_dir / "refused", clients=["erin"],
                  owner="mallory")
    network = provision(NETWORK, ["s1", "owner"], secrets_dir / "network", clients=["erin"],
                        owner="owner")
    np.savez(secrets_dir / "input.npz", x=np.zeros((1, 28, 28), np.float32))
    assert query_main(["--config", str(network.clients[0].config),
                       str(secrets_dir / "input.npz"), "--owner", "Not An Id"]) == 2
    assert "--owner: 'Not An Id' is not a peer id" in capsys.readouterr().err


def test_serve_reads_its_serve_table_and_its_flags_override_it(
        secrets_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """`murmur-peer serve --config` takes [serve] (owner, limits, standalone), a flag wins over
    its key, a bad key is a one-line ConfigError naming file and key, and `murmur-peer run`'s
    loader accepts the table."""
    require_mosquitto()  # provisioning hashes broker passwords with mosquitto_passwd
    import peer.inference.commands as commands
    from peer.cli import main as peer_main
    from peer.config import load_config

    network = provision(NETWORK, ["s1", "owner"], secrets_dir / "network")
    config = network.peers[0].config
    plain = config.read_text()
    config.write_text(plain + '\n[serve]\nowner = "owner"\nmax_clients = 7\nstandalone = true\n')
    assert load_config(config).peer_id == "s1"  # what `run` loads: [serve] is not refused
    calls: list[dict] = []
    monkeypatch.setattr(commands, "serve", lambda cfg, **kw: calls.append(kw) or 0)
    assert peer_main(["serve", "--config", str(config)]) == 0
    assert peer_main(["serve", "--config", str(config), "--max-clients", "9",
                      "--rows-per-minute", "11", "--no-standalone"]) == 0
    used, overridden = calls
    assert (used["owner"], used["standalone"]) == ("owner", True)
    assert (used["limits"].max_clients, used["limits"].rows_per_minute) == (7, 60_000)
    assert (overridden["owner"], overridden["standalone"]) == ("owner", False)
    assert (overridden["limits"].max_clients, overridden["limits"].rows_per_minute) == (9, 11)
    for table, error in (("max_clients = 0", "serve: max_clients: must be in 1..1000000"),
                         ('owner = "Bad!"', "serve: owner: 'Bad!' must be a peer id"),
                         ('rows_per_minute = "many"', "serve.rows_per_minute: expected an "
                                                      "integer"),
                         ("port = 1", "serve: unknown key 'port'")):
        config.write_text(plain + f"\n[serve]\n{table}\n")
        assert peer_main(["serve", "--config", str(config), "--owner", "owner"]) == 2
        assert f"murmur-peer: error: {config}: {error}" in capsys.readouterr().err
    config.write_text(plain)
    assert peer_main(["serve", "--config", str(config)]) == 2  # no owner from either
    assert "serve needs the model owner" in capsys.readouterr().err
    assert peer_main(["serve", "--config", str(config), "--owner", "owner",
                      "--max-clients", "0"]) == 2
    assert "murmur-peer: error: --max-clients: must be in 1..1000000, got 0" in (
        capsys.readouterr().err)
    assert len(calls) == 2
