"""What a run folder holds, read back for the report: `load_run` -> `RunData`.

For each run directory (nothing is recomputed that a stage already wrote; every path comes from
`orchestrator.layout`, the module the writers use):

- ``stages/<stage>.json`` (`orchestrator.pipeline`): which evaluation is the baseline
  (``eval_baseline``) and which are after HA-DPO (``eval_hadpo``, ``eval_hadpo_seed<N>``), where their
  ``metrics.parquet`` and answers are, where each training stage's curves are, and how long each stage
  took. Without stage records (an evaluation run by ``hadpo eval``), every ``<run_dir>/eval/*/`` is used:
  one without a LoRA adapter (``run.json``) is "before", one with an adapter is "after".
- ``eval/<run_id>/metrics.parquet`` (one row per metric): the numbers in every table. When only the
  answers are there, they are scored here with the same functions `run_eval` uses. Each evaluation's
  answered / expected counts (the expected ones are in its ``run.json``) are kept; an evaluation short of
  answers (stopped half-way) is noted INCOMPLETE, and its means over splits are left out unless
  ``allow_partial``.
- ``train/<stage>_curves.parquet``: loss, reward margins and reward accuracy against the step.
- ``tune/trials.parquet``: one row per trial (``param/<key>`` columns and the objective).
- ``run_record.json``: config, package versions, git SHA, decoding, data-file hashes, hardware.

A run directory that was moved is still found (recorded absolute paths are re-rooted under it, and seeded
runs are looked for in sibling folders ``<run_dir>-seed<N>``, `layout.seeded_run_dir`), but a run whose
files were split across machines is not. Evaluations found without stage records that have an adapter
are all treated as replicates of one "after" (a note lists them).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd
import pyarrow.parquet as pq

from orchestrator import layout
from orchestrator.errors import CorruptFileError
from orchestrator.eval import completeness
from orchestrator.eval import milebench as mb
from orchestrator.eval import pope
from orchestrator.eval.results import milebench_metric_rows, pope_metric_rows, read_answers, read_metrics

@dataclass
class Evaluation:
    """One evaluation of a run: the baseline, or an after-HA-DPO evaluation (one per DPO seed)."""

    stage: str                 # "eval_baseline", "eval_hadpo_seed1", or "eval/<run_id>" without stage records
    role: str                  # "before" | "after"
    seed: int | None
    run_id: str
    metrics_path: Path | None  # None when the metrics were scored here from the answers
    answers_dir: Path | None
    info: dict                 # the evaluation's run.json (model, adapter, decoding, versions)
    metrics: pd.DataFrame      # METRIC_SCHEMA rows
    coverage: pd.DataFrame | None = None  # answered / expected per split (`completeness`); None: unknown

    @property
    def complete(self) -> bool | None:
        return None if self.coverage is None else completeness.incomplete(self.coverage).empty


@dataclass
class Curve:
    stage: str                 # "warmup", "dpo", "dpo_seed1", or the file's stem
    kind: str                  # "sft" | "dpo"
    seed: int | None
    path: Path
    frame: pd.DataFrame


@dataclass
class RunData:
    label: str
    run_dir: Path
    record: dict                         # run_record.json ({} when absent)
    stages: dict[str, dict]              # stage name -> {"inputs", "outputs", "seconds"}
    evaluations: list[Evaluation]
    curves: list[Curve]
    trials: pd.DataFrame | None
    notes: list[str] = field(default_factory=list)

    @property
    def config(self) -> dict:
        return self.record.get("config") or {}

    @property
    def model_name(self) -> str:
        path = (self.config.get("model") or {}).get("path")
        if path:
            return Path(path).name
        if self.config:
            return "tiny LLaVA (built-in)"
        models = [e.info.get("model") for e in self.evaluations if e.info.get("model")]
        return Path(models[0]).name if models else self.label


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptFileError(path, f"not valid JSON ({error})") from None


def _locate(recorded: str | None, candidates: Iterable[Path]) -> Path | None:
    """The recorded path if it exists, else the first candidate that does (a moved run directory)."""
    for path in ([Path(recorded)] if recorded else []) + list(candidates):
        if path.exists():
            return path
    return None


def _seeded_dirs(run_dir: Path, seed: int | None) -> list[Path]:
    """Where a seeded stage wrote: its own run folder (`layout.seeded_run_dir`, a sibling), then this one."""
    return [run_dir] if seed is None else [layout.seeded_run_dir(run_dir, seed), run_dir]


def _score_answers(answers: pd.DataFrame, run_id: str) -> pd.DataFrame:
    """Metric rows (METRIC_SCHEMA) from answers, with the same functions `run_eval` uses."""
    rows: list[dict] = []
    pope_answers = answers[answers["benchmark"] == "pope"]
    if len(pope_answers):
        rows += pope_metric_rows(run_id, pope.summarise(pope_answers))
    mile_answers = answers[answers["benchmark"] == "milebench"]
    if len(mile_answers):
        rows += milebench_metric_rows(run_id, mb.summarise(mb.score_answers(mile_answers)))
    return pd.DataFrame(rows, columns=["run_id", "benchmark", "scope", "name", "metric", "value", "n"])


def _load_evaluation(stage: str, role: str, seed: int | None, outputs: dict, run_dir: Path,
                     notes: list[str], allow_partial: bool = False) -> Evaluation | None:
    run_id = str(outputs.get("run_id", ""))
    roots = _seeded_dirs(run_dir, seed)
    metrics_file = _locate(outputs.get("metrics_path"), [layout.metrics_path(root, run_id) for root in roots])
    answers = _locate(outputs.get("answers_dir"), [layout.answers_dir(root, run_id) for root in roots])
    eval_folder = (metrics_file.parent if metrics_file else answers.parent if answers else None)
    info = _read_json(eval_folder / layout.EVAL_INFO) if eval_folder else {}
    if metrics_file is not None:
        metrics = read_metrics(metrics_file)
    elif answers is not None:
        metrics = _score_answers(read_answers(answers), run_id)
        notes.append(f"{stage}: no metrics.parquet; scored from the answers in {answers}")
    else:
        notes.append(f"{stage}: neither {outputs.get('metrics_path')} nor the answers were found; left out")
        return None
    coverage = completeness.from_metric_rows(metrics)
    if coverage.empty and info.get("expected") and answers is not None:
        coverage = completeness.coverage(read_answers(answers), info["expected"])
    if not completeness.incomplete(coverage).empty:
        notes.append(f"{stage}: INCOMPLETE, {completeness.describe(coverage)}; "
                     + ("its means over splits are shown anyway (allow_partial)" if allow_partial
                        else "its means over splits are left out (hadpo report --allow-partial shows them)"))
        if not allow_partial:
            metrics = completeness.drop_means(metrics, coverage)
    return Evaluation(stage, role, seed, run_id or str(info.get("run_id", "")), metrics_file, answers, info, metrics,
                      coverage if not coverage.empty else None)


def _read_curve(path: Path) -> pd.DataFrame:
    frame = pq.read_table(path).to_pandas()
    if "step" in frame.columns:
        frame = frame.sort_values("step", kind="stable").drop_duplicates("step", keep="last").reset_index(drop=True)
    return frame


def load_run(run_dir: str | Path, label: str | None = None, allow_partial: bool = False) -> RunData:
    """Everything the report shows about one run directory (see the module docstring for the layout).

    `allow_partial`: keep the means over splits of evaluations that are short of answers.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory not found")
    notes: list[str] = []
    record = _read_json(layout.run_record_path(run_dir))
    stages: dict[str, dict] = {}
    for name, path in sorted(layout.stage_records(run_dir).items(), key=lambda item: (item[1].stat().st_mtime,
                                                                                      item[1].name)):
        stages[name] = _read_json(path)
    if not stages and isinstance(record.get("stages"), dict):
        stages = {name: {"outputs": outputs} for name, outputs in record["stages"].items()}

    # evaluations
    evaluations: list[Evaluation] = []
    for name in sorted(stages, key=lambda s: (s != layout.EVAL_BASELINE, _seed_sort(s))):
        stage, seed = layout.parse_stage(name)
        if stage not in (layout.EVAL_BASELINE, layout.EVAL_HADPO):
            continue
        role = "before" if stage == layout.EVAL_BASELINE else "after"
        found = _load_evaluation(name, role, seed, stages[name].get("outputs") or {}, run_dir, notes, allow_partial)
        if found:
            evaluations.append(found)
    if not evaluations:
        for folder in sorted(layout.eval_dirs(run_dir), key=lambda p: p.stat().st_mtime):
            info = _read_json(layout.eval_info_path(run_dir, folder.name))
            role = "after" if info.get("adapter") else "before"
            found = _load_evaluation(f"eval/{folder.name}", role, None, {"run_id": folder.name}, run_dir, notes,
                                     allow_partial)
            if found:
                evaluations.append(found)
        if sum(e.role == "after" for e in evaluations) > 1:
            notes.append("no stage records: the evaluations with an adapter ("
                         + ", ".join(e.run_id for e in evaluations if e.role == "after")
                         + ") are shown as replicates of one 'after'")

    # training curves: the stage records' paths first, then any curves file under train/
    curves: list[Curve] = []
    seen: set[Path] = set()
    for name in sorted(stages, key=_seed_sort):
        outputs = stages[name].get("outputs") or {}
        kind = layout.training_stage_of(name)
        if kind is None:
            continue
        seed = layout.parse_stage(name)[1] if kind == layout.DPO else None
        path = _locate(outputs.get("curves"), [layout.curves_path(root, kind) for root in _seeded_dirs(run_dir, seed)])
        if path is None:
            notes.append(f"{name}: curves file {outputs.get('curves')} not found")
            continue
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        curves.append(Curve(name, kind, seed, path, _read_curve(path)))
    for training_stage, path in layout.curves_files(run_dir).items():
        if path.resolve() in seen:
            continue
        sft = training_stage == layout.SFT
        curves.append(Curve(layout.WARMUP if sft else training_stage, layout.SFT if sft else layout.DPO, None, path,
                            _read_curve(path)))

    trials_path = layout.trials_path(run_dir)
    trials = pd.read_parquet(trials_path) if trials_path.is_file() else None
    if not evaluations:
        notes.append(f"no evaluation results under {run_dir} (stages/eval_*.json or eval/*/metrics.parquet)")
    return RunData(label or run_dir.name, run_dir, record, stages, evaluations, curves, trials, notes)


def _seed_sort(name: str) -> tuple:
    """Stages by name, each stage's seeds in order after its unseeded form."""
    stage, seed = layout.parse_stage(name)
    return (stage, -math.inf if seed is None else seed)

