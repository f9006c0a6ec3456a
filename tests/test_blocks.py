"""Data that keeps coming: an append-only block directory with one privacy budget per block.

Real files, real torch, a real SIGKILL: blocks of the digits data are dropped into a directory
between rounds (written atomically, like a device would), and the trainer's per-block ledgers
are checked on disk and after a restart.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from peer.errors import BudgetExhaustedError
from peer.training.block_ledger import (
    BLOCKS_FORMAT,
    BlockEntry,
    BlockFile,
    BlockLedgers,
)
from peer.training.block_schedule import NoBlockReadyError
from peer.training.blocks import (
    BlockChangedError,
    BlockSource,
    SourceNotBoundError,
    open_block_source,
    template_dataset,
)
from peer.training.checkpoint import load_checkpoint
from peer.training.data import DataError, Dataset
from peer.training.ledger import LedgerError, PrivacyLedger
from peer.training.trainer import LocalTrainer, TrainerConfig
from tests.conftest import run_child_and_kill

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

MIN_RECORDS = 300
BUDGET = 7.0
# sigma 1, q = 64/404, 10 steps a round: epsilon 4.2, 5.4, 6.4 after rounds 1-3 and 7.3 after
# a 4th, so a block of 404 records affords exactly 3 rounds under a budget of 7.
CONFIG = TrainerConfig(model="mlp", local_steps=10, noise_multiplier=1.0, budget_epsilon=BUDGET,
                       min_block_records=MIN_RECORDS, share="delta", lr=0.5, momentum=0.5)


def write_npz(directory: Path, name: str, x: np.ndarray, y: np.ndarray) -> Path:
    """Write like a device: a ``.part`` name first, then an atomic rename."""
    final = directory / name
    partial = directory / f"{name}.part"
    with partial.open("wb") as handle:
        np.savez(handle, x=x, y=y)
    os.replace(partial, final)
    return final


def chunk(ds: Dataset, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    return ds.x[start:stop], ds.y[start:stop]


def flat(trainer: LocalTrainer) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])


def status_by_id(trainer: LocalTrainer) -> dict[int, tuple[int, float, bool]]:
    return {s.block_id: (s.steps, s.epsilon, s.retired) for s in trainer.blocks_status()}


def block_trainer(train: Dataset, holdout: Dataset, blocks_dir: Path, state_dir: Path | None,
                  config: TrainerConfig = CONFIG) -> LocalTrainer:
    source = open_block_source(blocks_dir, config.min_block_records)
    template = template_dataset(train.input_shape, train.num_classes)
    return LocalTrainer(config, template, holdout, state_dir, source)


# --------------------------------------------------------------------------- the source
def test_temp_files_are_ignored_and_small_files_wait(tmp_path: Path, digits) -> None:
    train, _, _ = digits
    source = BlockSource(tmp_path, min_block_records=100)
    source.bind(train.input_shape, train.num_classes)
    # Writes in progress and hidden files are not data, whatever they hold.
    for name in ("a.npz.tmp", "b.npz.part", ".c.npz"):
        with (tmp_path / name).open("wb") as handle:
            np.savez(handle, x=train.x[:200], y=train.y[:200])
    write_npz(tmp_path, "001.npz", *chunk(train, 0, 60))
    poll = source.poll(BlockLedgers())
    assert poll.new_blocks == [] and source.pending_records == 60 and source.refused == {}
    # A second small file: 60 + 30 records is still below 100; a third one completes a block.
    write_npz(tmp_path, "002.npz", *chunk(train, 60, 90))
    assert source.poll(BlockLedgers()).new_blocks == [] and source.pending_files == 2
    write_npz(tmp_path, "003.npz", *chunk(train, 90, 150))
    (block,) = source.poll(BlockLedgers()).new_blocks
    assert (block.block_id, block.records) == (1, 150)
    assert [f.name for f in block.files] == ["001.npz", "002.npz", "003.npz"]
    digest = hashlib.sha256((tmp_path / "002.npz").read_bytes()).hexdigest()
    assert block.files[1] == BlockFile("002.npz", (tmp_path / "002.npz").stat().st_size, digest)
    data = source.load(block.block_id, block.files, block.records)
    np.testing.assert_array_equal(data.x, train.x[:150])
    np.testing.assert_array_equal(data.y, train.y[:150])
    assert source.pending_records == 0 and source.refusals == 0


def test_bad_files_are_refused_once_and_never_join_a_block(tmp_path: Path, digits) -> None:
    train, _, _ = digits
    source = BlockSource(tmp_path, min_block_records=10)
    source.bind(train.input_shape, train.num_classes)
    write_npz(tmp_path, "a.npz", *chunk(train, 0, 20))
    write_npz(tmp_path, "b.npz", *chunk(train, 0, 20))  # the same bytes again
    write_npz(tmp_path, "c.npz", train.x[:20, :10], train.y[:20])  # wrong record shape
    write_npz(tmp_path, "d.npz", train.x[:20], train.y[:20] + 10)  # labels outside 0..9
    write_npz(tmp_path, "e.npz", train.x[:20], train.y[:20].astype(np.float32))
    (tmp_path / "f.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "notes.txt").write_text("not data")
    (block,) = source.poll(BlockLedgers()).new_blocks
    assert [f.name for f in block.files] == ["a.npz"]
    assert sorted(source.refused) == ["b.npz", "c.npz", "d.npz", "e.npz", "f.npz", "notes.txt"]
    assert "duplicate" in source.refused["b.npz"] and "shape" in source.refused["c.npz"]
    assert source.refusals == 6
    ledgers = BlockLedgers([BlockEntry(1, 20, block.files, _ledger())])
    assert source.poll(ledgers).new_blocks == [] and source.refusals == 6  # not re-counted
    with pytest.raises(DataError, match="not found"):
        open_block_source(tmp_path / "missing", 10)


def test_block_features_are_clipped_and_classes_come_from_the_binding(tmp_path: Path,
                                                                        digits) -> None:
    """A record with huge finite features is clipped to +-10 like a table's (no input can
    overflow a per-example norm), and the class count is the bound one, never read from the
    labels: loading before :meth:`BlockSource.bind` is a typed error."""
    train, _, _ = digits
    x, y = chunk(train, 0, 20)
    x = x.copy()
    x[3] = 1e20
    x[4, :2] = (-3e38, 25.0)
    write_npz(tmp_path, "a.npz", x, y)
    unbound = BlockSource(tmp_path, min_block_records=10)
    (block,) = unbound.poll(BlockLedgers()).new_blocks
    with pytest.raises(SourceNotBoundError, match="before the source was bound"):
        unbound.load(block.block_id, block.files, block.records)
    source = BlockSource(tmp_path, min_block_records=10)
    source.bind(train.input_shape, 12)  # more classes than any label holds
    (block,) = source.poll(BlockLedgers()).new_blocks
    data = source.load(block.block_id, block.files, block.records)
    assert data.num_classes == 12 and data.y.max() < 10
    assert data.x[3].tolist() == [10.0] * x.shape[1]
    assert data.x[4, :2].tolist() == [-10.0, 10.0]
    np.testing.assert_array_equal(data.x[5:], x[5:])  # the other records as stored
    with pytest.raises(ValueError, match="feature_clip"):
        BlockSource(tmp_path, 10, feature_clip=1e5)


def test_changed_bytes_are_caught_when_a_block_is_loaded(tmp_path: Path, digits) -> None:
    train, _, _ = digits
    source = BlockSource(tmp_path, min_block_records=10)
    source.bind(train.input_shape, train.num_classes)
    path = write_npz(tmp_path, "a.npz", *chunk(train, 0, 20))
    (block,) = source.poll(BlockLedgers()).new_blocks
    before = path.stat()
    # Rewritten in place with the same size and mtime: the stat check cannot see it, the
    # digest check at load time does.
    x, y = chunk(train, 0, 20)
    x = x.copy()
    x[0, 0] += 0.5
    with path.open("r+b") as handle:
        buffer = handle.read()
        handle.seek(0)
        with (tmp_path / "scratch.npz.tmp").open("w+b") as scratch:
            np.savez(scratch, x=x, y=y)
            scratch.seek(0)
            changed = scratch.read()
        assert len(changed) == len(buffer) and changed != buffer
        handle.write(changed)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert source.poll(BlockLedgers([BlockEntry(1, 20, block.files, _ledger())])).changed == {}
    with pytest.raises(BlockChangedError, match="changed since block 1"):
        source.load(block.block_id, block.files, block.records)


# --------------------------------------------------------------------------- the trainer
def test_three_blocks_over_time_budget_per_block(tmp_path: Path, digits) -> None:
    train, holdout, _ = digits
    blocks_dir, state_dir = tmp_path / "blocks", tmp_path / "state"
    blocks_dir.mkdir()
    trainer = block_trainer(train, holdout, blocks_dir, state_dir)
    assert trainer.epsilon == 0.0 and trainer.budget_epsilon == BUDGET
    assert trainer.blocks_status() == []
    with pytest.raises(NoBlockReadyError):  # nothing yet: refused before any step
        trainer.train_round()
    initial = flat(trainer)

    # Block 1 arrives and is trained on until it cannot afford another round.
    write_npz(blocks_dir, "0001.npz", *chunk(train, 0, 404))
    rounds = []
    with pytest.raises(BudgetExhaustedError) as info:
        while True:
            rounds.append(trainer.train_round())
    assert [u.block for u in rounds] == [1, 1, 1] and info.value.waiting_records == 0
    retired_at = status_by_id(trainer)[1]
    assert retired_at[0] == 30 and retired_at[2] is True and retired_at[1] <= BUDGET
    assert trainer.epsilon == retired_at[1] == rounds[-1].epsilon
    after_block1 = flat(trainer)
    accuracy_block1 = trainer.evaluate()
    assert not torch.equal(initial, after_block1)

    # Block 2 arrives in two files: the first alone is too small and waits.
    write_npz(blocks_dir, "0002.npz", *chunk(train, 404, 654))
    with pytest.raises(NoBlockReadyError) as waiting:
        trainer.train_round()
    assert waiting.value.waiting_records == 250
    write_npz(blocks_dir, "0003.npz", *chunk(train, 654, 808))
    update = trainer.train_round()
    assert update.block == 2 and update.steps == 10
    # Block 3 arrives: the least-spent block goes first, then they take turns.
    write_npz(blocks_dir, "0004.npz", *chunk(train, 808, 1212))
    order = [update.block]
    with pytest.raises(BudgetExhaustedError):
        while True:
            order.append(trainer.train_round().block)
    assert order == [2, 3, 2, 3, 2, 3]
    status = status_by_id(trainer)
    assert status[1] == retired_at  # block 1's epsilon never grew after it retired
    assert status[2][0] == status[3][0] == 30 and status[2][2] and status[3][2]
    assert trainer.round == 9 and trainer.epsilon == max(s[1] for s in status.values())
    # The peer kept learning from the new blocks.
    assert not torch.equal(after_block1, flat(trainer))
    # Measured: about 0.76 after block 1 and 0.91 after all three (secure noise, 3 runs).
    assert trainer.evaluate() >= max(0.75, accuracy_block1 - 0.05)

    # On disk: one ledger per block with its identity, exactly as in memory.
    stored = BlockLedgers.load(state_dir / "ledger.json")
    assert json.loads((state_dir / "ledger.json").read_text())["format"] == BLOCKS_FORMAT
    assert [(e.block_id, e.ledger.steps, e.ledger.epsilon, e.retired) for e in stored] == [
        (s.block_id, s.steps, s.epsilon, s.reason) for s in trainer.blocks_status()]
    files = {f.name: f for e in stored for f in e.files}
    assert sorted(files) == ["0001.npz", "0002.npz", "0003.npz", "0004.npz"]
    for name, entry in files.items():
        assert entry.sha256 == hashlib.sha256((blocks_dir / name).read_bytes()).hexdigest()
    # A restart resumes every block, retired ones included.
    again = block_trainer(train, holdout, blocks_dir, state_dir)
    assert again.blocks_status() == trainer.blocks_status() and again.round == 9
    with pytest.raises(BudgetExhaustedError):
        again.train_round()


def test_changed_or_vanished_files_retire_their_block(tmp_path: Path, digits) -> None:
    train, holdout, _ = digits
    blocks_dir, state_dir = tmp_path / "blocks", tmp_path / "state"
    blocks_dir.mkdir()
    config = TrainerConfig(model="mlp", local_steps=2, noise_multiplier=1.0,
                           min_block_records=MIN_RECORDS, share="delta")
    trainer = block_trainer(train, holdout, blocks_dir, state_dir, config)
    write_npz(blocks_dir, "a.npz", *chunk(train, 0, 400))
    write_npz(blocks_dir, "b.npz", *chunk(train, 400, 800))
    assert [trainer.train_round().block for _ in range(2)] == [1, 2]
    spent = status_by_id(trainer)[1]
    # The device rewrites block 1's file (atomically, new content): block 1 is refused.
    write_npz(blocks_dir, "a.npz", *chunk(train, 800, 1200))
    assert [trainer.train_round().block for _ in range(3)] == [2, 2, 2]
    (one,) = [s for s in trainer.blocks_status() if s.block_id == 1]
    assert one.retired and "a.npz changed" in (one.reason or "")
    assert (one.steps, one.epsilon) == spent[:2]  # never trained on the new bytes
    on_disk = BlockLedgers.load(state_dir / "ledger.json").get(1)
    assert on_disk is not None and on_disk.retired == one.reason
    # Block 2's file vanishes: nothing is left to train on, refused before any step.
    (blocks_dir / "b.npz").unlink()
    before = flat(trainer)
    with pytest.raises(NoBlockReadyError):
        trainer.train_round()
    assert torch.equal(before, flat(trainer))
    assert "vanished" in (trainer.blocks_status()[1].reason or "")
    # The rewritten a.npz keeps its name: it never becomes a new block under a fresh budget.
    assert [s.block_id for s in trainer.blocks_status()] == [1, 2]


def test_static_data_and_a_source_together_and_old_ledger_format(tmp_path: Path,
                                                                  digits) -> None:
    train, holdout, _ = digits
    blocks_dir, state_dir = tmp_path / "blocks", tmp_path / "state"
    blocks_dir.mkdir()
    state_dir.mkdir()
    config = TrainerConfig(model="mlp", local_steps=2, noise_multiplier=1.0,
                           min_block_records=MIN_RECORDS, share="model")
    # An old peer's single ledger (format 1) becomes the static block, 0.
    old = PrivacyLedger(sigma=1.0, max_grad_norm=1.0, sample_rate=0.05, delta=1e-5)
    old.record(2000)  # epsilon about 4: far more than a few steps on a fresh block
    old.save(state_dir / "ledger.json")
    static = Dataset(train.x[:400], train.y[:400], train.num_classes, "static")
    source = open_block_source(blocks_dir, MIN_RECORDS)
    trainer = LocalTrainer(config, static, holdout, state_dir, source)
    assert status_by_id(trainer) == {0: (2000, old.epsilon, False)}
    write_npz(blocks_dir, "x.npz", *chunk(train, 400, 800))
    blocks = [trainer.train_round().block for _ in range(2)]
    assert blocks == [1, 1]  # the fresh block is the least spent
    assert trainer.epsilon == old.epsilon and trainer.can_average
    averaged = trainer.averaging_round()
    assert averaged.steps == 0 and averaged.block is None and trainer.round == 3
    assert status_by_id(trainer)[1][0] == 4  # averaging spent nothing
    stored = BlockLedgers.load(state_dir / "ledger.json", static_records=400)
    assert [e.block_id for e in stored] == [0, 1] and stored.get(0).ledger.steps == 2000


def test_without_a_source_the_ledger_file_is_unchanged(tmp_path: Path, digits) -> None:
    train, holdout, _ = digits
    config = TrainerConfig(model="mlp", local_steps=2, noise_multiplier=1.0, share="delta")
    trainer = LocalTrainer(config, train, holdout, tmp_path)
    update = trainer.train_round()
    assert update.block == 0 and trainer.epsilon == update.epsilon
    on_disk = PrivacyLedger.load(tmp_path / "ledger.json")  # format 1, as before blocks
    assert on_disk == trainer.ledger and on_disk.steps == 2
    assert not trainer.can_average
    with pytest.raises(ValueError, match="does not average"):
        trainer.averaging_round()
    assert LocalTrainer(TrainerConfig(model="mlp", dp=False), train, holdout).epsilon is None


def test_block_ledgers_format_is_checked() -> None:
    entry = BlockEntry(1, 10, (BlockFile("a.npz", 5, "0" * 64),), _ledger())
    ledgers = BlockLedgers([entry])
    assert BlockLedgers.from_json(ledgers.to_json()) == ledgers
    body = json.loads(ledgers.to_json())
    body["blocks"][0]["files"][0]["sha256"] = "xyz"
    with pytest.raises(LedgerError, match="sha256"):
        BlockLedgers.from_json(json.dumps(body))
    twice = BlockEntry(2, 10, entry.files, _ledger())
    with pytest.raises(LedgerError, match="two blocks"):
        BlockLedgers([entry, twice])
    body = json.loads(ledgers.to_json())
    body["blocks"][0]["ledger"]["steps"] = 3  # segments no longer add up
    with pytest.raises(LedgerError, match="add up"):
        BlockLedgers.from_json(json.dumps(body))


def _ledger() -> PrivacyLedger:
    return PrivacyLedger(sigma=1.0, max_grad_norm=1.0, sample_rate=0.1, delta=1e-5)


# --------------------------------------------------------------------------- SIGKILL
CHILD = """
import json, sys
from pathlib import Path
from peer.training.blocks import open_block_source, template_dataset
from peer.training.data import load_source, split_holdout
from peer.training.trainer import LocalTrainer, TrainerConfig
train, _ = load_source("digits")
train, hold = split_holdout(train, 0.1, 0)
cfg = TrainerConfig(model="mlp", local_steps=3, noise_multiplier=1.0, min_block_records=300,
                    share="delta")
source = open_block_source(Path(sys.argv[1]), cfg.min_block_records)
template = template_dataset(train.input_shape, train.num_classes)
trainer = LocalTrainer(cfg, template, hold, Path(sys.argv[2]), source)
while True:
    update = trainer.train_round()
    steps = {s.block_id: s.steps for s in trainer.blocks_status()}
    print(json.dumps({"round": update.round, "block": update.block, "steps": steps}), flush=True)
"""


def run_and_kill(blocks_dir: Path, state_dir: Path, min_rounds: int) -> list[dict]:
    """Start a training child, SIGKILL it mid-run after ``min_rounds`` rounds."""
    return run_child_and_kill(CHILD, [str(blocks_dir), str(state_dir)], min_rounds)


def test_block_ledgers_restore_exactly_after_sigkill(tmp_path: Path, digits) -> None:
    train, holdout, _ = digits
    blocks_dir, state_dir = tmp_path / "blocks", tmp_path / "state"
    blocks_dir.mkdir()
    for number, start in enumerate(range(0, 1200, 400), start=1):
        write_npz(blocks_dir, f"{number:04d}.npz", *chunk(train, start, start + 400))
    lines = run_and_kill(blocks_dir, state_dir, min_rounds=5)
    last = {int(k): v for k, v in lines[-1]["steps"].items()}
    assert sorted(last) == [1, 2, 3] and len({u["block"] for u in lines}) == 3
    stored = BlockLedgers.load(state_dir / "ledger.json")
    on_disk = {e.block_id: e.ledger.steps for e in stored}
    # Never behind what the child reported; at most one round (3 steps, one block) ahead.
    ahead = {k: on_disk[k] - last[k] for k in last}
    assert sorted(ahead.values()) in ([0, 0, 0], [0, 0, 3]), (on_disk, last)
    # The checkpoint's copy (written after the file) is the same format, at most a round behind.
    saved = load_checkpoint(state_dir / "checkpoint.pt")
    embedded = BlockLedgers.from_json(saved.ledger_json)
    assert stored.steps - embedded.steps in (0, 3) and saved.round * 3 == embedded.steps

    trainer = LocalTrainer(
        TrainerConfig(model="mlp", local_steps=3, noise_multiplier=1.0,
                      min_block_records=300, share="delta"),
        template_dataset(train.input_shape, train.num_classes), holdout, state_dir,
        open_block_source(blocks_dir, 300))
    restored = {s.block_id: (s.steps, s.epsilon, s.retired) for s in trainer.blocks_status()}
    assert restored == {e.block_id: (e.ledger.steps, e.ledger.epsilon, False) for e in stored}
    assert trainer.epsilon == stored.epsilon and trainer.round == saved.round
    update = trainer.train_round()
    after = BlockLedgers.load(state_dir / "ledger.json")
    assert after.steps == stored.steps + 3 and after.get(update.block).ledger.steps == (
        on_disk[update.block] + 3)
