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
  (peer.data.load_source, split_holdout, peer.trainer.LocalTrainer with a state directory),
  running N local rounds: ``cnn`` on the full Fashion-MNIST training set, ``cnn_shard`` on a
  6 000-example shard given as an .npz file (what one device of a fleet would hold), ``mlp``
  on scikit-learn's digits;
* ``peer_full``       -- a whole ``murmur-peer run`` process (transport, membership,
  sessions, trainer) with the CNN against a loopback Mosquitto, next to two more peers so that
  sessions happen; sampled with psutil while it runs.

Usage::

    python bench/resource_bench.py [--quick] [--rounds N] [--out results.json]
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
    "peer_process": "import peer.cli, peer.config, peer.node, peer.data, peer.trainer",
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

    from peer.dpsgd import DPSGDStep, poisson_batch
    from peer.models import build_model

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

    from peer.data import load_source, split_holdout
    from peer.trainer import LocalTrainer, TrainerConfig

    phases = Phases()
    phases.mark("imports")
    # The same sequence as peer.config.build_peer_parts (the `murmur-peer run` path): the
    # public test split stays referenced until the trainer exists, as it does there.
    train_source, test = load_source(data_spec)
    phases.mark("data")
    train, holdout = split_holdout(train_source, 0.2, seed=0)
    model = "mlp" if config == "mlp" else "cnn"
    # DP on, as on a device: sigma 1.0, expected batch 64, 1 % top-k.
    overrides = {"model": model, "local_steps": steps_per_round, "dp": True,
                 "noise_multiplier": 1.0, "batch_size": 64, "topk_fraction": 0.01}
    known = {f.name for f in dataclasses.fields(TrainerConfig)}
    trainer_config = TrainerConfig(**{k: v for k, v in overrides.items() if k in known})
    with tempfile.TemporaryDirectory(prefix="murmur-bench-state-") as state:
        trainer = LocalTrainer(trainer_config, train, holdout, Path(state))
        phases.mark("trainer")
        del train_source, test  # build_peer_parts returns here, dropping both
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
        "train_examples": len(train.y),
        "param_count": int(trainer.param_count),
        "steps_per_round": steps_per_round,
    }


def round_figures(round_cpu: list[float]) -> dict[str, float]:
    """First round separately (it pays one-off warm-up), steady state as the median."""
    steady = round_cpu[1:] or round_cpu
    return {
        "rounds": len(round_cpu),
        "cpu_s_first_round": round(round_cpu[0], 3),
        "cpu_s_per_round": round(statistics.median(steady), 3),
    }


def child_main(args: argparse.Namespace) -> None:
    what, config = args.child, args.config
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

    from peer.data import load_source

    train, _test = load_source(f"fashion-mnist:{directory}")
    chosen = np.random.default_rng(0).choice(len(train.y), SHARD_EXAMPLES, replace=False)
    # Images keep their [N, 1, 28, 28] shape: the CNN needs it, and the table loader keeps it.
    np.savez(out, x=train.x[chosen], y=train.y[chosen])


def plan(args: argparse.Namespace, workdir: Path) -> list[tuple[str, str, list[str]]]:
    rounds, steps = str(args.rounds), str(args.steps)
    runs: list[tuple[str, str, list[str]]] = [("import", name, []) for name in IMPORT_SETS]
    runs += [("lean_floor", config, ["--rounds", rounds, "--steps", steps])
             for config in ("cnn", "cnn+optim", "mlp")]
    fmnist = fashion_mnist_dir()
    if fmnist is not None:
        runs.append(("peer_training", "cnn",
                     ["--rounds", rounds, "--steps", steps, "--data", f"fashion-mnist:{fmnist}"]))
        shard = workdir / "fmnist-shard.npz"
        write_shard(fmnist, shard)
        runs.append(("peer_training", "cnn_shard",
                     ["--rounds", rounds, "--steps", steps, "--data", f"npz:{shard}"]))
    else:
        print("Fashion-MNIST not found: skipping the CNN rows", file=sys.stderr)
    runs.append(("peer_training", "mlp", ["--rounds", rounds, "--steps", steps,
                                          "--data", "digits"]))
    return runs


COLUMNS: tuple[tuple[str, str], ...] = (
    ("what", "{}"), ("config", "{}"), ("peak_rss_mb", "{:.0f}"),
    ("cpu_s_per_round", "{:.2f}"), ("rss_after_imports_mb", "{:.0f}"),
    ("rss_after_data_mb", "{:.0f}"), ("rss_after_trainer_mb", "{:.0f}"),
)


def print_table(rows: list[dict[str, Any]], write: Callable[[str], None] = print) -> None:
    write("  ".join(f"{name:>20}" for name, _fmt in COLUMNS))
    for row in rows:
        cells = []
        for name, fmt in COLUMNS:
            value = row.get(name)
            cells.append(f"{fmt.format(value) if value is not None else '-':>20}")
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
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    if args.steps is None:
        args.steps = 5 if args.quick else 20
    if args.child is not None:
        child_main(args)
        return 0

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="murmur-resource-bench-") as tmp:
        for what, config, extra in plan(args, Path(tmp)):
            rows.append(run_child(what, config, extra, timeout_s=600))
    print_table(rows)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
