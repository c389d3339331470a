"""LoRA placement and the reference model: adapters disabled is the frozen base, exactly."""

import copy
from types import SimpleNamespace

import pytest
import torch

from orchestrator.data import datasets
from orchestrator.model.families import load_model
from orchestrator.train.collate import collate_preference
from orchestrator.model.lora import add_lora, freeze_vision, lora_target_regex
from orchestrator.train.recipe import reference_logps
from orchestrator.train.losses import sequence_logps
from orchestrator.train.pairs import score_pairs
from tests.train import tiny_config


@pytest.fixture(scope="module")
def setup(tiny_model_dir, synth_world, tmp_path_factory):
    world, _ = synth_world
    cfg = tiny_config(tmp_path_factory.mktemp("runs"), world, "train.lora.dropout=0.05")
    loaded = load_model(tiny_model_dir)
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


@pytest.mark.parametrize("packed", [True, False])
def test_ipo_loss_is_the_same_with_the_cached_reference_and_averages_over_answer_tokens(setup, synth_world,
                                                                                      tmp_path, packed):
    """IPO works with the reference cache: the cache holds sums, the token counts come from the batch."""
    from orchestrator.model.templates import encode_answer
    from orchestrator.train.pairs import collate_pairs, model_inputs_for
    from orchestrator.train.recipe import compute_loss
    from tests.train import as_batch, sample_preference_rows

    cfg, loaded, _ = setup
    train = cfg.train.model_copy(update={"loss": "ipo", "beta": 0.5})
    policy = add_lora(copy.deepcopy(loaded.model), cfg.train)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    policy.eval()
    engine = SimpleNamespace(module=policy, forward=policy, ds=None)
    rows = sample_preference_rows(tmp_path, synth_world[0], per_source=2)
    batch = as_batch(rows)
    in_loop = collate_pairs(batch, loaded, "v1", 256, packed=packed)
    cached = collate_pairs(batch, loaded, "v1", 256, packed=packed)
    no_autocast = torch.autocast("cpu", enabled=False)
    cached.reference = reference_logps(engine, None, cached, model_inputs_for(cached, "cpu", None, "sdpa"),
                                       no_autocast)
    with torch.no_grad():
        loss_in_loop, metrics = compute_loss(engine, None, in_loop, "dpo", train, torch.device("cpu"), False)
        loss_cached, _ = compute_loss(engine, None, cached, "dpo", train, torch.device("cpu"), False)
    torch.testing.assert_close(loss_cached, loss_in_loop, atol=1e-5, rtol=0)

    # by hand: x = (pi_c - ref_c)/n_c - (pi_r - ref_r)/n_r with n = the answer's tokens (and its </s>)
    with torch.no_grad():
        policy_chosen, policy_rejected = score_pairs(policy, in_loop, "cpu")
    reference_chosen, reference_rejected = cached.reference
    n_chosen = torch.tensor([float(len(encode_answer(loaded.tokenizer, r["chosen"]))) for r in rows])
    n_rejected = torch.tensor([float(len(encode_answer(loaded.tokenizer, r["rejected"]))) for r in rows])
    x = (policy_chosen - reference_chosen) / n_chosen - (policy_rejected - reference_rejected) / n_rejected
    expected = ((x - 1 / (2 * 0.5)) ** 2).mean()
    torch.testing.assert_close(loss_in_loop, expected, atol=1e-5, rtol=0)
    assert float(metrics["loss"]) == pytest.approx(expected.item(), abs=1e-5)


def test_in_loop_reference_values_reach_the_collation_when_the_step_settles_and_the_cache_at_flush(tmp_path):
    """The recipe's sink keeps what `add` gets as tensors until `settle` (after the optimizer step: reading them
    in the middle of the step would make the backward wait for the forwards); `flush` settles first."""
    from orchestrator.train.recipe import ReferenceSink
    from orchestrator.train.reference_cache import open_reference_cache

    folder = tmp_path / "cache"
    folder.mkdir()
    cached = {"a": (-1.0, -2.0)}
    sink = ReferenceSink(str(folder), rank=0, cached=cached)
    sink.add(["b", "c"], torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -6.0]))
    assert "b" not in cached
    sink.settle()
    assert cached["b"] == (-3.0, -4.0) and cached["c"] == (-5.0, -6.0)
    sink.add(["d"], torch.tensor([-7.0]), torch.tensor([-8.0]))
    sink.flush()
    assert open_reference_cache(folder).load() == {"b": (-3.0, -4.0), "c": (-5.0, -6.0), "d": (-7.0, -8.0)}
    assert cached["d"] == (-7.0, -8.0) and not sink.pending and not sink.unread
