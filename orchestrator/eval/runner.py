"""`run_eval`: POPE and MileBench for one model (+ optional LoRA adapter), resumable, on Ray actors;
`run_evals`: several models (the base and each DPO adapter of a run) through one actor pool.

Read top to bottom, a run is:

1. **questions**: POPE and MileBench rows from the config's files (or the synthetic world) through
   `orchestrator.data.datasets`, whose image check sets aside rows whose images do not open
   (they become error rows here, with the reason), turned into one item shape;
2. **run id**: a hash of (model path, adapter path, mode, decoding settings, question-file
   versions); results go to ``<run_dir>/eval/<run_id>/``;
3. **resume**: items that already have an answer there are skipped (anti-join on benchmark,
   split, item id);
4. **inference**: the rest go, sorted by length (POPE with ``eval.prefix_reuse``, LLaVA-1.5 or LLaVA-NeXT,
   in score and generate mode: grouped by image, whole images per block) and cut into blocks, through a pool of
   `Predictor` actors (`cfg.eval.num_actors`, each with `cpus_per_actor` / `gpus_per_actor` /
   `resources_per_actor`);
   each actor writes every block it finishes atomically as a parquet file (named by the block's
   keys, so a retried block replaces its file); the driver logs progress and ETA;
   `run_evals` queues several evaluations' blocks one evaluation after the other (each row carries its run id)
   through one pool, whose actors load the next model when its first block comes: the actor's imports, CUDA
   context and kernel warm-up are paid once per pool, not once per evaluation;
5. **metrics**: all answers of the run are read back (deduplicated on the key) and scored:
   POPE per dataset and split and each dataset's mean F1, MileBench per task, image-quantity level and
   task group; one row per metric goes to ``metrics.parquet``, with each split's answered / expected
   count (`completeness`: the expected counts are in ``run.json`` from the start). A dataset or
   benchmark with a split short of answers gets no mean over its splits unless ``allow_partial=True``.

POPE datasets (``data.pope.datasets``: COCO, A-OKVQA, GQA, ...) each have their own image root; an
item's split names its dataset (`pope.qualified_split`: "adversarial" for coco, "gqa/adversarial"), so
answers, resume keys, question-file versions (``run.json``) and metric names keep them apart.

Assumptions, stated: the actors write the answers, so the run directory must be reachable from
every node (a local disk on one machine, a shared file system on a cluster); the question rows (text, no pixels) are small enough to hold on the driver (POPE 9k, MileBench 6.4k);
error rows count as answered on resume unless ``retry_errors=True`` (``hadpo eval --retry-errors``; the
pipeline passes it whenever an evaluation stage runs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from orchestrator import layout
from orchestrator.config import ExperimentConfig
from orchestrator.data import datasets
from orchestrator.data.schema import POPE_DEFAULT_DATASET
from orchestrator.eval import completeness
from orchestrator.eval import milebench as mb
from orchestrator.eval import pope
from orchestrator.eval.model_adapter import milebench_template_for
from orchestrator.eval.items import items_table, milebench_items, pope_items
from orchestrator.eval.predictor import RUN_FIELDS, PredictorSettings, base_answer_row, predict, resolved_dtype
from orchestrator.eval.results import (answered_keys, anti_join, block_name, compute_run_id, item_key,
                                       milebench_metric_rows, pope_metric_rows, read_answers, write_answers,
                                       write_metrics)
from orchestrator.files import write_json_atomic
from orchestrator.model.base_model import base_model_path
from orchestrator.model.families import resolve_family
from orchestrator.ray_session import init_ray, iter_blocks
from orchestrator.resources import eval_request, preflight
from orchestrator.timing import PassRate, format_rate, format_seconds

log = logging.getLogger(__name__)

BENCHMARKS = ("pope", "milebench")


@dataclass
class EvalResult:
    run_id: str
    eval_dir: Path
    answers_dir: Path
    metrics_path: Path
    pope_table: pd.DataFrame | None          # `pope.summarise`: per dataset and split, + a mean per dataset
    milebench_table: pd.DataFrame | None     # `milebench.summarise`: long table
    counts: dict[str, int] = field(default_factory=dict)
    coverage: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=completeness.COLUMNS))

    @property
    def complete(self) -> bool:
        return completeness.incomplete(self.coverage).empty

    def answers(self) -> pd.DataFrame:
        """Every answer of the run (deduplicated)."""
        return read_answers(self.answers_dir)


# ----------------------------------------------------------------------------------------------
# Inputs


def _file_version(path: str | Path, n: int) -> str:
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    return f"sha256:{digest}/n{n}"


@dataclass
class _Questions:
    items: list[dict]
    rejects: list[dict]          # items whose images do not open, with "error"
    versions: dict[str, str]     # "pope/<split>" or "milebench/<task>" -> file version


def _checked(build, cfg: ExperimentConfig):
    checked = build(cfg)
    rows = checked.dataset.take_all()
    return rows, list(checked.rejects)


def load_questions(cfg: ExperimentConfig, benchmarks: Sequence[str]) -> _Questions:
    """Evaluation items of the chosen benchmarks, the rejected ones, and the question-file versions."""
    items: list[dict] = []
    rejects: list[dict] = []
    versions: dict[str, str] = {}
    paths = datasets.resolve_data_paths(cfg)
    if "pope" in benchmarks:
        if not paths.pope:
            raise ValueError("POPE needs data.pope.questions (split -> question file) or data.pope.datasets "
                             "(name -> {questions, image_root}) in the config")
        rows, bad = _checked(datasets.pope_dataset, cfg)
        items += _pope_items(rows)
        for row in bad:
            reject = _pope_items([row])[0]
            reject["error"] = f"image could not be loaded: {row.get('error', '')}"
            rejects.append(reject)
        for item in items + rejects:
            if item["benchmark"] == "pope":
                versions[f"pope/{item['split']}"] = item["version"]
    if "milebench" in benchmarks:
        task_dirs = datasets.milebench_task_dirs(paths)
        if not task_dirs:
            log.info("eval: MileBench not configured (data.milebench_root), skipped")
        else:
            rows, bad = _checked(datasets.milebench_dataset, cfg)
            counts: dict[str, int] = {}
            for row in list(rows) + list(bad):
                counts[str(row["task"])] = counts.get(str(row["task"]), 0) + 1
            for task_dir in task_dirs:
                versions[f"milebench/{task_dir.name}"] = _file_version(task_dir / f"{task_dir.name}.json",
                                                                       counts.get(task_dir.name, 0))
            task_versions = {key.split("/", 1)[1]: value for key, value in versions.items()
                             if key.startswith("milebench/")}
            items += milebench_items(rows, task_versions)
            for row in bad:
                reject = milebench_items([row], task_versions)[0]
                reject["error"] = f"image could not be loaded: {row.get('error', '')}"
                rejects.append(reject)
    return _Questions(items, rejects, dict(sorted(versions.items())))


def _pope_items(rows: Sequence[dict]) -> list[dict]:
    """POPE rows as items whose split names the dataset too (`pope.qualified_split`: "random" for coco,
    "gqa/random" for a dataset named gqa), so answers, resume keys and versions keep datasets apart."""
    return pope_items([{**row, "split": pope.qualified_split(str(row.get("dataset") or POPE_DEFAULT_DATASET),
                                                             str(row["split"]))} for row in rows])


def _sort_key(item: dict) -> tuple:
    return (item["benchmark"], len(item["images"]), len(item["question"]) + len(item["context"]), item["split"],
            item["item_id"])


def _image_sort_key(item: dict) -> tuple:
    return (item["benchmark"], tuple(item["images"]), item["split"], item["item_id"])


def _image_block_end(items: list[dict], start: int, max_rows: int, images: int = 0) -> int:
    """End of a block of whole images (all their questions) from `start`: `images` images if given,
    else as many images as fit `max_rows` rows; at least one. `items` are sorted by image."""
    end, taken = start, 0
    while end < len(items) and items[end]["benchmark"] == items[start]["benchmark"] and (not images or taken < images):
        image, stop = items[end]["images"], end
        while stop < len(items) and items[stop]["benchmark"] == items[start]["benchmark"] \
                and items[stop]["images"] == image:
            stop += 1
        if not images and end > start and stop - start > max_rows:
            break
        end, taken = stop, taken + 1
    return end


def _item_blocks(items: list[dict], cfg: ExperimentConfig, by_image: bool, run_id: str = "") -> list:
    """Items sorted by size and cut into blocks (the unit of work and of writing), as Arrow tables of
    ITEM_SCHEMA rows, each row marked with `run_id`.

    With prefix reuse (`by_image`), POPE items are sorted by image instead, and a block holds whole images with
    all their questions (from all three splits; ``eval.prefix_images`` images, by default
    ``eval.batch_size``: one model batch, see the predictor), so each image's prefix is computed once,
    in one model batch with the block's other images. (Blocks of ~4 x batch_size rows, i.e. 3-4 images,
    left the GPU mostly idle: 78 questions/s at 7B where 32-image blocks reach 320-560.)
    """
    rows_per_block = {"pope": cfg.eval.batch_size * 4, "milebench": cfg.eval.batch_size}
    items = sorted(({**item, "run_id": run_id} for item in items), key=_image_sort_key if by_image else _sort_key)
    table = items_table(items)
    tables = []
    start = 0
    while start < len(items):
        if by_image and items[start]["benchmark"] == "pope":
            end = _image_block_end(items, start, rows_per_block["pope"], cfg.eval.prefix_images or cfg.eval.batch_size)
            tables.append(table.slice(start, end - start))
            start = end
            continue
        size = rows_per_block.get(items[start]["benchmark"], cfg.eval.batch_size)
        end = start + size
        # a block never mixes benchmarks
        for k in range(start + 1, min(end, len(items))):
            if items[k]["benchmark"] != items[start]["benchmark"]:
                end = k
                break
        end = min(end, len(items))
        tables.append(table.slice(start, end - start))
        start = end
    return tables


# ----------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class EvalRequest:
    """One model to evaluate: the config (its run dir and eval settings), the model folder (default: the
    config's), an optional LoRA adapter, and a tag hashed into the run id."""

    cfg: ExperimentConfig
    model_path: str | None = None
    adapter: str | None = None
    tag: str = ""


@dataclass
class _Planned:
    """An evaluation between its set-up and its metrics: what it asks, what is left to compute."""

    request: EvalRequest
    questions: _Questions
    expected: dict
    run_id: str
    settings: PredictorSettings
    total: int
    skipped: int
    todo: list[dict]
    started: float
    computed: int = 0


def run_eval(cfg: ExperimentConfig, model_path: str | None = None, adapter: str | None = None,
             benchmarks: Sequence[str] = BENCHMARKS, tag: str = "", *, model_adapter: Any = None,
             retry_errors: bool = False, allow_partial: bool = False, fault: dict | None = None) -> EvalResult:
    """Evaluate a model (default: the config's) with an optional LoRA adapter on POPE / MileBench.

    Resumes: items already answered under the same run id are not computed again. `model_adapter`
    plugs in another model (a `MileBenchModel` subclass or "module:Class"); `retry_errors`
    recomputes items whose earlier answer was an error; `allow_partial` keeps the means over splits
    even when a split has fewer answers than questions; `fault` is for tests (see `Predictor`).
    """
    return run_evals([EvalRequest(cfg, model_path, adapter, tag)], benchmarks, model_adapter=model_adapter,
                     retry_errors=retry_errors, allow_partial=allow_partial, fault=fault)[0]


def run_evals(requests: Sequence[EvalRequest], benchmarks: Sequence[str] = BENCHMARKS, *,
              model_adapter: Any = None, retry_errors: bool = False, allow_partial: bool = False,
              fault: dict | None = None) -> list[EvalResult]:
    """`run_eval` for several models in one pass: evaluations that differ only in their adapter (and run
    directory) share one actor pool, which imports, creates its CUDA context and warms its kernels once and
    loads each model when that model's blocks come (the blocks are queued model after model). Each
    evaluation keeps its own run id, answers, resume and metrics, exactly as if run alone. Evaluations with
    other settings (another base model, decoding, actor resources) get a pool of their own, one after the
    other. Returns one result per request, in order."""
    benchmarks = tuple(dict.fromkeys(benchmarks))
    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown or not benchmarks:
        raise ValueError(f"benchmarks must be among {BENCHMARKS}, got {list(benchmarks)}")
    if not requests:
        return []
    import ray

    if not ray.is_initialized():
        init_ray(requests[0].cfg)
    checked: list[tuple] = []   # each distinct pool once (a run's seeded configs ask for the same one)
    for cfg in (request.cfg for request in requests):
        pool = eval_request(cfg)
        if (pool, cfg.scaling.resource_wait_s, cfg.scaling.autoscaling_config) not in checked:
            checked.append((pool, cfg.scaling.resource_wait_s, cfg.scaling.autoscaling_config))
            preflight(cfg, pool)  # an actor pool the cluster can never hold fails here, in seconds

    questions: dict[str, _Questions] = {}   # by the data section: seeded runs share their questions
    planned = []
    for request in requests:
        data_key = json.dumps(request.cfg.model_dump(mode="json")["data"], sort_keys=True)
        if data_key not in questions:
            questions[data_key] = load_questions(request.cfg, benchmarks)
        planned.append(_plan(request, questions[data_key], benchmarks, model_adapter, retry_errors, fault))

    for pool in _pools(planned):
        _infer(pool)
    return [_finish(plan, benchmarks, allow_partial) for plan in planned]


def _plan(request: EvalRequest, questions: _Questions, benchmarks: tuple[str, ...], model_adapter: Any,
          retry_errors: bool, fault: dict | None) -> _Planned:
    """Steps 1-3 of one evaluation: its questions, its run id and folders, and what it has left to compute."""
    cfg, started = request.cfg, time.time()
    expected = completeness.expected_counts(questions.items + questions.rejects)
    by_benchmark = {b: sum(1 for item in questions.items if item["benchmark"] == b) for b in benchmarks}
    log.info("eval [questions]: %s; %d rejected (image does not open)",
             ", ".join(f"{b} {n}" for b, n in by_benchmark.items()), len(questions.rejects))

    # 2. run id
    model = str(Path(request.model_path).expanduser().resolve()) if request.model_path else str(base_model_path(cfg))
    adapter_path = str(Path(request.adapter).expanduser().resolve()) if request.adapter else ""
    family, milebench_template = cfg.model.family, cfg.eval.milebench_template
    if model_adapter is None and (Path(model) / "config.json").is_file():
        # checked here, before any actor starts: the folder's family and its MileBench template (a folder only
        # the actors' nodes can read is checked by the actors)
        family = resolve_family(cfg.model.family, model).name
        milebench_template = milebench_template_for(milebench_template, family)
    settings = PredictorSettings(
        run_id="", model_path=model, adapter_path=adapter_path, family=family,
        max_image_pixels=cfg.model.max_image_pixels, mode=cfg.eval.mode,
        template=cfg.model.eval_template, answer_suffix=cfg.eval.answer_suffix,
        max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, prefix_images=cfg.eval.prefix_images,
        image_budget=cfg.eval.milebench_image_budget, token_budget=cfg.eval.milebench_token_budget,
        milebench_template=milebench_template, milebench_max_new_tokens=cfg.eval.milebench_max_new_tokens,
        milebench_min_new_tokens=cfg.eval.milebench_min_new_tokens, milebench_fit_context=cfg.eval.milebench_fit_context,
        dtype=resolved_dtype(cfg.model.dtype, cfg.eval.gpus_per_actor),
        attn_implementation=cfg.model.attn_implementation, cudnn_attention=cfg.model.cudnn_attention,
        model_adapter=model_adapter, fault=dict(fault or {}),
        prefix_reuse=cfg.eval.prefix_reuse,
    )
    if model_adapter is not None:
        decoding = {**settings.decoding(), "model_adapter": getattr(model_adapter, "__qualname__", str(model_adapter))}
    else:
        decoding = settings.decoding()
    run_id = compute_run_id(model, adapter_path, cfg.eval.mode, decoding, questions.versions, request.tag)
    run_dir = cfg.run_dir
    ans_dir = layout.answers_dir(run_dir, run_id)
    # each actor records its start-up and calls under <eval dir>/timings (benchmarks/pipeline.py reads them)
    settings = dataclasses.replace(settings, run_id=run_id, answers_dir=str(ans_dir),
                                   timings_dir=str(layout.eval_timings_dir(run_dir, run_id)))
    ans_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(layout.eval_info_path(run_dir, run_id), {
        "run_id": run_id, "model": model, "adapter": adapter_path, "mode": cfg.eval.mode, "decoding": decoding,
        "versions": questions.versions, "benchmarks": list(benchmarks), "tag": request.tag,
        "config_hash": cfg.content_hash(), "expected": expected,
    })

    # 3. resume
    done = answered_keys(ans_dir, include_errors=not retry_errors)
    rejects = anti_join(questions.rejects, done)
    if rejects:
        write_answers([base_answer_row(item, settings, error=item["error"]) for item in rejects], ans_dir, "rejects",
                      name=block_name(run_id, [item_key(item) for item in rejects]))
    todo = anti_join(questions.items, done)
    total = len(questions.items) + len(questions.rejects)
    skipped = total - len(todo) - len(rejects)
    log.info("eval [resume] %s: %d items, %d already answered, %d to compute, %d rejects recorded",
             run_id, total, skipped, len(todo), len(rejects))
    return _Planned(request, questions, expected, run_id, settings, total, skipped, todo, started)


def _pool_key(plan: _Planned) -> tuple:
    """What evaluations must share to be answered by one actor pool: every predictor setting but the
    per-run ones (`RUN_FIELDS`), and the actors' resources (`resources.eval_request`)."""
    return (dataclasses.replace(plan.settings, **{name: "" for name in RUN_FIELDS}), eval_request(plan.request.cfg))


def _pools(planned: list[_Planned]) -> list[list[_Planned]]:
    """The evaluations with work left, grouped by `_pool_key` (in order of first appearance)."""
    pools: list[tuple[tuple, list[_Planned]]] = []
    for plan in planned:
        if not plan.todo:
            continue
        key = _pool_key(plan)
        for pool_key, pool in pools:
            if pool_key == key:
                pool.append(plan)
                break
        else:
            pools.append((key, [plan]))
    return [pool for _, pool in pools]


def _infer(pool: list[_Planned]) -> None:
    """4. inference: the pool's items, evaluation after evaluation, through one pool of actors; the
    actors write each block as they finish it."""
    import ray

    first, cfg = pool[0], pool[0].request.cfg
    settings = first.settings
    if len(pool) > 1:
        settings = dataclasses.replace(settings, runs=tuple(
            {name: getattr(plan.settings, name) for name in RUN_FIELDS} for plan in pool))
    tables = [table for plan in pool for table in _item_blocks(plan.todo, cfg, settings.reuses_prefix, plan.run_id)]
    # handed to iter_blocks, not kept here: a failed pass must not outlive its error in this frame
    blocks = iter_blocks(predict(ray.data.from_arrow(tables), settings, num_actors=cfg.eval.num_actors,
                                 cpus_per_actor=cfg.eval.cpus_per_actor, gpus_per_actor=cfg.eval.gpus_per_actor,
                                 resources_per_actor=cfg.eval.resources_per_actor))
    by_run = {plan.run_id: plan for plan in pool}
    todo = sum(len(plan.todo) for plan in pool)
    label = first.run_id if len(pool) == 1 else f"{len(pool)} runs ({', '.join(by_run)})"
    pace = PassRate(todo)
    computed = errors = 0
    for block in blocks:
        # the actors have written this block already; the driver only keeps count
        if block.num_rows == 0:
            continue
        for run_id in block.column("run_id").to_pylist():
            by_run[run_id].computed += 1
        computed += block.num_rows
        errors += sum(1 for e in block.column("error").to_pylist() if e)
        rate, left = pace.update(computed)
        log.info("eval [inference] %s: %d/%d (%.0f%%), %s items/s, ETA %s, %d errors", label, computed,
                 todo, 100.0 * computed / todo, format_rate(rate), format_seconds(left), errors)


def _finish(plan: _Planned, benchmarks: tuple[str, ...], allow_partial: bool) -> EvalResult:
    """5. metrics of one evaluation, from all of its answers on disk."""
    run_id, run_dir = plan.run_id, plan.request.cfg.run_dir
    out_dir, ans_dir = layout.eval_dir(run_dir, run_id), layout.answers_dir(run_dir, run_id)
    met_path = layout.metrics_path(run_dir, run_id)
    answers = read_answers(ans_dir)
    answers = answers[answers["benchmark"].isin(benchmarks)]
    coverage = completeness.coverage(answers, plan.expected)
    pope_table = milebench_table = None
    metric_rows: list[dict] = completeness.metric_rows(run_id, coverage)
    pope_answers = answers[answers["benchmark"] == "pope"]
    if "pope" in benchmarks and len(pope_answers):
        pope_table = with_expected(pope.summarise(pope_answers), coverage, allow_partial)
        metric_rows += pope_metric_rows(run_id, pope_table)
    mile_answers = answers[answers["benchmark"] == "milebench"]
    if "milebench" in benchmarks and len(mile_answers):
        milebench_table = mb.summarise(mb.score_answers(mile_answers))
        metric_rows += milebench_metric_rows(run_id, milebench_table)
    if not allow_partial:
        metric_rows = completeness.drop_means(pd.DataFrame(metric_rows), coverage).to_dict("records")
    n_errors = int((answers["error"].fillna("") != "").sum())
    n_unparsable = int(pope_table.loc[pope_table["split"] != "mean", "n_unparsable"].sum()) \
        if pope_table is not None else 0
    counts = {"items": plan.total, "answered": len(answers), "computed": plan.computed, "skipped": plan.skipped,
              "rejected": len(plan.questions.rejects), "errors": n_errors, "unparsable": n_unparsable}
    metric_rows += [{"run_id": run_id, "benchmark": "all", "scope": "counts", "name": name, "metric": name,
                     "value": float(value), "n": int(value)} for name, value in counts.items()]
    write_metrics(metric_rows, met_path)
    summary = ", ".join(f"{dataset} mean F1 {100 * pope.mean_f1(pope_table, dataset):.2f}"
                        for dataset in dict.fromkeys(pope_table["dataset"])) if pope_table is not None else "no POPE"
    if not completeness.incomplete(coverage).empty:
        summary = f"INCOMPLETE, {completeness.describe(coverage)}" + ("" if allow_partial else "; no means")
    if milebench_table is not None:
        overall = milebench_table[milebench_table["scope"] == "overall"]["value"]
        summary += f", MileBench {100 * float(overall.iloc[0]):.2f}" if len(overall) else ""
    log.info("eval [metrics] %s: %s; %d answers, %d errors, %d without a yes/no word; %s in %.1fs",
             run_id, summary, len(answers), n_errors, n_unparsable, met_path, time.time() - plan.started)
    return EvalResult(run_id=run_id, eval_dir=out_dir, answers_dir=ans_dir, metrics_path=met_path,
                      pope_table=pope_table, milebench_table=milebench_table, counts=counts, coverage=coverage)


def with_expected(table: pd.DataFrame, coverage: pd.DataFrame, allow_partial: bool) -> pd.DataFrame:
    """A `pope.summarise` table with each split's `expected` question count (a dataset's mean row: the
    sum); a split without a single answer still gets its row (n 0, metrics NaN), and a dataset with a
    split short of answers loses its mean row (unless `allow_partial`)."""
    expected = {row.split: int(row.expected) for row in coverage[coverage["benchmark"] == "pope"].itertuples()}
    present = {pope.qualified_split(d, s) for d, s in zip(table["dataset"], table["split"]) if s != "mean"}
    absent = [name for name in expected if name not in present]
    if absent:
        blank = {column: (math.nan if column in pope.METRIC_COLUMNS else 0) for column in table.columns}
        rows = [{**blank, "version": "", **dict(zip(("dataset", "split"), pope.dataset_split(name)))} for name in absent]
        table = pd.concat([table, pd.DataFrame(rows)], ignore_index=True)
        order = sorted(range(len(table)), key=lambda i: (pope.dataset_sort_key(table["dataset"].iloc[i]),
                                                         table["split"].iloc[i] == "mean",
                                                         pope.split_sort_key(table["split"].iloc[i])))
        table = table.iloc[order].reset_index(drop=True)
    short = {pope.dataset_split(name)[0] for name in completeness.incomplete(coverage, "pope")["split"]}
    table = table.copy()
    table["expected"] = [sum(n for name, n in expected.items() if pope.dataset_split(name)[0] == d) if s == "mean"
                         else expected.get(pope.qualified_split(d, s), 0) for d, s in zip(table["dataset"], table["split"])]
    if not allow_partial:
        table = table[~((table["split"] == "mean") & table["dataset"].isin(short))].reset_index(drop=True)
    return table


# ----------------------------------------------------------------------------------------------
# Tables


def format_pope_table(df: pd.DataFrame) -> str:
    """The seed-style POPE table (percent), one block per dataset: split, accuracy, precision, recall, F1,
    yes-ratio, n, answered / expected (when the table has `expected`) and the question file's version
    (sha256 prefix / question count); each block's mean row last, or a line saying why it has none."""
    with_counts = "expected" in df.columns
    header = (f"{'split':<12} {'accuracy':>9} {'precision':>9} {'recall':>9} {'F1':>9} {'yes-ratio':>9} {'n':>6}"
              + (f" {'answered/expected':>17}" if with_counts else "") + "  question file")
    lines: list[str] = []
    for dataset in dict.fromkeys(df["dataset"]) if len(df) else []:
        block = df[df["dataset"] == dataset]
        lines += ([""] if lines else []) + [f"POPE {dataset}", header, "-" * len(header)]
        for record in block.to_dict("records"):
            if record["split"] == "mean":
                lines.append("-" * len(header))
            lines.append(f"{record['split']:<12} " + " ".join(f"{100 * float(record[m]):>9.2f}"
                                                              for m in pope.METRIC_COLUMNS)
                         + f" {int(record['n']):>6}" + (f" {_answered(record):>17}" if with_counts else "")
                         + f"  {record.get('version') or ''}".rstrip())
        splits = block[block["split"] != "mean"]
        counts = f"{int(splits['n_errors'].sum())} errors, {int(splits['n_unparsable'].sum())} answers without yes/no"
        if (block["split"] == "mean").any():
            lines.append(f"{dataset} mean F1 {100 * pope.mean_f1(block):.2f}; {counts}")
        else:
            short = [str(r["split"]) for r in splits.to_dict("records") if with_counts
                     and int(r["n"]) + int(r["n_errors"]) < int(r["expected"])]
            lines.append(f"{dataset}: no mean F1, INCOMPLETE ({', '.join(short) or 'splits'} short of answers); {counts}")
    return "\n".join(lines)


def _answered(record: dict) -> str:
    return f"{int(record['n']) + int(record.get('n_errors', 0))}/{int(record['expected'])}"


def format_milebench_table(df: pd.DataFrame) -> str:
    """MileBench scores (percent) per task, then per image-quantity level, task group and overall."""
    lines = [f"{'scope':<8} {'name':<34} {'metric':<12} {'score':>7} {'n':>5}"]
    for record in df.to_dict("records"):
        if record["scope"] == "task_level":
            continue
        value = float(record["value"])
        shown = f"{100 * value:>7.2f}" if math.isfinite(value) else f"{'-':>7}"
        lines.append(f"{record['scope']:<8} {str(record['name'])[:34]:<34} {record['metric']:<12} {shown} "
                     f"{int(record['n']):>5}")
    return "\n".join(lines)


__all__ = ["EvalResult", "run_eval", "format_pope_table", "format_milebench_table", "load_questions"]
