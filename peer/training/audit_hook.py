"""The audit-only hook of a private step: what a privacy audit may do inside DP-SGD.

A one-run audit (sim/audit.py, docs/privacy.md "Audit") needs two powers no configuration
has: adding canary gradients to a step's clipped sum before the noise, and, only to show that
the audit can fail, shrinking the noise. Both go through :class:`AuditHook`, which only code
that builds a trainer or a step itself can pass (``LocalTrainer(..., audit=...)``,
``DPSGDStep.build(..., audit=...)``), as tests pass ``noise=``. A trainer whose hook weakens
the noise reports epsilon = inf for its updates, while its ledger keeps the real mechanism's
figure.
"""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["AuditHook", "noise_scale_of"]


class AuditHook(Protocol):
    """Audit only: canaries added to a step's clipped sum, and a factor on the noise.

    ``add_canaries`` adds the auditor's canary gradients to the flat clipped sum in place,
    before any noise, as if they were sampled examples: the step's sensitivity argument does
    not cover them, which is the point (they are what the audit measures). ``noise_scale``
    multiplies the noise's standard deviation: 1 for a real audit, below 1 only to show the
    audit can fail.
    """

    @property
    def noise_scale(self) -> float: ...

    def add_canaries(self, clipped_sum: torch.Tensor) -> None: ...


def noise_scale_of(audit: AuditHook | None) -> float:
    """The factor on a step's noise standard deviation: 1 without a hook."""
    return 1.0 if audit is None else float(audit.noise_scale)
