"""The product path timed: `hadpo run` at the LLaVA-1.5-7B shape, beside the plain torch loop on the same rows.

    python benchmarks/pipeline.py --out /tmp/pipe --json $OUT/pipeline.json     # one H200: ~6 min
    python benchmarks/pipeline.py --out /tmp/pipe --tiny                        # CPU smoke test (~3 min)

What runs is `orchestrator.pipeline.run_pipeline`, the function behind `hadpo run` and `jobs/run.py`, with
`configs/llava15_7b_hadpo.yaml` as shipped except for sizes and paths (`SIZE_OVERRIDES`; `--set KEY=VALUE`
adds more): data check -> DPO (Ray Train) -> POPE of the base model and of the adapter, in one pass of one
actor pool -> run record. Its inputs:

  model   a LLaVA-1.5-7B-shaped llava-hf folder with random weights (benchmarks/multi_gpu.py's model
          section: CLIP ViT-L/14-336 + Vicuna-7B shapes, the project's word-level tokenizer padded to 32000
          words, a 336 px processor), built on the GPU and saved once under --out.
  data    the synthetic world at the model's image size, written in the real formats: Visual Genome
          images + image_data.json, an HA-DPO desc_data.json whose chosen / rejected descriptions have
          HA-DPO-like lengths (uniform in --answer-tokens, 100-200 tokens), and POPE question files
          (--pope-images images x 6 questions x 3 splits: 500 gives POPE's 9,000 questions).

Per stage it prints the wall time, the start-up (stage start to the first optimizer step / the first
answered block; for an evaluation that came second in a shared pass, from the previous one's last block: its
model load in the actor that is already up), the steady-state throughput (DPO: over the steps after --warmup, at least 40; POPE: the
blocks after the first), and the GPU memory (the training worker's peak allocated; the device's peak use
from nvidia-smi over each stage). Then, in the same run, the plain torch loop (benchmarks/dpo_step.py's
packed step: no Ray, no DeepSpeed, batches collated before timing) on the same rows in the same order with
the same cached reference log-probs, and the ratio of the two. Random weights make the answers
meaningless (the POPE numbers are noise) and never stop on </s>, so answers run to `eval.max_new_tokens`
(--max-new-tokens, 16: HA-DPO's sentence-long answers); the throughput is real.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import fmt, load_benchmark  # noqa: E402

SHIPPED_CONFIG = ROOT / "configs" / "llava15_7b_hadpo.yaml"
T0 = time.time()


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.1f}s] {message}", flush=True)


# ------------------------------------------------------------------------------------------------
# Inputs


def long_answer(rng: random.Random, sentences: list[str], words: int) -> str:
    """A description of exactly `words` word-level tokens, cycling through a record's own sentences."""
    pieces: list[str] = []
    start = rng.randrange(len(sentences))
    k = 0
    while len(pieces) < words:
        pieces += sentences[(start + k) % len(sentences)].replace(".", " .").replace(",", " ,").split()
        k += 1
    return " ".join(pieces[:words])


def write_inputs(args, out: Path, image_size: int) -> dict[str, Any]:
    """The synthetic world at `image_size`, an HA-DPO desc file with long answers, the POPE files."""
    from orchestrator.data.synthetic import SynthConfig, generate_world

    world = out / f"world-{image_size}"
    n_images = max(1, math.ceil(args.rows / 2))  # HA-DPO uses each description pair twice
    manifest = generate_world(world, SynthConfig(seed=0, num_images=n_images, num_pope_images=args.pope_images,
                                                 image_size=image_size, milebench_tasks=0))
    desc = json.loads(Path(manifest.desc_data).read_text())
    rng = random.Random(0)
    low, high = args.answer_tokens
    long_desc = {}
    for image_id, record in desc.items():
        # one word-level token per word, and </s>: answers of low..high tokens
        long_desc[image_id] = {key: [long_answer(rng, record[key], rng.randint(low, high) - 1)
                                     for _ in record[key]] for key in ("chosen", "rejected")}
    desc_path = world / "hadpo" / "desc_data_long.json"
    desc_path.write_text(json.dumps(long_desc))
    questions = sum(len(Path(p).read_text().splitlines()) for p in manifest.pope_files.values())
    return {"world": str(world), "desc": str(desc_path), "vg_image_data": manifest.vg_image_data,
            "vg_root": manifest.vg_dir, "pope": dict(manifest.pope_files), "coco": manifest.coco_images,
            "train_images": n_images, "pope_questions": questions}


# The shipped 7B config's settings are kept; only what sizes the run (and the paths) changes.
def size_overrides(args, inputs: dict[str, Any], model_dir: Path, run_root: Path) -> list[str]:
    steps = args.warmup + args.steps
    sets = [
        "name=pipeline-bench", f"output_root={run_root}",
        f"data.hadpo_desc={inputs['desc']}", "data.hadpo_pope=null", f"data.vg_image_data={inputs['vg_image_data']}",
        f"data.vg_root={inputs['vg_root']}", "data.milebench_root=null",
        f"data.pope.questions={json.dumps(inputs['pope'])}", f"data.pope.image_root={inputs['coco']}",
        f"model.path={model_dir}",
        f"train.max_steps={steps}", f"train.batch_size_per_worker={args.pairs}",
        f"train.checkpoint_every_steps={10 * steps}",   # the final checkpoint only, as a short run would
        "train.log_every_steps=10",
        "scaling.num_workers=1", f"scaling.use_gpu={str(not args.tiny).lower()}", f"scaling.cpus_per_worker={args.cpus}",
        "eval.num_actors=1", f"eval.gpus_per_actor={0 if args.tiny else 1}", f"eval.cpus_per_actor={args.cpus}",
        f"eval.max_new_tokens={args.max_new_tokens}",
        "wandb.mode=disabled", "env.hf_home=null", "env.offline=true",
    ]
    if args.tiny:
        sets += ["model.dtype=float32", "train.bf16=false"]
    return sets + list(args.set or [])


# ------------------------------------------------------------------------------------------------
# Measuring


class GpuMemorySampler:
    """The device's used memory (nvidia-smi, every 0.5 s) in a background process, for per-stage peaks."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self.process = None
        if shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "500"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                self.samples.append((time.time(), float(line.split(",")[0]) / 1024))
            except ValueError:
                continue

    def peak_gib(self, start: float, end: float) -> float | None:
        inside = [gib for t, gib in self.samples if start <= t <= end]
        return max(inside) if inside else None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()


def stage_records(run_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "stages").glob("*.json"))}


def answer_blocks(record: dict) -> list[tuple[float, int]]:
    """(file time, rows) of each answer block an evaluation stage's actors wrote, in time order."""
    import pyarrow.parquet as pq

    answers = Path(record["outputs"]["answers_dir"])
    return sorted((p.stat().st_mtime, pq.read_metadata(p).num_rows) for p in answers.glob("*.parquet"))


def eval_timing(record: dict, blocks: list[tuple[float, int]], started: float | None = None) -> dict[str, Any]:
    """POPE stage: start-up to the first answered block and steady questions/s, from the answer blocks
    the actor writes as it finishes them (`answer_blocks`: file times) and its own start-up record. `started`:
    when the stage's own work began (default the record's start; for the second evaluation of a shared pass,
    the first one's last block)."""
    outputs = record["outputs"]
    started = record["started"] if started is None else started
    entry: dict[str, Any] = {"wall_s": record["seconds"], "answers": sum(n for _, n in blocks)}
    if blocks:
        entry["first_block_s"] = blocks[0][0] - started
        if len(blocks) > 1:
            later = sum(n for _, n in blocks[1:])
            entry["steady_qps"] = later / max(blocks[-1][0] - blocks[0][0], 1e-9)
        entry["end_to_end_qps"] = entry["answers"] / max(blocks[-1][0] - started, 1e-9)
    timings = sorted(Path(outputs["answers_dir"]).parent.glob("timings/*.json"))
    if timings:
        actor = json.loads(timings[-1].read_text())
        for key in ("process_started", "imports_done", "model_ready", "first_call_done"):
            if actor.get(key):
                entry[f"actor_{key}_s"] = actor[key] - started
    return entry


def dpo_timing(record: dict, timings_file: Path, warmup: int, pairs: int) -> dict[str, Any]:
    """DPO stage: reference pass, Ray Train start-up, first step, steady pairs/s, peak memory."""
    started = record["started"]
    driver = record["outputs"].get("timings", {})
    entry: dict[str, Any] = {"wall_s": record["seconds"]}
    if driver.get("reference_pass_done"):
        entry["reference_pass_s"] = driver["reference_pass_done"] - driver["reference_pass_started"]
    fit = driver.get("fit_started")
    if timings_file.is_file():
        worker = json.loads(timings_file.read_text())
        ends = worker.get("step_ends") or []
        entry["setup"] = worker.get("setup")
        if worker.get("process_started") and worker.get("setup_started"):
            entry["worker_imports_s"] = worker["setup_started"] - worker["process_started"]
        entry["peak_allocated_gb"] = worker.get("peak_allocated_gb")
        if ends:
            first = ends[0][1]
            entry["first_step_after_stage_start_s"] = first - started
            if fit:
                entry["first_step_after_fit_start_s"] = first - fit
            if worker.get("process_started") and fit:
                entry["worker_process_after_fit_start_s"] = worker["process_started"] - fit
                entry["first_step_after_worker_start_s"] = first - worker["process_started"]
            by_step = dict((int(s), t) for s, t in ends)
            last = max(by_step)
            if warmup in by_step and last > warmup:
                entry["timed_steps"] = last - warmup
                entry["steady_pairs_per_s"] = pairs * (last - warmup) / (by_step[last] - by_step[warmup])
            times = [round(b - a, 3) for (_, a), (_, b) in zip(ends, ends[1:])]
            entry["step_seconds_first"] = times[:6]
    return entry


# ------------------------------------------------------------------------------------------------
# The plain loop on the same rows


def plain_loop(cfg, warmup: int, steps: int, tiny: bool, cached_reference: bool) -> dict[str, Any]:
    """benchmarks/dpo_step.py's packed step (torch + peft, no Ray / DeepSpeed) on the rows the product
    trained on, in the recipe's order for rank 0 of 1, with the cached reference log-probs (the cache the
    product filled) or with the reference forward in every step (what the product does in its first
    epoch with `reference_fill: loop`)."""
    import torch

    from orchestrator.data import datasets
    from orchestrator.model.kernels import apply_fused_kernels, resolve_fused_kernels, use_cudnn_attention
    from orchestrator.model.families import load_model
    from orchestrator.plan import use_gradient_checkpointing, with_gpu_memory
    from orchestrator.train.pairs import longest_row_tokens
    from orchestrator.model.lora import freeze_vision, set_lora_input_casting
    from orchestrator.train.recipe import collate_stage
    from orchestrator.train.reference_cache import default_cache_root, open_reference_cache
    from orchestrator.train.schedule import epoch_order

    dpo_step = load_benchmark("dpo_step")
    cuda = not tiny and torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True
    use_cudnn_attention(cfg.model.cudnn_attention)   # as the recipe
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else \
        (lambda: torch.autocast("cpu", enabled=False))
    rows = sorted(datasets.preference_rows(cfg), key=lambda row: str(row["sample_id"]))
    caches = sorted(default_cache_root(cfg).glob("*/"), key=lambda p: p.stat().st_mtime)
    cached = open_reference_cache(caches[-1]).load() if caches and cached_reference else None
    loaded = load_model(cfg.model.path, dtype="bfloat16" if cuda else "float32", device=device,
                        attn_implementation=cfg.model.attn_implementation, family=cfg.model.family)
    kernels = apply_fused_kernels(loaded.model, resolve_fused_kernels(cfg.train.fused_kernels, cuda))  # as the recipe
    freeze_vision(loaded.model)
    pairs = cfg.train.batch_size_per_worker
    order = epoch_order(len(rows), cfg.train.seed, 0)
    batches = []
    for k in range(warmup + steps):
        chunk = [rows[i] for i in order[(k * pairs) % len(rows):][:pairs]]
        if len(chunk) < pairs:
            chunk = [rows[i] for i in order[:pairs]]
        batch = {key: [row[key] for row in chunk] for key in chunk[0]}
        batches.append(collate_stage(batch, loaded, "dpo", cfg, cached))
    detected = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None
    longest = longest_row_tokens(rows, loaded, cfg.model.train_template, cfg.train.max_length)
    checkpointing = use_gradient_checkpointing(with_gpu_memory(cfg, detected), longest)
    policy = dpo_step.add_lora(loaded.model, cfg.train.lora.rank)
    dpo_step.set_checkpointing(policy, checkpointing)
    set_lora_input_casting(policy, False)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.train.learning_rate,
                                  fused=cuda or None)
    references = [tuple(v.to(device) for v in b.reference) if b.reference is not None else None for b in batches]
    times = []
    for k, (packed, reference) in enumerate(zip(batches, references)):
        if k == warmup and cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        dpo_step.our_step(policy, optimizer, packed, cfg.train.beta, device, dtype, autocast, reference=reference)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    timed = times[warmup:]
    return {"pairs": pairs, "timed_steps": len(timed), "steady_pairs_per_s": pairs * len(timed) / sum(timed),
            "gradient_checkpointing": checkpointing, "reference": "cached" if cached else "in the loop",
            "fused_kernels": kernels,
            "peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
            "step_seconds_first": [round(t, 3) for t in times[:6]]}


# ------------------------------------------------------------------------------------------------


def print_table(results: dict) -> None:
    stages = results["stages"]
    print("\n`hadpo run` (run_pipeline) at the " + results["shape"] + " shape on " + results["device"])
    header = f"{'stage':<16}{'wall s':>8}{'start-up s':>12}{'steady':>22}{'peak GB':>10}  notes"
    print(header + "\n" + "-" * len(header))
    for name, entry in stages.items():
        if name.startswith("eval"):
            steady = f"{fmt(entry.get('steady_qps'), '.1f')} questions/s"
            startup = entry.get("first_block_s")
            notes = f"{entry.get('answers')} answers, {fmt(entry.get('end_to_end_qps'), '.1f')} q/s end to end"
            if entry.get("interleaved_with_previous"):
                notes += "; its blocks interleaved with the previous evaluation's (times from the pass start)"
            peak = entry.get("device_peak_gib")
        elif name.startswith("dpo"):
            steady = f"{fmt(entry.get('steady_pairs_per_s'), '.2f')} pairs/s"
            startup = entry.get("first_step_after_fit_start_s")
            notes = (f"reference {results.get('reference_fill')}, pass {fmt(entry.get('reference_pass_s'), '.1f')}s; "
                     f"first step {fmt(startup, '.1f')}s after the trainer starts "
                     f"({fmt(entry.get('first_step_after_stage_start_s'), '.1f')}s after the stage); "
                     f"{entry.get('timed_steps')} timed steps")
            peak = entry.get("peak_allocated_gb")
        else:
            steady, startup, notes, peak = "", None, "", entry.get("device_peak_gib")
        print(f"{name:<16}{fmt(entry.get('wall_s'), '.1f', width=8)}{fmt(startup, '.1f', width=12)}{steady:>22}"
              f"{fmt(peak, '.1f', width=10)}  {notes}")
    dpo = next((e for n, e in stages.items() if n.startswith("dpo")), {})
    for loop in results.get("plain_loops", []):
        label = "loop, ref " + ("cached" if loop["reference"] == "cached" else "inline")
        print(f"{label:<16}{'':>8}{'':>12}{fmt(loop['steady_pairs_per_s'], '.2f') + ' pairs/s':>22}"
              f"{fmt(loop.get('peak_allocated_gb'), '.1f'):>10}  same rows, torch + peft only, reference "
              f"{loop['reference']}, checkpointing {'on' if loop['gradient_checkpointing'] else 'off'}, fused kernels "
              f"{loop['fused_kernels']}")
        if dpo.get("steady_pairs_per_s") and loop["reference"] == results.get("product_reference"):
            print(f"product path / plain loop (both: reference {loop['reference']}): "
                  f"{dpo['steady_pairs_per_s'] / loop['steady_pairs_per_s']:.2f}x pairs/s")
    if dpo.get("first_step_after_fit_start_s") is not None:
        setup = dpo.get("setup") or []
        first_step = dpo["first_step_after_fit_start_s"] - sum(
            dpo.get(k) or 0 for k in ("worker_process_after_fit_start_s", "worker_imports_s")) - sum(
            seconds for _, seconds in setup)
        print("DPO start-up, trainer start -> first step: "
              f"Ray Train to the worker process {fmt(dpo.get('worker_process_after_fit_start_s'), '.1f')}s, "
              f"worker imports + process group {fmt(dpo.get('worker_imports_s'), '.1f')}s, "
              + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in setup)
              + f", first step {first_step:.1f}s")
    print(f"total wall {results['pipeline_wall_s']:.0f}s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="working folder (model, world, runs)")
    parser.add_argument("--tiny", action="store_true", help="tiny LLaVA on CPU (a smoke test of the script)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per step (default 8; tiny 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 8; tiny 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 40; tiny 3)")
    parser.add_argument("--answer-tokens", type=int, nargs=2, default=(100, 200), metavar=("MIN", "MAX"))
    parser.add_argument("--pope-images", type=int, default=None, help="default 500 (9,000 questions); tiny 8")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--cpus", type=float, default=None, help="CPUs per worker / actor (default 4; tiny 0.5)")
    parser.add_argument("--skip-loop", action="store_true")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the model folder")
    parser.add_argument("--set", action="append", help="more config overrides KEY=VALUE")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    args.pairs = args.pairs or (4 if args.tiny else 8)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 8)
    args.steps = args.steps or (3 if args.tiny else 40)
    args.pope_images = args.pope_images or (8 if args.tiny else 500)
    args.cpus = args.cpus or (0.5 if args.tiny else 4)
    args.rows = args.pairs * (args.warmup + args.steps)
    if args.tiny:
        args.answer_tokens = (8, 16)

    import yaml

    from orchestrator.config import ExperimentConfig, apply_override, config_from_dict

    # this process (model build, plain loop) allocates as the training workers do (ExperimentConfig.runtime_env)
    for key in ("PYTORCH_CUDA_ALLOC_CONF",):
        os.environ.setdefault(key, ExperimentConfig().runtime_env()["env_vars"][key])

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    multi_gpu = load_benchmark("multi_gpu")
    model_dir = out / ("model-tiny" if args.tiny else "model7b")
    model = multi_gpu.build_model_section(SimpleNamespace(tiny=args.tiny, use_gpu=not args.tiny,
                                                          rebuild=args.rebuild), model_dir)
    say(f"model: {model.get('source')} {model_dir} ({fmt(model.get('folder_gb'), '.1f')} GB)")
    inputs = write_inputs(args, out, int(model["image_size"]))
    say(f"data: {inputs['train_images']} VG images, answers {args.answer_tokens[0]}-{args.answer_tokens[1]} tokens, "
        f"{inputs['pope_questions']} POPE questions")

    run_root = out / "runs"
    shutil.rmtree(run_root, ignore_errors=True)  # every stage runs: nothing is up to date
    raw = yaml.safe_load(SHIPPED_CONFIG.read_text())
    overrides = size_overrides(args, inputs, model_dir, run_root)
    for override in overrides:
        apply_override(raw, override)
    cfg = config_from_dict(raw, f"{SHIPPED_CONFIG} + benchmark sizes")

    from orchestrator.pipeline import run_pipeline
    from orchestrator.ray_session import init_ray
    from orchestrator.layout import timings_path

    init_ray(cfg)
    sampler = GpuMemorySampler()
    say("hadpo run: " + " ".join(f"--set {o}" for o in overrides if not o.startswith(("data.", "output_root", "model."))))
    started = time.time()
    run_pipeline(cfg, benchmarks=("pope",))
    wall = time.time() - started
    say(f"hadpo run done in {wall:.0f}s")

    import ray

    ray.shutdown()
    records = stage_records(cfg.run_dir)
    stages: dict[str, dict] = {}
    blocks_of = {name: answer_blocks(record) for name, record in records.items() if name.startswith("eval")}
    previous_pass_end: dict[float, float] = {}   # a shared evaluation pass (by its start): its last block so far
    # by start; the evaluations of one pass (one start) by their first block
    for name, record in sorted(records.items(), key=lambda item: (item[1].get("started", 0),
                                                                  (blocks_of.get(item[0]) or [(0, 0)])[0][0])):
        if name.startswith("eval"):
            blocks = blocks_of[name]
            previous_end = previous_pass_end.get(record.get("started"))
            # a small evaluation's blocks can interleave with the previous one's in the shared stream: then
            # its start-up counts from the pass's start, as the first one's does
            interleaved = previous_end is not None and bool(blocks) and blocks[0][0] < previous_end
            entry = eval_timing(record, blocks, None if interleaved else previous_end)
            if interleaved:
                entry["interleaved_with_previous"] = True
            if record.get("together_with") and blocks:
                previous_pass_end[record["started"]] = max(blocks[-1][0], previous_end or 0.0)
                entry["shared_pass_with"] = record["together_with"]
        elif name.startswith("dpo"):
            entry = dpo_timing(record, timings_path(cfg.run_dir, "dpo"), args.warmup, args.pairs)
        else:
            entry = {"wall_s": record.get("seconds")}
        if record.get("started") is not None:
            entry["device_peak_gib"] = sampler.peak_gib(record["started"], record["started"] + record["seconds"])
        stages[name] = entry
    sampler.stop()
    import torch

    results = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.tiny else "cpu",
               "shape": "tiny" if args.tiny else "LLaVA-1.5-7B", "pairs": args.pairs, "warmup": args.warmup,
               "steps": args.steps, "answer_tokens": list(args.answer_tokens), "overrides": overrides,
               "pipeline_wall_s": wall, "stages": stages, "model": model, "data": inputs,
               "date": time.strftime("%Y-%m-%d")}
    from orchestrator.plan import reference_fill

    # the product's timed steps are all in the first epoch (rows = pairs x steps): with reference_fill loop
    # they compute the reference in the step; with a pass they read the cache
    results["product_reference"] = "in the loop" if reference_fill(cfg.train) in ("loop", None) else "cached"
    results["reference_fill"] = reference_fill(cfg.train)
    if not args.skip_loop:
        results["plain_loops"] = []
        for cached_reference in (False, True):
            say(f"plain loop on the same rows, reference {'cached' if cached_reference else 'in the loop'} ...")
            results["plain_loops"].append(plain_loop(cfg, args.warmup, args.steps, args.tiny, cached_reference))
    if args.json:  # before the table: a figure measured is never lost to a printing error
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
