"""The numeric tables behind the report, from `RunData`: fractions in [0, 1], nothing formatted.

`pope_results` (one row per run, evaluation, dataset and split), `pope_summary` (mean, sample std with
ddof=1, min, max over an evaluation role's seeds), `comparison_table` (runs side by side),
`milebench_results`, `final_curve_values`, `config_differences`, `score_generate_disagreement`, and the
published HA-DPO numbers (`PUBLISHED_POPE`), kept apart from ours.
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

import pandas as pd

from orchestrator.data.schema import POPE_SPLITS
from orchestrator.eval import pope
from orchestrator.eval.pope import METRIC_COLUMNS, dataset_sort_key, dataset_split, qualified_split
from orchestrator.eval.results import read_answers
from orchestrator.report.load import Curve, Evaluation, RunData

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
CURVE_PANELS = (("loss", "loss"), ("rewards/margins", "reward margin (chosen − rejected)"),
                ("rewards/accuracies", "reward accuracy (chosen > rejected)"))

def pope_frame(metrics: pd.DataFrame) -> pd.DataFrame:
    """The POPE rows of a metrics parquet as one row per dataset and split (+ a "mean" per dataset): n,
    TP..FN, the five metrics. The dataset is read from the metric's name (`dataset_split`)."""
    rows = metrics[metrics["benchmark"] == "pope"]
    columns = ["dataset", "split", "n", *METRIC_COLUMNS, *pope.COUNT_COLUMNS, *pope.ITEM_COUNT_COLUMNS]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    rows = rows.drop_duplicates(["name", "metric"], keep="last")
    wide = rows.pivot(index="name", columns="metric", values="value")
    wide["n"] = rows.groupby("name")["n"].first()
    wide = wide.reset_index()
    parts = [dataset_split(name) for name in wide["name"].astype(str)]
    wide["dataset"], wide["split"] = [d for d, _ in parts], [s for _, s in parts]
    wide = wide.iloc[sorted(range(len(wide)), key=lambda i: (dataset_sort_key(wide["dataset"].iloc[i]),
                                                            split_key(wide["split"].iloc[i])))]
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
    return dict(sorted(versions.items(), key=lambda item: split_key(item[0])))


def split_key(split: str) -> tuple:
    """POPE's splits in their order (`pope.split_sort_key`), a dataset's "mean" row last."""
    return (split == "mean", pope.split_sort_key(split))


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
                                              *METRIC_COLUMNS], with_run_id=True)


def pope_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Per (run, role, dataset, split): mean, sample std (ddof=1; NaN for one evaluation), min, max and count."""
    if results.empty:
        return pd.DataFrame(columns=["run", "role", "dataset", "split", "evaluations"])
    grouped = results.groupby(["run", "role", "dataset", "split"], sort=False)[list(METRIC_COLUMNS)]
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


def dataset_splits(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """(dataset, split) pairs of a frame, "coco" first, each dataset's splits in POPE's order, "mean" last."""
    pairs = set(zip(frame["dataset"], frame["split"]))
    return sorted(pairs, key=lambda pair: (dataset_sort_key(pair[0]), split_key(pair[1])))


def published_mean_f1(role: str) -> float:
    """The mean of the HA-DPO README's three F1 values ("before" or "after"; the README gives no mean)."""
    return sum(PUBLISHED_POPE[s][role]["f1"] for s in POPE_SPLITS) / len(POPE_SPLITS)


def score_generate_disagreement(run: RunData) -> pd.DataFrame:
    """For each model (+ adapter) evaluated in both score and generate mode: on the POPE questions both
    answered without error, how many parsed yes/no answers differ (`pope.answer_agreement`)."""
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


def comparison_table(runs: Sequence[RunData], summary: pd.DataFrame) -> pd.DataFrame:
    """Rows (dataset, split, metric), `split` named as in the metrics ("random" for COCO, "gqa/random");
    per run columns `<label>/before`, `/after` (means), `/after_std`, `/seeds`, `/delta`."""
    rows = []
    for dataset, split in dataset_splits(summary):
        for metric in METRIC_COLUMNS:
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
