"""Every model family loads through one interface: tiny LLaVA-NeXT and Qwen2.5-VL folders built from configs,
prompts in HA-DPO's templates and in the model's chat template, images expanded to the tokens the model's own
vision code makes for them."""

import json

import pytest
import torch
from PIL import Image

from orchestrator.config import ModelConfig, TinyModelConfig
from orchestrator.model.families import FAMILIES, VisionInputs, family_of, load_model
from orchestrator.model.lora import freeze_vision
from orchestrator.model.templates import IMAGE_PLACEHOLDER
from orchestrator.model.tiny import ensure_model

IMAGES = [Image.new("RGB", (48, 48), (200, 10, 10)), Image.new("RGB", (64, 40), (10, 120, 30))]


def test_a_tiny_family_folder_is_an_ordinary_hf_folder_the_auto_class_loads(tiny_family_dir):
    from transformers import AutoModelForImageTextToText

    family = family_of(tiny_family_dir)
    assert family in ("llava_next", "qwen2_5_vl")
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_family_dir), local_files_only=True)
    assert type(model).__name__ == FAMILIES[family].model_class
    loaded = load_model(tiny_family_dir)
    assert loaded.family.name == family and loaded.tokenizer.padding_side == "left"
    assert loaded.chat_template  # the family's chat template travels with the folder


@pytest.mark.parametrize("template", ["v1", "chat"])
def test_prompt_images_expand_to_what_the_vision_code_makes(tiny_family_dir, template):
    """The model refuses a prompt whose image tokens do not match its image features, so a forward that runs
    and changes with the image proves the expansion; each image's count comes from the family's own rule."""
    loaded = load_model(tiny_family_dir)
    vision = loaded.vision_inputs(IMAGES)
    assert len(vision.tokens) == 2 and all(count > 0 for count in vision.tokens)
    if loaded.family.name == "qwen2_5_vl":  # 14 px patches merged 2x2
        assert vision.tokens == (vision.tensors["image_grid_thw"].prod(-1) // 4).tolist()
        assert vision.tokens[0] != vision.tokens[1]  # the 64x40 image is cut at its own aspect ratio
    ids = loaded.prompt_ids("Is there a dog in the image?", template, vision.tokens[:1])
    assert ids.count(loaded.image_token_id) == vision.tokens[0]
    assert loaded.tokenizer.unk_token_id not in ids
    logits = []
    for image in IMAGES:
        one = loaded.vision_inputs([image])
        ids = loaded.prompt_ids("Is there a dog in the image?", template, one.tokens)
        with torch.no_grad():
            logits.append(loaded.model(input_ids=torch.tensor([ids]), **one.to()).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1])


@pytest.mark.parametrize("tiny_family_dir", ["llava_next"], indirect=True)  # Qwen's processor class needs torchvision
def test_llava_next_prompt_ids_equal_its_processors(tiny_family_dir):
    loaded = load_model(tiny_family_dir)
    text = loaded.prompt_text("Is there a dog in the image?", "chat", 1)
    theirs = loaded.processor(text=[text], images=IMAGES[1:], return_tensors="pt")
    assert loaded.encode(text, loaded.vision_inputs(IMAGES[1:]).tokens) == theirs["input_ids"][0].tolist()


def test_chat_template_places_milebench_images_where_the_context_has_them(tiny_family_dir):
    loaded = load_model(tiny_family_dir)
    text = loaded.prompt_text(f"first {IMAGE_PLACEHOLDER} then {IMAGE_PLACEHOLDER} which?", "chat", 2)
    assert text.count(loaded.family.image_text) == 2
    if loaded.family.name == "qwen2_5_vl":  # Qwen's template keeps the turn's order
        assert text.index("first") < text.index(loaded.family.image_text) < text.index("then")


def test_vision_inputs_of_several_rows_concatenate(tiny_family_dir):
    loaded = load_model(tiny_family_dir)
    rows = [loaded.vision_inputs(IMAGES[:1]), loaded.vision_inputs(IMAGES[1:])]
    joined = VisionInputs.concat(rows)
    assert joined.tokens == rows[0].tokens + rows[1].tokens
    together = loaded.vision_inputs(IMAGES)
    for name, tensor in together.tensors.items():
        assert torch.equal(joined.tensors[name], tensor), name


def test_only_the_language_model_and_its_head_train(tiny_family_dir):
    loaded = load_model(tiny_family_dir)
    freeze_vision(loaded.model)
    trainable = {name for name, param in loaded.model.named_parameters() if param.requires_grad}
    assert trainable and all("language_model." in name or name.startswith("lm_head.") for name in trainable)
    vision = [name for name in dict(loaded.model.named_parameters()) if "visual" in name or "vision_tower" in name]
    assert vision and not set(vision) & trainable


def test_a_folder_of_another_family_is_refused_naming_both(tiny_family_dir, tiny_model_dir, tmp_path):
    found = family_of(tiny_family_dir)
    with pytest.raises(ValueError, match=rf"model.family is 'llava' but .* holds a '{found}' model"):
        load_model(tiny_family_dir, family="llava")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    with pytest.raises(ValueError, match=r"model_type 'idefics3' is not a supported family"):
        family_of(odd)
    assert family_of(tiny_model_dir) == "llava"


def test_the_tiny_model_of_the_configured_family_is_built(tmp_path):
    folder = ensure_model(ModelConfig(family="qwen2_5_vl", tiny=TinyModelConfig(text_layers=1, vision_layers=1)),
                          ["a cat"], tmp_path / "m")
    assert family_of(folder) == "qwen2_5_vl"


@pytest.mark.parametrize("tiny_family_dir", ["qwen2_5_vl"], indirect=True)
def test_model_max_image_pixels_lowers_qwens_image_budget(tiny_family_dir):
    from orchestrator.model.image_tokens import qwen_max_image_tokens

    default = load_model(tiny_family_dir)
    budget = 28 * 28 * 2  # two merged patches
    lowered = load_model(tiny_family_dir, max_image_pixels=budget)
    assert lowered.tokens_per_image == qwen_max_image_tokens(budget) == 2 < default.tokens_per_image
    square = IMAGES[0]
    assert lowered.vision_inputs([square]).tokens[0] <= 2 < default.vision_inputs([square]).tokens[0]
