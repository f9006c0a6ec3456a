"""Epsilon tables: the accountant's exact figures, computed in a child process, kept on disk.

A ledger's epsilon is a deterministic function of its events: segments ``(sigma, q, n)``
composed at ``delta`` by a named accountant. Every figure a ledger asks for is
``epsilon(prefix + [(sigma, q, n)])`` where only ``n`` of the last segment grows, so a
:class:`TableKey` (accountant, delta, prefix, sigma, q) and a step count ``n`` name it.

:class:`EpsilonTable` answers from ``state_dir/epsilon_table.json`` and, on a miss, runs
:mod:`.table_child` (a short-lived interpreter that imports the accountant's library, never
torch) for that count and the next :data:`CHUNK` counts at the same stride, then stores the
extended table atomically before the figure is used. Properties (docs/privacy.md, "epsilon
tables"):

* A figure is the library's own, bit for bit: the child calls the same
  ``epsilon_of_segments`` an in-process ledger calls, and JSON round-trips doubles exactly.
* Nothing is interpolated or guessed: a count that is not an entry is computed; if the child
  fails, :class:`~.base.AccountingError` is raised and the caller's round does not start.
* A figure also depends on what no key names: the accountant modules' constants (PLD's
  discretization interval, the neighbouring relation, Poisson sampling, RDP's orders) and the
  library versions. :func:`method_fingerprint` hashes those modules' source and the
  libraries' versions; a table made under another fingerprint is never used, and a child
  whose own fingerprint differs from the parent's refuses the request.
* A stored file that does not parse, breaks the table's invariants, fails its SHA-256 over
  the body (a partial or hand edit) or carries another fingerprint is logged, counted in
  :attr:`EpsilonTable.rebuilt_files` and recomputed (it is derived data). The digest is not a
  signature: whoever can write this file can write ``ledger.json`` beside it.

:class:`InProcessAccountant` is the other :class:`EpsilonSource`: the library in this process
(the default for a ledger with no table).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from peer.files import atomic_write_bytes
from peer.training.privacy import accountant as accountants
from peer.training.privacy.base import AccountingError, Segment, active_segments

TABLE_FILE = "epsilon_table.json"
#: 2: a ``method`` fingerprint and a ``sha256`` of the body (format 1 files are rebuilt).
TABLE_FORMAT = 2
#: Step counts computed per child run beyond the one asked for (the next rounds' counts).
CHUNK = 48
#: A child that takes longer than this has failed (a chunk takes seconds on a Pi-class CPU).
CHILD_TIMEOUT_S = 600.0

log = logging.getLogger(__name__)

#: The modules whose constants decide a figure besides its key (this package's files).
_METHOD_MODULES = ("accountant.py", "base.py", "pld.py", "rdp.py")
#: The distributions those modules call.
_LIBRARIES = ("dp-accounting", "opacus", "scipy", "numpy")


def method_fingerprint() -> str:
    """SHA-256 of the accountant modules' source and the libraries' versions: what a figure
    depends on that no :class:`TableKey` names. Imports none of them (importlib.metadata is
    already loaded with torch)."""
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in _METHOD_MODULES:
        source = (here / name).read_bytes()
        digest.update(f"{name}:{len(source)}:".encode() + source)
    for library in _LIBRARIES:
        try:
            version = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            version = "absent"
        digest.update(f"{library}=={version};".encode())
    return digest.hexdigest()


def body_digest(method: str, sigmas: object, epsilons: object) -> str:
    """The ``sha256`` field of a table file: SHA-256 of its body in canonical JSON."""
    canonical = json.dumps({"method": method, "sigmas": sigmas, "epsilons": epsilons},
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _number(value: object) -> float:
    """A JSON number as a float (bool, str and None are refused: ValueError)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{value!r} is not a number")
    return float(value)


class EpsilonSource(Protocol):
    """Where a ledger gets its accountant's figures from."""

    def epsilon_of_segments(self, segments: list[Segment], delta: float, accountant: str,
                            stride: int = 1) -> float: ...

    def sigma_for(self, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                  accountant: str) -> float: ...


class InProcessAccountant:
    """The accountant's library in this process (imports it on first use)."""

    def epsilon_of_segments(self, segments: list[Segment], delta: float, accountant: str,
                            stride: int = 1) -> float:
        return accountants.epsilon_of_segments(segments, delta, accountant)

    def sigma_for(self, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                  accountant: str) -> float:
        return accountants.sigma_for(target_epsilon, delta, sample_rate, steps, accountant)


IN_PROCESS = InProcessAccountant()


def epsilon_source(use_table: bool, state_dir: Path | str | None) -> EpsilonSource:
    """The ledgers' figures: ``state_dir``'s epsilon table when ``use_table`` (the library
    then never loads in this process), else the library in this process."""
    if not use_table or state_dir is None:
        return IN_PROCESS
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    return EpsilonTable(Path(state_dir) / TABLE_FILE)


@dataclass(frozen=True)
class TableKey:
    """Everything a figure depends on except the last segment's step count."""

    accountant: str
    delta: float
    prefix: tuple[Segment, ...]
    sigma: float
    sample_rate: float

    @classmethod
    def of(cls, segments: list[Segment], delta: float, accountant: str
           ) -> tuple[TableKey, int] | None:
        """The key and step count of a composition (None: no step, epsilon 0)."""
        active = active_segments(segments, delta)
        if not active:
            return None
        sigma, rate, steps = active[-1]
        return cls(accountant, float(delta), active[:-1], sigma, rate), steps

    def text(self) -> str:
        """Canonical JSON (floats as shortest round-trip repr): the key in the file."""
        return json.dumps([self.accountant, self.delta, [list(p) for p in self.prefix],
                           self.sigma, self.sample_rate])

    @classmethod
    def from_text(cls, text: str) -> TableKey:
        accountant, delta, prefix, sigma, rate = json.loads(text)
        return cls(str(accountant), float(delta),
                   tuple((float(s), float(q), int(n)) for s, q, n in prefix),
                   float(sigma), float(rate))


def _sigma_key(target: float, delta: float, rate: float, steps: int, accountant: str) -> str:
    return json.dumps([accountant, float(target), float(delta), float(rate), int(steps)])


def _valid_entries(entries: object) -> dict[int, float]:
    """A key's entries as {steps: epsilon}; ValueError if they break the invariants."""
    if not isinstance(entries, dict):
        raise ValueError("entries must be an object")
    table = {int(n): _number(e) for n, e in entries.items()}
    last = 0.0
    for n in sorted(table):
        if n < 1 or not (math.isfinite(table[n]) and table[n] >= last):
            raise ValueError(f"entry {n}: {table[n]} is not finite, >= 0 and non-decreasing")
        last = table[n]
    return table


class EpsilonTable:
    """The figures of one state directory's ledgers (see the module docstring).

    Thread-safe: the trainer's round thread and a status reader may ask at once."""

    def __init__(self, path: Path, chunk: int = CHUNK) -> None:
        self.path = Path(path)
        self.chunk = chunk
        #: How many child processes this table has run (each one extended it).
        self.children_run = 0
        #: How many stored files were unreadable or malformed and recomputed.
        self.rebuilt_files = 0
        self._lock = threading.Lock()
        self._epsilons: dict[str, dict[int, float]] = {}
        self._sigmas: dict[str, float] = {}
        #: The accountant code and libraries this table's figures are valid for.
        self.method = method_fingerprint()
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            body = json.loads(self.path.read_text())
            if not isinstance(body, dict) or body.get("format") != TABLE_FORMAT:
                raise ValueError(f"not an epsilon table of format {TABLE_FORMAT}")
            if body["sha256"] != body_digest(body["method"], body["sigmas"],
                                              body["epsilons"]):
                raise ValueError("its SHA-256 does not match its body (partial or edited)")
            if body["method"] != self.method:
                raise ValueError("made by other accountant code or library versions")
            epsilons = {TableKey.from_text(k).text(): _valid_entries(v)
                        for k, v in body["epsilons"].items()}
            sigmas = {str(k): _number(v) for k, v in body["sigmas"].items()}
            if not all(v > 0 and math.isfinite(v) for v in sigmas.values()):
                raise ValueError("a stored sigma is not positive and finite")
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            self.rebuilt_files += 1
            log.warning("%s: unusable epsilon table (%s); recomputing its figures",
                        self.path, exc)
            return
        self._epsilons, self._sigmas = epsilons, sigmas

    def _save(self) -> None:
        epsilons = {k: {str(n): e for n, e in sorted(v.items())}
                    for k, v in self._epsilons.items() if v}
        body = {"format": TABLE_FORMAT, "method": self.method, "sigmas": self._sigmas,
                "epsilons": epsilons,
                "sha256": body_digest(self.method, self._sigmas, epsilons)}
        atomic_write_bytes(self.path, json.dumps(body, indent=0, sort_keys=True).encode())

    def entries(self, key: TableKey) -> dict[int, float]:
        """A copy of the stored {steps: epsilon} of ``key`` (empty if none)."""
        with self._lock:
            return dict(self._epsilons.get(key.text(), {}))

    def epsilon_of_segments(self, segments: list[Segment], delta: float, accountant: str,
                            stride: int = 1) -> float:
        """The accountant's epsilon of ``segments``; a miss computes ``n, n + stride, ...``."""
        keyed = TableKey.of(segments, delta, accountant)
        if keyed is None:
            return 0.0
        key, steps = keyed
        with self._lock:
            stored = self._epsilons.setdefault(key.text(), {})
            if steps not in stored:
                counts = [steps + i * max(1, stride) for i in range(self.chunk + 1)]
                reply = self._run_child({"kind": "epsilons", "key": key.text(),
                                         "steps": counts})
                figures = reply.get("epsilons")
                if (reply.get("key") != key.text() or reply.get("steps") != counts
                        or not isinstance(figures, list) or len(figures) != len(counts)):
                    raise AccountingError(f"epsilon table child gave {reply!r}")
                try:
                    fresh = _valid_entries(dict(zip(counts, figures, strict=True)))
                    merged = _valid_entries({**stored, **fresh})
                except (ValueError, TypeError) as exc:
                    raise AccountingError(f"epsilon table child's figures: {exc}") from exc
                stored.update(merged)
                self._save()
            return stored[steps]

    def sigma_for(self, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                  accountant: str) -> float:
        """The accountant's ``sigma_for``, computed once in a child and stored."""
        name = _sigma_key(target_epsilon, delta, sample_rate, steps, accountant)
        with self._lock:
            if name not in self._sigmas:
                reply = self._run_child({"kind": "sigma", "target_epsilon": target_epsilon,
                                         "delta": delta, "sample_rate": sample_rate,
                                         "steps": steps, "accountant": accountant})
                sigma = reply.get("sigma")
                if not (type(sigma) is float and sigma > 0 and math.isfinite(sigma)):
                    raise AccountingError(f"epsilon table child gave {reply!r}")
                self._sigmas[name] = sigma
                self._save()
            return self._sigmas[name]

    def _run_child(self, request: dict[str, object]) -> dict[str, object]:
        """Run :mod:`.table_child` on one request; AccountingError if it fails."""
        package_root = str(Path(__file__).resolve().parents[3])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
        self.children_run += 1
        try:
            # cwd: ``-m`` puts the working directory first on sys.path, so the child would
            # otherwise import whatever ``peer`` package sits there (the fingerprint would
            # then refuse it, but this one is the right one).
            done = subprocess.run(
                [sys.executable, "-m", "peer.training.privacy.table_child"],
                input=json.dumps({**request, "method": self.method}), capture_output=True,
                text=True, env=env, cwd=package_root, timeout=CHILD_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AccountingError(f"epsilon table child did not run: {exc}") from exc
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-2:])
            raise AccountingError(f"epsilon table child failed ({done.returncode}): {tail}")
        try:
            reply = json.loads(done.stdout)
        except json.JSONDecodeError as exc:
            raise AccountingError(f"epsilon table child wrote no JSON: {exc}") from exc
        if not isinstance(reply, dict):
            raise AccountingError(f"epsilon table child gave {reply!r}")
        return reply
