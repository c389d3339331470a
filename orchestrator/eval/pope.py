"""POPE scoring: answer parsing and metrics, as pure functions.

The parsing rule is POPE's own (``evaluate.py`` in AoiDragon/POPE, copied by LLaVA's
``eval_pope.py``): take the text before the first '.', remove commas, split on spaces; if any word
is exactly ``No``, ``not`` or ``no`` the answer is "no", otherwise "yes". Two things differ from
those scripts, on purpose:

* special tokens (``</s>``, ``<unk>``, ...) are stripped first, so a raw ``No</s>`` is "no";
* answers are paired with labels by ``question_id`` (`join_labels`), never by line order.

The rule has known quirks that we keep, because published numbers depend on them: "Yes, no doubt."
is "no" (it holds the word "no"), "NO" is "yes" (only the exact spellings count) and an answer with
neither word ("There is a cat.") is "yes". `has_yes_no_word` lets a report count the last kind.

Metrics take "yes" as the positive class: precision TP/(TP+FP), recall TP/(TP+FN), F1 2PR/(P+R),
accuracy (TP+TN)/N, and yes-ratio = share of *predicted* yes. Divisions by zero give 0.0.

Several POPE datasets (COCO, A-OKVQA, GQA, ...: ``data.pope.datasets``) are scored apart, each split of
each dataset on its own and each dataset with its own mean row. A split's name in answers, metrics and
sweep objectives is `qualified_split`: the bare split for the dataset named "coco" (the single form of
``data.pope``, as before), ``<dataset>/<split>`` for any other; `dataset_split` reads it back.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import pandas as pd

from orchestrator.data.schema import POPE_DEFAULT_DATASET, POPE_SPLITS

LABELS = ("yes", "no")
NO_WORDS = ("No", "not", "no")
# The metrics of a split (fractions, "yes" is the positive class), its confusion counts, and the counts of
# items left out of the metrics (errors) or parsed by default (no yes/no word): every name a POPE metric row
# (`orchestrator.eval.results.pope_metric_rows`), a summary table and a report column use.
METRIC_COLUMNS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
COUNT_COLUMNS = ("TP", "FP", "TN", "FN")
ITEM_COUNT_COLUMNS = ("n_errors", "n_unparsable")

# Special tokens of the tokenizers we meet (LLaMA/Vicuna, GPT-style, chat templates) and the image
# placeholder; `<|...|>` tokens of any name are stripped too.
SPECIAL_TOKENS = ("</s>", "<s>", "<unk>", "<pad>", "<image>", "<eos>", "<bos>", "<mask>")
_SPECIAL = re.compile("|".join([re.escape(t) for t in SPECIAL_TOKENS] + [r"<\|[^<>|]*\|>"]))
_WORD = re.compile(r"[A-Za-z]+")


def strip_special_tokens(text: str | None, extra: Iterable[str] = ()) -> str:
    """`text` without special tokens (and any in `extra`), with surrounding whitespace removed."""
    if text is None:
        return ""
    text = _SPECIAL.sub("", str(text))
    for token in extra:
        if token:
            text = text.replace(token, "")
    return text.strip()


def parse_yes_no(text: str | None) -> str:
    """POPE's rule: "no" if a word before the first '.' is exactly No / not / no, else "yes".

    >>> parse_yes_no("No, there is not.")
    'no'
    >>> parse_yes_no("Yes, there is a dog. It is not small.")
    'yes'
    """
    text = strip_special_tokens(text)
    text = text.split(".", 1)[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(word in NO_WORDS for word in words) else "yes"


def has_yes_no_word(text: str | None) -> bool:
    """Whether the answer says yes or no at all (a word yes / no / not, any case, anywhere).

    POPE's rule counts an answer with neither as "yes"; reports count these separately.
    """
    words = {word.lower() for word in _WORD.findall(strip_special_tokens(text))}
    return bool(words & {"yes", "no", "not"})


def _safe_div(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else 0.0


def pope_metrics(labels: Sequence[str], predictions: Sequence[str]) -> dict:
    """Confusion counts and metrics of parsed answers against labels (both "yes"/"no", same order).

    Returns TP, FP, TN, FN, n and precision, recall, f1, accuracy, yes_ratio as fractions in [0, 1].
    """
    labels = [str(label).strip().lower() for label in labels]
    predictions = [str(prediction).strip().lower() for prediction in predictions]
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    for name, values in (("label", labels), ("prediction", predictions)):
        bad = sorted({value for value in values if value not in LABELS})
        if bad:
            raise ValueError(f"every {name} must be 'yes' or 'no', got {bad[:5]}")
    tp = sum(1 for y, p in zip(labels, predictions) if y == "yes" and p == "yes")
    fp = sum(1 for y, p in zip(labels, predictions) if y == "no" and p == "yes")
    tn = sum(1 for y, p in zip(labels, predictions) if y == "no" and p == "no")
    fn = sum(1 for y, p in zip(labels, predictions) if y == "yes" and p == "no")
    n = len(labels)
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, tp + fn)
    return {
        "TP": tp, "FP": fp, "TN": tn, "FN": fn, "n": n,
        "precision": precision,
        "recall": recall,
        "f1": _safe_div(2 * precision * recall, precision + recall),
        "accuracy": _safe_div(tp + tn, n),
        "yes_ratio": _safe_div(tp + fp, n),
    }


def join_labels(answers: pd.DataFrame, questions: pd.DataFrame) -> pd.DataFrame:
    """Answers joined with their questions' labels on question_id (and split, when both have it).

    `answers` needs ``question_id`` and ``answer`` (raw text); `questions` needs ``question_id`` and
    ``label``. An answer whose id has no question is an error; questions without an answer are
    dropped (the caller can compare lengths). Adds ``prediction`` (parsed) and ``has_yes_no``.
    """
    keys = ["question_id"]
    if "split" in answers.columns and "split" in questions.columns:
        keys = ["split", "question_id"]
    for name, frame, needed in (("answers", answers, keys + ["answer"]), ("questions", questions, keys + ["label"])):
        missing = [column for column in needed if column not in frame.columns]
        if missing:
            raise ValueError(f"{name}: missing column(s) {missing}")
        duplicated = frame.duplicated(subset=keys)
        if duplicated.any():
            first = frame.loc[duplicated, keys].iloc[0].to_dict()
            raise ValueError(f"{name}: {int(duplicated.sum())} duplicated {keys}, e.g. {first}")
    merged = answers.merge(questions[keys + ["label"]], on=keys, how="left", suffixes=("_answer", ""),
                           indicator=True)
    orphans = merged["_merge"] == "left_only"
    if orphans.any():
        example = merged.loc[orphans, keys].iloc[0].to_dict()
        raise ValueError(f"{int(orphans.sum())} answers have no question with the same {keys}, e.g. {example}")
    merged = merged.drop(columns="_merge")
    merged["prediction"] = [parse_yes_no(text) for text in merged["answer"]]
    merged["has_yes_no"] = [has_yes_no_word(text) for text in merged["answer"]]
    return merged


def qualified_split(dataset: str, split: str) -> str:
    """A POPE split's name in answers, metrics and sweep objectives: ``random`` for the dataset named
    "coco" (POPE_DEFAULT_DATASET), ``gqa/random`` for any other dataset."""
    return split if dataset == POPE_DEFAULT_DATASET else f"{dataset}/{split}"


def dataset_split(name: str) -> tuple[str, str]:
    """`qualified_split` read back: "gqa/random" -> ("gqa", "random"), "random" -> ("coco", "random")."""
    dataset, sep, split = str(name).partition("/")
    return (dataset, split) if sep else (POPE_DEFAULT_DATASET, str(name))


def split_sort_key(split: str) -> tuple[int, str]:
    """random, popular, adversarial first (POPE's order), other splits by name."""
    return (POPE_SPLITS.index(split), split) if split in POPE_SPLITS else (len(POPE_SPLITS), split)


def dataset_sort_key(dataset: str) -> tuple[bool, str]:
    """The dataset named "coco" first, the others by name."""
    return (dataset != POPE_DEFAULT_DATASET, dataset)


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per-dataset, per-split metrics of answered POPE rows, with a ``mean`` row per dataset.

    `df` needs ``split`` (a `qualified_split` name: the dataset is read from it), ``label`` and either
    ``answer`` (parsed "yes"/"no") or ``raw_answer`` (parsed here). Optional ``error`` (non-empty = the
    item failed: excluded from the metrics and counted in ``n_errors``), ``raw_answer`` (used for
    ``n_unparsable``: answers with neither a yes nor a no word) and ``version`` (the question file's
    version, carried into the table). Rows come out with ``dataset`` and the bare ``split``; each
    dataset's mean row averages each metric over its splits (its f1 is the "mean F1" that LLaVA-1.5 and
    HA-DPO report) and sums its counts.
    """
    columns = ["dataset", "split", "n", *COUNT_COLUMNS, *METRIC_COLUMNS, *ITEM_COUNT_COLUMNS, "version"]
    if df is None or len(df) == 0:
        return pd.DataFrame(columns=columns)
    frame = df.copy()
    if "error" not in frame.columns:
        frame["error"] = ""
    frame["error"] = frame["error"].fillna("").astype(str)
    if "answer" not in frame.columns:
        frame["answer"] = [parse_yes_no(text) for text in frame["raw_answer"]]
    raw = frame["raw_answer"] if "raw_answer" in frame.columns else frame["answer"]
    frame["_unparsable"] = [not has_yes_no_word(text) for text in raw]
    frame["_dataset"], frame["_split"] = zip(*(dataset_split(name) for name in frame["split"]))
    if "version" not in frame.columns:
        frame["version"] = ""
    tables = []
    for dataset in sorted(frame["_dataset"].unique(), key=dataset_sort_key):
        mine = frame[frame["_dataset"] == dataset]
        rows = []
        for split in sorted(mine["_split"].unique(), key=split_sort_key):
            part = mine[mine["_split"] == split]
            ok = part[part["error"] == ""]
            metrics = pope_metrics(list(ok["label"]), list(ok["answer"]))
            versions = sorted({str(v) for v in part["version"].fillna("") if str(v)})
            rows.append({"dataset": dataset, "split": split, **metrics, "n_errors": int((part["error"] != "").sum()),
                         "n_unparsable": int(ok["_unparsable"].sum()), "version": ", ".join(versions)})
        table = pd.DataFrame(rows)
        mean = {"dataset": dataset, "split": "mean", "version": ""}
        for column in columns[2:-1]:
            mean[column] = float(table[column].mean()) if column in METRIC_COLUMNS else int(table[column].sum())
        tables += [table, pd.DataFrame([mean])]
    return pd.concat(tables, ignore_index=True)[columns]


def mean_f1(table: pd.DataFrame, dataset: str | None = None) -> float:
    """Mean F1 over the splits of `dataset` in a `summarise` table (None: over every split row of every
    dataset, which is the dataset's own mean F1 when there is one); NaN when there is none."""
    splits = table[table["split"] != "mean"]
    if dataset is not None and "dataset" in splits.columns:
        splits = splits[splits["dataset"] == dataset]
    return float(splits["f1"].mean()) if len(splits) else math.nan


def objective_name(dataset: str, split: str, metric: str) -> str:
    """A sweep objective's name: ``pope/adversarial/f1`` (coco), ``pope/gqa/adversarial/f1`` (split "mean":
    the dataset's mean row)."""
    return f"pope/{qualified_split(dataset, split)}/{metric}"


def mean_f1_name(dataset: str) -> str:
    """The objective holding a dataset's mean F1: ``pope/mean_f1`` (coco), ``pope/gqa/mean_f1``."""
    return "pope/mean_f1" if dataset == POPE_DEFAULT_DATASET else f"pope/{dataset}/mean_f1"


def objective_names(splits_by_dataset: dict[str, Sequence[str]]) -> list[str]:
    """Every objective name a run of these datasets and splits reports (`objective_values`' keys)."""
    names = []
    for dataset, splits in splits_by_dataset.items():
        names += [objective_name(dataset, split, metric) for split in [*splits, "mean"] for metric in METRIC_COLUMNS]
        names.append(mean_f1_name(dataset))
    return names


def objective_values(table: pd.DataFrame) -> dict[str, float]:
    """A `summarise` table as sweep objectives: the five metrics of every split and mean row, and each
    dataset's mean F1 under `mean_f1_name` too."""
    values = {}
    for record in table.to_dict("records"):
        dataset = record.get("dataset", POPE_DEFAULT_DATASET)
        for metric in METRIC_COLUMNS:
            values[objective_name(dataset, record["split"], metric)] = float(record[metric])
        if record["split"] == "mean":
            values[mean_f1_name(dataset)] = float(record["f1"])
    return values


def answer_agreement(left: pd.DataFrame, right: pd.DataFrame, column: str = "answer",
                     keys: Sequence[str] = ("split", "item_id")) -> dict:
    """How often two answer sets of the same questions agree, on the questions both answered.

    Rows are joined on `keys`; error rows (non-empty ``error``) of either side are left out. Returns
    ``n`` (questions in common), ``same`` (equal `column`: ``answer`` compares the parsed yes/no,
    ``raw_answer`` the text), ``share_same`` and ``share_different`` (fractions of n; NaN when n is 0).
    Used for score vs generate mode, and for prefix-reused vs plain decoding.
    """
    def usable(frame: pd.DataFrame) -> pd.DataFrame:
        missing = [name for name in (*keys, column) if name not in frame.columns]
        if missing:
            raise ValueError(f"answers: missing column(s) {missing}")
        ok = frame["error"].fillna("").astype(str) == "" if "error" in frame.columns else pd.Series(True, frame.index)
        part = frame.loc[ok, [*keys, column]].astype({key: str for key in keys})
        return part.drop_duplicates(subset=list(keys), keep="last")

    merged = usable(left).merge(usable(right), on=list(keys), suffixes=("_left", "_right"))
    n = len(merged)
    same = int((merged[f"{column}_left"].astype(str) == merged[f"{column}_right"].astype(str)).sum())
    return {"n": n, "same": same, "share_same": same / n if n else math.nan,
            "share_different": (n - same) / n if n else math.nan}
