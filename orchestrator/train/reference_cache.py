"""Reference log-probs for DPO, computed once per pair and cached in parquet.

DPO needs, for every preference pair, the reference model's summed log-probs of the chosen and the
rejected answer. The reference never changes during training, so instead of a second (no-grad)
forward in every training step, each pair is scored once and the training workers read the numbers
back (`open_reference_cache(path).load()`). Who scores what the cache lacks is `train.reference_fill`
(`plan.reference_fill`): `precompute_reference`, a pool of Ray Data actors before training ("pass"), or
the training workers themselves during the first epoch ("loop"), which add their values with
`write_reference_values`, one part per rank per checkpoint (``part-00007-rank1.parquet``).

Cache layout, under ``cache_root`` (default ``<output_root>/cache/reference_logps``, shared by every
experiment, seed and sweep trial under that root: the key says which reference the numbers belong to)::

    <key>/meta.json            what the numbers depend on (model files' digests, template, max_length,
                               dtype, layout), the model path, row counts, times
    <key>/part-00000.parquet   REFERENCE_SCHEMA rows: sample_id, ref_chosen, ref_rejected, error
    <key>/part-00001.parquet   ...

The cached values are sums over each answer's tokens. The IPO loss averages over the tokens instead; it
takes the token counts from the training batch itself (`PairLogps.token_counts`), which holds exactly the
tokens the cached sums were taken over (the key fixes template and max_length), so none are stored.

`key` (`reference_key`) is a hash of everything the cached numbers depend on, so a changed model,
template, max_length or compute dtype lands in a new folder and can never be read by mistake. Parts
are written by the driver as results stream back (one part per ``rows_per_part`` rows), each
atomically (temporary name + rename), so an interrupted pass keeps what it finished and a re-run
computes only the sample ids that have no value yet; a re-run with everything cached starts no actor.

A row that cannot be scored (its image does not open, its prompt does not fit ``train.max_length``,
the model raises on it) is never dropped and never crashes the pass: it is logged with its reason,
counted, and written with NaN values and the reason in ``error``. Such rows are not values: `load`
leaves them out and the next call tries them again.

The actor follows `orchestrator.eval.predictor.Predictor`: a callable class for ``map_batches`` on an
``ActorPoolStrategy`` pool that loads the model once, picks CUDA when Ray gave it a GPU, retries a
failed model batch row by row and turns what still fails into an error row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator import layout
from orchestrator.config import ExperimentConfig
from orchestrator.data.schema import PREFERENCE_COLUMNS, PREFERENCE_IMAGES
from orchestrator.files import atomic_write, file_sha256, write_json_atomic
from orchestrator.images import image_error
from orchestrator.ray_session import iter_blocks
from orchestrator.retry import run_batch_retrying_items
from orchestrator.startup import collector_paused
from orchestrator.timing import PassRate, format_rate, format_seconds
from orchestrator.versions import package_versions

log = logging.getLogger(__name__)

ROW_COLUMNS = (*PREFERENCE_COLUMNS, PREFERENCE_IMAGES)  # what a pass reads of a row (`images`: multi-image sources)

REFERENCE_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("ref_chosen", pa.float64()),    # summed log-prob of the chosen answer; NaN on error
    ("ref_rejected", pa.float64()),  # summed log-prob of the rejected answer; NaN on error
    ("error", pa.string()),          # "" when scored
])
REFERENCE_COLUMNS = tuple(REFERENCE_SCHEMA.names)

# Bump when the way the numbers are computed changes, so old caches are not reused.
CACHE_FORMAT = 1
# Files below this size are hashed whole; larger ones (weight shards of GBs) are fingerprinted.
FULL_HASH_LIMIT = 64 << 20
SAMPLE_BLOCK = 1 << 20
SAMPLE_BLOCKS = 16
# A safetensors header longer than this is not a header (the 8 bytes were something else).
MAX_SAFETENSORS_HEADER = 100 << 20
DEFAULT_ROWS_PER_PART = 1024
PROGRESS_EVERY_S = 10.0  # one progress line per this many seconds, and one at the end


# ------------------------------------------------------------------------------------------------
# The key: what the cached numbers depend on.


def reference_dtype(cfg: ExperimentConfig) -> str:
    """The dtype the reference is computed in: bfloat16 on GPUs with ``train.bf16``, else float32."""
    return "bfloat16" if cfg.scaling.use_gpu and cfg.train.bf16 else "float32"


def file_fingerprint(path: str | Path, full_hash_limit: int | None = None) -> str:
    """A digest of one model file: the whole file's sha256 when small, a sampled digest when large.

    Files under `full_hash_limit` bytes (default `FULL_HASH_LIMIT`, 64 MiB: configs, tokenizer and
    processor files, small models) are hashed completely with `orchestrator.files.file_sha256`.
    A larger file (a 7B model's weight shards are ~5 GB, 14 GB in all) would take minutes to hash on
    every run, so its digest covers instead:

    - its size in bytes;
    - for safetensors files, the JSON header (its length is the first 8 bytes, little-endian): every
      tensor's name, dtype, shape and byte offsets;
    - `SAMPLE_BLOCKS` (16) blocks of `SAMPLE_BLOCK` (1 MiB) at fixed offsets spread evenly from the
      start to the end of the file (first and last block included).

    Any change of architecture, shapes, dtypes or file length changes the digest, and so does new
    training of the same architecture (it changes values everywhere, so in the sampled blocks too).
    What it can miss is an in-place edit of a few bytes that lie between sampled blocks; write changed
    weights with ``save_pretrained`` to a new folder rather than patching a file in place.
    """
    path = Path(path)
    limit = FULL_HASH_LIMIT if full_hash_limit is None else full_hash_limit
    size = path.stat().st_size
    if size < limit:
        return "sha256:" + file_sha256(path)
    digest = hashlib.sha256(f"size:{size}".encode())
    with open(path, "rb") as handle:
        header = _safetensors_header(handle, size)
        if header is not None:
            digest.update(b"header:" + header)
        for offset in sample_offsets(size):
            handle.seek(offset)
            digest.update(handle.read(SAMPLE_BLOCK))
    return "sampled:" + digest.hexdigest()


def sample_offsets(size: int) -> list[int]:
    """Start offsets of the sampled blocks of a file of `size` bytes (evenly spread, first and last)."""
    span = max(size - SAMPLE_BLOCK, 0)
    return sorted({span * index // (SAMPLE_BLOCKS - 1) for index in range(SAMPLE_BLOCKS)})


def _safetensors_header(handle, size: int) -> bytes | None:
    handle.seek(0)
    length = int.from_bytes(handle.read(8), "little")
    if not 0 < length <= min(size - 8, MAX_SAFETENSORS_HEADER):
        return None
    header = handle.read(length)
    return header if header.lstrip().startswith(b"{") else None


def model_files(base_model_path: str | Path) -> list[Path]:
    """Every file of the model folder (weights, config, tokenizer, processor), hidden ones left out."""
    root = Path(base_model_path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root}: not a llava-hf model folder (no config.json)")
    return sorted(path for path in root.rglob("*")
                  if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts))


def key_inputs(base_model_path: str | Path, cfg: ExperimentConfig, dtype: str) -> dict[str, Any]:
    """Everything the cached numbers depend on (hashed by `reference_key`, recorded in meta.json)."""
    from orchestrator.model.families import FAMILIES, family_of

    root = Path(base_model_path)
    family = FAMILIES[family_of(root)]
    packed = getattr(cfg.train, "prefix_sharing", True) and family.one_d_positions
    extra = {}
    if family.name == "qwen2_5_vl" and cfg.model.max_image_pixels:  # its image tokens, hence every number
        extra["max_image_pixels"] = int(cfg.model.max_image_pixels)
    return {
        "format": CACHE_FORMAT,
        "files": {path.relative_to(root).as_posix(): file_fingerprint(path) for path in model_files(root)},
        "template": cfg.model.train_template,
        "max_length": int(cfg.train.max_length),
        "dtype": dtype,
        # same numbers in exact arithmetic, not bit for bit in bf16: packed vs plain rows (the layout the family
        # allows: Qwen2.5-VL's pairs are always plain), attention kernel
        "layout": "packed" if packed else "plain",
        "attn_implementation": cfg.model.attn_implementation,
        **extra,
    }


def _hash(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def reference_key(base_model_path: str | Path, cfg: ExperimentConfig, dtype: str) -> str:
    """16 hex digits naming the cache of this reference model, template, max_length and dtype.

    Hashes the fingerprint of every file of the model folder (`file_fingerprint`: small files whole,
    large weight files by size, safetensors header and sampled blocks), ``model.train_template``,
    ``train.max_length``, `dtype` ("float32" on CPU, "bfloat16" on GPU with ``train.bf16``; see
    `reference_dtype`), the pair layout (``train.prefix_sharing`` where the family packs) and
    ``model.attn_implementation``.
    The model's path is not part of it: an identical copy of the folder has the same key.
    """
    return _hash(key_inputs(base_model_path, cfg, dtype))


# ------------------------------------------------------------------------------------------------
# The cache on disk.


@dataclass
class ReferenceCache:
    """One key's folder of cached reference log-probs."""

    path: Path
    key: str
    counts: dict[str, int] = field(default_factory=dict)  # of the `precompute_reference` call that returned it

    def parts(self) -> list[Path]:
        return sorted(self.path.glob("part-*.parquet"))

    def table(self) -> pd.DataFrame:
        """All rows, one per sample id: its value if any part has one, else its latest error."""
        parts = self.parts()
        if not parts:
            return pd.DataFrame({name: pd.Series(dtype=object if name in ("sample_id", "error") else float)
                                 for name in REFERENCE_COLUMNS})
        rows = pd.concat([pq.read_table(part).to_pandas() for part in parts],
                         ignore_index=True)
        rows["error"] = rows["error"].fillna("")
        # a value (error == "") sorts after any error and wins; among equals the latest part wins
        rows["_has_value"] = rows["error"] == ""
        rows = rows.sort_values("_has_value", kind="stable").drop_duplicates("sample_id", keep="last")
        return rows.drop(columns="_has_value").reset_index(drop=True)

    def load(self) -> dict[str, tuple[float, float]]:
        """sample_id -> (ref_chosen, ref_rejected); rows with an error are left out."""
        rows = self.table()
        rows = rows[rows["error"] == ""]
        return {str(sample_id): (float(chosen), float(rejected)) for sample_id, chosen, rejected in
                zip(rows["sample_id"], rows["ref_chosen"], rows["ref_rejected"])}

    def errors(self) -> dict[str, str]:
        """sample_id -> reason, for the rows that have no value."""
        rows = self.table()
        rows = rows[rows["error"] != ""]
        return dict(zip(rows["sample_id"].astype(str), rows["error"]))

    def coverage(self, sample_ids: Iterable[str]) -> tuple[int, list[str]]:
        """(how many of `sample_ids` have a value, the ones that do not, in order)."""
        values = self.load()
        ids = [str(sample_id) for sample_id in sample_ids]
        missing = [sample_id for sample_id in ids if sample_id not in values]
        return len(ids) - len(missing), missing

    def meta(self) -> dict[str, Any]:
        meta_path = self.path / "meta.json"
        return json.loads(meta_path.read_text()) if meta_path.is_file() else {}


def open_reference_cache(path: str | Path) -> ReferenceCache:
    """Reopen a cache folder (``<cache_root>/<key>``) from its path, e.g. on a Ray Train worker."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference cache {folder}: no such folder")
    cache = ReferenceCache(folder, folder.name)
    cache.key = cache.meta().get("key", folder.name)
    return cache


def default_cache_root(cfg: ExperimentConfig) -> Path:
    return layout.reference_cache_root(cfg.output_dir)


def _write_part(cache: ReferenceCache, table: pa.Table, writer: str = "") -> Path:
    """One part, atomically, numbered after the highest part already there (resumes never overwrite);
    a `writer`'s parts carry its name (``part-00003-rank1``), so concurrent writers never collide."""
    numbers = [int(part.stem.split("-")[1]) for part in cache.parts() if part.stem.split("-")[1].isdigit()]
    path = cache.path / f"part-{max(numbers, default=-1) + 1:05d}{'-' + writer if writer else ''}.parquet"
    return atomic_write(path, lambda temp: pq.write_table(table.cast(REFERENCE_SCHEMA), temp))


# ------------------------------------------------------------------------------------------------
# The actor.


@dataclass(frozen=True)
class ReferenceSettings:
    """Everything a scoring actor needs; plain values so Ray can ship it."""

    model_path: str
    family: str                    # model.family ("auto": the folder's config.json says)
    dtype: str                     # "float32" | "bfloat16"
    template: str
    max_length: int
    packed: bool                   # train.prefix_sharing: [prompt, chosen, rejected] rows
    attn_implementation: str
    batch_size: int                # pairs per forward
    max_image_pixels: int | None = None  # model.max_image_pixels (Qwen2.5-VL's image budget)


class ReferenceScorer:
    """Callable class for ``ds.map_batches(ReferenceScorer, fn_constructor_kwargs={"settings": ...})``.

    Loads the reference model once (on the GPU Ray gave the actor, else the CPU), then scores each
    Ray Data batch in model batches of ``settings.batch_size`` pairs, without gradients. Returns one
    REFERENCE_SCHEMA row per input row, in input order.
    """

    def __init__(self, settings: ReferenceSettings):
        self.settings = settings
        started = time.time()
        with collector_paused():  # imports and the model: ~a million lasting objects (orchestrator/startup)
            import torch

            from orchestrator.model.families import load_model
            from orchestrator.model.llava import resolve_dtype

            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self.torch_dtype = resolve_dtype(settings.dtype, self.device)
            self.loaded = load_model(settings.model_path, dtype=settings.dtype, device=self.device,
                                     attn_implementation=settings.attn_implementation, family=settings.family,
                                     max_image_pixels=settings.max_image_pixels)
        self.model = self.loaded.model.eval().requires_grad_(False)
        log.info("reference scorer: %s loaded (%s, %s) in %.1fs", settings.model_path, self.device,
                 settings.dtype, time.time() - started)

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        rows = batch.to_dict("records")
        outputs = {str(row["sample_id"]): {"sample_id": str(row["sample_id"]), "ref_chosen": math.nan,
                                           "ref_rejected": math.nan, "error": ""} for row in rows}
        size = max(1, self.settings.batch_size)
        for start in range(0, len(rows), size):
            self._score(rows[start:start + size], outputs)
        for out in outputs.values():
            if not out["error"] and math.isnan(out["ref_chosen"]):
                out["error"] = "not scored (collate_pairs neither kept nor skipped the row)"
        return pa.Table.from_pylist(list(outputs.values()), schema=REFERENCE_SCHEMA)

    def _score(self, group: list[dict], outputs: dict[str, dict]) -> None:
        def record_error(row: dict, error: str) -> None:
            outputs[str(row["sample_id"])]["error"] = error

        run_batch_retrying_items(group, lambda rows: self._run(rows, outputs), record_error,
                                 batch="reference batch", unit="row", logger=log)

    def _run(self, group: list[dict], outputs: dict[str, dict]) -> None:
        import torch

        from orchestrator.train.collate import row_image_paths
        from orchestrator.train.pairs import collate_pairs, score_pairs

        s = self.settings
        columns = {name: [row[name] for row in group] for name in ROW_COLUMNS if name in group[0]}
        inputs = collate_pairs(columns, self.loaded, template=s.template, max_length=s.max_length, packed=s.packed)
        if inputs is None:
            # every row was skipped, and collate_pairs returns no list of reasons then; it skips a row for
            # exactly two reasons: its image does not open, or its prompt does not fit max_length
            for row in group:
                reasons = [f"{path}: {reason}" for path in row_image_paths(row) if (reason := image_error(path))]
                outputs[str(row["sample_id"])]["error"] = (  # worded as collate_pairs words its skips
                    reasons[0] if reasons else f"prompt does not fit max_length {s.max_length}")
            return
        for skipped in inputs.skipped:
            outputs[str(skipped["sample_id"])]["error"] = str(skipped["reason"])
        with torch.no_grad():
            chosen, rejected = score_pairs(self.model, inputs, self.device, self.torch_dtype)
        for sample_id, chosen_logp, rejected_logp in zip(inputs.sample_ids, chosen.tolist(), rejected.tolist()):
            outputs[str(sample_id)].update(ref_chosen=float(chosen_logp), ref_rejected=float(rejected_logp))


# ------------------------------------------------------------------------------------------------
# The pass.


def _preference_rows(dataset) -> list[dict]:
    """The dataset's rows (text and image paths only: small enough for the driver)."""
    columns = [name for name in ROW_COLUMNS if name in dataset.columns()]
    missing = {"sample_id", "image", "prompt", "chosen", "rejected"} - set(columns)
    if missing:
        raise ValueError(f"the preference dataset lacks column(s) {sorted(missing)}")
    return dataset.select_columns(columns).take_all()


def _log_errors(table: pa.Table, logged: int, limit: int = 20) -> int:
    for sample_id, error in zip(table.column("sample_id").to_pylist(), table.column("error").to_pylist()):
        if error:
            if logged < limit:
                log.warning("reference [error] %s: %s", sample_id, error)
            elif logged == limit:
                log.warning("reference [error] more rows failed; see the error column of the parts")
            logged += 1
    return logged


def keyed_cache(cfg: ExperimentConfig, base_model_path: str | Path,
                cache_root: str | Path | None = None) -> tuple[ReferenceCache, dict[str, Any]]:
    """The cache folder for this model and config (created), and the inputs its key hashes."""
    started = time.time()
    base_model_path = Path(base_model_path).expanduser().resolve()
    dtype = reference_dtype(cfg)
    inputs = key_inputs(base_model_path, cfg, dtype)
    key = _hash(inputs)
    cache = ReferenceCache(Path(cache_root or default_cache_root(cfg)).expanduser().resolve() / key, key)
    cache.path.mkdir(parents=True, exist_ok=True)  # the returned path opens even for an empty dataset
    log.info("reference [key] %s: %s, %d files hashed, template %s, max_length %d, %s, %s pairs in %.1fs",
             key, base_model_path, len(inputs["files"]), inputs["template"], inputs["max_length"], dtype,
             inputs["layout"], time.time() - started)
    return cache, inputs


def write_cache_meta(cache: ReferenceCache, base_model_path: Path, inputs: dict[str, Any], filled_by: str) -> None:
    """meta.json: what the key hashes, the library versions, and who filled the cache ("pass" / "loop")."""
    meta = cache.meta()
    write_json_atomic(cache.path / "meta.json", {
        **meta, "key": cache.key, "model_path": str(base_model_path), "key_inputs": inputs, "dtype": inputs["dtype"],
        "template": inputs["template"], "max_length": inputs["max_length"], "layout": inputs["layout"],
        "versions": package_versions(("torch", "transformers")), "created": meta.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "filled_by": sorted({*meta.get("filled_by", []), filled_by}),
    })


def write_reference_values(cache_path: str | Path, values: dict[str, tuple[float, float]], writer: str) -> Path | None:
    """Add a part with these sample ids' values (from a training worker: `writer` is e.g. "rank0"); None if empty.

    Each writer names its own parts, so workers that write at the same checkpoint never pick the same name."""
    if not values:
        return None
    cache = open_reference_cache(cache_path)
    ids = list(values)
    table = pa.table({"sample_id": ids, "ref_chosen": [float(values[i][0]) for i in ids],
                      "ref_rejected": [float(values[i][1]) for i in ids], "error": [""] * len(ids)})
    return _write_part(cache, table, writer)


def precompute_reference(cfg: ExperimentConfig, base_model_path: str | Path, dataset,
                         cache_root: str | Path | None = None, *,
                         rows_per_part: int = DEFAULT_ROWS_PER_PART) -> ReferenceCache:
    """Score every pair of `dataset` under the reference model once; return the cache that holds them.

    `dataset`: a Ray Dataset of PREFERENCE_COLUMNS rows (``preference_dataset(cfg).dataset``).
    Sample ids that already have a value under this key are not computed again; with all of them
    cached no actor is started. The rest, sorted by text length (similar lengths share a model batch,
    so little padding), go through a pool of `ReferenceScorer` actors (``eval.num_actors`` of them,
    ``eval.cpus_per_actor`` CPUs and ``eval.resources_per_actor`` each, one GPU each with
    ``scaling.use_gpu``), ``train.batch_size_per_worker`` pairs per forward. The returned cache's `counts`:
    rows, cached (before this call), computed, errors (rows of the dataset without a value after it).
    """
    base_model_path = Path(base_model_path).expanduser().resolve()
    dtype = reference_dtype(cfg)
    cache, inputs = keyed_cache(cfg, base_model_path, cache_root)
    key = cache.key
    started = time.time()

    # resume: only the sample ids without a value
    rows = _preference_rows(dataset)
    sample_ids = [str(row["sample_id"]) for row in rows]
    if len(set(sample_ids)) != len(sample_ids):
        duplicated = sorted({s for s in sample_ids if sample_ids.count(s) > 1})
        raise ValueError(f"the preference dataset repeats sample ids (e.g. {duplicated[:3]}); they key the cache")
    cached = cache.load()
    todo = [row for row in rows if str(row["sample_id"]) not in cached]
    already = len(rows) - len(todo)
    log.info("reference [resume] %s: %d pairs, %d cached, %d to compute", key, len(rows), already, len(todo))

    computed = errors = 0
    if todo:
        write_cache_meta(cache, base_model_path, inputs, "pass")
        computed, errors = _compute(cfg, cache, todo, base_model_path, dtype, rows_per_part)

    covered, missing = cache.coverage(sample_ids)
    cache.counts = {"rows": len(rows), "cached": already, "computed": computed, "errors": len(missing)}
    if todo:
        meta = cache.meta()
        write_json_atomic(cache.path / "meta.json", {
            **meta, "rows": len(cache.load()), "errors": len(cache.errors()),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    log.info("reference [done] %s: %d of %d pairs cached (%d computed now, %d errors this pass), %d without a "
             "value; %s in %.1fs", key, covered, len(rows), computed, errors, len(missing), cache.path,
             time.time() - started)
    return cache


def _compute(cfg: ExperimentConfig, cache: ReferenceCache, todo: list[dict], base_model_path: Path, dtype: str,
             rows_per_part: int) -> tuple[int, int]:
    """Score `todo` on the actor pool, writing a part every `rows_per_part` rows. (computed, errors)."""
    import ray
    from ray.data import ActorPoolStrategy

    settings = ReferenceSettings(
        model_path=str(base_model_path), family=cfg.model.family, dtype=dtype, template=cfg.model.train_template,
        max_length=int(cfg.train.max_length), packed=bool(getattr(cfg.train, "prefix_sharing", True)),
        attn_implementation=cfg.model.attn_implementation, batch_size=int(cfg.train.batch_size_per_worker),
        max_image_pixels=cfg.model.max_image_pixels,
    )
    # similar lengths side by side: a model batch pads to its longest pair
    todo = sorted(todo, key=lambda row: len(str(row["prompt"])) + len(str(row["chosen"])) + len(str(row["rejected"])))
    per_call = settings.batch_size
    resources: dict[str, Any] = {"num_cpus": cfg.eval.cpus_per_actor}
    if cfg.scaling.use_gpu:
        resources["num_gpus"] = 1
    if cfg.eval.resources_per_actor:
        resources["resources"] = dict(cfg.eval.resources_per_actor)
    items = ray.data.from_items(todo, override_num_blocks=max(1, math.ceil(len(todo) / per_call)))
    # handed to iter_blocks, not kept here: a failed pass must not outlive its error in this frame
    blocks = iter_blocks(items.map_batches(
        ReferenceScorer, fn_constructor_kwargs={"settings": settings}, batch_size=per_call, batch_format="pandas",
        compute=ActorPoolStrategy(size=cfg.eval.num_actors), **resources,
    ))
    last_logged = time.time()
    pace = PassRate(len(todo))
    computed = errors = 0
    pending: list[pa.Table] = []
    for block in blocks:
        if block.num_rows == 0:
            continue
        errors = _log_errors(block, errors)
        pending.append(block)
        computed += block.num_rows
        if sum(table.num_rows for table in pending) >= rows_per_part:
            _write_part(cache, pa.concat_tables(pending))
            pending = []
        now = time.time()
        rate, left = pace.update(computed, now)
        if computed < len(todo) and now - last_logged < PROGRESS_EVERY_S:
            continue
        last_logged = now
        log.info("reference [precompute] %s: %d/%d (%.0f%%), %s pairs/s, ETA %s, %d errors", cache.key, computed,
                 len(todo), 100.0 * computed / len(todo), format_rate(rate), format_seconds(left), errors)
    if pending:
        _write_part(cache, pa.concat_tables(pending))
    return computed, errors


__all__ = ["REFERENCE_SCHEMA", "REFERENCE_COLUMNS", "ReferenceCache", "ReferenceScorer", "ReferenceSettings",
           "default_cache_root", "file_fingerprint", "key_inputs", "keyed_cache", "open_reference_cache",
           "precompute_reference", "reference_dtype", "reference_key", "write_cache_meta", "write_reference_values"]
