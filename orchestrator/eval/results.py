"""How evaluation results are stored, and how a run resumes.

Layout, under the experiment's run directory (`orchestrator.layout` names these paths)::

    <run_dir>/eval/<run_id>/run.json          what the run evaluates (model, adapter, decoding, versions)
    <run_dir>/eval/<run_id>/answers/*.parquet one row per answered item (ANSWER_SCHEMA), one file per block
    <run_dir>/eval/<run_id>/metrics.parquet   one row per metric (METRIC_SCHEMA)

`run_id` is a deterministic hash of (model path, adapter path, mode, decoding settings,
question-file versions), so running the same evaluation again lands in the same folder and resumes:
items whose key (benchmark, split, item_id) already has an answer are not computed again.

Every file is written atomically: to a hidden temporary name in the same folder, then
`os.replace`, so a killed process leaves either a whole file or none (stray ``.tmp`` files are
ignored). An answer block's file name is a hash of its item keys (`block_name`), so a block that
Ray retries replaces its own file. Reading still deduplicates on the key, preferring rows without an
error, so no answer is ever counted twice whatever happened.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.data.schema import POPE_DEFAULT_DATASET
from orchestrator.eval import pope
from orchestrator.files import atomic_write

KEY = ("benchmark", "split", "item_id")

ANSWER_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("model", pa.string()),
    ("adapter", pa.string()),
    ("benchmark", pa.string()),          # "pope" | "milebench"
    ("split", pa.string()),              # POPE split or MileBench task
    ("item_id", pa.string()),            # POPE question_id / MileBench sample_id, as text
    ("images", pa.list_(pa.string())),   # the images the model saw (MileBench: after truncation)
    ("question", pa.string()),           # the question as the model saw it (suffix, truncation applied)
    ("label", pa.string()),              # POPE "yes"/"no"; MileBench reference response
    ("raw_answer", pa.string()),         # decoded answer, special tokens stripped
    ("answer", pa.string()),             # POPE: parsed "yes"/"no"; MileBench: the raw answer
    ("p_yes", pa.float64()),             # score mode: softmax over Yes/No logits; NaN otherwise
    ("error", pa.string()),              # "" when the item was answered
    ("mode", pa.string()),               # "score" | "generate" (what was done for this item)
    ("decoding", pa.string()),           # JSON of the decoding settings
    ("batch_size", pa.int64()),          # items in the model batch that answered this one
    ("version", pa.string()),            # question-file version
    ("question_type", pa.string()),
    ("choice_list", pa.list_(pa.string())),
    ("image_quantity_level", pa.string()),
    ("prompt_tokens", pa.int64()),
])
ANSWER_COLUMNS = tuple(ANSWER_SCHEMA.names)

METRIC_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("benchmark", pa.string()),
    ("scope", pa.string()),     # split | task | task_level | level | group | overall | counts
    ("name", pa.string()),
    ("metric", pa.string()),
    ("value", pa.float64()),
    ("n", pa.int64()),
])


def pope_metric_rows(run_id: str, table: pd.DataFrame) -> list[dict]:
    """One row per metric of each split (scope "split") and each dataset's mean (scope "overall"), named by
    `pope.qualified_split` ("adversarial", "mean"; "gqa/adversarial", "gqa/mean")."""
    rows = []
    for record in table.to_dict("records"):
        name = pope.qualified_split(str(record.get("dataset", POPE_DEFAULT_DATASET)), str(record["split"]))
        for metric in (*pope.METRIC_COLUMNS, *pope.COUNT_COLUMNS, *pope.ITEM_COUNT_COLUMNS):
            rows.append({"run_id": run_id, "benchmark": "pope", "scope": "split" if record["split"] != "mean"
                         else "overall", "name": name, "metric": metric,
                         "value": float(record[metric]), "n": int(record["n"])})
    return rows


def milebench_metric_rows(run_id: str, table: pd.DataFrame) -> list[dict]:
    """Two rows per `milebench.summarise` row: its score (the task's own metric, or "score") and its error count."""
    rows = []
    for record in table.to_dict("records"):
        rows.append({"run_id": run_id, "benchmark": "milebench", "scope": record["scope"], "name": record["name"],
                     "metric": record["metric"], "value": float(record["value"]), "n": int(record["n"])})
        rows.append({"run_id": run_id, "benchmark": "milebench", "scope": record["scope"], "name": record["name"],
                     "metric": "n_errors", "value": float(record["n_errors"]), "n": int(record["n"])})
    return rows


def compute_run_id(model_path: str, adapter_path: str | None, mode: str, decoding: dict,
                   versions: dict | Sequence, tag: str = "") -> str:
    """Deterministic id of an evaluation: 16 hex digits of a sha256, prefixed by `tag` if given."""
    blob = json.dumps({
        "model": str(model_path), "adapter": str(adapter_path or ""), "mode": mode,
        "decoding": decoding, "versions": versions,
    }, sort_keys=True, default=str).encode()
    digest = hashlib.sha256(blob).hexdigest()[:16]
    return f"{tag}-{digest}" if tag else digest


def to_answer_table(rows: Sequence[dict] | pa.Table | pd.DataFrame) -> pa.Table:
    """Rows (dicts, a DataFrame or a table) as a table of exactly ANSWER_SCHEMA."""
    if isinstance(rows, pa.Table):
        return rows.select(list(ANSWER_COLUMNS)).cast(ANSWER_SCHEMA)
    if isinstance(rows, pd.DataFrame):
        rows = rows.to_dict("records")
    return pa.Table.from_pylist([{name: row.get(name) for name in ANSWER_COLUMNS} for row in rows],
                                schema=ANSWER_SCHEMA)


def block_name(run_id: str, keys: Iterable[tuple[str, str, str]]) -> str:
    """A file name stem that depends only on the run and the block's item keys.

    A retried block gets the same name, so its file replaces the earlier one instead of adding a
    duplicate.
    """
    blob = "\n".join([run_id] + sorted("\t".join(key) for key in keys)).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def write_answers(table: pa.Table | Sequence[dict], directory: str | Path, prefix: str = "part",
                  name: str | None = None) -> Path | None:
    """Write one block of answers atomically; None for an empty block.

    The file is ``<prefix>-<name>.parquet`` when `name` is given (see `block_name`), else
    ``<prefix>-<time ns>-<random>.parquet``.
    """
    table = to_answer_table(table)
    if table.num_rows == 0:
        return None
    stem = name or f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
    path = Path(directory) / f"{prefix}-{stem}.parquet"
    return atomic_write(path, lambda temp: pq.write_table(table, temp))


def answer_files(directory: str | Path) -> list[Path]:
    """Finished answer files (temporary files of interrupted writes are ignored), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    files = [p for p in directory.glob("*.parquet") if not p.name.startswith(".")]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))


def read_answers(directory: str | Path, dedupe: bool = True) -> pd.DataFrame:
    """Every answer row of a run as a DataFrame; with `dedupe`, one row per key.

    Among duplicates an error-free row wins, then the earliest written.
    """
    files = answer_files(directory)
    if not files:
        return ANSWER_SCHEMA.empty_table().to_pandas()
    table = pa.concat_tables([pq.read_table(path).select(list(ANSWER_COLUMNS)).cast(ANSWER_SCHEMA)
                              for path in files])
    frame = table.to_pandas()
    if dedupe and len(frame):
        frame["_failed"] = frame["error"].fillna("") != ""
        frame["_order"] = range(len(frame))
        frame = frame.sort_values(["_failed", "_order"], kind="stable")
        frame = frame.drop_duplicates(subset=list(KEY), keep="first")
        frame = frame.sort_values("_order", kind="stable").drop(columns=["_failed", "_order"])
        frame = frame.reset_index(drop=True)
    return frame


def answered_keys(directory: str | Path, include_errors: bool = True) -> set[tuple[str, str, str]]:
    """Keys (benchmark, split, item_id) that already have an answer (error rows too, by default)."""
    files = answer_files(directory)
    keys: set[tuple[str, str, str]] = set()
    for path in files:
        table = pq.read_table(path, columns=list(KEY) + ["error"])
        columns = [table.column(name).to_pylist() for name in KEY]
        errors = table.column("error").to_pylist()
        for benchmark, split, item_id, error in zip(*columns, errors):
            if include_errors or not error:
                keys.add((str(benchmark), str(split), str(item_id)))
    return keys


def item_key(row: dict) -> tuple[str, str, str]:
    return (str(row["benchmark"]), str(row["split"]), str(row["item_id"]))


def anti_join(items: Iterable[dict], done: set[tuple[str, str, str]]) -> list[dict]:
    """The items whose key is not in `done` (order kept)."""
    return [item for item in items if item_key(item) not in done]


def write_metrics(rows: Sequence[dict], path: str | Path) -> Path:
    """Write metric rows (METRIC_SCHEMA) atomically."""
    table = pa.Table.from_pylist([{name: row.get(name) for name in METRIC_SCHEMA.names} for row in rows],
                                 schema=METRIC_SCHEMA)
    return atomic_write(Path(path), lambda temp: pq.write_table(table, temp))


def read_metrics(path: str | Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()
