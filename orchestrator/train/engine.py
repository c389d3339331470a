"""The training engine: one small interface over DeepSpeed (ZeRO 0-3) and DDP, so the recipe's loop reads
the same for both; the optimizer, the schedule and the DeepSpeed config they run with.

DeepSpeed config: `deepspeed_config` maps the `train` section onto DeepSpeed's keys, then merges the
user's own settings (`train.deepspeed.config`, a dict or a ds_config.json as users of
``deepspeed train_dpo.py --deepspeed ds_config.json`` have them). The recipe owns the keys that must
agree with the rest of the run (`OWNED_KEYS`: batch sizes, precision, gradient clipping, the ZeRO stage
when it is `auto`, the schedule): a user value for one of them must be absent, ``"auto"`` (as in
transformers' ds configs) or equal to the recipe's, otherwise the run stops before any work with the
key, both values and the config field to change instead.

ZeRO-3 with LoRA: the frozen base is gathered for every forward and backward. The LoRA weights, small
and trained every step, stay resident (`stage3_param_persistence_threshold` above their size). DeepSpeed
hooks every module it manages (pre/post forward and backward), five per LoRA-adapted linear: ~1,600 per
step at 7B, which cost half of ZeRO-2's speed even with nothing to gather. So each transformer layer (the
language model's decoder layers, the vision encoder's layers) is a ZeRO-3 *leaf module*
(`train.deepspeed.zero3_leaf_layers`, `set_zero3_leaf_layers`): its weights are fetched and released as
one unit and only the layer is hooked (LLaVA-1.5-7B with LoRA: DeepSpeed hooks 78 modules, not 2,966).
DeepSpeed reduces a leaf's gradients in a full backward hook on it, which PyTorch fires once the
gradients of the layer's positional inputs are computed, or, when none needs one, as soon as its output's
gradient arrives, before the layer's own backward has run. With LoRA the first decoder layer's input
(frozen embeddings and projector) needs none: DeepSpeed then reduces placeholder zeros for its adapters,
empty where the weights were released ("size of tensor a (0) must match the size of tensor b (8)" when the
real gradients accumulate), otherwise right only because the real gradients are added into the
placeholders before the bucket is reduced. `require_input_grads` makes the embeddings' output require a
gradient, which costs the first layer's input gradient (<1 % of a 32-layer backward). (A frozen vision
tower has no gradients to reduce.) benchmarks/RESULTS.md has what each ZeRO-3 setting measured.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from orchestrator.config import TrainConfig

log = logging.getLogger("hadpo.train")


def make_optimizer(trainable: list[torch.nn.Parameter], train: TrainConfig, learning_rate: float,
                   allow_fused: bool = True):
    """AdamW; fused (one kernel for all tensors) where every trainable tensor is on a GPU and the
    optimizer state stays there (`allow_fused` is False when DeepSpeed offloads it to the CPU)."""
    fused = allow_fused and bool(trainable) and all(p.is_cuda and p.is_floating_point() for p in trainable)
    return torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=train.weight_decay, fused=fused or None)


def make_schedule(optimizer, train: TrainConfig, total_steps: int):
    """Warmup for ceil(warmup_ratio * total) steps, then cosine / linear decay to 0, or constant."""
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    warmup = math.ceil(train.warmup_ratio * total_steps)
    if train.lr_schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    if train.lr_schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


# ------------------------------------------------------------------------------------------------
# The DeepSpeed config.

# ZeRO-3 settings the recipe uses unless the user's config says otherwise. Parameters up to this many
# elements stay resident on every GPU instead of being partitioned and gathered: every LoRA matrix of a
# 7B model at rank <= 128 (11008 x 128 = 1.4M) and the norms; no weight of the frozen base (16.8M+).
ZERO3_PERSISTENCE_THRESHOLD = 2_000_000
# transformers' ds-config "auto" values for these ZeRO-3 buffers, derived from the hidden size.
HF_AUTO_ZERO3 = {
    "reduce_bucket_size": lambda hidden: hidden * hidden,
    "stage3_prefetch_bucket_size": lambda hidden: int(0.9 * hidden * hidden),
    "stage3_param_persistence_threshold": lambda hidden: 10 * hidden,
}


class DeepSpeedConfigError(ValueError):
    """The user's DeepSpeed settings conflict with the run's; the message names the key and the fix."""


def owned_keys(train: TrainConfig, world_size: int, bf16: bool, stage_from_config: bool) -> dict[str, tuple[Any, str]]:
    """DeepSpeed key path -> (the recipe's value, the config field that sets it)."""
    owned: dict[str, tuple[Any, str]] = {
        "train_micro_batch_size_per_gpu": (train.batch_size_per_worker, "train.batch_size_per_worker"),
        "gradient_accumulation_steps": (train.gradient_accumulation, "train.gradient_accumulation"),
        "train_batch_size": (train.batch_size_per_worker * train.gradient_accumulation * world_size,
                             "train.batch_size_per_worker x train.gradient_accumulation x scaling.num_workers"),
        "gradient_clipping": (train.max_grad_norm, "train.max_grad_norm"),
        "bf16.enabled": (bf16, "train.bf16 (bf16 on GPU, fp32 on CPU)"),
        "fp16.enabled": (False, "train.bf16 (the recipe trains in bf16 or fp32, never fp16)"),
    }
    if not stage_from_config:
        owned["zero_optimization.stage"] = (train.deepspeed.zero_stage,
                                            "train.deepspeed.zero_stage (auto: the planner's choice)")
    return owned


def load_user_deepspeed_config(value: dict[str, Any] | str | None) -> dict[str, Any]:
    """`train.deepspeed.config` as a dict (a path is read as JSON)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return copy.deepcopy(value)
    path = Path(value).expanduser()
    try:
        loaded = json.loads(path.read_text())
    except FileNotFoundError:
        raise DeepSpeedConfigError(f"train.deepspeed.config: {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DeepSpeedConfigError(f"train.deepspeed.config: {path}: cannot be read ({error})") from None
    except json.JSONDecodeError as error:
        raise DeepSpeedConfigError(f"train.deepspeed.config: {path}: not valid JSON ({error})") from None
    if not isinstance(loaded, dict):
        raise DeepSpeedConfigError(f"train.deepspeed.config: {path}: expected a JSON object, "
                                   f"got {type(loaded).__name__}")
    return loaded


def _get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _same(ours: Any, theirs: Any) -> bool:
    if isinstance(ours, bool) or isinstance(theirs, bool):
        return bool(ours) == bool(theirs) if isinstance(theirs, (bool, int)) else False
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)):
        return math.isclose(float(ours), float(theirs), rel_tol=1e-9)
    return ours == theirs


def _drop_auto(config: dict[str, Any], owned: set[str], hidden_size: int, prefix: str = "") -> dict[str, Any]:
    """The user's config without "auto" values: owned keys take the recipe's value, transformers'
    derived ZeRO-3 buffer sizes are computed, any other "auto" is left to DeepSpeed's default."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out[key] = _drop_auto(value, owned, hidden_size, path + ".")
        elif value == "auto":
            if prefix == "zero_optimization." and key in HF_AUTO_ZERO3:
                out[key] = HF_AUTO_ZERO3[key](hidden_size)
            # owned keys and other "auto" values: left out (the recipe's value / DeepSpeed's default)
        else:
            out[key] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def check_user_deepspeed_config(user: dict[str, Any], train: TrainConfig, world_size: int, bf16: bool,
                                stage_from_config: bool) -> None:
    """Raise `DeepSpeedConfigError` for each user key that conflicts with what the recipe owns."""
    problems = []
    for dotted, (ours, field) in owned_keys(train, world_size, bf16, stage_from_config).items():
        theirs = _get(user, dotted)
        if theirs is None or theirs == "auto" or _same(ours, theirs):
            continue
        problems.append(f"  {dotted}: {theirs!r} in your DeepSpeed config, but this run uses {ours!r} "
                        f"(set by {field}); remove the key, write \"auto\", or change {field}")
    scheduler = user.get("scheduler")
    if scheduler is not None and _get(scheduler, "type") not in (None, "auto"):
        problems.append("  scheduler: the recipe owns the learning-rate schedule (train.lr_schedule, "
                        "train.warmup_ratio); remove the DeepSpeed scheduler")
    optimizer = user.get("optimizer")
    if isinstance(optimizer, dict):
        lr = _get(optimizer, "params.lr")
        if lr not in (None, "auto"):
            problems.append(f"  optimizer.params.lr: {lr!r} in your DeepSpeed config; the recipe's learning rate is "
                            "train.learning_rate (train.sft.learning_rate for the warm-up): write \"auto\"")
    if problems:
        raise DeepSpeedConfigError("train.deepspeed.config conflicts with the run:\n" + "\n".join(problems))


def deepspeed_config(train: TrainConfig, on_gpu: bool, bf16: bool, *, world_size: int = 1, hidden_size: int = 4096,
                     stage_from_config: bool = True) -> dict[str, Any]:
    """The DeepSpeed config this recipe's `train` section maps to, with the user's settings merged in.

    `train.deepspeed.zero_stage` must be resolved (an int) by now; `stage_from_config` says whether the
    config named it (False: the planner chose it for `auto`, so the user's config may not change it).
    """
    ds = train.deepspeed
    if ds.zero_stage == "auto":
        raise ValueError("train.deepspeed.zero_stage 'auto' must be resolved (plan.resolve_zero_stage) first")
    zero: dict[str, Any] = {"stage": int(ds.zero_stage)}
    if ds.zero_stage >= 2:
        zero.update(contiguous_gradients=True, overlap_comm=on_gpu)
    if ds.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True,
                    stage3_param_persistence_threshold=ZERO3_PERSISTENCE_THRESHOLD)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size_per_worker,
        "gradient_accumulation_steps": train.gradient_accumulation,
        "gradient_clipping": train.max_grad_norm,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    user = load_user_deepspeed_config(ds.config)
    if user:
        check_user_deepspeed_config(user, train, world_size, bf16, stage_from_config)
        owned = set(owned_keys(train, world_size, bf16, stage_from_config))
        cleaned = _drop_auto(user, owned, hidden_size)
        for dotted in owned:  # equal or "auto": the recipe's value stands
            head, _, tail = dotted.rpartition(".")
            node = _get(cleaned, head) if head else cleaned
            if isinstance(node, dict):
                node.pop(tail, None)
        cleaned.pop("scheduler", None)
        config = _merge(config, cleaned)
    if not ds.torch_adam and "optimizer" not in config:
        config["optimizer"] = {"type": "AdamW", "params": {"weight_decay": train.weight_decay}}
    if "optimizer" in config:  # DeepSpeed builds the optimizer: the recipe's learning rate goes in
        params = config["optimizer"].setdefault("params", {})
        params.setdefault("weight_decay", train.weight_decay)
        params["lr"] = 0.0  # replaced by make_engine with the stage's learning rate
    return config


# ------------------------------------------------------------------------------------------------
# The engine.


class Engine:
    """forward / backward / step over DeepSpeed or DDP; `module` is the unwrapped (peft) model."""

    def __init__(self, module, forward, optimizer, scheduler, accumulation: int, max_grad_norm: float,
                 deepspeed_engine=None, ddp=None, leaf_layers: int = 0):
        self.module, self.forward = module, forward
        self.leaf_layers = leaf_layers  # ZeRO-3: transformer layers fetched as one unit (set_zero3_leaf_layers)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.accumulation, self.max_grad_norm = accumulation, max_grad_norm
        self.ds, self.ddp = deepspeed_engine, ddp
        self.micro = 0
        self._grad_norm: torch.Tensor | float = float("nan")

    @property
    def zero_stage(self) -> int | None:
        return self.ds.zero_optimization_stage() if self.ds is not None else None

    def describe(self) -> str:
        return f"DeepSpeed ZeRO-{self.zero_stage}" if self.ds is not None else "DDP" if self.ddp else "single"

    def accumulating(self):
        """DDP: skip the gradient all-reduce on micro-steps that do not end an optimizer step."""
        boundary = (self.micro + 1) % self.accumulation == 0
        if self.ddp is not None and not boundary:
            return self.ddp.no_sync()
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if self.ds is not None:
            self.ds.backward(loss)  # DeepSpeed scales by 1 / accumulation itself
        else:
            (loss / self.accumulation).backward()

    def step(self) -> bool:
        """Finish a micro-step; True when it ended an optimizer step."""
        self.micro += 1
        boundary = self.micro % self.accumulation == 0
        if self.ds is not None:
            # ZeRO-0 in fp32 clips without recording the norm: measure it on the (all-reduced) grads.
            own_norm = _grad_norm(self.module) if boundary and self.zero_stage == 0 else None
            self.ds.step()  # steps optimizer and schedule only at the boundary
            if boundary:
                norm = own_norm if own_norm is not None else self.ds.get_global_grad_norm()
                # a copy: DeepSpeed may reuse its tensor for the next step's norm
                self._grad_norm = norm.detach().clone() if isinstance(norm, torch.Tensor) else \
                    float("nan") if norm is None else norm
            return boundary
        if boundary:
            self._grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.module.parameters() if p.requires_grad], self.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return boundary

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def grad_norm(self) -> float:
        """The last optimizer step's gradient norm (kept as the engine returned it, maybe a GPU tensor, until read
        here: the loop reads it when it logs, so no step waits for the GPU to compute it)."""
        return float(self._grad_norm)


def _grad_norm(module: torch.nn.Module) -> torch.Tensor | float:
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.requires_grad and p.grad is not None]
    return torch.stack(norms).norm() if norms else float("nan")


# The transformer layers: the language model's (every family keeps it under `language_model`) and the vision
# encoder's (LLaVA's CLIP `vision_tower...encoder.layers.N`, Qwen2.5-VL's `visual.blocks.N`).
TRANSFORMER_LAYER_NAME = re.compile(
    r"(?:.*\.)?(?:language_model\.(?:.*\.)?layers|(?:vision_tower|visual)\.(?:.*\.)?(?:layers|blocks))\.\d+")


def set_zero3_leaf_layers(model: torch.nn.Module) -> int:
    """Mark the transformer layers as ZeRO-3 leaf modules (before `deepspeed.initialize`, which installs the
    hooks); returns how many."""
    from deepspeed.utils import set_z3_leaf_modules_by_name

    names = [name for name, _ in model.named_modules() if TRANSFORMER_LAYER_NAME.fullmatch(name)]
    if names:
        set_z3_leaf_modules_by_name(model, names)
    return len(names)


def require_input_grads(model: torch.nn.Module) -> None:
    """The language model's input embeddings come out requiring a gradient, so the first decoder layer's
    input does and a ZeRO-3 leaf's gradient hook fires after the layer's backward (module docstring).
    transformers' `enable_input_require_grads` would also do it to the vision tower's patch embeddings, and
    then back-propagate through the frozen tower: only the language model's are hooked here."""

    def hook(module, inputs, output):
        if torch.is_grad_enabled() and not output.requires_grad:
            output.requires_grad_(True)

    model.get_input_embeddings().register_forward_hook(hook)


def skip_cpu_shared_memory_allreduce_build() -> None:
    """Mark DeepSpeed's CPU shared-memory all-reduce op (`deepspeed_shm_comm`) as not usable here.

    DeepSpeed compiles it the first time a process starts its communication backend on the CPU (about 45 s
    of C++ on 2 cores, once per machine and every fresh `.torch_extensions`), yet only DeepSpeed-inference's
    tensor-parallel all-reduce uses it; training reduces through torch.distributed either way. The compatible-ops
    table is where DeepSpeed itself records an op it cannot use, and the only reader of it is that build."""
    import deepspeed.ops

    compatible = dict(deepspeed.ops.__dict__.get("__compatible_ops__") or {})  # not the full probe: unused
    compatible["deepspeed_shm_comm"] = False
    deepspeed.ops.__compatible_ops__ = compatible


def make_engine(model, trainable, train: TrainConfig, *, learning_rate: float, total_steps: int, use_ds: bool,
                on_gpu: bool, bf16: bool, world_size: int = 1, stage_from_config: bool = True) -> Engine:
    """The engine for `model`: DeepSpeed (`use_ds`, ZeRO stage resolved) or DDP through Ray Train."""
    if use_ds:
        import deepspeed
        from deepspeed.utils import get_z3_leaf_modules

        if not on_gpu:
            skip_cpu_shared_memory_allreduce_build()

        text_config = getattr(getattr(model, "config", None), "text_config", None)
        hidden = int(getattr(text_config, "hidden_size", 0) or getattr(model.config, "hidden_size", 4096))
        ds_config = deepspeed_config(train, on_gpu, bf16, world_size=world_size, hidden_size=hidden,
                                     stage_from_config=stage_from_config)
        optimizer = None
        if "optimizer" in ds_config:  # DeepSpeed builds its own (fused / CPU) Adam from the config
            ds_config["optimizer"]["params"]["lr"] = learning_rate
        else:
            optimizer = make_optimizer(trainable, train, learning_rate,
                                       allow_fused=not train.deepspeed.offload_optimizer)
        schedule_fn = lambda opt: make_schedule(opt, train, total_steps)  # noqa: E731
        zero3 = ds_config["zero_optimization"].get("stage") == 3  # a user's config may name the stage
        leaf_layers = set_zero3_leaf_layers(model) if zero3 and train.deepspeed.zero3_leaf_layers else 0
        if leaf_layers:
            log.info("ZeRO-3: %d transformer layers are leaf modules (train.deepspeed.zero3_leaf_layers)", leaf_layers)
        ds_engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
            model=model, model_parameters=trainable, optimizer=optimizer, lr_scheduler=schedule_fn,
            config=ds_config, dist_init_required=False)
        if zero3 and get_z3_leaf_modules(model):  # ours, or leaf_module classes in the user's config
            require_input_grads(model)
        return Engine(ds_engine.module, ds_engine, ds_optimizer, ds_scheduler, train.gradient_accumulation,
                      train.max_grad_norm, deepspeed_engine=ds_engine, leaf_layers=leaf_layers)

    import ray.train.torch

    wrapped = ray.train.torch.prepare_model(model, parallel_strategy="ddp",
                                            parallel_strategy_kwargs={"find_unused_parameters": False})
    ddp = wrapped if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else None
    optimizer = make_optimizer(trainable, train, learning_rate)
    scheduler = make_schedule(optimizer, train, total_steps)
    return Engine(model, wrapped, optimizer, scheduler, train.gradient_accumulation, train.max_grad_norm, ddp=ddp)
