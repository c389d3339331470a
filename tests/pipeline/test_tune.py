"""Ray Tune sweeps: searchers, schedulers that stop on the POPE objective measured during training, the
trials' results in one parquet, and the best trial's config exported for `hadpo run`."""

import time

import pandas as pd
import pytest
import yaml

from orchestrator.config import ConfigError, config_from_dict, load_config
from orchestrator.eval.probe import objective_of, select_probe_questions
from orchestrator.tune import best_config, run_tune, trial_config, trial_tag


def test_trial_config_sets_the_sampled_values_and_its_own_name_and_logs_into_the_sweeps_mlflow_store(tmp_path):
    base = config_from_dict({"name": "sweep", "output_root": str(tmp_path), "tune": {"search_space": {
        "train.beta": {"kind": "grid", "values": [0.1, 0.5]}}, "scheduler": "none"}})
    trial = trial_config(base, {"train.beta": 0.5, "train.lora.rank": 8})
    assert trial.train.beta == 0.5 and trial.train.lora.rank == 8
    assert trial.name == "sweep-beta0.5_rank8" and trial.tune.search_space == {}
    assert trial.mlflow_store == base.mlflow_store and trial.mlflow.experiment == "sweep"
    assert trial_tag({"train.learning_rate": 0.000123}) == "learning_rate=0.000123"
    best = best_config(base, {"train.beta": 0.5})
    assert best.name == "sweep-best" and best.train.beta == 0.5 and best.tune.search_space == {}


def test_objective_of_reads_a_reported_value_or_a_splits_yes_ratio_gap():
    values = {"pope/adversarial/f1": 0.8, "pope/adversarial/yes_ratio": 0.62, "pope/random/yes_ratio": 0.41,
              "pope/mean_f1": 0.85}
    assert objective_of(values, "pope/adversarial/f1") == 0.8
    assert objective_of(values, "pope/adversarial/yes_ratio_gap") == pytest.approx(0.12)
    assert objective_of(values, "pope/random/yes_ratio_gap") == pytest.approx(0.09)
    with pytest.raises(KeyError, match="pope/popular/f1"):
        objective_of(values, "pope/popular/f1")


def test_probe_questions_are_a_fixed_label_balanced_subset_per_split():
    rows = [{"question_id": i, "split": split, "label": "yes" if i % 4 == 0 else "no", "image": f"{i}.jpg"}
            for split in ("random", "adversarial") for i in range(40)]
    chosen = select_probe_questions(rows, 6, seed=42)
    assert select_probe_questions(list(reversed(rows)), 6, seed=42) == chosen  # input order does not matter
    for split in ("random", "adversarial"):
        labels = [row["label"] for row in chosen if row["split"] == split]
        assert len(labels) == 6 and labels.count("yes") == 3
    assert select_probe_questions(rows, 6, seed=7) != chosen
    few_yes = [row for row in rows if row["label"] == "no" or row["question_id"] == 0]
    topped_up = select_probe_questions(few_yes, 6, seed=42)
    assert len([row for row in topped_up if row["split"] == "random"]) == 6  # one yes + five no


@pytest.mark.parametrize("tune, message", [
    ({"scheduler": "asha", "eval_every_steps": None}, "set tune.eval_every_steps"),
    ({"scheduler": "none", "search": "grid",
      "search_space": {"train.beta": {"kind": "uniform", "low": 0.1, "high": 1.0}}}, "grid or choice dimensions"),
    ({"scheduler": "none", "search": "optuna",
      "search_space": {"train.beta": {"kind": "grid", "values": [0.1, 0.5]}}}, "make \\['train.beta'\\] kind choice"),
    ({"metric": "loss"}, "not a POPE objective"),
])
def test_sweep_settings_that_cannot_work_fail_at_load(tune, message):
    tune = {"search_space": {"train.beta": {"kind": "choice", "values": [0.1, 0.5]}}, **tune}
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"tune": tune})


@pytest.mark.parametrize("search", ["random", "grid", "optuna", "hyperopt"])
def test_each_searcher_takes_the_search_space_and_suggests_values_in_range(search):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from orchestrator.tune import OBJECTIVE, scheduler, search_algorithm, search_space

    space = {"train.beta": {"kind": "choice", "values": [0.1, 0.5]}}
    if search != "grid":
        space["train.learning_rate"] = {"kind": "loguniform", "low": 1e-6, "high": 1e-4}
    config = config_from_dict({"tune": {"search": search, "seed": 1, "search_space": space}})
    searcher = search_algorithm(config)
    if search in ("random", "grid"):
        assert isinstance(searcher, BasicVariantGenerator)
        return
    assert searcher.metric == OBJECTIVE and searcher.mode == "max"
    assert searcher.set_search_properties(None, None, search_space(config))
    suggestion = searcher.suggest("trial-1")
    assert suggestion["train.beta"] in (0.1, 0.5) and 1e-6 <= suggestion["train.learning_rate"] <= 1e-4
    assert type(scheduler(config)).__name__ == "AsyncHyperBandScheduler"
    median = config_from_dict({"tune": {"scheduler": "median", "search_space": space}})
    assert type(scheduler(median)).__name__ == "MedianStoppingRule"
    assert scheduler(config_from_dict({"tune": {"scheduler": "none", "search_space": space}})) is None


def test_asha_and_the_median_rule_stop_a_trial_on_the_objective_at_its_evaluation():
    """The schedulers as `scheduler(config)` builds them read `objective` at `evaluations` (what the probe
    reports) and nothing else: a training report without the objective never stops a trial."""
    from types import SimpleNamespace

    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from orchestrator.tune import scheduler

    space = {"train.beta": {"kind": "choice", "values": [0.1, 0.5]}}
    asha = scheduler(config_from_dict({"tune": {"search_space": space, "mode": "min", "scheduler": "asha",
                                                "asha": {"grace_period": 1, "reduction_factor": 2}}}))
    first, second, third = (Trial("__fake", trial_id=name, stub=True) for name in "abc")
    for trial in (first, second, third):
        asha.on_trial_add(None, trial)
    assert asha.on_trial_result(None, first, {"objective": 0.25, "evaluations": 1}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, second, {"loss": 9.0, "step": 1}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, second, {"objective": 0.5, "evaluations": 1}) == TrialScheduler.STOP
    assert asha.on_trial_result(None, third, {"objective": 0.1, "evaluations": 1}) == TrialScheduler.CONTINUE

    median = scheduler(config_from_dict({"tune": {"search_space": space, "mode": "max", "scheduler": "median",
                                                  "median": {"grace_period": 1, "min_samples_required": 1}}}))
    controller = SimpleNamespace(get_live_trials=lambda: [])  # the rule asks which trials wait for a slot
    for trial in (first, second, third):
        median.on_trial_add(controller, trial)
    for evaluation, value in ((1, 0.8), (2, 0.8)):
        median.on_trial_result(controller, first, {"objective": value, "evaluations": evaluation})
    median.on_trial_complete(controller, first, {"objective": 0.8, "evaluations": 2})
    # the rule compares a trial's best objective so far with the median of the others' running means
    assert median.on_trial_result(controller, third, {"objective": 0.9, "evaluations": 2}) == TrialScheduler.CONTINUE
    assert median.on_trial_result(controller, second, {"objective": 0.3, "evaluations": 2}) == TrialScheduler.STOP


def _sweep_config(tmp_path, tune: dict, train: dict | None = None):
    return config_from_dict({
        "name": "sweep", "output_root": str(tmp_path), "tracking": ["tensorboard", "mlflow"],
        "data": {"synthetic": {"num_images": 12, "num_pope_images": 4, "milebench_tasks": 0}},
        "train": {"max_steps": 3, "batch_size_per_worker": 2, "learning_rate": 1e-3, "max_length": 256,
                  "gradient_checkpointing": False, "checkpoint_every_steps": 3, "log_every_steps": 1,
                  "reference_cache": False, "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
                  "deepspeed": {"enabled": False}, **(train or {})},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.25},
        "eval": {"batch_size": 16, "cpus_per_actor": 0.25},
        "tune": {"metric": "pope/adversarial/f1", "mode": "max", "cpus_per_trial_driver": 0.25,
                 "max_concurrent_trials": 1, "eval_every_steps": 1, "probe_questions": 8, **tune},
    })


@pytest.mark.slow
def test_optuna_sweep_measures_the_objective_during_training_and_exports_a_best_config_hadpo_run_loads(
        ray_session, tiny_model_dir, tmp_path, monkeypatch):
    # both trials at once, as a sweep runs by default (the cluster's CPUs decide): the trials write their
    # trackers' files into the sweep's one MLflow store side by side
    config = _sweep_config(tmp_path, {
        "search": "optuna", "seed": 3, "num_samples": 2, "scheduler": "none", "max_concurrent_trials": 2,
        "search_space": {"train.beta": {"kind": "loguniform", "low": 0.05, "high": 1.0}}},
        train={"log_every_steps": 2})  # step 1: a probe without a training log
    result = run_tune(config, base_model=str(tiny_model_dir))
    trials = pd.read_parquet(result.results_path)
    assert len(trials) == 2 and trials["error"].eq("").all(), trials["error"].tolist()
    assert trials["param/train.beta"].between(0.05, 1.0).all() and trials["param/train.beta"].nunique() == 2
    assert (~trials["stopped_early"]).all() and trials["objective"].between(0, 1).all()
    assert (trials["objective"] == trials["pope/adversarial/f1"]).all()  # the final one: the full POPE set
    assert (trials["evaluations"] == 4).all()  # 3 probes during the 3 steps, then the full evaluation

    # each trial's training logged the subset's objective at every step to its trackers
    trial = trial_config(config, {"train.beta": float(trials["param/train.beta"].iloc[0])})
    curves = pd.read_parquet(trial.run_dir / "train" / "dpo_curves.parquet")
    assert curves["step"].tolist() == [1, 2, 3] and curves["objective"].between(0, 1).all()
    assert pd.isna(curves["loss"].iloc[0]) and curves["loss"].iloc[1:].notna().all()
    assert curves["probe/pope/adversarial/f1"].tolist() == curves["objective"].tolist()
    assert list((trial.tensorboard_dir / "dpo").glob("events.out.tfevents.*"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=config.mlflow_store.as_uri())
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert sorted(run.info.run_name for run in runs) == sorted(f"{trial_config(config, {'train.beta': float(b)}).name}-dpo"
                                                               for b in trials["param/train.beta"])
    assert all(0 <= run.data.metrics["final/objective"] <= 1 for run in runs)
    # Tune's own trial folders hold TensorBoard event files of the reports
    assert list((config.run_dir / "tune").rglob("events.out.tfevents.*"))

    best = load_config(result.best_config_path)  # what `hadpo run` does first with it
    assert best.name == "sweep-best" and best.train.beta == pytest.approx(result.best_params["train.beta"])
    assert best.train.lora.rank == 4 and best.tune.search_space == {}
    header = result.best_config_path.read_text().splitlines()[0]
    assert header.startswith("# Best trial of the sweep sweep") and yaml.safe_load(result.best_config_path.read_text())
    # the trials trained on the suite's local Ray: no placement-group cleaner polling a state API it does not serve
    from ray._private.state import actors

    job = ray_session.get_runtime_context().get_job_id()
    assert not [actor for actor in actors().values()
                if "PlacementGroupCleaner" in actor["ActorClassName"] and actor["JobID"] == job]


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
    gap = config_from_dict({"data": {"pope": coco}, "tune": {"metric": "pope/adversarial/yes_ratio_gap", "mode": "min"}})
    check_objective(gap)  # derived from the split's yes-ratio


LARGE_LR = 5.0  # one step of it moves the untrained tiny model's answers (0.5 did not with every data order)


@pytest.mark.slow
def test_asha_stops_the_trial_whose_objective_on_the_probe_is_worse(ray_session, tiny_model_dir, tmp_path):
    # The untrained tiny model answers "no" to every question (yes-ratio 0, gap 0.5). A very large learning rate
    # moves answers to "yes" within a step; a tiny one does not. Trials run one after the other, the large
    # rate first; ASHA (grace 1, reduction 2) compares the second trial with the first at the first
    # evaluation and stops it there, its gap being larger.
    config = _sweep_config(tmp_path, {
        "search": "grid", "scheduler": "asha", "asha": {"grace_period": 1, "reduction_factor": 2},
        "metric": "pope/adversarial/yes_ratio_gap", "mode": "min",
        "search_space": {"train.learning_rate": {"kind": "grid", "values": [LARGE_LR, 1e-9]}}},
        train={"warmup_ratio": 0.0, "lr_schedule": "constant", "max_steps": 2, "checkpoint_every_steps": 2})
    result = run_tune(config, base_model=str(tiny_model_dir))
    trials = pd.read_parquet(result.results_path).set_index("param/train.learning_rate")
    assert trials["error"].eq("").all(), trials["error"].tolist()
    first_probe = {}
    for lr in (LARGE_LR, 1e-9):
        curves = pd.read_parquet(trial_config(config, {"train.learning_rate": lr}).run_dir / "train"
                                 / "dpo_curves.parquet")
        first_probe[lr] = float(curves.loc[curves["step"] == 1, "objective"].iloc[0])
    assert first_probe[1e-9] == 0.5 and first_probe[LARGE_LR] < 0.5, first_probe
    assert not trials.loc[LARGE_LR, "stopped_early"] and trials.loc[LARGE_LR, "objective"] >= 0
    # ASHA (min, reduction 2) stops the second trial at its first evaluation: it is worse than the first's
    assert trials.loc[1e-9, "stopped_early"] and pd.isna(trials.loc[1e-9, "objective"])
    assert trials.loc[1e-9, "last_probe_objective"] == 0.5 and trials.loc[1e-9, "evaluations"] == 1
    assert result.best_params == {"train.learning_rate": LARGE_LR}
    # the stopped trial's training run gave its CPUs back (tests after this one need both)
    deadline = time.time() + 60
    while ray_session.available_resources().get("CPU", 0) < ray_session.cluster_resources()["CPU"]:
        assert time.time() < deadline, ray_session.available_resources()
        time.sleep(1)
