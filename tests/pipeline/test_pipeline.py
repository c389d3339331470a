"""`hadpo run`: stages with recorded inputs, skipped when current, redone when their inputs change."""

import json

import pytest

from orchestrator.config import config_from_dict, load_config
from orchestrator.pipeline import run_pipeline

SMALL = {
    "data": {"synthetic": {"num_images": 12, "num_pope_images": 4, "image_size": 48, "milebench_tasks": 1,
                           "milebench_samples": 2}},
    "model": {"tiny": {"text_layers": 1, "vision_layers": 1}},
    "train": {"max_steps": 2, "batch_size_per_worker": 4, "learning_rate": 1e-3, "max_length": 256,
              "gradient_checkpointing": False, "checkpoint_every_steps": 2, "log_every_steps": 1,
              "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}, "deepspeed": {"enabled": False},
              "sft": {"max_steps": 2, "learning_rate": 1e-3, "train_vision": True, "batch_size_per_worker": 4}},
    "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
    "eval": {"batch_size": 16, "cpus_per_actor": 0.5, "milebench_max_new_tokens": 4},
}


def config(tmp_path, **train):
    raw = json.loads(json.dumps(SMALL))
    raw.update({"name": "pipe", "output_root": str(tmp_path)})
    raw["train"].update(train)
    return config_from_dict(raw)


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_resumes_and_redoes_only_what_changed(demo_run, monkeypatch):
    # the first run: `hadpo run` of the demo at its smallest (conftest.demo_run, shared with test_console and
    # test_relative_output_root), which prints run_pipeline's result
    (ran,) = [line for line in demo_run.run.stdout.splitlines() if line.startswith("stages run: ")]
    assert ran == "stages run: data, warmup, dpo, eval_baseline, eval_hadpo; up to date: none"
    record = demo_run.run_record
    assert record["packages"]["torch"].startswith("2.13.0") and record["packages"]["ray"] == "2.60.0"
    assert {"pope_random", "pope_popular", "pope_adversarial", "hadpo_desc", "hadpo_pope"} <= set(record["data_files"])
    assert record["decoding"]["mode"] == "score" and record["git_sha"]
    assert record["config"]["train"]["beta"] == demo_run.config["train"]["beta"] == 0.5
    baseline = demo_run.stages["eval_baseline"]
    assert {row["split"] for row in baseline["pope"]} == {"random", "popular", "adversarial", "mean"}
    # the suite's Ray, which the command joined, runs no dashboard: Ray Train's placement-group cleaner, which
    # would ask its state API every second and log the refusal, is left out of both training stages
    assert "PlacementGroupCleaner" not in demo_run.log and "Started training worker group" in demo_run.log

    monkeypatch.chdir(demo_run.folder)  # the config's relative output_root, as the command read it
    again = run_pipeline(load_config("demo.yaml"))
    assert again.ran == [] and again.skipped == ["data", "warmup", "dpo", "eval_baseline", "eval_hadpo"]

    changed = run_pipeline(load_config("demo.yaml", ["train.beta=0.3"]))
    assert changed.ran == ["dpo", "eval_hadpo"]  # the warm-up and baseline do not depend on beta
    first_dpo = demo_run.stages["dpo"]
    assert changed.outputs["dpo"]["metrics"]["resumed_from_step"] == 0  # started over, not resumed past the old run
    assert changed.outputs["dpo"]["metrics"]["step"] == first_dpo["metrics"]["step"] == 2


def test_dpo_only_settings_leave_the_warm_up_current(tmp_path):
    from orchestrator.pipeline import warmup_train_settings

    base = warmup_train_settings(config(tmp_path))
    for change in ({"loss": "robust", "label_smoothing": 0.2}, {"beta": 0.3}):
        assert warmup_train_settings(config(tmp_path, **change)) == base
    assert warmup_train_settings(config(tmp_path, max_length=128)) != base


def test_a_stage_end_line_summarises_counts_pope_f1_errors_and_the_last_loss():
    from orchestrator.pipeline import stage_summary

    data = {"preference": {"total": 1521, "usable": 1519, "rejected": 2, "rejects_path": "r.parquet"},
            "pope": {"total": 720, "usable": 720, "rejected": 0, "rejects_path": "p.parquet"}}
    assert stage_summary(data) == "preference 1,519 of 1,521 usable, 2 rejected, pope 720 of 720 usable, 0 rejected"
    evaluated = {"pope_mean_f1": {"coco": 0.81954, "gqa": None}, "counts": {"items": 728, "errors": 3}}
    assert stage_summary(evaluated) == "coco POPE mean F1 81.95, 3 errors"  # gqa short of answers: no mean
    trained = {"adapter": "a", "metrics": {"loss": 0.39107, "rewards/accuracies": 0.81875}}
    assert stage_summary(trained) == "loss 0.3911, reward accuracy 0.82"
    assert stage_summary({"model": "m"}) == ""
