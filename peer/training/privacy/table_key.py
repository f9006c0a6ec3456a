"""What names an epsilon table's figure and what a stored table must satisfy.

A figure is ``epsilon(prefix + [(sigma, q, n)])`` at ``delta`` by a named accountant:
:class:`TableKey` names everything but ``n``. :func:`method_fingerprint` covers what no key
names (the accountant modules' source and the libraries' versions), :func:`body_digest` a
stored file's body, and :func:`valid_entries` the invariants a key's stored figures keep
(finite, non-negative, non-decreasing in ``n``). Pure: no accountant library, no torch, so
the table's child interpreter (table_child.py) imports this module as it is.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
from dataclasses import dataclass
from pathlib import Path

from peer.training.privacy.base import Segment, active_segments

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


def number(value: object) -> float:
    """A JSON number as a float (bool, str and None are refused: ValueError)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{value!r} is not a number")
    return float(value)


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


def sigma_key(target: float, delta: float, rate: float, steps: int, accountant: str) -> str:
    return json.dumps([accountant, float(target), float(delta), float(rate), int(steps)])


def valid_entries(entries: object) -> dict[int, float]:
    """A key's entries as {steps: epsilon}; ValueError if they break the invariants."""
    if not isinstance(entries, dict):
        raise ValueError("entries must be an object")
    table = {int(n): number(e) for n, e in entries.items()}
    last = 0.0
    for n in sorted(table):
        if n < 1 or not (math.isfinite(table[n]) and table[n] >= last):
            raise ValueError(f"entry {n}: {table[n]} is not finite, >= 0 and non-decreasing")
        last = table[n]
    return table


