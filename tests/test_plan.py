import json
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from orchestrator.config import ScalingSection, TinyModelConfig, TrainConfig, config_from_dict
from orchestrator.plan import (LLAVA_15_7B, MemoryPlan, advise, estimate_memory, find_fix, fits, format_plan,
                               lora_alternative, main_plan, plan_for, shape_from_config, tiny_shape,
                               weights_rule_of_thumb)

# The one measured point (shared/docs/GPU.md): 7B, LoRA r128 on all LM linears, 4 pairs, 611 prompt+image
# + 128 answer tokens, gradient checkpointing, adapters-off reference, one H100, bf16: 22.9 GB peak.
MEASURED_GB = 22.9
MEASURED_SEQ = 739


def train(**changes) -> TrainConfig:
    raw = {"batch_size_per_worker": 4, "max_length": MEASURED_SEQ, "gradient_checkpointing": True, "bf16": True,
           "prefix_sharing": False, "lora": {"enabled": True, "rank": 128}, "deepspeed": {"enabled": True, "zero_stage": 2}}
    for key, value in changes.items():
        if isinstance(value, dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return TrainConfig.model_validate(raw)


def scaling(workers: int = 1, gpu_gb: float = 80.0) -> ScalingSection:
    return ScalingSection(num_workers=workers, use_gpu=True, gpu_memory_gb=gpu_gb)


def seven_b_config(**sections):
    raw = {"model": {"path": "/mnt/shared/models/llava-1.5-7b-hf"}}
    raw.update(sections)
    return config_from_dict(raw)


def test_7b_parameter_counts_match_the_published_sizes():
    assert LLAVA_15_7B.total_params() == pytest.approx(7.06e9, rel=0.01)
    assert LLAVA_15_7B.lm_params_without_embeddings() == pytest.approx(6.48e9, rel=0.01)
    assert LLAVA_15_7B.vision_params() == pytest.approx(303.5e6, rel=0.01)      # CLIP ViT-L/14-336
    assert LLAVA_15_7B.projector_params() == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert LLAVA_15_7B.image_tokens == 576
    # Counted by building the model in transformers on the meta device (not repeated here: slow import).
    assert LLAVA_15_7B.total_params() == 7_063_427_072


def test_lora_r128_parameter_count_by_hand():
    h, i, r, layers = 4096, 11008, 128, 32
    attention = 4 * r * (h + h)                   # q, k, v, o: 4096 -> 4096
    mlp = 2 * r * (h + i) + r * (i + h)           # gate, up: 4096 -> 11008; down: 11008 -> 4096
    assert LLAVA_15_7B.lora_params(128) == layers * (attention + mlp) == 319_815_680
    assert LLAVA_15_7B.lora_params(8, ["q_proj", "v_proj"]) == 32 * 2 * 8 * (4096 + 4096)


def test_unknown_lora_target_is_named():
    with pytest.raises(ValueError, match="unknown module 'fc1'"):
        LLAVA_15_7B.lora_params(8, ["fc1"])


def test_calibration_point_matches_the_measured_peak():
    plan = estimate_memory(LLAVA_15_7B, train(), scaling(1))
    assert plan.rows == 8 and plan.seq_len == MEASURED_SEQ
    assert plan.total_gb == pytest.approx(MEASURED_GB, rel=0.10)
    # The measurement is torch's allocator peak: everything but the fixed CUDA/NCCL overhead.
    assert plan.allocated_gb == pytest.approx(MEASURED_GB, rel=0.02)
    assert plan.components["reference model"] == 0.0           # LoRA: adapters disabled, no copy


def test_zero3_divides_weight_memory_by_the_number_of_workers():
    one = estimate_memory(LLAVA_15_7B, train(deepspeed={"zero_stage": 3}), scaling(1))
    eight = estimate_memory(LLAVA_15_7B, train(deepspeed={"zero_stage": 3}), scaling(8))
    assert eight.components["weights"] == pytest.approx(one.components["weights"] / 8)
    zero2 = estimate_memory(LLAVA_15_7B, train(deepspeed={"zero_stage": 2}), scaling(8))
    assert zero2.components["weights"] == pytest.approx(one.components["weights"])   # ZeRO-2 keeps them whole
    assert eight.total_gb < zero2.total_gb


def test_zero_stages_shard_optimizer_then_gradients():
    def plan(stage):
        return estimate_memory(LLAVA_15_7B, train(lora={"enabled": False}, deepspeed={"zero_stage": stage}),
                               scaling(4))
    p0, p1, p2 = plan(0), plan(1), plan(2)
    optimizer = "optimizer (fp32 master + Adam)"
    assert p1.components[optimizer] == pytest.approx(p0.components[optimizer] / 4)
    assert p1.components["gradients"] == pytest.approx(p0.components["gradients"])
    assert p2.components["gradients"] == pytest.approx(p0.components["gradients"] / 4)


def test_offload_moves_optimizer_state_off_the_gpu():
    on_gpu = estimate_memory(LLAVA_15_7B, train(), scaling(1))
    offloaded = estimate_memory(LLAVA_15_7B, train(deepspeed={"offload_optimizer": True}), scaling(1))
    key = "optimizer (fp32 master + Adam)"
    assert on_gpu.components[key] == pytest.approx(319_815_680 * 12 / 1e9)
    assert offloaded.components[key] == 0.0
    assert offloaded.cpu_components[key] == pytest.approx(on_gpu.components[key])
    assert offloaded.total_gb < on_gpu.total_gb


def test_offload_params_needs_zero3_and_moves_weights_to_cpu():
    ignored = estimate_memory(LLAVA_15_7B, train(deepspeed={"offload_params": True}), scaling(1))
    assert ignored.components["weights"] > 14 and any("ZeRO-3" in note for note in ignored.notes)
    moved = estimate_memory(LLAVA_15_7B, train(deepspeed={"zero_stage": 3, "offload_params": True}), scaling(1))
    assert moved.components["weights"] == 0.0 and moved.cpu_components["weights"] > 14


def test_gradient_checkpointing_reduces_activations():
    def activations(plan: MemoryPlan) -> float:
        return sum(gb for name, gb in plan.components.items() if name.startswith("activations"))
    with_ckpt = estimate_memory(LLAVA_15_7B, train(gradient_checkpointing=True), scaling(1))
    without = estimate_memory(LLAVA_15_7B, train(gradient_checkpointing=False), scaling(1))
    assert activations(without) > 5 * activations(with_ckpt)


def test_full_fine_tune_keeps_an_unsharded_reference_copy_only_without_the_cache():
    uncached = train(lora={"enabled": False}, reference_cache=False)
    full = estimate_memory(LLAVA_15_7B, uncached, scaling(1))
    assert full.components["reference model"] == pytest.approx(LLAVA_15_7B.total_params() * 2 / 1e9)
    assert full.trainable_params == LLAVA_15_7B.lm_params() + LLAVA_15_7B.projector_params()
    # the recipe copies the model before DeepSpeed wraps it: ZeRO-3 does not shard the copy
    sharded = estimate_memory(LLAVA_15_7B, uncached.model_copy(update={"deepspeed": uncached.deepspeed.model_copy(
        update={"zero_stage": 3})}), scaling(4))
    assert sharded.components["reference model"] == pytest.approx(full.components["reference model"])
    cached = estimate_memory(LLAVA_15_7B, train(lora={"enabled": False}), scaling(1))
    assert cached.components["reference model"] == 0.0


def test_7b_full_dpo_on_24gb_does_not_fit_and_the_advice_fits():
    cfg = seven_b_config(train={"lora": {"enabled": False}, "batch_size_per_worker": 1, "max_length": 1024},
                         scaling={"num_workers": 1, "gpu_memory_gb": 24})
    plan = plan_for(cfg)
    assert not fits(plan)
    assert plan.components["weights"] + plan.components["optimizer (fp32 master + Adam)"] > 24

    fix = find_fix(cfg)
    assert fix.fits and fix.plan.total_gb <= 24
    assert fix.config.train.deepspeed.zero_stage == 3
    assert fix.config.train.deepspeed.offload_optimizer and fix.config.train.deepspeed.offload_params
    lora = lora_alternative(cfg)
    assert lora is not None and lora.fits and lora.config.train.lora.enabled
    for proposal in (fix, lora):                    # re-estimating the proposed config agrees
        assert fits(plan_for(proposal.config))

    lines = advise(cfg)
    assert lines[0].startswith("7B full DPO on 24 GB")
    assert "ZeRO-3" in lines[0] and "CPU offload" in lines[0] and "LoRA r128" in lines[0]
    assert f"est. {fix.plan.total_gb:.1f} GB/GPU" in lines[0]
    # HA-DPO's own way, a second full copy as the reference (no cache): 14 GB of it stays on the GPU,
    # unsharded, beside ZeRO-3's buffers, so only LoRA fits
    two_copies = seven_b_config(train={"lora": {"enabled": False}, "batch_size_per_worker": 1, "max_length": 1024,
                                       "reference_cache": False}, scaling={"num_workers": 1, "gpu_memory_gb": 24})
    assert not find_fix(two_copies).fits
    lines = advise(two_copies)
    assert "needs LoRA r128" in lines[0] and "full DPO keeps two" in lines[-1]
    assert any("bf16 14.1 GB" in line and "fp32 28.3 GB" in line for line in lines)


def test_advice_prefers_cheap_fixes_and_restores_what_is_not_needed():
    cfg = seven_b_config(train={"batch_size_per_worker": 16, "max_length": 2048, "gradient_checkpointing": False},
                         scaling={"num_workers": 8, "gpu_memory_gb": 40})
    fix = find_fix(cfg)
    assert fix.fits
    assert fix.config.train.gradient_checkpointing
    assert not fix.config.train.deepspeed.offload_optimizer and not fix.config.train.deepspeed.offload_params
    batch = fix.config.train.batch_size_per_worker
    assert batch * fix.config.train.gradient_accumulation == 16                        # same pairs per step
    doubled = fix.config.model_copy(deep=True)
    doubled.train.batch_size_per_worker = batch * 2
    assert not fits(plan_for(doubled))                                                 # largest batch that fits
    assert any("gradient checkpointing" in line and "saves" in line for line in advise(cfg))


def test_fitting_config_gets_no_advice_and_main_plan_returns_0(capsys):
    cfg = seven_b_config(train={"batch_size_per_worker": 4, "max_length": MEASURED_SEQ})
    assert advise(cfg) == []
    assert main_plan(cfg) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "total per GPU" in out


def test_main_plan_returns_1_and_prints_the_fix_when_it_does_not_fit(capsys):
    cfg = seven_b_config(train={"lora": {"enabled": False}}, scaling={"gpu_memory_gb": 24})
    assert main_plan(cfg) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "7B full DPO on 24 GB" in out


@pytest.mark.parametrize("gpu_gb", [4, 8, 24, 80])
def test_tiny_model_fits_anywhere(gpu_gb):
    cfg = config_from_dict({"scaling": {"gpu_memory_gb": gpu_gb}})          # no model.path: the tiny model
    shape = shape_from_config(cfg)
    assert shape == tiny_shape(TinyModelConfig())
    plan = plan_for(cfg)
    assert fits(plan) and advise(cfg) == []
    assert plan.total_gb < 3


def test_format_plan_lists_components_total_and_verdict():
    plan = estimate_memory(LLAVA_15_7B, train(), scaling(1, 24))
    text = format_plan(plan)
    for name in plan.components:
        assert name in text
    assert "total per GPU" in text and "GPU memory" in text and "24.00" in text
    assert ("DOES NOT FIT" if plan.total_gb > 24 else "FITS") in text


def test_shape_is_read_from_a_llava_hf_config_json(tmp_path):
    # As the llava-hf export writes it: text_config leaves LlamaConfig's defaults out.
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llava", "projector_hidden_act": "gelu", "tie_word_embeddings": False,
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "text_config": {"model_type": "llama", "max_position_embeddings": 4096, "vocab_size": 32064},
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "model_type": "clip_vision_model", "num_attention_heads": 16,
                          "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
    }))
    shape = shape_from_config(config_from_dict({"model": {"path": str(tmp_path)}}))
    assert shape.total_params() == LLAVA_15_7B.total_params()
    assert shape.lora_params(128) == LLAVA_15_7B.lora_params(128)


def test_missing_model_folder_is_recognised_by_name_or_refused(tmp_path):
    assert shape_from_config(seven_b_config()).total_params() == LLAVA_15_7B.total_params()
    with pytest.raises(ValueError, match="no config.json"):
        shape_from_config(config_from_dict({"model": {"path": str(tmp_path / "my-model")}}))


def test_rule_of_thumb_per_billion_params():
    assert weights_rule_of_thumb(7_000_000_000) == pytest.approx(
        {"fp32": 28.0, "bf16": 14.0, "int8": 7.0, "int4": 3.5})


@pytest.mark.parametrize("pairs, measured_gb", [(8, 78.2), (12, 102.3)])
def test_packed_pairs_without_checkpointing_match_the_measured_peaks(pairs, measured_gb):
    """benchmarks/RESULTS.md (H200, 2026-11-30): packed rows of 631 + 2 x 128 tokens, no checkpointing."""
    plan = estimate_memory(LLAVA_15_7B, train(batch_size_per_worker=pairs, prefix_sharing=True,
                                              gradient_checkpointing=False, lora={"dropout": 0.05}),
                           scaling(1, 139), 759)
    assert plan.rows == pairs and plan.seq_len == 631 + 2 * 128
    assert plan.allocated_gb == pytest.approx(measured_gb, rel=0.05)


def test_auto_checkpointing_is_on_only_when_the_run_would_not_fit():
    small = estimate_memory(LLAVA_15_7B, train(batch_size_per_worker=8, prefix_sharing=True,
                                               gradient_checkpointing="auto"), scaling(1, 139), 759)
    large = estimate_memory(LLAVA_15_7B, train(batch_size_per_worker=12, prefix_sharing=True,
                                               gradient_checkpointing="auto"), scaling(1, 80), 759)
    assert not small.gradient_checkpointing and large.gradient_checkpointing
    assert large.total_gb < 80 and "auto: on" in large.notes[-1]


def test_use_gradient_checkpointing_resolves_auto_from_the_plan():
    from orchestrator.plan import use_gradient_checkpointing

    def config(use_gpu: bool, checkpointing, pairs: int = 8):
        return seven_b_config(train={"batch_size_per_worker": pairs, "max_length": 2048, "bf16": True,
                                     "gradient_checkpointing": checkpointing},
                              scaling={"use_gpu": use_gpu, "gpu_memory_gb": 80})
    assert not use_gradient_checkpointing(config(False, "auto"))        # CPU runs never need it
    assert use_gradient_checkpointing(config(True, "auto"))             # 8 pairs x 2048 tokens: does not fit
    assert not use_gradient_checkpointing(config(True, "auto"), 759)    # rows of 759 tokens: fits
    assert use_gradient_checkpointing(config(False, True)) and not use_gradient_checkpointing(config(True, False))


# (model, LoRA, GPUs, GiB per GPU, pairs per GPU) -> the stage `zero_stage: auto` trains with (None: DeepSpeed
# off). Rows of 759 tokens (packed pairs, cached reference: the recipe's defaults), checkpointing auto.
AUTO_STAGE_CASES = [
    ("7B", True, 1, 141, 8, None),    # LoRA on one GPU, frozen base fits: nothing to shard, plain torch is fastest
    ("7B", True, 1, 24, 1, None),     # ... on a 24 GB card too (14 GB of frozen base + checkpointed activations)
    ("13B", True, 1, 24, 1, 3),       # a 13B base does not fit one 24 GB card: ZeRO-3 (the stage that can offload)
    ("7B", True, 2, 141, 8, 2),       # LoRA on several GPUs: the fastest stage (no ZeRO-3 gathers)
    ("7B", True, 8, 80, 16, 2),       # the shipped recipe on 8 x A100 80GB
    ("7B", True, 8, 24, 1, 2),        # 24 GB cards: 14 GB of frozen base + checkpointed activations still fit
    ("13B", True, 2, 24, 1, 3),       # 26 GB of frozen 13B base cannot sit whole on a 24 GB card
    ("7B", False, 1, 141, 2, 0),      # full fine-tune on one 141 GB GPU: 84 GB optimizer + weights + grads fit
    ("7B", False, 1, 80, 2, 3),       # ... not on 80 GB: ZeRO-3 (the stage that can offload; plan advises)
    ("7B", False, 8, 80, 2, 1),       # full fine-tune, 8 GPUs: sharding the optimizer (ZeRO-1) is enough
    ("7B", False, 8, 40, 2, 2),       # 8 x 40 GB: the optimizer sharded is not enough, gradients too (ZeRO-2)
    ("7B", False, 4, 40, 2, 3),       # 4 x 40 GB: the weights must be sharded too (ZeRO-3)
]


@pytest.mark.parametrize("model,lora,gpus,gib,pairs,expected", AUTO_STAGE_CASES)
def test_zero_stage_auto_picks_the_fastest_stage_that_fits(model, lora, gpus, gib, pairs, expected):
    from orchestrator.plan import LLAVA_15_13B, choose_zero_stage

    shape = LLAVA_15_7B if model == "7B" else LLAVA_15_13B
    train_cfg = train(lora={"enabled": lora}, batch_size_per_worker=pairs, prefix_sharing=True,
                      gradient_checkpointing="auto", deepspeed={"zero_stage": "auto"})
    stage, reason = choose_zero_stage(shape, train_cfg, scaling(gpus, gib), 759)
    assert stage == expected, reason
    plan = estimate_memory(shape, train_cfg, scaling(gpus, gib), 759)
    assert plan.deepspeed == (expected is not None) and plan.zero_stage == (expected or 0)
    assert any(note.startswith("ZeRO stage auto") for note in plan.notes)
    if expected != 3 or fits(plan):
        assert fits(plan)


def test_a_configured_stage_is_kept_and_the_gpu_memory_defaults_to_80_without_a_gpu():
    from orchestrator.plan import choose_zero_stage, planned_gpu_memory_gb, with_gpu_memory

    assert choose_zero_stage(LLAVA_15_7B, train(deepspeed={"zero_stage": 3}), scaling(1), 759) == (3, "set in the config")
    cfg = seven_b_config()
    assert cfg.scaling.gpu_memory_gb is None and planned_gpu_memory_gb(cfg.scaling) == 80.0
    assert with_gpu_memory(cfg, 139.8).scaling.gpu_memory_gb == 139.8                  # the card in hand
    pinned = seven_b_config(scaling={"gpu_memory_gb": 40})
    assert with_gpu_memory(pinned, 139.8).scaling.gpu_memory_gb == 40                  # the config overrides


def test_hadpo_plan_prints_the_chosen_stage_and_why(capsys):
    cfg = seven_b_config(train={"batch_size_per_worker": 8, "max_length": 759},
                         scaling={"num_workers": 1, "use_gpu": True, "gpu_memory_gb": 141})
    assert main_plan(cfg) == 0
    out = capsys.readouterr().out
    assert "DeepSpeed off (torch AdamW) over 1 worker" in out
    assert "ZeRO stage auto: DeepSpeed off (LoRA on 1 GPU of 141 GB: fits unsharded" in out
    two = seven_b_config(train={"batch_size_per_worker": 8, "max_length": 759},
                         scaling={"num_workers": 2, "use_gpu": True, "gpu_memory_gb": 141})
    assert main_plan(two) == 0
    out = capsys.readouterr().out
    assert "ZeRO-2 over 2 worker" in out and "ZeRO stage auto: 2 (LoRA on 2 GPU(s) of 141 GB: fits" in out


def test_zero3_buffers_match_the_two_measured_zero3_peaks():
    # LoRA r128, 8 packed pairs of 631 + 2 x 128 tokens, no checkpointing, one H200: 84.8 GB (dpo_levers.py)
    lora = estimate_memory(LLAVA_15_7B, train(batch_size_per_worker=8, prefix_sharing=True, gradient_checkpointing=False,
                                              deepspeed={"zero_stage": 3}), scaling(1, 139.8), 759)
    assert lora.allocated_gb == pytest.approx(84.8, rel=0.02)
    # full-parameter DPO, 4 plain pairs of 748 tokens per GPU, checkpointing, frozen copy, 2 x H200: 95.5 GB
    full = estimate_memory(LLAVA_15_7B, train(batch_size_per_worker=4, lora={"enabled": False}, reference_cache=False,
                                              deepspeed={"zero_stage": 3}), scaling(2, 139.8), 748)
    assert full.allocated_gb == pytest.approx(95.5, rel=0.02)
    zero2 = estimate_memory(LLAVA_15_7B, train(batch_size_per_worker=8, prefix_sharing=True, gradient_checkpointing=False,
                                               deepspeed={"zero_stage": 2}), scaling(1, 139.8), 759)
    assert zero2.allocated_gb == pytest.approx(75.9, rel=0.02)     # the same run under ZeRO-2 (dpo_levers.py)


@pytest.mark.parametrize("changes, stage, expected", [
    ({}, "dpo", "loop"),                                              # LoRA: the workers fill the cache
    ({"lora": {"enabled": False}}, "dpo", "pass"),                    # full fine-tuning: a pass, no second model
    ({"reference_fill": "pass"}, "dpo", "pass"),
    ({"reference_cache": False}, "dpo", None),                        # the reference forward every step
    ({"reference_cache": False, "reference_fill": "loop"}, "dpo", None),
    ({}, "sft", None),
])
def test_reference_fill_resolves_auto_from_lora(changes, stage, expected):
    from orchestrator.plan import reference_fill

    assert reference_fill(train(**changes), stage) == expected


def test_reference_fill_loop_without_lora_is_refused_when_the_config_loads():
    with pytest.raises(ValueError, match="reference_fill: loop .* needs LoRA"):
        config_from_dict({"train": {"lora": {"enabled": False}, "reference_fill": "loop"}}, "test")


# ----------------------------------------------------------------------------------------------
# Model families: LLaVA-NeXT and Qwen2.5-VL

# config.json as the hub's releases hold them (llava-hf/llava-v1.6-vicuna-7b-hf; Qwen/Qwen2.5-VL-7B-Instruct keeps
# its text keys at the top level)
LLAVA_NEXT_VICUNA_7B_CONFIG = {
    "model_type": "llava_next", "image_token_index": 32000, "projector_hidden_act": "gelu",
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "tie_word_embeddings": False, "use_image_newline_parameter": True, "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default", "vocab_size": 32064,
    "text_config": {"model_type": "llama", "max_position_embeddings": 4096, "pad_token_id": 0,
                    "rms_norm_eps": 1e-05, "vocab_size": 32064},
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
}
QWEN2_5_VL_7B_CONFIG = {
    "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"], "hidden_size": 3584,
    "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "max_position_embeddings": 128000, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    "vocab_size": 152064, "image_token_id": 151655, "video_token_id": 151656,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
}
# Counted by building each model from these configs in transformers 5.23 on the meta device
# (sum of parameter numel; not repeated here: slow). Published: LLaVA-1.6-vicuna-7B 7.06B, -mistral-7B 7.57B,
# Qwen2.5-VL-7B 8.29B.
COUNTED = {"LLaVA-NeXT-Vicuna-7B": 7_063_431_168, "LLaVA-NeXT-Mistral-7B": 7_566_747_648,
           "Qwen2.5-VL-7B": 8_292_166_656, "Qwen2.5-VL-7B visual (ViT + merger)": 676_550_144}


def test_llava_next_and_qwen_7b_parameter_counts_match_transformers_and_the_published_sizes():
    from orchestrator.plan import LLAVA_NEXT_MISTRAL_7B, LLAVA_NEXT_VICUNA_7B, QWEN2_5_VL_7B

    assert LLAVA_NEXT_VICUNA_7B.total_params() == COUNTED["LLaVA-NeXT-Vicuna-7B"] == pytest.approx(7.06e9, rel=0.005)
    # LLaVA-1.5-7B's towers and language model plus image_newline (one 4096 vector)
    assert LLAVA_NEXT_VICUNA_7B.total_params() == LLAVA_15_7B.total_params() + 4096
    assert LLAVA_NEXT_MISTRAL_7B.total_params() == COUNTED["LLaVA-NeXT-Mistral-7B"] == pytest.approx(7.57e9, rel=0.005)
    assert QWEN2_5_VL_7B.total_params() == COUNTED["Qwen2.5-VL-7B"] == pytest.approx(8.29e9, rel=0.005)
    visual = QWEN2_5_VL_7B.vision_params() + QWEN2_5_VL_7B.projector_params()
    assert visual == COUNTED["Qwen2.5-VL-7B visual (ViT + merger)"]
    # merger by hand: RMSNorm(1280) + Linear(5120 -> 5120) + Linear(5120 -> 3584), with biases
    assert QWEN2_5_VL_7B.projector_params() == 1280 + 5120 * 5120 + 5120 + 5120 * 3584 + 3584
    # one Qwen2 decoder layer by hand: q/o 3584x3584, k/v 3584x512 (4 kv heads of 128), q/k/v biases, SwiGLU, 2 norms
    h, kv, i = 3584, 512, 18944
    assert QWEN2_5_VL_7B.lm_layer_params() == 2 * h * h + 2 * h * kv + (h + 2 * kv) + 3 * h * i + 2 * h
    assert QWEN2_5_VL_7B.lora_params(128) == 28 * 128 * (2 * (h + h) + 2 * (h + kv) + 2 * (h + i) + (i + h))


def test_image_tokens_per_family_count_base_tile_grid_and_newlines_or_the_pixel_budget():
    from orchestrator.plan import LLAVA_NEXT_VICUNA_7B, QWEN2_5_VL_7B

    assert LLAVA_15_7B.image_tokens == 576
    # the 672x672 grid: base tile 24x24 + 48x48 grid features + one newline per grid row (48)
    assert LLAVA_NEXT_VICUNA_7B.image_tokens == 576 + 48 * 48 + 48 == 2928
    assert QWEN2_5_VL_7B.image_tokens == 12_845_056 // (28 * 28) == 16384        # the 7B folder's max_pixels
    assert replace(QWEN2_5_VL_7B, max_pixels=1280 * 28 * 28).image_tokens == 1280


def test_llava_next_token_count_is_what_its_processor_makes_for_the_largest_image():
    """The real LlavaNextProcessor at llava-v1.6's sizes (336 px tiles, 14 px patches, its pinpoints): a 672x672
    image takes the most tokens, the count `image_tokens` plans for; a 1008x336 one (3 tiles) fewer."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    from orchestrator.model.llava import CLIP_MEAN, CLIP_STD, build_word_tokenizer
    from orchestrator.plan import LLAVA_NEXT_VICUNA_7B

    pinpoints = [list(pair) for pair in LLAVA_NEXT_VICUNA_7B.grid_pinpoints]
    tokenizer = build_word_tokenizer(["is there a dog"])
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                                   image_grid_pinpoints=pinpoints, image_mean=CLIP_MEAN,
                                                   image_std=CLIP_STD),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    image_id = tokenizer.convert_tokens_to_ids("<image>")

    def tokens(width: int, height: int) -> int:
        ids = processor(text="<image>", images=Image.new("RGB", (width, height)), return_tensors="pt")["input_ids"]
        return int((ids == image_id).sum())

    assert tokens(672, 672) == LLAVA_NEXT_VICUNA_7B.image_tokens
    assert tokens(336, 1008) < tokens(672, 672) and tokens(500, 375) < tokens(672, 672)


def test_shapes_are_read_from_the_released_config_jsons(tmp_path):
    from orchestrator.plan import LLAVA_NEXT_VICUNA_7B, QWEN2_5_VL_7B

    def shape_of(folder_name: str, config: dict, preprocessor: dict | None = None, **model):
        folder = tmp_path / folder_name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        if preprocessor is not None:
            (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
        return shape_from_config(config_from_dict({"model": {"path": str(folder), **model}}))

    next_shape = shape_of("next", LLAVA_NEXT_VICUNA_7B_CONFIG)
    assert next_shape.family == "llava_next"
    assert replace(next_shape, name="") == replace(LLAVA_NEXT_VICUNA_7B, name="")
    qwen = shape_of("qwen", QWEN2_5_VL_7B_CONFIG, {"max_pixels": 12845056, "min_pixels": 3136, "merge_size": 2})
    assert replace(qwen, name="") == replace(QWEN2_5_VL_7B, name="")
    # transformers 5 saves the text keys under text_config and the budget as size.longest_edge
    nested = {key: value for key, value in QWEN2_5_VL_7B_CONFIG.items()
              if key in ("model_type", "vision_config", "image_token_id")}
    nested["text_config"] = {key: QWEN2_5_VL_7B_CONFIG[key] for key in
                             ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                              "num_key_value_heads", "vocab_size")}
    budgeted = shape_of("qwen-nested", nested, {"size": {"longest_edge": 1280 * 28 * 28, "shortest_edge": 3136}})
    assert budgeted.total_params() == QWEN2_5_VL_7B.total_params() and budgeted.image_tokens == 1280
    # model.max_image_pixels is the budget the config sets over the folder's
    assert shape_of("qwen-capped", QWEN2_5_VL_7B_CONFIG, None, max_image_pixels=256 * 28 * 28).image_tokens == 256


def test_a_folder_of_another_family_than_the_config_names_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN2_5_VL_7B_CONFIG))
    with pytest.raises(ValueError, match="model.family is 'llava_next' but .* is a 'qwen2_5_vl' model"):
        shape_from_config(config_from_dict({"model": {"path": str(tmp_path), "family": "llava_next"}}))
    with pytest.raises(ValueError, match="model.family is 'llava' but the folder named 'Qwen2.5-VL-7B-Instruct'"):
        shape_from_config(config_from_dict({"model": {"path": "/mnt/x/Qwen2.5-VL-7B-Instruct", "family": "llava"}}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    with pytest.raises(ValueError, match="config.json: model_type 'idefics3' is not a family the planner knows"):
        shape_from_config(config_from_dict({"model": {"path": str(tmp_path)}}))


@pytest.mark.parametrize("folder, expected", [
    ("llava-1.5-7b-hf", "LLAVA_15_7B"), ("llava-v1.5-13b", "LLAVA_15_13B"),
    ("llava-v1.6-vicuna-7b-hf", "LLAVA_NEXT_VICUNA_7B"), ("llava-v1.6-vicuna-13b-hf", "LLAVA_NEXT_VICUNA_13B"),
    ("llava-v1.6-mistral-7b-hf", "LLAVA_NEXT_MISTRAL_7B"), ("Qwen2.5-VL-7B-Instruct", "QWEN2_5_VL_7B"),
    ("Qwen2.5-VL-72B-Instruct", None), ("my-model", None),
])
def test_released_models_are_recognised_by_their_folder_names(folder, expected):
    import orchestrator.plan as plan

    assert plan.shape_by_name(folder) == (getattr(plan, expected) if expected else None)


def test_tiny_family_shapes_count_exactly_what_the_built_models_hold(tiny_model_dir, tiny_family_dir):
    """Each tiny model built from configs: the planner's parameter count is the module's sum of numel, its
    tiny_shape is the shape its config.json gives, and its image tokens are what the loader counts."""
    from orchestrator.model.families import family_of, load_model

    for folder in (tiny_model_dir, tiny_family_dir):
        family = family_of(folder)
        loaded = load_model(folder)
        shape = shape_from_config(config_from_dict({"model": {"path": str(folder)}}))
        assert shape.family == family
        assert shape.total_params() == sum(p.numel() for p in loaded.model.parameters()), family
        vocab_size = loaded.model.config.get_text_config().vocab_size
        built = tiny_shape(TinyModelConfig(), vocab_size=vocab_size, family=family)
        assert replace(built, name="") == replace(shape, name=""), family
        assert shape.image_tokens == loaded.tokens_per_image, family
    # the largest image the tiny family takes is cut into exactly image_tokens tokens by its own processing
    largest = {"llava_next": Image.new("RGB", (96, 96)), "qwen2_5_vl": Image.new("RGB", (56, 56))}[family]
    assert loaded.vision_inputs([largest]).tokens == [shape.image_tokens]


def test_a_config_without_a_model_path_plans_the_tiny_model_of_its_family():
    for family, name in [("auto", "tiny LLaVA"), ("llava_next", "tiny LLaVA-NeXT"), ("qwen2_5_vl", "tiny Qwen2.5-VL")]:
        shape = shape_from_config(config_from_dict({"model": {"family": family}}))
        assert shape.name == name and fits(plan_for(config_from_dict({"model": {"family": family}})))


def test_packed_pairs_are_planned_only_for_families_with_1d_positions():
    from orchestrator.model.families import FAMILIES
    from orchestrator.plan import FAMILY_NAMES, LLAVA_NEXT_VICUNA_7B, QWEN2_5_VL_7B

    assert set(FAMILY_NAMES) == set(FAMILIES)
    for shape in (LLAVA_15_7B, LLAVA_NEXT_VICUNA_7B, QWEN2_5_VL_7B):
        assert shape.packs_pairs == FAMILIES[shape.family].one_d_positions
    packed = estimate_memory(LLAVA_NEXT_VICUNA_7B, train(prefix_sharing=True, max_length=4096), scaling(1))
    assert packed.rows == 4 and packed.seq_len == 2 * 4096 - (2928 + 55)     # the image + prompt counted once
    qwen = estimate_memory(QWEN2_5_VL_7B, train(prefix_sharing=True), scaling(1))
    assert qwen.rows == 8 and qwen.seq_len == MEASURED_SEQ                     # two rows per pair
    assert any("qwen2_5_vl takes no packed pairs" in note for note in qwen.notes)


SHIPPED_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda path: path.name)
def test_hadpo_plan_prints_a_plan_for_every_shipped_config(path, capsys):
    from orchestrator.config import load_config

    cfg = load_config(path)
    code = main_plan(cfg)
    out = capsys.readouterr().out
    assert "total per GPU" in out and "verdict:" in out
    shape = shape_from_config(cfg)
    assert shape.family == ("llava" if cfg.model.family == "auto" else cfg.model.family)
    assert f"up to {shape.image_tokens} tokens per image" in out
    if path.name.endswith("_7b_hadpo.yaml"):  # the 7B recipes fit the 80 GB cards they are planned for
        assert code == 0 and "FITS" in out
        assert shape.image_tokens + 64 <= cfg.train.max_length   # room for an image, the prompt and an answer
