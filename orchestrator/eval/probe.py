"""The sweep's objective during training: a fixed POPE subset scored by the training workers themselves.

A Tune scheduler (ASHA, median stopping) must compare trials on what HA-DPO is judged on, while they
train. Three ways were possible: evaluation actors between training chunks (a restart of the trainer and
a model load per chunk), a callback that ships checkpoints to an evaluation actor (a second model in
memory per trial), or scoring a small fixed subset with the model the workers already hold. This is the
third: every `tune.eval_every_steps` optimizer steps, each training worker scores its share of the
subset with the in-memory policy (LoRA unmerged, dropout off, no gradients) through the same adapter and
prompts the evaluation actors use (`VisionLanguageModel.from_loaded`, score mode: p(yes) from the "Yes"/"No"
logits, "Yes" when >= 0.5), rank 0 gathers the answers and scores them with `pope.summarise`, and the
result travels with that step's `ray.train.report` to Tune. The final objective comes from the full POPE
evaluation after training (`orchestrator.tune.run_trial`).

Limits, stated: the probe always scores (even when `eval.mode` is generate), in the training precision
(bf16 autocast on GPU) rather than the evaluation actor's, and with the adapter unmerged: its numbers can
differ from a full evaluation of the same questions in the last digits. Every rank runs the same number
of forward passes (ZeRO-3 gathers weights collectively), padding its share by repeating a question.

Pure parts (`select_probe_questions`, `objective_of`) are tested by hand; `score_probe` runs in the
training loop (tests/pipeline/test_tune.py).
"""

from __future__ import annotations

import math
import random
from typing import Any, Sequence

import pandas as pd

from orchestrator.eval import pope
from orchestrator.images import load_image

YES_RATIO_GAP = "yes_ratio_gap"  # |yes-ratio - 0.5|: how far the model is from POPE's balanced 50 % yes


OBJECTIVE_FORMS = ("pope/<split>/<accuracy|precision|recall|f1|yes_ratio|yes_ratio_gap> (e.g. pope/adversarial/f1, "
                   "pope/adversarial/yes_ratio_gap) or pope/mean_f1")


def objective_of(values: dict[str, float], metric: str) -> float:
    """The objective `metric` from `pope.objective_values`: a reported value, or a split's yes-ratio gap."""
    if metric in values:
        return float(values[metric])
    head, _, last = metric.rpartition("/")
    if last == YES_RATIO_GAP and f"{head}/yes_ratio" in values:
        return abs(float(values[f"{head}/yes_ratio"]) - 0.5)
    raise KeyError(f"objective {metric!r} is not among the POPE results ({', '.join(sorted(values)) or 'none'}); "
                   f"expected {OBJECTIVE_FORMS}")


def select_probe_questions(rows: Sequence[dict], per_split: int, seed: int) -> list[dict]:
    """A fixed, label-balanced subset: per split, `per_split` questions (half yes, half no where the split has
    them), drawn with `random.Random(seed)` from the questions sorted by id. Same rows and seed -> same subset,
    so every trial of a sweep is probed on the same questions."""
    chosen: list[dict] = []
    for split in sorted({str(row["split"]) for row in rows}):
        mine = sorted((row for row in rows if str(row["split"]) == split), key=lambda row: str(row["question_id"]))
        rng = random.Random(f"{seed}/{split}")
        by_label = {label: [row for row in mine if row["label"] == label] for label in pope.LABELS}
        half = per_split // 2
        picked = []
        for label, quota in (("yes", per_split - half), ("no", half)):
            pool = by_label[label]
            picked += rng.sample(pool, min(quota, len(pool)))
        short = per_split - len(picked)
        if short > 0:  # a split with too few of one label: top up from the other
            rest = [row for row in mine if row not in picked]
            picked += rng.sample(rest, min(short, len(rest)))
        chosen += sorted(picked, key=lambda row: str(row["question_id"]))
    return chosen


def probe_values(answers: pd.DataFrame) -> dict[str, float]:
    """POPE objective values of the probe's answers (columns split, label, answer), as `pope.objective_values`."""
    return pope.objective_values(pope.summarise(answers))


def score_probe(scorer, rows: Sequence[dict], rank: int, world: int, batch_size: int) -> pd.DataFrame | None:
    """Score this rank's share of `rows` (rows[rank::world]) and gather all answers on rank 0.

    `scorer`: a `VisionLanguageModel` (see `VisionLanguageModel.from_loaded`). Every rank runs the same number of
    batches (padded by repeating its first question; the repeats are dropped). Returns the answers (split, label,
    answer, p_yes) on rank 0, None elsewhere. Call on every rank, in eval mode and without gradients.
    """
    import torch.distributed as dist


    mine = list(rows[rank::world])
    batches = math.ceil(math.ceil(len(rows) / world) / batch_size)
    padded = mine + [mine[0] if mine else rows[0]] * (batches * batch_size - len(mine))
    answered: list[dict[str, Any]] = []
    for index in range(batches):
        batch = padded[index * batch_size:(index + 1) * batch_size]
        images = [[load_image(row["image"])] for row in batch]
        p_yes = scorer.score_yes_no([row["question"] for row in batch], [[row["image"]] for row in batch],
                                    images=images)
        for position, (row, p) in enumerate(zip(batch, p_yes)):
            if index * batch_size + position < len(mine):
                answered.append({"split": row["split"], "question_id": row["question_id"], "label": row["label"],
                                 "answer": "yes" if p >= 0.5 else "no", "p_yes": float(p)})
    if world > 1 and dist.is_initialized():
        gathered: list[list[dict]] | None = [[] for _ in range(world)] if rank == 0 else None
        dist.gather_object(answered, gathered, dst=0)
        if rank != 0:
            return None
        answered = [row for part in gathered for row in part]
    return pd.DataFrame(answered)
