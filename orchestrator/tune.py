"""Ray Tune sweeps: each trial trains DPO on Ray Train and evaluates the adapter on POPE.

This is the Tune *driver-function* pattern of Ray 2.60 (Train V2): a trial is a small function that
launches its own `TorchTrainer` (through `run_training`), forwards the workers' training metrics to Tune
with `TuneReportCallback` (so ASHA can stop weak trials early on, e.g., the DPO loss), then evaluates
the trained adapter and reports the objective (e.g. adversarial POPE F1: `pope/adversarial/f1` for COCO,
`pope/gqa/adversarial/f1` for a POPE dataset named gqa) as its final result. Each
trial's config is the base config with the sampled values set at their dotted keys and its own name,
so its checkpoints and answers land under its own run folder. All trial results go to one parquet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.config import ExperimentConfig, SearchDimension, apply_override, config_from_dict

log = logging.getLogger("hadpo.tune")


def search_space(config: ExperimentConfig) -> dict[str, Any]:
    """The Tune param_space: dotted config key -> Tune sampler."""
    from ray import tune

    def sampler(dim: SearchDimension):
        if dim.kind == "choice":
            return tune.choice(list(dim.values))
        if dim.kind == "grid":
            return tune.grid_search(list(dim.values))
        if dim.kind == "uniform":
            return tune.uniform(dim.low, dim.high)
        if dim.kind == "loguniform":
            return tune.loguniform(dim.low, dim.high)
        return tune.randint(int(dim.low), int(dim.high))

    if not config.tune.search_space:
        raise ValueError("tune.search_space is empty: name at least one key, e.g. train.beta")
    return {key: sampler(dim) for key, dim in config.tune.search_space.items()}


def trial_tag(params: dict[str, Any]) -> str:
    """A short, readable, deterministic name for a trial's values, e.g. 'beta=0.5_rank=8'."""
    def short(value):
        return f"{value:.3g}" if isinstance(value, float) else str(value)
    return "_".join(f"{key.split('.')[-1]}={short(value)}" for key, value in sorted(params.items()))


def trial_config(base: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """The base config with the trial's values set and a run name of its own."""
    raw = base.model_dump(mode="json")
    raw["tune"] = {}  # a trial is a single run
    for key, value in params.items():
        apply_override(raw, f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}")
    raw["name"] = f"{base.name}-{trial_tag(params)}".replace("/", "-").replace("=", "")
    return config_from_dict(raw, f"trial {trial_tag(params)}")


def run_trial(params: dict[str, Any], base_raw: dict, base_model: str | None) -> None:
    """One Tune trial (runs inside a Tune trial actor): train, evaluate, report the objective."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.eval.runner import run_eval
    from orchestrator.eval import pope
    from orchestrator.train.trainer import run_training

    base = config_from_dict(base_raw, "tune base config")
    config = trial_config(base, params)
    trained = run_training(config, stage="dpo", base_model=base_model, callbacks=[TuneReportCallback()])
    evaluated = run_eval(config, model_path=base_model, adapter=trained.checkpoint_path, benchmarks=("pope",))
    final: dict[str, Any] = pope.objective_values(evaluated.pope_table)
    final.update({"adapter": trained.checkpoint_path, "eval_run_id": evaluated.run_id, "done": True})
    final.update({k: v for k, v in trained.metrics.items() if isinstance(v, (int, float))})
    tune.report(final)


def pope_objectives(config: ExperimentConfig) -> list[str]:
    """The POPE objectives a trial of this config reports: per dataset and split its five metrics, per dataset
    its mean F1 (`pope/adversarial/f1`, `pope/mean_f1` for COCO; `pope/gqa/adversarial/f1`, `pope/gqa/mean_f1`)."""
    from orchestrator.data.datasets import resolve_data_paths
    from orchestrator.eval import pope

    datasets = resolve_data_paths(config).pope
    return pope.objective_names({name: list(files.questions) for name, files in datasets.items()})


def check_objective(config: ExperimentConfig) -> None:
    """Fail before any trial trains when `tune.metric` is a POPE name no trial will report."""
    metric = config.tune.metric
    if metric.startswith("pope/"):
        names = pope_objectives(config)
        if metric not in names:
            raise ValueError(f"tune.metric {metric!r} is not reported by this config's POPE datasets; one of: "
                             + ", ".join(names))


@dataclass
class TuneResult:
    trials: pd.DataFrame
    best_params: dict[str, Any]
    best_metrics: dict[str, Any]
    results_path: Path


def run_tune(config: ExperimentConfig, base_model: str | None = None) -> TuneResult:
    """Sweep `config.tune.search_space`; return every trial's result and the best one."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from orchestrator.ray_session import init_ray

    check_objective(config)
    if not ray.is_initialized():
        init_ray(config)
    settings = config.tune
    scheduler = None
    if settings.asha.enabled:
        # ASHA compares trials on the training metric the workers report every `log_every_steps`.
        scheduler = ASHAScheduler(metric=settings.asha.metric, mode=settings.asha.mode,
                                  time_attr="training_iteration", grace_period=settings.asha.grace_period,
                                  reduction_factor=settings.asha.reduction_factor)
    if config.train.reference_cache:
        # Once, before the trials: they all start from this model, so they all find its log-probs cached.
        from orchestrator.train.reference_cache import precompute_reference
        from orchestrator.train.trainer import base_model_path, stage_dataset

        precompute_reference(config, base_model_path(config, base_model), stage_dataset(config, "dpo"))
    storage = config.run_dir / "tune"
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base_raw=config.model_dump(mode="json"), base_model=base_model),
        {"CPU": settings.cpus_per_trial_driver},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(config),
        tune_config=tune.TuneConfig(num_samples=settings.num_samples, scheduler=scheduler,
                                    max_concurrent_trials=settings.max_concurrent_trials),
        run_config=tune.RunConfig(name=f"{config.name}-tune", storage_path=str(storage)),
    )
    grid = tuner.fit()
    rows = []
    for result in grid:
        row = {"trial": Path(result.path).name if result.path else "", "error": str(result.error or "")}
        row.update({f"param/{k}": v for k, v in (result.config or {}).items()})
        row.update({k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str, bool))})
        row["stopped_early"] = not bool((result.metrics or {}).get("done"))
        rows.append(row)
    trials = pd.DataFrame(rows)
    results_path = storage / "trials.parquet"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    trials.to_parquet(results_path, index=False)
    finished = trials[~trials["stopped_early"]] if "stopped_early" in trials else trials
    if finished.empty or settings.metric not in finished:
        raise RuntimeError(f"no trial finished with {settings.metric}; see {results_path}")
    best = finished.sort_values(settings.metric, ascending=settings.mode == "min").iloc[0]
    best_params = {k.removeprefix("param/"): best[k] for k in trials.columns if k.startswith("param/")}
    best_metrics = {k: best[k] for k in trials.columns if k.startswith("pope/")}
    log.info("best trial %s: %s = %.4f", best["trial"], settings.metric, best[settings.metric])
    return TuneResult(trials, best_params, best_metrics, results_path)


def format_trials(result: TuneResult, metric: str) -> str:
    params = [c for c in result.trials.columns if c.startswith("param/")]
    shown = result.trials[params + [c for c in (metric, "loss", "stopped_early") if c in result.trials]]
    return shown.to_string(index=False) + f"\n\nbest: {result.best_params} ({metric} = {result.best_metrics.get(metric)})"
