"""Ray Tune sweeps: each trial trains DPO on Ray Train and is judged on POPE, during and after training.

This is the Tune *driver-function* pattern of Ray 2.60 (Train V2): a trial is a small function that
launches its own `TorchTrainer` (through `run_training`) and reports to Tune.

- **The objective** is `tune.metric`, a POPE number (e.g. ``pope/adversarial/f1``, max, or
  ``pope/adversarial/yes_ratio_gap`` = |yes-ratio - 0.5|, min), always reported under the key
  ``objective``, numbered by ``evaluations``.
- **During training** (every `tune.eval_every_steps` optimizer steps) the training workers score a fixed
  POPE subset (`tune.probe_questions` per split, the same questions for every trial) with the model they
  hold; that step's report carries the objective (see orchestrator/eval/probe.py for why this design and
  its limits). `objective_report_callback` forwards only those reports to Tune, so the scheduler
  (`tune.scheduler`: ASHA or the median stopping rule, time = ``evaluations``) stops trials on the objective,
  never on the training loss.
- **After training** the trial evaluates its adapter on the full POPE set (`run_eval`, the same as
  `hadpo eval`) and reports the final objective with ``final_evaluation: true``. Trials stopped early have
  no final evaluation; the best trial is chosen among those that have one.
- **Search** (`tune.search`): random / grid (Tune's variant generator) or Ray Tune's OptunaSearch /
  HyperOptSearch, seeded by `tune.seed`. A searcher learns from each trial's last objective (the full-set
  one, or the subset's for a trial the scheduler stopped).
- **Outputs** under ``<run_dir>/tune``: ``trials.parquet`` (one row per trial), ``best_config.yaml`` (the
  base config with the best trial's values, named ``<name>-best``, which `hadpo run` takes as it is),
  ``probe_questions.parquet`` (the subset), and Tune's own trial folders (``<name>-tune/``, with
  TensorBoard event files of every trial's reports: ``tensorboard --logdir <run_dir>/tune``). Each trial's
  training logs to the config's trackers under its own run folder; its MLflow runs go into the base
  run's store (one experiment per sweep), where the trial's final POPE values are added too.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator import layout
from orchestrator.config import ExperimentConfig, SearchDimension, apply_override, config_from_dict
from orchestrator.data.datasets import pope_rows, resolve_data_paths
from orchestrator.eval import pope
from orchestrator.eval.probe import objective_of, select_probe_questions
from orchestrator.files import atomic_write
from orchestrator.images import image_error
from orchestrator.ray_session import init_ray
from orchestrator.train.reference_cache import precompute_reference
from orchestrator.train.tracking import MlflowFileRun

log = logging.getLogger("hadpo.tune")

OBJECTIVE = "objective"        # every report to Tune carries the objective under this key ...
EVALUATIONS = "evaluations"    # ... numbered 1, 2, ... (the schedulers' time axis)
FINAL = "final_evaluation"     # true on the report of the full POPE evaluation after training
PLACEMENT_GROUP = "train_placement_group"  # the training run's placement group, named in the objective reports


def search_space(config: ExperimentConfig) -> dict[str, Any]:
    """The Tune param_space: dotted config key -> Tune sampler (grid search: choices enumerated too)."""
    from ray import tune

    every_value = config.tune.search == "grid"

    def sampler(dim: SearchDimension):
        if dim.kind == "grid" or (dim.kind == "choice" and every_value):
            return tune.grid_search(list(dim.values))
        if dim.kind == "choice":
            return tune.choice(list(dim.values))
        if dim.kind == "uniform":
            return tune.uniform(dim.low, dim.high)
        if dim.kind == "loguniform":
            return tune.loguniform(dim.low, dim.high)
        return tune.randint(int(dim.low), int(dim.high))

    if not config.tune.search_space:
        raise ValueError("tune.search_space is empty: name at least one key, e.g. train.beta")
    return {key: sampler(dim) for key, dim in config.tune.search_space.items()}


def search_algorithm(config: ExperimentConfig):
    """Tune's searcher for `tune.search`, seeded with `tune.seed`."""
    settings = config.tune
    if settings.search in ("random", "grid"):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune applies max_concurrent_trials to Searchers only: a variant generator is given it itself
        return BasicVariantGenerator(random_state=settings.seed, max_concurrent=settings.max_concurrent_trials or 0)
    if settings.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=OBJECTIVE, mode=settings.mode, seed=settings.seed)
    from ray.tune.search.hyperopt import HyperOptSearch

    return HyperOptSearch(metric=OBJECTIVE, mode=settings.mode, random_state_seed=settings.seed)


def scheduler(config: ExperimentConfig):
    """Tune's trial scheduler for `tune.scheduler` (None: every trial runs to the end)."""
    settings = config.tune
    if settings.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # max_t beyond any trial's number of evaluations: only the rungs stop trials, never the length
        return ASHAScheduler(metric=OBJECTIVE, mode=settings.mode, time_attr=EVALUATIONS, max_t=2**20,
                             grace_period=settings.asha.grace_period, reduction_factor=settings.asha.reduction_factor)
    if settings.scheduler == "median":
        from ray.tune.schedulers import MedianStoppingRule

        return MedianStoppingRule(metric=OBJECTIVE, mode=settings.mode, time_attr=EVALUATIONS,
                                  grace_period=settings.median.grace_period,
                                  min_samples_required=settings.median.min_samples_required)
    return None


def trial_tag(params: dict[str, Any]) -> str:
    """A short, readable, deterministic name for a trial's values, e.g. 'beta=0.5_rank=8'."""
    def short(value):
        return f"{value:.3g}" if isinstance(value, float) else str(value)
    return "_".join(f"{key.split('.')[-1]}={short(value)}" for key, value in sorted(params.items()))


def with_params(base: ExperimentConfig, params: dict[str, Any], name: str, source: str) -> ExperimentConfig:
    """The base config with `params` set at their dotted keys, named `name`, without a sweep of its own."""
    raw = base.model_dump(mode="json")
    raw["tune"] = {}
    for key, value in params.items():
        apply_override(raw, f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}")
    raw["name"] = name
    return config_from_dict(raw, source)


def trial_config(base: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """The base config with the trial's values set and a run name of its own; its MLflow runs go to the
    base run's store, in one experiment named after the sweep."""
    name = layout.trial_run_name(base.name, trial_tag(params))
    config = with_params(base, params, name, f"trial {trial_tag(params)}")
    mlflow = config.mlflow.model_copy(update={"store": str(base.mlflow_store),
                                              "experiment": base.mlflow.experiment or base.name})
    return config.model_copy(update={"mlflow": mlflow})


def best_config(base: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """The config `hadpo run` takes after a sweep: the base with the best trial's values, named <name>-best."""
    return with_params(base, params, layout.best_run_name(base.name), "best trial")


def objective_report_callback():
    """A `TuneReportCallback` that forwards to Tune only the training reports that carry the objective, so the
    scheduler sees the objective and nothing else (see the module docstring)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and OBJECTIVE in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return ObjectiveReportCallback()


def release_stopped_training(result: dict[str, Any]) -> bool:
    """Remove the placement group of a trial's training run when the trial ended without its final evaluation.

    A scheduler stops a trial by ending its actor; the Train run inside dies with it, but its placement group
    (its workers' CPUs/GPUs) lives on until the sweep's driver exits, unless Ray Train's cleaner, which needs
    the Ray dashboard's state API, removes it. The workers name the group in their objective reports.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    group_id = result.get(PLACEMENT_GROUP)
    if not group_id or result.get(FINAL):
        return False
    group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id)))
    if placement_group_table(group).get("state") in (None, "REMOVED"):
        return False
    remove_placement_group(group)
    log.info("released the placement group %s of a stopped trial's training run", group_id)
    return True


def release_stopped_training_callback():
    """A Tune callback that calls `release_stopped_training` on every trial that ends or fails."""
    from ray.tune import Callback

    class ReleaseStoppedTraining(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            release_stopped_training(trial.last_result or {})

        def on_trial_error(self, iteration, trials, trial, **info):
            release_stopped_training(trial.last_result or {})

    return ReleaseStoppedTraining()


def probe_rows(config: ExperimentConfig) -> list[dict]:
    """The fixed POPE subset every trial is measured on during training (images that open only), saved."""
    rows = pope_rows(config)
    opens = {path: not image_error(path) for path in {row["image"] for row in rows}}  # each image once
    usable = [row for row in rows if opens[row["image"]]]
    chosen = select_probe_questions(usable, config.tune.probe_questions, config.data.seed)
    path = layout.probe_questions_path(config.run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(chosen).to_parquet(path, index=False)
    return chosen


def probe_spec(config: ExperimentConfig, rows: list[dict]) -> dict[str, Any] | None:
    """What the training workers need to measure the objective (`recipe.probe_objective`)."""
    if config.tune.eval_every_steps is None:
        return None
    return {"rows": rows, "every": config.tune.eval_every_steps, "metric": config.tune.metric,
            "template": config.model.eval_template, "batch_size": config.eval.batch_size}


def final_report(values: dict[str, float], metric: str, evaluations: int) -> dict[str, Any]:
    """The last report of a trial: the full POPE values, the objective and the evaluation's number."""
    return {**values, OBJECTIVE: objective_of(values, metric), EVALUATIONS: evaluations, FINAL: True}


def run_trial(params: dict[str, Any], base_raw: dict, base_model: str | None, probe: dict[str, Any] | None) -> None:
    """One Tune trial (runs inside a Tune trial actor): train (objective on the subset every few steps),
    evaluate on the full POPE set, report the final objective."""
    from ray import tune

    # the stages' model code (torch, transformers) loads in the trial, not when a sweep is configured
    from orchestrator.eval.runner import run_eval
    from orchestrator.train.trainer import run_training

    base = config_from_dict(base_raw, "tune base config")
    config = trial_config(base, params)
    trained = run_training(config, stage=layout.DPO, base_model=base_model, callbacks=[objective_report_callback()],
                           probe=probe)
    evaluated = run_eval(config, model_path=base_model, adapter=trained.checkpoint_path, benchmarks=("pope",))
    values = pope.objective_values(evaluated.pope_table)
    step = int(trained.metrics.get("step", 0))
    done_probes = step // probe["every"] if probe else 0
    final = final_report(values, base.tune.metric, done_probes + 1)
    if "mlflow" in config.tracking:  # the trial's final POPE values beside its training curves
        run = MlflowFileRun(config.mlflow_store, config.mlflow.experiment,
                            layout.train_run_name(config.name, layout.DPO), resume_step=step)
        run.log(step, {f"final/{key}": value for key, value in final.items() if key != FINAL}, wall_time=time.time())
        run.finish()
    final.update({"adapter": trained.checkpoint_path, "eval_run_id": evaluated.run_id})
    final.update({k: v for k, v in trained.metrics.items() if isinstance(v, (int, float)) and k not in final})
    tune.report(final)


def pope_objectives(config: ExperimentConfig) -> list[str]:
    """The POPE objectives a trial of this config reports: per dataset and split its five metrics, per dataset
    its mean F1 (`pope/adversarial/f1`, `pope/mean_f1` for COCO; `pope/gqa/adversarial/f1`, `pope/gqa/mean_f1`)."""
    datasets = resolve_data_paths(config).pope
    return pope.objective_names({name: list(files.questions) for name, files in datasets.items()})


def check_objective(config: ExperimentConfig) -> None:
    """Fail before any trial trains when `tune.metric` is a POPE name no trial will report."""
    metric = config.tune.metric
    if metric.startswith("pope/"):
        names = pope_objectives(config)
        names += [name.removesuffix("/yes_ratio") + "/yes_ratio_gap" for name in names if name.endswith("/yes_ratio")]
        if metric not in names:
            raise ValueError(f"tune.metric {metric!r} is not reported by this config's POPE datasets; one of: "
                             + ", ".join(names))


@dataclass
class TuneResult:
    trials: pd.DataFrame
    best_params: dict[str, Any]
    best_metrics: dict[str, Any]
    results_path: Path
    best_config_path: Path | None = None


def run_tune(config: ExperimentConfig, base_model: str | None = None) -> TuneResult:
    """Sweep `config.tune.search_space`; return every trial's result and the best one."""
    import ray
    from ray import tune

    check_objective(config)
    if not ray.is_initialized():
        init_ray(config)
    settings = config.tune
    space = search_space(config)
    probe = probe_spec(config, probe_rows(config)) if settings.eval_every_steps else None
    if config.train.reference_cache:
        # Once, before the trials: they all start from this model, so they all find its log-probs cached.
        # (The base model's and the training's modules load torch: only for a sweep that caches.)
        from orchestrator.model.base_model import base_model_path
        from orchestrator.train.trainer import stage_dataset

        precompute_reference(config, base_model_path(config, base_model), stage_dataset(config, layout.DPO))
    storage = layout.tune_dir(config.run_dir)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base_raw=config.model_dump(mode="json"), base_model=base_model, probe=probe),
        {"CPU": settings.cpus_per_trial_driver},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            num_samples=settings.num_samples, search_alg=search_algorithm(config), scheduler=scheduler(config),
            max_concurrent_trials=settings.max_concurrent_trials if settings.search in ("optuna", "hyperopt") else None),
        run_config=tune.RunConfig(name=layout.tune_run_name(config.name), storage_path=str(storage),
                                  callbacks=[release_stopped_training_callback()]),
    )
    grid = tuner.fit()
    trials = trials_frame(grid)
    results_path = layout.trials_path(config.run_dir)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    trials.to_parquet(results_path, index=False)
    finished = trials[~trials["stopped_early"] & trials[OBJECTIVE].notna()]
    if finished.empty:
        raise RuntimeError(f"no trial finished with {settings.metric}; see {results_path}")
    best = finished.sort_values(OBJECTIVE, ascending=settings.mode == "min").iloc[0]
    best_params = {k.removeprefix("param/"): _plain(best[k]) for k in trials.columns if k.startswith("param/")}
    best_metrics = {k: best[k] for k in trials.columns if k.startswith("pope/") or k == OBJECTIVE}
    best_path = write_best_config(config, best_params, best, layout.best_config_path(config.run_dir))
    log.info("best trial %s: %s = %.4f; its config: %s", best["trial"], settings.metric, best[OBJECTIVE], best_path)
    return TuneResult(trials, best_params, best_metrics, results_path, best_path)


def trials_frame(grid) -> pd.DataFrame:
    """One row per trial: its values (``param/<key>``), its last report, whether the scheduler stopped it."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        row = {"trial": Path(result.path).name if result.path else "", "error": str(result.error or "")}
        row.update({f"param/{k}": v for k, v in (result.config or {}).items()})
        row.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))})
        row["stopped_early"] = not bool(metrics.get(FINAL))
        if not metrics.get(FINAL):
            row.pop(OBJECTIVE, None)  # a subset's value is not comparable with the finished trials' full-set one
            row["last_probe_objective"] = metrics.get(OBJECTIVE, math.nan)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if OBJECTIVE not in frame:
        frame[OBJECTIVE] = math.nan
    return frame


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def write_best_config(base: ExperimentConfig, params: dict[str, Any], best: pd.Series, path: Path) -> Path:
    """The best trial's config as YAML, with a header saying where it comes from."""
    import yaml

    config = best_config(base, params)
    header = (f"# Best trial of the sweep {base.name} (trial {best['trial']}): {base.tune.metric} = "
              f"{float(best[OBJECTIVE]):.6g} on the full POPE set.\n"
              f"# The base config with {', '.join(f'{k}={v}' for k, v in params.items())}; run it with: "
              f"hadpo run {path}\n")
    text = header + yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    return atomic_write(path, lambda temp: temp.write_text(text))


def format_trials(result: TuneResult, metric: str) -> str:
    params = [c for c in result.trials.columns if c.startswith("param/")]
    shown = result.trials[params + [c for c in (metric, OBJECTIVE, "last_probe_objective", "stopped_early")
                                    if c in result.trials]]
    return (shown.to_string(index=False) + f"\n\nbest: {result.best_params} ({metric} = "
            f"{result.best_metrics.get(metric)})\nbest config: {result.best_config_path}")
