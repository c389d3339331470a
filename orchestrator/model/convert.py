"""`hadpo convert`: original LLaVA-1.5 checkpoints and LoRA adapters on them -> llava-hf folders and peft adapters.

The original layout (haotian-liu/LLaVA, ``LlavaLlamaForCausalLM``; e.g. ``liuhaotian/llava-v1.5-7b``):
- ``config.json``: a Llama config plus ``mm_vision_tower`` (the CLIP folder or hub id), ``mm_hidden_size``,
  ``mm_projector_type`` (``mlp2x_gelu``: Linear, GELU, Linear), ``mm_vision_select_layer`` (-2),
  ``mm_vision_select_feature`` (``patch``: CLS dropped), ``mm_use_im_start_end`` / ``mm_use_im_patch_token``
  (both false for LLaVA-1.5), ``unfreeze_mm_vision_tower``; its ``model_type`` is LLaVA's own "llava", not
  transformers', so it is read as JSON, never through AutoConfig;
- weights (``pytorch_model-*.bin`` or ``*.safetensors``): the Llama keys ``model.embed_tokens``,
  ``model.layers.*``, ``model.norm``, ``lm_head``, and the projector ``model.mm_projector.{0,2}.*``; the
  vision tower is loaded by LLaVA from ``mm_vision_tower`` (``CLIPVisionModel.from_pretrained``, frozen), so
  it is taken from the CLIP folder here too. Tower tensors in the checkpoint
  (``model.vision_tower.vision_tower.*``) are used only when ``unfreeze_mm_vision_tower`` is true, as LLaVA's
  loader does (otherwise it builds the tower from the CLIP folder and ignores them);
- the tokenizer (LLaMA's, 32000 ids, no ``<image>`` token: LLaVA splices the image features in where
  ``tokenizer_image_token`` put the id -200).

The llava-hf layout follows transformers' ``models/llava/convert_llava_weights_to_hf.py``: the tokenizer gets
``<image>`` (special, not normalised) and ``<pad>`` as new tokens (ids 32000 and 32001), the embeddings and
``lm_head`` grow to the next multiple of 64 (32064), ``image_token_index`` and ``pad_token_id`` name the
new ids, the projector becomes ``multi_modal_projector.linear_{1,2}``. One deliberate deviation: transformers'
script fills the new rows with samples from N(mean, 1e-5 * covariance) of the old rows; we write the mean
itself, so a conversion is reproducible (the rows are the image placeholder, the padding and unused ids).
The converted processor has no chat template: the orchestrator builds LLaVA's v1 / llava_v1 prompts itself.

LLaVA-1.5 only. A transformers folder of a supported family (llava-hf LLaVA-1.5 or LLaVA-NeXT, Qwen2.5-VL) loads
as it is and is refused here naming its family; so are LLaVA-NeXT's original checkpoints (``mm_patch_merge_type``
``spatial_unpad``, or ``LlavaMistralForCausalLM``): their llava-hf releases need no conversion. An adapter's
``--base`` must be a LLaVA-1.5 (``model_type`` ``llava``): HA-DPO's LoRA would otherwise fit a LLaVA-NeXT's
identically named modules without complaint.

HA-DPO's released LoRA adapter for LLaVA-1.5 (opendatalab/HA-DPO ``train_dpo.py``) is a peft adapter on that
layout: targets every linear layer of the language model (``find_all_linear_names``: q/k/v/o/gate/up/down,
not the projector, the tower or ``lm_head``), keys ``base_model.model.model.layers.N.<block>.<proj>.lora_{A,B}
.weight``, plus ``non_lora_trainables.bin`` holding the projector (``initialize_vision_modules`` makes it
trainable again after LoRA froze it) that LLaVA's loader puts into the base before adding the LoRA. The
converted adapter renames the LoRA keys onto ``model.language_model.layers.N`` (target regex limited to the
language model, so CLIP's own q/k/v_proj get no LoRA), and carries the projector as peft
``modules_to_save=["multi_modal_projector"]``, so ``PeftModel.from_pretrained`` restores both.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch

from orchestrator.model.adapter import ADAPTER_CONFIG
from orchestrator.model.families import FAMILIES
from orchestrator.model.lora import lora_target_regex

log = logging.getLogger("hadpo.convert")

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
VOCAB_MULTIPLE = 64            # transformers' script pads the vocabulary to a multiple of 64 (32002 -> 32064)
SUPPORTED_ARCHITECTURES = ("LlavaLlamaForCausalLM",)

# original key prefix -> llava-hf module path (as `LlavaForConditionalGeneration.state_dict()` names it)
TEXT_PREFIXES = {"model.embed_tokens.": "model.language_model.embed_tokens.",
                 "model.layers.": "model.language_model.layers.",
                 "model.norm.": "model.language_model.norm.",
                 "lm_head.": "lm_head."}
PROJECTOR_PREFIXES = {"model.mm_projector.0.": "model.multi_modal_projector.linear_1.",
                      "model.mm_projector.2.": "model.multi_modal_projector.linear_2."}
ORIGINAL_TOWER_PREFIX = "model.vision_tower.vision_tower."   # LlavaMetaModel.vision_tower (CLIPVisionTower).vision_tower
HF_TOWER_PREFIX = "model.vision_tower."
HF_PROJECTOR_MODULE = "multi_modal_projector"
SELECT_FEATURE_STRATEGY = {"patch": "default", "cls_patch": "full"}
LLAMA_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                     "rope_scaling", "attention_bias", "initializer_range", "bos_token_id", "eos_token_id",
                     "pretraining_tp", "mlp_bias", "head_dim")
REQUIRED_LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
ORIGINAL_LORA_KEY = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight")


class ConversionError(ValueError):
    """An original checkpoint or adapter that cannot be converted; the message names the file and key."""


# ----------------------------------------------------------------------------------------------
# Reading the original files


def new_output_dir(path: str | Path) -> Path:
    """`path` resolved; refused when it holds files (stale shards of an earlier conversion would remain)."""
    out = Path(path).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out}: exists and is not empty; choose another --out or remove it")
    return out


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found") from None
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path}: not valid JSON ({error})") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """One ``.safetensors`` or ``.bin`` (torch pickle, read with weights_only) file's tensors."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # an old (non-zip) pickle cannot be memory-mapped
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict):
        raise ConversionError(f"{path}: expected a state dict, got {type(loaded).__name__}")
    return loaded


def weight_files(folder: Path) -> list[Path]:
    """A checkpoint's weight files: safetensors when present (via its index if sharded), else ``.bin``."""
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = folder / index_name
        if index.is_file():
            names = sorted(set(read_json(index).get("weight_map", {}).values()))
            missing = [name for name in names if not (folder / name).is_file()]
            if missing:
                raise ConversionError(f"{index}: shards {missing} are missing")
            return [folder / name for name in names]
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise ConversionError(f"{folder}: no weights (model*.safetensors or pytorch_model*.bin)")


def read_original_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of a checkpoint, and the file each key came from (for error messages)."""
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in weight_files(folder):
        for key, value in load_tensors(path).items():
            tensors[key] = value
            origin[key] = path
    return tensors, origin


# ----------------------------------------------------------------------------------------------
# Pure mappings


def rename_original_key(key: str) -> str | None:
    """The llava-hf name of an original text or projector key; None for keys handled elsewhere or dropped."""
    for prefixes in (TEXT_PREFIXES, PROJECTOR_PREFIXES):
        for old, new in prefixes.items():
            if key.startswith(old):
                return new + key[len(old):]
    return None


def is_dropped_key(key: str) -> bool:
    """Buffers recomputed from the config (rotary inv_freq), and LLaVA-NeXT's unused image_newline under
    ``mm_patch_merge_type=flat`` (transformers' script deletes it too)."""
    return key.endswith(".inv_freq") or key == "model.image_newline"


def padded_vocab_size(token_count: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return int(math.ceil(token_count / multiple) * multiple)


def grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` with new rows up to `rows`, each the mean of the old rows (computed in float32)."""
    extra = rows - weight.shape[0]
    if extra <= 0:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(extra, -1)], dim=0)


def select_strategy(original: dict, source: str) -> str:
    feature = original.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_FEATURE_STRATEGY:
        raise ConversionError(f"{source}: mm_vision_select_feature {feature!r} is not one of "
                              f"{list(SELECT_FEATURE_STRATEGY)}")
    return SELECT_FEATURE_STRATEGY[feature]


def check_original_config(original: dict, source: str) -> None:
    """Refuse what llava-hf's LLaVA cannot represent, naming the config key."""
    architectures = original.get("architectures") or []
    loadable = {family.model_class: family.name for family in FAMILIES.values()}
    already = [loadable[name] for name in architectures if name in loadable]
    if already:
        raise ConversionError(f"{source}: architectures {architectures}: a transformers {already[0]!r} model folder, "
                              "which needs no conversion (set model.path to it, model.family: auto); hadpo convert "
                              f"reads LLaVA-1.5's original layout only ({SUPPORTED_ARCHITECTURES[0]})")
    if not any(name in SUPPORTED_ARCHITECTURES for name in architectures):
        raise ConversionError(f"{source}: architectures {architectures} is not an original LLaVA-Llama checkpoint "
                              f"({SUPPORTED_ARCHITECTURES[0]}); hadpo convert reads LLaVA-1.5's original layout only "
                              "(LLaVA-NeXT and Qwen2.5-VL load from their transformers releases, e.g. "
                              "llava-hf/llava-v1.6-vicuna-7b-hf, with no conversion)")
    for key in REQUIRED_LLAMA_KEYS + ("mm_hidden_size",):
        if key not in original:
            raise ConversionError(f"{source}: missing key {key!r}")
    if original.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise ConversionError(f"{source}: mm_projector_type {original.get('mm_projector_type', 'linear')!r}; llava-hf's "
                              "projector is LLaVA-1.5's mlp2x_gelu (Linear, GELU, Linear)")
    for key in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if original.get(key):
            raise ConversionError(f"{source}: {key} is true; llava-hf has no image start/end/patch tokens "
                                  "(LLaVA-1.5 trains with both false)")
    merge_type = original.get("mm_patch_merge_type", "flat")
    if merge_type != "flat":
        raise ConversionError(f"{source}: mm_patch_merge_type {merge_type!r} (LLaVA-NeXT); only LLaVA-1.5's 'flat' "
                              "is converted: use LLaVA-NeXT's transformers release (llava-hf/llava-v1.6-*-hf) as it is")
    select_strategy(original, source)


def text_config(original: dict, vocab_size: int, pad_token_id: int):
    from transformers import LlamaConfig

    values = {key: original[key] for key in LLAMA_CONFIG_KEYS if original.get(key) is not None}
    values.update(vocab_size=vocab_size, pad_token_id=pad_token_id, tie_word_embeddings=False)
    return LlamaConfig(**values)


def llava_hf_config(original: dict, vision_config, vocab_size: int, image_token_id: int, pad_token_id: int,
                    source: str = "config.json"):
    from transformers import LlavaConfig

    if vision_config.hidden_size != original["mm_hidden_size"]:
        raise ConversionError(f"{source}: mm_hidden_size {original['mm_hidden_size']} but the vision tower's "
                              f"hidden_size is {vision_config.hidden_size}")
    strategy = select_strategy(original, source)
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config(original, vocab_size, pad_token_id),
        image_token_index=image_token_id, projector_hidden_act="gelu",  # nn.GELU(): exact erf GELU
        vision_feature_select_strategy=strategy, vision_feature_layer=original.get("mm_vision_select_layer", -1),
        image_seq_length=patches if strategy == "default" else patches + 1, multimodal_projector_bias=True,
    )
    config.pad_token_id = pad_token_id
    config.tie_word_embeddings = False
    return config


# ----------------------------------------------------------------------------------------------
# Checkpoint conversion


def vision_tower_dir(checkpoint: Path, original: dict, given: str | Path | None) -> Path:
    """The CLIP folder: `given`, else the checkpoint's ``mm_vision_tower`` when it is a local folder."""
    candidate = Path(given).expanduser() if given else Path(str(original.get("mm_vision_tower", ""))).expanduser()
    if given is None and not candidate.is_absolute():
        candidate = checkpoint / candidate if (checkpoint / candidate).is_dir() else candidate
    if not (candidate / "config.json").is_file():
        raise ConversionError(
            f"{checkpoint}: the vision tower {str(given or original.get('mm_vision_tower'))!r} is not a local folder "
            "with config.json; pass the CLIP folder (openai/clip-vit-large-patch14-336) with --vision-tower")
    return candidate.resolve()


def tower_tensors(original_weights: dict[str, torch.Tensor], unfreeze: bool, tower_dir: Path,
                  checkpoint: Path) -> dict[str, torch.Tensor]:
    """The vision tower's weights under llava-hf names, from where LLaVA's loader takes them."""
    from transformers import CLIPVisionModel

    clip = CLIPVisionModel.from_pretrained(str(tower_dir), local_files_only=True)
    wanted = clip.state_dict()
    in_checkpoint = {k[len(ORIGINAL_TOWER_PREFIX):]: v for k, v in original_weights.items()
                     if k.startswith(ORIGINAL_TOWER_PREFIX)}
    if unfreeze:
        if not in_checkpoint:
            raise ConversionError(f"{checkpoint}: unfreeze_mm_vision_tower is true but the checkpoint holds no "
                                  f"{ORIGINAL_TOWER_PREFIX}* tensors")
        tensors = {}
        for key, value in in_checkpoint.items():
            # CLIPVisionModel keys are "vision_model.<...>" on disk; transformers may name them without the prefix
            name = key if key in wanted else key.removeprefix("vision_model.")
            if name not in wanted:
                raise ConversionError(f"{checkpoint}: vision tower key {ORIGINAL_TOWER_PREFIX + key} matches no "
                                      f"parameter of the CLIP tower in {tower_dir}")
            tensors[name] = value
        missing = sorted(set(wanted) - set(tensors))
        if missing:
            raise ConversionError(f"{checkpoint}: the trained vision tower lacks {missing[:5]}")
        return {HF_TOWER_PREFIX + k: v for k, v in tensors.items()}
    if in_checkpoint:
        log.info("%s: %d vision-tower tensors in the checkpoint are not used: LLaVA loads the frozen tower "
                 "from mm_vision_tower (%s)", checkpoint, len(in_checkpoint), tower_dir)
    return {HF_TOWER_PREFIX + k: v for k, v in wanted.items()}


def converted_state_dict(original_weights: dict[str, torch.Tensor], origin: dict[str, Path],
                         vocab_size: int) -> dict[str, torch.Tensor]:
    """Text and projector tensors under llava-hf names, embeddings and lm_head grown to `vocab_size`."""
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in original_weights.items():
        if key.startswith(ORIGINAL_TOWER_PREFIX) or is_dropped_key(key):
            continue
        name = rename_original_key(key)
        if name is None:
            unknown.append(f"{key} ({origin[key].name})")
            continue
        converted[name] = value
    if unknown:
        raise ConversionError(f"keys of no known LLaVA-1.5 part: {unknown[:5]}" + (" ..." if len(unknown) > 5 else ""))
    embed = "model.language_model.embed_tokens.weight"
    if embed not in converted:
        raise ConversionError("the checkpoint has no model.embed_tokens.weight")
    if "lm_head.weight" not in converted:  # tied embeddings are saved once (transformers' script clones them)
        converted["lm_head.weight"] = converted[embed].clone()
    for name in (embed, "lm_head.weight"):
        converted[name] = grow_rows(converted[name], vocab_size)
    return converted


def load_original_tokenizer(folder: Path):
    """LLaVA's tokenizer. LLaMA ships only ``tokenizer.model`` (SentencePiece); transformers 5 reads that with
    the ``sentencepiece`` package, and without it fails with an unrelated tiktoken message: say so first."""
    from importlib.util import find_spec

    from transformers import AutoTokenizer

    if (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file() \
            and find_spec("sentencepiece") is None:
        raise ConversionError(f"{folder}: the tokenizer is a SentencePiece tokenizer.model, which needs the "
                              "sentencepiece package (not installed); install it, or pass --tokenizer with a folder "
                              "holding the same tokenizer as tokenizer.json")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def add_llava_tokens(tokenizer) -> tuple[int, int]:
    """Add ``<image>`` and ``<pad>`` as transformers' conversion script does; returns their ids."""
    from tokenizers import AddedToken

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})  # LLaVA pads with <unk>; llava-hf with its own <pad>
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.pad_token_id


def convert_llava_checkpoint(checkpoint: str | Path, out_dir: str | Path, vision_tower: str | Path | None = None,
                             dtype: str = "auto", max_shard_size: str = "5GB", tokenizer: str | Path | None = None) -> Path:
    """An original LLaVA-1.5 checkpoint folder (+ its CLIP folder) -> a llava-hf folder at `out_dir`.

    `dtype` "auto" keeps the checkpoint's ``torch_dtype`` (float16 for liuhaotian/llava-v1.5-7b);
    `tokenizer`: a folder to read the tokenizer from instead of the checkpoint's.
    """
    from accelerate import init_empty_weights
    from transformers import (AutoImageProcessor, CLIPVisionConfig, GenerationConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    checkpoint = Path(checkpoint).expanduser().resolve()
    out_dir = new_output_dir(out_dir)
    config_path = checkpoint / "config.json"
    original = read_json(config_path)
    check_original_config(original, str(config_path))
    tower_dir = vision_tower_dir(checkpoint, original, vision_tower)
    vision_config = CLIPVisionConfig.from_pretrained(str(tower_dir), local_files_only=True)

    tokenizer = load_original_tokenizer(Path(tokenizer).expanduser().resolve() if tokenizer else checkpoint)
    old_vocab = int(original["vocab_size"])
    image_token_id, pad_token_id = add_llava_tokens(tokenizer)
    vocab_size = max(padded_vocab_size(len(tokenizer)), old_vocab)
    if min(image_token_id, pad_token_id) < old_vocab:
        log.warning("%s: <image>/<pad> ids %d/%d fall inside the trained vocabulary (%d rows)", checkpoint,
                    image_token_id, pad_token_id, old_vocab)

    weights, origin = read_original_weights(checkpoint)
    state = converted_state_dict(weights, origin, vocab_size)
    state.update(tower_tensors(weights, bool(original.get("unfreeze_mm_vision_tower")), tower_dir, checkpoint))
    target = getattr(torch, dtype) if dtype != "auto" else \
        getattr(torch, str(original.get("torch_dtype") or "float16").replace("torch.", ""))
    state = {name: value.to(target) for name, value in state.items()}

    config = llava_hf_config(original, vision_config, vocab_size, image_token_id, pad_token_id, str(config_path))
    with init_empty_weights():  # no memory for the random init; buffers (positions, rotary) stay real
        model = LlavaForConditionalGeneration(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ConversionError(f"{checkpoint}: converted weights do not fit llava-hf's LLaVA: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=True, assign=True)
    model.to(target)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=pad_token_id)
    processor = LlavaProcessor(
        image_processor=AutoImageProcessor.from_pretrained(str(tower_dir), local_files_only=True),
        tokenizer=tokenizer, patch_size=vision_config.patch_size, image_token=IMAGE_TOKEN,
        vision_feature_select_strategy=config.vision_feature_select_strategy, num_additional_image_tokens=1,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    processor.save_pretrained(str(out_dir))
    log.info("converted %s (+ vision tower %s) -> %s: vocab %d -> %d, <image> %d, <pad> %d", checkpoint, tower_dir,
             out_dir, old_vocab, vocab_size, image_token_id, pad_token_id)
    return out_dir


# ----------------------------------------------------------------------------------------------
# Adapter conversion


def rename_original_lora_key(key: str) -> tuple[str, str] | None:
    """(llava-hf peft key, target module name) of an original-layout LoRA key, or None."""
    match = ORIGINAL_LORA_KEY.fullmatch(key)
    if not match:
        return None
    layer, block, module, which = match.groups()
    return (f"base_model.model.model.language_model.layers.{layer}.{block}.{module}.lora_{which}.weight", module)


def rename_non_lora_trainable(key: str) -> str | None:
    """The peft `modules_to_save` key of a ``non_lora_trainables.bin`` entry (projector only), or None.

    LLaVA's loader strips ``base_model.`` and then a leading ``model.`` from ``model.model.*`` keys before
    loading them into the base; the result is an original key such as ``model.mm_projector.0.weight``.
    """
    name = key[len("base_model."):] if key.startswith("base_model.") else key
    if name.startswith("model.model."):
        name = name[len("model."):]
    for old, new in PROJECTOR_PREFIXES.items():
        if name.startswith(old):
            return "base_model.model." + new + name[len(old):]
    return None


def expected_lora_shapes(text: dict, block: str, module: str, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(lora_A, lora_B) shapes of one Llama linear layer: A is (r, in), B is (out, r)."""
    hidden, inter = text["hidden_size"], text["intermediate_size"]
    head_dim = text.get("head_dim") or hidden // text["num_attention_heads"]
    kv = (text.get("num_key_value_heads") or text["num_attention_heads"]) * head_dim
    q = text["num_attention_heads"] * head_dim
    dims = {("self_attn", "q_proj"): (hidden, q), ("self_attn", "k_proj"): (hidden, kv),
            ("self_attn", "v_proj"): (hidden, kv), ("self_attn", "o_proj"): (q, hidden),
            ("mlp", "gate_proj"): (hidden, inter), ("mlp", "up_proj"): (hidden, inter),
            ("mlp", "down_proj"): (inter, hidden)}
    if (block, module) not in dims:
        raise ConversionError(f"{block}.{module} is not a linear layer of a Llama block")
    fan_in, fan_out = dims[(block, module)]
    return (rank, fan_in), (fan_out, rank)


def check_against_base(tensors: dict[str, torch.Tensor], base: Path, rank: int, source: str) -> None:
    """LoRA and projector shapes against the llava-hf base's config.json (no weights loaded); the base must be a
    LLaVA-1.5 (HA-DPO's adapters are LoRAs on it: on a LLaVA-NeXT the same module names would take them silently)."""
    config = read_json(base / "config.json")
    if config.get("model_type") != "llava":
        raise ConversionError(f"{base / 'config.json'}: model_type {config.get('model_type')!r}; the adapters "
                              "`hadpo convert adapter` reads are LoRAs on LLaVA-1.5, so --base must be the llava-hf "
                              "LLaVA-1.5 folder (model_type 'llava', e.g. made by `hadpo convert llava`)")
    text = config.get("text_config") or {}
    vision = config.get("vision_config") or {}
    for key, value in tensors.items():
        match = re.fullmatch(r"base_model\.model\.model\.language_model\.layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])\.weight",
                             key)
        if match:
            layer, block, module, which = match.groups()
            if int(layer) >= text.get("num_hidden_layers", 0):
                raise ConversionError(f"{source}: {key}: layer {layer} but {base} has {text.get('num_hidden_layers')}")
            shape_a, shape_b = expected_lora_shapes(text, block, module, rank)
            wanted = shape_a if which == "A" else shape_b
        elif ".multi_modal_projector.linear_1." in key:
            wanted = (text["hidden_size"], vision["hidden_size"]) if key.endswith("weight") else (text["hidden_size"],)
        elif ".multi_modal_projector.linear_2." in key:
            wanted = (text["hidden_size"],) * (2 if key.endswith("weight") else 1)
        else:
            continue
        if tuple(value.shape) != tuple(wanted):
            raise ConversionError(f"{source}: {key} has shape {tuple(value.shape)}, {base} needs {tuple(wanted)}")


def convert_llava_adapter(adapter_dir: str | Path, out_dir: str | Path, base_model: str | Path | None = None) -> Path:
    """An original-layout LoRA adapter (HA-DPO's) -> a peft adapter for the converted llava-hf model.

    `base_model`: the converted llava-hf folder; shapes are checked against its config and it is recorded
    as the adapter's ``base_model_name_or_path``.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    adapter_dir = Path(adapter_dir).expanduser().resolve()
    out_dir = new_output_dir(out_dir)
    config_path = adapter_dir / ADAPTER_CONFIG
    original = read_json(config_path)
    if original.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"{config_path}: peft_type {original.get('peft_type')!r}; only LoRA adapters")
    if original.get("bias", "none") != "none":
        raise ConversionError(f"{config_path}: bias {original.get('bias')!r}; only bias 'none' (HA-DPO's) is converted")
    for key in ("r", "lora_alpha"):
        if key not in original:
            raise ConversionError(f"{config_path}: missing key {key!r}")
    files = [adapter_dir / name for name in ("adapter_model.safetensors", "adapter_model.bin")
             if (adapter_dir / name).is_file()]
    if not files:
        raise ConversionError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin")
    weights_path = files[0]

    tensors: dict[str, torch.Tensor] = {}
    modules: set[str] = set()
    for key, value in load_tensors(weights_path).items():
        renamed = rename_original_lora_key(key)
        if renamed is None:
            raise ConversionError(f"{weights_path}: key {key!r} is not a LoRA weight of a language-model layer "
                                  "(base_model.model.model.layers.N.<self_attn|mlp>.<proj>.lora_<A|B>.weight)")
        tensors[renamed[0]] = value
        modules.add(renamed[1])
    declared = original.get("target_modules") or []
    if isinstance(declared, list) and declared and not modules <= set(declared):
        raise ConversionError(f"{config_path}: weights for {sorted(modules - set(declared))} but target_modules "
                              f"is {declared}")

    saved_modules = []
    extra = adapter_dir / "non_lora_trainables.bin"
    if extra.is_file():
        for key, value in load_tensors(extra).items():
            name = rename_non_lora_trainable(key)
            if name is None:
                raise ConversionError(f"{extra}: key {key!r} is not part of the projector (mm_projector.0/2); a peft "
                                      "adapter on llava-hf cannot carry it")
            tensors[name] = value
        saved_modules = [HF_PROJECTOR_MODULE]
        log.info("%s: the projector from %s is carried as modules_to_save", adapter_dir, extra.name)

    base = Path(base_model).expanduser().resolve() if base_model else None
    if base is not None:
        check_against_base(tensors, base, int(original["r"]), str(weights_path))
    config = LoraConfig(
        r=int(original["r"]), lora_alpha=original["lora_alpha"], lora_dropout=float(original.get("lora_dropout", 0.0)),
        bias="none", fan_in_fan_out=bool(original.get("fan_in_fan_out", False)),
        use_rslora=bool(original.get("use_rslora", False)), target_modules=lora_target_regex(sorted(modules)),
        modules_to_save=saved_modules or None, base_model_name_or_path=str(base) if base else None,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    log.info("converted adapter %s -> %s (%d LoRA tensors on %s%s)", adapter_dir, out_dir,
             sum(1 for k in tensors if ".lora_" in k), ", ".join(sorted(modules)),
             ", projector as modules_to_save" if saved_modules else "")
    return out_dir
