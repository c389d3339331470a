"""The HA-DPO training recipe: what every Ray Train worker runs, readable top to bottom.

`train_loop_per_worker(config)` is given by `trainer.run_training` to a `TorchTrainer`. Ray Train has
already started the process group (gloo on CPU, NCCL on GPU) and set RANK / LOCAL_RANK / WORLD_SIZE;
this file only does the training, and leaves the rest to the modules it imports:

    setup: model -> (LoRA) -> reference -> this rank's share of the data -> optimizer + schedule
           -> DeepSpeed engine or DDP -> restore the last checkpoint if Ray Train hands one over
    loop:  collate -> forward policy -> reference log-probs -> loss -> backward -> step
           -> log (rank 0) -> checkpoint (all ranks report)

    schedule.py     what a stage trains with, step counts, this rank's micro-batches in a seeded order
    engine.py       DeepSpeed (ZeRO 0-3) or DDP behind one interface; optimizer, LR schedule, ds config
    checkpoints.py  what a checkpoint holds (save / restore) and which folder a run resumes from
    losses.py, pairs.py, collate.py   the objectives, sequence log-probs and model inputs

Supports
- stage "dpo": DPO with the sigmoid (HA-DPO; cDPO with `label_smoothing`), robust DPO, IPO
  (length-normalised, as TRL) or hinge loss, optional `sft_gamma` LM term on the chosen answers;
  stage "sft": supervised warm-up (full fine-tune by default, see `train.sft`).
- LoRA (peft) on the language model's linear layers only, chosen by a regex on module names, so the
  vision tower's own q/k/v projections, the projector and lm_head are never adapted. The vision tower
  and projector are frozen in every mode.
- Every model family (`model.family`: LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL): each image counted at its own
  token count; pairs packed (`train.prefix_sharing`) only where the family's positions are 1-D, Qwen2.5-VL's
  trained as plain rows (the set-up log line says so).
- Reference log-probs: the same model with its adapters disabled (exact, no extra memory); without
  LoRA, a frozen deep copy made before training. With `train.reference_cache` they come from the cache;
  with `reference_fill: loop` the pairs it lacks are computed here in the first epoch and each rank adds
  its values to the cache at every checkpoint (so later epochs, resumed runs and other runs read them).
- DeepSpeed ZeRO 0/1/2/3 (bf16 on GPU, fp32 on CPU with torch AdamW so nothing is compiled for the
  optimizer), or plain DDP (`ray.train.torch.prepare_model`) when `train.deepspeed.enabled` is false;
  gradient accumulation, grad-norm clipping, cosine / linear / constant schedule with warmup ratio,
  gradient checkpointing.
- In a sweep trial, every `tune.eval_every_steps` steps: the sweep's objective on a fixed POPE subset,
  scored by the workers with the policy in memory and reported with that step (`probe_objective`).
- Checkpoints every `checkpoint_every_steps` and at the end, reported from all ranks: the stage's
  weights (LoRA adapter or full model), step and data position, optimizer and schedule, every rank's
  RNG (what each holds: orchestrator/train/checkpoints.py).

Assumptions and limits (stated, not hidden)
- Data: the preference list is small text (16K pairs for HA-DPO), so each worker reads all rows of
  the (unsplit) dataset, puts them in HA-DPO's list order (`list_index`; sft rows by sample_id) and
  takes its share of a seeded per-epoch permutation, as torch's DistributedSampler does
  (schedule.py). The order therefore depends only on (seed, epoch, world size), and a resumed run
  continues with exactly the batch after its checkpoint. Images are decoded in the
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
import random
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from orchestrator import layout
from orchestrator.config import ExperimentConfig, TrainConfig
from orchestrator.eval.model_adapter import VisionLanguageModel
from orchestrator.eval.probe import objective_of, probe_values, score_probe
from orchestrator.files import write_json_atomic
from orchestrator.model.kernels import (KernelWarmup, apply_fused_kernels, resolve_fused_kernels,
                                        use_cudnn_attention)
from orchestrator.model.families import FAMILIES, LoadedModel, family_of, load_model
from orchestrator.model.lora import add_lora, freeze_vision, set_lora_input_casting
from orchestrator.plan import resolve_zero_stage, use_gradient_checkpointing, with_gpu_memory
from orchestrator.startup import collector_paused
from orchestrator.timing import process_start_time
from orchestrator.train.checkpoints import restore_checkpoint, save_checkpoint
from orchestrator.train.collate import Collated, collate_sft
from orchestrator.train.engine import Engine, make_engine
from orchestrator.train.losses import dpo_loss, dpo_metrics, masked_nll, sft_nll
from orchestrator.train.pairs import (PackedPairs, collate_pairs, longest_row_tokens, model_inputs_for,
                                      packing_refusal, pair_token_logps)
from orchestrator.train.reference_cache import open_reference_cache, write_reference_values
from orchestrator.train.schedule import (StagePlan, micro_batches, plan_schedule, read_rows, stage_plan,
                                         stage_train_config)
from orchestrator.train.tracking import Tracker

log = logging.getLogger("hadpo.train")

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
    use_cudnn_attention(cfg.model.cudnn_attention)
    _quiet_libraries(rank)
    lap = _Laps()
    # The weights' dtype: bf16 under DeepSpeed (it keeps fp32 master copies of what trains) and for a LoRA base
    # without it (frozen; peft makes the adapters fp32 and autocast runs the matmuls in bf16); else fp32. (With
    # LoRA it does not depend on the engine, which the planner may choose only once the model is loaded.)
    weights_bf16 = bf16 and (use_ds or plan.lora)

    # 1. Model (same seed on every rank, so LoRA's random init agrees) while the rows are read and the fused
    # kernels compile.
    _seed_all(train.seed)
    kernels = resolve_fused_kernels(train.fused_kernels, on_gpu)
    warmup = None
    if kernels == "liger" and train.warm_kernels:
        warmup = KernelWarmup(config["base_model"], rows=train.batch_size_per_worker,
                              width_multiple=train.pad_to_multiple_of, device=device,
                              dtype=torch.bfloat16 if weights_bf16 else torch.float32,
                              trainable_norms=not plan.lora)
    # the modeling code's imports and the model make ~a million lasting objects: no collection mid-way
    with ThreadPoolExecutor(max_workers=1) as reader, collector_paused():
        # 2. Data: this rank's share of the rows, in a seeded order (see the module docstring).
        pending_rows = reader.submit(read_rows, ray.train.get_dataset_shard("train"))
        import transformers  # the family's modeling code, timed apart: seconds of imports

        getattr(transformers, FAMILIES[family_of(config["base_model"])].model_class)

        lap("import modeling")
        loaded = load_model(config["base_model"], dtype="bfloat16" if weights_bf16 else "float32",
                            device=device, attn_implementation=cfg.model.attn_implementation, family=cfg.model.family,
                            max_image_pixels=cfg.model.max_image_pixels)
        lap("model")
        rows = pending_rows.result()
    model = loaded.model
    model.config.use_cache = False
    kernels = apply_fused_kernels(model, kernels)
    if not (plan.stage == "sft" and train.sft.train_vision):
        freeze_vision(model)
    schedule = plan_schedule(len(rows), world, train, plan)
    cached_reference = None
    fill_in_loop = config.get("reference_fill") == "loop"
    if plan.stage == "dpo" and config.get("reference_cache"):
        cached_reference = load_cached_reference(config["reference_cache"], rows, rank, partial=fill_in_loop)
    computed_reference = ReferenceSink(config["reference_cache"], rank, cached_reference) if fill_in_loop else None
    lap("rows")

    # The ZeRO stage and checkpointing "auto": the planner decides for this GPU's memory (the smallest of
    # the workers') and the longest row of this data (not the max_length cap).
    planned, zero_reason, checkpointing = plan_stage(cfg, train, plan, rows, loaded, config["base_model"],
                                                      device, world)
    train = train.model_copy(update={"deepspeed": planned.train.deepspeed})
    use_ds = train.deepspeed.enabled  # auto may turn DeepSpeed off (LoRA on one GPU: plan.DEEPSPEED_OFF)
    lap("plan")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = None
    if plan.lora:
        model = add_lora(model, train)
        if bf16 and not use_ds:  # fp32 adapters under bf16 autocast (DeepSpeed's bf16 casts the adapters)
            set_lora_input_casting(model, False)
    elif plan.stage == "dpo" and cached_reference is None:  # a frozen copy only where the cache cannot serve
        # (reference_fill: loop needs LoRA, so a partial cache never reaches this branch)
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
    warmed = warmup.wait() if warmup is not None else ""
    lap("kernels")
    step_hook: Callable[[int, int], None] | None = config.get("step_hook")
    probe: dict[str, Any] | None = config.get("probe")  # a sweep's objective on a POPE subset (eval/probe.py)
    if rank == 0:
        log.info("%s: %d rows, %d workers x %d x %d accumulation, %d steps/epoch, %d steps (from %d), %s, "
                 "gradient checkpointing %s%s, %d torch threads", plan.stage, len(rows), world,
                 train.batch_size_per_worker,
                 train.gradient_accumulation, schedule.steps_per_epoch, schedule.total_steps, start_step,
                 engine.describe() + ("" if zero_reason == "set in the config" else f" ({zero_reason})"),
                 ("on" if checkpointing else "off") + f", fused kernels {kernels}",
                 "" if plan.stage != "dpo" else f", {pair_layout(train, loaded)} pairs, "
                 f"reference {reference_source(cached_reference, rows, fill_in_loop)}", torch.get_num_threads())
        log.info("setup %s", lap)
        if warmed:
            log.info(warmed)
    clock = _StepClock(layout.timings_path(cfg.run_dir, plan.stage), lap, enabled=rank == 0,
                       engine=engine.describe(), engine_reason=zero_reason)

    # 5. The loop: micro-batches from the resume position; an optimizer step every `accumulation`.
    step = start_step
    window = _Window()
    started = time.time()
    batches = _prefetch(micro_batches(rows, schedule, train, rank, world, start_step),
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
                                         cfg.model.attn_implementation, computed_reference)
            engine.backward(loss * weight)
        window.add(metrics, inputs, weight)
        if not engine.step():
            continue
        if computed_reference is not None:  # the step is queued: reading its reference values costs no wait
            computed_reference.settle()
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
            if computed_reference is not None:
                computed_reference.flush()
            save_checkpoint(engine, loaded, plan, step, schedule, train, rank, report, config.get("run_path"))
        else:
            ray.train.report(report)

    batches.close()
    if computed_reference is not None:
        computed_reference.flush()
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


def plan_stage(cfg: ExperimentConfig, train: TrainConfig, plan: StagePlan, rows, loaded: LoadedModel,
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


def collate_stage(batch: dict[str, list], loaded: LoadedModel, stage: str, cfg: ExperimentConfig,
                  cached_reference: dict[str, tuple[float, float]] | None) -> Collated | PackedPairs | None:
    """A micro-batch's model inputs; DPO pairs packed or plain, with their cached reference log-probs."""
    train = cfg.train
    if stage == "sft":
        return collate_sft(batch, loaded, cfg.model.train_template, train.max_length)
    # packed only where the family allows it; the set-up log line says why not (`pair_layout`), not every batch
    inputs = collate_pairs(batch, loaded, cfg.model.train_template, train.max_length,
                           packed=train.prefix_sharing and not packing_refusal(loaded),
                           pad_to_multiple_of=train.pad_to_multiple_of)
    # a micro-batch with a pair the cache lacks (reference_fill: loop) computes the reference for all its pairs
    if inputs is not None and cached_reference is not None and all(i in cached_reference for i in inputs.sample_ids):
        values = torch.tensor([cached_reference[sample_id] for sample_id in inputs.sample_ids], dtype=torch.float32)
        inputs.reference = (values[:, 0], values[:, 1])
    return inputs


def pair_layout(train: TrainConfig, loaded: LoadedModel) -> str:
    """How this run lays out its DPO pairs, for the set-up log line: packed, plain, or plain and why."""
    if not train.prefix_sharing:
        return "plain"
    refusal = packing_refusal(loaded)
    return f"plain (train.prefix_sharing is on, but {refusal})" if refusal else "packed"


def load_cached_reference(path: str, rows: list[dict[str, Any]], rank: int,
                          partial: bool = False) -> dict[str, tuple[float, float]] | None:
    """The cached reference log-probs for these rows. If some row is missing: None (the reference in the
    loop for every step), or with `partial` (reference_fill: loop) the values there are, to be completed."""
    values = open_reference_cache(path).load()
    missing = [str(row["sample_id"]) for row in rows if str(row["sample_id"]) not in values]
    if missing and not partial:
        if rank == 0:
            log.warning("reference cache %s lacks %d of %d training rows (e.g. %s): computing the reference "
                        "in the loop instead", path, len(missing), len(rows), missing[:3])
        return None
    return values


def reference_source(cached: dict[str, tuple[float, float]] | None, rows: list[dict[str, Any]], fill: bool) -> str:
    """How this run gets its reference log-probs, for the set-up log line."""
    if cached is None:
        return "in the loop"
    missing = sum(str(row["sample_id"]) not in cached for row in rows)
    if not missing:
        return "cached"
    return f"cached for {len(rows) - missing} of {len(rows)} pairs, the rest computed in the first epoch" if fill \
        else "in the loop"


class ReferenceSink:
    """The reference log-probs this rank computed in the loop: kept for its later epochs (they go into the
    same dict the collation reads) and added to the cache at each `flush` (every checkpoint and the end).

    `add` keeps the values as tensors on the GPU and `settle`, called once the optimizer step is queued, reads
    them: a read in the middle of the step would make the backward wait for the forwards to finish."""

    def __init__(self, cache_path: str, rank: int, cached: dict[str, tuple[float, float]] | None = None):
        self.cache_path, self.writer = cache_path, f"rank{rank}"
        self.cached = cached
        self.pending: dict[str, tuple[float, float]] = {}
        self.unread: list[tuple[list[str], torch.Tensor, torch.Tensor]] = []

    def add(self, sample_ids: list[str], chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        self.unread.append((list(sample_ids), chosen.detach(), rejected.detach()))

    def settle(self) -> None:
        """Read the values added since the last call into the dicts (the collation sees them from here on)."""
        for sample_ids, chosen, rejected in self.unread:
            values = dict(zip(sample_ids, zip(chosen.double().tolist(), rejected.double().tolist())))
            self.pending.update(values)
            if self.cached is not None:
                self.cached.update(values)
        self.unread = []

    def flush(self) -> None:
        self.settle()
        write_reference_values(self.cache_path, self.pending, self.writer)
        self.pending = {}


def compute_loss(engine: Engine, reference, inputs: Collated | PackedPairs, stage: str, train: TrainConfig,
                 device: torch.device, bf16: bool, attn_implementation: str = "sdpa",
                 computed_reference: ReferenceSink | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch: the loss to back-propagate and its metrics (0-dim tensors, read when the loop logs:
    nothing here waits for the GPU, so the backward is queued behind the forward). Reference log-probs
    computed here are handed to `computed_reference` (reference_fill: loop)."""
    model_inputs = model_inputs_for(inputs, device, torch.bfloat16 if bf16 else None, attn_implementation)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (bf16 and engine.ds is None) else nullcontext()
    with autocast:
        logits = engine.forward(**model_inputs, use_cache=False).logits
    if stage == "sft":
        loss = sft_nll(logits, inputs.labels.to(device), train.sft.first_token_weight)
        return loss, {"loss": loss.detach(), "nll": loss.detach()}

    policy = pair_token_logps(logits, inputs)
    policy_chosen, policy_rejected = policy.sums()
    if inputs.reference is not None:
        reference_chosen, reference_rejected = (values.to(device) for values in inputs.reference)
    else:
        reference_chosen, reference_rejected = reference_logps(engine, reference, inputs, model_inputs, autocast)
        if computed_reference is not None:
            computed_reference.add(inputs.sample_ids, reference_chosen, reference_rejected)
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
        metrics["nll"] = nll.detach()
    metrics["loss"] = loss.detach()
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


def probe_objective(engine: Engine, loaded: LoadedModel, probe: dict[str, Any], rank: int, world: int, bf16: bool,
                    step: int) -> dict[str, Any]:
    """Score the sweep's POPE subset with the policy in memory (all ranks); rank 0 gets the objective and the
    subset's POPE values (``probe/pope/...``), numbered by `evaluations` (see orchestrator/eval/probe.py)."""
    module = engine.module
    was_training = module.training
    module.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (bf16 and engine.ds is None) else nullcontext()
    try:
        with torch.no_grad(), autocast:
            scorer = VisionLanguageModel.from_loaded(loaded, module, probe["template"])
            answers = score_probe(scorer, probe["rows"], rank, world, probe["batch_size"])
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
# The loop's data and logs: a one-ahead prefetch of the collation, metrics over a log window, timings.


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
    """Metrics of the micro-batches since the last log, averaged over micro-batches and ranks. The sums stay
    tensors on the device until `reduce` (a log step) reads them all at once."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.examples = self.tokens = self.skipped = 0
        self.started = time.time()

    def add(self, metrics: dict[str, torch.Tensor], inputs: Collated, weight: float) -> None:
        if weight:
            for key, value in metrics.items():
                value = torch.as_tensor(value).detach().double()
                self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.count += 1
            self.examples += inputs.num_examples
            self.tokens += inputs.num_tokens
        self.skipped += len(inputs.skipped) if weight else 0

    def reduce(self, world: int) -> dict[str, float]:
        keys = sorted(self.sums)
        sums = torch.stack([self.sums[k] for k in keys]).cpu() if keys else torch.zeros(0, dtype=torch.float64)
        values = torch.cat([sums, torch.tensor([self.count, self.examples, self.tokens, self.skipped],
                                               dtype=torch.float64)])
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
            "engine": self.engine, "engine_reason": self.engine_reason, "torch_threads": torch.get_num_threads()})
