"""`build_report`: one HTML page (self-contained) and one Markdown file from the files runs left behind.

What it writes, under `out_dir`: ``report.html`` (PNGs embedded as base64 data URIs, so the one file can
be mailed or attached), ``report.md`` (the same tables, PNG links) and the PNGs. Per run: a POPE table,
figure and seed table per POPE dataset, where each number comes from (each evaluation's answered /
expected counts; one short of answers marked INCOMPLETE), score vs generate mode where both ran,
MileBench, the training curves, the sweep, the trackers' folders and the command that opens each, and the
run record; with several runs, their config differences and a side-by-side table and figure.
`run_summary_markdown` is one run's tables without figures (what a model card embeds).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
import yaml

from orchestrator import layout
from orchestrator.data.schema import POPE_DEFAULT_DATASET
from orchestrator.eval.pope import METRIC_COLUMNS
from orchestrator.report.figures import (plot_comparison, plot_curves, plot_milebench, plot_pope_bars, plot_sweep,
                                         plot_sweep_parallel)
from orchestrator.report.load import RunData, load_run
from orchestrator.report.render import (DELTA, METRIC_LABELS, SPREAD, WITH, WITHOUT, Document, Table, format_number,
                                        pct, pct_pm, pp, slug)
from orchestrator.report.tables import (PUBLISHED_LABEL, PUBLISHED_MODEL, PUBLISHED_POPE, comparison_table,
                                        config_differences, final_curve_values, milebench_results, pope_datasets,
                                        pope_results, pope_summary, published_mean_f1, question_versions,
                                        score_generate_disagreement, split_key, sweep_objective)

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


# ----------------------------------------------------------------------------------------------
# Sections


def tracking_pointers(run: RunData) -> list[str]:
    """Where the run's tracker files are and the command that opens each (only those that exist)."""
    lines = []
    tensorboard = layout.tensorboard_dir(run.run_dir)
    if tensorboard.is_dir():
        lines.append(f"TensorBoard (training curves): `tensorboard --logdir {tensorboard}`")
    tune_dir = layout.tune_dir(run.run_dir)
    if any(tune_dir.glob("*/*/events.out.tfevents.*")):
        lines.append(f"TensorBoard (sweep trials' reports): `tensorboard --logdir {tune_dir}`")
    store = Path(((run.config.get("mlflow") or {}).get("store")) or layout.mlflow_store(run.run_dir))
    if store.is_dir():
        lines.append(f"MLflow file store: `MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {store}`")
    wandb_dir = layout.wandb_dir(run.run_dir)
    if wandb_dir.is_dir():
        lines.append(f"wandb (offline runs): `wandb sync {wandb_dir}/offline-run-*`")
    best = layout.best_config_path(run.run_dir)
    if best.is_file():
        lines.append(f"best sweep trial's config: `hadpo run {best}`")
    return lines


def _pope_table(run: RunData, summary: pd.DataFrame, include_published: bool,
                dataset: str = POPE_DEFAULT_DATASET) -> Table | None:
    mine = summary[(summary["run"] == run.label) & (summary["dataset"] == dataset)]
    if mine.empty:
        return None
    include_published = include_published and dataset == POPE_DEFAULT_DATASET
    splits = sorted(mine["split"].unique(), key=split_key)
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
            cells = [pct_pm(stat(role, split, m), stat(role, split, m, "std"), n) for m in METRIC_COLUMNS]
            cells.append(pct_pm(stat(role, "mean", "f1"), stat(role, "mean", "f1", "std"), n))
            model = run.model_name + (f" (mean ± std, {n} seeds)" if n > 1 else "")
            rows.append([model, split, mark, *cells])
            classes.append("group-start" if first else "")
            first = False
        if count("before") and count("after"):
            deltas = [pp(stat("after", split, m) - stat("before", split, m)) for m in METRIC_COLUMNS]
            deltas.append(pp(stat("after", "mean", "f1") - stat("before", "mean", "f1")))
            rows.append([run.model_name, split, DELTA, *deltas])
            classes.append("delta")
        if n_after > 1:
            spreads = [pp(stat("after", split, m, "max") - stat("after", split, m, "min")).lstrip("+")
                       for m in METRIC_COLUMNS]
            spreads.append(pp(stat("after", "mean", "f1", "max") - stat("after", "mean", "f1", "min")).lstrip("+"))
            rows.append([run.model_name, split, f"{WITH} {SPREAD}, {n_after} seeds", *spreads])
            classes.append("spread")
        if include_published and split in PUBLISHED_POPE:
            published = PUBLISHED_POPE[split]
            for role, mark in (("before", WITHOUT), ("after", WITH)):
                values = published[role]
                rows.append([f"{PUBLISHED_MODEL}, {PUBLISHED_LABEL}", split, mark,
                             *["" if values[m] is None else f"{values[m]:.2f}" for m in METRIC_COLUMNS], ""])
                classes.append("published")
            rows.append([f"{PUBLISHED_MODEL}, {PUBLISHED_LABEL}", split, DELTA,
                         *["" if published["before"][m] is None else f"{published['after'][m] - published['before'][m]:+.2f}"
                           for m in METRIC_COLUMNS], ""])
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
                    f"{published_mean_f1('before'):.2f} ✗ and {published_mean_f1('after'):.2f} ✓).")
    return Table(headers, rows, classes, caption, left=3)


def _seed_table(run: RunData, results: pd.DataFrame, dataset: str = POPE_DEFAULT_DATASET) -> Table | None:
    after = results[(results["run"] == run.label) & (results["role"] == "after") & (results["dataset"] == dataset)]
    stages = list(dict.fromkeys(after["stage"]))
    if len(stages) < 2:
        return None
    splits = sorted(after["split"].unique(), key=split_key)
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
            coverage = f"{format_number(int(e.coverage['answered'].sum()))} / {format_number(int(e.coverage['expected'].sum()))}"
            coverage += "" if e.complete else " INCOMPLETE"
        counts = e.metrics[(e.metrics["benchmark"] == "all") & (e.metrics["scope"] == "counts")]
        counts = dict(zip(counts["name"], counts["value"]))
        rows.append([e.stage, e.run_id, Path(str(e.info.get("model", ""))).name, str(e.info.get("adapter", "")),
                     str(e.info.get("mode", "")), str(e.metrics_path) if e.metrics_path else "(scored from the answers)",
                     format_number(int(counts["answered"])) if "answered" in counts else "",
                     format_number(int(counts["errors"])) if "errors" in counts else "",
                     format_number(int(counts["unparsable"])) if "unparsable" in counts else "", coverage])
    return Table(headers, rows, caption="Where each number comes from (counts: the metrics parquet's counts rows; "
                 "answered / expected: rows in the answers against the questions the evaluation was given).",
                 left=6)


def _disagreement_table(frame: pd.DataFrame) -> Table | None:
    if not len(frame):
        return None
    rows = [[Path(r.model).name, r.adapter, r.score_run_id, r.generate_run_id, format_number(int(r.n)), format_number(int(r.n_different)),
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
                     format_number(record["loss"]), format_number(record["rewards/margins"]), format_number(record["rewards/accuracies"])])
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
        rows.append([str(record.get("trial", "")), *[format_number(record[p]) for p in params],
                     *[pct(record[c]) if c.startswith("pope/") else format_number(record[c]) for c in shown],
                     format_number(bool(record.get("stopped_early", False))), str(record.get("error", "") or "")])
    caption = f"`{layout.trials_path(run.run_dir)}`, best first ({mode} {objective})."
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


def _record_section(doc: Document, run: RunData) -> None:
    record = run.record
    doc.heading(3, "Run record")
    if not record:
        doc.para(f"No `{layout.RUN_RECORD}` in `{run.run_dir}`.")
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
    prefix = (lambda run: f"{slug(run.label)}_") if len(runs) > 1 else (lambda run: "")

    doc = Document(out_dir)
    title = "HA-DPO report: " + ", ".join(run.label for run in runs)
    doc.heading(1, title)
    doc.para(f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from "
             + ", ".join(f"`{run.run_dir}`" for run in runs) + ". POPE values are percent; Δ in percentage points.")
    notes: list[str] = []
    for run in runs:
        notes += [f"{run.label}: {note}" for note in run.notes]
        doc.heading(2, f"Run {run.label}", anchor=slug(run.label))
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
            named = "" if dataset == POPE_DEFAULT_DATASET else f"_{slug(dataset)}"
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
    doc = Document(run.run_dir)
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


def _comparison_section(doc: Document, runs: Sequence[RunData], summary: pd.DataFrame, out_dir: Path,
                        tables: dict[str, pd.DataFrame]) -> None:
    doc.heading(2, "Runs side by side", anchor="comparison")
    diffs = config_differences(runs)
    tables["config_differences"] = diffs
    if len(diffs):
        doc.heading(3, "What differs between the runs' configs")
        doc.table(Table(["config key", *[r.label for r in runs]],
                        [[row["key"], *[format_number(row[r.label]) if not isinstance(row[r.label], (list, dict))
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
        classes.append("group-start" if record["metric"] == METRIC_COLUMNS[0] else "")
    doc.heading(3, "POPE, one column group per run")
    doc.table(Table(headers, rows, classes, caption="Values in %, Δ in percentage points (✓ − ✗ of the same run); "
                    "split `mean` is the mean over the splits (its F1 is the mean F1); another POPE dataset's splits "
                    "are `<dataset>/<split>`. ✓ with several seeds: mean ± std.",
                    left=2))
    image = plot_comparison(runs, summary, out_dir / "compare_pope_f1.png")
    if image:
        doc.image(image, "POPE F1 after HA-DPO per split, runs side by side (ticks: each run's baseline)")
