"""GPU memory planner: will this DPO run fit on these GPUs, and if not, what to change.

Pure functions of the model shape and the typed config; nothing here imports torch, DeepSpeed or Ray.
`hadpo plan CONFIG` prints `format_plan` and `advise` through `main_plan`.

Units: GB = 1e9 bytes, as ``torch.cuda.max_memory_allocated() / 1e9`` in the GPU probe. Nominal card sizes
(24, 40, 80 "GB") are GiB, so comparing our GB against them leaves ~7% slack on purpose.

What one GPU (one Ray Train worker) holds, per component:

- weights: every parameter (vision tower, projector, language model, LoRA adapters) at 2 bytes (bf16) or
  4 (fp32). ZeRO-3 shards them over the workers; ZeRO-3 + ``offload_params`` keeps them in CPU memory.
  Under ZeRO-3 the layers being computed are gathered whole: ~2 decoder layers' worth ("ZeRO-3 gathered").
- reference model: LoRA needs no copy (the policy with adapters disabled is the exact reference), nor does
  a run with `train.reference_cache` (log-probs precomputed); full fine-tuning without the cache keeps a
  second full copy of the weights (HA-DPO's choice), unsharded, as the recipe makes it.
- optimizer: AdamW on the trainable parameters: fp32 master copy + two fp32 moments (12 bytes/param with
  bf16; 8 with fp32 training, whose weights are the master). ZeRO-1/2/3 shard it; ``offload_optimizer``
  moves it to CPU. Full fine-tuning trains the language model and the projector; the vision tower stays
  frozen (LLaVA's practice).
- gradients of the trainable parameters, in the training dtype; ZeRO-2/3 shard them; with
  ``offload_optimizer`` they stream to CPU and only a reduce bucket (5e8 elements) stays on the GPU.
- activations of the policy forward kept for backward, over rows = 2 x batch_size_per_worker (chosen and
  rejected are one batch) of seq_len tokens each; with `train.prefix_sharing` one packed row per pair of
  2 x seq_len - prompt tokens (the prompt, ~55 text tokens plus the image's, counted once). See
  `layer_activation_bytes_per_token`: with gradient checkpointing, one hidden state per layer per token
  plus one layer recomputed in full; without it, every layer in full. `gradient_checkpointing: auto`
  turns it on only when the run would not fit in `scaling.gpu_memory_gb` without it.
- logits: rows x seq x vocab x (4 bytes fp32 log-softmax + the bf16 logits).
- a fixed CUDA context / NCCL / allocator overhead (`OVERHEAD_GB`).

Models (`ModelShape`): LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL, from the folder's config.json (`shape_from_config`),
their parameters counted as transformers builds them (tested against its modules). Images count at the most
tokens one may take (`model/image_tokens.py`: LLaVA-NeXT 2,928 at 336 px tiles, Qwen2.5-VL max_pixels / 28^2),
which only matters for packed pairs: rows are planned at `train.max_length`. Qwen2.5-VL's pairs are never
packed (its multimodal rotary positions), so `train.prefix_sharing` plans two rows per pair for it.

Components are summed, which is conservative: their peaks do not all coincide. The frozen vision tower's
activations (no gradient flows into it; LLaVA-NeXT runs it on 5 tiles per image) and DeepSpeed's own buffers
beyond the reduce bucket are ignored.

Calibration: `ACTIVATION_CALIBRATION` was fitted on ONE measured point (shared/docs/GPU.md: LLaVA-1.5-7B
shape, LoRA r128 on all LM linears, 4 pairs/GPU, 739 tokens/row, gradient checkpointing, reference =
adapters disabled, one H100, bf16: 22.9 GB peak allocated). With it, everything the allocator holds sums
to 22.9 GB there, and the total with `OVERHEAD_GB` (what nvidia-smi would show) to 24.4 GB; the raw
per-tensor count (calibration 1.0) gives 23.7 GB allocated, 25.2 GB in total. One point cannot
tell the per-tensor count's overstatement apart from non-coinciding peaks; figures far from that shape
(full fine-tuning, eager attention, much longer rows, the other families) are extrapolations: read them as +-25%.
Without gradient checkpointing every layer's activations are kept and the same count undershoots:
`NO_CHECKPOINT_CALIBRATION` was fitted on two points measured by benchmarks/dpo_step.py (2026-11-30, one
H200: packed pairs of 631 + 2 x 128 tokens, LoRA r128 dropout 0.05, bf16, no checkpointing, cached
reference): 8 pairs 78.2 GB and 12 pairs 102.3 GB peak allocated; 0.81 gives 78.2 and 101.0.
ZeRO-3 holds more than the same run under ZeRO-2: fp32 gradient partitions (4 bytes per trainable parameter
over the workers), a reduce bucket, and buffers for prefetched and live parameters, `ZERO3_BUFFERS_GB`,
fitted on two measured points: LoRA r128 on one H200 (benchmarks/dpo_levers.py, 2026-12-01: 84.8 GB under
ZeRO-3 against 75.9 under ZeRO-2, the same with every weight resident) and full-parameter DPO over 2 H200
(95.5 GB, benchmarks/RESULTS.md); 7.2 GB leaves both within 1.2 GB (1.3 %).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from orchestrator.config import ExperimentConfig, ScalingSection, TinyModelConfig, TrainConfig
from orchestrator.model.image_tokens import (QWEN2_5_VL_MAX_PIXELS, QWEN_PROCESSOR_DEFAULT_MAX_PIXELS,
                                             llava_image_tokens, llava_next_max_image_tokens, qwen_max_image_tokens)

GB = 1e9
OVERHEAD_GB = 1.5                    # CUDA context, NCCL communicators, allocator slack
REDUCE_BUCKET_ELEMENTS = 5e8         # DeepSpeed's default reduce_bucket_size
ACTIVATION_CALIBRATION = 0.54        # fitted on the GPU.md point (with gradient checkpointing; module docstring)
NO_CHECKPOINT_CALIBRATION = 0.81     # fitted on two H200 points without checkpointing (module docstring)
ZERO3_BUFFERS_GB = 7.2               # ZeRO-3's prefetch / live-parameter buffers, fitted on two points (docstring)
PROMPT_TEXT_TOKENS = 55             # BOS + v1 system prompt + USER/ASSISTANT + a short question (LLaMA tokens)
TINY_VOCAB_ESTIMATE = 1024           # the tiny model's vocabulary is built from the world's texts
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}   # the seed notes' rules of thumb
LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_GPU_MEMORY_GB = 80.0         # planned for when neither the config nor a GPU here says (hadpo plan on a laptop)
# The ZeRO stage LoRA trains fastest with when the frozen base fits on one GPU (measured, benchmarks/RESULTS.md:
# stages 0-2 differ only in how they reduce LoRA's small gradients; ZeRO-3 gathers the frozen base every pass).
FASTEST_LORA_STAGE = 2
# `zero_stage: auto`'s choice for LoRA on a single GPU whose frozen base fits: no DeepSpeed at all. One GPU has
# nothing to shard, and plain torch (fused AdamW on fp32 adapters, bf16 autocast) trained `hadpo run`'s 7B step
# 1.08-1.11x faster than DeepSpeed ZeRO-2 (its gradient hooks, flat buffers and bf16 master copies;
# benchmarks/RESULTS.md, 2026-12-03).
DEEPSPEED_OFF = None


# --------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide memory, for each model family (`family`, as `model.family` names them):

    - ``llava`` (LLaVA-1.5): a CLIP ViT (patch conv, CLS, learned positions, LayerNorms, GELU MLP), the 2-layer
      MLP projector, a Llama (or Mistral) language model; one `image_size` tile per image;
    - ``llava_next`` (LLaVA-NeXT): the same towers, plus ``image_newline`` (one `text_hidden` vector, counted
      with the projector) and anyres tiling over `grid_pinpoints` ((height, width) px);
    - ``qwen2_5_vl``: Qwen's ViT (3-D patch conv without bias over `temporal_patch_size` frames, RMSNorms,
      SwiGLU MLP with biases, rotary positions: no position table), its patch merger as the projector
      (RMSNorm, Linear 4v -> 4v, GELU, Linear 4v -> text_hidden for `merge_size` 2), a Qwen2 language model
      whose q/k/v projections have biases (`qkv_bias`); images at their own resolution up to `max_pixels`
      (`image_size` is unused: 0).

    `image_tokens` counts as `orchestrator.model.image_tokens` says (the loader counts the same way).
    """

    name: str
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    projector_bias: bool = True
    family: str = "llava"
    qkv_bias: bool = False
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    max_pixels: int = 0
    merge_size: int = 2
    temporal_patch_size: int = 2

    @property
    def image_tokens(self) -> int:
        """Tokens one image becomes at most: LLaVA-1.5 (size/patch)^2 (CLS dropped); LLaVA-NeXT the base tile +
        the largest anyres grid + its newlines; Qwen2.5-VL max_pixels / (patch x merge)^2."""
        if self.family == "llava_next":
            return llava_next_max_image_tokens(self.image_size, self.patch_size, self.grid_pinpoints)
        if self.family == "qwen2_5_vl":
            return qwen_max_image_tokens(self.max_pixels, self.patch_size, self.merge_size)
        return llava_image_tokens(self.image_size, self.patch_size)

    @property
    def packs_pairs(self) -> bool:
        """Whether a pair can be one packed row [prompt, chosen, rejected] (`train.prefix_sharing`): only with
        plain 1-D positions (`families.ModelFamily.one_d_positions`); Qwen2.5-VL's multimodal rotary positions
        are computed from the whole row, so its pairs stay two rows."""
        return self.family != "qwen2_5_vl"

    @property
    def kv_dim(self) -> int:
        return self.text_kv_heads * (self.text_hidden // self.text_heads)

    # Parameter counts -----------------------------------------------------------------------------
    def vision_params(self) -> int:
        h, i = self.vision_hidden, self.vision_intermediate
        if self.family == "qwen2_5_vl":
            patch_embed = 3 * self.temporal_patch_size * self.patch_size ** 2 * h       # Conv3d, no bias
            # qkv, proj, gate + up, down (all with biases), 2 RMSNorms
            layer = (h * 3 * h + 3 * h) + (h * h + h) + 2 * (h * i + i) + (i * h + h) + 2 * h
            return patch_embed + self.vision_layers * layer
        positions = (self.image_size // self.patch_size) ** 2 + 1                       # one tile's patches + CLS
        embeddings = 3 * self.patch_size ** 2 * h + h + positions * h                   # patch conv, CLS, positions
        layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h                 # attn, fc1, fc2, 2 LayerNorms
        return embeddings + 2 * h + self.vision_layers * layer + 2 * h                    # pre/post LayerNorm

    def projector_params(self) -> int:
        """What joins the towers: LLaVA's 2-layer MLP (+ LLaVA-NeXT's image_newline), Qwen2.5-VL's merger."""
        v, t = self.vision_hidden, self.text_hidden
        if self.family == "qwen2_5_vl":
            merged = v * self.merge_size ** 2
            return v + (merged * merged + merged) + (merged * t + t)                     # RMSNorm, Linear, Linear
        bias = 1 if self.projector_bias else 0
        newline = t if self.family == "llava_next" else 0
        return v * t + bias * t + t * t + bias * t + newline

    def lm_layer_params(self) -> int:
        h, i, kv = self.text_hidden, self.text_intermediate, self.kv_dim
        biases = h + 2 * kv if self.qkv_bias else 0
        return 2 * h * h + 2 * h * kv + biases + 3 * h * i + 2 * h                     # q,o + k,v + MLP + 2 RMSNorms

    def lm_params_without_embeddings(self) -> int:
        return self.text_layers * self.lm_layer_params() + self.text_hidden          # + final RMSNorm

    def lm_params(self) -> int:
        """The language model with its input embeddings and lm_head."""
        embeddings = self.vocab_size * self.text_hidden
        head = 0 if self.tie_word_embeddings else embeddings
        return self.lm_params_without_embeddings() + embeddings + head

    def total_params(self) -> int:
        return self.vision_params() + self.projector_params() + self.lm_params()

    def linear_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a language-model linear by its name."""
        h, i, kv = self.text_hidden, self.text_intermediate, self.kv_dim
        shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                  "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        if module not in shapes:
            raise ValueError(f"train.lora.target_modules: unknown module {module!r}; "
                             f"the planner knows the language model's {', '.join(LM_LINEARS)}")
        return shapes[module]

    def lora_params(self, rank: int, target_modules: list[str] | tuple[str, ...] = LM_LINEARS) -> int:
        """LoRA A (r x in) + B (out x r) on each target linear of every language-model layer."""
        per_layer = sum(rank * sum(self.linear_shape(module)) for module in target_modules)
        return self.text_layers * per_layer


FAMILY_NAMES = ("llava", "llava_next", "qwen2_5_vl")   # as `model.family` and `families.FAMILIES` name them
# llava-v1.6's anyres grid resolutions (height, width), the llava_next config's default
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

LLAVA_15_7B = ModelShape(
    name="LLaVA-1.5-7B", vision_hidden=1024, vision_intermediate=4096, vision_layers=24, vision_heads=16,
    image_size=336, patch_size=14, text_hidden=4096, text_intermediate=11008, text_layers=32, text_heads=32,
    text_kv_heads=32, vocab_size=32064,
)
LLAVA_15_13B = replace(LLAVA_15_7B, name="LLaVA-1.5-13B", text_hidden=5120, text_intermediate=13824,
                       text_layers=40, text_heads=40, text_kv_heads=40)
# llava-hf/llava-v1.6-vicuna-7b-hf: LLaVA-1.5-7B's towers and Vicuna-7B, anyres tiling, image_newline
LLAVA_NEXT_VICUNA_7B = replace(LLAVA_15_7B, name="LLaVA-NeXT-Vicuna-7B (v1.6)", family="llava_next",
                               grid_pinpoints=LLAVA_NEXT_PINPOINTS)
LLAVA_NEXT_VICUNA_13B = replace(LLAVA_15_13B, name="LLaVA-NeXT-Vicuna-13B (v1.6)", family="llava_next",
                                grid_pinpoints=LLAVA_NEXT_PINPOINTS)
# llava-hf/llava-v1.6-mistral-7b-hf: Mistral-7B (SwiGLU 14336, 8 key/value heads), vocabulary 32064
LLAVA_NEXT_MISTRAL_7B = replace(LLAVA_NEXT_VICUNA_7B, name="LLaVA-NeXT-Mistral-7B (v1.6)", text_intermediate=14336,
                                text_kv_heads=8)
# Qwen/Qwen2.5-VL-7B-Instruct's config.json and preprocessor_config.json (max_pixels 12845056)
QWEN2_5_VL_7B = ModelShape(
    name="Qwen2.5-VL-7B", family="qwen2_5_vl", vision_hidden=1280, vision_intermediate=3420, vision_layers=32,
    vision_heads=16, image_size=0, patch_size=14, text_hidden=3584, text_intermediate=18944, text_layers=28,
    text_heads=28, text_kv_heads=4, vocab_size=152064, qkv_bias=True, max_pixels=QWEN2_5_VL_MAX_PIXELS,
)


def tiny_shape(tiny: TinyModelConfig, vocab_size: int = TINY_VOCAB_ESTIMATE, family: str = "llava") -> ModelShape:
    """The built-in tiny model of `family` (orchestrator/model/tiny.py builds it with these sizes)."""
    llava = ModelShape(
        name="tiny LLaVA", vision_hidden=tiny.vision_hidden, vision_intermediate=4 * tiny.vision_hidden,
        vision_layers=tiny.vision_layers, vision_heads=tiny.vision_heads, image_size=tiny.image_size,
        patch_size=tiny.patch_size, text_hidden=tiny.text_hidden, text_intermediate=tiny.text_intermediate,
        text_layers=tiny.text_layers, text_heads=tiny.text_heads, text_kv_heads=tiny.text_heads,
        vocab_size=vocab_size,
    )
    size = tiny.image_size
    if family == "llava":
        return llava
    if family == "llava_next":  # anyres over 1x2, 2x1 and 2x2 grids of tiles
        return replace(llava, name="tiny LLaVA-NeXT", family=family,
                       grid_pinpoints=((size, 2 * size), (2 * size, size), (2 * size, 2 * size)))
    if family == "qwen2_5_vl":  # 14 px patches merged 2x2; images resized to about image_size px, square
        side = -(-size // 28) * 28
        return replace(llava, name="tiny Qwen2.5-VL", family=family, image_size=0, patch_size=14, qkv_bias=True,
                       max_pixels=side * side)
    raise ValueError(f"model.family: no tiny model of family {family!r} (known: {', '.join(FAMILY_NAMES)})")


def _sub_config(config: dict, key: str, source: str) -> dict | None:
    value = config.get(key)
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{source}: {key} should be a JSON object, got {type(value).__name__}")
    return value


# transformers' defaults for keys a config.json leaves out (LlamaConfig, MistralConfig, Qwen2_5_VLTextConfig)
TEXT_DEFAULTS = {
    "llama": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": None, "vocab_size": 32000},
    "mistral": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "vocab_size": 32000},
    "qwen2_5_vl_text": {"hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
                        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064},
}


def _text_sizes(text: dict, model_type: str, source: str) -> dict:
    """The language model's sizes from a text config (missing keys: transformers' defaults for its type)."""
    if model_type not in TEXT_DEFAULTS:
        raise ValueError(f"{source}: text model_type {model_type!r}; the planner knows "
                         f"{', '.join(TEXT_DEFAULTS)} language models")
    sizes = {key: text.get(key, default) for key, default in TEXT_DEFAULTS[model_type].items()}
    sizes["num_key_value_heads"] = sizes["num_key_value_heads"] or sizes["num_attention_heads"]
    if model_type != "qwen2_5_vl_text" and (text.get("attention_bias") or text.get("mlp_bias")):
        raise ValueError(f"{source}: attention_bias / mlp_bias is true; the planner counts Llama layers without biases")
    head_dim = text.get("head_dim")
    if head_dim and head_dim != sizes["hidden_size"] // sizes["num_attention_heads"]:
        raise ValueError(f"{source}: head_dim {head_dim} is not hidden_size / num_attention_heads; the planner "
                         "assumes it is")
    return sizes


def shape_from_hf_config(config: dict, name: str = "model", max_pixels: int | None = None,
                         source: str = "config.json") -> ModelShape:
    """Shape from a model folder's ``config.json`` dict: llava-hf LLaVA-1.5 or LLaVA-NeXT, or Qwen2.5-VL
    (whose text keys sit at the top level in the hub's file, or under ``text_config``). Missing keys take
    the transformers defaults (CLIPVisionConfig, LlamaConfig / MistralConfig, Qwen2_5_VL*Config), as the
    exports rely on them. `max_pixels`: Qwen2.5-VL's image budget (its preprocessor_config.json), default
    transformers' image processor's."""
    model_type = config.get("model_type", "llava")
    if model_type == "qwen2_5_vl":
        return _qwen_shape(config, name, max_pixels, source)
    if model_type not in ("llava", "llava_next"):
        raise ValueError(f"{source}: model_type {model_type!r} is not a family the planner knows "
                         f"({', '.join(FAMILY_NAMES)})")
    vision = _sub_config(config, "vision_config", source)
    if vision is None:  # the llava configs' own default tower: CLIP ViT-L/14 at 336 px
        vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                  "image_size": 336, "patch_size": 14}
    text = _sub_config(config, "text_config", source) or {}
    sizes = _text_sizes(text, text.get("model_type", "llama"), source)
    pinpoints = ()
    if model_type == "llava_next":
        pinpoints = tuple(tuple(int(side) for side in pair)
                          for pair in config.get("image_grid_pinpoints") or LLAVA_NEXT_PINPOINTS)
    return ModelShape(
        name=name, family=model_type,
        vision_hidden=vision.get("hidden_size", 768), vision_intermediate=vision.get("intermediate_size", 3072),
        vision_layers=vision.get("num_hidden_layers", 12), vision_heads=vision.get("num_attention_heads", 12),
        image_size=vision.get("image_size", 224), patch_size=vision.get("patch_size", 32),
        text_hidden=sizes["hidden_size"], text_intermediate=sizes["intermediate_size"],
        text_layers=sizes["num_hidden_layers"], text_heads=sizes["num_attention_heads"],
        text_kv_heads=sizes["num_key_value_heads"], vocab_size=sizes["vocab_size"],
        tie_word_embeddings=bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
        projector_bias=bool(config.get("multimodal_projector_bias", True)), grid_pinpoints=pinpoints,
    )


def _qwen_shape(config: dict, name: str, max_pixels: int | None, source: str) -> ModelShape:
    text = _sub_config(config, "text_config", source) or config     # the hub's file keeps text keys at the top
    vision = _sub_config(config, "vision_config", source) or {}
    sizes = _text_sizes(text, "qwen2_5_vl_text", source)

    def vision_value(key: str, alias: str, default: int) -> int:
        return int(vision.get(key, vision.get(alias, default)))

    out_hidden = vision_value("out_hidden_size", "out_hidden_size", 3584)
    if out_hidden != sizes["hidden_size"]:
        raise ValueError(f"{source}: vision_config.out_hidden_size {out_hidden} differs from the language model's "
                         f"hidden_size {sizes['hidden_size']}")
    return ModelShape(
        name=name, family="qwen2_5_vl",
        vision_hidden=vision_value("hidden_size", "embed_dim", 3584),
        vision_intermediate=vision_value("intermediate_size", "intermediate_size", 3420),
        vision_layers=vision_value("depth", "num_hidden_layers", 32),
        vision_heads=vision_value("num_heads", "num_attention_heads", 16), image_size=0,
        patch_size=vision_value("patch_size", "spatial_patch_size", 14),
        merge_size=vision_value("spatial_merge_size", "spatial_merge_size", 2),
        temporal_patch_size=vision_value("temporal_patch_size", "temporal_patch_size", 2),
        text_hidden=sizes["hidden_size"], text_intermediate=sizes["intermediate_size"],
        text_layers=sizes["num_hidden_layers"], text_heads=sizes["num_attention_heads"],
        text_kv_heads=sizes["num_key_value_heads"], vocab_size=sizes["vocab_size"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings") or text.get("tie_word_embeddings")),
        qkv_bias=True, max_pixels=int(max_pixels or QWEN_PROCESSOR_DEFAULT_MAX_PIXELS),
    )


def processor_max_pixels(folder: Path) -> int | None:
    """Qwen2.5-VL's image budget as its folder's ``preprocessor_config.json`` sets it (``max_pixels``, or
    ``size.longest_edge`` as transformers 5 saves it); None when the folder sets none."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    value = raw.get("max_pixels") or (raw.get("size") or {}).get("longest_edge")
    return int(value) if value else None


def shape_by_name(folder_name: str) -> ModelShape | None:
    """A released model recognised by its folder's name ("llava-1.5-7b-hf", "llava-v1.6-mistral-7b-hf",
    "Qwen2.5-VL-7B-Instruct", ...), or None."""
    lowered = folder_name.lower().replace("_", "-")
    size = re.search(r"(?<![\d.])(\d+)b(?![a-z])", lowered)
    billions = size.group(1) if size else None
    if "qwen2.5-vl" in lowered or "qwen2-5-vl" in lowered:
        return QWEN2_5_VL_7B if billions == "7" else None
    if "llava" not in lowered:
        return None
    if any(mark in lowered for mark in ("v1.6", "1.6-", "next")):
        if "mistral" in lowered:
            return LLAVA_NEXT_MISTRAL_7B if billions == "7" else None
        return {"7": LLAVA_NEXT_VICUNA_7B, "13": LLAVA_NEXT_VICUNA_13B}.get(billions)
    return {"7": LLAVA_15_7B, "13": LLAVA_15_13B}.get(billions)


def _check_family(configured: str, found: str, where: str) -> None:
    if configured not in ("auto", found):
        raise ValueError(f"model.family is {configured!r} but {where} is a {found!r} model; "
                         f"set model.family: auto or {found}")


def shape_from_config(cfg: ExperimentConfig) -> ModelShape:
    """The shape of the model `cfg` names: its folder's config.json, else the tiny built-in model of
    `model.family` (``auto``: LLaVA-1.5, as `tiny.tiny_family`).

    A `model.path` that is not on this machine (e.g. a cluster's /mnt/shared) is recognised by name
    (`shape_by_name`); any other missing folder is an error. Qwen2.5-VL's image budget is
    `model.max_image_pixels`, else the folder's preprocessor_config.json, else the released model's.
    """
    budget = cfg.model.max_image_pixels
    if not cfg.model.path:
        family = "llava" if cfg.model.family == "auto" else cfg.model.family
        shape = tiny_shape(cfg.model.tiny, family=family)
    else:
        folder = Path(cfg.model.path).expanduser()
        config_file = folder / "config.json"
        if config_file.is_file():
            try:
                raw = json.loads(config_file.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"{config_file}: not valid JSON ({error})") from None
            shape = shape_from_hf_config(raw, name=folder.name, max_pixels=processor_max_pixels(folder),
                                         source=str(config_file))
            _check_family(cfg.model.family, shape.family, f"{folder} (config.json model_type)")
        else:
            known = shape_by_name(folder.name)
            if known is None:
                raise ValueError(f"model.path {cfg.model.path}: no config.json there, and the folder name does not "
                                 "say which model it is; plan on a machine that has the model, or name the folder "
                                 "like llava-1.5-7b-hf, llava-v1.6-vicuna-7b-hf or Qwen2.5-VL-7B-Instruct")
            _check_family(cfg.model.family, known.family, f"the folder named {folder.name!r}")
            shape = replace(known, name=f"{known.name} (assumed from the name {folder.name!r})")
    if budget and shape.family == "qwen2_5_vl":
        shape = replace(shape, max_pixels=budget)
    return shape


# --------------------------------------------------------------------------------------------- memory
def layer_activation_bytes_per_token(shape: ModelShape, train_cfg: TrainConfig, seq_len: int,
                                     attn_implementation: str = "sdpa",
                                     calibration: float = ACTIVATION_CALIBRATION) -> float:
    """Bytes one decoder layer keeps for backward per token, calibrated (see the module docstring).

    Korthikanti et al. (2022) count 34*h + 5*heads*seq bytes per token per layer for a GPT layer with
    16-bit activations. Redone for a Llama layer with SwiGLU and SDPA/flash attention (no seq^2 term):
      attention   12*h       (q/k/v input, q, k, v, attention output, o_proj input)
      MLP         2*h + 8*i  (input, gate, up, silu(gate), gate*up)
      RMSNorm x2  12*h       (fp32 up-cast input 4h + normalised bf16 2h, each)
      LoRA        3*in + 2*r per target linear (dropout mask + dropped copy of its input, rank-r output)
      eager attention adds 5*heads*seq (scores, softmax, probabilities)
    fp32 training doubles the 16-bit terms. The sum is scaled by `calibration`.
    """
    h, i = shape.text_hidden, shape.text_intermediate
    count = 26 * h + 8 * i
    if train_cfg.lora.enabled:
        rank = train_cfg.lora.rank
        lora_dropout = 3 if train_cfg.lora.dropout > 0 else 0
        count += sum(lora_dropout * shape.linear_shape(m)[0] + 2 * rank for m in train_cfg.lora.target_modules)
    if attn_implementation == "eager":
        count += 5 * shape.text_heads * seq_len
    scale = 1.0 if train_cfg.bf16 else 2.0
    return calibration * count * scale


@dataclass
class MemoryPlan:
    """Per-GPU memory in GB by component, with what was assumed to get there."""

    model: str
    total_params: int          # the model's own parameters (vision + projector + LM), LoRA not included
    lora_params: int
    trainable_params: int
    lora: bool
    lora_rank: int
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    num_workers: int
    rows: int
    seq_len: int
    gradient_checkpointing: bool
    bf16: bool
    gpu_memory_gb: float
    components: dict[str, float]
    cpu_components: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    image_tokens: int = 0      # the most tokens one image takes (ModelShape.image_tokens)
    deepspeed: bool = True     # False: plain torch (DDP across workers), zero_stage 0

    @property
    def total_gb(self) -> float:
        return sum(self.components.values())

    @property
    def allocated_gb(self) -> float:
        """What torch's allocator holds at the peak: everything but the fixed overhead."""
        return self.total_gb - self.components.get("CUDA/NCCL overhead", 0.0)

    @property
    def cpu_gb(self) -> float:
        return sum(self.cpu_components.values())


def planned_gpu_memory_gb(scaling: ScalingSection) -> float:
    """The GPU memory a plan is made for: `scaling.gpu_memory_gb`, else `DEFAULT_GPU_MEMORY_GB`.

    Training workers fill `scaling.gpu_memory_gb` in with their card's own memory before they plan
    (`with_gpu_memory`), so only a plan made away from the GPUs falls back to the default.
    """
    return scaling.gpu_memory_gb if scaling.gpu_memory_gb is not None else DEFAULT_GPU_MEMORY_GB


def with_gpu_memory(cfg: ExperimentConfig, detected_gb: float | None) -> ExperimentConfig:
    """`cfg` planned for `detected_gb` (GiB of the GPU in hand) unless the config sets its own figure."""
    if cfg.scaling.gpu_memory_gb is not None or not detected_gb:
        return cfg
    return cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"gpu_memory_gb": float(detected_gb)})})


def reference_fill(train_cfg: TrainConfig, stage: str = "dpo") -> str | None:
    """Where a DPO run's missing reference log-probs are computed (``train.reference_fill``): "pass" (a Ray
    Data pass before training), "loop" (the training workers, adapters off, during the first epoch), or None
    (no cache: the reference forward runs every step). `auto` is the loop with LoRA and the pass without:
    full fine-tuning's reference would otherwise be a second model beside the policy on every GPU."""
    if stage != "dpo" or not train_cfg.reference_cache:
        return None
    if train_cfg.reference_fill == "auto":
        return "loop" if train_cfg.lora.enabled else "pass"
    return train_cfg.reference_fill  # loop without LoRA is refused when the config loads


def zero_stage_candidates(lora: bool, workers: int) -> tuple[int | None, ...]:
    """Stages to try for `zero_stage: auto`, fastest first (the seed notes: 0/1 > 2 > 3 > offload).

    LoRA: the measured fastest stage (on one GPU no DeepSpeed, `DEEPSPEED_OFF`), then ZeRO-3 for a frozen base
    that does not fit one GPU. Full fine-tuning: ZeRO-1 shards the optimizer, ZeRO-2 also the gradients,
    ZeRO-3 also the weights; on one GPU nothing is sharded, so only ZeRO-3 (the stage that can offload
    weights) is an alternative to 0 (DeepSpeed's ZeRO-0 keeps bf16 weights with fp32 master copies, where
    plain torch would train fp32 weights).
    """
    if lora:
        return (DEEPSPEED_OFF if workers < 2 else FASTEST_LORA_STAGE, 3)
    return (0, 3) if workers < 2 else (1, 2, 3)


def stage_name(stage: int | None) -> str:
    """How the plan and the logs name a stage `zero_stage_candidates` offers."""
    return "DeepSpeed off" if stage is DEEPSPEED_OFF else f"ZeRO-{stage}"


def choose_zero_stage(shape: ModelShape, train_cfg: TrainConfig, scaling: ScalingSection,
                      seq_len: int | None = None, *, attn_implementation: str = "sdpa") -> tuple[int | None, str]:
    """The ZeRO stage a run trains with, and why: the configured one, or for `auto` the first of
    `zero_stage_candidates` whose plan fits (gradient checkpointing as the config says, `auto` included);
    `DEEPSPEED_OFF` (None) for plain torch. When none fits, ZeRO-3 (the stage that shards and offloads most;
    `hadpo plan` then advises)."""
    ds = train_cfg.deepspeed
    if ds.zero_stage != "auto":
        return int(ds.zero_stage), "set in the config"
    lora = train_cfg.lora.enabled
    what = "LoRA" if lora else "full fine-tuning"
    gpu_gb = planned_gpu_memory_gb(scaling)
    candidates = zero_stage_candidates(lora, scaling.num_workers)
    for stage in candidates:
        plan = estimate_memory(shape, _with_stage(train_cfg, stage), scaling, seq_len,
                               attn_implementation=attn_implementation)
        if fits(plan):
            if stage is DEEPSPEED_OFF:
                reason = (f"{what} on 1 GPU of {gpu_gb:g} GB: fits unsharded, and with nothing to shard plain torch "
                          f"trains faster than DeepSpeed (est. {plan.total_gb:.1f} GB/GPU)")
            elif stage == candidates[0]:
                reason = (f"{what} on {scaling.num_workers} GPU(s) of {gpu_gb:g} GB: fits at the fastest stage "
                          f"(est. {plan.total_gb:.1f} GB/GPU)")
            else:
                reason = (f"{what} on {scaling.num_workers} GPU(s) of {gpu_gb:g} GB: {stage_name(candidates[0])} "
                          f"does not fit, ZeRO-{stage} does (est. {plan.total_gb:.1f} GB/GPU)")
            return stage, reason
    return 3, (f"{what} on {scaling.num_workers} GPU(s) of {gpu_gb:g} GB: fits at no stage without offload; "
               "ZeRO-3 (see the advice below)")


def _with_stage(train_cfg: TrainConfig, stage: int | None) -> TrainConfig:
    update = {"enabled": False, "zero_stage": 0} if stage is DEEPSPEED_OFF else {"zero_stage": stage}
    return train_cfg.model_copy(update={"deepspeed": train_cfg.deepspeed.model_copy(update=update)})


def resolve_zero_stage(cfg: ExperimentConfig, seq_len: int | None = None) -> tuple[ExperimentConfig, str]:
    """`cfg` with `train.deepspeed.zero_stage: auto` replaced by the planner's choice (a stage, or DeepSpeed
    turned off: `train.deepspeed.enabled` false), and the reason."""
    ds = cfg.train.deepspeed
    if not ds.enabled or ds.zero_stage != "auto":
        return cfg, "set in the config"
    stage, reason = choose_zero_stage(shape_from_config(cfg), cfg.train, cfg.scaling, seq_len,
                                      attn_implementation=cfg.model.attn_implementation)
    return cfg.model_copy(update={"train": _with_stage(cfg.train, stage)}), reason


def estimate_memory(shape: ModelShape, train_cfg: TrainConfig, scaling: ScalingSection,
                    seq_len: int | None = None, *, attn_implementation: str = "sdpa",
                    overhead_gb: float = OVERHEAD_GB) -> MemoryPlan:
    """Per-GPU memory of one DPO step (see the module docstring for each component's rule).

    seq_len defaults to train.max_length: the worst case, rows padded to the cap. HA-DPO rows are about
    611 prompt+image tokens plus the answer (739 with 128-token answers).
    """
    seq = int(seq_len or train_cfg.max_length)
    workers = scaling.num_workers
    ds = train_cfg.deepspeed
    notes: list[str] = []
    if scaling.gpu_memory_gb is None:
        notes.append(f"no GPU memory given or found here: planned for {DEFAULT_GPU_MEMORY_GB:g} GB per GPU "
                     "(set scaling.gpu_memory_gb; training workers plan for their own card)")
    if ds.enabled and ds.zero_stage == "auto":
        chosen, reason = choose_zero_stage(shape, train_cfg, scaling, seq_len, attn_implementation=attn_implementation)
        train_cfg = _with_stage(train_cfg, chosen)
        ds = train_cfg.deepspeed
        notes.append(f"ZeRO stage auto: {'DeepSpeed off' if chosen is DEEPSPEED_OFF else chosen} ({reason})")
    stage = ds.zero_stage if ds.enabled else 0
    offload_opt = ds.enabled and ds.offload_optimizer and stage >= 1
    offload_par = ds.enabled and ds.offload_params and stage == 3
    if ds.offload_optimizer and not offload_opt:
        notes.append("offload_optimizer needs DeepSpeed with ZeRO-1/2/3: ignored")
    if ds.offload_params and not offload_par:
        notes.append("offload_params needs DeepSpeed ZeRO-3: ignored")
    if not ds.enabled and (ds.zero_stage not in (0, "auto") or ds.offload_optimizer or ds.offload_params):
        notes.append("deepspeed.enabled is false: plain data parallel, nothing sharded")

    wbytes = 2.0 if train_cfg.bf16 else 4.0
    lora = train_cfg.lora.enabled
    lora_params = shape.lora_params(train_cfg.lora.rank, train_cfg.lora.target_modules) if lora else 0
    all_params = shape.total_params() + lora_params
    trainable = lora_params if lora else shape.lm_params() + shape.projector_params()

    weight_share = 1.0 / workers if stage == 3 else 1.0
    weights_gb = all_params * wbytes / GB
    components: dict[str, float] = {}
    cpu: dict[str, float] = {}
    components["weights"] = 0.0 if offload_par else weights_gb * weight_share
    if offload_par:
        cpu["weights"] = weights_gb / workers
    if stage == 3 and (workers > 1 or offload_par):
        layer = shape.lm_layer_params() + (lora_params // shape.text_layers)
        components["ZeRO-3 gathered layers"] = 2 * layer * wbytes / GB
    if stage == 3:  # calibrated on two measured points (module docstring)
        fp32_grads = 0.0 if offload_opt else trainable * 4.0 / workers
        components["ZeRO-3 buffers (fp32 grads, buckets, live params)"] = (
            fp32_grads + REDUCE_BUCKET_ELEMENTS * wbytes) / GB + ZERO3_BUFFERS_GB

    # The recipe's frozen reference for full fine-tuning is an unsharded copy made before DeepSpeed wraps
    # the policy; with the reference cache (the default) it needs none: its log-probs were precomputed.
    needs_copy = not lora and not train_cfg.reference_cache
    components["reference model"] = shape.total_params() * wbytes / GB if needs_copy else 0.0

    optimizer_gb = trainable * (12.0 if train_cfg.bf16 else 8.0) / GB
    optimizer_share = 1.0 / workers if stage >= 1 else 1.0
    components["optimizer (fp32 master + Adam)"] = 0.0 if offload_opt else optimizer_gb * optimizer_share
    if offload_opt:
        cpu["optimizer (fp32 master + Adam)"] = optimizer_gb * optimizer_share

    grad_share = 1.0 / workers if stage >= 2 else 1.0
    gradients_gb = trainable * wbytes * grad_share / GB
    if offload_opt:
        cpu["gradients (fp32)"] = trainable * 4.0 * grad_share / GB
        gradients_gb = min(gradients_gb, REDUCE_BUCKET_ELEMENTS * wbytes / GB)
    components["gradients"] = gradients_gb

    checkpointing = train_cfg.gradient_checkpointing
    if checkpointing == "auto":  # on only if the run does not fit without it
        without = estimate_memory(shape, train_cfg.model_copy(update={"gradient_checkpointing": False}), scaling,
                                  seq, attn_implementation=attn_implementation, overhead_gb=overhead_gb)
        checkpointing = not fits(without)
        notes.append(f"gradient checkpointing auto: {'on' if checkpointing else 'off'} "
                     f"({without.total_gb:.1f} GB without it, {planned_gpu_memory_gb(scaling):g} GB per GPU)")
    packed = train_cfg.prefix_sharing and shape.packs_pairs
    if train_cfg.prefix_sharing and not packed:
        notes.append(f"train.prefix_sharing: {shape.family} takes no packed pairs (its positions are not 1-D): "
                     "two rows per pair")
    if packed:  # one packed row [prompt, chosen, rejected] per pair
        rows = train_cfg.batch_size_per_worker
        row_tokens = max(seq, 2 * seq - min(seq, shape.image_tokens + PROMPT_TEXT_TOKENS))
    else:
        rows, row_tokens = 2 * train_cfg.batch_size_per_worker, seq
    tokens = rows * row_tokens
    act_bytes = 2.0 if train_cfg.bf16 else 4.0
    full_layer = layer_activation_bytes_per_token(shape, train_cfg, row_tokens, attn_implementation)
    if checkpointing:
        components["activations (checkpoints)"] = tokens * shape.text_hidden * act_bytes * shape.text_layers / GB
        components["activations (1 layer recomputed)"] = tokens * full_layer / GB
    else:
        every_layer = layer_activation_bytes_per_token(shape, train_cfg, row_tokens, attn_implementation,
                                                       NO_CHECKPOINT_CALIBRATION)
        components["activations (all layers)"] = tokens * every_layer * shape.text_layers / GB
    components["logits (fp32 log-softmax + copy)"] = tokens * shape.vocab_size * (4.0 + act_bytes) / GB
    components["CUDA/NCCL overhead"] = overhead_gb

    if shape.image_tokens + 32 > seq:
        notes.append(f"seq_len {seq} leaves little room beside the {shape.image_tokens} image tokens one image may "
                     "take" + (" (model.max_image_pixels lowers it)" if shape.family == "qwen2_5_vl" else ""))
    return MemoryPlan(
        model=shape.name, total_params=shape.total_params(), lora_params=lora_params,
        trainable_params=trainable, lora=lora,
        lora_rank=train_cfg.lora.rank if lora else 0, zero_stage=stage, offload_optimizer=offload_opt,
        offload_params=offload_par, num_workers=workers, rows=rows, seq_len=row_tokens,
        gradient_checkpointing=bool(checkpointing), bf16=train_cfg.bf16,
        gpu_memory_gb=planned_gpu_memory_gb(scaling), components=components, cpu_components=cpu, notes=notes,
        image_tokens=shape.image_tokens, deepspeed=ds.enabled,
    )


def plan_for(cfg: ExperimentConfig, seq_len: int | None = None) -> MemoryPlan:
    """`estimate_memory` for an experiment config."""
    return estimate_memory(shape_from_config(cfg), cfg.train, cfg.scaling, seq_len,
                           attn_implementation=cfg.model.attn_implementation)


def use_gradient_checkpointing(cfg: ExperimentConfig, seq_len: int | None = None) -> bool:
    """`train.gradient_checkpointing` resolved: "auto" asks the planner (GPU runs; CPU runs never need it)."""
    if cfg.train.gradient_checkpointing != "auto":
        return bool(cfg.train.gradient_checkpointing)
    return cfg.scaling.use_gpu and plan_for(cfg, seq_len).gradient_checkpointing


def fits(plan: MemoryPlan, gpu_memory_gb: float | None = None) -> bool:
    """True when the per-GPU total fits in `gpu_memory_gb` (default: the plan's scaling.gpu_memory_gb)."""
    return plan.total_gb <= (plan.gpu_memory_gb if gpu_memory_gb is None else gpu_memory_gb)


def weights_rule_of_thumb(params: int) -> dict[str, float]:
    """GB for one copy of the weights per precision: fp32 4, bf16 2, int8 1, int4 0.5 GB per billion."""
    return {precision: params / 1e9 * per_billion for precision, per_billion in BYTES_PER_PARAM.items()}


# --------------------------------------------------------------------------------------------- advice
@dataclass
class Fix:
    """One proposed configuration: each change as (short name, config keys), the config, its plan."""

    changes: list[tuple[str, str]]
    config: ExperimentConfig
    plan: MemoryPlan
    savings_gb: list[float] = field(default_factory=list)   # per change: GB it saves given the others
    _used: list = field(default_factory=list, repr=False)

    @property
    def fits(self) -> bool:
        return fits(self.plan)

    @property
    def summary(self) -> str:
        return " + ".join(short for short, _ in self.changes) or "no change"


# Each ladder step changes the config in place and says what it did as (short name, config keys), or
# returns None when it has nothing to change.
def _step_checkpointing(cfg: ExperimentConfig):
    if cfg.train.gradient_checkpointing is True:
        return None
    cfg.train.gradient_checkpointing = True
    return "gradient checkpointing", "train.gradient_checkpointing: true"


def _step_zero(stage: int):
    def step(cfg: ExperimentConfig):
        ds = cfg.train.deepspeed
        if cfg.scaling.num_workers < 2 or (ds.enabled and ds.zero_stage >= stage):
            return None
        ds.enabled, ds.zero_stage = True, stage
        return f"ZeRO-{stage}", f"train.deepspeed.zero_stage: {stage}"
    return step


def _step_halve_batch(cfg: ExperimentConfig):
    batch = cfg.train.batch_size_per_worker
    if batch < 2:
        return None
    cfg.train.batch_size_per_worker = batch // 2
    cfg.train.gradient_accumulation *= 2
    return "halve batch", ""          # `_apply` words all the halvings as one change


def _step_offload_optimizer(cfg: ExperimentConfig):
    ds = cfg.train.deepspeed
    if ds.enabled and ds.offload_optimizer and ds.zero_stage >= 1:
        return None
    ds.enabled, ds.offload_optimizer = True, True
    if ds.zero_stage < 2:
        ds.zero_stage = 2
        return "ZeRO-2 + CPU offload of the optimizer", "train.deepspeed: {zero_stage: 2, offload_optimizer: true}"
    return "CPU offload of the optimizer", "train.deepspeed.offload_optimizer: true"


def _step_offload_params(cfg: ExperimentConfig):
    ds = cfg.train.deepspeed
    if ds.enabled and ds.offload_params and ds.zero_stage == 3:
        return None
    ds.enabled, ds.offload_params, ds.zero_stage = True, True, 3
    return "ZeRO-3 + CPU offload of the weights", "train.deepspeed: {zero_stage: 3, offload_params: true}"


# Fastest first (the seed notes: ZeRO-1 > 2 > 3 > offload in speed). Smaller micro-batches keep the math
# through gradient accumulation and cost less speed than offloading, so they come before it.
_LADDER = [_step_checkpointing, _step_zero(2), _step_zero(3)] + [_step_halve_batch] * 10 + [
    _step_offload_optimizer, _step_offload_params]


def _apply(cfg: ExperimentConfig, steps) -> tuple[ExperimentConfig, list[tuple[str, str]]]:
    """`cfg` with `steps` applied, and the changes they made; repeated halvings become one change."""
    new = cfg.model_copy(deep=True)
    changes = [change for change in (step(new) for step in steps) if change]
    halvings = [i for i, (short, _) in enumerate(changes) if short == "halve batch"]
    if halvings:
        old_b, new_b = cfg.train.batch_size_per_worker, new.train.batch_size_per_worker
        old_a, new_a = cfg.train.gradient_accumulation, new.train.gradient_accumulation
        merged = (f"batch {old_b} -> {new_b} pairs/GPU x {new_a // old_a} accumulation",
                  f"train.batch_size_per_worker: {new_b}, train.gradient_accumulation: {new_a} "
                  "(same pairs per optimizer step)")
        changes = [c for i, c in enumerate(changes) if i not in halvings]
        changes.insert(halvings[0], merged)
    return new, changes


def _group(steps) -> list[list]:
    """Consecutive identical steps (the batch halvings) as one group: one change each."""
    groups: list[list] = []
    for step in steps:
        if groups and groups[-1][0] is step:
            groups[-1].append(step)
        else:
            groups.append([step])
    return groups


def find_fix(cfg: ExperimentConfig, seq_len: int | None = None) -> Fix:
    """Climb the ladder (re-estimating after each step) until the plan fits, then drop every step the
    fit does not need (e.g. restore the batch size once offloading made room). Returns the last
    candidate even when nothing fits: check `Fix.fits`."""
    cfg, _ = resolve_zero_stage(cfg, seq_len)  # the ladder climbs from the stage the run would use
    shape = shape_from_config(cfg)

    def estimate(steps) -> MemoryPlan:
        candidate = _apply(cfg, steps)[0]
        return estimate_memory(shape, candidate.train, candidate.scaling, seq_len,
                               attn_implementation=candidate.model.attn_implementation)

    used: list = []
    for step in _LADDER:
        if fits(estimate(used)):
            break
        if _apply(cfg, used + [step])[0] != _apply(cfg, used)[0]:      # the step changed something
            used.append(step)
    if fits(estimate(used)):
        for index in reversed(range(len(used))):
            trial = used[:index] + used[index + 1:]
            if fits(estimate(trial)):
                used = trial
    final, changes = _apply(cfg, used)
    plan = estimate(used)
    groups = _group(used)
    savings = [estimate([s for g in groups if g is not group for s in g]).total_gb - plan.total_gb
               for group in groups]
    return Fix(changes=changes, config=final, plan=plan, savings_gb=savings, _used=used)


def _params(count: int, digits: int = 2) -> str:
    return f"{count / 1e9:.{digits}f}B" if count >= 1e9 else f"{count / 1e6:.{max(digits, 1)}f}M"


def _gb(value: float) -> str:
    return f"{value:.1f} GB" if value >= 0.1 else f"{value * 1e3:.1f} MB"


def _label(plan: MemoryPlan) -> str:
    return f"{_params(plan.total_params, 0)} {'LoRA r%d' % plan.lora_rank if plan.lora else 'full'} DPO"


def lora_alternative(cfg: ExperimentConfig, seq_len: int | None = None) -> Fix | None:
    """For a full fine-tune: the cheapest LoRA configuration that fits (None if already LoRA)."""
    if cfg.train.lora.enabled:
        return None
    with_lora = cfg.model_copy(deep=True)
    with_lora.train.lora.enabled = True
    fix = find_fix(with_lora, seq_len)
    full_same_steps = _apply(cfg, fix._used)[0]
    fix.changes.insert(0, (f"LoRA r{cfg.train.lora.rank}", "train.lora.enabled: true"))
    fix.savings_gb.insert(0, plan_for(full_same_steps, seq_len).total_gb - fix.plan.total_gb)
    return fix


def advise(cfg: ExperimentConfig, seq_len: int | None = None) -> list[str]:
    """Concrete fixes, in the user's words, when the run does not fit; [] when it does.

    First line: "7B full DPO on 24 GB (est. 125.5 GB/GPU): needs A + B (est. X GB/GPU) or LoRA r128 (est. Y
    GB/GPU)"; then each change with its config keys and what it saves given the others; then the
    weights rule of thumb (fp32 4 / bf16 2 / int8 1 / int4 0.5 GB per billion parameters).
    """
    plan = plan_for(cfg, seq_len)
    if fits(plan):
        return []
    head = f"{_label(plan)} on {plan.gpu_memory_gb:g} GB (est. {plan.total_gb:.1f} GB/GPU)"
    options = [fix for fix in (find_fix(cfg, seq_len), lora_alternative(cfg, seq_len)) if fix is not None]
    fitting = [fix for fix in options if fix.fits]
    if fitting:
        lines = [head + ": needs " + " or ".join(f"{fix.summary} (est. {fix.plan.total_gb:.1f} GB/GPU)"
                                                 for fix in fitting)]
        for number, fix in enumerate(fitting, 1):
            prefix = f"option {number}, " if len(fitting) > 1 else ""
            lines.extend(f"- {prefix}{short}: {keys} (saves {saved:.1f} GB/GPU)"
                         for (short, keys), saved in zip(fix.changes, fix.savings_gb))
    else:
        best = min(options, key=lambda fix: fix.plan.total_gb)
        lines = [f"{head}: does not fit even with {best.summary} (est. {best.plan.total_gb:.1f} GB/GPU): "
                 "use GPUs with more memory, more workers with ZeRO-3, or shorter rows (train.max_length)"]
    rule = weights_rule_of_thumb(plan.total_params)
    lines.append(
        f"rule of thumb, one copy of the weights ({_params(plan.total_params)} params): "
        + ", ".join(f"{name} {_gb(gb)}" for name, gb in rule.items())
        + ("; full DPO keeps two (policy + reference)" if not plan.lora
           else "; LoRA's reference is the same weights with the adapters off")
    )
    return lines


# --------------------------------------------------------------------------------------------- output
def format_plan(plan: MemoryPlan) -> str:
    """A readable table: component, GB per GPU; the total against the GPU's memory; the verdict."""
    mode = f"LoRA r{plan.lora_rank}" if plan.lora else "full fine-tune"
    offload = [name for name, on in [("optimizer", plan.offload_optimizer), ("weights", plan.offload_params)] if on]
    lines = [
        f"{plan.model}: {_params(plan.total_params, 3)} params"
        + (f" + {_params(plan.lora_params, 1)} LoRA" if plan.lora else "")
        + f", {_params(plan.trainable_params, 2)} trainable ({mode}), {'bf16' if plan.bf16 else 'fp32'}",
        (f"ZeRO-{plan.zero_stage}" if plan.deepspeed else "DeepSpeed off (torch AdamW)")
        + f" over {plan.num_workers} worker(s)"
        + (f", CPU offload of {' and '.join(offload)}" if offload else "")
        + f"; {plan.rows} rows x {plan.seq_len} tokens per GPU"
        + f", gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'}"
        + (f"; up to {plan.image_tokens} tokens per image" if plan.image_tokens else ""),
        "",
    ]
    width = max(len(name) for name in list(plan.components) + ["total per GPU"]) + 2
    lines.append(f"{'component':<{width}}{'GB':>8}")
    lines.append("-" * (width + 8))
    for name, gb in plan.components.items():
        lines.append(f"{name:<{width}}{gb:>8.2f}")
    lines.append("-" * (width + 8))
    lines.append(f"{'total per GPU':<{width}}{plan.total_gb:>8.2f}")
    lines.append(f"{'GPU memory':<{width}}{plan.gpu_memory_gb:>8.2f}")
    if plan.cpu_components:
        lines.append(f"{'CPU memory per worker':<{width}}{plan.cpu_gb:>8.2f}  (offloaded)")
    verdict = ("FITS" if fits(plan) else "DOES NOT FIT") + \
        f" ({plan.gpu_memory_gb - plan.total_gb:+.1f} GB headroom; GB = 1e9 bytes)"
    lines.append(f"verdict: {verdict}")
    lines.extend(f"note: {note}" for note in plan.notes)
    return "\n".join(lines)


def main_plan(cfg: ExperimentConfig, seq_len: int | None = None) -> int:
    """`hadpo plan CONFIG`: print the plan and any fixes; 0 if it fits, 1 if not."""
    plan = plan_for(cfg, seq_len)
    print(format_plan(plan))
    advice = advise(cfg, seq_len)
    if advice:
        print()
        print("\n".join(advice))
    return 0 if fits(plan) else 1
