"""The run layout: what a run's stages are called and where every file of a run lies.

The one module that names our own folders, files and stages. Whoever writes a file (the pipeline, the
training driver and recipe, the evaluation, a sweep) and whoever reads it back (the report, the export,
the resume logic, the error boundary) call the same function here, so no name is rebuilt from an
f-string in one place and parsed with a regex in another. Standard library only: every layer may use it.

A run folder, ``<output_root>/<name>`` (`ExperimentConfig.run_dir`)::

    run_record.json, config.yaml       what ran (`orchestrator.pipeline`)
    logs/hadpo.log                     all that the commands on this run logged (`orchestrator.console`)
    stages/<stage>.json                each pipeline stage's inputs hash and outputs (+ <stage>.started)
    data/rejects-<dataset>.parquet     rows the readers set aside (missing images, escaping paths)
    model/tiny/                        the tiny LLaVA built for the run when the config names no model
    train/<name>-<stage>/              Ray Train's run folder with its checkpoints (or train.storage_path)
    train/<stage>_curves.parquet       rank 0's training curves; train/<stage>_timings.json its start-up
    eval/<run_id>/                     run.json, answers/*.parquet, metrics.parquet, timings/
    tensorboard/<stage>/, mlruns/, wandb/   the trackers' files
    tune/                              trials.parquet, best_config.yaml, probe_questions.parquet, <name>-tune/
    report/                            `hadpo demo`'s report

Stages of `hadpo run`: ``data``, ``warmup``, ``eval_baseline``, ``dpo``, ``eval_hadpo``. With several DPO
seeds (``hadpo run --seeds 1 2 3``) each seed has its own ``dpo_seed<N>`` and ``eval_hadpo_seed<N>``
stage and trains under the run name ``<name>-seed<N>``, so its files lie in the sibling folder
``<run_dir>-seed<N>``. Shared by every run under one output root: ``<output_root>/cache/reference_logps``
(`orchestrator.train.reference_cache`) and ``<output_root>/world`` (the synthetic world).
"""

from __future__ import annotations

from pathlib import Path

# ----------------------------------------------------------------------------------------------
# Stages and seeds

DATA = "data"
WARMUP = "warmup"
EVAL_BASELINE = "eval_baseline"
DPO = "dpo"
EVAL_HADPO = "eval_hadpo"
SEED_SUFFIX = "_seed"          # a seeded stage: dpo_seed2
SEEDED_RUN = "-seed"           # a seeded run: <name>-seed2

# Training stages (`hadpo train --stage`, Ray Train's run names, the curves files): the warm-up stage
# trains "sft", every DPO stage "dpo".
SFT = "sft"


def seeded_stage(stage: str, seed: int | None) -> str:
    """The pipeline stage `stage` of DPO seed `seed` ("dpo_seed2"); `stage` itself when `seed` is None."""
    return stage if seed is None else f"{stage}{SEED_SUFFIX}{seed}"


def parse_stage(name: str) -> tuple[str, int | None]:
    """A recorded stage name split into (stage, seed): "eval_hadpo_seed-1" -> ("eval_hadpo", -1),
    "warmup" -> ("warmup", None). The inverse of `seeded_stage`."""
    stage, suffix, seed = name.rpartition(SEED_SUFFIX)
    if suffix and stage and seed.removeprefix("-").isdigit():
        return stage, int(seed)
    return name, None


def training_stage_of(stage: str) -> str | None:
    """The training stage a recorded pipeline stage ran: "warmup" -> "sft", "dpo_seed2" -> "dpo"; None for
    a stage that trains nothing."""
    if stage == WARMUP:
        return SFT
    return DPO if parse_stage(stage)[0] == DPO else None


def evaluation_of(training_stage: str) -> str:
    """The evaluation stage of a DPO stage's adapter: "dpo_seed2" -> "eval_hadpo_seed2"."""
    return seeded_stage(EVAL_HADPO, parse_stage(training_stage)[1])


def seeded_run_name(name: str, seed: int) -> str:
    """The experiment name one DPO seed of `name` trains and evaluates under."""
    return f"{name}{SEEDED_RUN}{seed}"


def seeded_run_dir(run_dir: Path, seed: int) -> Path:
    """Where a seeded stage of the run in `run_dir` wrote its files (a sibling folder)."""
    return Path(run_dir).parent / seeded_run_name(Path(run_dir).name, seed)


def train_run_name(name: str, stage: str) -> str:
    """Ray Train's run name of a training stage ("sft" or "dpo") of experiment `name`."""
    return f"{name}-{stage}"


def tune_run_name(name: str) -> str:
    """Ray Tune's experiment name of a sweep of experiment `name`."""
    return f"{name}-tune"


def trial_run_name(name: str, tag: str) -> str:
    """The experiment name of a sweep trial of `name` whose values are `tag` ("beta=0.5_rank=8"), usable as a
    folder name: "<name>-beta0.5_rank8"."""
    return f"{name}-{tag}".replace("/", "-").replace("=", "")


def best_run_name(name: str) -> str:
    """The experiment name of the config a sweep of `name` leaves behind (its best trial's values)."""
    return f"{name}-best"


# ----------------------------------------------------------------------------------------------
# Paths in a run folder

RUN_RECORD = "run_record.json"


def run_record_path(run_dir: Path) -> Path:
    return Path(run_dir) / RUN_RECORD


def config_path(run_dir: Path) -> Path:
    return Path(run_dir) / "config.yaml"


def log_path(run_dir: Path) -> Path:
    """The log file of the commands run on this run folder (`orchestrator.console`): everything they log."""
    return Path(run_dir) / "logs" / "hadpo.log"


def stages_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "stages"


def stage_record_path(run_dir: Path, stage: str) -> Path:
    return stages_dir(run_dir) / f"{stage}.json"


def stage_records(run_dir: Path) -> dict[str, Path]:
    """Every stage a run recorded: stage name -> its record (`stage_record_path`), by file name."""
    return {path.stem: path for path in sorted(stages_dir(run_dir).glob("*.json"), key=lambda path: path.name)}


def rejects_path(run_dir: Path, dataset: str) -> Path:
    return Path(run_dir) / "data" / f"rejects-{dataset}.parquet"


def tiny_model_dir(run_dir: Path, family: str = "llava") -> Path:
    """The run's tiny model: ``model/tiny`` (LLaVA-1.5), ``model/tiny-<family>`` for the other families."""
    return Path(run_dir) / "model" / ("tiny" if family == "llava" else f"tiny-{family}")


def train_dir(run_dir: Path) -> Path:
    """Training's files: Ray Train's run folders (by default), the curves and timings."""
    return Path(run_dir) / "train"


CURVES_SUFFIX = "_curves.parquet"


def curves_path(run_dir: Path, stage: str) -> Path:
    return train_dir(run_dir) / f"{stage}{CURVES_SUFFIX}"


def curves_files(run_dir: Path) -> dict[str, Path]:
    """Every curves parquet under the run's train folder: training stage -> its file (`curves_path`)."""
    return {path.name[: -len(CURVES_SUFFIX)]: path for path in sorted(train_dir(run_dir).glob(f"*{CURVES_SUFFIX}"))}


def timings_path(run_dir: Path, stage: str) -> Path:
    return train_dir(run_dir) / f"{stage}_timings.json"


def eval_root(run_dir: Path) -> Path:
    return Path(run_dir) / "eval"


def eval_dir(run_dir: Path, run_id: str) -> Path:
    return eval_root(run_dir) / run_id


EVAL_INFO = "run.json"   # beside an evaluation's metrics.parquet and answers/


def eval_info_path(run_dir: Path, run_id: str) -> Path:
    """An evaluation's run.json (what it evaluates: model, adapter, decoding, versions, expected counts)."""
    return eval_dir(run_dir, run_id) / EVAL_INFO


def eval_dirs(run_dir: Path) -> list[Path]:
    """Every evaluation folder of a run (``eval/<run_id>/``), by name."""
    return sorted(path for path in eval_root(run_dir).glob("*") if path.is_dir())


def answers_dir(run_dir: Path, run_id: str) -> Path:
    return eval_dir(run_dir, run_id) / "answers"


def metrics_path(run_dir: Path, run_id: str) -> Path:
    return eval_dir(run_dir, run_id) / "metrics.parquet"


def eval_timings_dir(run_dir: Path, run_id: str) -> Path:
    return eval_dir(run_dir, run_id) / "timings"


def tensorboard_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "tensorboard"


def mlflow_store(run_dir: Path) -> Path:
    """The MLflow file store when the config names none (`mlflow.store`)."""
    return Path(run_dir) / "mlruns"


def wandb_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "wandb"


def tune_dir(run_dir: Path) -> Path:
    """A sweep's files, and Ray Tune's storage (its trial folders under `tune_run_name`)."""
    return Path(run_dir) / "tune"


def trials_path(run_dir: Path) -> Path:
    return tune_dir(run_dir) / "trials.parquet"


def best_config_path(run_dir: Path) -> Path:
    return tune_dir(run_dir) / "best_config.yaml"


def probe_questions_path(run_dir: Path) -> Path:
    return tune_dir(run_dir) / "probe_questions.parquet"


def report_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "report"


# ----------------------------------------------------------------------------------------------
# Shared by every run under one output root


def world_dir(output_root: Path) -> Path:
    """The synthetic world when the config names no folder for it (`data.synthetic_dir`)."""
    return Path(output_root) / "world"


def reference_cache_root(output_root: Path) -> Path:
    return Path(output_root) / "cache" / "reference_logps"


def embedded_images_dir(output_root: Path) -> Path:
    """Images that preference sources embed as bytes, written once."""
    return Path(output_root) / "cache" / "images"
