"""The DeepSpeed config the engine runs with (the train section mapped, a user's ds_config merged), and
ZeRO-3 with leaf decoder layers training LoRA exactly as ZeRO-2 does."""

import json
import os
import socket

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


@pytest.fixture
def one_process_group():
    """A gloo group of one in this process, as a single-GPU DeepSpeed run has (no Ray)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _train_lora(model_dir, rows, zero_stage: int, leaf_layers: bool, steps: int = 3):
    """`steps` DPO steps of LoRA through the recipe's engine and loss: each step's loss and LoRA gradients,
    then the LoRA weights, all gathered in full; and the modules made ZeRO-3 leaves."""
    import deepspeed
    import torch

    from orchestrator.model.families import load_model
    from orchestrator.model.lora import add_lora, freeze_vision
    from orchestrator.train.engine import make_engine
    from orchestrator.train.pairs import collate_packed
    from orchestrator.train.recipe import compute_loss
    from tests.train import as_batch

    loaded = load_model(model_dir)
    model = loaded.model
    model.config.use_cache = False
    freeze_vision(model)
    # ZeRO-3: the LoRA matrices (rank 4: <= 4 x 192) resident, every base matrix (>= 96 x 96) partitioned
    # and gathered, as the recipe's threshold splits them at 7B
    zero3 = {"zero_optimization": {"stage3_param_persistence_threshold": 4 * 192}}
    train = TrainConfig(batch_size_per_worker=len(rows), warmup_ratio=0.0, lr_schedule="constant", beta=0.1,
                        lora={"rank": 4, "alpha": 8, "dropout": 0.05},
                        deepspeed={"zero_stage": zero_stage, "zero3_leaf_layers": leaf_layers,
                                   "config": zero3 if zero_stage == 3 else None})
    torch.manual_seed(0)
    model = add_lora(model, train)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    engine = make_engine(model, [p for _, p in named], train, learning_rate=1e-2, total_steps=steps, use_ds=True,
                         on_gpu=False, bf16=False)
    batch = collate_packed(as_batch(rows), loaded, "v1", 512)
    # cached reference log-probs (the recipe's default): only the policy's forward runs. (After a reference
    # forward with the adapters off, the first layer's weights are still gathered when its gradient hook
    # fires early, and the real gradients land in DeepSpeed's placeholders: right by luck, and no failure.)
    pairs = torch.arange(len(rows), dtype=torch.float32)
    batch.reference = (-30.0 - pairs, -29.0 - 2 * pairs)
    torch.manual_seed(1)  # LoRA dropout
    losses, grads = [], []
    for _ in range(steps):
        loss, _ = compute_loss(engine, None, batch, "dpo", train, torch.device("cpu"), False, "sdpa")
        engine.backward(loss)
        grads.append({name: deepspeed.utils.safe_get_full_grad(p).clone() for name, p in named})
        engine.step()
        losses.append(loss.item())
    weights = {name: deepspeed.utils.safe_get_full_fp32_param(p).clone() for name, p in named}
    leaves = [name for name, module in model.named_modules() if getattr(module, "_z3_leaf", False)]
    # on the CPU the communication backend came up without building the shared-memory all-reduce op
    assert deepspeed.comm.comm.cdb.shm_comm_op is None
    return losses, grads, weights, leaves


@pytest.mark.slow  # two DeepSpeed engines on the tiny LLaVA (~15 s on 2 cores)
def test_zero3_with_leaf_layers_trains_lora_exactly_as_zero2(one_process_group, tiny_model_dir, synth_world,
                                                             tmp_path):
    """Leaf layers (one hooked module per transformer layer) must not change what trains: the same losses, LoRA
    gradients and updated LoRA weights as ZeRO-2, fp32 on the CPU. Without `require_input_grads` this
    fails in the first layer's backward (engine.py's docstring says why)."""
    from tests.train import sample_preference_rows

    rows = sample_preference_rows(tmp_path, synth_world[0], per_source=1)
    zero2_losses, zero2_grads, zero2_weights, _ = _train_lora(tiny_model_dir, rows, 2, leaf_layers=False)
    losses, grads, weights, leaves = _train_lora(tiny_model_dir, rows, 3, leaf_layers=True)

    # the vision encoder's and the language model's layers (not the projector's Sequential, not their parts)
    prefix = "base_model.model.model."
    assert leaves == [prefix + "vision_tower.encoder.layers.0", prefix + "vision_tower.encoder.layers.1",
                      prefix + "language_model.layers.0", prefix + "language_model.layers.1"]
    assert zero2_losses[-1] < zero2_losses[0]  # it trained
    assert losses == pytest.approx(zero2_losses, abs=1e-5)
    for step, (got, want) in enumerate(zip(grads, zero2_grads)):
        assert got.keys() == want.keys() and len(got) == 2 * 7 * 2
        for name in want:
            assert want[name].abs().max() > 0 or step == 0, (step, name)  # lora_B starts at 0: lora_A's grad too
            assert (got[name] - want[name]).abs().max().item() <= 1e-5, (step, name)
    for name in zero2_weights:
        assert (weights[name] - zero2_weights[name]).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("workers,lora,engine", [(1, True, "off"), (2, True, 2), (1, False, 0)])
def test_the_workers_plan_turns_deepspeed_off_only_for_lora_on_one_gpu(tiny_model_dir, workers, lora, engine):
    """`zero_stage: auto` as the recipe resolves it: LoRA on a single worker trains without DeepSpeed (nothing
    to shard), on two with ZeRO-2; full fine-tuning keeps DeepSpeed (ZeRO-0 on one worker)."""
    import torch

    from orchestrator.config import ExperimentConfig
    from orchestrator.train.recipe import plan_stage
    from orchestrator.train.schedule import stage_plan

    cfg = ExperimentConfig.model_validate({"train": {"lora": {"enabled": lora}, "reference_cache": lora,
                                                     "deepspeed": {"enabled": True, "zero_stage": "auto"}},
                                           "scaling": {"num_workers": workers}})
    planned, reason, _ = plan_stage(cfg, cfg.train, stage_plan(cfg.train, "dpo"), [], None, str(tiny_model_dir),
                                    torch.device("cpu"), workers)
    ds = planned.train.deepspeed
    assert (ds.enabled, ds.zero_stage) == ((False, 0) if engine == "off" else (True, engine)), reason
    assert ("plain torch trains faster" in reason) == (engine == "off")
