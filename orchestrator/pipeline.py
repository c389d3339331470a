"""`hadpo run`: data check -> (warm-up, synthetic only) -> DPO (per seed) -> evaluations -> report.

The evaluations of the base model (``eval_baseline``) and of each DPO adapter (``eval_hadpo``,
``eval_hadpo_seed<N>``) run last and together: one actor pool answers them all, paying its imports, CUDA
context and kernel warm-up once (`eval.runner.run_evals`); each keeps its own stage record, run id and answers.

Each stage writes to paths derived from the config (`orchestrator.layout`) and records, in
``<run_dir>/stages/<stage>.json``,
a hash of its inputs (the config sections it reads, the data files' hashes, the upstream outputs) and
its outputs. A re-run skips every stage whose record matches and whose recorded outputs (the model,
adapter, answers and metrics it made) are still on disk, so a crashed or interrupted pipeline resumes
where it stopped (training itself resumes from its last checkpoint, evaluation from its answered items).
An evaluation stage also records the images of the items that failed; when one of them changes (an
image fixed), the stage runs again and recomputes its failed items (``retry_errors``). A run record
(``run_record.json``) says exactly what ran: the resolved config, package versions, git SHA, data and
POPE file hashes, decoding settings and hardware.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from orchestrator import console, layout
from orchestrator.config import ExperimentConfig, dump_config, source_name
from orchestrator.data import datasets
from orchestrator.data.formats import REJECTED_PATH, preference_table_files
from orchestrator.eval.pope import mean_f1, qualified_split
from orchestrator.files import file_sha256, write_json_atomic
from orchestrator.plan import reference_fill
from orchestrator.ray_session import init_ray
from orchestrator.resources import eval_request, preflight, reference_request, training_request
from orchestrator.versions import bytecode_warning, git_sha, package_versions, packages_compiled_in_every_process

log = logging.getLogger("hadpo.pipeline")

RECORDED_PACKAGES = ("torch", "ray", "transformers", "peft", "deepspeed", "pyarrow", "pandas", "wandb",
                     "pillow", "pydantic", "hadpo-orchestrator")


def data_file_hashes(config: ExperimentConfig) -> dict[str, str]:
    """sha256 of every annotation/question file the run reads (images are counted, not hashed)."""
    paths = datasets.resolve_data_paths(config)
    files = {"hadpo_desc": paths.hadpo_desc, "hadpo_pope": paths.hadpo_pope,
             "vg_image_data": paths.vg_image_data, "sft": paths.sft}
    files.update({f"pope_{qualified_split(dataset, split)}": path for dataset, pope in paths.pope.items()
                  for split, path in pope.questions.items()})
    files.update({f"milebench_{d.name}": str(d / f"{d.name}.json") for d in datasets.milebench_task_dirs(paths)})
    files.update(preference_source_files(config))
    return {name: file_sha256(path) for name, path in sorted(files.items()) if path and Path(path).is_file()}


def preference_source_files(config: ExperimentConfig) -> dict[str, str]:
    """The annotation files of the `data.preference` sources, as ``preference/<source>/<n>-<file name>``."""
    files = {}
    for index, source in enumerate(config.data.preference):
        name = source_name(source, index)
        if source.format == "hadpo":
            found = [Path(source.path, f) for f in ("desc_data.json", "pope_data.json")]
            found.append(Path(source.image_root, "image_data.json"))
        else:
            found = preference_table_files(source.path)
        files.update({f"preference/{name}/{index}-{path.name}": str(path) for index, path in enumerate(found)})
    return files


def hardware() -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["compiled_in_every_process"] = packages_compiled_in_every_process()  # slow worker start-up if any
    return info


def write_run_record(config: ExperimentConfig, extra: dict[str, Any] | None = None) -> Path:
    """The run record: everything needed to say what ran and to reproduce it."""
    record = {
        "name": config.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config.model_dump(mode="json"),
        "config_hash": config.content_hash(),
        "packages": package_versions(RECORDED_PACKAGES),
        "git_sha": git_sha(),
        "data_files": data_file_hashes(config),
        "decoding": {"mode": config.eval.mode, "max_new_tokens": config.eval.max_new_tokens,
                     "batch_size": config.eval.batch_size, "answer_suffix": config.eval.answer_suffix,
                     "template": config.model.eval_template, "greedy": True},
        "hardware": hardware(),
    }
    record.update(extra or {})
    path = write_json_atomic(layout.run_record_path(config.run_dir), record, sort_keys=False)
    dump_config(config, layout.config_path(config.run_dir))
    return path


def inputs_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Stage:
    """A pipeline stage: its name, the hash of its inputs, and the function that produces its outputs.

    `products`: keys of the outputs that name files or folders the stage made; if one is gone the stage
    is not done. An output ``watched_files`` ({path: sha256 or "missing"}) names files whose change
    makes the stage run again.
    """

    name: str
    inputs: str
    run: Callable[[bool], dict[str, Any]] | None  # run(resume): resume=False starts over (inputs changed);
                                                   # None for a stage run with others (`run_stages_together`)
    products: tuple[str, ...] = ()


WATCHED = "watched_files"


def file_state(path: str | Path) -> str:
    """What `watched_files` records of a file: its sha256, or "missing"."""
    return file_sha256(path) if Path(path).is_file() else "missing"


def stale_because(stage: Stage, outputs: dict[str, Any]) -> str:
    """Why a stage recorded as done on the same inputs must run again ('' when it need not)."""
    for key in stage.products:
        value = outputs.get(key)
        if value and "://" not in str(value) and not Path(value).exists():
            return f"its output {key} ({value}) is gone"
    for path, state in (outputs.get(WATCHED) or {}).items():
        if file_state(path) != state:
            return f"{path} changed since it failed"
    return ""


@dataclass
class PipelineResult:
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    run_record: Path | None = None


def run_stage(config: ExperimentConfig, stage: Stage, result: PipelineResult) -> dict[str, Any]:
    """Run a stage unless its record shows it already ran on the same inputs."""
    recorded = _up_to_date(config, stage, result)
    if recorded is not None:
        return recorded
    resume, started = _begin(config, stage)
    return _record(config, stage, stage.run(resume), started, result)


def run_stages_together(config: ExperimentConfig, stages: list[Stage], result: PipelineResult,
                        run: Callable[[list[Stage]], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Stages whose work is done in one go (the evaluations: one actor pool answers them all): each is skipped
    or run as `run_stage` would, and recorded on its own; `run(stages)` does the work of those that run and
    returns their outputs in order. Returns every stage's outputs, in order."""
    outputs: dict[str, dict[str, Any]] = {}
    todo = []
    for stage in stages:
        recorded = _up_to_date(config, stage, result)
        if recorded is None:
            todo.append(stage)
        else:
            outputs[stage.name] = recorded
    if todo:
        together = {stage.name: [s.name for s in todo if s is not stage] for stage in todo}
        for stage in todo:
            _begin(config, stage, together=together[stage.name])
        started = time.time()   # one start for all: their records say they ran in one pass
        for stage, made in zip(todo, run(todo)):
            outputs[stage.name] = _record(config, stage, made, started, result, together=together[stage.name])
    return [outputs[stage.name] for stage in stages]


def _up_to_date(config: ExperimentConfig, stage: Stage, result: PipelineResult) -> dict[str, Any] | None:
    """The stage's recorded outputs when it already ran on the same inputs and they are all there, else None."""
    record_path = layout.stage_record_path(config.run_dir, stage.name)
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except json.JSONDecodeError as error:  # a damaged record: the stage is simply not done
            log.warning("stage %s: record %s is not valid JSON (%s); running the stage", stage.name, record_path, error)
            record = {}
        if record.get("inputs") == stage.inputs:
            reason = stale_because(stage, record.get("outputs") or {})
            if not reason:
                log.info("stage %s: up to date (inputs %s), skipped", stage.name, stage.inputs, extra=console.LINE)
                result.skipped.append(stage.name)
                result.outputs[stage.name] = record["outputs"]
                return record["outputs"]
            log.info("stage %s: recorded as done, but %s: running it again", stage.name, reason, extra=console.LINE)
    return None


def _begin(config: ExperimentConfig, stage: Stage, together: list[str] | None = None) -> tuple[bool, float]:
    """Mark the stage started; (whether it resumes, when it started)."""
    # A stage that started on these same inputs and was interrupted resumes; one whose inputs changed
    # since (a new beta, say) starts over instead of continuing the old run's checkpoints.
    record_path = layout.stage_record_path(config.run_dir, stage.name)
    started_path = record_path.with_suffix(".started")
    resume = started_path.is_file() and started_path.read_text().strip() == stage.inputs
    record_path.parent.mkdir(parents=True, exist_ok=True)
    started_path.write_text(stage.inputs)
    log.info("stage %s: %s%s", stage.name, "resuming" if resume else "running",
             f" (with {', '.join(together)}: one pass)" if together else "", extra=console.STAGE)
    return resume, time.time()


def _record(config: ExperimentConfig, stage: Stage, outputs: dict[str, Any], started: float, result: PipelineResult,
            together: list[str] | None = None) -> dict[str, Any]:
    """Write the stage's record (what makes it up to date next time) and say it is done."""
    record_path = layout.stage_record_path(config.run_dir, stage.name)
    record = {"inputs": stage.inputs, "outputs": outputs, "started": started, "seconds": round(time.time() - started, 1)}
    if together:
        record["together_with"] = together
    write_json_atomic(record_path, record, sort_keys=False)
    summary = stage_summary(outputs)
    log.info("stage %s: done in %.0f s%s", stage.name, time.time() - started, f" ({summary})" if summary else "",
             extra=console.LINE)
    result.ran.append(stage.name)
    result.outputs[stage.name] = outputs
    return outputs


def stage_summary(outputs: dict[str, Any]) -> str:
    """What a stage's end line says of its outputs: the data check's counts, an evaluation's POPE mean F1 and
    errors, a training stage's last loss and reward accuracy."""
    parts = []
    for name, counts in outputs.items():
        if isinstance(counts, dict) and {"total", "usable", "rejected"} <= counts.keys():
            parts.append(f"{name} {counts['usable']:,} of {counts['total']:,} usable, {counts['rejected']:,} rejected")
    parts += [f"{dataset} POPE mean F1 {100 * f1:.2f}" for dataset, f1 in (outputs.get("pope_mean_f1") or {}).items()
              if f1 is not None]
    errors = (outputs.get("counts") or {}).get("errors")
    if errors:
        parts.append(f"{errors:,} errors")
    metrics = outputs.get("metrics") or {}
    if metrics.get("loss") is not None:
        parts.append(f"loss {metrics['loss']:.4f}")
    if metrics.get("rewards/accuracies") is not None:
        parts.append(f"reward accuracy {metrics['rewards/accuracies']:.2f}")
    return ", ".join(parts)


# Keys of the train section that only the DPO stage reads: changing them must not redo the warm-up.
DPO_ONLY_TRAIN_KEYS = ("loss", "label_smoothing", "beta", "sft_gamma", "learning_rate", "epochs", "max_steps",
                       "lora", "checkpoint_every_steps", "keep_checkpoints", "log_every_steps")


def warmup_train_settings(config: ExperimentConfig) -> dict[str, Any]:
    """The train settings the warm-up stage depends on (its input hash)."""
    settings = {k: v for k, v in config.train.model_dump(mode="json").items() if k not in DPO_ONLY_TRAIN_KEYS}
    if config.train.sft.batch_size_per_worker:
        settings.pop("batch_size_per_worker")
    return settings


def failed_images(answers) -> dict[str, str]:
    """`watched_files` of an evaluation: the state of each image of an item that failed to load or answer.

    Paths the readers refused (outside their root) are never looked at.
    """
    watched: dict[str, str] = {}
    failed = answers[answers["error"].fillna("") != ""]
    for images, error in zip(failed["images"], failed["error"]):
        if REJECTED_PATH in str(error):
            continue
        for image in list(images if images is not None else []):
            if image and "://" not in image and Path(image).is_absolute():
                watched[image] = file_state(image)
    return watched


def evaluation_outputs(evaluated) -> dict[str, Any]:
    """An evaluation stage's record: where its answers and metrics are, its POPE rows (one per dataset and
    split, with the question file's version, and a mean per dataset), each dataset's mean F1, its counts."""
    table = evaluated.pope_table
    records = table.to_dict("records") if table is not None else []
    return {"run_id": evaluated.run_id, "answers_dir": str(evaluated.answers_dir),
            "metrics_path": str(evaluated.metrics_path), "pope": records,
            # only datasets that kept their mean row: one short of answers has no mean F1 (`completeness`)
            "pope_mean_f1": {dataset: mean_f1(table, dataset) for dataset in
                             dict.fromkeys(table.loc[table["split"] == "mean", "dataset"])}
            if table is not None else {}, "counts": evaluated.counts,
            WATCHED: failed_images(evaluated.answers())}


EVAL_PRODUCTS = ("answers_dir", "metrics_path")


def run_pipeline(config: ExperimentConfig, dpo_seeds: list[int] | None = None,
                 benchmarks: tuple[str, ...] = ("pope", "milebench")) -> PipelineResult:
    """The whole experiment. `dpo_seeds` trains one adapter per seed (the demo shows their spread)."""
    # Ray and the stages' model code (torch, transformers) load when a pipeline runs, not when its records
    # are read (`evaluation_outputs`, the report's tests)
    import ray

    from orchestrator.eval.runner import EvalRequest, run_evals
    from orchestrator.train.trainer import run_training

    if not ray.is_initialized():
        init_ray(config)
    if warning := bytecode_warning():
        log.warning(warning)
    # every stage's workers and actors, checked before the first stage runs (fails in seconds)
    preflight(config, training_request(config), eval_request(config),
              *([reference_request(config)] if reference_fill(config.train) == "pass" else []))
    result = PipelineResult()
    dump = config.model_dump(mode="json")
    datasets.resolve_data_paths(config)  # generates the synthetic world on first use, so it can be hashed
    files = data_file_hashes(config)

    def check_data(resume: bool) -> dict[str, Any]:
        out = {}
        for name, build in [("preference", datasets.preference_dataset), ("pope", datasets.pope_dataset)]:
            checked = build(config)
            out[name] = {"total": checked.total, "usable": checked.accepted, "rejected": len(checked.rejects),
                         "rejects_path": checked.rejects_path}
        return out

    run_stage(config, Stage(layout.DATA, inputs_hash(dump["data"], files), check_data), result)

    base_model = config.model.path
    if config.data.uses_synthetic_world and not config.model.path:
        def warm_up(resume: bool) -> dict[str, Any]:
            trained = run_training(config, stage=layout.SFT, resume=resume)
            return {"model": trained.checkpoint_path, "curves": trained.curves_path, "metrics": trained.metrics}

        warm = run_stage(config, Stage(layout.WARMUP, inputs_hash(dump["model"], warmup_train_settings(config),
                                                                  dump["data"], files), warm_up, products=("model",)),
                         result)
        base_model = warm["model"]

    eval_inputs = (dump["eval"], dump["model"]["eval_template"], files, benchmarks)
    # The evaluations come after the training, all in one pass: one actor pool imports, warms up and answers the
    # base model's questions and each adapter's (`run_evals`). Each resumes by its own run id; when a stage runs,
    # items that failed before are tried again.
    evaluations = [(Stage(layout.EVAL_BASELINE, inputs_hash(base_model, *eval_inputs), None, products=EVAL_PRODUCTS),
                    EvalRequest(config, model_path=base_model, tag="baseline"))]

    for seed in dpo_seeds or [config.train.seed]:
        seeded = config if seed == config.train.seed and not dpo_seeds else \
            config.model_copy(update={"name": layout.seeded_run_name(config.name, seed),
                                      "train": config.train.model_copy(update={"seed": seed})})
        stage_seed = None if seeded is config else seed

        def dpo(resume: bool, seeded=seeded) -> dict[str, Any]:
            trained = run_training(seeded, stage=layout.DPO, base_model=base_model, resume=resume)
            return {"adapter": trained.checkpoint_path, "curves": trained.curves_path, "metrics": trained.metrics,
                    "timings": trained.timings}

        # the sources' weights and names decide the rows too (their files are in `files`)
        sources = [dump["data"]["preference"]] if config.data.preference else []
        trained = run_stage(config, Stage(layout.seeded_stage(layout.DPO, stage_seed),
                                          inputs_hash(base_model, seeded.model_dump(mode="json")["train"], files,
                                                      *sources), dpo, products=("adapter",)), result)
        evaluations.append((Stage(layout.seeded_stage(layout.EVAL_HADPO, stage_seed),
                                  inputs_hash(base_model, trained["adapter"], *eval_inputs), None, products=EVAL_PRODUCTS),
                            EvalRequest(seeded, model_path=base_model, adapter=trained["adapter"], tag="hadpo")))

    requests = {stage.name: request for stage, request in evaluations}

    def evaluate(stages: list[Stage]) -> list[dict[str, Any]]:
        return [evaluation_outputs(evaluated) for evaluated in
                run_evals([requests[stage.name] for stage in stages], benchmarks, retry_errors=True)]

    run_stages_together(config, [stage for stage, _ in evaluations], result, evaluate)

    result.run_record = write_run_record(config, {"base_model": base_model, "stages": result.outputs})
    return result
