"""A one-run privacy audit on the reference engine (bench/audit.py, tests/test_audit.py).

One target peer of a reference network (sim/reference.py: the real trainers, merge rule and
group-noise epochs) carries m canaries, each in the run with an independent fair coin:

* **gradient canaries** (white-box, the paper's strongest setting): canary i is the unit
  vector of one coordinate c_i of the model (a "Dirac" canary, as in the paper: m distinct
  coordinates, so no two canaries overlap; the ones the target's own data move least,
  :func:`quiet_coordinates`) scaled to norm C. At every private step of the target
  each included canary is Poisson-sampled at the target's rate q, like a record, and a sampled
  one is added to the clipped gradient sum before noise (local noise: the step's sum; group
  noise: the target's share S before rounding). The hook is
  :class:`peer.training.audit_hook.AuditHook`, which only code that builds a trainer itself can
  pass: no configuration reaches it;
* **input canaries** (black-box): m records of the test split, each with a wrong label drawn
  at random, appended to the target's training set when their coin says in.

Scores (higher means "in") come from what an adversary can hold:

* ``other``: another peer's final model minus the common initial model;
* ``own``: the target's own final model minus the initial model;
* ``released`` (gradient canaries only): the sum of the target's own private outputs, the
  view the accountant's epsilon is about: its round changes (local noise) or the group
  releases it took part in (group noise).

A gradient canary's score is minus the view's change at c_i (an SGD step moves against the
canary); an input canary's is minus the view's loss on it. :mod:`sim.audit_bound` turns
the scores and coins into the lower bound on epsilon. ``noise_scale`` below 1 weakens the
noise of every peer (their epsilon then reads inf), only to show that the audit can fail.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sim.audit_bound import AuditResult, audit_scores
from sim.reference import ReferenceNetwork
from sim.scenario import Scenario
from sim.setup import prepare

__all__ = ["AuditOutcome", "AuditSpec", "GradientCanaries", "quiet_coordinates", "run_audit",
           "weakening_hook"]

CANARY_KINDS = ("gradient", "input")
VIEWS = ("released", "own", "other")


@dataclass(frozen=True)
class AuditSpec:
    """What to audit: the canary kind, how many, the weakening, the confidence."""

    canary: str = "gradient"
    m: int = 500
    noise_scale: float = 1.0  #: 1: the real mechanism; below 1 only to show power
    confidence: float = 0.95
    target: int = 0  #: the target peer's index

    def __post_init__(self) -> None:
        if self.canary not in CANARY_KINDS:
            raise ValueError(f"canary must be one of {CANARY_KINDS}, got {self.canary!r}")
        if self.m < 2 or not 0 <= self.noise_scale <= 1 or not 0 < self.confidence < 1:
            raise ValueError("need m >= 2, 0 <= noise_scale <= 1, 0 < confidence < 1")


class GradientCanaries:
    """Dirac gradient canaries for one trainer: an :class:`peer.training.audit_hook.AuditHook`."""

    def __init__(self, coords: np.ndarray, included: np.ndarray, norm: float,
                 noise_scale: float, rng: np.random.Generator) -> None:
        self.coords = np.asarray(coords, dtype=np.int64)
        self.included = np.asarray(included, dtype=bool)
        self._active = self.coords[self.included]
        self.norm = float(norm)
        self._noise_scale = float(noise_scale)
        self.sample_rate = 0.0  # set to the trainer's q once it exists
        self._rng = rng
        self.sampled_total = 0  #: canary draws added so far (a read-out for tests)

    @property
    def noise_scale(self) -> float:
        return self._noise_scale

    def add_canaries(self, clipped_sum: Any) -> None:
        """Each included canary joins this step with probability q, as a record would."""
        drawn = self._active[self._rng.random(self._active.size) < self.sample_rate]
        self.sampled_total += int(drawn.size)
        if drawn.size:
            clipped_sum[drawn] += self.norm  # distinct coordinates: no index repeats

    def scores(self, change: np.ndarray) -> np.ndarray:
        """Minus the change at each canary's coordinate: an included canary pushes it down."""
        return -np.asarray(change, dtype=np.float64)[self.coords]


class _RecordingTrainer:
    """The target's trainer, recording the sum of its own private outputs (``released``)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.released = np.zeros(inner.param_count, dtype=np.float64)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def train_round(self) -> Any:
        before = self.inner.parameter_vector()
        update = self.inner.train_round()
        if update.steps:  # the reference engine merges only after every peer trained
            self.released += self.inner.parameter_vector() - before
        return update

    def begin_group_epoch(self, params: Any, steps: int) -> Any:
        return _RecordingEpoch(self.inner.begin_group_epoch(params, steps), self)


class _RecordingEpoch:
    """A group epoch whose released gradients are added (negated) to the recorder."""

    def __init__(self, epoch: Any, recorder: _RecordingTrainer) -> None:
        self.epoch = epoch
        self.recorder = recorder

    @property
    def expected_batch(self) -> float:
        return float(self.epoch.expected_batch)

    def share(self) -> np.ndarray:
        return self.epoch.share()

    def apply(self, gradient: np.ndarray) -> None:
        self.epoch.apply(gradient)
        self.recorder.released -= np.asarray(gradient, dtype=np.float64)


@dataclass(frozen=True)
class AuditOutcome:
    """One audit: the target's claimed epsilon and one bound per adversary view."""

    epsilon_claimed: float
    delta: float
    m: int
    included: int
    results: dict[str, AuditResult]
    sampled_canaries: int
    seconds: float
    #: the target's ledger segments, (sigma, q, steps) runs: the mechanism its epsilon is for
    #: (sim/audit_ceiling.py simulates it)
    segments: tuple[tuple[float, float, int], ...] = ()


def quiet_coordinates(trainer: Any, train: Any, m: int, rng: np.random.Generator
                      ) -> np.ndarray:
    """The m coordinates the target's own records move least: smallest sum over its records
    of |per-example gradient| at the initial model, ties broken at random.

    The auditor is white-box and designs its canaries before any coin is drawn, from the
    public initial model and the target's records without canaries; a coordinate its data
    hardly moves (a first-layer weight of a pixel that is nearly always 0) keeps the data's
    own drift out of the score, which otherwise swamps the canary (docs/results.md, "Privacy
    audit").
    """
    import torch

    from peer.training.dpsgd import VmapEngine

    engine = VmapEngine(trainer.trainable)
    activity = torch.zeros(trainer.param_count, dtype=torch.float64)
    for start in range(0, len(train), 256):
        x = torch.from_numpy(train.x[start:start + 256])
        y = torch.from_numpy(train.y[start:start + 256])
        activity += engine.per_example_flat(x, y).detach().abs().sum(0).double()
    order = np.lexsort((rng.random(activity.numel()), activity.numpy()))
    return np.sort(order[:m])


def weakening_hook(noise_scale: float) -> GradientCanaries:
    """A hook with no canaries that only scales the noise: for every peer but the target in a
    weakened run, since a group release carries every member's share and weakening one member
    would not show."""
    return GradientCanaries(np.zeros(0, np.int64), np.zeros(0, bool), 1.0, noise_scale,
                            np.random.default_rng())


def _weaken_others(net: ReferenceNetwork, plans: list[Any], spec: AuditSpec) -> None:
    """Every other peer's trainer rebuilt with :func:`weakening_hook`."""
    from peer.training.trainer import LocalTrainer

    for index, peer in enumerate(net.peers):
        if index != spec.target:
            peer.trainer = LocalTrainer(peer.trainer.config, plans[index].train,
                                        plans[index].holdout, None,
                                        audit=weakening_hook(spec.noise_scale))


def _with_canary_records(train: Any, x: np.ndarray, y: np.ndarray) -> Any:
    from peer.training.data import Dataset

    return Dataset(np.concatenate([train.x, x]), np.concatenate([train.y, y]),
                   train.num_classes, f"{train.name}+canaries")


def _input_scores(trainer: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Minus each canary's loss under ``trainer``'s current model (lower loss: "in")."""
    import torch
    import torch.nn.functional as F

    model = trainer.model
    model.eval()
    with torch.no_grad():
        losses = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y),
                                 reduction="none")
    model.train()
    return -losses.double().numpy()


def run_audit(scenario: Scenario, spec: AuditSpec, rng: np.random.Generator | None = None
              ) -> AuditOutcome:
    """Run ``scenario`` once on the reference engine with ``spec``'s canaries in one peer.

    ``rng`` draws the coins, coordinates, labels and the canaries' sampling; by default fresh
    OS entropy. The DP noise and the records' sampling always come from the secure source.
    """
    from peer.training.trainer import LocalTrainer

    rng = rng or np.random.default_rng()
    started = time.monotonic()
    scenario = dataclasses.replace(scenario, mode="reference")
    included = rng.random(spec.m) < 0.5
    with tempfile.TemporaryDirectory(prefix="murmur-audit-") as tmp:
        prep = prepare(scenario, Path(tmp))
        plan = prep.plans[spec.target]
        if spec.canary == "input":
            if spec.m > len(prep.test):
                raise ValueError(f"{spec.m} input canaries, but the test split has "
                                 f"{len(prep.test)} records")
            pick = rng.choice(len(prep.test), size=spec.m, replace=False)
            cx = prep.test.x[pick]
            k = prep.test.num_classes
            cy = (prep.test.y[pick] + rng.integers(1, k, size=spec.m)) % k
            plan.train = _with_canary_records(plan.train, cx[included], cy[included])
        net = ReferenceNetwork.build(prep)
        target = net.peers[spec.target]
        hook = None
        if spec.canary == "gradient":
            d = target.trainer.param_count
            if spec.m > d:
                raise ValueError(f"{spec.m} gradient canaries, but the model has {d} coordinates")
            if target.trainer.clip_norm is not None:  # canaries of norm C_0, clipped to C_t
                raise ValueError("gradient canaries need a fixed C: turn clip_adaptive off "
                                 "(input canaries work with adaptive clipping)")
            hook = GradientCanaries(quiet_coordinates(target.trainer, plan.train, spec.m, rng),
                                    included, scenario.max_grad_norm, spec.noise_scale, rng)
        # The target's trainer again, built like the first but with the audit's hook, no disk.
        inner = LocalTrainer(target.trainer.config, plan.train, plan.holdout, None,
                             audit=hook)
        if hook is not None:
            hook.sample_rate = inner.sample_rate
        recorder = _RecordingTrainer(inner)
        target.trainer = recorder
        if spec.noise_scale != 1.0:
            _weaken_others(net, prep.plans, spec)
        initial = inner.parameter_vector().astype(np.float64)
        while not net.finished():
            net.step(evaluate=False)
        other = net.peers[(spec.target + 1) % len(net.peers)].trainer
        views: dict[str, np.ndarray] = {}
        if hook is not None:
            views["released"] = hook.scores(recorder.released)
            views["own"] = hook.scores(inner.parameter_vector() - initial)
            views["other"] = hook.scores(other.parameter_vector() - initial)
        else:
            views["own"] = _input_scores(inner, cx, cy)
            views["other"] = _input_scores(other, cx, cy)
        ledger = inner.ledger
        claimed = float(ledger.epsilon) if ledger is not None else float("inf")
        segments = tuple((float(sg), float(q), int(n)) for sg, q, n in ledger.segments
                         ) if ledger is not None else ()
        results = {view: audit_scores(scores, included, scenario.delta, spec.confidence)
                   for view, scores in views.items()}
    return AuditOutcome(claimed, scenario.delta, spec.m, int(included.sum()), results,
                        hook.sampled_total if hook is not None else 0,
                        time.monotonic() - started, segments)
