"""The HA-DPO training recipe: what every Ray Train worker runs, readable top to bottom.

`train_loop_per_worker(config)` is given by `trainer.run_training` to a `TorchTrainer`. Ray Train has
already started the process group (gloo on CPU, NCCL on GPU) and set RANK / LOCAL_RANK / WORLD_SIZE;
this file only does the training:

    setup: model -> (LoRA) -> reference -> this rank's share of the data -> optimizer + schedule
           -> DeepSpeed engine or DDP -> restore the last checkpoint if Ray Train hands one over
    loop:  collate -> forward policy -> reference log-probs -> loss -> backward -> step
           -> log (rank 0) -> checkpoint (all ranks report)

Supports
- stage "dpo": DPO with the sigmoid (HA-DPO; cDPO with `label_smoothing`), robust DPO, IPO
  (length-normalised, as TRL) or hinge loss, optional `sft_gamma` LM term on the chosen answers; stage "sft": supervised warm-up (full fine-tune by default, see `train.sft`).
- LoRA (peft) on the language model's linear layers only, chosen by a regex on module names, so the
  vision tower's own q/k/v projections, the projector and lm_head are never adapted. The vision tower
  and projector are frozen in every mode.
- Reference log-probs: the same model with its adapters disabled (exact, no extra memory); without
  LoRA, a frozen deep copy made before training.
- DeepSpeed ZeRO 0/1/2/3 (bf16 on GPU, fp32 on CPU with torch AdamW so nothing is compiled for the
  optimizer), or plain DDP (`ray.train.torch.prepare_model`) when `train.deepspeed.enabled` is false;
  gradient accumulation, grad-norm clipping, cosine / linear / constant schedule with warmup ratio,
  gradient checkpointing.
- In a sweep trial, every `tune.eval_every_steps` steps: the sweep's objective on a fixed POPE subset,
  scored by the workers with the policy in memory and reported with that step (`probe_objective`).
- Checkpoints every `checkpoint_every_steps` and at the end, reported from all ranks. Each holds
  `adapter/` (peft `save_pretrained`, LoRA weights only, gathered under ZeRO-3) or `model/` (a full HF
  folder with the processor), `trainer_state.pt` (step, data position, and for DDP the optimizer and
  schedule), `rng/rank<k>.pt`, and for DeepSpeed `deepspeed/` (`engine.save_checkpoint`: optimizer,
  schedule and the trainable weights of every rank; frozen weights are left out).

Assumptions and limits (stated, not hidden)
- Data: the preference list is small text (16K pairs for HA-DPO), so each worker reads all rows of
  the (unsplit) dataset, puts them in HA-DPO's list order (`list_index`; sft rows by sample_id) and
  takes its share of a seeded per-epoch permutation, as torch's DistributedSampler does. The order therefore depends only on (seed, epoch, world size),
  and a resumed run continues with exactly the batch after its checkpoint. Images are decoded in the
  loop, one micro-batch ahead on a background thread. Rows that do not fill a whole optimizer step on
  every rank are dropped at the end of each epoch.
- A run resumes only the same setup: a checkpoint from another number of workers (the data order and
  ZeRO partitions depend on it), another engine / ZeRO stage or another LoRA shape is refused with a
  message; hyper-parameters such as max_steps or the learning rate may change between runs.
- A worker that dies right after a report may take that report's checkpoint with it (Ray Train
  registers a checkpoint when it has collected every rank's report); training then resumes from the
  checkpoint before it.
- Without LoRA the reference is an unsharded frozen copy on every rank (fine for the tiny model; for
  a 7B full fine-tune DPO use LoRA or enough memory for a second copy).
- Throughput metrics count pairs (dpo) or examples (sft) of all ranks.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from orchestrator import layout
from orchestrator.config import ExperimentConfig, TrainConfig
from orchestrator.model.kernels import apply_fused_kernels, resolve_fused_kernels
from orchestrator.model.llava import LoadedLlava, load_llava
from orchestrator.model.lora import add_lora, freeze_vision, set_lora_input_casting
from orchestrator.plan import resolve_zero_stage, use_gradient_checkpointing, with_gpu_memory
from orchestrator.train import checkpoints
from orchestrator.train.engine import Engine, make_engine
from orchestrator.train.collate import Collated, collate_sft
from orchestrator.train.losses import dpo_loss, dpo_metrics, masked_nll, sft_nll
from orchestrator.train.pairs import (PackedPairs, collate_pairs, longest_row_tokens, model_inputs_for,
                                      pair_token_logps)
from orchestrator.train.tracking import Tracker
from orchestrator.files import write_json_atomic
from orchestrator.timing import process_start_time

log = logging.getLogger("hadpo.train")

STAGES = ("dpo", "sft")
DS_TAG = "state"


# ------------------------------------------------------------------------------------------------
# What a stage trains with (the sft stage overrides a few fields of the train section).


@dataclass(frozen=True)
class StagePlan:
    stage: str
    lora: bool
    learning_rate: float
    epochs: float
    max_steps: int | None


def stage_train_config(train: TrainConfig, stage: str) -> TrainConfig:
    """The train section as a stage sees it: the sft stage may use its own micro-batch size."""
    if stage == "sft" and train.sft.batch_size_per_worker:
        return train.model_copy(update={"batch_size_per_worker": train.sft.batch_size_per_worker})
    return train


def stage_plan(train: TrainConfig, stage: str) -> StagePlan:
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


# ------------------------------------------------------------------------------------------------
# The recipe.


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. `config`: experiment (dict), stage, base_model, optional step_hook."""
    import ray.train
    import ray.train.torch

    cfg = ExperimentConfig.model_validate(config["experiment"])
    plan = stage_plan(cfg.train, config["stage"])
    train = stage_train_config(cfg.train, plan.stage)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    use_ds = train.deepspeed.enabled
    bf16 = on_gpu and train.bf16
    if on_gpu:  # the recipe trains with tf32 matmuls where bf16 does not apply
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    _quiet_libraries(rank)
    lap = _Laps()

    # 1. Model (same seed on every rank, so LoRA's random init agrees) while the rows are read.
    _seed_all(train.seed)
    with ThreadPoolExecutor(max_workers=1) as reader:
        # 2. Data: this rank's share of the rows, in a seeded order (see the module docstring).
        pending_rows = reader.submit(_read_rows, ray.train.get_dataset_shard("train"))
        from transformers import LlavaForConditionalGeneration  # noqa: F401  (timed apart: seconds of imports)

        lap("import modeling")
        loaded = load_llava(config["base_model"], dtype="bfloat16" if (bf16 and use_ds) else "float32",
                            device=device, attn_implementation=cfg.model.attn_implementation)
        lap("model")
        rows = pending_rows.result()
    model = loaded.model
    model.config.use_cache = False
    kernels = apply_fused_kernels(model, resolve_fused_kernels(train.fused_kernels, on_gpu))
    if not (plan.stage == "sft" and train.sft.train_vision):
        freeze_vision(model)
    schedule = plan_schedule(len(rows), world, train, plan)
    cached_reference = None
    if plan.stage == "dpo" and config.get("reference_cache"):
        cached_reference = load_cached_reference(config["reference_cache"], rows, rank)
    lap("rows")

    # The ZeRO stage and checkpointing "auto": the planner decides for this GPU's memory (the smallest of
    # the workers') and the longest row of this data (not the max_length cap).
    planned, zero_reason, checkpointing = plan_stage(cfg, train, plan, rows, loaded, config["base_model"],
                                                      device, world)
    train = train.model_copy(update={"deepspeed": planned.train.deepspeed})
    lap("plan")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = None
    if plan.lora:
        model = add_lora(model, train)
        if bf16 and not use_ds:  # fp32 adapters under bf16 autocast (DeepSpeed's bf16 casts the adapters)
            set_lora_input_casting(model, False)
    elif plan.stage == "dpo" and cached_reference is None:  # a frozen copy only where the cache cannot serve
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    _seed_all(train.seed + 1000 * (rank + 1))  # dropout etc. differ per rank from here on
    lap("lora" if plan.lora else "reference")

    # 3. Optimizer, schedule, engine.
    if use_ds:
        import deepspeed  # noqa: F401  (timed apart from the engine's own set-up)

        lap("import deepspeed")
    engine = make_engine(model, trainable, train, learning_rate=plan.learning_rate, total_steps=schedule.total_steps,
                         use_ds=use_ds, on_gpu=on_gpu, bf16=bf16, world_size=world,
                         stage_from_config=cfg.train.deepspeed.zero_stage != "auto")
    lap("engine")

    # 4. Resume from the checkpoint Ray Train hands over (a restart inside this run, or a re-run whose
    # Ray record agrees with the disk), else from the newest complete folder the driver found on disk.
    start_step, last_report = 0, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(config["resume_from"])
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start_step, last_report = restore_checkpoint(Path(folder), engine, plan, train, rank)
        if rank == 0:
            log.info("resumed %s from step %d of %d", plan.stage, start_step, schedule.total_steps)
    lap("restore")
    tracker = Tracker(cfg, plan.stage, resume_step=start_step, enabled=rank == 0)
    lap("tracker")
    step_hook: Callable[[int, int], None] | None = config.get("step_hook")
    probe: dict[str, Any] | None = config.get("probe")  # a sweep's objective on a POPE subset (eval/probe.py)
    if rank == 0:
        log.info("%s: %d rows, %d workers x %d x %d accumulation, %d steps/epoch, %d steps (from %d), %s, "
                 "gradient checkpointing %s%s", plan.stage, len(rows), world, train.batch_size_per_worker,
                 train.gradient_accumulation, schedule.steps_per_epoch, schedule.total_steps, start_step,
                 engine.describe() + ("" if zero_reason == "set in the config" else f" ({zero_reason})"),
                 ("on" if checkpointing else "off") + f", fused kernels {kernels}",
                 "" if plan.stage != "dpo" else f", {'packed' if train.prefix_sharing else 'plain'} pairs, "
                 f"reference {'cached' if cached_reference else 'in the loop'}")
        log.info("setup %s", lap)
    clock = _StepClock(layout.timings_path(cfg.run_dir, plan.stage), lap, enabled=rank == 0,
                       engine=engine.describe(), engine_reason=zero_reason)

    # 5. The loop: micro-batches from the resume position; an optimizer step every `accumulation`.
    step = start_step
    window = _Window()
    started = time.time()
    batches = _prefetch(_micro_batches(rows, schedule, train, rank, world, start_step),
                        lambda batch: collate_stage(batch, loaded, plan.stage, cfg, cached_reference))
    last_good: Collated | None = None
    for inputs in batches:
        if step >= schedule.total_steps:
            break
        weight = 1.0
        if inputs is None:  # every row's image failed to load: run the last batch with weight 0
            inputs, weight = last_good, 0.0
            if inputs is None:
                raise RuntimeError("the first micro-batch has no loadable image; see the warnings above")
        last_good = inputs

        with engine.accumulating():
            loss, metrics = compute_loss(engine, reference, inputs, plan.stage, train, device, bf16,
                                         cfg.model.attn_implementation)
            engine.backward(loss * weight)
        window.add(metrics, inputs, weight)
        if not engine.step():
            continue
        step += 1
        clock.step(step)

        if step_hook is not None:
            step_hook(step, rank)
        is_last = step >= schedule.total_steps
        log_now = step % train.log_every_steps == 0 or is_last
        save_now = step % train.checkpoint_every_steps == 0 or is_last
        probe_now = probe is not None and step % probe["every"] == 0
        if not (log_now or save_now or probe_now):
            continue
        report = window.reduce(world) if (log_now or save_now) else {}  # all ranks reach here at the same steps
        report.update(step=step, epoch=step / schedule.steps_per_epoch, lr=engine.lr(), grad_norm=engine.grad_norm(),
                      resumed_from_step=start_step, time=time.time())
        if probe_now:
            report.update(probe_objective(engine, loaded, probe, rank, world, bf16, step))
        if (log_now or probe_now) and rank == 0:
            tracker.log(step, report)
            if log_now:
                log.info(_progress_line(plan.stage, step, schedule.total_steps, report, started, start_step))
            if probe_now:
                log.info("[%s] step %d: objective %.4f on the probe subset", plan.stage, step, report["objective"])
            clock.write()
        if save_now:
            save_checkpoint(engine, loaded, plan, step, schedule, train, rank, report, config.get("run_path"))
        else:
            ray.train.report(report)

    batches.close()
    if step == start_step:  # the run was already complete: report its state again as this run's result
        save_checkpoint(engine, loaded, plan, step, schedule, train, rank,
                        {**last_report, "step": step, "resumed_from_step": start_step, "time": time.time()},
                        config.get("run_path"))
    clock.write()
    tracker.close()


# ------------------------------------------------------------------------------------------------
# Setup helpers.


def _quiet_libraries(rank: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for name in ("DeepSpeed", "deepspeed", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class _Laps:
    """Wall time of the setup phases, for the rank-0 log line ("setup 6.6s: model 3.0s, ...")."""

    def __init__(self):
        self.marks = [("start", time.time())]

    def as_list(self) -> list[list]:
        """[phase, seconds] in order."""
        return [[name, round(t - prev, 3)] for (_, prev), (name, t) in zip(self.marks, self.marks[1:])]

    def __call__(self, name: str) -> None:
        self.marks.append((name, time.time()))

    def __str__(self) -> str:
        parts = [f"{name} {t - prev:.1f}s" for (_, prev), (name, t) in zip(self.marks, self.marks[1:])]
        return f"{self.marks[-1][1] - self.marks[0][1]:.1f}s: " + ", ".join(parts)


class _StepClock:
    """Rank 0's record of where a run's time went, in ``<run_dir>/train/<stage>_timings.json``: when the
    worker process started, the setup phases, when each optimizer step ended, the peak GPU memory.
    `hadpo run` keeps it with the run; benchmarks/pipeline.py reads start-up and steady speed from it."""

    def __init__(self, path: Path, laps: _Laps, enabled: bool, engine: str = "", engine_reason: str = ""):
        self.path, self.laps, self.enabled = path, laps, enabled
        self.engine, self.engine_reason = engine, engine_reason
        self.process_started = process_start_time()
        self.step_ends: list[tuple[int, float]] = []

    def step(self, step: int) -> None:
        if not self.enabled:
            return
        self.step_ends.append((step, time.time()))
        if len(self.step_ends) == 1 and self.process_started:
            log.info("first step done %.1fs after the worker process started (setup %.1fs of it)",
                     self.step_ends[0][1] - self.process_started,
                     self.laps.marks[-1][1] - self.laps.marks[0][1])

    def write(self) -> None:
        if not self.enabled:
            return
        peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_initialized() else None
        write_json_atomic(self.path, {
            "process_started": self.process_started, "setup_started": self.laps.marks[0][1],
            "setup": self.laps.as_list(), "step_ends": self.step_ends, "peak_allocated_gb": peak,
            "engine": self.engine, "engine_reason": self.engine_reason})


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def gpu_memory_gib(device: torch.device, world: int) -> float | None:
    """GiB of this worker's GPU, the smallest over the workers (they must agree on a plan); None on CPU."""
    if device.type != "cuda":
        return None
    total = torch.tensor([torch.cuda.get_device_properties(device).total_memory / 2**30], dtype=torch.float64)
    if world > 1 and dist.is_initialized():
        backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        total = total.to(backend_device)
        dist.all_reduce(total, op=dist.ReduceOp.MIN)
    return float(total.item())


def plan_stage(cfg: ExperimentConfig, train: TrainConfig, plan: StagePlan, rows, loaded: LoadedLlava,
               base_model: str, device: torch.device, world: int) -> tuple[ExperimentConfig, str, bool]:
    """The run as the planner resolves it on the workers: (config with the ZeRO stage chosen, why,
    gradient checkpointing on?). "auto" settings are planned for this GPU's memory and the longest row."""
    on_gpu = device.type == "cuda"
    stage_lora = train.lora.model_copy(update={"enabled": plan.lora})
    planned = cfg.model_copy(update={"train": train.model_copy(update={"lora": stage_lora}),
                                     "model": cfg.model.model_copy(update={"path": base_model})})
    planned = with_gpu_memory(planned, gpu_memory_gib(device, world))
    needs_rows = on_gpu and "auto" in (train.gradient_checkpointing, train.deepspeed.zero_stage)
    longest = longest_row_tokens(rows, loaded, cfg.model.train_template, train.max_length,
                                 ("chosen", "rejected") if plan.stage == "dpo" else ("response",)) \
        if needs_rows else None
    planned, reason = resolve_zero_stage(planned, longest) if train.deepspeed.enabled else (planned, "")
    return planned, reason, use_gradient_checkpointing(planned, longest)


# ------------------------------------------------------------------------------------------------
# Forward and loss.


def collate_stage(batch: dict[str, list], loaded: LoadedLlava, stage: str, cfg: ExperimentConfig,
                  cached_reference: dict[str, tuple[float, float]] | None) -> Collated | PackedPairs | None:
    """A micro-batch's model inputs; DPO pairs packed or plain, with their cached reference log-probs."""
    train = cfg.train
    if stage == "sft":
        return collate_sft(batch, loaded, cfg.model.train_template, train.max_length)
    inputs = collate_pairs(batch, loaded, cfg.model.train_template, train.max_length, packed=train.prefix_sharing,
                           pad_to_multiple_of=train.pad_to_multiple_of)
    if inputs is not None and cached_reference is not None:
        values = torch.tensor([cached_reference[sample_id] for sample_id in inputs.sample_ids], dtype=torch.float32)
        inputs.reference = (values[:, 0], values[:, 1])
    return inputs


def load_cached_reference(path: str, rows: list[dict[str, Any]], rank: int) -> dict[str, tuple[float, float]] | None:
    """The cached reference log-probs for these rows, or None (in-loop reference) if any row is missing."""
    from orchestrator.train.reference_cache import open_reference_cache

    values = open_reference_cache(path).load()
    missing = [str(row["sample_id"]) for row in rows if str(row["sample_id"]) not in values]
    if missing:
        if rank == 0:
            log.warning("reference cache %s lacks %d of %d training rows (e.g. %s): computing the reference "
                        "in the loop instead", path, len(missing), len(rows), missing[:3])
        return None
    return values


def compute_loss(engine: Engine, reference, inputs: Collated | PackedPairs, stage: str, train: TrainConfig,
                 device: torch.device, bf16: bool, attn_implementation: str = "sdpa"
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch: the loss to back-propagate and its metrics (plain floats)."""
    model_inputs = model_inputs_for(inputs, device, torch.bfloat16 if bf16 else None, attn_implementation)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (bf16 and engine.ds is None) else nullcontext()
    with autocast:
        logits = engine.forward(**model_inputs, use_cache=False).logits
    if stage == "sft":
        loss = sft_nll(logits, inputs.labels.to(device), train.sft.first_token_weight)
        return loss, {"loss": loss.item(), "nll": loss.item()}

    policy = pair_token_logps(logits, inputs)
    policy_chosen, policy_rejected = policy.sums()
    if inputs.reference is not None:
        reference_chosen, reference_rejected = (values.to(device) for values in inputs.reference)
    else:
        reference_chosen, reference_rejected = reference_logps(engine, reference, inputs, model_inputs, autocast)
    # IPO's token counts come from this batch's own answers: the same tokens whose log-probs the cached
    # reference summed (the cache key fixes template and max_length), so the cache needs no counts.
    chosen_tokens, rejected_tokens = policy.token_counts()
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, train.beta, train.loss,
        train.label_smoothing, chosen_tokens, rejected_tokens)
    loss = losses.mean()
    metrics = dpo_metrics(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                          chosen_rewards, rejected_rewards)
    if train.sft_gamma > 0:
        nll = masked_nll(policy.chosen, policy.chosen_mask)
        loss = loss + train.sft_gamma * nll
        metrics["nll"] = nll.item()
    metrics["loss"] = loss.item()
    return loss, metrics


@torch.no_grad()
def reference_logps(engine: Engine, reference, inputs: Collated | PackedPairs, model_inputs: dict[str, Any],
                    autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of the reference: the policy with adapters disabled, or the frozen copy."""
    with autocast:
        if reference is not None:
            logits = reference(**model_inputs, use_cache=False).logits
        else:
            with engine.module.disable_adapter():
                logits = engine.module(**model_inputs, use_cache=False).logits
    return pair_token_logps(logits, inputs).sums()


def probe_objective(engine: Engine, loaded: LoadedLlava, probe: dict[str, Any], rank: int, world: int, bf16: bool,
                    step: int) -> dict[str, Any]:
    """Score the sweep's POPE subset with the policy in memory (all ranks); rank 0 gets the objective and the
    subset's POPE values (``probe/pope/...``), numbered by `evaluations` (see orchestrator/eval/probe.py)."""
    from orchestrator.eval.model_adapter import LlavaModel
    from orchestrator.eval.probe import objective_of, probe_values, score_probe

    module = engine.module
    was_training = module.training
    module.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (bf16 and engine.ds is None) else nullcontext()
    try:
        with torch.no_grad(), autocast:
            answers = score_probe(LlavaModel.from_loaded(loaded, module, probe["template"]), probe["rows"], rank,
                                  world, probe["batch_size"])
    finally:
        module.train(was_training)
    if answers is None:  # only rank 0's report reaches Tune
        return {}
    import ray.util

    values = probe_values(answers)
    # the worker group's placement group: a sweep releases it when its scheduler stops this trial (Ray Train
    # leaves that to a helper that needs the Ray dashboard, which a local Ray here runs without)
    group = ray.util.get_current_placement_group()
    return {"objective": objective_of(values, probe["metric"]), "evaluations": step // probe["every"],
            "train_placement_group": group.id.hex() if group is not None else "",
            "probe/questions": len(answers), **{f"probe/{key}": value for key, value in values.items()}}


# ------------------------------------------------------------------------------------------------
# Data: the rank's micro-batches in a seeded order, and a one-ahead prefetch of their collation.


def _read_rows(shard) -> list[dict[str, Any]]:
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # one short read per worker
    rows = [dict(row) for row in shard.iter_rows()]
    # HA-DPO's list order (pope pairs, then description pairs twice: `list_index`): which pairs a seeded
    # permutation puts in one batch depends on it; rows without it (sft) by sample id
    rows.sort(key=lambda row: (row.get("list_index", -1), str(row["sample_id"])))
    return rows


def epoch_order(num_rows: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_rows, generator=generator).tolist()


def _micro_batches(rows, schedule: Schedule, train: TrainConfig, rank: int, world: int, start_step: int
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


def _prefetch(source: Iterator[dict], collate: Callable[[dict], Collated | None]) -> Iterator[Collated | None]:
    """Collate the next micro-batch on a thread while the current one trains."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in source:
            future = pool.submit(collate, batch)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()


class _Window:
    """Metrics of the micro-batches since the last log, averaged over micro-batches and ranks."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums: dict[str, float] = {}
        self.count = 0
        self.examples = self.tokens = self.skipped = 0
        self.started = time.time()

    def add(self, metrics: dict[str, float], inputs: Collated, weight: float) -> None:
        if weight:
            for key, value in metrics.items():
                self.sums[key] = self.sums.get(key, 0.0) + value
            self.count += 1
            self.examples += inputs.num_examples
            self.tokens += inputs.num_tokens
        self.skipped += len(inputs.skipped) if weight else 0

    def reduce(self, world: int) -> dict[str, float]:
        keys = sorted(self.sums)
        values = torch.tensor([self.sums[k] for k in keys] + [self.count, self.examples, self.tokens, self.skipped],
                              dtype=torch.float64)
        if world > 1 and dist.is_initialized():
            values = _all_reduce_sum(values)
        *sums, count, examples, tokens, skipped = values.tolist()
        elapsed = max(time.time() - self.started, 1e-9)
        out = {key: total / max(count, 1) for key, total in zip(keys, sums)}
        out.update(samples_per_s=examples / elapsed, tokens_per_s=tokens / elapsed, skipped_rows=int(skipped))
        self.reset()
        return out


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    tensor = values.to(device)
    dist.all_reduce(tensor)
    return tensor.cpu()


def _progress_line(stage: str, step: int, total: int, report: dict[str, float], started: float,
                   start_step: int) -> str:
    elapsed = time.time() - started
    eta = elapsed / max(step - start_step, 1) * (total - step)
    line = f"[{stage}] step {step}/{total} | loss {report.get('loss', float('nan')):.4f}"
    if "rewards/accuracies" in report:
        line += f" | acc {report['rewards/accuracies']:.2f} | margin {report['rewards/margins']:.3f}"
    line += f" | lr {report['lr']:.2e} | {report['samples_per_s']:.2f} samples/s"
    return line + f" | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"


# ------------------------------------------------------------------------------------------------
# Checkpoints.


def trainable_state(engine: Engine) -> dict[str, torch.Tensor] | None:
    """The trainable parameters (LoRA weights, or the whole trained model) as full tensors on rank 0.

    Must be called on every rank: under ZeRO-3 the partitions are gathered first. Returns None on
    ranks other than 0.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    module = engine.module
    if engine.zero_stage == 3:
        import deepspeed

        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not _is_peft(module):
            return engine.ds._zero3_consolidated_16bit_state_dict()
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in named} if rank == 0 else None
    if rank != 0:
        return None
    if _is_peft(module):
        return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _shape(train: TrainConfig, plan: StagePlan, engine: Engine) -> dict[str, Any]:
    """What a checkpoint can only be resumed with: the engine and the LoRA shape."""
    lora = train.lora
    return {"engine": engine.describe(),
            "lora": [lora.rank, lora.alpha, sorted(lora.target_modules)] if plan.lora else None}


def _is_peft(module) -> bool:
    return hasattr(module, "peft_config")


def save_checkpoint(engine: Engine, loaded: LoadedLlava, plan: StagePlan, step: int, schedule: Schedule,
                    train: TrainConfig, rank: int, metrics: dict[str, Any], run_path: str | None = None) -> None:
    """Write this rank's part of a checkpoint into a temp folder and report it (all ranks).

    The folder is named by its step (`checkpoints.checkpoint_dir_name`); once every rank has reported
    it, rank 0 marks it complete in the run folder `run_path` (see `orchestrator.train.checkpoints`).
    """
    import ray.train

    with tempfile.TemporaryDirectory(prefix="hadpo-ckpt-") as tmp:
        folder = Path(tmp)
        weights = trainable_state(engine)
        if engine.ds is not None:
            engine.ds.save_checkpoint(str(folder / "deepspeed"), tag=DS_TAG, exclude_frozen_parameters=True)
        (folder / "rng").mkdir()
        torch.save(_rng_state(), folder / "rng" / f"rank{rank}.pt")
        if rank == 0:
            if plan.lora:
                engine.module.save_pretrained(str(folder / "adapter"), state_dict=weights)
            else:
                engine.module.save_pretrained(str(folder / "model"), state_dict=weights)
                loaded.processor.save_pretrained(str(folder / "model"))
            epoch, micro = schedule.position(step, train.gradient_accumulation)
            state = {"step": step, "stage": plan.stage, "lora": plan.lora, "shape": _shape(train, plan, engine),
                     "total_steps": schedule.total_steps,
                     "epoch": epoch, "micro_batch_in_epoch": micro, "world_size": dist.get_world_size()
                     if dist.is_initialized() else 1, "metrics": dict(metrics)}
            if engine.ds is None:
                state.update(optimizer=engine.optimizer.state_dict(), scheduler=engine.scheduler.state_dict())
            torch.save(state, folder / "trainer_state.pt")
        name = checkpoints.checkpoint_dir_name(step)
        ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
    if run_path:
        world = dist.get_world_size() if dist.is_initialized() else 1
        checkpoints.mark_complete(run_path, name, step, rank, world)


def restore_checkpoint(folder: Path, engine: Engine, plan: StagePlan, train: TrainConfig, rank: int
                       ) -> tuple[int, dict[str, Any]]:
    """Load weights, optimizer, schedule and RNG from a checkpoint folder.

    Returns the step it holds and the metrics reported with it.
    """
    state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=False)
    if state["stage"] != plan.stage or state["lora"] != plan.lora:
        raise ValueError(f"{folder}: checkpoint of stage {state['stage']!r} (lora={state['lora']}) cannot resume "
                         f"stage {plan.stage!r} (lora={plan.lora}); use another run name")
    shape = _shape(train, plan, engine)
    if state.get("shape", shape) != shape:
        raise ValueError(f"{folder}: checkpoint trained {state['shape']}, this run asks for {shape}; a run name "
                         "resumes only the same setup: use another experiment name or resume=False")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if state.get("world_size", world) != world:
        raise ValueError(f"{folder}: checkpoint written by {state['world_size']} workers cannot resume on {world}; "
                         "resume with the same scaling.num_workers or use another run name")
    if engine.ds is not None:
        path, _ = engine.ds.load_checkpoint(str(folder / "deepspeed"), tag=DS_TAG, load_module_strict=False)
        if path is None:
            raise RuntimeError(f"{folder}: DeepSpeed could not load its checkpoint")
    else:
        _load_weights(folder, engine.module, plan)
        engine.optimizer.load_state_dict(state["optimizer"])
        engine.scheduler.load_state_dict(state["scheduler"])
    rng_file = folder / "rng" / f"rank{rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    if plan.lora:
        _check_restored_adapter(folder / "adapter", engine)
    return int(state["step"]), dict(state.get("metrics", {}))


def _load_weights(folder: Path, module, plan: StagePlan) -> None:
    from safetensors.torch import load_file

    if plan.lora:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(module, load_file(str(folder / "adapter" / "adapter_model.safetensors")))
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"{folder}: unexpected adapter keys {result.unexpected_keys[:5]}")
        return
    # transformers may rename keys on save (checkpoint conversion), so read the folder back the way it
    # was written and copy its weights in, rather than loading the raw safetensors.
    saved = type(module).from_pretrained(str(folder / "model"), dtype=next(module.parameters()).dtype,
                                         local_files_only=True)
    module.load_state_dict(saved.state_dict())


def _check_restored_adapter(adapter_dir: Path, engine: Engine) -> None:
    """Guard against a silently wrong resume: the live LoRA weights must equal the saved adapter."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    current = trainable_state(engine)
    if current is None:
        return
    live = get_peft_model_state_dict(engine.module, state_dict=current)
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    worst = max((live[k].float() - saved[k].float()).abs().max().item() for k in saved)
    if worst > 1e-3 * max(1.0, max(v.float().abs().max().item() for v in saved.values())):
        raise RuntimeError(f"{adapter_dir}: restored LoRA weights differ from the checkpoint (max |diff| {worst})")


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def stage_output_dir(checkpoint_dir: str, lora: bool) -> str:
    """The folder inside a checkpoint that holds the stage's weights (`adapter` or `model`)."""
    return os.path.join(checkpoint_dir, "adapter" if lora else "model")
