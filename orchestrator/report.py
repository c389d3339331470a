"""`build_report`: one HTML page (self-contained) and one Markdown file from the files a run left behind.

What it reads, for each run directory (nothing is recomputed that a stage already wrote):

- ``stages/<stage>.json`` (`orchestrator.pipeline`): which evaluation is the baseline
  (``eval_baseline``) and which are after HA-DPO (``eval_hadpo``, ``eval_hadpo_seed<N>``), where their
  ``metrics.parquet`` and answers are, where each training stage's curves are, and how long each stage
  took. Without stage records (an evaluation run by ``hadpo eval``), every ``<run_dir>/eval/*/`` is used:
  one without a LoRA adapter (``run.json``) is "before", one with an adapter is "after".
- ``eval/<run_id>/metrics.parquet`` (one row per metric): the numbers in every table. When only the
  answers are there, they are scored here with the same functions `run_eval` uses. Where a model (+ adapter)
  was evaluated in both score and generate mode, the answers of both give the share of POPE questions
  whose yes/no differs (`score_generate_disagreement`). Each evaluation's answered / expected counts
  (the expected ones are in its ``run.json``) are shown; an evaluation short of answers (stopped
  half-way) is marked INCOMPLETE in the table and the notes, and its means over splits are left out
  unless ``allow_partial`` (``hadpo report --allow-partial``).
- ``train/<stage>_curves.parquet``: loss, reward margins and reward accuracy against the step.
- ``tune/trials.parquet``: one row per trial (``param/<key>`` columns and the objective); the sweep gets a
  scatter per hyper-parameter and a parallel-coordinates plot.
- the trackers' folders (``tensorboard/``, ``mlruns/``, ``wandb/``, ``tune/``'s event files): the report says
  which command opens each.
- ``run_record.json``: config, package versions, git SHA, decoding, data-file hashes, hardware.

What it writes, under `out_dir`: ``report.html`` (PNGs embedded as base64 data URIs, so the one file can
be mailed or attached), ``report.md`` (the same tables, PNG links) and the PNGs. All POPE values are
percent with two decimals, deltas in percentage points; they are the parquet's values times 100, rounded,
nothing else. With several DPO seeds, "after" is the mean ± sample standard deviation (ddof=1) over the
seeds and "spread" is max − min. The published HA-DPO numbers (LLaVA-1.5-7B, from the HA-DPO README) are
shown as labelled reference rows, never mixed into our numbers, and only beside the COCO set they were
measured on. Several POPE datasets (``data.pope.datasets``) get a table, a figure and a seed table each;
the metric names say which dataset a split belongs to (`orchestrator.eval.pope.dataset_split`: "random"
is COCO's, "gqa/random" GQA's), and each table names its question files' versions (``run.json``).

Limits, stated: evaluations found without stage records that have an adapter are all treated as
replicates of one "after" (the report lists them); a run directory that was moved is still found
(recorded absolute paths are re-rooted under it, and seeded runs are looked for in sibling folders
``<run_dir>-seed<N>``), but a run whose files were split across machines is not.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
import yaml

from orchestrator.data.schema import POPE_DEFAULT_DATASET
from orchestrator.errors import CorruptFileError
from orchestrator.eval import completeness
from orchestrator.eval.pope import dataset_sort_key, dataset_split, qualified_split
from orchestrator.eval.results import milebench_metric_rows, pope_metric_rows, read_answers, read_metrics

SPLIT_ORDER = ("random", "popular", "adversarial")
POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
METRIC_LABELS = {"accuracy": "accuracy", "precision": "precision", "recall": "recall", "f1": "F1",
                 "yes_ratio": "yes-ratio"}
WITHOUT, WITH, DELTA, SPREAD = "✗", "✓", "Δ (✓ − ✗)", "spread (max − min)"

PUBLISHED_MODEL = "LLaVA-1.5-7B"
PUBLISHED_LABEL = "published (HA-DPO README), not ours"
# HA-DPO README, LLaVA-1.5-7B, percent, before -> after HA-DPO (docs/CONTEXT.md section 4). None: not given.
PUBLISHED_POPE: dict[str, dict[str, dict[str, float | None]]] = {
    "random": {"before": {"accuracy": 89.60, "precision": 88.77, "recall": 90.66, "f1": 89.70, "yes_ratio": 51.06},
               "after": {"accuracy": 90.53, "precision": 92.99, "recall": 87.66, "f1": 90.25, "yes_ratio": 47.13}},
    "popular": {"before": {"accuracy": 86.20, "precision": None, "recall": None, "f1": 86.79, "yes_ratio": 54.46},
                "after": {"accuracy": 87.90, "precision": None, "recall": None, "f1": 87.81, "yes_ratio": 49.76}},
    "adversarial": {"before": {"accuracy": 79.76, "precision": None, "recall": None, "f1": 81.75, "yes_ratio": 60.90},
                    "after": {"accuracy": 81.46, "precision": None, "recall": None, "f1": 82.54, "yes_ratio": 56.20}},
}

_EVAL_STAGE = re.compile(r"eval_(baseline|hadpo)(?:_seed(-?\d+))?")
_DPO_STAGE = re.compile(r"dpo(?:_seed(-?\d+))?")
CURVE_PANELS = (("loss", "loss"), ("rewards/margins", "reward margin (chosen − rejected)"),
                ("rewards/accuracies", "reward accuracy (chosen > rejected)"))
COLORS = {"before": "#9ecae1", "after": "#08519c", "pub_before": "#d9d9d9", "pub_after": "#737373"}
RC = {"font.size": 11, "axes.titlesize": 13, "axes.labelsize": 12, "legend.fontsize": 10, "xtick.labelsize": 11,
      "ytick.labelsize": 10.5, "figure.titlesize": 14, "axes.spines.top": False, "axes.spines.right": False}


# ----------------------------------------------------------------------------------------------
# What a run directory holds


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


@dataclass
class ReportResult:
    html: Path
    markdown: Path
    images: list[Path]
    tables: dict[str, pd.DataFrame]      # numeric tables behind the report (fractions, not percent)
    runs: list[RunData]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"report: {self.html}", f"markdown: {self.markdown}", f"figures: {len(self.images)} PNG"]
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


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
    """Where a seeded stage wrote: `run_pipeline` names seeded configs ``<name>-seed<N>`` (a sibling folder)."""
    return [run_dir] if seed is None else [run_dir.parent / f"{run_dir.name}-seed{seed}", run_dir]


def _score_answers(answers: pd.DataFrame, run_id: str) -> pd.DataFrame:
    """Metric rows (METRIC_SCHEMA) from answers, with the same functions `run_eval` uses."""
    from orchestrator.eval import milebench as mb
    from orchestrator.eval import pope

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
    metrics_file = _locate(outputs.get("metrics_path"), [root / "eval" / run_id / "metrics.parquet" for root in roots])
    answers = _locate(outputs.get("answers_dir"), [root / "eval" / run_id / "answers" for root in roots])
    eval_folder = (metrics_file.parent if metrics_file else answers.parent if answers else None)
    info = _read_json(eval_folder / "run.json") if eval_folder else {}
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
    import pyarrow.parquet as pq

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
    record = _read_json(run_dir / "run_record.json")
    stages: dict[str, dict] = {}
    for path in sorted((run_dir / "stages").glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name)):
        stages[path.stem] = _read_json(path)
    if not stages and isinstance(record.get("stages"), dict):
        stages = {name: {"outputs": outputs} for name, outputs in record["stages"].items()}

    # evaluations
    evaluations: list[Evaluation] = []
    for name in sorted(stages, key=lambda s: (s != "eval_baseline", _seed_sort(s))):
        match = _EVAL_STAGE.fullmatch(name)
        if not match:
            continue
        seed = int(match.group(2)) if match.group(2) is not None else None
        role = "before" if match.group(1) == "baseline" else "after"
        found = _load_evaluation(name, role, seed, stages[name].get("outputs") or {}, run_dir, notes, allow_partial)
        if found:
            evaluations.append(found)
    if not evaluations:
        folders = sorted((p for p in (run_dir / "eval").glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for folder in folders:
            info = _read_json(folder / "run.json")
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
        match = _DPO_STAGE.fullmatch(name)
        if name != "warmup" and not match:
            continue
        kind = "sft" if name == "warmup" else "dpo"
        seed = int(match.group(1)) if match and match.group(1) is not None else None
        path = _locate(outputs.get("curves"), [root / "train" / f"{kind}_curves.parquet"
                                               for root in _seeded_dirs(run_dir, seed)])
        if path is None:
            notes.append(f"{name}: curves file {outputs.get('curves')} not found")
            continue
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        curves.append(Curve(name, kind, seed, path, _read_curve(path)))
    for path in sorted((run_dir / "train").glob("*_curves.parquet")):
        if path.resolve() in seen:
            continue
        stem = path.name[: -len("_curves.parquet")]
        curves.append(Curve("warmup" if stem == "sft" else stem, "sft" if stem == "sft" else "dpo", None, path,
                            _read_curve(path)))

    trials_path = run_dir / "tune" / "trials.parquet"
    trials = pd.read_parquet(trials_path) if trials_path.is_file() else None
    if not evaluations:
        notes.append(f"no evaluation results under {run_dir} (stages/eval_*.json or eval/*/metrics.parquet)")
    return RunData(label or run_dir.name, run_dir, record, stages, evaluations, curves, trials, notes)


def _seed_sort(name: str) -> tuple:
    match = re.search(r"_seed(-?\d+)$", name)
    return (name.split("_seed")[0], int(match.group(1)) if match else -math.inf)


# ----------------------------------------------------------------------------------------------
# Tables (numeric, fractions in [0, 1])


def pope_frame(metrics: pd.DataFrame) -> pd.DataFrame:
    """The POPE rows of a metrics parquet as one row per dataset and split (+ a "mean" per dataset): n,
    TP..FN, the five metrics. The dataset is read from the metric's name (`dataset_split`)."""
    rows = metrics[metrics["benchmark"] == "pope"]
    columns = ["dataset", "split", "n", *POPE_METRICS, "TP", "FP", "TN", "FN", "n_errors", "n_unparsable"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    rows = rows.drop_duplicates(["name", "metric"], keep="last")
    wide = rows.pivot(index="name", columns="metric", values="value")
    wide["n"] = rows.groupby("name")["n"].first()
    wide = wide.reset_index()
    parts = [dataset_split(name) for name in wide["name"].astype(str)]
    wide["dataset"], wide["split"] = [d for d, _ in parts], [s for _, s in parts]
    wide = wide.iloc[sorted(range(len(wide)), key=lambda i: (dataset_sort_key(wide["dataset"].iloc[i]),
                                                            _split_key(wide["split"].iloc[i])))]
    for column in columns:
        if column not in wide.columns:
            wide[column] = math.nan
    return wide[columns].reset_index(drop=True)


def pope_datasets(frame: pd.DataFrame) -> list[str]:
    """The POPE datasets of a results or summary frame, "coco" first."""
    return sorted(frame["dataset"].unique(), key=dataset_sort_key) if len(frame) else []


def question_versions(run: RunData, dataset: str) -> dict[str, list[str]]:
    """Split -> the question-file versions (sha256 prefix / count) the run's evaluations recorded for `dataset`."""
    versions: dict[str, list[str]] = {}
    for evaluation in run.evaluations:
        for key, version in (evaluation.info.get("versions") or {}).items():
            benchmark, _, name = key.partition("/")
            split_dataset, split = dataset_split(name)
            if benchmark == "pope" and split_dataset == dataset and version not in versions.setdefault(split, []):
                versions[split].append(version)
    return dict(sorted(versions.items(), key=lambda item: _split_key(item[0])))


def _split_key(split: str) -> tuple:
    if split == "mean":
        return (2, 0, split)
    return (0, SPLIT_ORDER.index(split), split) if split in SPLIT_ORDER else (1, 0, split)


def _per_evaluation(runs: Sequence[RunData], frame_of, columns: list[str], with_run_id: bool) -> pd.DataFrame:
    """One tidy frame from every evaluation of every run, each row tagged with its run, stage, role, seed."""
    frames = []
    for run in runs:
        for evaluation in run.evaluations:
            frame = frame_of(evaluation.metrics)
            if frame.empty:
                continue
            tags = {"run": run.label, "stage": evaluation.stage, "role": evaluation.role, "seed": evaluation.seed}
            if with_run_id:
                tags["run_id"] = evaluation.run_id
            for position, (name, value) in enumerate(tags.items()):
                frame.insert(position, name, value)
            frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)


def pope_results(runs: Sequence[RunData]) -> pd.DataFrame:
    """Tidy POPE results: one row per (run, evaluation, dataset, split), values as in the parquet."""
    return _per_evaluation(runs, pope_frame, ["run", "stage", "role", "seed", "run_id", "dataset", "split", "n",
                                              *POPE_METRICS], with_run_id=True)


def pope_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Per (run, role, dataset, split): mean, sample std (ddof=1; NaN for one evaluation), min, max and count."""
    if results.empty:
        return pd.DataFrame(columns=["run", "role", "dataset", "split", "evaluations"])
    grouped = results.groupby(["run", "role", "dataset", "split"], sort=False)[list(POPE_METRICS)]
    summary = grouped.agg(["mean", "std", "min", "max"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    summary["evaluations"] = grouped.size()
    return summary.reset_index()


def _milebench_frame(metrics: pd.DataFrame) -> pd.DataFrame:
    rows = metrics[(metrics["benchmark"] == "milebench") & (metrics["metric"] != "n_errors")]
    return rows[["scope", "name", "metric", "value", "n"]].reset_index(drop=True)


def milebench_results(runs: Sequence[RunData]) -> pd.DataFrame:
    return _per_evaluation(runs, _milebench_frame,
                           ["run", "stage", "role", "seed", "scope", "name", "metric", "value", "n"], with_run_id=False)


def final_curve_values(curves: Sequence[Curve]) -> pd.DataFrame:
    """The last logged step of each curve (loss, reward margin, reward accuracy where logged)."""
    rows = []
    for curve in curves:
        if curve.frame.empty:
            continue
        last = curve.frame.iloc[-1]
        row = {"stage": curve.stage, "kind": curve.kind, "seed": curve.seed, "steps_logged": len(curve.frame),
               "step": int(last["step"]) if "step" in last else None}
        for column, _ in CURVE_PANELS:
            row[column] = float(last[column]) if column in last and pd.notna(last[column]) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def sweep_objective(run: RunData) -> tuple[str | None, str]:
    """The sweep's objective column and mode: the config's `tune.metric`, else adversarial F1, else mean F1."""
    trials = run.trials
    tune = run.config.get("tune") or {}
    mode = tune.get("mode", "max")
    if trials is None:
        return None, mode
    # the sweep's own objective column ("objective" holds tune.metric where it is derived, e.g. a yes-ratio gap)
    for column in (tune.get("metric"), "objective", "pope/adversarial/f1", "pope/mean_f1"):
        if column and column in trials.columns:
            return column, mode
    others = [c for c in trials.columns if c.startswith("pope/")]
    return (others[0] if others else None), mode


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def config_differences(runs: Sequence[RunData]) -> pd.DataFrame:
    """Config keys whose values differ between runs (one column per run)."""
    flat = [_flatten(run.config) for run in runs]
    keys = sorted(set().union(*flat))
    rows = []
    for key in keys:
        values = [json.dumps(f.get(key), default=str) if key in f else "(absent)" for f in flat]
        if len(set(values)) > 1:
            rows.append({"key": key, **{run.label: (flat[i].get(key, "(absent)")) for i, run in enumerate(runs)}})
    return pd.DataFrame(rows, columns=["key", *[run.label for run in runs]])


# ----------------------------------------------------------------------------------------------
# Formatting


def pct(value: Any) -> str:
    """A fraction as percent with two decimals ("" for a missing value)."""
    return "" if value is None or pd.isna(value) else f"{100 * float(value):.2f}"


def pp(value: Any) -> str:
    """A difference of fractions in percentage points, signed."""
    return "" if value is None or pd.isna(value) else f"{100 * float(value):+.2f}"


def pct_pm(mean: Any, std: Any, count: int) -> str:
    if count > 1 and not pd.isna(std):
        return f"{pct(mean)} ± {100 * float(std):.2f}"
    return pct(mean)


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-3) else f"{value:.{digits}f}"
    return str(value)


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    row_classes: list[str] = field(default_factory=list)
    caption: str = ""
    left: int = 1                    # how many leading columns are text (left-aligned)


@dataclass
class _Doc:
    """Blocks rendered twice: to HTML (self-contained) and to Markdown."""

    out_dir: Path
    blocks: list[tuple] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)

    def heading(self, level: int, text: str, anchor: str | None = None) -> None:
        self.blocks.append(("h", level, text, anchor))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, table: Table) -> None:
        self.blocks.append(("table", table))

    def image(self, path: Path, alt: str) -> None:
        self.images.append(path)
        self.blocks.append(("img", path, alt))

    def pre(self, text: str, summary: str) -> None:
        self.blocks.append(("pre", text, summary))

    # rendering
    def html(self, title: str) -> str:
        parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                 f"<style>{_CSS}</style></head><body>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                _, level, text, anchor = block
                ident = f" id=\"{html.escape(anchor)}\"" if anchor else ""
                parts.append(f"<h{level}{ident}>{html.escape(text)}</h{level}>")
            elif kind == "p":
                parts.append(f"<p>{_inline_html(block[1])}</p>")
            elif kind == "table":
                parts.append(_table_html(block[1]))
            elif kind == "img":
                data = base64.b64encode(block[1].read_bytes()).decode("ascii")
                parts.append(f"<figure><img alt=\"{html.escape(block[2])}\" src=\"data:image/png;base64,{data}\">"
                             f"<figcaption>{html.escape(block[2])} ({html.escape(block[1].name)})</figcaption></figure>")
            elif kind == "pre":
                parts.append(f"<details><summary>{html.escape(block[2])}</summary><pre>{html.escape(block[1])}</pre>"
                             "</details>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def markdown(self) -> str:
        parts = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                parts.append("#" * block[1] + " " + block[2])
            elif kind == "p":
                parts.append(block[1])
            elif kind == "table":
                parts.append(_table_md(block[1]))
            elif kind == "img":
                parts.append(f"![{block[2]}]({block[1].relative_to(self.out_dir).as_posix()})")
            elif kind == "pre":
                parts.append(f"<details><summary>{block[2]}</summary>\n\n```\n{block[1]}\n```\n\n</details>")
        return "\n\n".join(parts) + "\n"


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;color:#222;
line-height:1.4;padding:0 1em}
h1{border-bottom:2px solid #08519c}h2{border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;margin:0.6em 0 1.2em 0;font-size:0.92em}
th,td{border:1px solid #ccc;padding:3px 8px}th{background:#f0f4f8}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.delta td{background:#f7fbff;font-style:italic}tr.spread td{background:#fbfbfb;color:#555}
tr.published td{background:#f3f3f3;color:#555}tr.published td:first-child{font-style:italic}
tr.group-start td{border-top:2px solid #888}
caption{caption-side:bottom;text-align:left;color:#555;font-size:0.9em;padding-top:4px}
figure{margin:1em 0}img{max-width:100%}figcaption{color:#555;font-size:0.9em}
pre{background:#f6f8fa;padding:0.8em;overflow:auto;font-size:0.85em}code{background:#f6f8fa;padding:0 3px}
"""


def _inline_html(text: str) -> str:
    """HTML-escaped text with `code` spans (the only markup the report's paragraphs use)."""
    pieces = text.split("`")
    return "".join(html.escape(p) if i % 2 == 0 else f"<code>{html.escape(p)}</code>" for i, p in enumerate(pieces))


def _table_html(table: Table) -> str:
    lines = ["<table>"]
    if table.caption:
        lines.append(f"<caption>{_inline_html(table.caption)}</caption>")
    lines.append("<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in table.headers) + "</tr></thead><tbody>")
    for index, row in enumerate(table.rows):
        css = table.row_classes[index] if index < len(table.row_classes) else ""
        cells = "".join(f"<td>{html.escape(str(c))}</td>" if i < table.left else
                        f"<td class=\"num\">{html.escape(str(c))}</td>" for i, c in enumerate(row))
        lines.append(f"<tr class=\"{css}\">{cells}</tr>" if css else f"<tr>{cells}</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table_md(table: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in table.headers) + " |",
             "|" + "|".join("---" if i < table.left else "---:" for i in range(len(table.headers))) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    if table.caption:
        lines += ["", f"*{table.caption}*"]
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


# ----------------------------------------------------------------------------------------------
# Figures (matplotlib's Agg canvas directly: no pyplot state, the caller's backend is left alone)


def _bar_label(value: float) -> str:
    return f"{value:.0f}" if value >= 99.95 else f"{value:.1f}"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=110)
    return path


def _rc():
    import matplotlib

    return matplotlib.rc_context(RC)


def plot_pope_bars(run: RunData, summary: pd.DataFrame, path: Path, include_published: bool,
                   dataset: str = POPE_DEFAULT_DATASET) -> Path | None:
    """Accuracy, F1 and yes-ratio per split of one POPE dataset, before vs after HA-DPO (error bars: std over
    seeds); the published HA-DPO numbers only beside COCO, the set they were measured on."""
    import numpy as np

    mine = summary[(summary["run"] == run.label) & (summary["dataset"] == dataset) & (summary["split"] != "mean")]
    if mine.empty:
        return None
    include_published = include_published and dataset == POPE_DEFAULT_DATASET
    splits = sorted(mine["split"].unique(), key=_split_key)
    n_after = int(mine[mine["role"] == "after"]["evaluations"].max()) if (mine["role"] == "after").any() else 0
    seeds = f", mean ± std over {n_after} seeds" if n_after > 1 else ""
    series = [("before", f"{run.model_name} {WITHOUT} (ours)", COLORS["before"], None),
              ("after", f"{run.model_name} {WITH} HA-DPO (ours{seeds})", COLORS["after"], None)]
    series = [s for s in series if (mine["role"] == s[0]).any()]
    published = include_published and any(s in PUBLISHED_POPE for s in splits)
    if published:
        series += [("pub_before", f"{PUBLISHED_MODEL} {WITHOUT}, {PUBLISHED_LABEL}", COLORS["pub_before"], "//"),
                   ("pub_after", f"{PUBLISHED_MODEL} {WITH} HA-DPO, {PUBLISHED_LABEL}", COLORS["pub_after"], "//")]
    width = 0.8 / len(series)
    x = np.arange(len(splits))
    with _rc():
        figure = _figure(5.0 * 3, 5.2)
        axes = figure.subplots(1, 3)
        handles = []
        for ax, metric in zip(axes, ("accuracy", "f1", "yes_ratio")):
            for k, (role, name, color, hatch) in enumerate(series):
                values, errors = [], []
                for split in splits:
                    if role.startswith("pub_"):
                        value = PUBLISHED_POPE.get(split, {}).get(role[4:], {}).get(metric)
                        values.append(math.nan if value is None else value)
                        errors.append(0.0)
                    else:
                        row = mine[(mine["role"] == role) & (mine["split"] == split)]
                        values.append(100 * float(row[f"{metric}_mean"].iloc[0]) if len(row) else math.nan)
                        std = float(row[f"{metric}_std"].iloc[0]) if len(row) else math.nan
                        errors.append(0.0 if math.isnan(std) else 100 * std)
                offset = (k - (len(series) - 1) / 2) * width
                bars = ax.bar(x + offset, values, width, yerr=errors if any(errors) else None, capsize=3,
                              color=color, hatch=hatch, edgecolor="#444" if hatch else color, label=name)
                if metric == "accuracy":
                    handles.append(bars)
                for bar, value, error in zip(bars, values, errors):
                    if not math.isnan(value):
                        ax.annotate(_bar_label(value), (bar.get_x() + bar.get_width() / 2, value + error),
                                    ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
            title = f"POPE {METRIC_LABELS[metric]}"
            if metric == "yes_ratio":
                ax.axhline(50, color="#b2182b", linestyle="--", linewidth=1, zorder=0)
                title += " (dashed: 50% = balanced)"
            ax.set_xticks(x, splits)
            ax.set_ylim(0, 108)
            ax.set_title(title)
            ax.set_xlabel(f"POPE {dataset} split")
            ax.set_ylabel(f"{METRIC_LABELS[metric]} (%)")
            ax.grid(axis="y", alpha=0.3)
        figure.suptitle(f"{run.label}: POPE {dataset} before (✗) and after (✓) HA-DPO")
        figure.legend(handles=handles, loc="outside lower center", ncol=min(len(series), 2), frameon=False)
        return _save(figure, path)


def plot_curves(run: RunData, kind: str, path: Path) -> Path | None:
    """DPO: loss, reward margin and reward accuracy against the step (one line per seed). Warm-up: loss."""
    from matplotlib.ticker import MaxNLocator

    curves = [c for c in run.curves if c.kind == kind and "step" in c.frame.columns and len(c.frame)]
    if not curves:
        return None
    panels = [(col, title) for col, title in CURVE_PANELS
              if any(col in c.frame.columns and c.frame[col].notna().any() for c in curves)]
    if not panels:
        return None
    with _rc():
        figure = _figure(max(5.0 * len(panels), 6.5), 4.4)
        axes = figure.subplots(1, len(panels), squeeze=False)[0]
        for ax, (column, title) in zip(axes, panels):
            for curve in curves:
                if column not in curve.frame.columns:
                    continue
                frame = curve.frame[["step", column]].dropna()
                name = f"seed {curve.seed}" if curve.seed is not None else curve.stage
                ax.plot(frame["step"], frame[column], marker="o" if len(frame) < 30 else None, markersize=3.5,
                        linewidth=1.6, label=name)
            if column == "rewards/accuracies":
                ax.set_ylim(-0.03, 1.03)
                ax.axhline(0.5, color="#999", linestyle=":", linewidth=1)
            if column == "rewards/margins":
                ax.axhline(0.0, color="#999", linestyle=":", linewidth=1)
            ax.set_title(title)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(column)
            ax.grid(alpha=0.3)
            if len(curves) > 1:
                ax.legend()
        what = "DPO training" if kind == "dpo" else "supervised warm-up"
        figure.suptitle(f"{run.label}: {what} curves ({curves[0].path.name})")
        return _save(figure, path)


def plot_sweep(run: RunData, path: Path) -> Path | None:
    """Each swept hyper-parameter against the sweep's objective (best trial starred)."""
    trials = run.trials
    objective, mode = sweep_objective(run)
    params = [c for c in (trials.columns if trials is not None else []) if c.startswith("param/")]
    if trials is None or objective is None or not params:
        return None
    stopped = trials["stopped_early"].astype(bool) if "stopped_early" in trials.columns else \
        pd.Series(False, index=trials.index)
    values = pd.to_numeric(trials[objective], errors="coerce")
    best = values.idxmax() if mode == "max" else values.idxmin()
    with _rc():
        figure = _figure(max(5.0 * len(params), 6.0), 4.6)
        axes = figure.subplots(1, len(params), squeeze=False)[0]
        for ax, param in zip(axes, params):
            raw = trials[param]
            numeric = pd.to_numeric(raw, errors="coerce")
            if numeric.notna().all():
                xs = numeric
                positive = numeric[numeric > 0]
                if len(positive) == len(numeric) and positive.max() / positive.min() >= 20:
                    ax.set_xscale("log")
                    ticks = sorted(numeric.unique())
                    ax.set_xticks(ticks, [f"{t:g}" for t in ticks], rotation=30 if len(ticks) > 4 else 0)
                    ax.minorticks_off()
            else:
                categories = sorted(raw.astype(str).unique())
                xs = raw.astype(str).map({c: i for i, c in enumerate(categories)})
                ax.set_xticks(range(len(categories)), categories)
            done = ~stopped & values.notna()
            ax.scatter(xs[done], 100 * values[done], s=55, color=COLORS["after"], label="finished", zorder=3)
            early = stopped & values.notna()
            if early.any():
                ax.scatter(xs[early], 100 * values[early], s=55, facecolors="none", edgecolors=COLORS["after"],
                           label="stopped early (ASHA)", zorder=3)
            if pd.notna(best):
                ax.scatter([xs[best]], [100 * values[best]], s=260, marker="*", color="#e6550d", label="best",
                           zorder=4)
            ax.set_xlabel(param.removeprefix("param/"))
            ax.set_ylabel(f"{objective} (%)")
            ax.set_title(f"{param.removeprefix('param/')} vs {objective}")
            ax.grid(alpha=0.3)
            ax.legend(loc="best")
        missing = int(values.isna().sum())
        extra = f"\n{missing} trial(s) without an objective (stopped early) not shown" if missing else ""
        figure.suptitle(f"{run.label}: sweep of {len(trials)} trials, objective {objective} ({mode}){extra}")
        return _save(figure, path)


def plot_sweep_parallel(run: RunData, path: Path) -> Path | None:
    """Parallel coordinates: one line per trial across its swept values and the objective, coloured by the
    objective (stopped-early trials grey and dashed, ending at their last value on the probe subset)."""
    trials = run.trials
    objective, mode = sweep_objective(run)
    params = [c for c in (trials.columns if trials is not None else []) if c.startswith("param/")]
    if trials is None or objective is None or not params or len(trials) < 2:
        return None
    import matplotlib

    axes_values, labels, logged_axes = [], [], []
    for param in params:
        raw = trials[param]
        numeric = pd.to_numeric(raw, errors="coerce")
        if numeric.notna().all():
            positive = numeric[numeric > 0]
            logged = len(positive) == len(numeric) and positive.max() / positive.min() >= 20
            values = numeric.map(math.log10) if logged else numeric
            labels.append(param.removeprefix("param/") + (" (log)" if logged else ""))
            logged_axes.append(logged)
        else:
            categories = sorted(raw.astype(str).unique())
            values = raw.astype(str).map({c: i for i, c in enumerate(categories)}).astype(float)
            labels.append(param.removeprefix("param/"))
            logged_axes.append(False)
        axes_values.append(values)
    finished = pd.to_numeric(trials[objective], errors="coerce")
    last_probe = pd.to_numeric(trials.get("last_probe_objective", pd.Series(math.nan, index=trials.index)),
                               errors="coerce")
    shown = finished.fillna(last_probe)
    axes_values.append(shown)
    labels.append(f"{objective} ({mode})")
    logged_axes.append(False)
    scaled = []
    for values in axes_values:
        low, high = values.min(), values.max()
        scaled.append((values - low) / (high - low) if high > low else values * 0 + 0.5)
    known = finished.dropna()
    norm = matplotlib.colors.Normalize(vmin=known.min() if len(known) else 0, vmax=known.max() if len(known) else 1)
    cmap = matplotlib.colormaps["viridis" if mode == "max" else "viridis_r"]
    with _rc():
        figure = _figure(max(2.2 * len(labels), 7.0), 4.8)
        ax = figure.subplots()
        xs = list(range(len(labels)))
        for index in trials.index:
            ys = [column[index] for column in scaled]
            if pd.notna(finished[index]):
                ax.plot(xs, ys, color=cmap(norm(finished[index])), linewidth=2.2, marker="o", zorder=3)
            else:
                ax.plot(xs, ys, color="#999999", linewidth=1.4, linestyle="--", marker="o", zorder=2)
        for x, values, logged in zip(xs, axes_values, logged_axes):
            ax.axvline(x, color="#444444", linewidth=0.8, zorder=1)
            low, high = (10 ** values.min(), 10 ** values.max()) if logged else (values.min(), values.max())
            ax.text(x, -0.08, f"{low:.3g}", ha="center", va="top", fontsize=9)
            ax.text(x, 1.06, f"{high:.3g}", ha="center", va="bottom", fontsize=9)
        ax.set_xticks(xs, labels, rotation=10)
        ax.set_yticks([])
        ax.set_ylim(-0.15, 1.15)
        ax.spines["left"].set_visible(False)
        figure.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=f"{objective} (finished)")
        figure.suptitle(f"{run.label}: {len(trials)} trials; grey dashed = stopped early (last probe value)")
        return _save(figure, path)


def tracking_pointers(run: RunData) -> list[str]:
    """Where the run's tracker files are and the command that opens each (only those that exist)."""
    lines = []
    tensorboard = run.run_dir / "tensorboard"
    if tensorboard.is_dir():
        lines.append(f"TensorBoard (training curves): `tensorboard --logdir {tensorboard}`")
    tune_dir = run.run_dir / "tune"
    if any(tune_dir.glob("*/*/events.out.tfevents.*")):
        lines.append(f"TensorBoard (sweep trials' reports): `tensorboard --logdir {tune_dir}`")
    store = Path(((run.config.get("mlflow") or {}).get("store")) or run.run_dir / "mlruns")
    if store.is_dir():
        lines.append(f"MLflow file store: `MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {store}`")
    wandb_dir = run.run_dir / "wandb"
    if wandb_dir.is_dir():
        lines.append(f"wandb (offline runs): `wandb sync {wandb_dir}/offline-run-*`")
    best = tune_dir / "best_config.yaml"
    if best.is_file():
        lines.append(f"best sweep trial's config: `hadpo run {best}`")
    return lines


def plot_milebench(run: RunData, mile: pd.DataFrame, path: Path) -> Path | None:
    """MileBench per task and per image-quantity level, before vs after (mean over seeds)."""
    import numpy as np

    mine = mile[mile["run"] == run.label]
    if mine.empty:
        return None
    means = mine.groupby(["role", "scope", "name"], sort=False)["value"].mean()
    panels = [("task", "per task"), ("level", "per image-quantity level")]
    with _rc():
        figure = _figure(13.0, 4.8)
        axes = figure.subplots(1, 2, width_ratios=[3, 2])
        for ax, (scope, title) in zip(axes, panels):
            names = list(dict.fromkeys(mine[mine["scope"] == scope]["name"]))
            if scope == "level":
                names = sorted(names, key=lambda n: ("few", "medium", "many").index(n)
                               if n in ("few", "medium", "many") else 9)
            x = np.arange(len(names))
            roles = [r for r in ("before", "after") if (mine["role"] == r).any()]
            width = 0.8 / max(len(roles), 1)
            for k, role in enumerate(roles):
                vals = [100 * means.get((role, scope, n), math.nan) for n in names]
                bars = ax.bar(x + (k - (len(roles) - 1) / 2) * width, vals, width, color=COLORS[role],
                              label=f"{WITHOUT} before" if role == "before" else f"{WITH} after HA-DPO")
                for bar, value in zip(bars, vals):
                    if not math.isnan(value):
                        ax.annotate(_bar_label(value), (bar.get_x() + bar.get_width() / 2, value), ha="center",
                                    va="bottom", fontsize=8.5, xytext=(0, 2), textcoords="offset points")
            ax.set_xticks(x, names, rotation=20 if scope == "task" and len(names) > 4 else 0, ha="right"
                          if scope == "task" and len(names) > 4 else "center")
            ax.set_ylim(0, 108)
            ax.set_ylabel("score (%)")
            ax.set_xlabel("task" if scope == "task" else "images per sample (few <6, medium 6-31, many >31)")
            ax.set_title(f"MileBench {title}")
            ax.grid(axis="y", alpha=0.3)
            ax.legend(loc="upper right")
        figure.suptitle(f"{run.label}: MileBench before (✗) and after (✓) HA-DPO")
        return _save(figure, path)


def plot_comparison(runs: Sequence[RunData], summary: pd.DataFrame, path: Path) -> Path | None:
    """F1 per split, one bar per run after HA-DPO (std over seeds), the run's baseline as a tick."""
    import numpy as np

    data = summary[summary["split"] != "mean"].copy()
    data["split"] = [qualified_split(d, s) for d, s in zip(data["dataset"], data["split"])]
    splits = [qualified_split(d, s) for d, s in _dataset_splits(data)]
    if not splits:
        return None
    x = np.arange(len(splits))
    width = 0.8 / len(runs)
    with _rc():
        figure = _figure(max(7.0, 2.4 * len(splits) * max(1, len(runs) / 2)), 4.8)
        ax = figure.subplots()
        cmap = [f"C{i}" for i in range(10)]
        for k, run in enumerate(runs):
            offset = x + (k - (len(runs) - 1) / 2) * width
            after = [data[(data["run"] == run.label) & (data["role"] == "after") & (data["split"] == s)]
                     for s in splits]
            before = [data[(data["run"] == run.label) & (data["role"] == "before") & (data["split"] == s)]
                      for s in splits]
            vals = [100 * float(r["f1_mean"].iloc[0]) if len(r) else math.nan for r in after]
            errs = [100 * float(r["f1_std"].iloc[0]) if len(r) and pd.notna(r["f1_std"].iloc[0]) else 0.0
                    for r in after]
            bars = ax.bar(offset, vals, width, yerr=errs if any(errs) else None, capsize=3, color=cmap[k % 10],
                          label=f"{run.label} ✓ HA-DPO")
            for bar, value, error in zip(bars, vals, errs):
                if not math.isnan(value):
                    ax.annotate(_bar_label(value), (bar.get_x() + bar.get_width() / 2, value + error), ha="center",
                                va="bottom", fontsize=8.5, xytext=(0, 2), textcoords="offset points")
            base = [100 * float(r["f1_mean"].iloc[0]) if len(r) else math.nan for r in before]
            ax.scatter(offset, base, marker="_", s=600, color="black", linewidths=2.2, zorder=4,
                       label="baseline ✗ (each run's own)" if k == 0 else None)
        ax.set_xticks(x, splits)
        ax.set_ylim(0, 108)
        ax.set_xlabel("POPE split (another dataset's as <dataset>/<split>)")
        ax.set_ylabel("F1 (%)")
        ax.set_title("POPE F1 after HA-DPO, runs side by side")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(len(runs) + 1, 4), frameon=False)
        return _save(figure, path)


# ----------------------------------------------------------------------------------------------
# Sections


def _dataset_splits(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """(dataset, split) pairs of a frame, "coco" first, each dataset's splits in POPE's order, "mean" last."""
    pairs = set(zip(frame["dataset"], frame["split"]))
    return sorted(pairs, key=lambda pair: (dataset_sort_key(pair[0]), _split_key(pair[1])))


def _pope_table(run: RunData, summary: pd.DataFrame, include_published: bool,
                dataset: str = POPE_DEFAULT_DATASET) -> Table | None:
    mine = summary[(summary["run"] == run.label) & (summary["dataset"] == dataset)]
    if mine.empty:
        return None
    include_published = include_published and dataset == POPE_DEFAULT_DATASET
    splits = sorted(mine["split"].unique(), key=_split_key)
    headers = ["model", "split", "HA-DPO", "accuracy (%)", "precision (%)", "recall (%)", "F1 (%)",
               "yes-ratio (%)", "mean F1 (%)"]
    rows, classes = [], []

    def stat(role: str, split: str, metric: str, what: str = "mean"):
        row = mine[(mine["role"] == role) & (mine["split"] == split)]
        return float(row[f"{metric}_{what}"].iloc[0]) if len(row) else math.nan

    def count(role: str) -> int:
        row = mine[mine["role"] == role]
        return int(row["evaluations"].max()) if len(row) else 0

    n_after = count("after")
    for split in splits:
        first = True
        for role, mark in (("before", WITHOUT), ("after", WITH)):
            if not count(role):
                continue
            n = count(role)
            cells = [pct_pm(stat(role, split, m), stat(role, split, m, "std"), n) for m in POPE_METRICS]
            cells.append(pct_pm(stat(role, "mean", "f1"), stat(role, "mean", "f1", "std"), n))
            model = run.model_name + (f" (mean ± std, {n} seeds)" if n > 1 else "")
            rows.append([model, split, mark, *cells])
            classes.append("group-start" if first else "")
            first = False
        if count("before") and count("after"):
            deltas = [pp(stat("after", split, m) - stat("before", split, m)) for m in POPE_METRICS]
            deltas.append(pp(stat("after", "mean", "f1") - stat("before", "mean", "f1")))
            rows.append([run.model_name, split, DELTA, *deltas])
            classes.append("delta")
        if n_after > 1:
            spreads = [pp(stat("after", split, m, "max") - stat("after", split, m, "min")).lstrip("+")
                       for m in POPE_METRICS]
            spreads.append(pp(stat("after", "mean", "f1", "max") - stat("after", "mean", "f1", "min")).lstrip("+"))
            rows.append([run.model_name, split, f"{WITH} {SPREAD}, {n_after} seeds", *spreads])
            classes.append("spread")
        if include_published and split in PUBLISHED_POPE:
            published = PUBLISHED_POPE[split]
            for role, mark in (("before", WITHOUT), ("after", WITH)):
                values = published[role]
                rows.append([f"{PUBLISHED_MODEL}, {PUBLISHED_LABEL}", split, mark,
                             *["" if values[m] is None else f"{values[m]:.2f}" for m in POPE_METRICS], ""])
                classes.append("published")
            rows.append([f"{PUBLISHED_MODEL}, {PUBLISHED_LABEL}", split, DELTA,
                         *["" if published["before"][m] is None else f"{published['after'][m] - published['before'][m]:+.2f}"
                           for m in POPE_METRICS], ""])
            classes.append("published")
    caption = (f"POPE {dataset}. All values in %; Δ in percentage points. Ours: the metrics parquet of each "
               "evaluation (`eval_baseline` = ✗, `eval_hadpo*` = ✓).")
    versions = question_versions(run, dataset)
    if versions:
        caption += " Question files (sha256 prefix / questions): " + "; ".join(
            f"{split} {', '.join(found)}" for split, found in versions.items()) + "."
    if n_after > 1:
        caption += f" ✓ rows: mean ± sample std over {n_after} DPO seeds; spread = max − min over the seeds."
    if include_published:
        caption += (" Published rows: HA-DPO README, LLaVA-1.5-7B on the POPE COCO splits (empty where the README "
                    "gives no number; it gives no mean F1 — the mean of its three F1 values is "
                    f"{_published_mean_f1('before'):.2f} ✗ and {_published_mean_f1('after'):.2f} ✓).")
    return Table(headers, rows, classes, caption, left=3)


def _published_mean_f1(role: str) -> float:
    return sum(PUBLISHED_POPE[s][role]["f1"] for s in SPLIT_ORDER) / len(SPLIT_ORDER)


def _seed_table(run: RunData, results: pd.DataFrame, dataset: str = POPE_DEFAULT_DATASET) -> Table | None:
    after = results[(results["run"] == run.label) & (results["role"] == "after") & (results["dataset"] == dataset)]
    stages = list(dict.fromkeys(after["stage"]))
    if len(stages) < 2:
        return None
    splits = sorted(after["split"].unique(), key=_split_key)
    headers = ["evaluation", "seed", *[f"{s} F1 (%)" if s != "mean" else "mean F1 (%)" for s in splits],
               *[f"{s} yes-ratio (%)" for s in splits if s != "mean"]]
    rows = []
    for stage in stages:
        part = after[after["stage"] == stage].set_index("split")
        seed = part["seed"].iloc[0]
        rows.append([stage, "" if pd.isna(seed) else str(int(seed)),
                     *[pct(part.loc[s, "f1"]) if s in part.index else "" for s in splits],
                     *[pct(part.loc[s, "yes_ratio"]) if s in part.index else "" for s in splits if s != "mean"]])
    wide_f1 = after.pivot(index="stage", columns="split", values="f1")
    wide_yes = after.pivot(index="stage", columns="split", values="yes_ratio")
    for name, fn in (("mean", "mean"), ("std (ddof=1)", "std"), ("max − min", None)):
        def agg(frame, split):
            column = frame[split].dropna()
            if fn is None:
                return 100 * (column.max() - column.min())
            return 100 * getattr(column, fn)()
        rows.append([name, "", *[f"{agg(wide_f1, s):.2f}" for s in splits],
                     *[f"{agg(wide_yes, s):.2f}" for s in splits if s != "mean"]])
    return Table(headers, rows, [""] * len(stages) + ["delta"] * 3,
                 f"POPE {dataset}: each DPO seed's evaluation, from its metrics parquet (values in %).", left=2)


def _eval_table(run: RunData) -> Table:
    headers = ["stage", "run id", "model", "adapter", "mode", "metrics file", "answers", "errors", "without yes/no",
               "answered / expected"]
    rows = []
    for e in run.evaluations:
        if e.coverage is None:
            coverage = "unknown"
        else:
            coverage = f"{_num(int(e.coverage['answered'].sum()))} / {_num(int(e.coverage['expected'].sum()))}"
            coverage += "" if e.complete else " INCOMPLETE"
        counts = e.metrics[(e.metrics["benchmark"] == "all") & (e.metrics["scope"] == "counts")]
        counts = dict(zip(counts["name"], counts["value"]))
        rows.append([e.stage, e.run_id, Path(str(e.info.get("model", ""))).name, str(e.info.get("adapter", "")),
                     str(e.info.get("mode", "")), str(e.metrics_path) if e.metrics_path else "(scored from the answers)",
                     _num(int(counts["answered"])) if "answered" in counts else "",
                     _num(int(counts["errors"])) if "errors" in counts else "",
                     _num(int(counts["unparsable"])) if "unparsable" in counts else "", coverage])
    return Table(headers, rows, caption="Where each number comes from (counts: the metrics parquet's counts rows; "
                 "answered / expected: rows in the answers against the questions the evaluation was given).",
                 left=6)


def score_generate_disagreement(run: RunData) -> pd.DataFrame:
    """For each model (+ adapter) evaluated in both score and generate mode: on the POPE questions both
    answered without error, how many parsed yes/no answers differ (`pope.answer_agreement`)."""
    from orchestrator.eval import pope

    columns = ["model", "adapter", "score_run_id", "generate_run_id", "n", "n_different", "share_different"]
    by_model: dict[tuple[str, str], dict[str, list[Evaluation]]] = {}
    for e in run.evaluations:
        mode = str(e.info.get("mode", ""))
        if mode in ("score", "generate") and e.answers_dir is not None:
            key = (str(e.info.get("model", "")), str(e.info.get("adapter", "")))
            by_model.setdefault(key, {}).setdefault(mode, []).append(e)
    rows, answers = [], {}

    def pope_answers(e: Evaluation) -> pd.DataFrame:
        if e.run_id not in answers:
            frame = read_answers(e.answers_dir)
            answers[e.run_id] = frame[frame["benchmark"] == "pope"]
        return answers[e.run_id]

    for (model, adapter), modes in by_model.items():
        for scored in modes.get("score", []):
            for generated in modes.get("generate", []):
                found = pope.answer_agreement(pope_answers(scored), pope_answers(generated))
                if found["n"]:
                    rows.append([model, adapter, scored.run_id, generated.run_id, found["n"],
                                 found["n"] - found["same"], found["share_different"]])
    return pd.DataFrame(rows, columns=columns)


def _disagreement_table(frame: pd.DataFrame) -> Table | None:
    if not len(frame):
        return None
    rows = [[Path(r.model).name, r.adapter, r.score_run_id, r.generate_run_id, _num(int(r.n)), _num(int(r.n_different)),
             pct(r.share_different)] for r in frame.itertuples(index=False)]
    return Table(["model", "adapter", "score run id", "generate run id", "questions", "different", "different (%)"],
                 rows, caption="POPE answered in both modes: score mode reads p(yes) vs p(no) at the last prompt "
                 "position, generate mode parses the greedy answer with POPE's rule (its first sentence); they differ "
                 "where the greedy answer does not say what the more likely first token says.", left=4)


def _milebench_table(run: RunData, mile: pd.DataFrame) -> Table | None:
    mine = mile[(mile["run"] == run.label) & (mile["scope"] != "task_level")]
    if mine.empty:
        return None
    grouped = mine.groupby(["scope", "name", "metric", "role"], sort=False)["value"]
    means, stds, counts = grouped.mean(), grouped.std(), grouped.size()
    keys = list(dict.fromkeys(zip(mine["scope"], mine["name"], mine["metric"])))
    headers = ["scope", "name", "metric", f"{WITHOUT} before (%)", f"{WITH} after (%)", "Δ (pp)", "n"]
    rows = []
    for scope, name, metric in keys:
        before = means.get((scope, name, metric, "before"), math.nan)
        after = means.get((scope, name, metric, "after"), math.nan)
        n_after = int(counts.get((scope, name, metric, "after"), 0))
        n_items = mine[(mine["scope"] == scope) & (mine["name"] == name)]["n"].max()
        rows.append([scope, name, metric, pct(before),
                     pct_pm(after, stds.get((scope, name, metric, "after"), math.nan), n_after),
                     pp(after - before), str(int(n_items))])
    return Table(headers, rows, caption="MileBench scores from the metrics parquet (task: its own metric; level, "
                 "group, overall: score). n: items (task, level) or tasks (group, overall).", left=3)


def _curves_table(run: RunData) -> Table | None:
    final = final_curve_values(run.curves)
    if final.empty:
        return None
    headers = ["stage", "seed", "file", "steps logged", "last step", "loss", "reward margin", "reward accuracy"]
    rows = []
    for curve, record in zip([c for c in run.curves if len(c.frame)], final.to_dict("records")):
        seed = "" if record["seed"] is None or pd.isna(record["seed"]) else str(int(record["seed"]))
        rows.append([record["stage"], seed, str(curve.path), str(record["steps_logged"]), str(record["step"]),
                     _num(record["loss"]), _num(record["rewards/margins"]), _num(record["rewards/accuracies"])])
    return Table(headers, rows, caption="The last logged step of each curves parquet.", left=3)


def _trials_table(run: RunData) -> Table | None:
    trials = run.trials
    objective, mode = sweep_objective(run)
    if trials is None or trials.empty:
        return None
    params = [c for c in trials.columns if c.startswith("param/")]
    shown = [c for c in (objective, "pope/mean_f1", "loss") if c and c in trials.columns]
    shown = list(dict.fromkeys(shown))
    ordered = trials.sort_values(objective, ascending=mode == "min", na_position="last") if objective else trials
    headers = ["trial", *[p.removeprefix("param/") for p in params],
               *[f"{c} (%)" if c.startswith("pope/") else c for c in shown], "stopped early", "error"]
    rows = []
    for record in ordered.to_dict("records"):
        rows.append([str(record.get("trial", "")), *[_num(record[p]) for p in params],
                     *[pct(record[c]) if c.startswith("pope/") else _num(record[c]) for c in shown],
                     _num(bool(record.get("stopped_early", False))), str(record.get("error", "") or "")])
    caption = f"`{run.run_dir / 'tune' / 'trials.parquet'}`, best first ({mode} {objective})."
    return Table(headers, rows, caption=caption, left=1)


def _kv_table(data: dict, key: str = "key", value: str = "value", caption: str = "") -> Table:
    rows = []
    for k, v in data.items():
        if isinstance(v, (list, tuple)):
            v = ", ".join(str(x) for x in v)
        elif isinstance(v, dict):
            v = json.dumps(v, sort_keys=True, default=str)
        rows.append([str(k), str(v)])
    return Table([key, value], rows, caption=caption, left=2)


def _record_section(doc: _Doc, run: RunData) -> None:
    record = run.record
    doc.heading(3, "Run record")
    if not record:
        doc.para(f"No `run_record.json` in `{run.run_dir}`.")
    else:
        doc.table(_kv_table({"run directory": str(run.run_dir), "name": record.get("name", ""),
                             "created": record.get("created", ""), "git sha": record.get("git_sha", ""),
                             "config hash": record.get("config_hash", ""),
                             "base model": record.get("base_model", "")}))
        if record.get("decoding"):
            doc.para("Decoding settings (from the config; each evaluation's own settings are in its `run.json`):")
            doc.table(_kv_table(record["decoding"], "setting"))
        decodings = {e.stage: e.info.get("decoding") for e in run.evaluations if e.info.get("decoding")}
        if decodings:
            doc.table(_kv_table(decodings, "evaluation", "decoding (run.json)"))
        if record.get("packages"):
            doc.table(_kv_table(record["packages"], "package", "version"))
        if record.get("data_files"):
            doc.table(_kv_table(record["data_files"], "data file", "sha256"))
        if record.get("hardware"):
            doc.table(_kv_table(record["hardware"], "hardware"))
    if run.stages:
        rows = [[name, str(stage.get("inputs", "")), str(stage.get("seconds", ""))] for name, stage in run.stages.items()]
        doc.table(Table(["stage", "inputs hash", "seconds"], rows, caption="`stages/*.json`, in the order they ran",
                        left=2))
    if run.config:
        doc.pre(yaml.safe_dump(run.config, sort_keys=False), "config (YAML)")


# ----------------------------------------------------------------------------------------------
# The report


def build_report(run_dirs: Sequence[str | Path], out_dir: str | Path, include_published: bool = True,
                 labels: Sequence[str] | None = None, allow_partial: bool = False) -> ReportResult:
    """Write ``report.html`` (self-contained), ``report.md`` and the PNGs for one or more runs into `out_dir`."""
    run_dirs = [Path(p) for p in ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
    if not run_dirs:
        raise ValueError("build_report needs at least one run directory")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} run directories")
    labels = list(labels) if labels else _default_labels(run_dirs)
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be distinct, got {labels}")
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    runs = [load_run(path, label, allow_partial) for path, label in zip(run_dirs, labels)]
    results = pope_results(runs)
    summary = pope_summary(results)
    mile = milebench_results(runs)
    prefix = (lambda run: f"{_slug(run.label)}_") if len(runs) > 1 else (lambda run: "")

    doc = _Doc(out_dir)
    title = "HA-DPO report: " + ", ".join(run.label for run in runs)
    doc.heading(1, title)
    doc.para(f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from "
             + ", ".join(f"`{run.run_dir}`" for run in runs) + ". POPE values are percent; Δ in percentage points.")
    notes: list[str] = []
    for run in runs:
        notes += [f"{run.label}: {note}" for note in run.notes]
        doc.heading(2, f"Run {run.label}", anchor=_slug(run.label))
        doc.para(f"`{run.run_dir}`; model {run.model_name}; {len(run.evaluations)} evaluation(s), "
                 f"{len(run.curves)} training curve(s)" + ("; sweep trials" if run.trials is not None else "") + ".")
        for note in run.notes:
            doc.para(f"Note: {note}")
        datasets = pope_datasets(summary[summary["run"] == run.label])
        if not datasets:
            doc.heading(3, "POPE before / after HA-DPO")
            doc.para("No POPE results.")
        for dataset in datasets:
            # COCO keeps the file names and heading it always had; another dataset's carry its name
            named = "" if dataset == POPE_DEFAULT_DATASET else f"_{_slug(dataset)}"
            which = "" if datasets == [POPE_DEFAULT_DATASET] else f" {dataset}"
            doc.heading(3, f"POPE{which} before / after HA-DPO")
            doc.table(_pope_table(run, summary, include_published, dataset))
            image = plot_pope_bars(run, summary, out_dir / f"{prefix(run)}pope_bars{named}.png", include_published,
                                   dataset)
            if image:
                doc.image(image, f"{run.label}: POPE {dataset} accuracy, F1 and yes-ratio per split, before vs after")
            seeds = _seed_table(run, results, dataset)
            if seeds:
                doc.heading(4, f"Spread over DPO seeds{f' (POPE {dataset})' if which else ''}")
                doc.table(seeds)
        if datasets:
            doc.table(_eval_table(run))
            disagreement = _disagreement_table(score_generate_disagreement(run))
            if disagreement:
                doc.heading(4, "Score mode vs generate mode")
                doc.table(disagreement)
        mile_table = _milebench_table(run, mile)
        if mile_table:
            doc.heading(3, "MileBench")
            doc.table(mile_table)
            image = plot_milebench(run, mile, out_dir / f"{prefix(run)}milebench.png")
            if image:
                doc.image(image, f"{run.label}: MileBench per task and per image-quantity level")
        if run.curves:
            doc.heading(3, "Training curves")
            curves = _curves_table(run)
            if curves:
                doc.table(curves)
            for kind, name in (("sft", "curves_warmup.png"), ("dpo", "curves_dpo.png")):
                image = plot_curves(run, kind, out_dir / f"{prefix(run)}{name}")
                if image:
                    what = "DPO loss, reward margin and reward accuracy" if kind == "dpo" else "warm-up loss"
                    doc.image(image, f"{run.label}: {what} against the step")
        if run.trials is not None:
            doc.heading(3, "Hyper-parameter sweep")
            trials = _trials_table(run)
            if trials:
                doc.table(trials)
            image = plot_sweep(run, out_dir / f"{prefix(run)}sweep.png")
            if image:
                doc.image(image, f"{run.label}: each swept hyper-parameter against the objective")
            image = plot_sweep_parallel(run, out_dir / f"{prefix(run)}sweep_parallel.png")
            if image:
                doc.image(image, f"{run.label}: parallel coordinates of the trials' values and objective")
        pointers = tracking_pointers(run)
        if pointers:
            doc.heading(3, "Trackers")
            for line in pointers:
                doc.para(line)
        _record_section(doc, run)

    tables: dict[str, pd.DataFrame] = {"pope": results, "pope_summary": summary, "milebench": mile,
                                       "curves_final": pd.concat([final_curve_values(r.curves).assign(run=r.label)
                                                                  for r in runs], ignore_index=True),
                                       "score_vs_generate": pd.concat([score_generate_disagreement(r).assign(run=r.label)
                                                                       for r in runs], ignore_index=True)}
    if len(runs) > 1:
        _comparison_section(doc, runs, summary, out_dir, tables)

    html_path = out_dir / "report.html"
    md_path = out_dir / "report.md"
    html_path.write_text(doc.html(title), encoding="utf-8")
    md_path.write_text(doc.markdown(), encoding="utf-8")
    trials = [r.trials.assign(run=r.label) for r in runs if r.trials is not None]
    if trials:
        tables["trials"] = pd.concat(trials, ignore_index=True)
    return ReportResult(html_path, md_path, list(doc.images), tables, runs, notes)


def run_summary_markdown(run: RunData, include_published: bool = False) -> str:
    """One run's POPE and MileBench tables and its run record (base model, config, data-file hashes,
    packages) in Markdown, as `build_report` shows them but without figures: what a model card embeds."""
    summary = pope_summary(pope_results([run]))
    doc = _Doc(run.run_dir)
    doc.heading(3, "POPE")
    pope_table = _pope_table(run, summary, include_published)
    if pope_table is None:
        doc.para("No POPE results were recorded.")
    else:
        doc.table(pope_table)
    mile_table = _milebench_table(run, milebench_results([run]))
    if mile_table:
        doc.heading(3, "MileBench")
        doc.table(mile_table)
    _record_section(doc, run)
    return doc.markdown()


def _default_labels(run_dirs: Sequence[Path]) -> list[str]:
    names = [p.expanduser().resolve().name for p in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{p.expanduser().resolve().parent.name}/{p.expanduser().resolve().name}" for p in run_dirs]


def comparison_table(runs: Sequence[RunData], summary: pd.DataFrame) -> pd.DataFrame:
    """Rows (dataset, split, metric), `split` named as in the metrics ("random" for COCO, "gqa/random");
    per run columns `<label>/before`, `/after` (means), `/after_std`, `/seeds`, `/delta`."""
    rows = []
    for dataset, split in _dataset_splits(summary):
        for metric in POPE_METRICS:
            row: dict[str, Any] = {"dataset": dataset, "split": qualified_split(dataset, split), "metric": metric}
            for run in runs:
                mine = summary[(summary["run"] == run.label) & (summary["dataset"] == dataset)
                               & (summary["split"] == split)]
                before = mine[mine["role"] == "before"]
                after = mine[mine["role"] == "after"]
                b = float(before[f"{metric}_mean"].iloc[0]) if len(before) else math.nan
                a = float(after[f"{metric}_mean"].iloc[0]) if len(after) else math.nan
                row[f"{run.label}/before"] = b
                row[f"{run.label}/after"] = a
                row[f"{run.label}/after_std"] = float(after[f"{metric}_std"].iloc[0]) if len(after) else math.nan
                row[f"{run.label}/seeds"] = int(after["evaluations"].iloc[0]) if len(after) else 0
                row[f"{run.label}/delta"] = a - b
            rows.append(row)
    return pd.DataFrame(rows)


def _comparison_section(doc: _Doc, runs: Sequence[RunData], summary: pd.DataFrame, out_dir: Path,
                        tables: dict[str, pd.DataFrame]) -> None:
    doc.heading(2, "Runs side by side", anchor="comparison")
    diffs = config_differences(runs)
    tables["config_differences"] = diffs
    if len(diffs):
        doc.heading(3, "What differs between the runs' configs")
        doc.table(Table(["config key", *[r.label for r in runs]],
                        [[row["key"], *[_num(row[r.label]) if not isinstance(row[r.label], (list, dict))
                                        else json.dumps(row[r.label]) for r in runs]]
                         for row in diffs.to_dict("records")], left=len(runs) + 1))
    else:
        doc.para("The runs' configs are identical (or absent).")
    if summary.empty:
        return
    compare = comparison_table(runs, summary)
    tables["comparison"] = compare
    headers = ["split", "metric"]
    for run in runs:
        headers += [f"{run.label} {WITHOUT}", f"{run.label} {WITH}", f"{run.label} Δ"]
    rows, classes = [], []
    for record in compare.to_dict("records"):
        cells = [record["split"], METRIC_LABELS[record["metric"]]]
        for run in runs:
            cells += [pct(record[f"{run.label}/before"]),
                      pct_pm(record[f"{run.label}/after"], record[f"{run.label}/after_std"],
                             record[f"{run.label}/seeds"]),
                      pp(record[f"{run.label}/delta"])]
        rows.append(cells)
        classes.append("group-start" if record["metric"] == POPE_METRICS[0] else "")
    doc.heading(3, "POPE, one column group per run")
    doc.table(Table(headers, rows, classes, caption="Values in %, Δ in percentage points (✓ − ✗ of the same run); "
                    "split `mean` is the mean over the splits (its F1 is the mean F1); another POPE dataset's splits "
                    "are `<dataset>/<split>`. ✓ with several seeds: mean ± std.",
                    left=2))
    image = plot_comparison(runs, summary, out_dir / "compare_pope_f1.png")
    if image:
        doc.image(image, "POPE F1 after HA-DPO per split, runs side by side (ticks: each run's baseline)")


__all__ = ["build_report", "run_summary_markdown", "ReportResult", "RunData", "Evaluation", "Curve", "load_run", "pope_frame",
           "pope_results", "pope_summary", "milebench_results", "final_curve_values", "comparison_table",
           "config_differences", "PUBLISHED_POPE", "PUBLISHED_LABEL"]
