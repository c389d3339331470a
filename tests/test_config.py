from pathlib import Path

import pytest

from orchestrator.config import ConfigError, ExperimentConfig, config_from_dict, dump_config, load_config


def test_defaults_are_the_ha_dpo_llava_recipe():
    config = ExperimentConfig()
    assert config.train.beta == 0.1
    assert config.train.learning_rate == 2e-6
    assert (config.train.lora.rank, config.train.lora.alpha, config.train.lora.dropout) == (128, 256, 0.05)
    assert config.train.warmup_ratio == 0.03 and config.train.lr_schedule == "cosine"
    assert config.model.train_template == "v1" and config.model.eval_template == "llava_v1"
    assert config.data.desc_repeats == 2 and config.data.seed == 42


def test_yaml_round_trip_keeps_every_value(tmp_path):
    config = config_from_dict({"name": "beta05", "train": {"beta": 0.5, "deepspeed": {"zero_stage": 3}}})
    dump_config(config, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == config
    assert again.content_hash() == config.content_hash()


def test_invalid_values_fail_with_their_key_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lora:\n    rank: 0\n  deepspeed:\n    zero_stage: 4\nscaling:\n  nmu_workers: 2\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "bad.yaml" in message
    assert "train.lora.rank: Input should be greater than 0" in message
    assert "train.deepspeed.zero_stage" in message
    assert "scaling.nmu_workers: Extra inputs are not permitted" in message


def test_tiny_model_shapes_are_checked():
    with pytest.raises(ConfigError, match="model.tiny.*not a multiple of patch_size"):
        config_from_dict({"model": {"tiny": {"image_size": 60, "patch_size": 16}}})


@pytest.mark.parametrize("text, reason", [
    ("- a\n- b\n", "expected a mapping"),
    ("train: [unclosed\n", "not valid YAML"),
])
def test_unusable_files_say_why(tmp_path, text, reason):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=reason):
        load_config(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_parse_values_as_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\n")
    config = load_config(path, ["train.beta=0.5", "train.lora.enabled=false", "scaling.num_workers=2"])
    assert config.train.beta == 0.5 and config.train.lora.enabled is False and config.scaling.num_workers == 2
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["train.beta"])


def test_environment_knobs_reach_the_runtime_env():
    config = config_from_dict({"env": {"hf_home": "/data/hf", "hf_endpoint": "https://mirror.example",
                                       "extra": {"NCCL_NVLS_ENABLE": "0"}},
                               "wandb": {"mode": "online"}})
    env = config.runtime_env()["env_vars"]
    assert env["HF_HOME"] == "/data/hf" and env["HF_ENDPOINT"] == "https://mirror.example"
    assert env["HF_HUB_OFFLINE"] == "1" and env["NCCL_NVLS_ENABLE"] == "0" and env["WANDB_MODE"] == "online"
    assert "WANDB_API_KEY" not in env


def test_paths_derive_from_output_root_and_name(tmp_path):
    config = config_from_dict({"name": "run1", "output_root": str(tmp_path)})
    assert config.run_dir == tmp_path / "run1"
    assert config.world_dir == tmp_path / "world"
    assert config.data.uses_synthetic_world
    real = config_from_dict({"data": {"hadpo_desc": "d.json"}})
    assert not real.data.uses_synthetic_world


def test_shipped_configs_load():
    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        load_config(path)


def test_tune_search_space_keys_must_be_config_values():
    config = config_from_dict({"tune": {"search_space": {
        "train.beta": {"kind": "grid", "values": [0.1, 0.5]},
        "train.learning_rate": {"kind": "loguniform", "low": 1e-6, "high": 1e-4}}}})
    assert set(config.tune.search_space) == {"train.beta", "train.learning_rate"}
    with pytest.raises(ConfigError, match="'train.bogus' is not a config key"):
        config_from_dict({"tune": {"search_space": {"train.bogus": {"kind": "choice", "values": [1]}}}})
    with pytest.raises(ConfigError, match="'train.lora' is a section"):
        config_from_dict({"tune": {"search_space": {"train.lora": {"kind": "choice", "values": [1]}}}})
    with pytest.raises(ConfigError, match="tune.search_space.train.beta: .*needs low < high"):
        config_from_dict({"tune": {"search_space": {"train.beta": {"kind": "uniform", "low": 1, "high": 0}}}})


def test_pope_single_form_is_the_dataset_named_coco_and_several_datasets_are_named():
    single = config_from_dict({"data": {"pope": {"questions": {"random": "/r.json"}, "image_root": "/coco"}}})
    (name, files), = single.data.pope.by_name().items()
    assert name == "coco" and files.questions == {"random": "/r.json"} and files.image_root == "/coco"
    several = config_from_dict({"data": {"pope": {"datasets": {
        "coco": {"questions": {"random": "c.json"}, "image_root": "/coco"},
        "gqa": {"questions": {"adversarial": "g.json"}, "image_root": "/gqa/images"}}}}})
    assert {k: v.image_root for k, v in several.data.pope.by_name().items()} == {"coco": "/coco", "gqa": "/gqa/images"}
    assert not several.data.uses_synthetic_world and ExperimentConfig().data.pope.by_name() == {}


@pytest.mark.parametrize("pope, message", [
    ({"datasets": {"gqa": {"questions": {"random": "g.json"}}}}, "data.pope.datasets.gqa.image_root: Field required"),
    ({"datasets": {"gqa": {"image_root": "/gqa"}}}, "data.pope.datasets.gqa.questions: Field required"),
    ({"datasets": {"gqa": {"questions": {"random": "g.json"}, "image_root": "/g", "imageroot": "/g"}}},
     "data.pope.datasets.gqa.imageroot: Extra inputs are not permitted"),
    ({"datasets": {"gqa": {"questions": {}, "image_root": "/g"}}}, "data.pope.datasets.gqa.questions: Value error"),
    ({"dataset": {}}, "data.pope.dataset: Extra inputs are not permitted"),
    ({"datasets": {"g/qa": {"questions": {"random": "g.json"}, "image_root": "/g"}}}, "dataset name 'g/qa'"),
    ({"questions": {"random": "r.json"}, "datasets": {"gqa": {"questions": {"random": "g.json"}, "image_root": "/g"}}},
     "either questions + image_root"),
])
def test_pope_dataset_errors_name_their_key_path(pope, message):
    with pytest.raises(ConfigError) as error:
        config_from_dict({"data": {"pope": pope}})
    assert message in str(error.value)


def test_label_smoothing_applies_to_the_sigmoid_and_robust_losses_only():
    assert config_from_dict({"train": {"loss": "robust", "label_smoothing": 0.1}}).train.label_smoothing == 0.1
    assert config_from_dict({"train": {"label_smoothing": 0.1}}).train.loss == "sigmoid"
    with pytest.raises(ConfigError, match="train: Value error, label_smoothing 0.1 applies to the sigmoid"):
        config_from_dict({"train": {"loss": "ipo", "label_smoothing": 0.1}})
    with pytest.raises(ConfigError, match="train.label_smoothing: Input should be less than 0.5"):
        config_from_dict({"train": {"loss": "robust", "label_smoothing": 0.5}})


def test_custom_resources_per_worker_and_actor_refuse_cpu_gpu_and_negative_amounts():
    config = config_from_dict({"scaling": {"resources_per_worker": {"gpu_stand_in": 1}},
                               "eval": {"resources_per_actor": {"accelerator_a100": 0.5}}})
    assert config.scaling.resources_per_worker == {"gpu_stand_in": 1.0}
    assert config.eval.resources_per_actor == {"accelerator_a100": 0.5}
    with pytest.raises(ConfigError, match=r"scaling.resources_per_worker: .*'GPU' is not a custom resource; set it "
                                          r"with scaling.cpus_per_worker / scaling.gpus_per_worker"):
        config_from_dict({"scaling": {"resources_per_worker": {"GPU": 1}}})
    with pytest.raises(ConfigError, match=r"eval.resources_per_actor: .*'fast_disk': amount must be >= 0"):
        config_from_dict({"eval": {"resources_per_actor": {"fast_disk": -1}}})


def test_the_synthetic_worlds_objects_per_image_is_a_range_that_fits_the_grid():
    config = config_from_dict({"data": {"synthetic": {"objects_per_image": [2, 3], "pair_cooccurrence": 0.8}}})
    assert config.data.synthetic.objects_per_image == (2, 3) and config.data.synthetic.pair_cooccurrence == 0.8
    with pytest.raises(ConfigError, match=r"data.synthetic.objects_per_image: .*highest <= 9 .*got \[3, 2\]"):
        config_from_dict({"data": {"synthetic": {"objects_per_image": [3, 2]}}})
    with pytest.raises(ConfigError, match="data.synthetic.pair_cooccurrence"):
        config_from_dict({"data": {"synthetic": {"pair_cooccurrence": 1.5}}})
