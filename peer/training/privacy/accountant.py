"""Privacy accounting for DP-SGD: one small interface, one module per method, a registry.

Every accountant is a module with ``NAME``, ``epsilon_of_segments(segments, delta)`` and
``sigma_for(target_epsilon, delta, sample_rate, steps)`` (the :class:`Accountant` protocol),
in the style of Opacus' ``accountants`` registry:

- ``"pld"`` (:mod:`.pld`, the default): Google's ``dp-accounting`` privacy loss
  distributions. The tightest sound accountant measured (``bench/accountant_bench.py``):
  7–15 % lower epsilon than RDP at the same sigma, i.e. less noise for the same epsilon.
- ``"rdp"`` (:mod:`.rdp`): Opacus' RDP analysis, the cross-check (the tests require the
  default's epsilon never to exceed it).

Both analyse the sampled Gaussian mechanism with Poisson sampling: every record joins each
batch independently with probability ``sample_rate``. :mod:`peer.training.dpsgd` samples
batches exactly that way, so the epsilon reported is the guarantee of what the trainer ran.
The module-level functions below use the default accountant unless told otherwise.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from peer.training.privacy.base import AccountingError, Segment, check

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ACCOUNTANT",
    "Accountant",
    "AccountingError",
    "PrivacyParams",
    "epsilon",
    "epsilon_of_segments",
    "get_accountant",
    "sigma_for",
]


class Accountant(Protocol):
    """What the ledger and the trainer need from an accountant."""

    NAME: str

    def epsilon_of_segments(self, segments: list[Segment], delta: float) -> float: ...

    def sigma_for(
        self, target_epsilon: float, delta: float, sample_rate: float, steps: int
    ) -> float: ...


class _Registry(Mapping[str, Accountant]):
    """Accountant name -> module, imported on first use: naming or checking an accountant
    (config validation, a ledger file's ``accountant`` field) loads no library, so a peer
    that takes its figures from an epsilon table (:mod:`.table`) never imports scipy."""

    def __init__(self, modules: dict[str, str]) -> None:
        self._modules = modules

    def __getitem__(self, name: str) -> Accountant:
        module = importlib.import_module(self._modules[name])
        return module  # type: ignore[return-value]  # each module satisfies Accountant

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


ACCOUNTANTS: Mapping[str, Accountant] = _Registry(
    {"pld": "peer.training.privacy.pld", "rdp": "peer.training.privacy.rdp"})
DEFAULT_ACCOUNTANT = "pld"


def get_accountant(name: str | None = None) -> Accountant:
    """The accountant registered under ``name`` (the default when ``None``)."""
    key = DEFAULT_ACCOUNTANT if name is None else name
    try:
        return ACCOUNTANTS[key]
    except KeyError:
        raise AccountingError(
            f"unknown accountant {key!r} (known: {', '.join(sorted(ACCOUNTANTS))})") from None


def epsilon_of_segments(
    segments: list[Segment], delta: float, accountant: str | None = None
) -> float:
    """Epsilon of a composition of DP-SGD segments ``(sigma, sample_rate, steps)``.

    Used by the ledger when a peer's noise or sampling rate changed between runs: the
    accountant composes the segments exactly instead of pretending they all had one setting.
    """
    return get_accountant(accountant).epsilon_of_segments(list(segments), delta)


def epsilon(
    steps: int, sigma: float, sample_rate: float, delta: float, accountant: str | None = None
) -> float:
    """Epsilon spent after ``steps`` DP-SGD steps at noise ``sigma`` and rate ``sample_rate``."""
    check(sigma, sample_rate, delta)
    if steps < 0:
        raise AccountingError(f"steps must be >= 0, got {steps}")
    if steps == 0:
        return 0.0
    return epsilon_of_segments([(sigma, sample_rate, steps)], delta, accountant)


def sigma_for(
    target_epsilon: float, delta: float, sample_rate: float, steps: int,
    accountant: str | None = None,
) -> float:
    """Smallest noise multiplier (to 0.01 in epsilon, never above the target) that keeps
    ``steps`` steps within ``target_epsilon``."""
    return get_accountant(accountant).sigma_for(target_epsilon, delta, sample_rate, steps)


@dataclass(frozen=True)
class PrivacyParams:
    """The accountant's inputs for one peer's DP-SGD run."""

    sigma: float
    sample_rate: float
    delta: float
    accountant: str | None = None

    def epsilon_after(self, steps: int) -> float:
        return epsilon(steps, self.sigma, self.sample_rate, self.delta, self.accountant)
