"""Ray Tune sweep: each trial trains and evaluates; results in one parquet; the best is named."""

import pandas as pd
import pytest

from orchestrator.config import config_from_dict
from orchestrator.tune import run_tune, trial_config, trial_tag


def test_trial_config_sets_the_sampled_values_and_its_own_name():
    base = config_from_dict({"name": "sweep", "tune": {"search_space": {
        "train.beta": {"kind": "grid", "values": [0.1, 0.5]}}}})
    trial = trial_config(base, {"train.beta": 0.5, "train.lora.rank": 8})
    assert trial.train.beta == 0.5 and trial.train.lora.rank == 8
    assert trial.name == "sweep-beta0.5_rank8" and trial.tune.search_space == {}
    assert trial_tag({"train.learning_rate": 0.000123}) == "learning_rate=0.000123"


@pytest.mark.slow
def test_sweep_over_beta_trains_and_evaluates_each_trial(ray_session, tiny_model_dir, tmp_path):
    config = config_from_dict({
        "name": "sweep", "output_root": str(tmp_path),
        "data": {"synthetic": {"num_images": 12, "num_pope_images": 4, "milebench_tasks": 0}},
        "train": {"max_steps": 3, "batch_size_per_worker": 2, "learning_rate": 1e-3, "max_length": 256,
                  "gradient_checkpointing": False, "checkpoint_every_steps": 3, "log_every_steps": 1,
                  "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}, "deepspeed": {"enabled": False}},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.25},
        "eval": {"batch_size": 16, "cpus_per_actor": 0.25},
        "tune": {"search_space": {"train.beta": {"kind": "grid", "values": [0.1, 0.5]}},
                 "metric": "pope/adversarial/f1", "mode": "max", "cpus_per_trial_driver": 0.25,
                 "asha": {"enabled": True, "metric": "loss", "mode": "min", "grace_period": 1}},
    })
    result = run_tune(config, base_model=str(tiny_model_dir))
    trials = pd.read_parquet(result.results_path)
    assert sorted(trials["param/train.beta"]) == [0.1, 0.5]
    assert trials["error"].eq("").all(), trials["error"].tolist()
    finished = trials[~trials["stopped_early"]]
    assert len(finished) >= 1 and finished["pope/adversarial/f1"].between(0, 1).all()
    assert result.best_params["train.beta"] in (0.1, 0.5)
    assert (tmp_path / f"sweep-beta{result.best_params['train.beta']}").is_dir()  # each trial has its own run


def test_the_objective_must_be_a_pope_name_the_configs_datasets_report():
    from orchestrator.tune import check_objective, pope_objectives

    coco = {"questions": {s: f"/pope/coco_pope_{s}.json" for s in ("random", "popular", "adversarial")},
            "image_root": "/coco/val2014"}
    gqa = {"questions": {"adversarial": "/pope/gqa_pope_seem_adversarial.json"}, "image_root": "/gqa/images"}
    single = config_from_dict({"data": {"pope": coco}, "tune": {"metric": "pope/adversarial/f1"}})
    check_objective(single)  # the single form is COCO: the name it always had
    assert "pope/mean_f1" in pope_objectives(single) and len(pope_objectives(single)) == 4 * 5 + 1
    both = config_from_dict({"data": {"pope": {"datasets": {"coco": coco, "gqa": gqa}}},
                             "tune": {"metric": "pope/gqa/adversarial/f1"}})
    check_objective(both)
    assert {"pope/adversarial/f1", "pope/gqa/adversarial/f1", "pope/gqa/mean_f1"} <= set(pope_objectives(both))
    only_gqa = config_from_dict({"data": {"pope": {"datasets": {"gqa": gqa}}}})
    with pytest.raises(ValueError, match="tune.metric 'pope/adversarial/f1' is not reported.*pope/gqa/adversarial/f1"):
        check_objective(only_gqa)
