"""Scenario options: defaults, TOML loading, typed errors naming the key, CLI overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sim.scenario import Scenario, ScenarioError
from sim.scenario_io import (
    REDACTED,
    apply_overrides,
    load_scenario,
    parse_assignment,
    scenario_summary,
    scenario_to_dict,
    scenario_to_toml,
)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(text)
    return path


def test_defaults_are_the_readme_run() -> None:
    s = Scenario()
    assert (s.peers, s.dataset, s.partition, s.alpha) == (8, "digits", "dirichlet", 1.0)
    assert s.dp and s.target_epsilon == 3.0 and s.noise_multiplier is None
    assert (s.group_size, s.threshold, s.broker, s.mode) == (5, 3, "embedded", "inprocess")
    assert s.planned_steps == s.rounds * s.local_steps
    assert s.duration_s < 180


def test_load_full_scenario_file(tmp_path: Path) -> None:
    path = _write(tmp_path, """
peers = 16
dataset = "fashion-mnist"
partition = "shards"
shards_per_peer = 3
noise_multiplier = 1.1
delta = 1e-6
alpha = 1          # an integer is accepted for a number option
hostile_peers = ["garbage", "replay"]
broker = "mqtts://broker.example:8883"
broker_username = "sim"
broker_password = "s3cret"
broker_ca_file = "/etc/ssl/ca.pem"
mode = "processes"
out_dir = "out/runs"
""")
    s = load_scenario(path)
    assert s.peers == 16 and s.partition == "shards" and s.shards_per_peer == 3
    # noise_multiplier replaces the default target_epsilon instead of conflicting with it
    assert s.noise_multiplier == 1.1 and s.target_epsilon is None
    assert isinstance(s.alpha, float) and s.alpha == 1.0
    assert s.hostile_peers == ("garbage", "replay")
    assert s.broker_ca_file == Path("/etc/ssl/ca.pem") and s.out_dir == Path("out/runs")
    assert s.broker_is_url


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("peerz = 3", "peerz", "did you mean 'peers'"),
        ("completely_unknown = 1", "completely_unknown", "unknown option"),
        ('peers = "eight"', "peers", "expected an integer"),
        ("peers = 8.0", "peers", "expected an integer"),
        ("peers = 0", "peers", "between 1 and 512"),
        ("dp = 1", "dp", "true or false"),
        ("alpha = -0.5", "alpha", "must be > 0"),
        ('alpha = "nan"', "alpha", "expected a number"),
        ("alpha = nan", "alpha", "finite"),
        ('partition = "random"', "partition", "expected one of"),
        ("group_size = 2", "group_size", "group of two"),
        ("threshold = 6", "threshold", "2..group_size"),
        ("loss_rate = 1.0", "loss_rate", "[0, 1)"),
        ('hostile_peers = ["evil"]', "hostile_peers", "unknown hostile kind"),
        ("hostile_peers = 3", "hostile_peers", "list of string"),
        ('broker = "http://x:1"', "broker", "mqtt://"),
        ('broker = "mqtt://u:p@host:1883"', "broker", "credentials"),
        ('broker = "mqtt://host:99999"', "broker", "bad port"),
        ('broker_username = "u"', "broker_username", "external broker"),
        ('mode = "threads"', "mode", "expected one of"),
        ('network = "Bad/Name"', "network", "must match"),
        ('dataset = "imagenet"', "dataset", "digits"),
        ('dataset = "csv:"', "dataset", "csv:PATH"),
        ('dataset = "digits:x"', "dataset", "digits"),
        ("noise_multiplier = 1.0\ntarget_epsilon = 3.0", "noise_multiplier", "exactly one"),
        ("[peers]\nx = 1", "peers", "got a table"),
        ("[privacy]\ndp = true", "privacy", "unknown option"),
    ],
)
def test_bad_options_name_the_key_and_the_problem(
    tmp_path: Path, text: str, key: str, fragment: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert info.value.key == key
    message = str(info.value)
    assert fragment in message
    assert str(path) in message and f"'{key}'" in message


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.toml")
    with pytest.raises(ScenarioError, match="invalid TOML") as info:
        load_scenario(_write(tmp_path, "peers = = 3"))
    assert info.value.key is None
    bad_bytes = tmp_path / "binary.toml"
    bad_bytes.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ScenarioError, match="UTF-8"):
        load_scenario(bad_bytes)


def test_overrides_apply_on_top_of_file_and_are_checked(tmp_path: Path) -> None:
    path = _write(tmp_path, "peers = 4\nalpha = 0.1\n")
    s = load_scenario(path, overrides={"peers": 6, "alpha": None, "seed": 9})
    assert (s.peers, s.alpha, s.seed) == (6, 0.1, 9)
    with pytest.raises(ScenarioError) as info:
        apply_overrides(s, {"peers": -1})
    assert info.value.key == "peers" and "command line" in str(info.value)
    with pytest.raises(ScenarioError, match="did you mean 'threshold'"):
        apply_overrides(s, {"treshold": 2})
    # target_epsilon from the command line replaces a file's noise_multiplier
    t = apply_overrides(Scenario(target_epsilon=None, noise_multiplier=1.0), {"target_epsilon": 8})
    assert t.target_epsilon == 8.0 and t.noise_multiplier is None


def test_parse_assignment_reads_toml_values_or_bare_strings() -> None:
    assert parse_assignment("alpha=0.1") == ("alpha", 0.1)
    assert parse_assignment("dp = false") == ("dp", False)
    assert parse_assignment('hostile_peers=["replay"]') == ("hostile_peers", ["replay"])
    assert parse_assignment("broker=mqtt://127.0.0.1:1883") == ("broker", "mqtt://127.0.0.1:1883")
    with pytest.raises(ScenarioError, match="KEY=VALUE"):
        parse_assignment("alpha")
    with pytest.raises(ScenarioError, match="unknown option"):
        parse_assignment("alhpa=1")


def test_toml_round_trip_never_writes_the_password(tmp_path: Path) -> None:
    s = Scenario(
        broker="mqtt://127.0.0.1:1883",
        broker_username="sim",
        broker_password="hunter2",
        hostile_peers=("huge_norm",),
        dp=False,
        noise_multiplier=None,
        target_epsilon=7.5,
    )
    text = scenario_to_toml(s)
    assert "hunter2" not in text
    assert scenario_to_dict(s)["broker_password"] == REDACTED
    assert scenario_to_dict(s, redact=False)["broker_password"] == "hunter2"
    again = load_scenario(_write(tmp_path, text))
    assert again == dataclasses.replace(s, broker_password=None)
    assert all("hunter2" not in value for _label, value in scenario_summary(s))


def test_summary_describes_privacy_and_faults() -> None:
    s = Scenario(churn_rate=1.0, loss_rate=0.05, hostile_peers=("garbage",))
    summary = dict(scenario_summary(s))
    assert "ε = 3" in summary["Privacy"]
    assert "churn" in summary["Faults"] and "loss 5%" in summary["Faults"]
    assert "garbage" in summary["Faults"]
    assert dict(scenario_summary(Scenario(dp=False)))["Privacy"] == "off"


def test_resolve_model_picks_cnn_for_28x28_images_only() -> None:
    from sim.scenario import resolve_model

    assert resolve_model("auto", (28, 28)) == "cnn"
    assert resolve_model("auto", (1, 28, 28)) == "cnn"
    assert resolve_model("auto", (8, 8)) == "mlp"
    assert resolve_model("auto", (784,)) == "mlp"
    assert resolve_model("mlp", (28, 28)) == "mlp"


def test_session_kind_reaches_the_simulated_nodes() -> None:
    from sim.cli import build_parser, scenario_from_args
    from sim.setup import node_config

    masked = scenario_from_args(build_parser().parse_args(["--session-kind", "masked"]))
    assert masked.session_kind == "masked"
    assert node_config(masked).session_kind == "masked"
    assert node_config(scenario_from_args(build_parser().parse_args([]))).session_kind == (
        "shamir")
    with pytest.raises(ScenarioError) as info:
        scenario_from_args(build_parser().parse_args(["--session-kind", "plain"]))
    assert info.value.key == "session_kind"


def test_view_size_reaches_the_simulated_nodes() -> None:
    from sim.cli import build_parser, scenario_from_args
    from sim.scenario_io import scenario_summary
    from sim.setup import node_config

    bounded = scenario_from_args(build_parser().parse_args(["--view-size", "32"]))
    assert bounded.view_size == 32
    assert node_config(bounded).view.view_size == 32
    assert "a view of 32 peers" in dict(scenario_summary(bounded))["Aggregation"]
    default = scenario_from_args(build_parser().parse_args([]))
    assert node_config(default).view.view_size == 0  # every peer follows everyone
    for bad in ("-1", "100000"):
        with pytest.raises(ScenarioError) as info:
            scenario_from_args(build_parser().parse_args(["--view-size", bad]))
        assert info.value.key == "view_size"
