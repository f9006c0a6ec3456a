"""From a scenario to the peers of a run: settings, run directory, data split, keys, and peers.

Everything a simulated peer is made of is decided here, so that the in-process engine
(sim/inprocess.py) and the one-process-per-peer engine (sim/peer_process.py) build the very
same peer:

* :func:`node_config` and :func:`trainer_config` state only what the simulation changes from
  the library defaults (``peer.assembly``, ``peer.training.config``): the pacing below, the
  session timeouts stretched by the injected delay, and the scenario's training settings;
* :func:`prepare` loads the data, splits it across the peers, and creates the network's
  admission key and one identity + certificate per peer with the real crypto (keys come from
  the OS CSPRNG, never from the scenario seed);
* :func:`build_sim_trainer` and :func:`build_sim_peer` assemble a peer through
  ``peer.assembly`` exactly as ``murmur-peer run`` does, plus the scenario's send faults.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from crypto.admission import AdmissionKey, Certificate
from crypto.identity import Identity
from peer import assembly
from peer.config import SessionConfig
from peer.files import atomic_write_bytes
from peer.network.node import EventCallback, NodeConfig, Peer
from peer.network.session.shamir import SessionTimeouts
from peer.network.transport import BrokerSettings
from peer.network.view.partial import ViewConfig
from sim import hostile
from sim.faults import FaultStats, install_send_faults
from sim.partition import partition
from sim.scenario import Scenario, resolve_model

# ----------------------------------------------------------------------------- pacing
#: The simulation's node pacing: every change it makes to the library's NodeConfig defaults.
#: A local round of the default model takes a fraction of a second, far less than an
#: aggregation session; without a pause between rounds a peer would finish all its rounds
#: before its neighbours could merge anything. Random start jitter spreads the peers'
#: invitations so that they do not all start sessions at once and decline each other as busy.
ROUND_PAUSE_S = 2.0
START_JITTER_S = 1.5
COOLDOWN_S = 0.5
#: Group noise: a session per private step (a local round is local_steps of them), so a peer
#: with a share ready invites after a shorter delay and cooldown.
GROUP_START_JITTER_S = 0.3
GROUP_COOLDOWN_S = 0.05
#: Announcements and expiry fast enough that churn shows up within seconds.
ANNOUNCE_INTERVAL_S = 5.0
SILENCE_EXPIRY_S = 30.0
CHECKPOINT_INTERVAL_S = 30.0
#: A session makes about this many message hops; each phase timeout is stretched by that
#: many injected delays.
SESSION_HOPS = 4
#: Certificates outlive any run.
CERT_VALIDITY_S = 7 * 24 * 3600.0


class SimulationError(RuntimeError):
    """The simulation could not run (data, broker or peers failed to start)."""


def session_timeouts(s: Scenario) -> SessionTimeouts:
    """The library's session timeouts, each stretched by the injected delay of ~4 hops."""
    stretch = SESSION_HOPS * s.delay_ms / 1000.0
    base = SessionTimeouts()
    return SessionTimeouts(**{f.name: getattr(base, f.name) + stretch
                              for f in dataclasses.fields(base)})


def node_config(s: Scenario, round_pause_s: float = ROUND_PAUSE_S) -> NodeConfig:
    """Node settings for a simulated peer: the scenario's group, the simulation's pacing.
    Group noise takes one session per private step, so its peers invite sooner."""
    group = s.noise == "group"
    return assembly.node_config(
        SessionConfig(group_size=s.group_size, threshold=s.threshold,
                      max_colluders=s.max_colluders, kind=s.session_kind),
        timeouts=session_timeouts(s),
        announce_interval_s=ANNOUNCE_INTERVAL_S,
        silence_expiry_s=SILENCE_EXPIRY_S,
        checkpoint_interval_s=CHECKPOINT_INTERVAL_S,
        start_jitter_s=GROUP_START_JITTER_S if group else START_JITTER_S,
        cooldown_s=GROUP_COOLDOWN_S if group else COOLDOWN_S,
        round_pause_s=round_pause_s,
        view=ViewConfig(view_size=s.view_size),
    )


def averaging_rounds(rounds: int, fraction: float = 1 / 6) -> int:
    """Rounds at the end of a run that take no private step and only re-share the model, so
    the peers' independent DP noise keeps averaging out at no privacy cost (by default a sixth
    of the run; none for runs too short to have one)."""
    return min(rounds - 1, int(rounds * fraction + 1e-9))


def model_seed(network: str, seed: int) -> int:
    """The model-initialisation seed shared by every peer of a network.

    Gossip averaging only makes sense between models that start from the same point, so all
    peers of one network derive the same seed (from the network id and the scenario seed).
    It seeds weights and batch order only, never DP noise or keys.
    """
    digest = 0
    for ch in f"{network}:{seed}":
        digest = (digest * 131 + ord(ch)) % (2**31 - 1)
    return digest


def trainer_config(s: Scenario, model_name: str) -> Any:
    """peer.training.config.TrainerConfig for a simulated peer: the library defaults with the
    scenario's settings on top (the share mode and top-k defaults are the daemon's).

    The same for every peer of a network: the seed there only initialises the model (batches
    and DP noise come from the OS CSPRNG), and all peers must start from the same weights.
    """
    from peer.training.config import TrainerConfig

    return dataclasses.replace(
        TrainerConfig(),
        model=model_name,
        lr=s.lr,
        momentum=s.momentum,
        batch_size=s.batch_size,
        local_steps=s.local_steps,
        dp=s.dp,
        noise_multiplier=s.noise_multiplier if s.dp else None,
        target_epsilon=s.target_epsilon if s.dp else None,
        planned_rounds=s.rounds,
        delta=s.delta,
        max_grad_norm=s.max_grad_norm,
        clip_adaptive=s.clip_adaptive,
        clip_target_quantile=s.clip_target_quantile,
        clip_learning_rate=s.clip_learning_rate,
        clip_count_stddev=s.clip_count_stddev,
        # The budget is the target: a peer stops sharing once it spent what was planned.
        budget_epsilon=s.target_epsilon if s.dp else None,
        topk_fraction=s.topk_fraction,
        averaging_rounds=averaging_rounds(s.rounds, s.averaging_fraction),
        averaging_topk_fraction=s.averaging_topk_fraction,
        seed=model_seed(s.network, s.seed),
    )


# ----------------------------------------------------------------------------- group noise
def private_rounds(s: Scenario) -> int:
    """Rounds that take private steps (the rest are the averaging tail)."""
    return s.rounds - averaging_rounds(s.rounds, s.averaging_fraction)


def group_sigma_eff(s: Scenario, plans: list[PeerPlan]) -> float:
    """The network-wide sigma_eff: ``noise_multiplier`` if the scenario fixes it, else the
    accountant's sigma for ``target_epsilon`` at the largest sampling rate of any peer."""
    if s.noise_multiplier is not None:
        return s.noise_multiplier
    assert s.target_epsilon is not None
    from peer.training.privacy.accountant import sigma_for

    q_max = max(min(1.0, s.batch_size / len(plan.train)) for plan in plans)
    steps = private_rounds(s) * s.local_steps
    config = trainer_config(s, "mlp")
    return sigma_for(s.target_epsilon, s.delta, q_max, steps, config.accountant)


def build_group_trainer(s: Scenario, model_name: str, plan: PeerPlan, sigma_eff: float,
                        audit: Any = None) -> Any:
    """The peer's real LocalTrainer in group-noise mode at the network's sigma_eff; its plan
    is the scenario's rounds, the last ``averaging_rounds`` of them the averaging tail (the
    network engines' tail sessions; the reference engine counts rounds itself)."""
    config = dataclasses.replace(
        trainer_config(s, model_name), noise="group", honest_min=s.honest_min,
        noise_multiplier=sigma_eff, target_epsilon=None)
    return assembly.build_trainer(config, plan.train, plan.holdout, plan.state_dir,
                                  audit=audit)


# ----------------------------------------------------------------------------- preparation
@dataclass
class PeerPlan:
    """Everything one simulated peer is made of."""

    index: int
    peer_id: str
    identity: Identity
    certificate: Certificate
    shard: np.ndarray  # indices into the training set
    train: Any  # peer.training.data.Dataset
    holdout: Any
    state_dir: Path
    hostile_kind: str | None = None


@dataclass
class Prepared:
    run_dir: Path
    scenario: Scenario
    train: Any
    test: Any
    model_name: str
    admission: AdmissionKey
    plans: list[PeerPlan]
    hostile_plans: list[PeerPlan]
    round_pause_s: float = ROUND_PAUSE_S
    #: Group noise: the network-wide sigma_eff every peer draws its shares for (None: local).
    group_sigma_eff: float | None = None


def make_run_dir(out_dir: Path, network: str) -> Path:
    """A fresh ``out_dir/<UTC time>-<network>[-n]`` directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        name = f"{stamp}-{network}" if attempt == 1 else f"{stamp}-{network}-{attempt}"
        run_dir = out_dir / name
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        return run_dir
    raise SimulationError(f"cannot create a run directory in {out_dir}")


def write_text(path: Path, text: str) -> None:
    """Replace a run file (scenario.toml, result.json) atomically; readable by others."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=0o644, overwrite=True)


def local_data(s: Scenario, train: Any, shard: np.ndarray, *, index: int, peer_id: str,
               hostile_kind: str | None) -> tuple[Any, Any]:
    """A peer's (train, hold-out) from its shard of the training set; seeded, so a peer
    process rebuilds exactly the split :func:`prepare` made."""
    from peer.training.data import split_holdout

    seed = s.seed if hostile_kind else s.seed + index
    own = train.subset(shard, name=f"{train.name}[{peer_id}]")
    return split_holdout(own, s.holdout_fraction, seed)


def _plan(s: Scenario, run_dir: Path, admission: AdmissionKey, train: Any, shard: np.ndarray,
          *, index: int, peer_id: str, hostile_kind: str | None, now: float) -> PeerPlan:
    identity = Identity.generate(peer_id)
    local_train, holdout = local_data(s, train, shard, index=index, peer_id=peer_id,
                                      hostile_kind=hostile_kind)
    return PeerPlan(
        index=index, peer_id=peer_id, identity=identity,
        certificate=admission.issue(identity.public, valid_for_s=CERT_VALIDITY_S, now=now),
        shard=np.asarray(shard, dtype=np.int64), train=local_train, holdout=holdout,
        state_dir=run_dir / "peers" / peer_id, hostile_kind=hostile_kind,
    )


def _split(s: Scenario, train: Any, rng: np.random.Generator) -> list[np.ndarray]:
    try:
        return partition(train.y, s.peers, s.partition, rng, alpha=s.alpha,
                         shards_per_peer=s.shards_per_peer, min_size=s.min_partition_size)
    except ValueError as exc:
        raise SimulationError(f"cannot split {len(train.y)} examples over {s.peers} peers: "
                              f"{exc}") from exc


def warm_features(model_name: str, train: Any, test: Any) -> None:
    """For a model with a frozen feature prefix ("scatter"), featurise the whole training and
    test sets once, before any peer is built (loaded from the on-disk store when an earlier
    run computed them: ``peer.training.features.warm_cache``), so that every peer's shard and
    hold-out and the test evaluations hit the process-wide feature cache. Nothing for other
    models."""
    import torch

    from peer.errors import PeerError
    from peer.training.features import default_cache_dir, warm_cache
    from peer.training.models import build_model, split_frozen

    try:
        with torch.random.fork_rng(devices=[]):  # building draws weights: leave torch's RNG
            model = build_model(model_name, tuple(train.x.shape[1:]), train.num_classes)
    except (PeerError, ImportError) as exc:  # ModelError, FeatureError (kymatio missing)
        raise SimulationError(f"cannot build model {model_name!r}: {exc}") from exc
    prefix, _rest = split_frozen(model)
    if prefix is None:
        return
    cache_dir = default_cache_dir()
    for data in (train, test):
        warm_cache(prefix, data.x, cache_dir=cache_dir)


def prepare(s: Scenario, run_dir: Path) -> Prepared:
    """Data split, keys and certificates for every peer (honest and hostile)."""
    from peer.training.data import load_source

    try:
        train, test = load_source(s.dataset)
    except Exception as exc:  # DataError, OSError, ValueError: the data set is unusable
        raise SimulationError(f"cannot load data set {s.dataset!r}: {exc}") from exc
    model_name = resolve_model(s.model, tuple(train.x.shape[1:]))
    warm_features(model_name, train, test)
    rng = np.random.default_rng(s.seed)
    shards = _split(s, train, rng)
    admission = AdmissionKey.generate(s.network)
    now = time.time()
    plans = [_plan(s, run_dir, admission, train, shard, index=i, peer_id=f"p{i:02d}",
                   hostile_kind=None, now=now) for i, shard in enumerate(shards)]
    hostile_plans: list[PeerPlan] = []
    if "huge_norm" in s.hostile_peers:
        # An admitted insider with its own (IID) data of a typical shard size.
        size = int(np.median([len(p) for p in shards]))
        shard = np.sort(rng.choice(len(train.y), size=max(size, 4), replace=False))
        hostile_plans.append(_plan(s, run_dir, admission, train, shard, index=len(plans),
                                   peer_id=hostile.HUGE_NORM_ID, hostile_kind="huge_norm",
                                   now=now))
    for plan in (*plans, *hostile_plans):
        plan.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    sigma_eff = group_sigma_eff(s, plans) if s.noise == "group" else None
    return Prepared(run_dir, s, train, test, model_name, admission, plans, hostile_plans,
                    group_sigma_eff=sigma_eff)


# ----------------------------------------------------------------------------- one peer
def build_sim_trainer(s: Scenario, model_name: str, plan: PeerPlan,
                      group_sigma: float | None = None, audit: Any = None) -> Any:
    """The peer's real LocalTrainer (resumes from its state_dir when a checkpoint exists),
    wrapped by the hostile behaviour the plan asks for; with group noise, in group mode at
    the network's ``group_sigma`` (:func:`group_sigma_eff`). ``audit``: a privacy audit's
    hook (sim/audit_network.py), never set by a scenario."""
    if s.noise == "group":
        if group_sigma is None:
            raise SimulationError("group noise needs the network's sigma_eff")
        trainer = build_group_trainer(s, model_name, plan, group_sigma, audit)
    else:
        trainer = assembly.build_trainer(trainer_config(s, model_name), plan.train,
                                         plan.holdout, plan.state_dir, audit=audit)
    if plan.hostile_kind == "huge_norm":
        return hostile.HugeNormTrainer(trainer)
    return trainer


def build_sim_peer(s: Scenario, plan: PeerPlan, trainer: Any, *, admission_public_key: bytes,
                   broker: BrokerSettings, round_pause_s: float, fault_rng: random.Random,
                   fault_stats: FaultStats, on_event: EventCallback | None) -> Peer:
    """One incarnation of a simulated peer: the daemon's node around ``trainer`` with the
    simulation's settings, its outgoing messages passing through the scenario's faults."""
    peer = assembly.build_peer(
        identity=plan.identity,
        certificate=plan.certificate,
        admission_public_key=admission_public_key,
        network_id=s.network,
        trainer=trainer,
        broker=broker,
        node=node_config(s, round_pause_s),
        on_event=on_event,
    )
    install_send_faults(peer.transport, delay_ms=s.delay_ms, loss_rate=s.loss_rate,
                        rng=fault_rng, stats=fault_stats)
    return peer
