"""Evaluation items: POPE and MileBench rows turned into the one row shape the `Predictor` actors answer.

ITEM_SCHEMA (benchmark, split, item_id, images, question or instruction/context/choices, label,
version, run_id) lets one actor pool answer both benchmarks, and several runs at once (`run_id`). The
`as_*` helpers read a column's value as Ray Data and pandas hand it over (numpy arrays, NaN for a
missing value).
"""

from __future__ import annotations

import math
from typing import Sequence

import pyarrow as pa

ITEM_SCHEMA = pa.schema([
    ("benchmark", pa.string()),
    ("split", pa.string()),
    ("item_id", pa.string()),
    ("images", pa.list_(pa.string())),
    ("question", pa.string()),           # POPE question ("" for MileBench)
    ("instruction", pa.string()),        # MileBench
    ("context", pa.string()),            # MileBench, with {image#k} placeholders
    ("choice_list", pa.list_(pa.string())),
    ("has_choice_list", pa.bool_()),     # MileBench: the sample has a choice_list key (even an empty one)
    ("label", pa.string()),
    ("question_type", pa.string()),
    ("image_quantity_level", pa.string()),
    ("version", pa.string()),
    ("run_id", pa.string()),             # the evaluation the row belongs to ("": the settings' own run)
])
ITEM_COLUMNS = tuple(ITEM_SCHEMA.names)


def as_list(value) -> list[str]:
    """A list column's value (list, tuple, numpy array, None) as a list of strings."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        return [value]
    return [str(item) for item in list(value)]


def as_flag(value, default: bool) -> bool:
    """A boolean column's value (bool, numpy bool; None or NaN: `default`)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    return bool(value)


def as_text(value) -> str:
    """A string column's value (None or NaN: "")."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def pope_items(rows: Sequence[dict]) -> list[dict]:
    """POPE rows (POPE_COLUMNS) as evaluation items."""
    return [{
        "benchmark": "pope", "split": as_text(row["split"]), "item_id": as_text(row["question_id"]),
        "images": as_list(row.get("image") or None), "question": as_text(row.get("question")),
        "instruction": "", "context": "", "choice_list": [], "has_choice_list": False,
        "label": as_text(row.get("label")),
        "question_type": "yes-no", "image_quantity_level": "few", "version": as_text(row.get("version")),
    } for row in rows]


def milebench_items(rows: Sequence[dict], versions: dict[str, str] | None = None) -> list[dict]:
    """MileBench rows (MILEBENCH_COLUMNS) as evaluation items; `versions` maps task -> file version.

    A row without ``has_choice_list`` (not from our reader) has a choice list when it has options.
    """
    versions = versions or {}
    return [{
        "benchmark": "milebench", "split": as_text(row["task"]), "item_id": as_text(row["sample_id"]),
        "images": as_list(row.get("images")), "question": "",
        "instruction": as_text(row.get("instruction")), "context": as_text(row.get("context")),
        "choice_list": as_list(row.get("choice_list")),
        "has_choice_list": as_flag(row.get("has_choice_list"), default=bool(as_list(row.get("choice_list")))),
        "label": as_text(row.get("response")),
        "question_type": as_text(row.get("question_type")) or "open-ended",
        "image_quantity_level": as_text(row.get("image_quantity_level")).lower(),
        "version": as_text(row.get("version")) or versions.get(as_text(row["task"]), ""),
    } for row in rows]


def items_table(items: Sequence[dict]) -> pa.Table:
    return pa.Table.from_pylist([{name: item.get(name) for name in ITEM_COLUMNS} for item in items],
                                schema=ITEM_SCHEMA)
