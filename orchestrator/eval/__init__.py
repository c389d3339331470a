"""Evaluation: POPE and MileBench on Ray Data actors, resumable, with metrics as pure functions.

- `pope`: POPE's answer parsing, metrics and metric names (pure).
- `milebench`: MileBench prompts and scores (pure).
- `model_adapter`: the model every evaluation calls (`MileBenchModel` interface, `VisionLanguageModel`).
- `items`: POPE and MileBench rows as evaluation items, one row shape for both.
- `predictor`: the Ray Data actor that answers items, and `predict`, its actor pool.
- `pixels`: the CPU stage before the actors that decodes POPE's images (prefix reuse).
- `prefix_cache`: POPE with each image's prefix computed once and its KV cache reused.
- `results`: the parquet answer store (atomic writes, resume, dedupe), run ids and metric rows.
- `completeness`: answered against expected questions per split; means left out when a split is short.
- `probe`: a sweep's objective measured by the training workers on a fixed POPE subset.
- `runner`: `run_eval`, the stage's entry point, `run_evals` (several models, one actor pool), and the
  printed tables.
"""

from orchestrator.eval.pope import has_yes_no_word, parse_yes_no, pope_metrics, summarise

__all__ = ["parse_yes_no", "has_yes_no_word", "pope_metrics", "summarise", "run_eval", "run_evals",
           "EvalRequest", "format_pope_table", "EvalResult"]


def __getattr__(name):  # lazy: importing the package must not pull in Ray or torch
    if name in ("run_eval", "run_evals", "EvalRequest", "format_pope_table", "EvalResult"):
        from orchestrator.eval import runner

        return getattr(runner, name)
    raise AttributeError(name)
