"""Which parameters of a vision-language model train: LoRA on the language model's linear layers, the vision
side frozen (every family keeps its language model under ``language_model``).

Shared by the training recipe (which adds the adapters), the checkpoint converter (which names the same
modules in a converted HA-DPO adapter) and the benchmarks, so an adapter trained, converted or measured
covers the same layers.
"""

from __future__ import annotations

import re

import torch

from orchestrator.config import TrainConfig


def freeze_vision(model: torch.nn.Module) -> None:
    """Freeze everything outside the language model and its output head: the vision tower and the projector
    (LLaVA; LLaVA-NeXT's image_newline too), Qwen2.5-VL's visual encoder and merger. They never train here."""
    for name, param in model.named_parameters():
        if "language_model." not in name and "lm_head." not in name:
            param.requires_grad_(False)


def lora_target_regex(target_modules: list[str]) -> str:
    """A peft target regex (full match on module names) for the language model's linear layers only.

    Matches e.g. ``model.language_model.layers.3.self_attn.q_proj`` but not
    ``model.vision_tower.encoder.layers.3.self_attn.q_proj``, the projector, or ``lm_head``.
    """
    names = "|".join(re.escape(name) for name in target_modules)
    return rf"(?:.*\.)?language_model\.(?:.*\.)?(?:{names})"


def add_lora(model: torch.nn.Module, train: TrainConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = train.lora
    peft_config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                             target_modules=lora_target_regex(lora.target_modules))
    # The adapters are made and initialised where the model lies: peft builds them on the CPU and moves them,
    # which at 7B with r128 (~0.3 B parameters) took seconds of the first step's wait on a GPU.
    with torch.device(next(model.parameters()).device):
        return get_peft_model(model, peft_config)


def set_lora_input_casting(model: torch.nn.Module, enabled: bool) -> None:
    """peft casts each LoRA layer's input to the adapter's dtype; under bf16 autocast with fp32 adapters that
    is a bf16 -> fp32 -> bf16 round trip of every adapted activation (autocast runs the matmul in bf16 anyway).
    Turning it off leaves the numbers as autocast computes them and saves ~1/5 of a 7B LoRA step (profiled)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = enabled
