"""The Ray Data actor that answers evaluation items, and `predict`, the pool that runs it.

Both benchmarks arrive in one item shape (`orchestrator.eval.items`: ITEM_SCHEMA) so one actor pool
answers both. Each `Predictor` actor loads the model once, through a model adapter
(`orchestrator.eval.model_adapter`: `VisionLanguageModel` by default: a model folder of any family
(``settings.family``, `families.load_model`) plus an optional LoRA adapter, merged), then for each Ray Data
batch:

1. prepares every item without touching pixels: empty question -> error row; MileBench prompt
   built as MileBench's utils.py builds it (`build_milebench_question`: its choice-list rule, left
   truncation to ``eval.milebench_token_budget``, its ``max_context_len``); a POPE prompt (or, with
   ``eval.milebench_fit_context``, a MileBench one) that with its new tokens exceeds the model's
   positions -> error (MileBench's own code generates past them, so by default we do too);
2. sorts items by prompt length and cuts model batches: POPE by ``eval.batch_size``, MileBench by
   the image budget (``eval.milebench_image_budget`` images, at most ``batch_size`` items: the
   bound of MileBench's ``--batch-image 24`` batches, whose worker then answers one at a time);
3. loads each model batch's images (a missing or corrupt image makes that item an error row);
4. answers: POPE in ``score`` mode with one forward pass (answer = the higher of the "Yes"/"No"
   logits at the last prompt position, p_yes = softmax over the two), everything else with greedy
   ``generate`` through the adapter's ``answer(benchmark, ...)``: POPE in ``eval_template`` with
   ``eval.max_new_tokens``, MileBench in MileBench's LLaVA worker template (``llava_llama_2``; other
   families: their chat template, `model_adapter.milebench_template_for`) with its generation settings
   (``eval.milebench_max_new_tokens`` 512, ``milebench_min_new_tokens`` 1).
   Each row stops at its own EOS (the model's EOS ids), the batch when all have; left padding with
   attention mask and position ids (Qwen2.5-VL: its own multimodal positions, from the mask) keeps
   answers independent of the batch (exactly in fp32; bf16 kernels may round differently per batch
   shape: ``eval.milebench_image_budget=1`` answers one sample at a time, as MileBench's worker does).
   A batch that raises is retried item by item; an item that still raises becomes an error row. The
   run always finishes.

With ``settings.prefix_reuse`` (LLaVA-1.5 and LLaVA-NeXT models; Qwen2.5-VL answers POPE on the plain
path above, and each actor logs why once: `prefix_cache.prefix_reuse_blocker`), POPE items are instead
grouped by image, in both modes: the image + system prefix is computed once per image and its KV cache reused by all the
image's questions, in score mode for the one forward, in generate mode in the prefill and in every
greedy decode step (`orchestrator.eval.prefix_cache`); a model batch is then ``prefix_images``
(default ``batch_size``) images with all their questions, and a batch that raises is retried image by
image. Feed the rows grouped by image (`run_eval` does) so that a block holds whole images. `predict` then
puts a CPU stage before the actors (`orchestrator.eval.pixels`: Ray Data tasks on the CPUs the actors leave
free) that decodes each block's images and preprocesses them for the vision tower, so the GPU actor does not
wait on image decoding (the pixels come from the same `pixel_values` as in the actor: same answers);
LLaVA-1.5 only: a LLaVA-NeXT actor preprocesses its anyres tiles itself.

Output rows have ANSWER_SCHEMA (`orchestrator.eval.results`). With ``settings.answers_dir`` set, the
actor also writes each answered block there (atomically, named by the block's keys) before
returning it, so a finished block is on disk even if the actor, the driver or the run dies next;
the run directory must then be on storage the actors can reach (any local disk on one machine, a
shared file system on a cluster). With ``settings.timings_dir`` set, each actor also writes
``timings-<pid>.json`` there: when its process started, its imports were done, its model was ready,
and its calls ran (epoch seconds: one clock per machine), with the prefix-reuse statistics; the POPE
benchmark turns them into its end-to-end breakdown.

Resilience: Ray Data creates pool actors with ``max_restarts``/``max_task_retries`` (unbounded by
default), so an actor that dies is restarted and its block is recomputed. ``PredictorSettings.fault``
can make an actor exit (or raise) on its Nth call, once (a marker file records it), which is how the
tests kill one mid-run or interrupt a run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from orchestrator.eval.milebench import (LLAVA_WORKER_GEN_KWARGS, build_milebench_question,
                                         image_budget_batches)
from orchestrator.eval.items import as_flag, as_list, as_text
from orchestrator.eval.model_adapter import VisionLanguageModel, load_model_adapter, milebench_template_for
from orchestrator.eval.pixels import DECODE_TASK_CPUS, add_pixels, pixel_tensor, take_pixels
from orchestrator.eval.pope import parse_yes_no, strip_special_tokens
from orchestrator.eval.results import block_name, to_answer_table, write_answers
from orchestrator.files import write_json_atomic
from orchestrator.model.kernels import use_cudnn_attention
from orchestrator.retry import run_batch_retrying_items
from orchestrator.startup import collector_paused
from orchestrator.timing import process_start_time

log = logging.getLogger(__name__)
MODULE_IMPORTED_AT = time.time()   # in an actor: Ray's worker is up and has imported this module

@dataclass(frozen=True)
class PredictorSettings:
    """Everything an actor needs; plain values so Ray can ship it."""

    run_id: str
    model_path: str
    adapter_path: str = ""
    family: str = "auto"                 # model.family: auto reads the folder's config.json
    max_image_pixels: int | None = None  # model.max_image_pixels: Qwen2.5-VL's per-image pixel budget
    mode: str = "score"                  # "score" | "generate" (POPE; MileBench always generates)
    template: str = "llava_v1"           # POPE's conversation template
    answer_suffix: str = ""
    max_new_tokens: int = 128            # POPE
    min_new_tokens: int = 0              # POPE: EOS barred before this many new tokens (throughput runs, random weights)
    batch_size: int = 16
    image_budget: int = 24               # MileBench: images per model batch
    token_budget: int = 4096             # MileBench's max_context_len (see EvalConfig.milebench_token_budget)
    milebench_template: str = "auto"     # per family: model_adapter.milebench_template_for
    milebench_max_new_tokens: int = LLAVA_WORKER_GEN_KWARGS["max_new_tokens"]
    milebench_min_new_tokens: int = LLAVA_WORKER_GEN_KWARGS["min_new_tokens"]
    milebench_fit_context: bool = False  # not MileBench's: budget lowered so prompt + new tokens fit the model
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    cudnn_attention: bool = False        # model.cudnn_attention: SDPA may use cuDNN (a plan per new shape)
    model_adapter: Any = None            # None (VisionLanguageModel), a class, or "module:Class"
    image_cache: int = 256               # decoded images kept per actor (POPE asks 6 questions per image)
    prefix_reuse: bool = False           # POPE: image prefix computed once per image (prefix_cache.py), both modes
    prefix_images: int = 0               # images per prefix-reuse model batch (0: batch_size)
    prefix_cache_images: int = 4         # prefix KV caches kept per actor across blocks (LRU)
    warm_up: bool | None = None          # a tiny prefix-path answer at start-up, overlapping the first hand-over
                                         # (None: only on a GPU)
    answers_dir: str = ""                # when set, each answered block is written here by the actor
    timings_dir: str = ""                # when set, each actor writes its start-up and call timings here
    fault: dict = field(default_factory=dict)  # tests: {"exit_on_call": N, "marker": path}, see _maybe_fail
    # Several evaluations answered by one actor pool (`run_evals`): each a dict of RUN_FIELDS; the rows say
    # which one they belong to (their ``run_id``), and an actor loads that run's model when its rows come
    runs: tuple = ()

    def run_settings(self) -> dict[str, "PredictorSettings"]:
        """The settings of each run this pool answers, by run id (just these settings without `runs`)."""
        if not self.runs:
            return {self.run_id: self}
        return {run["run_id"]: dataclasses.replace(self, runs=(), **run) for run in self.runs}

    @property
    def reuses_prefix(self) -> bool:
        """`prefix_reuse` where the model's family allows it (LLaVA-1.5; a plug-in adapter's actor decides)."""
        if not self.prefix_reuse:
            return False
        from orchestrator.eval.prefix_cache import prefix_reuse_blocker

        return not prefix_reuse_blocker(self.model_family())

    def model_family(self) -> str:
        """`family`, or with ``auto`` the folder's (config.json); "" for a folder that is not a HF model's."""
        if self.family != "auto":
            return self.family
        from orchestrator.model.families import family_of

        try:
            return family_of(self.model_path)
        except (OSError, ValueError):
            return ""

    def decoding(self) -> dict:
        """The settings that can change an answer (recorded with every row and hashed into run_id)."""
        settings = decoding_settings(self.mode, self.template, self.answer_suffix, self.max_new_tokens,
                                     self.dtype, prefix_reuse=self.reuses_prefix,
                                     min_new_tokens=self.min_new_tokens, milebench=self.milebench_generation())
        if self.max_image_pixels:  # Qwen2.5-VL's images are resized to it: other image tokens, other answers
            settings["max_image_pixels"] = int(self.max_image_pixels)
        if self.cudnn_attention:  # other attention kernels: the same answers in exact arithmetic, not in bf16
            settings["cudnn_attention"] = True
        return settings

    def milebench_generation(self) -> dict:
        """How MileBench answers are generated: template (``auto`` resolved for the model's family),
        generate() arguments, context budget."""
        template, family = self.milebench_template, self.model_family() if self.milebench_template == "auto" else ""
        if family:
            template = milebench_template_for(template, family)
        return {"template": template, "gen_kwargs": self.milebench_gen_kwargs(),
                "token_budget": int(self.token_budget), "fit_context": bool(self.milebench_fit_context)}

    def milebench_gen_kwargs(self) -> dict:
        """MileBench's LLaVA worker's gen_kwargs (greedy, temperature 0.0) with our token counts."""
        return {**LLAVA_WORKER_GEN_KWARGS, "max_new_tokens": int(self.milebench_max_new_tokens),
                "min_new_tokens": int(self.milebench_min_new_tokens)}


# What differs between the runs of one pool (`PredictorSettings.runs`); everything else they share
RUN_FIELDS = ("run_id", "adapter_path", "answers_dir", "timings_dir")


def decoding_settings(mode: str, template: str, answer_suffix: str, max_new_tokens: int, dtype: str,
                      prefix_reuse: bool = False, min_new_tokens: int = 0, milebench: dict | None = None) -> dict:
    """The decoding settings of a run: POPE's at the top level (`mode`, `template`, ...), MileBench's
    as ``milebench_<key>`` (`PredictorSettings.milebench_generation`)."""
    settings = {"mode": mode, "template": template, "answer_suffix": answer_suffix, "greedy": True,
                "max_new_tokens": int(max_new_tokens), "dtype": dtype}
    for key, value in (milebench or {}).items():
        settings[f"milebench_{key}"] = value
    if prefix_reuse:
        # same answers in exact arithmetic, different kernels in bf16: recorded (and hashed into run_id);
        # in generate mode the POPE answers were decoded with the shared prefix (prefix_cache.generate)
        settings["prefix_reuse"] = True
    if min_new_tokens:
        settings["min_new_tokens"] = int(min_new_tokens)
    return settings


def resolved_dtype(dtype: str, gpus_per_actor: float) -> str:
    """What "auto" becomes on the actors: bfloat16 with a GPU, float32 without."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if gpus_per_actor > 0 else "float32"


def _records(batch) -> list[dict]:
    """A Ray Data batch (pandas, pyarrow or dict of arrays) as a list of plain dicts."""
    if isinstance(batch, pa.Table):
        return batch.to_pylist()
    if isinstance(batch, dict):
        batch = pd.DataFrame(batch)
    rows = batch.to_dict("records")
    for row in rows:
        for name in ("images", "choice_list"):
            row[name] = as_list(row.get(name))
    return rows


class Predictor:
    """Callable class for ``ds.map_batches(Predictor, fn_constructor_kwargs={"settings": ...})``."""

    def __init__(self, settings: PredictorSettings):
        self.runs = settings.run_settings()
        settings = next(iter(self.runs.values()))   # the first run's model is loaded now, the others when they come
        self.settings = settings
        self.calls = 0
        # start-up phases (epoch seconds), written to settings.timings_dir for the benchmarks
        self.timings: dict[str, Any] = {"pid": os.getpid(), "process_started": process_start_time(),
                                        "module_imported": MODULE_IMPORTED_AT, "init_started": time.time()}
        # imports and the model load make ~a million lasting objects: no collection mid-way (orchestrator/startup)
        with collector_paused():
            # the kernel reads the weight files while we import (a cold 7B checkpoint is ~14 GB)
            self.timings["prefetched_bytes"] = prefetch_files(weight_files(settings.model_path, settings.adapter_path))
            import torch  # noqa: F401  (the model adapters import these lazily: timed here as their own phase)

            # before the device warm-up loads attention kernels; one setting per actor (runs differing in it get a
            # pool each: it is not among RUN_FIELDS)
            use_cudnn_attention(settings.cudnn_attention)
            # CUDA context, cuBLAS, cuDNN and attention kernels loaded by tiny ops while the modeling code
            # imports (the ops release the GIL); the thread's cuBLAS handle returns to torch's pool for the model
            threading.Thread(target=_warm_device, args=(settings.dtype, self.timings), name="device-warm-up",
                             daemon=True).start()
            import transformers  # noqa: F401

            self.model_class = load_model_adapter(settings.model_adapter)
            if issubclass(self.model_class, VisionLanguageModel):
                # the LLaVA modeling import (it pulls in torch._dynamo, torch.distributed.tensor and sympy
                # through transformers: ~2 s on a CPU, 8.9 s measured on a GPU host), timed as an import
                import transformers.models.llava.modeling_llava  # noqa: F401
            self.timings["imports_done"] = started = time.time()
            self._images: OrderedDict[str, Any] = OrderedDict()
            self._pope_lengths: dict[str, int] = {}   # POPE prompt -> tokens (questions repeat across images)
            self._load_model(settings)
        self._warming: threading.Thread | None = None
        on_gpu = str(getattr(self.model, "device", "cpu")).startswith("cuda")
        if self.prefix is not None and (settings.warm_up if settings.warm_up is not None else on_gpu):
            # answered while Ray hands over the first block and its rows are prepared; joined before the
            # model runs. Tokenized here: fast tokenizers are not safe to share between threads.
            question = "Is there a cat in the image?" + settings.answer_suffix
            self.prefix.split(question)
            self._warm_up_image = self._blank_image()
            if settings.mode == "score":
                self.model.yes_no_ids()
            eos = getattr(getattr(self.model, "tokenizer", None), "eos_token_id", None)
            self._warming = threading.Thread(target=self._warm_up, args=(question, eos), name="model-warm-up",
                                             daemon=True)
            self._warming.start()
        self._write_timings()
        log.info("predictor %s: model loaded in %.1fs (pid %d)", settings.run_id, time.time() - started, os.getpid())

    def _load_model(self, settings: PredictorSettings) -> None:
        """The model of `settings` (its folder and adapter) with what goes with it: generation settings and the
        prefix-reuse path."""
        self.model = self.model_class({
            "model_path": settings.model_path, "adapter_path": settings.adapter_path or None, "family": settings.family,
            "max_image_pixels": settings.max_image_pixels,
            "dtype": settings.dtype, "attn_implementation": settings.attn_implementation,
            "template": settings.template, "milebench_template": settings.milebench_template,
        })
        self.decoding_json = json.dumps(settings.decoding(), sort_keys=True)
        if self.model.tokens_per_image > settings.token_budget:
            log.warning("predictor %s: MileBench's budget counts each image at %d tokens (the most one image of this "
                        "model may take), more than eval.milebench_token_budget %d: no MileBench image will fit",
                        settings.run_id, self.model.tokens_per_image, settings.token_budget)
        pope_kwargs = {"max_new_tokens": settings.max_new_tokens, "do_sample": False}
        if settings.min_new_tokens:
            pope_kwargs["min_new_tokens"] = settings.min_new_tokens
        self.gen_kwargs = {"pope": pope_kwargs, "milebench": settings.milebench_gen_kwargs()}
        self.prefix = None
        if settings.prefix_reuse:
            from orchestrator.eval.prefix_cache import PrefixReuse, prefix_reuse_blocker

            family = getattr(getattr(self.model, "loaded", None), "family", None)
            blocker = prefix_reuse_blocker(family.name) if family is not None else ""
            if blocker:
                log.info("predictor %s: no image prefix reuse for POPE (%s); plain batches of %d questions",
                         settings.run_id, blocker, settings.batch_size)
            elif PrefixReuse.supports(self.model, settings.mode):
                self.prefix = PrefixReuse(self.model, cache_images=settings.prefix_cache_images)
            else:
                log.warning("predictor %s: %s cannot reuse the image prefix; scoring whole prompts",
                            settings.run_id, type(self.model).__name__)
        self.timings["model_ready"] = time.time()
        # an adapter may say what its start-up was made of (seconds per step), e.g. the benchmark's
        self.timings["model_steps"] = dict(getattr(self.model, "load_timings", None) or {})

    def _use_run(self, run_id: str) -> None:
        """Answer the next rows as `run_id`'s: its settings, and its model if that is another (the imports, the CUDA
        context and the kernels stay: what a new actor would pay again). The model is loaded anew, not its
        adapter swapped: merging and unmerging an adapter in bf16 would leave the base weights rounded."""
        settings = self.runs.get(run_id or self.settings.run_id)
        if settings is None:
            raise ValueError(f"rows of run {run_id!r}, which this actor was not given ({sorted(self.runs)})")
        if settings is self.settings:
            return
        self._join_warm_up()
        switched = time.time()
        reload = (settings.model_path, settings.adapter_path) != (self.settings.model_path, self.settings.adapter_path)
        self.timings = {"pid": os.getpid(), "process_started": self.timings["process_started"],
                        "module_imported": MODULE_IMPORTED_AT, "init_started": switched, "imports_done": switched,
                        "reused_from_run": self.settings.run_id}
        self.settings = settings
        if reload:
            import gc

            import torch

            self.model = self.prefix = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self._load_model(settings)
            log.info("predictor %s: model loaded in %.1fs (pid %d, the actor of run %s)", settings.run_id,
                     time.time() - switched, os.getpid(), self.timings["reused_from_run"])
        else:
            self.decoding_json = json.dumps(settings.decoding(), sort_keys=True)
            self.timings["model_ready"] = switched
        self._write_timings()

    def _warm_up(self, question: str, eos_token_id: int | None) -> None:
        """One tiny answer through the prefix path (a blank image, `question`, two new tokens), so the
        first block does not pay for loading the kernels of the vision tower, prefill and decoding.
        Only model compute runs here (`__init__` tokenized the question); the statistics and the
        prefix LRU are left as they were."""
        started = time.time()
        try:
            import torch

            image = self._warm_up_image
            stats = dict(self.prefix.stats)
            if self.settings.mode == "score":
                self.prefix.score([("<warm-up>", image, [question])])
            else:
                self.prefix.generate([("<warm-up>", image, [question])], max_new_tokens=2, eos_token_id=eos_token_id)
            if getattr(self.model, "device", None) is not None and str(self.model.device).startswith("cuda"):
                torch.cuda.synchronize()
            self.prefix.stats.clear()
            self.prefix.stats.update(stats)
            self.prefix.clear()
            self.timings["warm_up_s"] = time.time() - started
        except Exception as error:  # the first block then pays for it; a real problem surfaces there
            log.warning("predictor %s: warm-up failed (%s: %s)", self.settings.run_id, type(error).__name__, error)

    def _blank_image(self):
        """A blank image the prefix path takes as it is: LLaVA-1.5's pixel tensor, another family's vision
        inputs (made here: their processor tokenizes, and the warm-up thread must not)."""
        import torch

        loaded = self.model.loaded
        if not self.prefix.fixed_image_tokens:
            from PIL import Image

            return loaded.vision_inputs([Image.new("RGB", (64, 64))])
        return torch.zeros((3, loaded.image_size, loaded.image_size))   # LLaVA-1.5's square tile

    def _join_warm_up(self) -> None:
        if self._warming is not None:
            self._warming.join()
            self._warming = None
            self.timings["warm_up_joined"] = time.time()

    def _record_call(self, started: float, rows: int) -> None:
        """Add one answered call to the timings (first and last call, busy seconds) and write them."""
        now, timings = time.time(), self.timings
        timings.setdefault("first_call_started", started)
        timings.setdefault("first_call_done", now)
        timings["last_call_done"] = now
        timings["calls"] = self.calls
        timings["rows"] = timings.get("rows", 0) + rows
        timings["busy_s"] = timings.get("busy_s", 0.0) + (now - started)
        if self.prefix is not None:
            timings["prefix_stats"] = dict(self.prefix.stats)
        self._write_timings()

    def _write_timings(self) -> None:
        if self.settings.timings_dir:
            write_json_atomic(Path(self.settings.timings_dir) / f"timings-{os.getpid()}.json", self.timings)

    # -- faults (tests) -------------------------------------------------------------------------
    def _maybe_fail(self, kinds: tuple[str, ...]) -> None:
        """Test hook: on call N, once per marker file, exit the process or raise.

        ``exit_on_call`` exits before the block is answered, ``exit_after_call`` after it was
        written but before it is returned (the retry must then replace, not duplicate, it),
        ``raise_on_call`` raises (an application error: Ray Data stops the run).
        """
        fault = self.settings.fault or {}
        for kind in kinds:
            if fault.get(kind) == self.calls:
                marker = Path(fault["marker"])
                if marker.exists():
                    continue
                marker.write_text(f"{kind}: pid {os.getpid()}, call {self.calls}\n")
                if kind.startswith("exit"):
                    os._exit(1)
                raise RuntimeError(f"injected fault on call {self.calls}")

    # -- one Ray Data batch ---------------------------------------------------------------------
    def __call__(self, batch) -> pa.Table:
        started = time.time()
        self.calls += 1
        self._maybe_fail(("exit_on_call", "raise_on_call"))
        rows = _records(batch)
        given_pixels = take_pixels(rows)
        # a block holds one run's rows, but Ray Data may cut a batch across two blocks
        by_run: dict[str, list[int]] = {}
        for position, row in enumerate(rows):
            by_run.setdefault(as_text(row.get("run_id")) or self.settings.run_id, []).append(position)
        tables = []
        for run_id, positions in by_run.items():
            self._use_run(run_id)
            tables.append(self._answer_rows([rows[k] for k in positions], given_pixels))
        self._maybe_fail(("exit_after_call",))
        self._record_call(started, len(rows))
        if len(tables) == 1:
            return tables[0]
        answered_order = [k for positions in by_run.values() for k in positions]   # back to the batch's order
        return pa.concat_tables(tables).take(np.argsort(answered_order))

    def _answer_rows(self, rows: list[dict], given_pixels: dict[str, bytes]) -> pa.Table:
        """The answers of one run's rows, written to its answers dir when it has one."""
        outputs = [self._prepare(row) for row in rows]
        self._join_warm_up()
        pending = [i for i, out in enumerate(outputs) if not out["error"]]
        score = [i for i in pending if outputs[i]["mode"] == "score"]
        generate = [i for i in pending if outputs[i]["mode"] == "generate"]
        if self.prefix is not None:  # POPE items of the actor's mode, by image (MileBench: plain generate)
            mode = score if self.settings.mode == "score" else generate
            self._answer_by_image([i for i in mode if outputs[i]["benchmark"] == "pope"], outputs, given_pixels)
            score = [i for i in score if outputs[i]["benchmark"] != "pope"]
            generate = [i for i in generate if outputs[i]["benchmark"] != "pope"]
        for indices, by_images in ((score, False), (generate, True)):
            for group in self._model_batches(indices, outputs, by_images):
                self._answer(group, outputs)
        table = to_answer_table(outputs)
        if self.settings.answers_dir:
            # persisted before returning, under a name fixed by the block's keys: a finished block
            # survives whatever happens next, and a retried block replaces its own file
            keys = [(o["benchmark"], o["split"], o["item_id"]) for o in outputs]
            write_answers(table, self.settings.answers_dir, name=block_name(self.settings.run_id, keys))
        return table

    def _prepare(self, row: dict) -> dict:
        """The output row with the model's question filled in, or with an error; no pixels yet."""
        out = base_answer_row(row, self.settings, self.decoding_json)
        try:
            if row["benchmark"] == "pope":
                question = (row.get("question") or "").strip()
                if not question:
                    raise _ItemError("empty question")
                if len(out["images"]) != 1:
                    raise _ItemError(f"expected 1 image, got {len(out['images'])}")
                out["_prompt"] = question + self.settings.answer_suffix
            elif row["benchmark"] == "milebench":
                if not (row.get("instruction") or "").strip() and not (row.get("context") or "").strip():
                    raise _ItemError("empty question (no instruction and no context)")
                prompt = build_milebench_question(
                    row.get("instruction") or "", row.get("context") or "", out["images"], out["choice_list"],
                    count_tokens=self.model.count_tokens, keep_last_tokens=self.model.keep_last_tokens,
                    tokens_per_image=self.model.tokens_per_image, token_budget=self._token_budget(),
                    image_token=self.model.image_token, task=row["split"],
                    has_choice_list=as_flag(row.get("has_choice_list"), default=bool(out["choice_list"])),
                )
                out["images"] = prompt.images
                out["question"] = prompt.question
                out["_prompt"] = prompt.question
            else:
                raise _ItemError(f"unknown benchmark {row['benchmark']!r}")
            out["prompt_tokens"] = self._prompt_length(out)
            limit = self.model.max_length
            if out["benchmark"] == "pope":
                extra = self.settings.max_new_tokens if out["mode"] == "generate" else 0
            else:
                extra = self.settings.milebench_max_new_tokens
                if not self.settings.milebench_fit_context:
                    limit = None   # MileBench's code generates past the model's positions; so do we
            if limit and out["prompt_tokens"] + extra > limit:
                raise _ItemError(f"prompt of {out['prompt_tokens']} tokens (+{extra} new) exceeds the model's "
                                 f"{limit} positions")
        except _ItemError as error:
            out["error"] = str(error)
        except Exception as error:  # a bad record must not stop the run
            out["error"] = f"{type(error).__name__}: {error}"
        return out

    def _prompt_length(self, out: dict) -> int:
        """The row's ``prompt_tokens``: images counted at the model's `tokens_per_image` (they are not opened
        yet): exact for LLaVA-1.5, an upper bound for LLaVA-NeXT and Qwen2.5-VL."""
        if out["benchmark"] != "pope":
            return self.model.prompt_length(out["_prompt"], len(out["images"]), "milebench")
        length = self._pope_lengths.get(out["_prompt"])
        if length is None:
            if len(self._pope_lengths) >= 100_000:
                self._pope_lengths.clear()
            length = self._pope_lengths[out["_prompt"]] = self.model.prompt_length(out["_prompt"], 1, "pope")
        return length

    def _token_budget(self) -> int:
        """MileBench's ``max_context_len``: `settings.token_budget`, for instruction + context only, as
        upstream. With ``milebench_fit_context`` (not upstream) it is lowered so that the template
        around the question and ``milebench_max_new_tokens`` fit the model's positions too."""
        budget = self.settings.token_budget
        if self.settings.milebench_fit_context and self.model.max_length:
            # what the template adds: a MileBench question always starts with instruction + "\n"
            template = self.model.prompt_length("\n", 0, "milebench") - self.model.count_tokens("\n")
            budget = min(budget, self.model.max_length - template - self.settings.milebench_max_new_tokens)
        return max(budget, 0)

    def _model_batches(self, indices: list[int], outputs: list[dict], by_images: bool) -> list[list[int]]:
        """Items sorted by prompt length, cut by batch size (POPE) or image budget (MileBench)."""
        s = self.settings
        order = sorted(indices, key=lambda i: (outputs[i]["benchmark"], outputs[i]["prompt_tokens"]))
        groups: list[list[int]] = []
        for benchmark in ("pope", "milebench"):
            part = [i for i in order if outputs[i]["benchmark"] == benchmark]
            if benchmark == "milebench" and by_images:
                counts = [len(outputs[i]["images"]) for i in part]
                groups += [[part[j] for j in group] for group in image_budget_batches(counts, s.image_budget, s.batch_size)]
            else:
                groups += [part[k:k + s.batch_size] for k in range(0, len(part), s.batch_size)]
        return groups

    def _image(self, path: str):
        if path in self._images:
            self._images.move_to_end(path)
            return self._images[path]
        image = self.model.load_images([path])[0]
        self._images[path] = image
        while len(self._images) > self.settings.image_cache:
            self._images.popitem(last=False)
        return image

    def _load(self, group: list[int], outputs: list[dict]) -> tuple[list[int], list[list]]:
        ready, images = [], []
        for i in group:
            try:
                images.append([self._image(path) for path in outputs[i]["images"]])
                ready.append(i)
            except Exception as error:
                outputs[i]["error"] = f"image could not be loaded: {_reason(error)}"
        return ready, images

    def _answer(self, group: list[int], outputs: list[dict]) -> None:
        ready, images = self._load(group, outputs)

        def run(batch: list[tuple[int, list]]) -> None:
            self._run([i for i, _ in batch], [item_images for _, item_images in batch], outputs)

        def record_error(item: tuple[int, list], error: str) -> None:
            outputs[item[0]]["error"] = error

        run_batch_retrying_items(list(zip(ready, images)), run, record_error, logger=log)

    # -- POPE with the image prefix reused (score or generate) ----------------------------------
    def _answer_by_image(self, indices: list[int], outputs: list[dict], given_pixels: dict[str, bytes]) -> None:
        """POPE items grouped by image, ``prefix_images`` images per model batch (see prefix_cache);
        an image whose pixels the decode stage made (`add_pixels`) is not decoded again here."""
        by_image: dict[str, list[int]] = {}
        for i in indices:
            by_image.setdefault(outputs[i]["images"][0], []).append(i)
        paths = list(by_image)
        per_batch = max(1, self.settings.prefix_images or self.settings.batch_size)

        def record_error(image: tuple[str, Any, list[int]], error: str) -> None:
            for i in image[2]:  # every question of the image
                outputs[i]["error"] = error

        for start in range(0, len(paths), per_batch):
            ready = []
            for path in paths[start:start + per_batch]:
                try:
                    image = pixel_tensor(given_pixels[path]) if path in given_pixels else self._image(path)
                    ready.append((path, image, by_image[path]))
                except Exception as error:
                    for i in by_image[path]:
                        outputs[i]["error"] = f"image could not be loaded: {_reason(error)}"
            run_batch_retrying_items(ready, lambda batch: self._run_by_image(batch, outputs), record_error,
                                     batch="prefix batch", unit="image", logger=log)

    def _run_by_image(self, ready: list[tuple[str, Any, list[int]]], outputs: list[dict]) -> None:
        groups = [(path, image, [outputs[i]["_prompt"] for i in group]) for path, image, group in ready]
        n = sum(len(group) for _, _, group in ready)
        if self.settings.mode == "generate":
            s = self.settings
            new_tokens = self.prefix.generate(groups, max_new_tokens=s.max_new_tokens,
                                              min_new_tokens=s.min_new_tokens)
            for (_, _, group), answers in zip(ready, new_tokens):
                for i, text in zip(group, self.model.decode_answers(answers)):
                    outputs[i].update(raw_answer=text, answer=parse_yes_no(text), batch_size=n)
            return
        p_yes = self.prefix.score(groups)
        for (_, _, group), values in zip(ready, p_yes):
            for i, p in zip(group, values):
                answer = "Yes" if p >= 0.5 else "No"
                outputs[i].update(raw_answer=answer, answer=answer.lower(), p_yes=float(p), batch_size=n)

    def _run(self, ready: list[int], images: list[list], outputs: list[dict]) -> None:
        questions = [outputs[i]["_prompt"] for i in ready]
        paths = [outputs[i]["images"] for i in ready]
        if outputs[ready[0]]["mode"] == "score":
            p_yes = self.model.score_yes_no(questions, paths, images=images)
            for i, p in zip(ready, p_yes):
                answer = "Yes" if p >= 0.5 else "No"
                outputs[i].update(raw_answer=answer, answer=answer.lower(), p_yes=float(p), batch_size=len(ready))
            return
        benchmark = outputs[ready[0]]["benchmark"]   # a model batch holds one benchmark (_model_batches)
        answers = self.model.answer(benchmark, questions, paths, gen_kwargs=dict(self.gen_kwargs[benchmark]),
                                    images=images)
        for i, text in zip(ready, answers):
            text = strip_special_tokens(text)
            parsed = parse_yes_no(text) if benchmark == "pope" else text
            outputs[i].update(raw_answer=text, answer=parsed, batch_size=len(ready))


def base_answer_row(item: dict, settings: PredictorSettings, decoding_json: str | None = None,
                    error: str = "") -> dict:
    """The answer row of an item before the model answers (or, with `error`, an error row)."""
    s = settings
    return {
        "run_id": s.run_id, "model": s.model_path, "adapter": s.adapter_path or "",
        "benchmark": item["benchmark"], "split": item["split"], "item_id": item["item_id"],
        "images": as_list(item.get("images")), "question": as_text(item.get("question")),
        "label": as_text(item.get("label")), "raw_answer": "", "answer": "", "p_yes": math.nan,
        "error": error, "mode": s.mode if item["benchmark"] == "pope" else "generate",
        "decoding": decoding_json or json.dumps(s.decoding(), sort_keys=True), "batch_size": 0,
        "version": as_text(item.get("version")), "question_type": as_text(item.get("question_type")),
        "choice_list": as_list(item.get("choice_list")),
        "image_quantity_level": as_text(item.get("image_quantity_level")), "prompt_tokens": 0,
    }


class _ItemError(ValueError):
    """A problem with one item (reported in its row, never raised out of the actor)."""


def _reason(error: Exception) -> str:
    text = str(error)
    if isinstance(error, FileNotFoundError) and getattr(error, "filename", None):
        return f"{error.filename}: file not found"
    return text or type(error).__name__


def _warm_device(dtype_name: str, timings: dict) -> None:
    """With a GPU: create the CUDA context, then load cuBLAS, cuDNN and SDPA's kernels with tiny ops in
    the model's dtype (the model's first calls would wait for them); errors surface in the model load."""
    try:
        import torch

        if not torch.cuda.is_available():
            return
        torch.zeros(1, device="cuda")
        timings["cuda_ready"] = time.time()
        dtype = torch.bfloat16 if dtype_name in ("auto", "bfloat16") else getattr(torch, dtype_name)
        a = torch.randn(128, 128, device="cuda", dtype=dtype)
        a @ a                                                                   # cuBLAS / cuBLASLt
        torch.nn.functional.conv2d(torch.randn(1, 3, 28, 28, device="cuda", dtype=dtype),
                                   torch.randn(8, 3, 14, 14, device="cuda", dtype=dtype), stride=14)  # cuDNN
        q = torch.randn(1, 2, 16, 64, device="cuda", dtype=dtype)
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)           # flash
        torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(1, 1, 16, 16, device="cuda",
                                                                                        dtype=dtype))  # masked
        torch.cuda.synchronize()
        timings["device_warm"] = time.time()
    except Exception:  # the model load reports any CUDA problem itself
        pass


def weight_files(*folders: str | None) -> list[Path]:
    """The weight files (*.safetensors, *.bin) of model / adapter folders, and of folders one level below
    (an adapter saved inside a checkpoint folder)."""
    files: list[Path] = []
    for folder in folders:
        if not folder or not Path(folder).is_dir():
            continue
        for pattern in ("*.safetensors", "*.bin", "*/*.safetensors", "*/*.bin"):
            files += sorted(Path(folder).glob(pattern))
    return files


def prefetch_files(paths: Sequence[Path]) -> int:
    """Ask the kernel to read `paths` into the page cache in the background (``posix_fadvise``
    WILLNEED: asynchronous readahead, no thread of ours, nothing read into Python); the bytes asked
    for (0 where unsupported). A hint: a file already cached, or a kernel that declines, costs nothing."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    total = 0
    for path in paths:
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_WILLNEED)
            total += os.fstat(descriptor).st_size
        except OSError:
            pass
        finally:
            os.close(descriptor)
    return total


def _free_cpus(reserved: float) -> float:
    """CPUs of the Ray cluster left once `reserved` are taken (by the actor pool)."""
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0)) - reserved


def _largest_block_rows(ds, default: int = 256) -> int:
    """Rows of the largest block of `ds` (block metadata only; the item datasets are small)."""
    try:
        rows = [bundle.num_rows() for bundle in ds.iter_internal_ref_bundles()]
        rows = [r for r in rows if r]
        return max(rows) if rows else default
    except Exception as error:  # a Ray without the developer API: a fixed size
        log.warning("could not read the block sizes (%s); batch_size %d", error, default)
        return default


def predict(ds, settings: PredictorSettings, *, num_actors: int = 1, cpus_per_actor: float = 1.0,
            gpus_per_actor: float = 0.0, resources_per_actor: dict[str, float] | None = None,
            batch_size: int | None = None, max_restarts: int | None = None):
    """`ds` (a Ray Dataset of ITEM_SCHEMA rows) mapped through a pool of `Predictor` actors.

    Lazy: returns the answered Dataset (ANSWER_SCHEMA rows); `batch_size=None` gives each actor
    call one whole block (with GPUs, Ray Data needs a number: the largest block's row count is used,
    so a call answers about one block; Ray may then cut a batch across two blocks, which prefix
    reuse absorbs with its LRU of prefix caches). With prefix reuse, a CPU stage (`add_pixels`)
    decodes the images before the actors, if the actors leave CPUs free. Ray Data restarts a dead
    actor and retries its tasks (by default without limit: ``max_restarts=-1``,
    ``max_task_retries=-1``); pass `max_restarts` to bound both
    (Ray 2.60 warns that this way of passing remote args is deprecated).
    """
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    kwargs: dict[str, Any] = {}
    if resources_per_actor:  # custom resources, e.g. one that only some node types have
        kwargs["resources"] = dict(resources_per_actor)
    if gpus_per_actor:
        kwargs["num_gpus"] = gpus_per_actor
        if batch_size is None:  # Ray Data refuses batch_size=None with GPUs
            batch_size = _largest_block_rows(ds)
    if max_restarts is not None:
        kwargs.update(max_restarts=max_restarts, max_task_retries=max_restarts)
    # LLaVA-1.5's pixels only (a plug-in model's too: `add_pixels` passes rows on untouched when its folder has no
    # processor); other families' actors preprocess their images themselves
    decode_ahead = settings.reuses_prefix and settings.model_family() in ("llava", "")
    free_cpus = _free_cpus(num_actors * cpus_per_actor) if decode_ahead else 0
    if free_cpus > 0:
        # decode + preprocess the images on the CPUs the actors leave free, ahead of the GPU: one task
        # per block, at most 2 at a time per actor (a task preprocesses ~100 images/s, an H100 answers
        # ~50/s). Being a capped task pool, Ray Data keeps it a stage of its own (not fused into the actors).
        # A quarter CPU per task: the free CPUs may be split over nodes (e.g. 0.5 left beside each actor),
        # and a task that fits on no node would stall the whole pass.
        ds = ds.map_batches(add_pixels, fn_kwargs={"model_path": settings.model_path}, batch_size=None,
                            batch_format="pyarrow", zero_copy_batch=True, num_cpus=min(DECODE_TASK_CPUS, free_cpus),
                            compute=TaskPoolStrategy(size=2 * num_actors))
    return ds.map_batches(
        Predictor, fn_constructor_kwargs={"settings": settings}, batch_size=batch_size,
        batch_format="pandas", compute=ActorPoolStrategy(size=num_actors), num_cpus=cpus_per_actor, **kwargs,
    )


__all__ = ["Predictor", "PredictorSettings", "base_answer_row", "predict", "decoding_settings",
           "resolved_dtype"]
