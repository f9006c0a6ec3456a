"""peer.config: the shipped example parses; every kind of mistake is one precise ConfigError."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from crypto.admission import AdmissionKey
from crypto.identity import Identity
from peer.assembly import load_credentials
from peer.config import ConfigError, PeerConfig, SessionConfig, load_config
from peer.network.transport import BrokerSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = REPO_ROOT / "docs" / "peer.example.toml"

MINIMAL = """\
peer_id = "alice"
network_id = "demo"
identity_file = "alice.key"
certificate_file = "alice.cert"
admission_public_key = "admission.pub"
"""
# DP-SGD is on by default and needs a noise setting: the one training key a config must have.
TRAINING = '[training]\ntarget_epsilon = 8.0\n'


@pytest.fixture
def network_dir(tmp_path: Path) -> Path:
    """A directory holding alice's key, certificate and the network's admission.pub."""
    admission = AdmissionKey.generate("demo")
    admission.save(tmp_path / "admission.key")
    alice = Identity.generate("alice")
    alice.save(tmp_path / "alice.key")
    cert = admission.issue(alice.public, valid_for_s=86_400, now=time.time())
    (tmp_path / "alice.cert").write_bytes(cert.to_bytes())
    (tmp_path / "admission.pub").write_text(admission.public_key.hex() + "\n")
    return tmp_path


def write(directory: Path, text: str, name: str = "peer.toml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    return message


def test_the_shipped_example_parses(network_dir: Path) -> None:
    path = network_dir / "peer.toml"
    shutil.copy(EXAMPLE, path)
    cfg = load_config(path)
    assert isinstance(cfg, PeerConfig)
    assert (cfg.peer_id, cfg.network_id) == ("alice", "demo")
    assert cfg.identity_file == network_dir / "alice.key"
    assert cfg.admission_public_key == bytes.fromhex(
        (network_dir / "admission.pub").read_text().strip())
    assert cfg.broker == BrokerSettings(url="mqtt://127.0.0.1:1883", keepalive_s=30)
    assert cfg.session == SessionConfig()
    assert cfg.state_dir == network_dir / "state" / "alice"
    assert cfg.silence_expiry_s == 120.0 and cfg.log_level == "INFO"
    assert type(cfg.training).__name__ == "TrainerConfig"
    identity, certificate = load_credentials(cfg)
    assert identity.peer_id == certificate.peer_id == "alice"


def test_minimal_config_takes_defaults_and_inline_hex_key(network_dir: Path) -> None:
    hex_key = (network_dir / "admission.pub").read_text().strip()
    text = MINIMAL.replace('"admission.pub"', f'"{hex_key}"') + (
        '\n[broker]\nurl = "mqtts://broker.example"\nusername = "alice"\n'
        'password_file = "pw"\n') + TRAINING
    (network_dir / "pw").write_text("s3cret\n")
    cfg = load_config(write(network_dir, text))
    assert cfg.admission_public_key.hex() == hex_key
    assert cfg.broker.endpoint() == ("broker.example", 8883, True)
    assert (cfg.broker.username, cfg.broker.password) == ("alice", "s3cret")
    assert cfg.data == "digits" and cfg.holdout_fraction == 0.2
    assert cfg.view_size == 0  # the full view unless asked
    partial = load_config(write(network_dir, MINIMAL + "view_size = 24\n" + TRAINING, "v.toml"))
    assert partial.view_size == 24


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ('colour = "blue"\n', "unknown key 'colour'"),
        ('holdout_fraction = "lots"\n', "holdout_fraction: expected a number"),
        ("holdout_fraction = 1.5\n", "holdout_fraction: must be in (0, 1)"),
        ('log_level = "LOUD"\n', "log_level: must be one of"),
        ("silence_expiry_s = 10.0\n", "must exceed announce_interval_s"),
        ("announce_interval_s = -1\n", "announce_interval_s: must be in (0"),
        ("view_size = -1\n", "view_size: must be 0 (follow every peer) or a view of 1 to"),
        ("view_size = 5000\n", "view_size: must be 0"),
        ("view_size = 2.5\n", "view_size: expected an integer"),
        ('data = "parquet:x"\n', "data: 'parquet:x' is not a data source"),
        ('data = "csv:missing.csv"\n', "missing.csv does not exist"),
        ("[session]\nthreshold = 4\n", "session: threshold must be in 2..group_size=3"),
        ("[session]\ngroup_size = 2\n", "session: group_size must be in 3..16"),
        ("[session]\ngroup_size = 3.5\n", "session.group_size: expected an integer"),
        ("[session]\ngroup_size = true\n", "session.group_size: expected an integer"),
        ("[session]\nretries = 3\n", "session: unknown key 'retries'"),
        ("[session]\nfrac_bits = 30\n", "session: frac_bits must be in 8..24"),
        ('[broker]\nurl = "http://x"\n', "broker: broker url must start with mqtt://"),
        ('[broker]\nurl = "mqtt://u:p@h"\n', "not in the url"),
        ('[broker]\nport = 1883\n', "broker: unknown key 'port'"),
        ('[broker]\nusername = "a"\npassword = "x"\npassword_file = "y"\n', "not both"),
        ('[broker]\nca_file = "ca.pem"\n', "broker.ca_file: file"),
        ('[broker]\nurl = "mqtts://h"\nca_file = "alice.cert"\n', "cannot use the TLS files"),
        ("[broker]\nkeepalive_s = 1\n", "keepalive_s must be in 5..65535"),
        ('[broker]\nmqtt_version = "4"\n', "mqtt_version must be one of 3.1.1, 5"),
        ('[training]\nno_such_field = 1\n', "training: unknown key 'no_such_field'"),
        ("[training]\n", "training: dp needs noise_multiplier or target_epsilon"),
        ('[training]\ntarget_epsilon = 8.0\nmodel = "rnn"\n', "training: unknown model"),
        ("[training]\ntarget_epsilon = 8.0\nlr = -1\n", "training: lr must be positive"),
        ('[training]\ntarget_epsilon = "high"\n', "training.target_epsilon: expected a number"),
        ("[training]\ntarget_epsilon = 8.0\nclip_target_quantile = 1.5\n",
         "training: clip_target_quantile must be in (0, 1)"),
        ('[training]\nnoise_multiplier = 1.0\nnoise = "group"\nclip_adaptive = true\n',
         "training: clip_adaptive is refused with noise = 'group'"),
        ('broker = "mqtt://x"\n', "'broker' must be a table"),
    ],
)
def test_each_mistake_names_the_key(network_dir: Path, extra: str, fragment: str) -> None:
    # Top-level keys must come before the first table: put tables last.
    text = MINIMAL + extra + ("" if "[training]" in extra else TRAINING)
    assert fragment in config_error(write(network_dir, text))


def test_missing_required_key_and_missing_files(network_dir: Path) -> None:
    no_peer = MINIMAL.replace('peer_id = "alice"\n', "")
    assert "missing required key 'peer_id'" in config_error(write(network_dir, no_peer))
    bad_id = MINIMAL.replace('"alice"', '"Alice"', 1)
    assert "peer_id: 'Alice' must match" in config_error(write(network_dir, bad_id))
    missing = network_dir / "nope.toml"
    assert "config file does not exist" in config_error(missing)
    assert "not valid TOML" in config_error(write(network_dir, "peer_id = [\n"))
    garbage_key = MINIMAL.replace('"admission.pub"', '"zz"')
    assert "admission_public_key: file" in config_error(write(network_dir, garbage_key))
    (network_dir / "short.pub").write_text("abcd\n")
    short_key = MINIMAL.replace('"admission.pub"', '"short.pub"')
    assert "64-character hex key" in config_error(write(network_dir, short_key))
    (network_dir / "alice.key").unlink()
    message = config_error(write(network_dir, MINIMAL + TRAINING))
    assert "identity_file: file" in message and "alice.key does not exist" in message


def test_credentials_must_match_the_config(network_dir: Path) -> None:
    cfg = load_config(write(network_dir, MINIMAL + TRAINING))
    load_credentials(cfg)  # the matching set loads
    # Valid for a day: checked three days later it has expired (beyond the 300 s skew).
    with pytest.raises(ConfigError, match=r"certificate_file: .*expired"):
        load_credentials(cfg, now=time.time() + 3 * 86_400)

    # A certificate from another admission key, installed under alice's name.
    other_ca = AdmissionKey.generate("demo")
    foreign = other_ca.issue(Identity.generate("alice").public, valid_for_s=60, now=time.time())
    (network_dir / "alice.cert").write_bytes(foreign.to_bytes())
    with pytest.raises(ConfigError, match=r"certificate_file: .*bad signature"):
        load_credentials(cfg)

    # Identity of someone other than peer_id.
    Identity.generate("mallory").save(network_dir / "mallory.key")
    cfg_wrong = load_config(
        write(network_dir, MINIMAL.replace("alice.key", "mallory.key") + TRAINING))
    with pytest.raises(ConfigError, match="identity of 'mallory'"):
        load_credentials(cfg_wrong)

    # A genuine certificate for alice's name, but for another key pair than alice.key.
    admission = AdmissionKey.load(network_dir / "admission.key")
    other_keys = admission.issue(Identity.generate("alice").public, valid_for_s=60,
                                 now=time.time())
    (network_dir / "alice.cert").write_bytes(other_keys.to_bytes())
    with pytest.raises(ConfigError, match="certifies other keys"):
        load_credentials(cfg)

    (network_dir / "alice.cert").write_bytes(b"not a certificate")
    with pytest.raises(ConfigError, match="certificate_file"):
        load_credentials(cfg)


def test_pace_section_and_its_interval(network_dir: Path) -> None:
    from peer.assembly import pacing_config

    cfg = load_config(write(network_dir, MINIMAL + TRAINING + "[pace]\nbudget_hours = 2.5\n"))
    assert cfg.pace.budget_hours == 2.5 and cfg.pace.train_only_when_grouped
    # 100 planned rounds, no averaging tail: one private round every 90 s
    assert pacing_config(cfg).private_round_interval_s == pytest.approx(90.0)
    default = load_config(write(network_dir, MINIMAL + TRAINING, "default.toml"))
    assert pacing_config(default).private_round_interval_s == pytest.approx(864.0)
    bad = write(network_dir, MINIMAL + TRAINING + "[pace]\nbudget_hours = 0\n", "bad.toml")
    assert "budget_hours" in config_error(bad)
    typo = write(network_dir, MINIMAL + TRAINING + "[pace]\nbudget_days = 2\n", "typo.toml")
    assert "budget_days" in config_error(typo)


def test_blocks_source_needs_a_directory_and_evaluate(network_dir: Path) -> None:
    from peer.assembly import load_block_data

    missing = write(network_dir, MINIMAL + 'data = "blocks:incoming"\n' + TRAINING)
    assert "block directory" in config_error(missing)
    (network_dir / "incoming").mkdir()
    cfg = load_config(missing)
    assert cfg.data == f"blocks:{network_dir / 'incoming'}"
    with pytest.raises(ConfigError, match="evaluate"):
        load_block_data(cfg)
    with_eval = load_config(write(network_dir, MINIMAL + 'data = "blocks:incoming"\n'
                                  'evaluate = "digits"\n' + TRAINING, "eval.toml"))
    template, holdout, source = load_block_data(with_eval)
    assert len(template) == 0 and template.input_shape == holdout.input_shape == (64,)
    assert template.num_classes == holdout.num_classes == 10
    assert source.directory == network_dir / "incoming"


def test_small_device_profile_changes_defaults_not_choices(network_dir: Path) -> None:
    """[device] profile = "small" picks the lean settings together; a key the file sets wins;
    "default" changes nothing; an unknown profile is a one-line error naming the key."""
    from peer.device import PROFILES

    small = load_config(write(network_dir, MINIMAL + TRAINING + '[device]\nprofile = "small"\n'))
    default = load_config(write(network_dir, MINIMAL + TRAINING, "default.toml"))
    assert small.device.profile == "small" and default.device.profile == "default"
    assert (small.training.epsilon_table, small.training.eval_batch_size) == (True, 128)
    assert (default.training.epsilon_table, default.training.eval_batch_size) == (False, 1024)
    assert (small.session.group_size, small.session.threshold, small.session.kind) == (
        3, 2, "masked")
    assert default.session == SessionConfig()
    assert (small.checkpoint_interval_s, default.checkpoint_interval_s) == (600.0, 60.0)
    assert (small.pace.averaging_interval_s, default.pace.averaging_interval_s) == (300.0, 5.0)
    assert small.training.target_epsilon == 8.0  # the file's own key is kept
    assert PROFILES["small"].torch_threads == 1 and PROFILES["default"].allocator is None
    assert PROFILES["small"].torch_mkldnn is False and PROFILES["default"].torch_mkldnn is None
    chosen = load_config(write(
        network_dir, MINIMAL + 'checkpoint_interval_s = 30.0\n' + TRAINING
        + 'epsilon_table = false\n[session]\nkind = "shamir"\n[device]\nprofile = "small"\n',
        "chosen.toml"))
    assert (chosen.training.epsilon_table, chosen.session.kind, chosen.session.group_size,
            chosen.checkpoint_interval_s) == (False, "shamir", 3, 30.0)
    bad = write(network_dir, MINIMAL + TRAINING + '[device]\nprofile = "tiny"\n', "bad.toml")
    assert "profile" in config_error(bad) and "tiny" in config_error(bad)
