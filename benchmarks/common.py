"""What the benchmarks share: the LLaVA-1.5-7B shape as a transformers config, its processor, number
formatting for their tables, and loading one benchmark script from another.

The shape comes from one definition, the planner's (`orchestrator.plan.LLAVA_15_7B`: CLIP ViT-L/14 at
336 px, the mlp2x_gelu projector, Vicuna-7B with the llava-hf vocabulary of 32064; CONTEXT.md section 2),
so a benchmark times exactly the model that `hadpo plan` sizes. `llava_config` turns any planner shape
into a `LlavaConfig` with what the planner does not size: 4096 positions, RMSNorm eps 1e-5, LLaMA's
special ids (pad = unk = 0, BOS 1, EOS 2), CLIP's quick-GELU, features from layer -2 with the CLS token
dropped. `TINY_SHAPE` is the same model at a size a CPU runs in seconds (the `--tiny` smoke modes).
The processor is the one the tiny model ships with (`shape_processor`). Importing this module loads
neither torch nor transformers.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from orchestrator.plan import LLAVA_15_7B, ModelShape  # noqa: E402

LLAVA_IMAGE_TOKEN_ID = 32000       # llava-hf's <image> id (the first id after LLaMA's 32000 words)
MAX_POSITIONS = 4096               # Vicuna-7B v1.5's context
CLIP_PROJECTION_DIM = 768          # CLIP ViT-L/14's; LLaVA's vision tower has no projection (config.json only)
TINY_SHAPE = replace(LLAVA_15_7B, name="tiny LLaVA-1.5 (benchmark smoke tests)", vision_hidden=64,
                     vision_intermediate=256, vision_layers=2, vision_heads=4, image_size=64, patch_size=16,
                     text_hidden=128, text_intermediate=256, text_layers=2, text_heads=4, text_kv_heads=4)
TINY_MAX_POSITIONS = 1024

__all__ = ["LLAVA_15_7B", "TINY_SHAPE", "LLAVA_IMAGE_TOKEN_ID", "MAX_POSITIONS", "TINY_MAX_POSITIONS",
           "llava_config", "shape_processor", "fmt", "load_benchmark"]


def llava_config(shape: ModelShape = LLAVA_15_7B, image_token_id: int = LLAVA_IMAGE_TOKEN_ID,
                 max_positions: int = MAX_POSITIONS):
    """The `LlavaConfig` of a planner shape (see the module docstring for what the shape does not say)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
                              num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                              image_size=shape.image_size, patch_size=shape.patch_size,
                              projection_dim=CLIP_PROJECTION_DIM, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=shape.text_hidden, intermediate_size=shape.text_intermediate,
                       num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
                       num_key_value_heads=shape.text_kv_heads, vocab_size=shape.vocab_size,
                       max_position_embeddings=max_positions, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, tie_word_embeddings=shape.tie_word_embeddings)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         image_seq_length=shape.image_tokens, projector_hidden_act="gelu",
                         multimodal_projector_bias=shape.projector_bias,
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    config.pad_token_id = 0
    return config


def shape_processor(tokenizer, shape: ModelShape = LLAVA_15_7B):
    """`orchestrator.model.llava.llava_processor` for a planner shape's image and patch size (336 px, 14 px:
    576 tokens per image)."""
    from orchestrator.model.llava import llava_processor

    return llava_processor(tokenizer, shape.image_size, shape.patch_size)


def fmt(value, spec: str = ".2f", unit: str = "", width: int = 0) -> str:
    """`value` in `spec` with `unit`, right-aligned to `width`; "-" when it is missing (None) or not finite."""
    if value is None or (isinstance(value, numbers.Real) and not math.isfinite(value)):
        text = "-"
    else:
        text = f"{value:{spec}}{unit}"
    return f"{text:>{width}}"


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (a fresh one per call), to use one benchmark's pieces in another."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
