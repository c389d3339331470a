import json

import torch
from PIL import Image

from orchestrator.config import ModelConfig, TinyModelConfig
from orchestrator.model.families import load_model
from orchestrator.model.llava import build_word_tokenizer, expand_to_square, pixel_values, tokens_per_image
from orchestrator.model.tiny import ensure_model
from orchestrator.model.templates import build_prompt, encode_prompt


def test_word_tokenizer_round_trips_world_text():
    tokenizer = build_word_tokenizer(["No, there is no cat in the image."])
    ids = tokenizer("No, there is no cat in the image.", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == "No, there is no cat in the image."
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


def test_tiny_model_is_an_ordinary_llava_hf_folder(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    loaded = load_model(tiny_model_dir)
    assert loaded.tokens_per_image == (48 // 16) ** 2
    assert loaded.tokenizer.padding_side == "left"


def test_processor_and_our_encoding_agree(tiny_model_dir):
    """The hand-built ids (used by training) equal what LlavaProcessor makes for the same prompt."""
    loaded = load_model(tiny_model_dir)
    prompt = build_prompt("Is there a cat in the image?", "llava_v1")
    ours = encode_prompt(loaded.tokenizer, prompt, loaded.image_token_id, loaded.tokens_per_image)
    theirs = loaded.processor(text=[prompt], images=[Image.new("RGB", (64, 64))], return_tensors="pt")
    assert theirs["input_ids"][0].tolist() == ours


def test_forward_with_image_gives_a_finite_loss(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    ids = encode_prompt(loaded.tokenizer, build_prompt("Describe this image in detail."),
                        loaded.image_token_id, loaded.tokens_per_image)
    pixels = pixel_values(loaded, [Image.new("RGB", (80, 40), (200, 10, 10))])
    assert pixels.shape == (1, 3, 48, 48)
    out = loaded.model(input_ids=torch.tensor([ids]), pixel_values=pixels, labels=torch.tensor([ids]))
    assert torch.isfinite(out.loss)


def test_padding_to_square_uses_the_clip_mean_colour():
    squared = expand_to_square(Image.new("RGB", (40, 20), (255, 0, 0)), (0.5, 0.25, 0.0))
    assert squared.size == (40, 40)
    assert squared.getpixel((0, 0)) == (128, 64, 0) and squared.getpixel((20, 20)) == (255, 0, 0)


def test_ensure_model_builds_once_and_honours_a_given_path(tmp_path):
    folder = ensure_model(ModelConfig(tiny=TinyModelConfig(text_layers=1, vision_layers=1)), ["a cat"], tmp_path / "m")
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert ensure_model(ModelConfig(), None, tmp_path / "m") == folder
    assert (folder / "config.json").stat().st_mtime_ns == stamp
    assert ensure_model(ModelConfig(path=str(tmp_path / "real")), None, tmp_path / "x") == tmp_path / "real"


def test_image_token_count_follows_the_vision_config(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    assert tokens_per_image(loaded.model.config) == 9


def test_load_model_places_the_checkpoint_on_the_device_unchanged(tiny_model_dir):
    from transformers import LlavaForConditionalGeneration

    loaded = load_model(tiny_model_dir, device=torch.device("cpu"))   # read through device_map={"": device}
    plain = LlavaForConditionalGeneration.from_pretrained(str(tiny_model_dir), dtype=torch.float32,
                                                          local_files_only=True)
    ours, theirs = loaded.model.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    assert not any(hasattr(module, "_hf_hook") for module in loaded.model.modules())   # no dispatch hooks
