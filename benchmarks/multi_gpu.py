"""Multi-GPU run (issue #8): ZeRO-3 DPO across several GPUs and a multi-actor POPE pass, in one script.

    python benchmarks/multi_gpu.py --out /tmp/mg                 # N = all visible GPUs (2x H100: ~9 min)
    python benchmarks/multi_gpu.py --out /tmp/mg --tiny          # tiny LLaVA on CPU: a check of the logic (~3 min)
    python benchmarks/multi_gpu.py --out /tmp/mg --skip dpo1,dpoN,pope   # later: the rest, model folder reused

Sections (each prints one RESULT line, is written to DIR/results.json (+ a line in results.jsonl) as
soon as it ends, and is guarded so that one failure does not lose the others; a final Markdown table,
also written to DIR/results.md, sums them up):

  model  a LLaVA-1.5-7B-shaped folder with RANDOM weights (CLIP ViT-L/14-336 + Vicuna-7B, vocab 32064,
         bf16 safetensors; the planner's shape, benchmarks/common.py), built directly on the GPU, saved once to
         DIR/model7b (reused by later runs unless --rebuild), with the project's word-level tokenizer
         (world vocabulary padded to 32000 words so that <image> is id 32000, as in llava-hf) and a
         336 px LlavaProcessor. --tiny: dpo_step's tiny shape on CPU (DIR/model-tiny).
  data   the synthetic world at 336 px (VG training images and a POPE question set) and preference
         rows with ~128-token chosen / rejected answers (576 image + ~45 prompt + 128 answer tokens),
         as a Ray dataset of PREFERENCE_COLUMNS handed to run_training(dataset=...).
  dpo1   LoRA r128 (every LM linear) DPO, ZeRO-3, bf16, gradient checkpointing, --pairs pairs per GPU,
  dpoN   through Ray Train with 1 worker, then N workers (one GPU each). --steps steps, the first
         --warmup untimed. pairs/s from per-step timestamps (a step_hook on every worker, after a
         cuda synchronize) and from the curves parquet; peak GPU memory per worker from the hook
         (torch.cuda.max_memory_allocated, per rank, in DIR/probe/). Scaling efficiency =
         pairs/s(N) / (N x pairs/s(1)).
  full   full-parameter DPO (LoRA off) with ZeRO-3 over the N GPUs, CPU offload of the optimizer only if
         orchestrator.plan says it does not fit (the plan is corrected for the recipe's UNSHARDED frozen
         reference copy, 14 GB bf16 per GPU); retried with offload after an out-of-memory error.
  kill   N workers, max_failures=1, a checkpoint every --kill-every steps; rank 1 exits (os._exit) once
         at step 1.5 x kill-every (sleeping first so the last checkpoint is registered); the run must
         resume from that checkpoint and reach step 2 x kill-every.
  pope   POPE-structured questions (K images x 6 questions x 3 splits) through run_eval in score mode
         (prefix reuse) with 1 actor x 1 GPU, then N actors x 1 GPU: questions/s end to end and in
         steady state (from the arrival of the N-th answered block with N actors, by when every actor
         has loaded its model, to the last block), the ratio N actors / 1 actor, and the time to the
         first block (actor start + model load).

Time: every run of the LoRA and full sections trains one step more than it times and stops itself
there (the step hook raises on every rank) before the recipe's final checkpoint (a full fine-tune's would be ~100 GB of
optimizer state; LoRA's a few GB): those runs end with a deliberate "multi_gpu: planned stop" error in
the log, which is expected (--final-checkpoints turns it off for the LoRA runs). Sections run in the
order model, data, dpo1, dpoN, pope, kill, full; a section is skipped when less than its usual time
is left of --budget (default 540 s), and step loops stop at the budget's end. SIGTERM (e.g. `timeout`)
still prints the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import re
import resource
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (LLAVA_15_7B, LLAVA_IMAGE_TOKEN_ID, TINY_SHAPE, fmt, load_benchmark,  # noqa: E402
                               shape_processor)
from orchestrator.files import atomic_write  # noqa: E402

STOP_MESSAGE = "multi_gpu: planned stop"
SECTION_ORDER = ("model", "data", "dpo1", "dpoN", "pope", "kill", "full")
TABLE_ORDER = ("model", "data", "dpo1", "dpoN", "full", "kill", "pope")
SKIPPABLE = ("dpo1", "dpoN", "full", "kill", "pope")
# Rough seconds a section needs on 2x H100 (skipped when less is left of the budget); tiny: a tenth.
SECTION_SECONDS = {"dpo1": 80, "dpoN": 85, "pope": 70, "kill": 165, "full": 90}
# shared/docs/GPU.md, H100 80GB, plain torch on one GPU (no Ray, no DeepSpeed), for comparison.
GPU_MD = {"lora_dpo_pairs_per_s": 3.3, "lora_dpo_s_per_step": 1.20, "lora_dpo_peak_gb": 22.9, "lora_dpo_tflops": 196,
          "pope_score_qps_batch": 50.7, "matmul_tflops": 793.0}

T0 = time.time()


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.1f}s] {message}", flush=True)


def dpo_step_module():
    """benchmarks/dpo_step.py (its `build_model` builds the planner's LLaVA-1.5-7B shape)."""
    return load_benchmark("dpo_step")


# ------------------------------------------------------------------------------------------------
# The step hook: runs on every Ray Train worker after each optimizer step (pickled by value with
# this script, so it only uses the standard library and torch).


class StepProbe:
    """Appends {step, time, memory} per step to ``<folder>/<tag>.rank<r>.jsonl``; optionally kills
    one rank once (marker file) or stops the run (every rank raises) at a step or past a deadline."""

    def __init__(self, folder: str, tag: str, *, stop_at: int | None = None, deadline: float | None = None,
                 kill_rank: int | None = None, kill_step: int | None = None, kill_marker: str | None = None,
                 kill_sleep: float = 5.0):
        self.folder, self.tag = folder, tag
        self.stop_at, self.deadline = stop_at, deadline
        self.kill_rank, self.kill_step, self.kill_marker, self.kill_sleep = kill_rank, kill_step, kill_marker, kill_sleep

    def __call__(self, step: int, rank: int) -> None:
        import torch

        record: dict[str, Any] = {"step": step, "rank": rank, "pid": os.getpid()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the step's kernels are done: the timestamp is the step's end
            free, total = torch.cuda.mem_get_info()
            record.update(max_allocated_gb=torch.cuda.max_memory_allocated() / 1e9,
                          max_reserved_gb=torch.cuda.max_memory_reserved() / 1e9,
                          device_used_gb=(total - free) / 1e9)
        record["time"] = time.time()
        record["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB on Linux
        with open(os.path.join(self.folder, f"{self.tag}.rank{rank}.jsonl"), "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if (self.kill_rank is not None and rank == self.kill_rank and step == self.kill_step
                and not os.path.exists(self.kill_marker)):
            with open(self.kill_marker, "w") as handle:
                handle.write(json.dumps({"pid": os.getpid(), "step": step, "time": time.time()}))
            time.sleep(self.kill_sleep)  # let the last checkpoint be registered before the worker dies
            os._exit(1)  # no cleanup, as on a node failure
        if self.stop_at is not None and step >= self.stop_at:
            raise RuntimeError(f"{STOP_MESSAGE} after step {step} (before the final checkpoint)")
        if self.deadline is not None and time.time() > self.deadline:
            raise RuntimeError(f"{STOP_MESSAGE} after step {step}: out of time budget")


def read_probe(folder: Path, tag: str) -> dict[int, list[dict]]:
    """rank -> records (in order) of a probe."""
    out: dict[int, list[dict]] = {}
    for path in sorted(folder.glob(f"{tag}.rank*.jsonl")):
        rank = int(path.name.rsplit(".rank", 1)[1].split(".")[0])
        out[rank] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def probe_timing(records: dict[int, list[dict]], warmup: int, pairs_per_worker: int,
                 last: int | None = None) -> dict[str, Any]:
    """s/step and pairs/s over steps warmup+1 .. last (rank 0's clock; ranks are in lock-step)."""
    rank0 = records.get(0, [])
    by_step = {r["step"]: r for r in rank0}  # the last attempt's record of each step
    steps = sorted(by_step)
    if not steps:
        return {"steps_done": 0}
    out: dict[str, Any] = {"steps_done": steps[-1]}
    end = min(steps[-1], last) if last is not None else steps[-1]
    if warmup in by_step and end in by_step and end > warmup:
        seconds = by_step[end]["time"] - by_step[warmup]["time"]
        timed = end - warmup
        world = len(records)
        out.update(timed_steps=timed, s_per_step=seconds / timed,
                   pairs_per_s=world * pairs_per_worker * timed / seconds,
                   pairs_per_s_per_gpu=pairs_per_worker * timed / seconds)
    peaks = {}
    for rank, rows in sorted(records.items()):
        peak = {key: max((r.get(key) or 0.0) for r in rows) for key in
                ("max_allocated_gb", "max_reserved_gb", "device_used_gb", "max_rss_gb")}
        peaks[str(rank)] = {k: round(v, 2) for k, v in peak.items()}
    out["memory_per_rank"] = peaks
    allocated = [p["max_allocated_gb"] for p in peaks.values() if p["max_allocated_gb"]]
    out["peak_allocated_gb_max"] = max(allocated) if allocated else None
    rss = [p["max_rss_gb"] for p in peaks.values() if p["max_rss_gb"]]
    out["peak_rss_gb_max"] = max(rss) if rss else None
    return out


def curves_timing(curves: list[dict], warmup: int, pairs_per_worker: int, world: int) -> dict[str, Any]:
    """pairs/s from the curves parquet: windows that start at or after `warmup` (samples = pairs, all ranks)."""
    rows = sorted(curves, key=lambda r: r["step"])
    pairs = seconds = 0.0
    previous = 0
    for row in rows:
        window = row["step"] - previous
        if previous >= warmup and row.get("samples_per_s"):
            n = window * pairs_per_worker * world
            pairs += n
            seconds += n / row["samples_per_s"]
        previous = row["step"]
    if not seconds:
        return {}
    out = {"curves_pairs_per_s": pairs / seconds, "curves_pairs_per_s_per_gpu": pairs / seconds / world}
    tokens = [row["tokens_per_s"] for row in rows if row.get("tokens_per_s") and row["step"] > warmup]
    if tokens:
        out["curves_tokens_per_s"] = sum(tokens) / len(tokens)
    return out


# ------------------------------------------------------------------------------------------------
# Results


class Results:
    def __init__(self, out: Path, meta: dict):
        self.path = out / "results.json"
        self.lines = out / "results.jsonl"
        self.data: dict[str, Any] = {"meta": meta, "sections": {}}
        self._write()

    def _write(self) -> None:
        atomic_write(self.path, lambda temp: temp.write_text(json.dumps(self.data, indent=1, default=str)))

    def record(self, name: str, entry: dict) -> None:
        self.data["sections"][name] = entry
        self._write()
        with open(self.lines, "a") as handle:
            handle.write(json.dumps({"section": name, **entry}, default=str) + "\n")
        say(f"RESULT {name}: {summary_line(name, entry)}")


def _peak(e: dict) -> str:
    if e.get("peak_allocated_gb_max"):
        return f"alloc {e['peak_allocated_gb_max']:.1f} GB"
    return f"RSS {fmt(e.get('peak_rss_gb_max'), '.2f', ' GB')}"


def summary_line(name: str, e: dict) -> str:
    status = e.get("status")
    if status != "ok":
        reason = e.get("reason") or e.get("error") or ""
        return f"{status.upper()} ({e.get('seconds', 0):.0f}s) {reason[:300]}"
    if name == "model":
        return (f"{e['shape']} {e['params'] / 1e9:.3f}B params, {e['source']} in {e['seconds']:.0f}s "
                f"(build {fmt(e.get('build_s'), '.1f', 's')}, save {fmt(e.get('save_s'), '.1f', 's')}), "
                f"{fmt(e.get('folder_gb'), '.1f', ' GB')} on disk; matmul {fmt(e.get('matmul_tflops'), '.0f')} TFLOP/s")
    if name == "data":
        return (f"{e['rows']} pairs over {e['train_images']} images, seq {e['seq_tokens_mean']:.0f} tokens "
                f"(image {e['image_tokens']}, prompt {e['prompt_tokens_mean']:.0f}, answers "
                f"{e['chosen_tokens_mean']:.0f}/{e['rejected_tokens_mean']:.0f}); POPE {e['pope_questions']} questions "
                f"over {e['pope_images']} images")
    if name in ("dpo1", "dpoN"):
        line = (f"{e['workers']} worker(s): {fmt(e.get('pairs_per_s_per_gpu'))} pairs/s/GPU "
                f"({fmt(e.get('pairs_per_s'))} total, {fmt(e.get('s_per_step'), '.3f')} s/step over "
                f"{e.get('timed_steps', 0)} steps; curves {fmt(e.get('curves_pairs_per_s_per_gpu'))}/GPU), "
                f"peak {_peak(e)}/worker, first step after "
                f"{fmt(e.get('to_first_step_s'), '.0f', 's')}")
        if "scaling_efficiency" in e:
            line += f"; scaling efficiency {fmt(e['scaling_efficiency'])}"
        return line
    if name == "full":
        return (f"ran={e.get('ran')} offload={e.get('offload_optimizer')} over {e.get('workers')} GPUs: "
                f"{fmt(e.get('s_per_step'), '.2f')} s/step, peak {_peak(e)}/GPU (plan "
                f"{fmt(e.get('plan_gb_corrected'), '.1f', ' GB')} with the unsharded reference)")
    if name == "kill":
        return (f"passed={e.get('passed')}: killed rank 1 at step {e.get('kill_step')}, resumed from "
                f"{e.get('resumed_from_step')}, reached {e.get('final_step')}/{e.get('target_step')}, "
                f"recovery {fmt(e.get('recovery_s'), '.0f', 's')}")
    if name == "pope":
        one, many = e.get("actors_1", {}), e.get(f"actors_{e.get('actors_n')}", {})
        return (f"{e.get('questions')} questions: 1 actor {fmt(one.get('qps_steady'), '.1f')} q/s steady "
                f"({fmt(one.get('qps_wall'), '.1f')} end to end); {e.get('actors_n')} actors "
                f"{fmt(many.get('qps_steady'), '.1f')} q/s steady ({fmt(many.get('qps_wall'), '.1f')}); ratio "
                f"{fmt(e.get('ratio_steady'))} steady, {fmt(e.get('ratio_wall'))} end to end")
    return json.dumps(e, default=str)[:300]


def markdown_table(results: Results) -> str:
    s = results.data["sections"]
    lines = ["| section | status | result | seconds |", "|---|---|---|---|"]
    for name in TABLE_ORDER:
        if name not in s:
            lines.append(f"| {name} | not run | | |")
            continue
        e = s[name]
        text = summary_line(name, e).replace("|", "/")
        lines.append(f"| {name} | {e.get('status')} | {text} | {e.get('seconds', 0):.0f} |")
    d1, dn = s.get("dpo1", {}), s.get("dpoN", {})
    if d1.get("status") == "ok" or dn.get("status") == "ok":
        lines += ["", "| LoRA DPO | workers | pairs/s/GPU | pairs/s total | s/step | useful TFLOP/s/GPU "
                  "| peak per worker |", "|---|---|---|---|---|---|---|"]
        for label, e in (("1 GPU", d1), ("N GPUs", dn)):
            if e.get("status") == "ok":
                lines.append(f"| {label} | {e['workers']} | {fmt(e.get('pairs_per_s_per_gpu'))} | "
                             f"{fmt(e.get('pairs_per_s'))} | {fmt(e.get('s_per_step'), '.3f')} | "
                             f"{fmt(e.get('useful_tflops_per_gpu'), '.1f')} | {_peak(e)} |")
        lines.append(f"| GPU.md plain torch, 1 GPU | 1 | {GPU_MD['lora_dpo_pairs_per_s']} | "
                     f"{GPU_MD['lora_dpo_pairs_per_s']} | {GPU_MD['lora_dpo_s_per_step']} | {GPU_MD['lora_dpo_tflops']} | "
                     f"alloc {GPU_MD['lora_dpo_peak_gb']} GB |")
        if "scaling_efficiency" in dn:
            lines.append(f"\nscaling efficiency (pairs/s with N) / (N x pairs/s with 1): {dn['scaling_efficiency']:.2f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Section 1: the model folder


def padded_tokenizer(texts: list[str], base_size: int = LLAVA_IMAGE_TOKEN_ID):
    """The project's word-level tokenizer over `texts`, padded with filler words to `base_size` entries,
    so that the <image> token it adds last gets id `base_size` (32000, as in llava-hf)."""
    from orchestrator.model.llava import build_word_tokenizer

    tokenizer = build_word_tokenizer(texts)
    missing = base_size - (len(tokenizer) - 1)
    if missing > 0:
        filler = " ".join(f"zzpad{k:05d}" for k in range(missing))
        tokenizer = build_word_tokenizer(list(texts) + [filler])
    return tokenizer


def world_texts() -> list[str]:
    from orchestrator.data.synthetic import SynthConfig, world_vocabulary

    return [" ".join(world_vocabulary(SynthConfig(seed=0)))]


def matmul_tflops() -> float | None:
    """The measured bf16 matmul ceiling, by the same probe as benchmarks/dpo_step.py (None on CPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    tflops = dpo_step_module().matmul_ceiling("cuda")
    torch.cuda.empty_cache()
    return tflops


def build_model_section(args, model_dir: Path) -> dict:
    import torch

    from orchestrator.model.templates import IMAGE_PLACEHOLDER

    entry: dict[str, Any] = {"shape": "tiny" if args.tiny else "llava-1.5-7b", "path": str(model_dir)}
    entry["matmul_tflops"] = matmul_tflops() if args.use_gpu else None
    marker = model_dir / "multi_gpu_model.json"
    if marker.is_file() and not args.rebuild:
        info = json.loads(marker.read_text())
        if info.get("shape") == entry["shape"]:
            entry.update(info, source="reused")
            entry["folder_gb"] = folder_gb(model_dir)
            return entry
    shutil.rmtree(model_dir, ignore_errors=True)
    dpo_step = dpo_step_module()
    device = "cuda" if args.use_gpu else "cpu"
    dtype = torch.bfloat16 if args.use_gpu else torch.float32
    tokenizer = padded_tokenizer(world_texts())
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    started = time.time()
    model = dpo_step.build_model(args.tiny, device, dtype)  # on the GPU, in bf16, from the config: no CPU init
    if args.use_gpu:
        torch.cuda.synchronize()
    entry["build_s"] = time.time() - started
    config = model.config
    vision = config.vision_config
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the model's vocabulary {config.text_config.vocab_size}")
    config.image_token_index = image_token   # the padded tokenizer's <image>: LLAVA_IMAGE_TOKEN_ID
    processor = shape_processor(tokenizer, TINY_SHAPE if args.tiny else LLAVA_15_7B)
    started = time.time()
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    entry["save_s"] = time.time() - started
    info = {"shape": entry["shape"], "params": sum(p.numel() for p in model.parameters()),
            "params_llm_nonembed": sum(p.numel() for n, p in model.model.language_model.named_parameters()
                                       if "embed_tokens" not in n),
            "dtype": str(dtype).replace("torch.", ""), "vocab_size": config.text_config.vocab_size,
            "tokenizer_size": len(tokenizer), "image_token_id": image_token, "image_size": vision.image_size,
            "image_tokens": config.image_seq_length}
    del model
    gc.collect()
    if args.use_gpu:
        torch.cuda.empty_cache()
    marker.write_text(json.dumps(info, indent=1))
    entry.update(info, source="built")
    entry["folder_gb"] = folder_gb(model_dir)
    return entry


def folder_gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9


# ------------------------------------------------------------------------------------------------
# Section 2: the data


def build_data_section(args, out: Path, model_dir: Path) -> tuple[dict, list[dict], dict]:
    """The synthetic world (training images + POPE), preference rows with ~answer_tokens answers."""
    from orchestrator.data import formats
    from orchestrator.data.synthetic import DESCRIPTION_PROMPTS, SynthConfig, generate_world
    from orchestrator.model.llava import load_processor
    from orchestrator.model.templates import build_prompt, encode_prompt

    marker = json.loads((model_dir / "multi_gpu_model.json").read_text())
    size, image_tokens = marker["image_size"], marker["image_tokens"]
    n_images = max(1, args.rows // 2)
    world = out / f"world-{size}"
    synth = SynthConfig(seed=0, num_images=n_images, num_pope_images=args.pope_images, image_size=size,
                        milebench_tasks=0)
    started = time.time()
    manifest = generate_world(world, synth)
    world_s = time.time() - started
    tokenizer = load_processor(model_dir).tokenizer
    pre = tokenizer.backend_tokenizer.pre_tokenizer

    def answer(sentences: list[str]) -> str:
        pieces: list[str] = []
        k = 0
        while len(pieces) < args.answer_tokens - 1:  # </s> is the last answer token
            pieces += [p for p, _ in pre.pre_tokenize_str(sentences[k % len(sentences)])]
            k += 1
        return " ".join(pieces[: args.answer_tokens - 1])

    desc = json.loads(Path(manifest.desc_data).read_text())
    paths = formats.vg_image_paths(manifest.vg_image_data, manifest.vg_dir)
    rows: list[dict] = []
    for image_id in sorted(desc, key=int):
        for repeat in range(2):
            if len(rows) >= args.rows:
                break
            record = desc[image_id]
            rows.append({"sample_id": f"mg-{int(image_id):05d}-{repeat}", "source": "desc", "image_id": image_id,
                         "image": paths[image_id], "prompt": DESCRIPTION_PROMPTS[(int(image_id) + repeat) % 4],
                         "chosen": answer(record["chosen"][repeat:] + record["chosen"][:repeat]),
                         "rejected": answer(record["rejected"][repeat:] + record["rejected"][:repeat])})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    prompt_lens = [len(encode_prompt(tokenizer, build_prompt(r["prompt"], "v1"), image_id, image_tokens)) for r in rows]
    chosen = [len(tokenizer(r["chosen"], add_special_tokens=False)["input_ids"]) + 1 for r in rows]
    rejected = [len(tokenizer(r["rejected"], add_special_tokens=False)["input_ids"]) + 1 for r in rows]
    unknown = sum(tokenizer(r["chosen"] + " " + r["prompt"], add_special_tokens=False)["input_ids"].count(0)
                  for r in rows)
    pope_files = dict(manifest.pope_files)
    pope_questions = sum(len(Path(p).read_text().splitlines()) for p in pope_files.values())
    entry = {"rows": len(rows), "train_images": len({r["image"] for r in rows}), "image_size": size,
             "image_tokens": image_tokens, "prompt_tokens_mean": sum(prompt_lens) / len(rows),
             "chosen_tokens_mean": sum(chosen) / len(rows), "rejected_tokens_mean": sum(rejected) / len(rows),
             "seq_tokens_mean": sum(prompt_lens) / len(rows) + (sum(chosen) + sum(rejected)) / (2 * len(rows)),
             "unknown_tokens": unknown, "pope_images": args.pope_images, "pope_questions": pope_questions,
             "world": str(world), "world_s": world_s}
    pope = {"questions": pope_files, "image_root": manifest.coco_images}
    return entry, rows, pope


# ------------------------------------------------------------------------------------------------
# Configs


def make_config(args, name: str, *, workers: int, lora: bool = True, steps: int, log_every: int,
                checkpoint_every: int, max_failures: int = 0, offload_optimizer: bool = False,
                pope: dict | None = None, actors: int = 1, zero_stage: int | str | None = None):
    from orchestrator.config import config_from_dict

    if zero_stage is None:
        zero_stage = args.zero_stage if args.zero_stage == "auto" else int(args.zero_stage)

    raw = {
        "name": name,
        "output_root": str(args.out / "runs"),
        "model": {"path": str(args.model_dir), "train_template": "v1", "eval_template": "llava_v1",
                  "dtype": "auto", "attn_implementation": "sdpa"},
        "train": {
            "loss": "sigmoid", "beta": 0.1, "learning_rate": 1e-4 if args.tiny else 2e-6, "warmup_ratio": 0.0,
            "lr_schedule": "constant", "max_steps": steps, "batch_size_per_worker": args.pairs,
            "gradient_accumulation": 1, "max_length": 2048,
            "gradient_checkpointing": args.checkpointing if args.checkpointing == "auto" else args.checkpointing == "true",
            "prefix_sharing": not args.plain_pairs, "reference_cache": not args.plain_pairs,
            "bf16": args.use_gpu,
            "lora": {"enabled": lora, "rank": args.lora_rank, "alpha": 2 * args.lora_rank, "dropout": 0.05},
            "deepspeed": {"enabled": True, "zero_stage": zero_stage, "offload_optimizer": offload_optimizer,
                          "offload_params": False, "torch_adam": True},
            "checkpoint_every_steps": checkpoint_every, "keep_checkpoints": 2, "max_failures": max_failures,
            "log_every_steps": log_every, "seed": 42,
        },
        "scaling": {"num_workers": workers, "use_gpu": args.use_gpu, "gpu_memory_gb": args.gpu_memory_gb,
                    "cpus_per_worker": args.cpus_per_worker, "gpus_per_worker": 1.0 if args.use_gpu else 0.0},
        "eval": {"mode": args.eval_mode, "max_new_tokens": 3, "batch_size": args.eval_batch, "num_actors": actors,
                 "cpus_per_actor": args.cpus_per_worker, "gpus_per_actor": 1.0 if args.use_gpu else 0.0,
                 "prefix_reuse": True},
        "wandb": {"mode": "disabled"},
        "env": {"offline": True, "extra": dict(args.env_extra)},
    }
    if pope:
        raw["data"] = {"pope": pope}
    return config_from_dict(raw, f"multi_gpu:{name}")


def timing_plan(steps: int, warmup: int | None) -> tuple[int, int]:
    """(warmup, log_every): the first `warmup` steps are untimed; curves rows fall on the warmup step."""
    if warmup is None:
        warmup = steps - 8 if steps >= 12 else max(1, steps // 3)
    warmup = min(max(1, warmup), steps - 1)
    return warmup, math.gcd(warmup, steps)


def train_run(args, name: str, dataset, *, workers: int, lora: bool = True, steps: int, warmup: int,
              log_every: int, stop_early: bool, offload_optimizer: bool = False, deadline: float | None = None,
              checkpoint_every: int | None = None, max_failures: int = 0, kill: dict | None = None,
              zero_stage: int | str | None = None) -> dict:
    """One run_training call with a StepProbe; returns timings, memory and what the run reported."""
    import pyarrow.parquet as pq

    from orchestrator.train.trainer import run_training

    max_steps = steps + 1 if stop_early else steps
    cfg = make_config(args, name, workers=workers, lora=lora, steps=max_steps, log_every=log_every,
                      checkpoint_every=checkpoint_every or 10 ** 6, max_failures=max_failures,
                      offload_optimizer=offload_optimizer, zero_stage=zero_stage)
    probe_dir = args.out / "probe"
    probe_dir.mkdir(parents=True, exist_ok=True)
    for old in probe_dir.glob(f"{name}.rank*.jsonl"):
        old.unlink()
    hook = StepProbe(str(probe_dir), name, stop_at=max_steps if stop_early else None, deadline=deadline,
                     **(kill or {}))
    entry: dict[str, Any] = {"workers": workers, "steps": steps, "warmup_steps": warmup, "lora": lora,
                             "zero_stage": cfg.train.deepspeed.zero_stage, "offload_optimizer": offload_optimizer,
                             "pairs_per_worker": args.pairs}
    started = time.time()
    error = None
    result = None
    try:
        result = run_training(cfg, "dpo", base_model=str(args.model_dir), resume=False, dataset=dataset,
                              step_hook=hook)
    except Exception as exc:  # a planned stop surfaces as a failed run; anything else is reported
        error = exc
    entry["wall_s"] = time.time() - started
    from orchestrator.layout import timings_path

    clock = timings_path(cfg.run_dir, "dpo")  # rank 0's record: the engine the recipe resolved ("auto" stage) and why
    if clock.is_file():
        recorded = json.loads(clock.read_text())
        entry.update(engine=recorded.get("engine"), engine_reason=recorded.get("engine_reason"))
    records = read_probe(probe_dir, name)
    planned = error is not None and STOP_MESSAGE in _error_text(error)
    if error is not None and not planned:
        entry["error"] = _short_error(error)
    entry["planned_stop"] = planned
    if planned and "out of time budget" in _error_text(error):
        entry["stopped_by_budget"] = True
    entry.update(probe_timing(records, warmup, args.pairs, last=steps))
    first = min((r["time"] for rows in records.values() for r in rows), default=None)
    if first is not None:
        # Ray Train start + model load + DeepSpeed engine + the first step
        entry["to_first_step_s"] = first - started
    curves_file = cfg.run_dir / "train" / "dpo_curves.parquet"
    curves = pq.read_table(curves_file).to_pylist() if curves_file.is_file() else []
    entry["curves"] = [{k: row.get(k) for k in ("step", "loss", "samples_per_s", "tokens_per_s", "resumed_from_step",
                                                  "grad_norm")} for row in curves]
    entry.update(curves_timing([r for r in curves if r["step"] <= steps], warmup, args.pairs, workers))
    if result is not None:
        entry["metrics"] = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))}
        entry["checkpoint_path"] = result.checkpoint_path
    entry["_records"] = records
    return entry


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    cause = error.__cause__ or error.__context__
    if cause is not None:
        text += f" | {type(cause).__name__}: {cause}"
    return text


def _short_error(error: BaseException, limit: int = 1500) -> str:
    text = _error_text(error)
    if "out of memory" in text.lower() or "OutOfMemoryError" in text:
        match = re.search(r"(CUDA out of memory.{0,300})", text, re.S)
        return "OOM: " + (match.group(1) if match else text[-limit:])
    return text if len(text) <= limit else text[:limit // 3] + " ... " + text[-2 * limit // 3:]


# ------------------------------------------------------------------------------------------------
# Sections 3-6


def dpo_section(args, dataset, workers: int, deadline: float) -> dict:
    warmup, log_every = timing_plan(args.steps, args.warmup)
    name = f"mg-dpo{workers}"
    say(f"{name}: LoRA r{args.lora_rank} DPO, ZeRO-{args.zero_stage}, {workers} worker(s) x {args.pairs} pairs, {args.steps} steps "
        f"(first {warmup} untimed)")
    entry = train_run(args, name, dataset, workers=workers, steps=args.steps, warmup=warmup, log_every=log_every,
                      stop_early=not args.final_checkpoints, deadline=deadline)
    entry.pop("_records", None)
    if "error" in entry or "pairs_per_s" not in entry:
        entry.setdefault("error", "no timed steps recorded")
        raise SectionFailed(entry)
    n_llm, seq = getattr(args, "flop_basis", (None, None))
    if n_llm and seq:
        # dpo_step.py's / GPU.md's "useful FLOPs" = 6 * N_llm * tokens (policy fwd + bwd + reference fwd)
        entry["useful_tflops_per_gpu"] = 6 * n_llm * 2 * seq * entry["pairs_per_s_per_gpu"] / 1e12
    return entry


def full_section(args, dataset, workers: int, deadline: float, seq_len: int) -> dict:
    from orchestrator.plan import fits, plan_for

    steps = args.full_steps
    warmup = 1
    name = "mg-full"
    base = make_config(args, name, workers=workers, lora=False, steps=steps, log_every=1, checkpoint_every=10 ** 6,
                       zero_stage=3)
    plan = plan_for(base, seq_len)
    corrected = plan.total_gb  # the planner counts the frozen reference as the recipe keeps it (none with the cache)
    capacity = base.scaling.gpu_memory_gb * 0.95
    if args.full_offload == "auto":
        offload = args.use_gpu and (not fits(plan) or corrected > capacity)
    else:
        offload = args.full_offload == "on"
    entry: dict[str, Any] = {"plan_gb": plan.total_gb, "plan_gb_corrected": corrected, "plan_capacity_gb": capacity,
                             "plan_components": {k: round(v, 2) for k, v in plan.components.items()}}
    if offload:
        off = plan_for(make_config(args, name, workers=workers, lora=False, steps=steps, log_every=1,
                                   checkpoint_every=10 ** 6, offload_optimizer=True, zero_stage=3), seq_len)
        entry["plan_gb_offload_corrected"] = off.total_gb
    say(f"{name}: full-parameter DPO, ZeRO-3 over {workers} worker(s), {steps} steps; plan {plan.total_gb:.1f} GB/GPU, "
        f"{corrected:.1f} with the unsharded reference -> optimizer offload {'ON' if offload else 'off'}")
    attempts = []
    run = train_run(args, name, dataset, workers=workers, lora=False, steps=steps, warmup=warmup, log_every=1,
                    stop_early=True, offload_optimizer=offload, deadline=deadline, zero_stage=3)
    attempts.append(run)
    oom = "error" in run and run["error"].startswith("OOM")
    if oom and not offload and args.full_offload == "auto" and time.time() < deadline - SECTION_SECONDS["full"] * 0.6:
        say(f"{name}: out of GPU memory without offload; retrying with the optimizer offloaded to CPU")
        run = train_run(args, name, dataset, workers=workers, lora=False, steps=steps, warmup=warmup, log_every=1,
                        stop_early=True, offload_optimizer=True, deadline=deadline, zero_stage=3)
        attempts.append(run)
    for attempt in attempts:
        attempt.pop("_records", None)
    entry.update(run)
    if len(attempts) > 1:
        entry["first_attempt"] = {k: attempts[0].get(k) for k in ("error", "offload_optimizer", "steps_done",
                                                                    "peak_allocated_gb_max", "memory_per_rank")}
    entry["ran"] = run.get("steps_done", 0) >= 1  # at least one full-parameter optimizer step
    if not entry["ran"] or (run.get("steps_done", 0) < steps and not run.get("stopped_by_budget")):
        entry.setdefault("error", f"reached step {run.get('steps_done', 0)} of {steps}")
        raise SectionFailed(entry)
    return entry


def kill_section(args, dataset, workers: int, deadline: float) -> dict:
    every = args.kill_every
    kill_step, final = every + max(1, every // 2), 2 * every
    name = "mg-kill"
    marker = args.out / "kill-marker.json"
    marker.unlink(missing_ok=True)
    say(f"{name}: {workers} workers, checkpoint every {every} steps, rank 1 exits at step {kill_step} once, "
        f"target step {final}")
    entry = train_run(args, name, dataset, workers=workers, steps=final, warmup=1, log_every=max(1, every // 2),
                      stop_early=False, checkpoint_every=every, max_failures=1, deadline=None,
                      kill={"kill_rank": 1, "kill_step": kill_step, "kill_marker": str(marker),
                            "kill_sleep": args.kill_sleep})
    records = entry.pop("_records", {})
    for key in ("timed_steps", "s_per_step", "pairs_per_s", "pairs_per_s_per_gpu", "curves_pairs_per_s",
                "curves_pairs_per_s_per_gpu", "curves_tokens_per_s"):
        entry.pop(key, None)  # the timed window spans the restart: not a throughput
    metrics = entry.get("metrics", {})
    entry.update(kill_step=kill_step, target_step=final, checkpoint_every=every, killed=marker.exists(),
                 resumed_from_step=metrics.get("resumed_from_step"), final_step=metrics.get("step"),
                 curves_resumed_from=[row.get("resumed_from_step") for row in entry["curves"]],
                 curves_steps=[row["step"] for row in entry["curves"]])
    if marker.exists():
        killed_at = json.loads(marker.read_text())["time"] + args.kill_sleep
        after = [r["time"] for r in records.get(0, []) if r["time"] > killed_at]
        if after:
            entry["recovery_s"] = min(after) - killed_at  # restart + reload + restore + one step
        entry["attempt_pids_rank1"] = sorted({r["pid"] for r in records.get(1, [])})
    entry["passed"] = bool(entry["killed"] and entry["resumed_from_step"] == every and entry["final_step"] == final)
    if not entry["passed"]:
        entry.setdefault("error", f"killed={entry['killed']} resumed_from_step={entry['resumed_from_step']} "
                                  f"final_step={entry['final_step']} (expected {every} and {final})")
        raise SectionFailed(entry)
    return entry


class _EvalProgress(logging.Handler):
    """Keeps (time, answered) from run_eval's 'eval [inference] ... N/M' progress lines."""

    pattern = re.compile(r"eval \[inference\] \S+: (\d+)/(\d+)")

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.points: list[tuple[float, int]] = []

    def emit(self, record):
        match = self.pattern.search(record.getMessage())
        if match:
            self.points.append((record.created, int(match.group(1))))


def pope_section(args, pope: dict, workers: int) -> dict:
    from orchestrator.eval.runner import run_eval

    entry: dict[str, Any] = {"actors_n": workers, "pope_images": args.pope_images, "mode": args.eval_mode,
                             "prefix_reuse": True, "batch_size": args.eval_batch}
    runner_log = logging.getLogger("orchestrator.eval.runner")
    for actors in dict.fromkeys([1, workers]):
        name = f"mg-pope{actors}"
        cfg = make_config(args, name, workers=1, steps=1, log_every=1, checkpoint_every=1, pope=pope, actors=actors)
        shutil.rmtree(cfg.run_dir / "eval", ignore_errors=True)  # no resume: every question is computed
        say(f"{name}: run_eval POPE (score mode, prefix reuse) with {actors} actor(s) x "
            f"{'1 GPU' if args.use_gpu else f'{args.cpus_per_worker} CPU'}")
        progress = _EvalProgress()
        runner_log.addHandler(progress)
        started = time.time()
        try:
            result = run_eval(cfg, model_path=str(args.model_dir), benchmarks=("pope",), tag=f"multi-gpu-{actors}")
        finally:
            runner_log.removeHandler(progress)
        wall = time.time() - started
        counts = result.counts
        run: dict[str, Any] = {"wall_s": wall, "computed": counts.get("computed"), "errors": counts.get("errors"),
                               "qps_wall": counts.get("computed", 0) / wall if wall else None}
        points = progress.points
        if points:
            run["first_block_s"] = points[0][0] - started  # actor start + model load + first block
            run["blocks"] = len(points)
            # Steady state: from the arrival of the actors-th block (by then every actor has loaded its
            # model and answered a block) to the last one.
            first = min(actors, len(points)) - 1
            if len(points) - 1 > first and points[-1][0] > points[first][0]:
                run["qps_steady"] = (points[-1][1] - points[first][1]) / (points[-1][0] - points[first][0])
                run["steady_blocks"] = len(points) - 1 - first
        if result.pope_table is not None:
            mean = result.pope_table[result.pope_table["split"] == "mean"]
            if len(mean):
                run["mean_f1"] = float(mean["f1"].iloc[0])
        entry[f"actors_{actors}"] = run
        entry["questions"] = counts.get("items")
        if counts.get("errors"):
            entry.setdefault("warnings", []).append(f"{actors} actor(s): {counts['errors']} error rows")
    one, many = entry.get("actors_1", {}), entry.get(f"actors_{workers}", {})
    if one.get("qps_steady") and many.get("qps_steady"):
        entry["ratio_steady"] = many["qps_steady"] / one["qps_steady"]
    if one.get("qps_wall") and many.get("qps_wall"):
        entry["ratio_wall"] = many["qps_wall"] / one["qps_wall"]
    if any(entry[f"actors_{a}"].get("computed") != entry["questions"] for a in dict.fromkeys([1, workers])):
        entry["error"] = "not every question was computed (a previous run's answers were reused?)"
        raise SectionFailed(entry)
    return entry


class SectionFailed(Exception):
    def __init__(self, entry: dict):
        super().__init__(entry.get("error", "failed"))
        self.entry = entry


# ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder (model, data, runs, results.json)")
    parser.add_argument("--gpus", type=int, default=None, help="N: GPUs / workers (default: all visible; tiny: 2)")
    parser.add_argument("--tiny", action="store_true", help="tiny LLaVA on CPU, gloo, fp32 (a check of the logic)")
    parser.add_argument("--steps", type=int, default=None, help="LoRA DPO steps per run (default 12; tiny 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default steps-8 or steps//3)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per GPU (default 4; tiny 2)")
    parser.add_argument("--answer-tokens", type=int, default=None, help="tokens per answer incl. </s> (128; tiny 16)")
    parser.add_argument("--lora-rank", type=int, default=None, help="default 128 (tiny 8)")
    parser.add_argument("--rows", type=int, default=None, help="preference pairs in the dataset (default 64; tiny 32)")
    parser.add_argument("--full-steps", type=int, default=None, help="full fine-tune steps (default 4; tiny 3)")
    parser.add_argument("--full-offload", choices=["auto", "on", "off"], default="auto",
                        help="optimizer CPU offload for the full fine-tune (auto: from orchestrator.plan)")
    parser.add_argument("--kill-every", type=int, default=None, help="checkpoint interval of the kill test "
                        "(default 4: kill at 6, target 8; tiny 2)")
    parser.add_argument("--kill-sleep", type=float, default=None, help="seconds the killed worker waits first "
                        "(default 8; tiny 5)")
    parser.add_argument("--pope-images", type=int, default=None, help="POPE images x 18 questions (default 200; tiny 4)")
    parser.add_argument("--eval-batch", type=int, default=None, help="eval.batch_size (default 64: 14 images/block; tiny 8)")
    parser.add_argument("--cpus-per-worker", type=float, default=None, help="default 4 (tiny 0.5)")
    parser.add_argument("--skip", default="", help=f"comma-separated sections to skip: {','.join(SKIPPABLE)}")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole script (default 540; "
                        "tiny 900)")
    parser.add_argument("--final-checkpoints", action="store_true",
                        help="let the LoRA throughput runs write their final checkpoint (default: stop before it)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the model folder even if it is there")
    parser.add_argument("--ray-temp", default=None, help="Ray's temp dir (default /tmp/ray-mg-<uid>)")
    parser.add_argument("--ray-address", default=None,
                        help="join the Ray at this address instead of starting a local one (the tests join theirs)")
    parser.add_argument("--zero-stage", choices=["auto", "0", "1", "2", "3"], default="auto",
                        help="train.deepspeed.zero_stage (auto, the default: the planner's choice, logged by the recipe)")
    parser.add_argument("--eval-mode", choices=["generate", "score"], default="generate",
                        help="eval.mode of the POPE section (prefix reuse either way)")
    parser.add_argument("--checkpointing", choices=["true", "false", "auto"], default="auto",
                        help="train.gradient_checkpointing (auto: the planner decides)")
    parser.add_argument("--plain-pairs", action="store_true",
                        help="2B plain rows with the reference in the loop (train.prefix_sharing and "
                             "train.reference_cache off) instead of packed pairs and cached reference log-probs")
    args = parser.parse_args(argv)
    tiny = args.tiny

    def pick(value, gpu, cpu):
        return value if value is not None else (cpu if tiny else gpu)

    args.steps = pick(args.steps, 12, 4)
    args.pairs = pick(args.pairs, 4, 2)
    args.answer_tokens = pick(args.answer_tokens, 128, 16)
    args.lora_rank = pick(args.lora_rank, 128, 8)
    args.rows = pick(args.rows, 64, 32)
    args.full_steps = max(2, pick(args.full_steps, 4, 3))
    args.kill_every = max(2, pick(args.kill_every, 4, 2))
    args.kill_sleep = pick(args.kill_sleep, 8.0, 5.0)
    args.pope_images = pick(args.pope_images, 200, 4)
    args.eval_batch = pick(args.eval_batch, 64, 8)
    args.cpus_per_worker = pick(args.cpus_per_worker, 4.0, 0.5)
    args.budget = pick(args.budget, 540.0, 900.0)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (one untimed, one timed)")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    aliases = {"dpo": {"dpo1", "dpoN"}, "dpon": {"dpoN"}, "dpo_n": {"dpoN"}, "dpo_1": {"dpo1"}}
    args.skip = set()
    for item in skip:
        names = aliases.get(item.lower(), {item})
        unknown = names - set(SKIPPABLE)
        if unknown:
            parser.error(f"--skip: unknown section {sorted(unknown)}; known: {','.join(SKIPPABLE)}")
        args.skip |= names
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out = args.out.expanduser().resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    deadline_all = T0 + args.budget

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    from orchestrator.ray_session import project_env_defaults

    # DeepSpeed's JIT ops (on CPU: its shm comm op) are built once into the project's cache, as the tests do.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    for key, value in project_env_defaults(args.out / "runs").items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    import torch

    args.use_gpu = not args.tiny
    args.gpu_memory_gb = 80.0  # the planner's GiB per GPU (checkpointing "auto"): the card's own where there is one
    if args.use_gpu:
        args.gpu_memory_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    if args.use_gpu and not torch.cuda.is_available():
        print("no GPU visible: the 7B shape needs GPUs; use --tiny for the CPU check", file=sys.stderr)
        return 2
    visible = torch.cuda.device_count() if args.use_gpu else 0
    args.gpus = args.gpus or (visible if args.use_gpu else 2)
    if args.use_gpu and args.gpus > visible:
        print(f"--gpus {args.gpus} but only {visible} visible", file=sys.stderr)
        return 2
    env_extra = {"NCCL_NVLS_ENABLE": "0"}
    if args.use_gpu:
        major, minor = torch.cuda.get_device_capability(0)
        env_extra["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # DeepSpeed cannot parse the image's "9.0a"
        os.environ["TORCH_CUDA_ARCH_LIST"] = env_extra["TORCH_CUDA_ARCH_LIST"]
        torch.backends.cuda.matmul.allow_tf32 = True
    args.env_extra = env_extra
    args.model_dir = args.out / ("model-tiny" if args.tiny else "model7b")

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("orchestrator", "hadpo"):
        logging.getLogger(name).setLevel(logging.INFO)
    versions = {"torch": torch.__version__}
    for package in ("transformers", "peft", "deepspeed", "ray"):
        try:
            versions[package] = __import__(package).__version__
        except Exception as error:  # reported, not fatal here (the sections that need it fail)
            versions[package] = f"unavailable: {error}"
    meta = {"argv": sys.argv, "host": platform.node(), "cpus": os.cpu_count(), "gpus": args.gpus,
            "device": torch.cuda.get_device_name(0) if args.use_gpu else "cpu", "tiny": args.tiny,
            "steps": args.steps, "pairs_per_gpu": args.pairs, "answer_tokens": args.answer_tokens,
            "lora_rank": args.lora_rank, "budget_s": args.budget, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "versions": versions, "gpu_md_reference": GPU_MD}
    results = Results(args.out, meta)
    say(f"multi_gpu: {meta['device']} x {args.gpus}, {'tiny on CPU' if args.tiny else 'LLaVA-1.5-7B shape'}, "
        f"out {args.out}, budget {args.budget:.0f}s; versions {versions}")
    scale = 0.1 if args.tiny else 1.0

    state: dict[str, Any] = {}

    def section(name: str, fn: Callable[[], dict], needs: tuple[str, ...] = ()) -> None:
        started = time.time()
        if name in args.skip:
            results.record(name, {"status": "skipped", "reason": "--skip", "seconds": 0.0})
            return
        missing = [n for n in needs if results.data["sections"].get(n, {}).get("status") != "ok"]
        if missing:
            results.record(name, {"status": "skipped", "reason": f"needs {','.join(missing)}", "seconds": 0.0})
            return
        left = deadline_all - time.time()
        if name in SECTION_SECONDS and left < SECTION_SECONDS[name] * scale:
            results.record(name, {"status": "skipped", "reason": f"budget: {left:.0f}s left, needs "
                                  f"~{SECTION_SECONDS[name] * scale:.0f}s", "seconds": 0.0})
            return
        say(f"== section {name} ({left:.0f}s of budget left)")
        try:
            entry = fn()
            entry = {"status": "ok", **entry}
        except SectionFailed as failed:
            entry = {"status": "failed", **failed.entry}
        except KeyboardInterrupt:  # SIGTERM / Ctrl-C: record the section, then stop
            results.record(name, {"status": "interrupted", "seconds": time.time() - started})
            raise
        except Exception as error:  # one failure must not lose the other sections
            traceback.print_exc()
            entry = {"status": "failed", "error": _short_error(error)}
        entry["seconds"] = time.time() - started
        results.record(name, entry)

    try:
        section("model", lambda: build_model_section(args, args.model_dir))

        def data():
            entry, rows, pope = build_data_section(args, args.out, args.model_dir)
            state.update(rows=rows, pope=pope, seq_len=int(round(entry["seq_tokens_mean"])))
            args.flop_basis = (results.data["sections"]["model"].get("params_llm_nonembed"), entry["seq_tokens_mean"])
            return entry

        section("data", data, needs=("model",))
        if results.data["sections"]["data"]["status"] == "ok":
            import ray

            temp = args.ray_temp or f"/tmp/ray-mg-{os.getuid()}"
            runtime_env = {"env_vars": {"WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                                        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env_extra}}
            started = time.time()
            if args.ray_address:
                ray.init(address=args.ray_address, log_to_driver=True, runtime_env=runtime_env)
            else:
                ray.init(num_gpus=args.gpus if args.use_gpu else 0, num_cpus=os.cpu_count(), _temp_dir=temp,
                         include_dashboard=False, log_to_driver=True, runtime_env=runtime_env)
            say(f"Ray started in {time.time() - started:.1f}s: {ray.cluster_resources()}")
            ray.data.DataContext.get_current().enable_progress_bars = False
            state["dataset"] = ray.data.from_items(state["rows"])
        n = args.gpus

        def deadline() -> float:
            return deadline_all

        section("dpo1", lambda: dpo_section(args, state["dataset"], 1, deadline()), needs=("data",))

        def dpo_n():
            entry = dpo_section(args, state["dataset"], n, deadline())
            one = results.data["sections"].get("dpo1", {})
            if one.get("status") == "ok" and one.get("pairs_per_s") and entry.get("pairs_per_s"):
                entry["scaling_efficiency"] = entry["pairs_per_s"] / (n * one["pairs_per_s"])
                if one.get("curves_pairs_per_s") and entry.get("curves_pairs_per_s"):
                    entry["scaling_efficiency_curves"] = entry["curves_pairs_per_s"] / (n * one["curves_pairs_per_s"])
            return entry

        if n > 1:
            section("dpoN", dpo_n, needs=("data",))
        else:
            results.record("dpoN", {"status": "skipped", "reason": "N = 1", "seconds": 0.0})
        section("pope", lambda: pope_section(args, state["pope"], n), needs=("data",))
        if n > 1:
            section("kill", lambda: kill_section(args, state["dataset"], n, deadline()), needs=("data",))
        else:
            results.record("kill", {"status": "skipped", "reason": "needs 2 workers", "seconds": 0.0})
        section("full", lambda: full_section(args, state["dataset"], n, deadline(), state["seq_len"]),
                needs=("data",))
    except KeyboardInterrupt as interrupted:
        say(f"interrupted ({interrupted}); results so far are in {results.path}")
    finally:
        results.data["meta"]["total_s"] = time.time() - T0
        results._write()
        table = markdown_table(results)
        (args.out / "results.md").write_text(table + "\n")
        print("\n" + table + "\n", flush=True)
        say(f"results: {results.path} (table: {args.out / 'results.md'})")
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:
            pass
    failed = [k for k, v in results.data["sections"].items() if v.get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
