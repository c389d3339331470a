"""The report's figures, each one PNG: POPE bars before / after HA-DPO, training curves, the sweep's scatter
and parallel coordinates, MileBench per task and image-quantity level, and runs side by side.

matplotlib's Agg canvas is used directly: no pyplot state, the caller's backend is left alone. matplotlib
itself is imported when a figure is drawn, so that reading a run (`hadpo demo`'s table, a model card)
does not pay for importing it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from orchestrator.data.schema import POPE_DEFAULT_DATASET
from orchestrator.eval.pope import qualified_split
from orchestrator.report.load import RunData
from orchestrator.report.render import METRIC_LABELS, WITH, WITHOUT
from orchestrator.report.tables import (CURVE_PANELS, PUBLISHED_LABEL, PUBLISHED_MODEL, PUBLISHED_POPE,
                                        dataset_splits, split_key, sweep_objective)

COLORS = {"before": "#9ecae1", "after": "#08519c", "pub_before": "#d9d9d9", "pub_after": "#737373"}
RC = {"font.size": 11, "axes.titlesize": 13, "axes.labelsize": 12, "legend.fontsize": 10, "xtick.labelsize": 11,
      "ytick.labelsize": 10.5, "figure.titlesize": 14, "axes.spines.top": False, "axes.spines.right": False}

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
    mine = summary[(summary["run"] == run.label) & (summary["dataset"] == dataset) & (summary["split"] != "mean")]
    if mine.empty:
        return None
    include_published = include_published and dataset == POPE_DEFAULT_DATASET
    splits = sorted(mine["split"].unique(), key=split_key)
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


def plot_milebench(run: RunData, mile: pd.DataFrame, path: Path) -> Path | None:
    """MileBench per task and per image-quantity level, before vs after (mean over seeds)."""
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
    data = summary[summary["split"] != "mean"].copy()
    data["split"] = [qualified_split(d, s) for d, s in zip(data["dataset"], data["split"])]
    splits = [qualified_split(d, s) for d, s in dataset_splits(data)]
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
