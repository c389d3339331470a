"""What each training worker trains on, and in which order: the stage's settings, the step counts,
the rank's micro-batches.

The recipe (`recipe.train_loop_per_worker`) runs these on every worker; the driver checks the stage
with them; a checkpoint records the position they resume from. Pure, apart from `read_rows` (which
reads the worker's Ray dataset shard).

- `stage_plan` / `stage_train_config`: what a stage ("dpo" or "sft") trains with; the sft stage
  overrides a few fields of the train section (`train.sft`).
- `plan_schedule`: rows per rank, micro-batches per epoch (whole optimizer steps only: rows that do not
  fill one on every rank are dropped at the end of each epoch) and the total number of steps.
- `read_rows`, `micro_batches`: every worker reads all rows (a preference list is small text), puts
  them in HA-DPO's list order (`list_index`; sft rows by sample id) and takes its share of a seeded
  per-epoch permutation (`epoch_order`), as torch's DistributedSampler does. The order depends only on
  (seed, epoch, world size), so a run resumed at any step continues with exactly the batch after its
  checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from orchestrator.config import TrainConfig

STAGES = ("dpo", "sft")


@dataclass(frozen=True)
class StagePlan:
    """What a stage trains: LoRA or all weights, with which learning rate, for how long."""

    stage: str
    lora: bool
    learning_rate: float
    epochs: float
    max_steps: int | None


def stage_train_config(train: TrainConfig, stage: str) -> TrainConfig:
    """The train section as a stage sees it: the sft stage may use its own micro-batch size and checkpoint
    interval."""
    if stage != "sft":
        return train
    own = {"batch_size_per_worker": train.sft.batch_size_per_worker,
           "checkpoint_every_steps": train.sft.checkpoint_every_steps}
    update = {key: value for key, value in own.items() if value}
    return train.model_copy(update=update) if update else train


def stage_plan(train: TrainConfig, stage: str) -> StagePlan:
    """The dpo stage from the train section, the sft stage from `train.sft`."""
    if stage == "dpo":
        return StagePlan("dpo", train.lora.enabled, train.learning_rate, train.epochs, train.max_steps)
    if stage == "sft":
        sft = train.sft
        return StagePlan("sft", sft.lora, sft.learning_rate, sft.epochs, sft.max_steps)
    raise ValueError(f"unknown training stage {stage!r}; expected one of {STAGES}")


@dataclass(frozen=True)
class Schedule:
    """How many rows, micro-batches and optimizer steps each rank runs."""

    rows_per_rank: int
    micro_per_epoch: int  # micro-batches per rank per epoch that are used (whole optimizer steps)
    steps_per_epoch: int
    total_steps: int

    def position(self, step: int, accumulation: int) -> tuple[int, int]:
        """(epoch, micro-batch index in that epoch) where optimizer step `step` + 1 starts."""
        done = step * accumulation
        return done // self.micro_per_epoch, done % self.micro_per_epoch


def plan_schedule(num_rows: int, world_size: int, train: TrainConfig, plan: StagePlan) -> Schedule:
    """`plan.max_steps`, else `plan.epochs` of whole optimizer steps (at least one)."""
    rows_per_rank = num_rows // world_size
    micro_per_rank = rows_per_rank // train.batch_size_per_worker
    steps_per_epoch = micro_per_rank // train.gradient_accumulation
    if steps_per_epoch == 0:
        raise ValueError(
            f"{num_rows} training rows cannot fill one optimizer step of {world_size} workers x "
            f"{train.batch_size_per_worker} x {train.gradient_accumulation} accumulation; lower "
            "train.batch_size_per_worker / train.gradient_accumulation or scaling.num_workers")
    total = plan.max_steps or max(1, math.ceil(plan.epochs * steps_per_epoch))
    return Schedule(rows_per_rank, steps_per_epoch * train.gradient_accumulation, steps_per_epoch, total)


def read_rows(shard) -> list[dict[str, Any]]:
    """A worker's rows from its Ray Train dataset shard (every row: the dataset is not split), in order."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # one short read per worker
    rows = [dict(row) for row in shard.iter_rows()]
    # HA-DPO's list order (pope pairs, then description pairs twice: `list_index`): which pairs a seeded
    # permutation puts in one batch depends on it; rows without it (sft) by sample id
    rows.sort(key=lambda row: (row.get("list_index", -1), str(row["sample_id"])))
    return rows


def epoch_order(num_rows: int, seed: int, epoch: int) -> list[int]:
    """The permutation of the rows for `epoch`: the same on every rank, another each epoch."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_rows, generator=generator).tolist()


def micro_batches(rows, schedule: Schedule, train: TrainConfig, rank: int, world: int, start_step: int
                  ) -> Iterator[dict[str, list]]:
    """Column batches of this rank's micro-batches from `start_step` on, epoch after epoch (endless)."""
    epoch, skip = schedule.position(start_step, train.gradient_accumulation)
    size = train.batch_size_per_worker
    while True:
        order = epoch_order(len(rows), train.seed, epoch)[: schedule.rows_per_rank * world]
        mine = order[rank::world]
        for micro in range(skip, schedule.micro_per_epoch):
            chunk = [rows[i] for i in mine[micro * size:(micro + 1) * size]]
            yield {key: [row[key] for row in chunk] for key in chunk[0]}
        epoch, skip = epoch + 1, 0
