"""The layering rules, checked on the import graph (parsed with ast, so a comment cannot fool it).

* no import cycle between the project's modules (function-level imports count too: they are
  how cycles used to hide);
* protocol/ and crypto/ are pure: nothing of peer/, sim/, torch, asyncio or aiomqtt, not even
  transitively;
* the network half (peer/network) never reaches torch, the training half (peer/training) never
  reaches aiomqtt, following every project module they import;
* the session seat (peer/network/session/seat.py) sits between the sessions and the node: it
  never reaches the node, the transport, the outbox or aiomqtt, and no session reaches it;
* sim/ imports peer/ only through public names (no ``_private`` module or name).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "crypto", "peer", "sim")


@dataclass
class Module:
    name: str
    path: Path
    internal: set[str] = field(default_factory=set)  # project modules it imports
    external: set[str] = field(default_factory=set)  # top-level names of other imports
    private_uses: set[str] = field(default_factory=set)  # "module.name" with a leading _


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, Module]:
    modules = {
        _module_name(path): Module(_module_name(path), path)
        for package in PACKAGES for path in (ROOT / package).rglob("*.py")
    }

    def owner(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    for module in modules.values():
        is_package = module.path.name == "__init__.py"
        for node in ast.walk(ast.parse(module.path.read_text(), str(module.path))):
            if isinstance(node, ast.Import):
                targets = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = module.name.split(".")
                    parts = parts if is_package else parts[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join([*parts, *([base] if base else [])])
                targets = [(f"{base}.{alias.name}", alias.name) for alias in node.names]
                targets.append((base, None))
            else:
                continue
            for target, imported_name in targets:
                found = owner(target)
                if found is None:
                    module.external.add(target.split(".")[0])
                    continue
                if found != module.name:
                    module.internal.add(found)
                if imported_name and imported_name.startswith("_") and found != module.name:
                    module.private_uses.add(f"{found}.{imported_name}")
                if any(part.startswith("_") and part != "__init__"
                       for part in found.split(".")):
                    module.private_uses.add(found)
    return modules


GRAPH = _graph()


def _reach(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(GRAPH[name].internal)
    return seen


def _external_reach(start: str) -> dict[str, str]:
    """Every external top-level package reachable from ``start``, with one module importing it."""
    found: dict[str, str] = {}
    for name in sorted(_reach(start)):
        for package in GRAPH[name].external:
            found.setdefault(package, name)
    return found


def _is_ancestor(a: str, b: str) -> bool:
    return b.startswith(a + ".")


def test_the_graph_is_the_real_project() -> None:
    # Guards the checks below against an empty or mis-parsed graph.
    assert {"peer.network.node", "peer.training.trainer", "peer.assembly", "crypto.shamir",
            "protocol.codec", "sim.runner"} <= set(GRAPH)
    assert "peer.network.session.seat" in GRAPH["peer.network.node"].internal
    assert "peer.network.session.shamir" in GRAPH["peer.network.session.kinds"].internal
    assert "torch" in GRAPH["peer.training.trainer"].external


def test_no_import_cycles() -> None:
    cycles = []
    for name in GRAPH:
        for target in GRAPH[name].internal:
            # a package's __init__ re-exporting its own submodules is not a cycle
            if _is_ancestor(name, target) or _is_ancestor(target, name):
                continue
            if name in _reach(target) - {target}:
                cycles.append(f"{name} -> {target} -> ... -> {name}")
    assert cycles == []


@pytest.mark.parametrize("package", ["protocol", "crypto"])
def test_pure_layers_import_nothing_above_them(package: str) -> None:
    forbidden = {"peer", "sim", "torch", "asyncio", "aiomqtt"}
    for name in [n for n in GRAPH if n.split(".")[0] == package]:
        reached = {n.split(".")[0] for n in _reach(name)}
        assert reached <= {"protocol", "crypto"}, (name, reached)
        bad = set(_external_reach(name)) & forbidden
        assert not bad, (name, {b: _external_reach(name)[b] for b in bad})


def test_network_half_never_reaches_torch() -> None:
    for name in [n for n in GRAPH if n.startswith("peer.network")]:
        reach = _external_reach(name)
        assert "torch" not in reach, f"{name} reaches torch through {reach.get('torch')}"
        assert not any(n.startswith("peer.training") for n in _reach(name)), name


def test_session_seat_sits_between_the_sessions_and_the_node() -> None:
    seat = "peer.network.session.seat"
    assert seat in GRAPH["peer.network.node"].internal
    above = {"peer.network.node", "peer.network.transport", "peer.network.outbox"}
    assert not _reach(seat) & above, _reach(seat) & above
    assert "aiomqtt" not in _external_reach(seat), _external_reach(seat).get("aiomqtt")
    for name in [n for n in GRAPH if n.startswith("peer.network.session") and n != seat]:
        assert seat not in _reach(name), f"{name} reaches the seat that hosts it"


def test_training_half_never_reaches_mqtt() -> None:
    for name in [n for n in GRAPH if n.startswith("peer.training")]:
        reach = _external_reach(name)
        assert "aiomqtt" not in reach, f"{name} reaches aiomqtt through {reach.get('aiomqtt')}"
        assert not any(n.startswith("peer.network") for n in _reach(name)), name


def test_sharing_is_pure_numpy() -> None:
    for name in [n for n in GRAPH if n.startswith("peer.sharing")]:
        assert not {"torch", "aiomqtt", "asyncio"} & set(_external_reach(name)), name


def test_sim_uses_only_public_names_of_peer() -> None:
    for name in [n for n in GRAPH if n.startswith("sim")]:
        private = {use for use in GRAPH[name].private_uses if use.startswith("peer")}
        assert private == set(), (name, private)


def test_only_crypto_uses_its_private_modules() -> None:
    for name in [n for n in GRAPH if not n.startswith("crypto")]:
        private = {use for use in GRAPH[name].private_uses if use.startswith("crypto")}
        assert private == set(), (name, private)
