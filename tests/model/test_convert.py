"""`hadpo convert`: an original-layout LLaVA-1.5 checkpoint and HA-DPO-style adapter, built here with the real key
names (random weights, tiny config), converted and compared with the original model's own computation.

The reference is LLaVA's forward written out independently of any llava-hf code: the Llama keys loaded
strictly into `LlamaForCausalLM`, CLIP's hidden state `mm_vision_select_layer` with the CLS token dropped,
the `mlp2x_gelu` projector as `nn.Sequential(Linear, GELU, Linear)`, and the features spliced in where
LLaVA's `tokenizer_image_token` puts the id -200 (haotian-liu/LLaVA, `prepare_inputs_labels_for_multimodal`).
All in float32; logits agree to atol 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from orchestrator.model.convert import (ConversionError, convert_llava_adapter, convert_llava_checkpoint, grow_rows,
                                        padded_vocab_size, rename_non_lora_trainable, rename_original_key,
                                        rename_original_lora_key)

IMAGE_TOKEN_INDEX = -200   # llava/constants.py
WORDS = ["USER", "ASSISTANT", ":", "?", ".", "Is", "there", "a", "cat", "dog", "in", "the", "image", "Yes", "No",
         "A", "chat", "between", "user", "and", "assistant"]
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.2)
VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, image_size=28,
              patch_size=14, initializer_range=0.2)
SELECT_LAYER = -2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATOL = 1e-5
PROMPT = "A chat between a user and assistant. USER: <image>\nIs there a cat in the image? ASSISTANT:"


def llama_tokenizer_without_image_token():
    """A word-level stand-in for LLaMA's tokenizer as LLaVA saves it: no <image> token, pad = unk."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")


def original_config(vocab_size: int, clip_dir: Path, **changes) -> dict:
    """config.json as LLaVA-1.5 writes it (liuhaotian/llava-v1.5-7b's keys, tiny sizes)."""
    config = {"_name_or_path": "./checkpoints/vicuna-7b-v1-5", "architectures": ["LlavaLlamaForCausalLM"],
              "model_type": "llava", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu",
              **TEXT, "vocab_size": vocab_size, "pretraining_tp": 1, "rope_scaling": None, "tie_word_embeddings": False,
              "torch_dtype": "float32", "transformers_version": "4.31.0", "use_cache": True, "max_length": 4096,
              "freeze_mm_mlp_adapter": False, "image_aspect_ratio": "pad", "mm_hidden_size": VISION["hidden_size"],
              "mm_projector_lr": None, "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False,
              "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
              "mm_vision_select_layer": SELECT_LAYER, "mm_vision_tower": str(clip_dir), "tune_mm_mlp_adapter": False,
              "unfreeze_mm_vision_tower": False, "use_mm_proj": True}
    config.update(changes)
    return config


def build_clip_folder(folder: Path) -> Path:
    """A CLIPModel folder as openai/clip-vit-large-patch14-336 is laid out (vision_model.* + text_model.*)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(1)
    clip = CLIPModel(CLIPConfig(vision_config=VISION, text_config=dict(hidden_size=16, intermediate_size=32,
                                                                        num_hidden_layers=1, num_attention_heads=2)))
    clip.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": VISION["image_size"]}, crop_size={"height": VISION["image_size"],
                                                                                "width": VISION["image_size"]},
                       image_mean=[0.48145466, 0.4578275, 0.40821073],
                       image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(folder)
    return folder


def original_state_dict(vocab_size: int, seed: int = 2) -> dict[str, torch.Tensor]:
    """Random weights under LlavaLlamaForCausalLM's names: the Llama keys and model.mm_projector.{0,2}."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=False, **TEXT))
    state = dict(llama.state_dict())
    projector = torch.nn.Sequential(torch.nn.Linear(VISION["hidden_size"], TEXT["hidden_size"]), torch.nn.GELU(),
                                    torch.nn.Linear(TEXT["hidden_size"], TEXT["hidden_size"]))
    for name, value in projector.state_dict().items():
        state[f"model.mm_projector.{name}"] = value * 4  # larger than the default init: the image must matter
    return state


def save_original_checkpoint(folder: Path, state: dict, config: dict, tokenizer, extra: dict | None = None) -> Path:
    """Two pytorch_model-*.bin shards and their index, as liuhaotian/llava-v1.5-7b ships."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {**state, **(extra or {})}
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, names in shards.items():
        torch.save({k: state[k].clone() for k in names}, folder / name)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}))
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava-original")
    tokenizer = llama_tokenizer_without_image_token()
    vocab = len(tokenizer)
    clip_dir = build_clip_folder(root / "clip-vit")
    state = original_state_dict(vocab)
    # what an old save can hold besides: a rotary buffer, and a (stale) copy of the frozen tower LLaVA ignores
    stale_tower = {"model.vision_tower.vision_tower.vision_model.post_layernorm.weight": torch.full((24,), 7.0)}
    rotary = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    checkpoint = save_original_checkpoint(root / "llava-v1.5-tiny", state, original_config(vocab, clip_dir), tokenizer,
                                          {**stale_tower, **rotary})
    converted = convert_llava_checkpoint(checkpoint, root / "llava-1.5-tiny-hf", max_shard_size="100KB")
    return {"root": root, "clip": clip_dir, "checkpoint": checkpoint, "converted": converted, "state": state,
            "vocab": vocab, "tokenizer": tokenizer}


def original_llava_logits(state: dict, clip_dir: Path, ids: list[int], pixels: torch.Tensor,
                          projector_state: dict | None = None) -> torch.Tensor:
    """LLaVA-1.5's forward from the original weights, with no llava-hf code."""
    from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=state["model.embed_tokens.weight"].shape[0],
                                         tie_word_embeddings=False, **TEXT))
    llama.load_state_dict({k: v for k, v in state.items() if not k.startswith("model.mm_projector.")}, strict=True)
    projector = torch.nn.Sequential(torch.nn.Linear(VISION["hidden_size"], TEXT["hidden_size"]), torch.nn.GELU(),
                                    torch.nn.Linear(TEXT["hidden_size"], TEXT["hidden_size"]))
    projector.load_state_dict(projector_state or {k.removeprefix("model.mm_projector."): v for k, v in state.items()
                                                  if k.startswith("model.mm_projector.")})
    tower = CLIPVisionModel.from_pretrained(str(clip_dir))  # CLIPVisionTower.load_model
    with torch.no_grad():
        features = tower(pixels, output_hidden_states=True).hidden_states[SELECT_LAYER][:, 1:]  # 'patch'
        features = projector(features)[0]
        cut = ids.index(IMAGE_TOKEN_INDEX)
        embed = llama.get_input_embeddings()
        embeds = torch.cat([embed(torch.tensor(ids[:cut])), features, embed(torch.tensor(ids[cut + 1:]))])
        return llama(inputs_embeds=embeds[None]).logits[0]


def converted_inputs(converted: Path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(converted))
    image = Image.new("RGB", (40, 28), (200, 30, 60))
    image.paste((20, 180, 90), (0, 0, 20, 14))
    return processor, processor(text=PROMPT, images=image, return_tensors="pt")


def as_original_ids(input_ids: torch.Tensor, image_token_id: int) -> list[int]:
    """The expanded llava-hf ids with the image run collapsed to LLaVA's single -200."""
    ids, out = input_ids[0].tolist(), []
    for token in ids:
        if token == image_token_id:
            if not out or out[-1] != IMAGE_TOKEN_INDEX:
                out.append(IMAGE_TOKEN_INDEX)
        else:
            out.append(token)
    return out


# ----------------------------------------------------------------------------------------------


def test_key_renames_follow_transformers_conversion_script():
    assert rename_original_key("model.layers.3.self_attn.q_proj.weight") == \
        "model.language_model.layers.3.self_attn.q_proj.weight"
    assert rename_original_key("model.embed_tokens.weight") == "model.language_model.embed_tokens.weight"
    assert rename_original_key("model.norm.weight") == "model.language_model.norm.weight"
    assert rename_original_key("lm_head.weight") == "lm_head.weight"
    assert rename_original_key("model.mm_projector.0.bias") == "model.multi_modal_projector.linear_1.bias"
    assert rename_original_key("model.mm_projector.2.weight") == "model.multi_modal_projector.linear_2.weight"
    assert rename_original_key("model.vision_tower.vision_tower.vision_model.post_layernorm.weight") is None
    assert padded_vocab_size(32002) == 32064 and padded_vocab_size(64) == 64


def test_new_embedding_rows_are_the_mean_of_the_old_rows():
    weight = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    grown = grow_rows(weight, 4)
    assert grown.tolist() == [[1.0, 2.0], [3.0, 6.0], [2.0, 4.0], [2.0, 4.0]]


def test_converted_checkpoint_is_a_llava_hf_folder_with_image_and_pad_tokens(original):
    converted, vocab = original["converted"], original["vocab"]
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["image_token_index"] == vocab and config["pad_token_id"] == vocab + 1  # 32000 / 32001 for LLaMA
    assert config["text_config"]["vocab_size"] == padded_vocab_size(vocab + 2) == 64
    assert config["vision_feature_layer"] == SELECT_LAYER and config["vision_feature_select_strategy"] == "default"
    assert (converted / "model.safetensors.index.json").is_file()  # sharded
    assert len(list(converted.glob("model-*.safetensors"))) > 1
    generation = json.loads((converted / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, vocab + 1)
    processor, inputs = converted_inputs(converted)
    assert processor.tokenizer.convert_ids_to_tokens([vocab, vocab + 1]) == ["<image>", "<pad>"]
    # <image> is expanded into one id per patch: (28 / 14)^2, CLS dropped
    assert int((inputs["input_ids"] == vocab).sum()) == (VISION["image_size"] // VISION["patch_size"]) ** 2


def test_converted_model_gives_the_original_llava_logits(original):
    from transformers import AutoModelForImageTextToText

    converted, vocab = original["converted"], original["vocab"]
    model = AutoModelForImageTextToText.from_pretrained(str(converted)).eval()  # plain transformers, no our code
    _, inputs = converted_inputs(converted)
    with torch.no_grad():
        ours = model(**inputs).logits[0]
    reference = original_llava_logits(original["state"], original["clip"], as_original_ids(inputs["input_ids"], vocab),
                                      inputs["pixel_values"])
    assert ours.shape[0] == reference.shape[0]
    torch.testing.assert_close(ours[:, :vocab], reference, atol=ATOL, rtol=0)
    assert (ours[:, :vocab] - ours[:, :vocab].mean()).abs().max() > 1  # the logits are not trivially flat


def test_converted_model_equals_an_independently_built_llava_hf_model(original):
    """Same weights placed by hand module by module into a llava-hf model configured by hand."""
    from transformers import (AutoModelForImageTextToText, CLIPVisionModel, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)

    converted, vocab, state = original["converted"], original["vocab"], original["state"]
    rows = padded_vocab_size(vocab + 2)
    config = LlavaConfig(vision_config=CLIPVisionModel.config_class(**VISION),
                         text_config=LlamaConfig(vocab_size=rows, tie_word_embeddings=False, **TEXT),
                         image_token_index=vocab, vision_feature_layer=SELECT_LAYER,
                         vision_feature_select_strategy="default", image_seq_length=4)
    reference = LlavaForConditionalGeneration(config).eval()

    def grown(weight):
        return torch.cat([weight, weight.mean(0, keepdim=True).expand(rows - vocab, -1)])

    text = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.") and "mm_projector" not in k}
    text["embed_tokens.weight"] = grown(text["embed_tokens.weight"])
    reference.model.language_model.load_state_dict(text, strict=True)
    reference.lm_head.weight.data.copy_(grown(state["lm_head.weight"]))
    reference.model.vision_tower.load_state_dict(CLIPVisionModel.from_pretrained(str(original["clip"])).state_dict())
    projector = reference.model.multi_modal_projector
    for ours, theirs in ((projector.linear_1, "0"), (projector.linear_2, "2")):
        ours.weight.data.copy_(state[f"model.mm_projector.{theirs}.weight"])
        ours.bias.data.copy_(state[f"model.mm_projector.{theirs}.bias"])
    model = AutoModelForImageTextToText.from_pretrained(str(converted)).eval()
    _, inputs = converted_inputs(converted)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, atol=ATOL, rtol=0)


def test_stale_tower_copy_in_the_checkpoint_is_ignored_unless_the_tower_was_unfrozen(original, tmp_path):
    from transformers import AutoModelForImageTextToText

    tower = AutoModelForImageTextToText.from_pretrained(str(original["converted"])).model.vision_tower
    assert not torch.equal(tower.post_layernorm.weight, torch.full((24,), 7.0))  # CLIP folder's, as LLaVA loads it
    config = original_config(original["vocab"], original["clip"], unfreeze_mm_vision_tower=True)
    checkpoint = save_original_checkpoint(tmp_path / "unfrozen", original["state"], config, original["tokenizer"],
                                          {"model.vision_tower.vision_tower.vision_model.post_layernorm.weight":
                                           torch.full((24,), 7.0)})
    with pytest.raises(ConversionError, match="trained vision tower lacks"):
        convert_llava_checkpoint(checkpoint, tmp_path / "out")


@pytest.mark.parametrize("change, message", [
    ({"mm_projector_type": "linear"}, "mm_projector_type 'linear'"),
    ({"mm_use_im_start_end": True}, "mm_use_im_start_end is true"),
    ({"architectures": ["LlavaMistralForCausalLM"]}, "not an original LLaVA-Llama checkpoint"),
    ({"mm_hidden_size": 99}, "mm_hidden_size 99"),
])
def test_unconvertible_configs_are_refused_naming_the_key(original, tmp_path, change, message):
    config = original_config(original["vocab"], original["clip"], **change)
    checkpoint = save_original_checkpoint(tmp_path / "bad", original["state"], config, original["tokenizer"])
    with pytest.raises(ConversionError, match=message) as error:
        convert_llava_checkpoint(checkpoint, tmp_path / "out")
    assert "config.json" in str(error.value)


def test_unknown_weight_key_is_refused_naming_key_and_file(original, tmp_path):
    config = original_config(original["vocab"], original["clip"])
    checkpoint = save_original_checkpoint(tmp_path / "extra", original["state"], config, original["tokenizer"],
                                          {"model.vision_resampler.weight": torch.zeros(2)})
    with pytest.raises(ConversionError, match=r"model\.vision_resampler\.weight \(pytorch_model-0000\d-of-00002\.bin\)"):
        convert_llava_checkpoint(checkpoint, tmp_path / "out")


def test_existing_output_folder_is_refused_before_any_work(original):
    with pytest.raises(ConversionError, match="not empty"):
        convert_llava_checkpoint(original["checkpoint"], original["converted"])


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("sentencepiece") is not None,
                    reason="sentencepiece is installed: the tokenizer.model would be read")
def test_sentencepiece_tokenizer_without_the_package_is_a_clear_error(original, tmp_path):
    config = original_config(original["vocab"], original["clip"])
    checkpoint = save_original_checkpoint(tmp_path / "spm", original["state"], config, original["tokenizer"])
    (checkpoint / "tokenizer.json").unlink()
    (checkpoint / "tokenizer.model").write_bytes(b"\x0a\x00")  # LLaMA ships only this SentencePiece file
    with pytest.raises(ConversionError, match="sentencepiece package"):
        convert_llava_checkpoint(checkpoint, tmp_path / "out")
    # a folder with the same tokenizer as tokenizer.json is the way around it
    out = convert_llava_checkpoint(checkpoint, tmp_path / "out", tokenizer=original["checkpoint"])
    assert (out / "tokenizer.json").is_file()


def test_missing_vision_tower_folder_is_a_clear_error(original, tmp_path):
    config = original_config(original["vocab"], "openai/clip-vit-large-patch14-336")
    checkpoint = save_original_checkpoint(tmp_path / "hubid", original["state"], config, original["tokenizer"])
    with pytest.raises(ConversionError, match="--vision-tower"):
        convert_llava_checkpoint(checkpoint, tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# HA-DPO's adapter


def original_adapter(folder: Path, rank: int = 2, alpha: int = 4, seed: int = 3) -> tuple[dict, dict]:
    """A LoRA adapter as HA-DPO's train_dpo.py saves it with peft 0.4 (+ non_lora_trainables.bin)."""
    from transformers import LlamaConfig

    torch.manual_seed(seed)
    text = LlamaConfig(**TEXT)
    head = text.hidden_size // text.num_attention_heads
    dims = {"q_proj": (32, 32), "k_proj": (32, 2 * head), "v_proj": (32, 2 * head), "o_proj": (32, 32),
            "gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)}
    lora = {}
    for layer in range(TEXT["num_hidden_layers"]):
        for module, (fan_in, fan_out) in dims.items():
            block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            lora[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in) * 0.3
            lora[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank) * 0.3
    projector = {"base_model.model.model.mm_projector.0.weight": torch.randn(32, VISION["hidden_size"]) * 0.5,
                 "base_model.model.model.mm_projector.0.bias": torch.randn(32) * 0.1,
                 "base_model.model.model.mm_projector.2.weight": torch.randn(32, 32) * 0.5,
                 "base_model.model.model.mm_projector.2.bias": torch.randn(32) * 0.1}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(lora, folder / "adapter_model.bin")
    torch.save(projector, folder / "non_lora_trainables.bin")
    (folder / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": "liuhaotian/llava-v1.5-7b", "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "layers_pattern": None, "layers_to_transform": None,
        "lora_alpha": alpha, "lora_dropout": 0.05, "modules_to_save": None, "peft_type": "LORA", "r": rank,
        "revision": None, "target_modules": ["down_proj", "o_proj", "k_proj", "up_proj", "gate_proj", "v_proj",
                                             "q_proj"], "task_type": "CAUSAL_LM"}))
    return lora, projector


def test_lora_and_projector_keys_are_renamed_onto_the_llava_hf_model():
    assert rename_original_lora_key("base_model.model.model.layers.7.mlp.down_proj.lora_B.weight") == \
        ("base_model.model.model.language_model.layers.7.mlp.down_proj.lora_B.weight", "down_proj")
    assert rename_original_lora_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")[0] == \
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    assert rename_original_lora_key("base_model.model.lm_head.lora_A.weight") is None
    # LLaVA's loader: strip "base_model.", then "model." from "model.model.*"
    assert rename_non_lora_trainable("base_model.model.model.mm_projector.2.bias") == \
        "base_model.model.model.multi_modal_projector.linear_2.bias"
    assert rename_non_lora_trainable("base_model.model.model.embed_tokens.weight") is None


def test_converted_hadpo_adapter_gives_the_original_lora_logits(original, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    rank, alpha = 2, 4
    lora, projector = original_adapter(tmp_path / "hadpo-llava-1.5", rank, alpha)
    out = convert_llava_adapter(tmp_path / "hadpo-llava-1.5", tmp_path / "peft", base_model=original["converted"])
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["multi_modal_projector"]
    assert saved["base_model_name_or_path"] == str(original["converted"])

    base = AutoModelForImageTextToText.from_pretrained(str(original["converted"])).eval()
    model = PeftModel.from_pretrained(base, str(out)).eval()
    adapted = {name for name, module in model.named_modules() if hasattr(module, "lora_A") and len(module.lora_A)}
    assert adapted and all(".language_model." in name for name in adapted)  # not CLIP's q/k/v_proj
    _, inputs = converted_inputs(original["converted"])
    with torch.no_grad():
        ours = model(**inputs).logits[0]

    # the original: W + (alpha / r) B A in every adapted layer, the projector from non_lora_trainables.bin
    state = {k: v.clone() for k, v in original["state"].items()}
    for key, a in lora.items():
        if ".lora_A." in key:
            prefix = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = lora[key.replace("lora_A", "lora_B")]
            state[f"{prefix}.weight"] += (alpha / rank) * b @ a
    projector_state = {k.removeprefix("base_model.model.model.mm_projector."): v for k, v in projector.items()}
    vocab = original["vocab"]
    reference = original_llava_logits(state, original["clip"], as_original_ids(inputs["input_ids"], vocab),
                                      inputs["pixel_values"], projector_state)
    torch.testing.assert_close(ours[:, :vocab], reference, atol=ATOL, rtol=0)
    with torch.no_grad(), model.disable_adapter():
        assert (model(**inputs).logits[0, :, :vocab] - reference).abs().max() > 1e-2  # the adapter matters


def test_adapter_that_does_not_fit_the_base_is_refused(original, tmp_path):
    original_adapter(tmp_path / "adapter", rank=2)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["r"] = 3  # the weights are rank 2
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"lora_A\.weight has shape \(2, 32\).*needs \(3, 32\)"):
        convert_llava_adapter(tmp_path / "adapter", tmp_path / "out", base_model=original["converted"])


def test_adapter_key_outside_the_language_model_is_refused(tmp_path):
    lora, _ = original_adapter(tmp_path / "adapter")
    lora["base_model.model.lm_head.lora_A.weight"] = torch.zeros(2, 32)
    torch.save(lora, tmp_path / "adapter" / "adapter_model.bin")
    with pytest.raises(ConversionError, match=r"adapter_model\.bin: key 'base_model\.model\.lm_head\.lora_A\.weight'"):
        convert_llava_adapter(tmp_path / "adapter", tmp_path / "out")


def test_cli_converts_checkpoint_and_adapter(original, tmp_path):
    from orchestrator.cli import main

    out = tmp_path / "hf"
    assert main(["convert", "llava", str(original["checkpoint"]), "--vision-tower", str(original["clip"]),
                 "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "processor_config.json").is_file()
    original_adapter(tmp_path / "hadpo")
    assert main(["convert", "adapter", str(tmp_path / "hadpo"), "--base", str(out), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


def test_a_transformers_folder_of_any_family_is_refused_as_needing_no_conversion(tiny_model_dir, tiny_family_dir,
                                                                                 tmp_path):
    from orchestrator.model.families import family_of

    for folder in (tiny_model_dir, tiny_family_dir):
        family = family_of(folder)
        with pytest.raises(ConversionError, match=f"a transformers '{family}' model folder, which needs no conversion"):
            convert_llava_checkpoint(folder, tmp_path / "out")
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_adapter_onto_a_base_of_another_family_is_refused(tiny_family_dir, tmp_path):
    """HA-DPO's LoRA names LLaVA-1.5's modules; a LLaVA-NeXT has the same names and would take it silently."""
    original_adapter(tmp_path / "adapter")
    with pytest.raises(ConversionError, match=r"model_type '(llava_next|qwen2_5_vl)'.*--base must be the llava-hf "
                                              r"LLaVA-1\.5 folder"):
        convert_llava_adapter(tmp_path / "adapter", tmp_path / "out", base_model=tiny_family_dir)
