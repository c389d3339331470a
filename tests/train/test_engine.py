"""The DeepSpeed config the engine runs with: the train section mapped, and a user's ds_config merged."""

import json

import pytest

from orchestrator.config import TrainConfig
from orchestrator.train.engine import DeepSpeedConfigError, deepspeed_config, make_optimizer


def test_deepspeed_config_maps_the_train_section():
    train = TrainConfig(batch_size_per_worker=16, gradient_accumulation=4, max_grad_norm=1.0,
                        deepspeed={"zero_stage": 3, "offload_optimizer": True, "torch_adam": False})
    config = deepspeed_config(train, on_gpu=True, bf16=True)
    assert config["train_micro_batch_size_per_gpu"] == 16 and config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 1.0 and config["bf16"] == {"enabled": True}
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["optimizer"]["type"] == "AdamW"  # DeepSpeed's own Adam when torch_adam is off
    # LoRA matrices of a 7B model (up to 11008 x 128) stay resident under ZeRO-3; base weights (16.8M+) do not
    assert 11008 * 128 <= config["zero_optimization"]["stage3_param_persistence_threshold"] < 4096 * 4096
    cpu = deepspeed_config(TrainConfig(deepspeed={"zero_stage": 0}), on_gpu=False, bf16=False)
    assert cpu["bf16"] == {"enabled": False} and "optimizer" not in cpu


def test_auto_stage_must_be_resolved_before_the_engine_is_built():
    with pytest.raises(ValueError, match="must be resolved"):
        deepspeed_config(TrainConfig(deepspeed={"zero_stage": "auto"}), on_gpu=True, bf16=True)


# The ZeRO-3 config LLaVA's and HA-DPO's scripts pass with --deepspeed (transformers' "auto" values).
LLAVA_ZERO3 = {
    "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
    "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
    "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
                          "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
}


def test_a_users_ds_config_file_is_merged_with_auto_values_filled_in(tmp_path):
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(LLAVA_ZERO3))
    train = TrainConfig(batch_size_per_worker=8, deepspeed={"zero_stage": 3, "config": str(path)})
    config = deepspeed_config(train, on_gpu=True, bf16=True, world_size=8, hidden_size=4096)
    zero = config["zero_optimization"]
    assert config["train_micro_batch_size_per_gpu"] == 8 and config["bf16"] == {"enabled": True}
    assert "train_batch_size" not in config and "enabled" not in config["fp16"]   # "auto": the recipe's own
    # transformers' derivations of the "auto" ZeRO-3 buffers from the hidden size
    assert zero["reduce_bucket_size"] == 4096 * 4096
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096 * 4096)
    assert zero["stage3_param_persistence_threshold"] == 10 * 4096     # the user's choice beats ours
    assert zero["stage3_max_live_parameters"] == 1e9 and zero["sub_group_size"] == 1e9


def test_user_settings_that_the_run_owns_are_refused_with_the_field_to_change():
    user = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0, "zero_optimization": {"stage": 2},
            "scheduler": {"type": "WarmupLR", "params": {}}}
    train = TrainConfig(batch_size_per_worker=16, max_grad_norm=1.0, deepspeed={"zero_stage": 3, "config": user})
    with pytest.raises(DeepSpeedConfigError) as caught:
        deepspeed_config(train, on_gpu=True, bf16=True, stage_from_config=False)
    message = str(caught.value)
    assert "train_micro_batch_size_per_gpu: 4" in message and "train.batch_size_per_worker" in message
    assert "zero_optimization.stage: 2" in message and "train.deepspeed.zero_stage" in message
    assert "scheduler" in message and "train.lr_schedule" in message
    assert "gradient_clipping" not in message          # equal to the run's value: accepted
    # a stage the config names itself may be changed by the user's file (theirs wins, as with deepspeed --deepspeed)
    named = TrainConfig(batch_size_per_worker=16, deepspeed={"zero_stage": 3, "config": {"zero_optimization": {"stage": 2}}})
    assert deepspeed_config(named, on_gpu=True, bf16=True)["zero_optimization"]["stage"] == 2


def test_a_ds_optimizer_takes_the_recipes_learning_rate_and_refuses_its_own():
    train = TrainConfig(deepspeed={"zero_stage": 2, "config": {"optimizer": {"type": "AdamW",
                                                                              "params": {"lr": "auto", "betas": [0.9, 0.95]}}}})
    config = deepspeed_config(train, on_gpu=True, bf16=True)
    assert config["optimizer"]["params"]["betas"] == [0.9, 0.95] and "lr" in config["optimizer"]["params"]
    bad = TrainConfig(deepspeed={"zero_stage": 2, "config": {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}})
    with pytest.raises(DeepSpeedConfigError, match="optimizer.params.lr.*train.learning_rate"):
        deepspeed_config(bad, on_gpu=True, bf16=True)


def test_a_missing_or_malformed_ds_config_file_is_named(tmp_path):
    with pytest.raises(DeepSpeedConfigError, match="nope.json: file not found"):
        deepspeed_config(TrainConfig(deepspeed={"zero_stage": 2, "config": str(tmp_path / "nope.json")}),
                         on_gpu=False, bf16=False)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DeepSpeedConfigError, match="broken.json: not valid JSON"):
        deepspeed_config(TrainConfig(deepspeed={"zero_stage": 2, "config": str(broken)}), on_gpu=False, bf16=False)


def test_cpu_optimizer_is_not_fused():
    import torch

    params = [torch.nn.Parameter(torch.zeros(3))]
    assert not make_optimizer(params, TrainConfig(), 1e-3).defaults.get("fused")
