"""Build the tiny LLaVA from configs, and load any llava-hf format folder with the same code.

The tiny model is an ordinary `LlavaForConditionalGeneration` (CLIP vision tower, 2-layer MLP projector,
Llama language model) with a word-level tokenizer built in-process from the synthetic world's
vocabulary, saved with its processor as a normal Hugging Face folder. `load_llava` then loads it, or a
real ``llava-hf/llava-1.5-7b-hf`` folder from disk, without ever reaching the hub.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from orchestrator.config import ModelConfig, TinyModelConfig
from orchestrator.model.templates import IMAGE_PLACEHOLDER, TEMPLATES, build_prompt

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in LLaMA; pad = unk (id 0) as in LLaVA
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    # Words and single punctuation marks: "cat." -> "cat", "." so a closed vocabulary covers every text.
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])


def build_word_tokenizer(texts: list[str]):
    """A word-level `PreTrainedTokenizerFast` whose vocabulary is every word of `texts` and the templates."""
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
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
        padding_side="left", clean_up_tokenization_spaces=True,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
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
    processor = llava_processor(tokenizer, spec.image_size, spec.patch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    log.info("built tiny LLaVA (%d parameters, vocab %d) at %s",
             sum(p.numel() for p in model.parameters()), len(tokenizer), out_dir)
    return out_dir


@dataclass
class LoadedLlava:
    model: torch.nn.Module
    processor: object
    tokenizer: object
    image_token_id: int
    tokens_per_image: int
    image_size: int
    image_mean: tuple[float, float, float]


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


def load_llava(path: str | Path, dtype: str = "auto", device: str | torch.device = "cpu",
               attn_implementation: str = "sdpa") -> LoadedLlava:
    """Load a llava-hf format folder (tiny or real) from local disk only."""
    from transformers import LlavaForConditionalGeneration

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a llava-hf model folder (no config.json)")
    from transformers.integrations import is_deepspeed_zero3_enabled

    torch_dtype = resolve_dtype(dtype, device)
    placement = {}
    if not is_deepspeed_zero3_enabled():  # ZeRO-3 partitions the weights itself and refuses a device_map
        target = torch.device(device)
        if target.type == "cuda" and target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        # the safetensors are read straight into `device`: no CPU copy of a 7B model first
        placement["device_map"] = {"": target}
    model = LlavaForConditionalGeneration.from_pretrained(
        str(path), dtype=torch_dtype, local_files_only=True, attn_implementation=attn_implementation, **placement,
    ).to(device)
    processor = load_processor(path)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token
    image_processor = processor.image_processor
    size = image_processor.crop_size["height"] if getattr(image_processor, "crop_size", None) else \
        model.config.vision_config.image_size
    return LoadedLlava(
        model=model, processor=processor, tokenizer=tokenizer,
        image_token_id=model.config.image_token_index, tokens_per_image=tokens_per_image(model.config),
        image_size=size, image_mean=tuple(image_processor.image_mean),
    )


def ensure_model(model_cfg: ModelConfig, world_texts: list[str] | None, cache_dir: str | Path, seed: int = 0) -> Path:
    """The model folder a config names: its `path`, or the tiny model built once under `cache_dir`."""
    if model_cfg.path:
        return Path(model_cfg.path).expanduser().resolve()
    folder = Path(cache_dir)
    if not (folder / "config.json").is_file():
        if world_texts is None:
            raise ValueError("building the tiny model needs the world's texts for its vocabulary")
        build_tiny_llava(folder, world_texts, model_cfg.tiny, seed=seed)
    return folder


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


def pixel_values(loaded: LoadedLlava, images: list[Image.Image]) -> torch.Tensor:
    """Preprocess RGB images (padded to square) into the vision tower's pixel tensor."""
    squared = [expand_to_square(image.convert("RGB"), loaded.image_mean) for image in images]
    return loaded.processor.image_processor(images=squared, return_tensors="pt")["pixel_values"]
