"""LoRA placement and the reference model: adapters disabled is the frozen base, exactly."""

import copy
from types import SimpleNamespace

import pytest
import torch

from orchestrator.data import datasets
from orchestrator.model.llava import load_llava
from orchestrator.train.collate import collate_preference
from orchestrator.train.recipe import add_lora, freeze_vision, lora_target_regex, reference_logps
from orchestrator.train.losses import sequence_logps
from tests.train import tiny_config


@pytest.fixture(scope="module")
def setup(tiny_model_dir, synth_world, tmp_path_factory):
    world, _ = synth_world
    cfg = tiny_config(tmp_path_factory.mktemp("runs"), world, "train.lora.dropout=0.05")
    loaded = load_llava(tiny_model_dir)
    rows = datasets.preference_rows(cfg)[:3]
    inputs = collate_preference({k: [r[k] for r in rows] for k in rows[0]}, loaded, "v1", 256)
    return cfg, loaded, inputs


def test_lora_targets_only_the_language_models_linear_layers(setup):
    cfg, loaded, _ = setup
    model = add_lora(copy.deepcopy(loaded.model), cfg.train)
    adapted = sorted({name.rsplit(".lora_", 1)[0] for name, _ in model.named_parameters() if ".lora_" in name})
    text_layers = cfg.model.tiny.text_layers
    assert len(adapted) == text_layers * len(cfg.train.lora.target_modules)
    assert all(".language_model." in name for name in adapted)
    assert not any(part in name for name in adapted for part in ("vision_tower", "multi_modal_projector", "lm_head"))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable)


def test_target_regex_rejects_vision_tower_projections():
    import re

    pattern = lora_target_regex(["q_proj", "down_proj"])
    assert re.fullmatch(pattern, "model.language_model.layers.0.self_attn.q_proj")
    assert re.fullmatch(pattern, "base_model.model.model.language_model.layers.11.mlp.down_proj")
    assert not re.fullmatch(pattern, "model.vision_tower.encoder.layers.0.self_attn.q_proj")
    assert not re.fullmatch(pattern, "model.multi_modal_projector.linear_1")
    assert not re.fullmatch(pattern, "lm_head")


def test_freeze_vision_freezes_tower_and_projector_only(setup):
    _, loaded, _ = setup
    model = copy.deepcopy(loaded.model)
    freeze_vision(model)
    for name, param in model.named_parameters():
        frozen = "vision_tower" in name or "multi_modal_projector" in name
        assert param.requires_grad != frozen, name


def test_reference_with_adapters_disabled_equals_a_frozen_deep_copy(setup):
    cfg, loaded, inputs = setup
    frozen = copy.deepcopy(loaded.model).eval().requires_grad_(False)
    policy = add_lora(copy.deepcopy(loaded.model), cfg.train)
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero: make the adapters matter
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    policy.train()  # dropout on: the reference must still be exact
    model_inputs = inputs.model_inputs()
    engine = SimpleNamespace(module=policy)
    no_autocast = torch.autocast("cpu", enabled=False)
    with_adapters_off = torch.cat(reference_logps(engine, None, inputs, model_inputs, no_autocast))
    copy_logps = torch.cat(reference_logps(engine, frozen, inputs, model_inputs, no_autocast))
    torch.testing.assert_close(with_adapters_off, copy_logps, atol=1e-5, rtol=0)
    with torch.no_grad():
        policy_logps = sequence_logps(policy(**model_inputs).logits, inputs.labels)
    assert (policy_logps - copy_logps).abs().max() > 1e-2  # the adapters really change the policy
