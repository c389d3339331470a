"""Fused GPU kernels for training: liger-kernel's RMSNorm, SwiGLU and rotary embedding for the Llama
language model of LLaVA (`train.fused_kernels`).

Measured on one H200 at the LLaVA-1.5-7B shape (benchmarks/dpo_levers.py, LoRA r128, 8 packed pairs, cached
reference): the plain DPO step ran at 16.0 pairs/s with them against 12.9 without (1.24x) and peaked at
65.7 GB instead of 74.4 (the fused kernels keep fewer intermediates for backward). The kernels are Triton
programs: GPU only, and the package is optional (`pip install 'hadpo-orchestrator[gpu]'`). Logits are left
to the model (liger's fused linear cross-entropy computes a loss, not the per-token log-probs DPO needs).
The reference log-prob pass runs the plain modules, so the cached reference and the policy differ by
kernel rounding only (bf16).
"""

from __future__ import annotations

import importlib.util
import logging

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
