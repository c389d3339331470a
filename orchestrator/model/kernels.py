"""Fused GPU kernels for training: liger-kernel's RMSNorm, SwiGLU and rotary embedding for the Llama
language model of LLaVA (`train.fused_kernels`).

Measured on one H200 at the LLaVA-1.5-7B shape (benchmarks/dpo_levers.py, LoRA r128, 8 packed pairs, cached
reference): the plain DPO step ran at 16.0 pairs/s with them against 12.9 without (1.24x) and peaked at
65.7 GB instead of 74.4 (the fused kernels keep fewer intermediates for backward). The kernels are Triton
programs: GPU only, and the package is optional (`pip install 'hadpo-orchestrator[gpu]'`). Logits are left
to the model (liger's fused linear cross-entropy computes a loss, not the per-token log-probs DPO needs).
The reference log-prob pass runs the plain modules, so the cached reference and the policy differ by
kernel rounding only (bf16).

Triton compiles each kernel the first time it runs, once per *specialisation*: integer arguments are
specialised on whether they divide by 16 (liger's RMSNorm backward gets the rows each program handles,
which changes with the batch's width). On a fresh machine that took the first DPO step 9.7-11.3 s instead
of 0.9 s, and a step with a new width ~2 s more. `KernelWarmup` runs the same kernels on small tensors of the
model's sizes in a background thread while the worker imports, loads the model and builds its engine, so
the loop's first steps find them compiled (`train.warm_kernels`).

Attention: torch's SDPA picks cuDNN's attention first on Hopper. cuDNN builds an execution plan for every
new shape: 1.8 s for the vision tower's first call, 0.1-2.2 s for each new width of the packed pairs (fwd +
bwd, H200, torch 2.11), against ~0.005 s for memory-efficient attention. Packed DPO rows change width from
batch to batch, and the evaluation's prefix and decode shapes from block to block, so `use_cudnn_attention`
keeps it off unless `model.cudnn_attention` asks for it.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace

log = logging.getLogger(__name__)


class FusedKernelsUnavailable(RuntimeError):
    """`train.fused_kernels: liger` asked for kernels this machine cannot run."""


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_fused_kernels(setting: str, on_gpu: bool) -> str:
    """"liger" or "none" for `train.fused_kernels` (auto: liger on a GPU when the package is installed)."""
    if setting == "none":
        return "none"
    if setting == "liger":
        if not on_gpu:
            raise FusedKernelsUnavailable("train.fused_kernels: liger needs a GPU (its kernels are Triton programs); "
                                          "use auto or none on the CPU")
        if not liger_installed():
            raise FusedKernelsUnavailable("train.fused_kernels: liger needs the liger-kernel package: "
                                          "pip install 'hadpo-orchestrator[gpu]' (or set auto / none)")
        return "liger"
    return "liger" if on_gpu and liger_installed() else "none"


def apply_fused_kernels(model, kernels: str) -> str:
    """Patch `model` (a llava-hf LLaVA) with the resolved kernels; returns what was applied."""
    if kernels != "liger":
        return "none"
    from liger_kernel.transformers import apply_liger_kernel_to_llava

    apply_liger_kernel_to_llava(fused_linear_cross_entropy=False, model=model)
    return "liger"


def use_cudnn_attention(enabled: bool) -> None:
    """`model.cudnn_attention` for this process: may SDPA choose cuDNN's attention (see the module docstring)?"""
    import torch

    torch.backends.cuda.enable_cudnn_sdp(enabled)


# Text models whose liger patch is LigerRMSNorm (llama casting) + LigerSwiGLUMLP + liger_rotary_pos_emb:
# the kernels `warm_fused_kernels` runs. Others are left to compile in their first step.
WARMABLE_TEXT_MODELS = ("llama", "mistral")


def warmup_widths(rows: int, width_multiple: int, sm_count: int, longest: int = 2048) -> list[int]:
    """Row widths (multiples of `width_multiple`) whose rows-per-program, ceil(rows * width / sm_count),
    fall on both sides of Triton's divide-by-16 specialisation, as real batches of varying width do."""
    widths, seen = [], set()
    width = width_multiple
    while width <= max(longest, width_multiple) and len(seen) < 2:
        per_program = -(-rows * width // sm_count)
        divisible = per_program % 16 == 0
        if divisible not in seen and per_program > 1:  # 1 is a specialisation of its own no real batch meets
            seen.add(divisible)
            widths.append(width)
        width += width_multiple
    return widths


def warm_fused_kernels(model_path: str | Path, rows: int, width_multiple: int, device, dtype,
                       trainable_norms: bool) -> dict[str, float | str]:
    """Run liger's RMSNorm, SwiGLU and RoPE forward and backward on `rows` x width tensors of the model's
    sizes, through the same liger entry points the patched model calls, so Triton compiles them now.

    Everything is made here with explicit device and dtype (the main thread may be inside from_pretrained,
    which changes global defaults). Returns what was done, for the log."""
    from transformers import AutoConfig

    started = time.time()
    config = AutoConfig.from_pretrained(str(model_path))
    text = getattr(config, "text_config", config)
    if text.model_type not in WARMABLE_TEXT_MODELS:
        return {"skipped": f"no warm-up for {text.model_type} text models"}
    import torch
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    # The patched modules' forwards, called on stand-ins that hold what they read: the norm's attributes as
    # liger's patch sets them for these models, and identity projections around the SwiGLU product.
    weight = torch.ones(text.hidden_size, device=device, dtype=dtype, requires_grad=trainable_norms)
    norm = SimpleNamespace(weight=weight, variance_epsilon=text.rms_norm_eps, offset=0.0, casting_mode="llama",
                           in_place=True, row_mode=None)
    identity = lambda x: x  # noqa: E731
    mlp = SimpleNamespace(gate_proj=identity, up_proj=identity, down_proj=identity)
    widths = warmup_widths(rows, width_multiple, sm_count)
    with torch.cuda.device(device):
        for width in widths:
            hidden = torch.randn(rows, width, text.hidden_size, device=device, dtype=dtype, requires_grad=True)
            normed = LigerRMSNorm.forward(norm, hidden)
            gate = torch.randn(rows, width, text.intermediate_size, device=device, dtype=dtype, requires_grad=True)
            product = LigerSwiGLUMLP.forward(mlp, gate)
            # [rows, heads, width, head_dim] views of contiguous [rows, width, heads, head_dim], as the model's
            q = torch.randn(rows, width, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
            k = torch.randn(rows, width, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
            cos = torch.randn(rows, width, head_dim, device=device, dtype=dtype)
            q_rotated, k_rotated = liger_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, cos.clone())
            total = normed.float().sum() + product.float().sum() + q_rotated.float().sum() + k_rotated.float().sum()
            total.backward()
        torch.cuda.synchronize(device)
    return {"seconds": time.time() - started, "widths": ",".join(map(str, widths))}


class KernelWarmup:
    """`warm_fused_kernels` on a daemon thread; `wait()` before the first step. A warm-up that fails only
    costs the time it took: the kernels then compile in the first steps, as without it."""

    def __init__(self, *args, **kwargs):
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=args, kwargs=kwargs, name="kernel-warmup", daemon=True)
        self.thread.start()

    def _run(self, *args, **kwargs) -> None:
        try:
            self.result = warm_fused_kernels(*args, **kwargs)
        except Exception as error:  # noqa: BLE001  (an optimisation: never the run's failure)
            self.error = error

    def wait(self) -> str:
        """Block until done; a line for the log saying what it did."""
        waited = time.time()
        self.thread.join()
        waited = time.time() - waited
        if self.error is not None:
            return f"fused-kernel warm-up failed ({type(self.error).__name__}: {self.error}); they compile in the first steps"
        if "skipped" in self.result:
            return f"fused-kernel warm-up skipped: {self.result['skipped']}"
        return (f"fused kernels compiled beside the set-up in {self.result['seconds']:.1f}s (row widths "
                f"{self.result['widths']}), the loop waited {waited:.1f}s for them")
