"""Did an evaluation answer every question it was given? Counted, never assumed.

An evaluation knows, before it answers anything, how many questions each POPE split and MileBench task
holds (`expected_counts`, written to its ``run.json``). Whoever reads its answers later (the runner at
the end, a report of a run that was stopped half-way) compares (`coverage`): a split with fewer rows
than questions is *incomplete*, and a mean over splits is then not a mean of the benchmark, so it is
left out (`drop_means`) unless the caller asks for it. An item whose image did not open, or whose
answer failed, has a row with its error: it is counted as present (and reported as an error), since
nothing more can be had by waiting.
"""

from __future__ import annotations

from typing import Iterable

import pandas as pd

from orchestrator.eval.pope import dataset_split, qualified_split

COLUMNS = ["benchmark", "split", "answered", "expected"]
# Rows of a metrics table that average over splits or tasks: not shown for an incomplete evaluation.
AGGREGATE_SCOPES = {"pope": ("overall",), "milebench": ("overall", "group", "level")}


def key(benchmark: str, split: str) -> str:
    return f"{benchmark}/{split}"


def expected_counts(items: Iterable[dict]) -> dict[str, int]:
    """Questions per ``"<benchmark>/<split or task>"`` (answerable items and rejects alike)."""
    counts: dict[str, int] = {}
    for item in items:
        name = key(str(item["benchmark"]), str(item["split"]))
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def coverage(answers: pd.DataFrame, expected: dict[str, int]) -> pd.DataFrame:
    """Per expected split: rows answered (error rows included) and questions expected."""
    present: dict[str, int] = {}
    if len(answers):
        grouped = answers.groupby(["benchmark", "split"]).size()
        present = {key(str(b), str(s)): int(n) for (b, s), n in grouped.items()}
    rows = []
    for name, count in expected.items():
        benchmark, split = name.split("/", 1)
        rows.append({"benchmark": benchmark, "split": split, "answered": present.get(name, 0), "expected": int(count)})
    return pd.DataFrame(rows, columns=COLUMNS)


def incomplete(table: pd.DataFrame, benchmark: str | None = None) -> pd.DataFrame:
    """The splits of a coverage table with fewer answers than questions."""
    rows = table[table["answered"] < table["expected"]]
    return rows if benchmark is None else rows[rows["benchmark"] == benchmark]


def describe(table: pd.DataFrame) -> str:
    """'answered 144 of 1440 questions (pope/random 144/480, pope/popular 0/480)' for the short splits."""
    short = incomplete(table)
    parts = [f"{row.benchmark}/{row.split} {row.answered}/{row.expected}" for row in short.itertuples()]
    return (f"answered {int(table['answered'].sum())} of {int(table['expected'].sum())} questions"
            + (f" ({', '.join(parts)})" if parts else ""))


def drop_means(metrics: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Metric rows (METRIC_SCHEMA) without the averages over splits that an incomplete split would enter:
    a POPE dataset's mean (its "overall" row; other datasets keep theirs), MileBench's levels, groups and
    overall score."""
    if metrics.empty:
        return metrics
    keep = pd.Series(True, index=metrics.index)
    short_pope = {dataset_split(split)[0] for split in incomplete(table, "pope")["split"]}
    means = {qualified_split(dataset, "mean") for dataset in short_pope}
    keep &= ~((metrics["benchmark"] == "pope") & metrics["scope"].isin(AGGREGATE_SCOPES["pope"])
              & metrics["name"].isin(means))
    if len(incomplete(table, "milebench")):
        keep &= ~((metrics["benchmark"] == "milebench") & metrics["scope"].isin(AGGREGATE_SCOPES["milebench"]))
    return metrics[keep]


def metric_rows(run_id: str, table: pd.DataFrame) -> list[dict]:
    """The coverage as METRIC_SCHEMA rows (scope "coverage"), so the metrics parquet carries it."""
    rows = []
    for row in table.itertuples():
        for metric in ("answered", "expected"):
            value = int(getattr(row, metric))
            rows.append({"run_id": run_id, "benchmark": row.benchmark, "scope": "coverage", "name": row.split,
                         "metric": metric, "value": float(value), "n": value})
    return rows


def from_metric_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    """The coverage table back from a metrics parquet's "coverage" rows (empty when it has none)."""
    rows = metrics[metrics["scope"] == "coverage"]
    if rows.empty:
        return pd.DataFrame(columns=COLUMNS)
    wide = rows.pivot_table(index=["benchmark", "name"], columns="metric", values="n", aggfunc="last")
    wide = wide.reset_index().rename(columns={"name": "split"})
    return wide.reindex(columns=COLUMNS).fillna(0).astype({"answered": int, "expected": int})
