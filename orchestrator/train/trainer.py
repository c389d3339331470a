"""The driver side of training: build the Ray Train job for a stage, run it, say where its outputs are.

Ray stays at this edge: the recipe (`recipe.train_loop_per_worker`) is the training, and this file only
turns the experiment config into `ScalingConfig` / `RunConfig` / datasets and calls `fit()`.

Outputs, all derived from the config:
- Ray Train's run folder ``<run_dir>/train/<name>-<stage>/`` (or ``<train.storage_path>/<name>-<stage>``,
  which may be a cloud URI) holding the last `keep_checkpoints` checkpoints;
- the curves parquet ``<run_dir>/train/<stage>_curves.parquet`` and wandb files under ``<run_dir>/wandb``.

The run name is deterministic (``<experiment name>-<stage>``), so running the same stage again with
`resume=True` continues from the newest complete checkpoint on disk (`checkpoints.plan_resume`: Ray
Train's own record when it agrees with the disk, else the folder itself; the recipe continues the step
counter, schedule, optimizer, RNG and data order); `resume=False` deletes the stage's old run first.
After the run, no more than `keep_checkpoints` complete checkpoint folders stay on disk.
Before anything is submitted, the workers' resources are checked against the cluster
(`orchestrator.resources`): what can never be had fails in seconds instead of waiting forever.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from orchestrator import layout
from orchestrator.config import ExperimentConfig
from orchestrator.data import datasets
from orchestrator.model.base_model import base_model_path
from orchestrator.plan import reference_fill
from orchestrator.ray_session import init_ray, local_session, state_api_served, stop_signals_handled
from orchestrator.resources import preflight, reference_request, training_request
from orchestrator.train import checkpoints
from orchestrator.train.recipe import train_loop_per_worker
from orchestrator.train.reference_cache import keyed_cache, precompute_reference, write_cache_meta
from orchestrator.train.schedule import STAGES, stage_plan

log = logging.getLogger("hadpo.train")


@dataclass
class TrainResult:
    checkpoint_path: str          # the final adapter/ (LoRA) or model/ (full fine-tune) folder
    metrics: dict[str, Any] = field(default_factory=dict)
    curves_path: str = ""
    run_path: str = ""            # Ray Train's folder of this stage (checkpoints, state)
    timings: dict[str, float] = field(default_factory=dict)  # driver clock: started, reference pass, fit


def storage_path(cfg: ExperimentConfig) -> str:
    """Where Ray Train keeps the runs' checkpoints: `train.storage_path` (local or a cloud URI, passed
    through as it is) or ``<run_dir>/train``."""
    if cfg.train.storage_path:
        path = cfg.train.storage_path
        return path if "://" in path else str(Path(path).expanduser().resolve())
    return str(layout.train_dir(cfg.run_dir))


def stage_dataset(cfg: ExperimentConfig, stage: str):
    """The Ray dataset a stage trains on (rows with unusable images already set aside)."""
    checked = datasets.preference_dataset(cfg) if stage == "dpo" else datasets.sft_dataset(cfg)
    log.info(checked.summary())
    return checked.dataset


def run_training(cfg: ExperimentConfig, stage: str = "dpo", base_model: str | None = None, resume: bool = True,
                 dataset=None, step_hook: Callable[[int, int], None] | None = None,
                 callbacks: list | None = None, probe: dict[str, Any] | None = None) -> TrainResult:
    """Train one stage ("dpo" or "sft") on Ray Train and return where its final weights are.

    `dataset`: a Ray dataset of PREFERENCE_COLUMNS (dpo) or SFT_COLUMNS (sft) rows to use instead of
    the config's data. `step_hook(step, rank)` is called on every worker after each optimizer step
    (tests use it to inject a worker failure). `callbacks`: Ray Train callbacks for the run, e.g.
    `TuneReportCallback()` when a Tune trial drives the training (the workers report their metrics every
    `log_every_steps` and at each checkpoint). `probe`: a sweep's objective measured during training
    (`orchestrator.tune.probe_spec`: POPE rows, every, metric, template, batch_size; eval/probe.py).
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r}; expected one of {STAGES}")
    timings = {"started": time.time()}
    if not ray.is_initialized():
        init_ray(cfg)
    fill = reference_fill(cfg.train, stage)
    uses_reference_pass = fill == "pass"
    preflight(cfg, training_request(cfg, stage), *([reference_request(cfg)] if uses_reference_pass else []))
    plan = stage_plan(cfg.train, stage)
    if dataset is None:
        dataset = stage_dataset(cfg, stage)
    base = base_model_path(cfg, base_model)
    name, storage = layout.train_run_name(cfg.name, stage), storage_path(cfg)
    run_path = _join(storage, name)
    if not resume:
        _forget_run(storage, name, layout.curves_path(cfg.run_dir, stage))
    resume_plan = checkpoints.plan_resume(run_path, cfg.train.keep_checkpoints)
    log.info("training %s: %s", stage, resume_plan.reason)

    reference_cache = None
    if uses_reference_pass:
        dataset = dataset.materialize()  # the pass and the trainer read the rows once (image checks included)
        timings["reference_pass_started"] = time.time()
        reference_cache = str(precompute_reference(cfg, base, dataset).path)
        timings["reference_pass_done"] = time.time()
    elif fill == "loop":  # the workers compute what the cache lacks during the first epoch, and add it
        cache, key_inputs = keyed_cache(cfg, base)
        write_cache_meta(cache, base, key_inputs, "loop")
        reference_cache = str(cache.path)
    scaling = cfg.scaling
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    trainer = _torch_trainer()(
        train_loop_per_worker,
        train_loop_config={"experiment": cfg.model_dump(mode="json"), "stage": stage, "base_model": str(base),
                           "step_hook": step_hook, "reference_cache": reference_cache,
                           "reference_fill": fill, "probe": probe,
                           "run_path": run_path, "resume_from": resume_plan.resume_from},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=callbacks,
        ),
        datasets={"train": dataset},
        # Every worker reads the whole (small, text-only) row list and takes its share by index, so the
        # order is reproducible and resumable (see schedule.py).
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    log.info("training %s from %s: run %s under %s", stage, base, name, storage)
    timings["fit_started"] = time.time()
    result = trainer.fit()
    timings["fit_done"] = time.time()
    checkpoints.prune(run_path, cfg.train.keep_checkpoints)
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} finished without a checkpoint")
    checkpoint_dir = _join(storage, name, Path(result.checkpoint.path).name)
    return TrainResult(
        checkpoint_path=checkpoints.stage_output_dir(checkpoint_dir, plan.lora),
        metrics=dict(result.metrics or {}),
        curves_path=str(layout.curves_path(cfg.run_dir, stage)),
        run_path=_join(storage, name),
        timings=timings,
    )


def _torch_trainer():
    """Ray Train's `TorchTrainer`, less two parts that work against a `hadpo` run:

    - its Ctrl-C handler (put in at `fit`: abort the run, then exit 0 or 1 with nothing said), under a `hadpo`
      command, where Ctrl-C stays the boundary's: Ray stops, the line says which checkpoint was kept and how to
      resume, and the exit code is 130;
    - its placement-group cleaner where Ray serves no state API: the local Ray `init_ray` starts (its
      placement groups go with the process anyway), or a Ray started without its dashboard that a command
      joins; the cleaner asks the state API, is refused, and logs a warning every second of the run.
    """
    from ray.train.torch import TorchTrainer

    class HadpoTorchTrainer(TorchTrainer):
        def _register_sigint_handler(self, controller) -> None:
            if not stop_signals_handled():
                super()._register_sigint_handler(controller)

        def _create_default_callbacks(self) -> list:
            callbacks = super()._create_default_callbacks()
            if not local_session() and state_api_served():
                return callbacks
            return [callback for callback in callbacks if type(callback).__name__ != "PlacementGroupCleanerCallback"]

    return HadpoTorchTrainer


def _join(root: str, *parts: str) -> str:
    if "://" in root:
        return "/".join([root.rstrip("/"), *parts])
    return str(Path(root, *parts))


def _forget_run(storage: str, name: str, curves: Path) -> None:
    """Delete a stage's previous Ray Train run (and its curves) so the next run starts from step 0."""
    if "://" in storage:
        import pyarrow.fs

        filesystem, path = pyarrow.fs.FileSystem.from_uri(_join(storage, name))
        if filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
            filesystem.delete_dir(path)
    else:
        shutil.rmtree(Path(storage) / name, ignore_errors=True)
    curves.unlink(missing_ok=True)
