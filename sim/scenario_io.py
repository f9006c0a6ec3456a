"""Reading and writing scenarios: TOML files, command-line overrides, plain data, summaries.

`load_scenario` reads a flat TOML table whose keys are the field names of `sim.scenario.Scenario`;
`apply_overrides` and `parse_assignment` put command-line values on top with the same checks.
Unknown keys, wrong types and out-of-range values raise `ScenarioError`, which names the file
(or "command line"), the key and the problem.

Security note: `broker_password` is a credential. It is never written back out by
`scenario_to_toml` / `scenario_summary` (it is redacted), so run directories and reports can
be shared without leaking it.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sim.scenario import SCENARIO_KEYS, Scenario, ScenarioError

REDACTED = "<redacted>"
SECRET_KEYS = frozenset({"broker_password"})


# -- building and loading ------------------------------------------------------------------------


def _unknown_key_error(key: str, source: str | None) -> ScenarioError:
    close = difflib.get_close_matches(key, SCENARIO_KEYS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ScenarioError(f"unknown option{hint}", key=key, source=source)


def scenario_from_dict(
    data: dict[str, Any], *, base: Scenario | None = None, source: str | None = None
) -> Scenario:
    """Build a Scenario from a flat mapping of option -> value, on top of base (or defaults).

    Setting noise_multiplier without target_epsilon clears the default target_epsilon (the two
    are alternatives). ScenarioError carries `source` (file name or "command line").
    """
    base = base or Scenario()
    for key in data:
        if key not in SCENARIO_KEYS:
            raise _unknown_key_error(key, source)
    changes = dict(data)
    if "noise_multiplier" in changes and "target_epsilon" not in changes:
        changes["target_epsilon"] = None
    if "target_epsilon" in changes and "noise_multiplier" not in changes:
        changes["noise_multiplier"] = None
    try:
        return dataclasses.replace(base, **changes)
    except ScenarioError as exc:
        if exc.source is None and source is not None:
            raise ScenarioError(exc.detail, key=exc.key, source=source) from None
        raise


def load_scenario(path: Path | str, overrides: dict[str, Any] | None = None) -> Scenario:
    """Read a scenario TOML file, then apply overrides (CLI options; None values are skipped).

    Raises ScenarioError for a missing/unreadable file, invalid TOML, nested tables, unknown
    keys, wrong types and out-of-range values.
    """
    path = Path(path)
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario file: {exc.strerror}", source=source) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ScenarioError("scenario file is not UTF-8 text", source=source) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"invalid TOML: {exc}", source=source) from exc
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in SCENARIO_KEYS:
                raise _unknown_key_error(key, source)
            raise ScenarioError(
                "expected a value, got a table (scenario options are flat keys)",
                key=key,
                source=source,
            )
    scenario = scenario_from_dict(data, source=source)
    if overrides:
        scenario = apply_overrides(scenario, overrides)
    return scenario


def apply_overrides(scenario: Scenario, overrides: dict[str, Any]) -> Scenario:
    """Apply command-line values on top of a scenario; keys with value None are not given."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return scenario
    return scenario_from_dict(given, base=scenario, source="command line")


def parse_assignment(text: str) -> tuple[str, Any]:
    """Parse a generic `--set KEY=VALUE` override; VALUE is read as a TOML value when it is
    one (numbers, booleans, quoted strings, arrays) and as a bare string otherwise."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ScenarioError(f"expected KEY=VALUE, got {text!r}", source="command line")
    if key not in SCENARIO_KEYS:
        raise _unknown_key_error(key, "command line")
    value_text = value_text.strip()
    try:
        value: Any = tomllib.loads(f"v = {value_text}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text
    return key, value


# -- writing back --------------------------------------------------------------------------------


def scenario_to_dict(s: Scenario, *, redact: bool = True) -> dict[str, Any]:
    """Plain-data view (paths as strings, tuples as lists); secrets redacted unless asked."""
    out: dict[str, Any] = {}
    for key in SCENARIO_KEYS:
        value = getattr(s, key)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        if redact and key in SECRET_KEYS and value is not None:
            value = REDACTED
        out[key] = value
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def scenario_to_toml(s: Scenario) -> str:
    """TOML text that load_scenario reads back to the same scenario (secrets left out)."""
    lines = ["# murmur-sim scenario"]
    for key, value in scenario_to_dict(s, redact=True).items():
        if value is None or value == REDACTED:
            continue  # TOML has no null: unset options are omitted; secrets never written
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def scenario_summary(s: Scenario) -> list[tuple[str, str]]:
    """Human-readable (label, value) pairs for a report header or terminal table."""
    if not s.dp:
        privacy = "off"
    elif s.target_epsilon is not None:
        privacy = f"DP-SGD, target ε = {s.target_epsilon:g} per peer, δ = {s.delta:g}"
    else:
        privacy = f"DP-SGD, noise multiplier σ = {s.noise_multiplier:g}, δ = {s.delta:g}"
    if s.dp and s.noise == "group":
        privacy += (f"; group noise (h = {s.honest_min}): holds if at most "
                    f"{s.max_colluders} member(s) per group collude and the broker is honest "
                    f"but curious")
    if s.partition == "dirichlet":
        split = f"Dirichlet α = {s.alpha:g}"
    elif s.partition == "shards":
        split = f"{s.shards_per_peer} label shards per peer"
    else:
        split = "IID"
    faults = []
    if s.churn_rate:
        faults.append(f"churn {s.churn_rate:g}/peer/min (down {s.churn_downtime_s:g} s)")
    if s.delay_ms:
        faults.append(f"delay {s.delay_ms:g} ms")
    if s.loss_rate:
        faults.append(f"loss {s.loss_rate:.0%}")
    if s.hostile_peers:
        faults.append("hostile peers: " + ", ".join(s.hostile_peers))
    broker = s.broker
    if s.broker_is_url:
        auth = " with credentials" if s.broker_username else ""
        broker = f"{urlsplit(s.broker).scheme}://{urlsplit(s.broker).netloc}{auth}"
    return [
        ("Peers", f"{s.peers} ({s.mode})"),
        ("Data", f"{s.dataset}, {split}, model {s.model}"),
        ("Privacy", privacy),
        (
            "Training",
            f"{s.rounds} rounds × {s.local_steps} steps, batch {s.batch_size}, lr {s.lr:g}, "
            f"cap {s.duration_s:g} s",
        ),
        (
            "Aggregation",
            f"groups of {s.group_size}, threshold {s.threshold}, top-k {s.topk_fraction:.1%}, "
            f"{s.session_kind} sessions"
            + (f", a view of {s.view_size} peers" if s.view_size else ""),
        ),
        ("Faults", "; ".join(faults) or "none"),
        ("Broker", broker),
        ("Seed", str(s.seed)),
    ]
