"""LLaVA-1.5 itself: the tiny LLaVA built from configs, the word tokenizer every tiny model uses, and
LLaVA-1.5's image preprocessing (pad to square, CLIP normalisation).

The tiny model is an ordinary `LlavaForConditionalGeneration` (CLIP vision tower, 2-layer MLP projector,
Llama language model) with a word-level tokenizer built in-process from the synthetic world's
vocabulary, saved with its processor as a normal Hugging Face folder. `families.load_model` then loads
it, or a real ``llava-hf/llava-1.5-7b-hf`` folder from disk, without ever reaching the hub.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

from orchestrator.config import TinyModelConfig
from orchestrator.model.templates import IMAGE_PLACEHOLDER, TEMPLATES, build_prompt

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in LLaMA; pad = unk (id 0) as in LLaVA
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    # Words and single punctuation marks: "cat." -> "cat", "." so a closed vocabulary covers every text.
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])


def build_word_tokenizer(texts: list[str], special_tokens: tuple[str, ...] = (IMAGE_PLACEHOLDER,), bos: bool = True,
                         eos_token: str = "</s>"):
    """A word-level `PreTrainedTokenizerFast` whose vocabulary is every word of `texts` and the templates.

    `special_tokens` are added whole (never split into words): LLaVA's ``<image>``, or Qwen's vision and
    chat markers. Without `bos` no ``<s>`` is put first (Qwen's tokenizers add none); `eos_token` is
    what ends an answer (``</s>``, or Qwen's ``<|im_end|>``, one of `special_tokens`)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    pre = _pre_tokenizer()
    corpus = list(texts) + [build_prompt("", name, num_images=0) for name in TEMPLATES]
    words = sorted({piece for text in corpus for piece, _ in pre.pre_tokenize_str(text)})
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words, tidies " ." and " ,"
    if bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>" if bos else None, eos_token="</s>", unk_token="<unk>",
        pad_token="<unk>", padding_side="left", clean_up_tokenization_spaces=True,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    if eos_token != "</s>":
        tokenizer.eos_token = eos_token
    return tokenizer


def llava_processor(tokenizer, image_size: int, patch_size: int):
    """LLaVA's processor for a CLIP tower of `image_size` px and `patch_size` patches: CLIP's resize, centre
    crop and normalisation (`CLIP_MEAN`, `CLIP_STD`), and one <image> expanded to (size/patch)^2 tokens
    (the CLS token counted, then dropped: the `default` feature strategy)."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )


def build_tiny_llava(out_dir: str | Path, texts: list[str], spec: TinyModelConfig, seed: int = 0) -> Path:
    """Build a randomly initialised tiny LLaVA for `texts`' vocabulary and save it as an HF folder."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    out_dir = Path(out_dir)
    tokenizer = build_word_tokenizer(texts)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    patches = (spec.image_size // spec.patch_size) ** 2
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 4,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.vision_hidden,
        initializer_range=spec.initializer_range,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads, max_position_embeddings=spec.max_positions,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        initializer_range=spec.initializer_range,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        image_seq_length=patches, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    config.pad_token_id = 0
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    return save_tiny_model(out_dir, "LLaVA", model, llava_processor(tokenizer, spec.image_size, spec.patch_size),
                           vocab=len(tokenizer))


def save_tiny_model(out_dir: Path, label: str, model, *processing, vocab: int) -> Path:
    """Save a tiny model built from configs and what turns text and images into its inputs (`processing`: a
    processor, or a tokenizer and an image processor) as one Hugging Face folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for part in processing:
        part.save_pretrained(out_dir)
    log.info("built tiny %s (%d parameters, vocab %d) at %s",
             label, sum(p.numel() for p in model.parameters()), vocab, out_dir)
    return out_dir


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """`auto` is bfloat16 on a GPU and float32 on the CPU (CPU bf16 is slow and inexact here)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)


def load_processor(path: str | Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(path), local_files_only=True)


def tokens_per_image(model_config) -> int:
    """Image tokens one image expands to: (size/patch)^2, CLS dropped by the `default` strategy."""
    vision = model_config.vision_config
    count = (vision.image_size // vision.patch_size) ** 2
    return count if model_config.vision_feature_select_strategy == "default" else count + 1


def expand_to_square(image: Image.Image, background: tuple[float, float, float]) -> Image.Image:
    """Pad to a square with the CLIP mean colour, as LLaVA-1.5's ``image_aspect_ratio=pad``."""
    width, height = image.size
    if width == height:
        return image
    fill = tuple(int(round(channel * 255)) for channel in background)
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def pixel_values(source, images: list[Image.Image]) -> torch.Tensor:
    """LLaVA-1.5's vision input: RGB images padded to square with the CLIP mean, then CLIP's resize, crop and
    normalisation. `source` has the model's `image_processor` and `image_mean` (a `LoadedModel` has both)."""
    squared = [expand_to_square(image.convert("RGB"), source.image_mean) for image in images]
    return source.image_processor(images=squared, return_tensors="pt")["pixel_values"]
