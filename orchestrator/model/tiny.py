"""Tiny models of every family, built from configs with no download, saved as ordinary HF folders.

`build_tiny_model` builds the family `model.family` names (``auto``: LLaVA-1.5) with the shapes of
`model.tiny` and a word-level tokenizer over the synthetic world's vocabulary:

- ``llava``: `llava.build_tiny_llava` (CLIP + projector + Llama), HA-DPO's setting;
- ``llava_next``: the same towers as `LlavaNextForConditionalGeneration`, anyres over a 1x2 / 2x1 / 2x2 grid of
  `image_size` tiles, a Vicuna-style chat template (``USER: <image>\\n... ASSISTANT:``);
- ``qwen2_5_vl``: `Qwen2_5_VLForConditionalGeneration` (windowed ViT with 2x2 patch merger, multimodal rotary
  positions), no BOS, ``<|im_end|>`` ending each turn, Qwen's chat template with its default system turn,
  images resized to about `image_size` px.

`ensure_model` returns the folder a config names, or builds the tiny one once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from orchestrator.config import ModelConfig, TinyModelConfig
from orchestrator.model.llava import CLIP_MEAN, CLIP_STD, build_tiny_llava, build_word_tokenizer, save_tiny_model
from orchestrator.model.templates import IMAGE_PLACEHOLDER

# LLaVA-NeXT's Vicuna chat template as llava-hf ships it for llava-v1.6-vicuna (system line, USER/ASSISTANT)
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }}"
    "{% else %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Qwen2.5-VL-Instruct's chat template (images and text of a turn in order, a default system turn)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIAL_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>",
                       "<|im_start|>", "<|im_end|>")
CHAT_WORDS = "system You are a helpful assistant . user USER ASSISTANT :"


def _llama_text_config(spec: TinyModelConfig, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads, max_position_embeddings=spec.max_positions * 4,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        initializer_range=spec.initializer_range,
    )


def build_tiny_llava_next(out_dir: str | Path, texts: list[str], spec: TinyModelConfig, seed: int = 0) -> Path:
    """A randomly initialised tiny LLaVA-NeXT (anyres over up to 2x2 tiles) saved as an HF folder."""
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessorPil, LlavaNextProcessor)

    out_dir = Path(out_dir)
    tokenizer = build_word_tokenizer(list(texts) + [CHAT_WORDS])
    size = spec.image_size
    pinpoints = [[size, 2 * size], [2 * size, size], [2 * size, 2 * size]]
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 4,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        image_size=size, patch_size=spec.patch_size, projection_dim=spec.vision_hidden,
        initializer_range=spec.initializer_range,
    )
    config = LlavaNextConfig(
        vision_config=vision, text_config=_llama_text_config(spec, len(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER), image_grid_pinpoints=pinpoints,
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    config.pad_token_id = 0
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_grid_pinpoints=pinpoints,
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_NEXT_CHAT_TEMPLATE)
    torch.manual_seed(seed)
    return save_tiny_model(out_dir, "LLaVA-NeXT", LlavaNextForConditionalGeneration(config), processor,
                           vocab=len(tokenizer))


def qwen_rope_sections(head_dim: int) -> list[int]:
    """Qwen2.5-VL's split of a head's rotary half into (time, height, width) sections: 16/24/24 of 64 at 7B,
    the same proportions (time the remainder) for a tiny head."""
    half = head_dim // 2
    height = width = (half * 3) // 8
    return [half - height - width, height, width]


def build_tiny_qwen2_5_vl(out_dir: str | Path, texts: list[str], spec: TinyModelConfig, seed: int = 0) -> Path:
    """A randomly initialised tiny Qwen2.5-VL saved as an HF folder (tokenizer, image processor, chat template).

    The processor class itself is not saved: it also wants a video processor, which needs torchvision;
    `families.load_model` reads the tokenizer and the image processor."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    out_dir = Path(out_dir)
    tokenizer = build_word_tokenizer(list(texts) + [CHAT_WORDS], special_tokens=QWEN_SPECIAL_TOKENS, bos=False,
                                     eos_token="<|im_end|>")
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    patch, merge = 14, 2
    side = -(-spec.image_size // (patch * merge)) * patch * merge  # the image size in whole merged patches
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": side * side, "longest_edge": side * side}, patch_size=patch, merge_size=merge,
        temporal_patch_size=2,
    )
    head_dim = spec.text_hidden // spec.text_heads
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
            num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
            num_key_value_heads=spec.text_heads, max_position_embeddings=spec.max_positions * 4,
            rms_norm_eps=1e-6, initializer_range=spec.initializer_range, tie_word_embeddings=False,
            rope_scaling={"type": "mrope", "mrope_section": qwen_rope_sections(head_dim)},
            bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=0,
        ),
        vision_config=dict(
            depth=spec.vision_layers, hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 4,
            num_heads=spec.vision_heads, out_hidden_size=spec.text_hidden, patch_size=patch,
            spatial_merge_size=merge, temporal_patch_size=2, window_size=2 * patch * merge,
            fullatt_block_indexes=[spec.vision_layers - 1], initializer_range=spec.initializer_range,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.pad_token_id, config.eos_token_id, config.bos_token_id = 0, ids["<|im_end|>"], None
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = 0
    save_tiny_model(out_dir, "Qwen2.5-VL", model, tokenizer, image_processor, vocab=len(tokenizer))
    (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_CHAT_TEMPLATE}, indent=2))
    return out_dir


TINY_BUILDERS = {"llava": build_tiny_llava, "llava_next": build_tiny_llava_next, "qwen2_5_vl": build_tiny_qwen2_5_vl}


def tiny_family(model_cfg: ModelConfig) -> str:
    """The family of the tiny model a config builds: `model.family`, LLaVA-1.5 for ``auto``."""
    return "llava" if model_cfg.family == "auto" else model_cfg.family


def build_tiny_model(out_dir: str | Path, texts: list[str], spec: TinyModelConfig, family: str = "llava",
                     seed: int = 0) -> Path:
    try:
        builder = TINY_BUILDERS[family]
    except KeyError:
        raise ValueError(f"no tiny model for family {family!r} (known: {sorted(TINY_BUILDERS)})") from None
    return builder(out_dir, texts, spec, seed=seed)


def ensure_model(model_cfg: ModelConfig, world_texts: list[str] | None, cache_dir: str | Path, seed: int = 0) -> Path:
    """The model folder a config names: its `path`, or the tiny model (of `model.family`) built once under
    `cache_dir`."""
    if model_cfg.path:
        return Path(model_cfg.path).expanduser().resolve()
    folder = Path(cache_dir)
    if not (folder / "config.json").is_file():
        if world_texts is None:
            raise ValueError("building the tiny model needs the world's texts for its vocabulary")
        build_tiny_model(folder, world_texts, model_cfg.tiny, tiny_family(model_cfg), seed=seed)
    return folder
