"""Resource budget of one Murmur peer process: peak RSS and CPU time per local round.

Every configuration runs in its own fresh Python process (a peak RSS is a per-process
high-water mark, so measurements must not share a process), started by this script with
``--child``. The child reports its own ``ru_maxrss`` and its resident set after each phase
(imports, data, trainer, rounds), so the table shows *where* the memory goes; the parent
cross-checks the CPU time with ``getrusage(RUSAGE_CHILDREN)``.

Rows (``what``):

* ``import``          -- import-only baselines: a bare interpreter, the network stack (numpy,
  PyNaCl, aiomqtt, msgpack), bare torch, torch + Opacus (what the RDP accountant import pulls
  in), torch + scipy.special (all that the RDP analysis itself needs), and everything a peer
  process imports before it loads data;
* ``lean_floor``      -- what a peer needs and nothing more: torch, the network stack, the RDP
  math (scipy.special), Murmur's model and DP-SGD step on a synthetic 6 000-example shard and
  functional SGD; ``cnn+optim`` swaps in ``torch.optim.SGD`` to show what it imports;
* ``peer_training``   -- the peer's training half exactly as ``murmur-peer run`` builds it
  (peer.training.data.load_train_source, split_holdout_consuming,
  peer.training.trainer.LocalTrainer with a state directory),
  running N local rounds: ``cnn`` on the full Fashion-MNIST training set, ``cnn_shard`` on a
  6 000-example shard given as an .npz file (what one device of a fleet would hold), ``mlp``
  on scikit-learn's digits;
* ``peer_full``       -- a whole ``murmur-peer run`` process (transport, membership,
  sessions, trainer) against a loopback Mosquitto, next to two more peers so that sessions
  happen; sampled with psutil while it runs. ``cnn_shard+lean`` is a what-if: the same run
  with the two changes proposed in docs/deploy/raspberry-pi.md applied from outside
  (:func:`install_lean_what_if`), so that the proposal has a measured figure;
* after those, in the same run (:func:`after_plan`): ``+table`` rows (the ledger's epsilon
  table instead of dp-accounting in the process), ``+small`` rows (every setting of
  ``[device] profile = "small"``, peer/device.py), the scatter model on the shard (features
  included) as it stands and under the profile, and whole peers under the profile.

Usage::

    python bench/resource_bench.py [--quick] [--rounds N] [--out results.json]
                                   [--only CONFIG ...]

``--only`` keeps the rows whose ``config``, or ``what:config``, is one of those given (e.g.
``--only peer_training:cnn --only cnn+small``: the full-data CNN peer as it stands and under
the profile), with the same labels and fields as in a whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere: import the repo's packages
    sys.path.insert(0, str(REPO))
MB = 1024 * 1024
FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),
                      Path("/usr/share/dataset-fashion-mnist"))
SHARD_EXAMPLES = 6000  # one device's share of Fashion-MNIST in a 10-device fleet

IMPORT_SETS: dict[str, str] = {
    "python": "pass",
    "net_stack": "import numpy, msgpack, nacl.public, nacl.signing, aiomqtt",
    "torch": "import torch",
    "torch+opacus": "import torch; from opacus.accountants import RDPAccountant",
    "torch+scipy.special": "import torch; import scipy.special",
    "peer_process": ("import peer.cli, peer.config, peer.network.node, peer.training.data, "
                     "peer.training.trainer"),
}


# ------------------------------------------------------------------------------ measuring
def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # the kernel reports kB
    raise RuntimeError(f"{field} missing from /proc/self/status")


def peak_rss_mb() -> float:
    """This process's peak resident set: VmHWM, the high-water mark of its address space.

    Not ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child of a parent that
    once held a large data set would report the parent's peak.
    """
    return _proc_status_mb("VmHWM")


def current_rss_mb() -> float:
    return _proc_status_mb("VmRSS")


def cpu_s() -> float:
    return time.process_time()


class Phases:
    """Resident set after each named phase of a child run."""

    def __init__(self) -> None:
        self.figures: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.figures[f"rss_after_{name}_mb"] = round(current_rss_mb(), 1)


# -------------------------------------------------------------------------------- children
def child_import(config: str) -> dict[str, Any]:
    start = cpu_s()
    exec(IMPORT_SETS[config], {})  # the statements are this file's own constants
    return {"import_cpu_s": round(cpu_s() - start, 2)}


def child_lean_floor(config: str, rounds: int, steps_per_round: int) -> dict[str, Any]:
    """What a peer *needs*: torch, Murmur's DP-SGD step and model, the network stack, the RDP
    math (scipy.special), a 6 000-example shard, and functional SGD (``torch.optim.sgd.sgd``
    does not import torch._dynamo; constructing a ``torch.optim.Optimizer`` does, +~70 MB).

    ``config`` is ``cnn`` or ``mlp``; a ``+optim`` suffix uses ``torch.optim.SGD`` instead,
    to isolate that one import.
    """
    import aiomqtt  # noqa: F401  (the network half's imports, for a fair floor)
    import msgpack  # noqa: F401
    import nacl.public  # noqa: F401
    import scipy.special  # noqa: F401  (all that the RDP analysis itself imports)
    import torch
    from torch.optim.sgd import sgd

    from peer.training.dpsgd import DPSGDStep, poisson_batch
    from peer.training.models import build_model

    phases = Phases()
    phases.mark("imports")
    model_name, _, variant = config.partition("+")
    shape = (1, 28, 28) if model_name == "cnn" else (64,)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((SHARD_EXAMPLES, *shape), generator=generator)
    y = torch.randint(0, 10, (SHARD_EXAMPLES,), generator=generator)
    phases.mark("data")
    model = build_model(model_name, shape, 10)
    params = [p for p in model.parameters() if p.requires_grad]
    batch, lr = 64, 0.05
    optimizer = torch.optim.SGD(params, lr=lr) if variant == "optim" else None
    dp = DPSGDStep.build(model, noise_multiplier=1.0, max_grad_norm=1.0,
                         expected_batch_size=batch)
    phases.mark("trainer")

    def sgd_step() -> None:
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return
        with torch.no_grad():
            sgd(params, [p.grad for p in params], [None] * len(params), weight_decay=0.0,
                momentum=0.0, lr=lr, dampening=0.0, nesterov=False, maximize=False)
        for p in params:
            p.grad = None

    round_cpu = []
    for _ in range(rounds):
        start = cpu_s()
        for _ in range(steps_per_round):
            index = poisson_batch(SHARD_EXAMPLES, batch / SHARD_EXAMPLES, generator)
            dp.step(x[index], y[index])
            sgd_step()
        round_cpu.append(cpu_s() - start)
    phases.mark("rounds")
    return {**phases.figures, **round_figures(round_cpu), "steps_per_round": steps_per_round,
            "torch_dynamo_imported": "torch._dynamo" in sys.modules}


def child_peer_training(config: str, rounds: int, steps_per_round: int,
                        data_spec: str) -> dict[str, Any]:
    import dataclasses

    from peer.training.data import load_train_source, split_holdout_consuming
    from peer.training.trainer import LocalTrainer, TrainerConfig

    base, _, variant = config.partition("+")
    if variant == "small":  # the profile's process settings, before any data is loaded
        from peer.device import DeviceConfig, apply_process_settings

        apply_process_settings(DeviceConfig("small"))
    phases = Phases()
    phases.mark("imports")
    # The same sequence as peer.assembly.peer_from_config (the `murmur-peer run` path): only
    # the source's training part is loaded, and the unsplit set is dropped once it is split.
    train_source = load_train_source(data_spec)
    phases.mark("data")
    train, holdout = split_holdout_consuming(train_source, 0.2, seed=0)
    del train_source
    model = {"mlp": "mlp", "scatter_shard": "scatter"}.get(base, "cnn")
    # DP on, as on a device: sigma 1.0, expected batch 64, 1 % top-k. "+table": the ledger's
    # figures from an epsilon table (a child process), not the library in this process;
    # "+small": every setting of [device] profile = "small" (peer/device.py).
    overrides: dict[str, Any] = {"model": model, "local_steps": steps_per_round, "dp": True,
                                 "noise_multiplier": 1.0, "batch_size": 64,
                                 "topk_fraction": 0.01, "epsilon_table": variant == "table"}
    if variant == "small":
        from peer.device import PROFILES

        overrides.update(PROFILES["small"].training)
    known = {f.name for f in dataclasses.fields(TrainerConfig)}
    trainer_config = TrainerConfig(**{k: v for k, v in overrides.items() if k in known})
    with tempfile.TemporaryDirectory(prefix="murmur-bench-state-") as state:
        trainer = LocalTrainer(trainer_config, train, holdout, Path(state))
        # As in peer.assembly.peer_from_config, the trainer is the data's only holder from
        # here on (a scatter trainer keeps features, not the images: the images are freed).
        train_examples = len(train)
        del train, holdout
        phases.mark("trainer")
        round_cpu = []
        for _ in range(rounds):
            start = cpu_s()
            trainer.train_round()
            round_cpu.append(cpu_s() - start)
        phases.mark("rounds")
        start = cpu_s()
        accuracy = trainer.evaluate()
        evaluate_cpu = cpu_s() - start
        phases.mark("evaluate")
    return {
        **phases.figures,
        **round_figures(round_cpu),
        "evaluate_cpu_s": round(evaluate_cpu, 3),
        "holdout_accuracy": round(float(accuracy), 3),
        "train_examples": train_examples,
        "param_count": int(trainer.param_count),
        "steps_per_round": steps_per_round,
        "epsilon": round(float(trainer.epsilon or 0.0), 4),
        "accountant_loaded": "dp_accounting" in sys.modules,
        "scipy_loaded": "scipy" in sys.modules,
    }


def round_figures(round_cpu: list[float]) -> dict[str, float]:
    """First round separately (it pays one-off warm-up), steady state as the median."""
    steady = round_cpu[1:] or round_cpu
    return {
        "rounds": len(round_cpu),
        "cpu_s_first_round": round(round_cpu[0], 3),
        "cpu_s_per_round": round(statistics.median(steady), 3),
    }


# ------------------------------------------------------- what-if: the two proposed changes
# Measurement only, never product code: the whole-peer run with ``+lean`` applies, from the
# outside, the two changes this benchmark proposes (see docs/deploy/raspberry-pi.md), so the
# proposal comes with a measured figure rather than an estimate.
OPACUS_DEFAULT_ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def install_lean_what_if() -> None:
    """(1) Load only Opacus' RDP analysis module (numpy + scipy.special) instead of running
    ``opacus/__init__`` (peer/training/privacy/accountant.py now does this itself, so (1) changes
    nothing any more; kept so the row measures the same thing as before). (2), functional SGD
    instead of a torch.optim optimizer (which imports torch._dynamo), is what the trainer
    itself does now (peer/training/optim.py), so the row differs from ``cnn_shard`` only by
    (1). Both leave the arithmetic unchanged."""
    import importlib.util
    import types

    spec = importlib.util.find_spec("opacus")  # locates the package; does not import it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("opacus is not installed")
    rdp_file = Path(spec.submodule_search_locations[0]) / "accountants" / "analysis" / "rdp.py"
    rdp_spec = importlib.util.spec_from_file_location("opacus.accountants.analysis.rdp",
                                                      rdp_file)
    assert rdp_spec is not None and rdp_spec.loader is not None
    rdp = importlib.util.module_from_spec(rdp_spec)
    rdp_spec.loader.exec_module(rdp)
    packages = {name: types.ModuleType(name) for name in
                ("opacus", "opacus.accountants", "opacus.accountants.analysis",
                 "opacus.accountants.utils")}
    for name, module in packages.items():
        if name != "opacus.accountants.utils":
            module.__path__ = []  # a package, so its submodules resolve from sys.modules

    class RDPAccountant:  # only the constant peer/training/privacy/accountant.py reads
        DEFAULT_ALPHAS = OPACUS_DEFAULT_ALPHAS

    def get_noise_multiplier(**_kwargs: Any) -> float:
        raise RuntimeError("what-if run: configure noise_multiplier, not target_epsilon")

    packages["opacus.accountants"].RDPAccountant = RDPAccountant  # type: ignore[attr-defined]
    packages["opacus.accountants.utils"].get_noise_multiplier = (  # type: ignore[attr-defined]
        get_noise_multiplier)
    sys.modules.update(packages)
    sys.modules["opacus.accountants.analysis.rdp"] = rdp


def child_main(args: argparse.Namespace) -> None:
    what, config = args.child, args.config
    if what == "lean_peer_run":
        install_lean_what_if()
        from peer.cli import main as peer_main

        raise SystemExit(peer_main(["run", "--config", config]))
    if what == "import":
        figures = child_import(config)
    elif what == "lean_floor":
        figures = child_lean_floor(config, args.rounds, args.steps)
    elif what == "peer_training":
        figures = child_peer_training(config, args.rounds, args.steps, args.data)
    else:
        raise SystemExit(f"unknown child kind {what!r}")
    figures["peak_rss_mb"] = round(peak_rss_mb(), 1)
    figures["modules_loaded"] = len(sys.modules)
    print("RESULT " + json.dumps(figures), flush=True)


# ---------------------------------------------------------------------------------- parent
def run_child(what: str, config: str, extra: list[str], timeout_s: float) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter and return its row."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    command = [sys.executable, str(Path(__file__).resolve()), "--child", what,
               "--config", config, *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                               env=env, cwd=REPO, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    row: dict[str, Any] = {"config": config, "what": what}
    result_lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode != 0 or not result_lines:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
        row["error"] = " | ".join(tail) or f"exit code {completed.returncode}"
        return row
    row.update(json.loads(result_lines[-1].removeprefix("RESULT ")))
    row["process_cpu_s"] = round((after.ru_utime + after.ru_stime)
                                 - (before.ru_utime + before.ru_stime), 2)
    row["wall_s"] = round(time.monotonic() - started, 2)
    return row


def fashion_mnist_dir() -> Path | None:
    for directory in FASHION_MNIST_DIRS:
        if (directory / "train-images-idx3-ubyte.gz").is_file():
            return directory
    return None


def write_shard(directory: Path, out: Path) -> None:
    """A 6 000-example Fashion-MNIST shard as .npz, as a fleet operator would hand a device."""
    import numpy as np

    from peer.training.data import load_train_source

    train = load_train_source(f"fashion-mnist:{directory}")
    chosen = np.random.default_rng(0).choice(len(train.y), SHARD_EXAMPLES, replace=False)
    # Images keep their [N, 1, 28, 28] shape: the CNN needs it, and the table loader keeps it.
    # num_classes: classes 0..9 and features as stored (pixels / 255), public constants.
    np.savez(out, x=train.x[chosen], y=train.y[chosen], num_classes=np.int64(train.num_classes))


# --quick keeps the rows that carry the budget (< 60 s on a loaded 2-core machine).
QUICK_IMPORTS = ("net_stack", "torch", "torch+opacus")
QUICK_LEAN = ("cnn",)


def plan(args: argparse.Namespace, workdir: Path) -> list[tuple[str, str, list[str]]]:
    """(what, config, child arguments) of every per-process row, in order."""
    rounds, steps = str(args.rounds), str(args.steps)
    imports = QUICK_IMPORTS if args.quick else tuple(IMPORT_SETS)
    runs: list[tuple[str, str, list[str]]] = [("import", name, []) for name in imports]
    runs += [("lean_floor", config, ["--rounds", rounds, "--steps", steps])
             for config in (QUICK_LEAN if args.quick else ("cnn", "cnn+optim", "mlp"))]
    fmnist = fashion_mnist_dir()
    if fmnist is not None:
        if not args.quick:
            runs.append(("peer_training", "cnn", ["--rounds", rounds, "--steps", steps,
                                                  "--data", f"fashion-mnist:{fmnist}"]))
        shard = workdir / "fmnist-shard.npz"
        write_shard(fmnist, shard)
        runs.append(("peer_training", "cnn_shard",
                     ["--rounds", rounds, "--steps", steps, "--data", f"npz:{shard}"]))
    else:
        print("Fashion-MNIST not found: skipping the CNN rows", file=sys.stderr)
    runs.append(("peer_training", "mlp", ["--rounds", rounds, "--steps", steps,
                                          "--data", "digits"]))
    return runs + after_plan(args, workdir)


def after_plan(args: argparse.Namespace, workdir: Path) -> list[tuple[str, str, list[str]]]:
    """The rows with the ledger's epsilon table (``+table``) and the whole small-device
    profile (``+small``), beside the rows above in the same run; the scatter model on the
    shard, features included, as it stands and under the profile."""
    import importlib.util

    rounds, steps = str(args.rounds), str(args.steps)
    common = ["--rounds", rounds, "--steps", steps]
    shard = workdir / "fmnist-shard.npz"
    runs: list[tuple[str, str, list[str]]] = []
    if shard.exists():
        runs += [("peer_training", config, [*common, "--data", f"npz:{shard}"])
                 for config in ("cnn_shard+table", "cnn_shard+small")]
        if not args.quick:
            fmnist = fashion_mnist_dir()
            runs.append(("peer_training", "cnn+small",
                         [*common, "--data", f"fashion-mnist:{fmnist}"]))
            if importlib.util.find_spec("kymatio") is not None:
                runs += [("peer_training", config, [*common, "--data", f"npz:{shard}"])
                         for config in ("scatter_shard", "scatter_shard+small")]
    runs.append(("peer_training", "mlp+small", [*common, "--data", "digits"]))
    return runs


def full_plan(workdir: Path) -> list[tuple[str, str, str]]:
    """(config, data spec, variant) of the whole-peer runs: the CNN on a shard as the code
    stands and with the two changes proposed earlier ("lean"), the MLP on digits; then both
    under ``[device] profile = "small"`` ("small")."""
    runs = []
    shard = workdir / "fmnist-shard.npz"
    if shard.exists():
        runs += [("cnn_shard", f"npz:{shard}", ""), ("cnn_shard", f"npz:{shard}", "lean")]
    runs.append(("mlp", "digits", ""))
    if shard.exists():
        runs.append(("cnn_shard", f"npz:{shard}", "small"))
    runs.append(("mlp", "digits", "small"))
    return runs


# ------------------------------------------------------------------ whole peer processes
def toml_text(document: dict[str, Any]) -> str:
    """A flat TOML writer for peer configs: top-level scalars, then one level of tables."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return json.dumps(str(v))  # a JSON string is a valid TOML basic string

    lines = [f"{k} = {value(v)}" for k, v in document.items() if not isinstance(v, dict)]
    for name, table in document.items():
        if isinstance(table, dict):
            lines += ["", f"[{name}]", *(f"{k} = {value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


def peer_configs(workdir: Path, broker_url: str, data_spec: str, model: str, steps: int,
                 count: int, profile: str | None = None) -> list[Path]:
    """Provision a network of ``count`` peers and write their run configs (plain loopback
    MQTT: TLS costs the peer a few MB of OpenSSL state, measured separately by nobody)."""
    import tomllib

    from peer.provision import provision

    names = [f"bench-{i}" for i in range(count)]
    network = provision("bench", names, workdir / "network", broker_url=broker_url)
    paths = []
    for files in network.peers:
        document = tomllib.loads(files.config.read_text())
        document.update(data=data_spec, announce_interval_s=5.0, silence_expiry_s=30.0,
                        status_interval_s=60.0, log_level="WARNING")
        if profile is None:  # the profile's own checkpoint interval otherwise
            document["checkpoint_interval_s"] = 60.0
        document["training"] = {"model": model, "local_steps": steps, "dp": True,
                                "noise_multiplier": 1.0, "batch_size": 64,
                                "topk_fraction": 0.01}
        # Back to back, as before pacing existed: this bench measures CPU per round.
        document["pace"] = {"budget_hours": 0.001}
        if profile is not None:
            document["device"] = {"profile": profile}
        path = files.config.with_name(f"{files.peer_id}.run.toml")
        path.write_text(toml_text(document))
        paths.append(path)
    return paths


def ledger_steps(state_dir: Path) -> int:
    try:
        return int(json.loads((state_dir / "ledger.json").read_text()).get("steps", 0))
    except (OSError, ValueError):
        return 0  # not written yet, or replaced at this very moment


# The environment docs/deploy/murmur-peer.service gives a peer (whole-peer runs use it).
UNIT_ENVIRONMENT = {"OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2",
                    "MALLOC_MMAP_THRESHOLD_": "4194304"}


def measure_full_peers(config: str, data_spec: str, steps: int, duration_s: float,
                       workdir: Path, count: int = 3, variant: str = "") -> dict[str, Any]:
    """Run ``count`` real ``murmur-peer run`` processes against a loopback Mosquitto for
    ``duration_s`` and report the first one: VmHWM, CPU per local round (everything the
    process did divided by its rounds, so sessions and networking are included)."""
    import asyncio

    import psutil

    from sim.broker import MosquittoBroker

    model = "mlp" if config == "mlp" else "cnn"
    lean = variant == "lean"
    row: dict[str, Any] = {"config": config + (f"+{variant}" if variant else ""),
                           "what": "peer_full", "peers": count}
    broker = MosquittoBroker()
    if not broker.available():
        row["error"] = "mosquitto not installed"
        return row
    asyncio.run(broker.start())
    processes: list[subprocess.Popen[bytes]] = []
    try:
        configs = peer_configs(workdir, broker.url, data_spec, model, steps, count,
                               "small" if variant == "small" else None)
        env = {**os.environ, "PYTHONPATH": str(REPO), **UNIT_ENVIRONMENT}
        for path in configs:
            command = ([sys.executable, str(Path(__file__).resolve()), "--child",
                        "lean_peer_run", "--config", str(path)] if lean else
                       [sys.executable, "-m", "peer.cli", "run", "--config", str(path)])
            processes.append(subprocess.Popen(
                command,
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE))
        watched = psutil.Process(processes[0].pid)
        state_dir = workdir / "network" / "state" / "bench-0"
        started = time.monotonic()
        first: tuple[float, int] | None = None  # (cpu seconds, steps) at the first round
        rss_samples: list[float] = []
        while time.monotonic() - started < duration_s:
            if any(p.poll() is not None for p in processes):
                break
            times = watched.cpu_times()
            cpu = times.user + times.system
            done = ledger_steps(state_dir)
            if first is None and done > 0:
                first = (cpu, done)
            rss_samples.append(watched.memory_info().rss / MB)
            time.sleep(0.5)
        exited = [p for p in processes if p.poll() is not None]
        if exited:
            stderr = exited[0].stderr.read().decode(errors="replace") if exited[0].stderr else ""
            row["error"] = f"a peer exited early: {stderr.strip().splitlines()[-1:]}"
            return row
        with open(f"/proc/{watched.pid}/status") as status:
            hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        times = watched.cpu_times()
        cpu_end, steps_end = times.user + times.system, ledger_steps(state_dir)
        row.update(
            peak_rss_mb=round(hwm / 1024.0, 1),
            rss_steady_median_mb=round(statistics.median(rss_samples[len(rss_samples) // 2:]),
                                       1) if rss_samples else None,
            rounds=steps_end // steps,
            steps_per_round=steps,
            process_cpu_s=round(cpu_end, 2),
            wall_s=round(time.monotonic() - started, 1),
        )
        if first is not None and steps_end > first[1]:
            row["cpu_s_per_round"] = round((cpu_end - first[0]) / ((steps_end - first[1])
                                                                   / steps), 3)
            row["startup_cpu_s"] = round(first[0], 2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        asyncio.run(broker.close())
    return row


# (field, format, width); rss_after_* show where a process's memory went, phase by phase.
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("what", "{}", 15), ("config", "{}", 19), ("peak_rss_mb", "{:.0f}", 11),
    ("cpu_s_per_round", "{:.3f}", 15), ("rss_after_imports_mb", "{:.0f}", 20),
    ("rss_after_data_mb", "{:.0f}", 17), ("rss_after_trainer_mb", "{:.0f}", 20),
    ("rss_after_rounds_mb", "{:.0f}", 19),
)


def print_table(rows: list[dict[str, Any]], write: Callable[[str], None] = print,
                header: bool = True) -> None:
    if header:
        write("  ".join(f"{name:>{width}}" for name, _fmt, width in COLUMNS))
    for row in rows:
        cells = []
        for name, fmt, width in COLUMNS:
            value = row.get(name)
            cells.append(f"{fmt.format(value) if value is not None else '-':>{width}}")
        line = "  ".join(cells)
        if "error" in row:
            line += f"  ERROR: {row['error']}"
        write(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds (< 60 s in total)")
    parser.add_argument("--rounds", type=int, default=None, help="local rounds per config")
    parser.add_argument("--steps", type=int, default=None, help="DP-SGD steps per round")
    parser.add_argument("--out", type=Path, default=None, help="write rows as JSON here")
    parser.add_argument("--full-seconds", type=float, default=None,
                        help="how long the whole-peer runs last (0: skip them)")
    parser.add_argument("--only", action="append", default=None, metavar="CONFIG",
                        help="run only rows with this config (or what:config) label; repeatable")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    if args.steps is None:
        args.steps = 5 if args.quick else 20
    if args.full_seconds is None:
        args.full_seconds = 0.0 if args.quick else 60.0
    if args.child is not None:
        child_main(args)
        return 0

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="murmur-resource-bench-") as tmp:
        for what, config, extra in plan(args, Path(tmp)):
            if args.only is not None and not {config, f"{what}:{config}"} & set(args.only):
                continue
            rows.append(run_child(what, config, extra, timeout_s=600))
            print_table(rows[-1:], header=len(rows) == 1)
        if args.full_seconds > 0:
            for config, data_spec, variant in full_plan(Path(tmp)):
                if args.only is not None and not {config, f"peer_full:{config}"
                                                  } & set(args.only):
                    continue
                workdir = Path(tmp) / f"full-{config}-{variant or 'as-is'}"
                workdir.mkdir()
                rows.append(measure_full_peers(config, data_spec, args.steps,
                                               args.full_seconds, workdir, variant=variant))
                print_table(rows[-1:], header=False)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
