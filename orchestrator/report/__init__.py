"""The report: tables and figures from the files runs left behind (`hadpo report`, `hadpo demo`, model cards).

Nothing is recomputed that a stage already wrote. All POPE values are percent with two decimals, deltas in
percentage points; they are the metrics parquet's values times 100, rounded, nothing else. With several DPO
seeds, "after" is the mean ± sample standard deviation (ddof=1) over the seeds and "spread" is max − min.
The published HA-DPO numbers (LLaVA-1.5-7B, from the HA-DPO README) are shown as labelled reference rows,
never mixed into our numbers, and only beside the COCO set they were measured on. Several POPE datasets
(``data.pope.datasets``) get a table, a figure and a seed table each; the metric names say which dataset a
split belongs to (`orchestrator.eval.pope.dataset_split`: "random" is COCO's, "gqa/random" GQA's), and each
table names its question files' versions (``run.json``).

- `load`: `load_run`, a run folder read back through `orchestrator.layout` into `RunData` (evaluations,
  curves, trials, run record), and what it does with moved or half-finished runs.
- `tables`: the numeric tables (fractions), and the published HA-DPO numbers.
- `render`: number formats (`pct`, `pp`), `Table` and the `Document` rendered to HTML and Markdown.
- `figures`: the PNGs (matplotlib, imported when a figure is drawn).
- `build`: `build_report` and `run_summary_markdown`, which put the sections together.
"""

from orchestrator.report.build import ReportResult, build_report, run_summary_markdown, tracking_pointers
from orchestrator.report.figures import (plot_comparison, plot_curves, plot_milebench, plot_pope_bars, plot_sweep,
                                         plot_sweep_parallel)
from orchestrator.report.load import Curve, Evaluation, RunData, load_run
from orchestrator.report.render import Table, pct, pct_pm, pp
from orchestrator.report.tables import (PUBLISHED_LABEL, PUBLISHED_MODEL, PUBLISHED_POPE, comparison_table,
                                        config_differences, final_curve_values, milebench_results, pope_datasets,
                                        pope_frame, pope_results, pope_summary, question_versions,
                                        score_generate_disagreement, sweep_objective)

__all__ = ["build_report", "run_summary_markdown", "ReportResult", "RunData", "Evaluation", "Curve", "load_run",
           "pope_frame", "pope_results", "pope_summary", "pope_datasets", "question_versions", "milebench_results",
           "final_curve_values", "comparison_table", "config_differences", "score_generate_disagreement",
           "sweep_objective", "tracking_pointers", "Table", "pct", "pp", "pct_pm", "plot_pope_bars", "plot_curves",
           "plot_sweep", "plot_sweep_parallel", "plot_milebench", "plot_comparison", "PUBLISHED_POPE",
           "PUBLISHED_LABEL", "PUBLISHED_MODEL"]
