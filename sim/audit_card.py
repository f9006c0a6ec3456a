"""``murmur-sim --audit``: a small one-run audit of the scenario's noise, for the report.

After the run, :func:`audit_scenario` runs the scenario twice more on the reference engine
(sim/audit.py: the real trainers, the scenario's noise mode and epsilon) with m Dirac
gradient canaries in one peer: once with the real noise, once with every peer's noise cut to
a tenth (the weakened control, reachable only through the audit hook). Each gives the
one-run lower bound on epsilon from the ``released`` view (the target's own private outputs,
the view the ledger's epsilon is about); :mod:`sim.audit_ceiling` adds what the same
procedure reaches on the idealised mechanism. The result is a :class:`ScenarioAudit`,
written to result.json (``audit``) and shown as a card in report.html.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from sim.scenario import Scenario

__all__ = ["AUDIT_CONFIDENCE", "AUDIT_M", "WEAKENED_SCALE", "ScenarioAudit", "audit_scenario"]

AUDIT_M = 500  #: canaries per audit run
AUDIT_CONFIDENCE = 0.99  #: the bound exceeds a true epsilon with probability <= 1 %
WEAKENED_SCALE = 0.1  #: the control's factor on every peer's noise
VIEW = "released"


@dataclass(frozen=True)
class ScenarioAudit:
    """One audit of a scenario: the bound beside the claim, the ceiling, the control.

    ``passed`` is the audit's verdict: the bound does not exceed the claimed epsilon.
    ``has_power`` says the weakened control's bound does exceed it (without that, a low
    bound means nothing). ``error`` is set, and every figure is None, when the audit could
    not run (e.g. DP off: there is no claim to check).
    """

    method: str
    noise: str
    m: int
    confidence: float
    delta: float
    epsilon_claimed: float | None = None
    epsilon_lower_bound: float | None = None
    epsilon_ceiling: float | None = None
    weakened_noise_scale: float = WEAKENED_SCALE
    weakened_lower_bound: float | None = None
    error: str | None = None

    @property
    def passed(self) -> bool | None:
        if self.epsilon_lower_bound is None or self.epsilon_claimed is None:
            return None
        return self.epsilon_lower_bound <= self.epsilon_claimed

    @property
    def has_power(self) -> bool | None:
        if self.weakened_lower_bound is None or self.epsilon_claimed is None:
            return None
        return self.weakened_lower_bound > self.epsilon_claimed

    def meaning(self) -> str:
        """One paragraph saying what the figures mean."""
        if self.error is not None:
            return f"Audit not run: {self.error}."
        verdict = ("did not exceed" if self.passed else "EXCEEDED")
        power = ("so the audit can detect a noise ten times too small"
                 if self.has_power else
                 "so this audit could not even detect a noise ten times too small: its "
                 "low bound says little")
        return (f"The lower bound {verdict} the ledger's ε with the real noise; the weakened "
                f"control reached {self.weakened_lower_bound:.2f} against a claim of "
                f"{self.epsilon_claimed:.2f}, {power}. A one-run bound is loose by design: "
                f"the same procedure on the ideal mechanism reaches only "
                f"{self.epsilon_ceiling:.2f} (the ceiling), so the gap below the claim "
                f"measures the method, not slack in the accountant.")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed, "has_power": self.has_power,
                "meaning": self.meaning()}


METHOD = ("one-run audit (Steinke, Nasr & Jagielski 2023), white-box Dirac gradient canaries "
          "in one peer, reference engine, released view")


def audit_scenario(scenario: Scenario, m: int = AUDIT_M,
                   confidence: float = AUDIT_CONFIDENCE) -> ScenarioAudit:
    """Audit ``scenario``'s noise mode and epsilon (two reference-engine runs); a
    :class:`ScenarioAudit` with ``error`` set, never an exception, when it cannot run."""
    from sim.audit import AuditSpec, run_audit
    from sim.audit_ceiling import ceiling

    base = ScenarioAudit(METHOD, scenario.noise, m, confidence, scenario.delta)
    if not scenario.dp:
        return dataclasses.replace(base, error="DP is off, so there is no ε to check")
    small = dataclasses.replace(scenario, mode="reference", churn_rate=0.0, hostile_peers=())
    try:
        real = run_audit(small, AuditSpec(m=m, confidence=confidence))
        weak = run_audit(small, AuditSpec(m=m, confidence=confidence,
                                          noise_scale=WEAKENED_SCALE))
    except (ValueError, RuntimeError) as exc:  # SimulationError, a model too small for m...
        return dataclasses.replace(base, error=str(exc))
    claimed = real.epsilon_claimed
    top = ceiling(real.segments, m, real.delta, confidence).mean if real.segments else math.nan
    return dataclasses.replace(
        base, epsilon_claimed=float(claimed),
        epsilon_lower_bound=float(real.results[VIEW].epsilon_lower_bound),
        epsilon_ceiling=float(np.round(top, 6)),
        weakened_lower_bound=float(weak.results[VIEW].epsilon_lower_bound))
