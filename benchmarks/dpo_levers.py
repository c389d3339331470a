"""Levers for the LoRA DPO step at the LLaVA-1.5-7B shape, measured side by side (one GPU, no Ray).

    python benchmarks/dpo_levers.py --json $OUT/levers.json          # every variant, ~6 min on one H200
    python benchmarks/dpo_levers.py --tiny                           # CPU smoke test of the script
    python benchmarks/dpo_levers.py --variants zero2 zero3 zero3-leaf    # a subset

Every variant trains the same LoRA (r128, alpha 256, dropout 0.05 on every LM linear) on the same packed
pairs (benchmarks/dpo_step.py's `make_batch` / `make_packed`: 631 prompt+image tokens, 128-token answers)
with cached reference log-probs and no gradient checkpointing, the recipe's defaults at this size:

  zero2-expandable        zero2 with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (what runs now set);
  zero0 / zero1 / zero2   the recipe's own engine (`orchestrator.train.engine.make_engine`: DeepSpeed,
                          bf16, torch AdamW) and loss (`recipe.compute_loss`) with that ZeRO stage;
  zero3                   the same with ZeRO-3, LoRA weights resident, DeepSpeed's per-module hooks
                          (`train.deepspeed.zero3_leaf_layers: false`: ~1,600 hooked modules per step);
  zero3-leaf              ZeRO-3 as the recipe now configures it: zero3 with each decoder layer a leaf
                          module (fetched as one unit, one hooked module per layer; engine.py says why);
  zero3-plain             zero3 with DeepSpeed's defaults (LoRA weights partitioned too);
  zero3-prefetch          zero3 with large prefetch / live-parameter buckets (whole layers in flight);
  zero3-resident          zero3 with every weight resident (nothing gathered: what the hooks alone cost);
  loop, loop-16           dpo_step.py's plain torch loop (no DeepSpeed) at --pairs and 16 pairs per step;
  loop-liger              the loop with liger-kernel's fused RMSNorm / SwiGLU / RoPE (if installed);
  loop-compile            the loop with each decoder layer compiled (torch.compile, dynamic shapes).

The DeepSpeed variants run each in a subprocess (ZeRO-3 partitions the model in place; a fresh process
frees everything); the loop variants share one model in this process (liger patches last, as it cannot
be undone). Each prints a RESULT line as it ends; the table comes last. These are levers, not the
product figure: benchmarks/pipeline.py times `hadpo run` itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import load_benchmark  # noqa: E402

# "deepspeed": settings of the train.deepspeed section; "extra": DeepSpeed config merged in (its `config`)
HOOKS = {"zero3_leaf_layers": False}  # the zero3 variants measured before leaf layers: DeepSpeed's per-module hooks
ENGINE_VARIANTS = {
    "zero0": {"stage": 0},
    "zero1": {"stage": 1},
    "zero2": {"stage": 2},
    "zero2-expandable": {"stage": 2, "env": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}},
    "zero3": {"stage": 3, "deepspeed": HOOKS},
    "zero3-leaf": {"stage": 3},
    "zero3-plain": {"stage": 3, "deepspeed": HOOKS, "extra": {"zero_optimization": {
        "stage3_param_persistence_threshold": 100_000}}},   # DeepSpeed's default
    "zero3-prefetch": {"stage": 3, "deepspeed": HOOKS, "extra": {"zero_optimization": {
        "stage3_prefetch_bucket_size": 500_000_000, "stage3_max_live_parameters": 3_000_000_000,
        "stage3_max_reuse_distance": 3_000_000_000}}},
    "zero3-resident": {"stage": 3, "deepspeed": HOOKS, "extra": {"zero_optimization": {   # nothing partitioned
        "stage3_param_persistence_threshold": 100_000_000_000}}},
    "zero3-torchlinear": {"stage": 3, "deepspeed": HOOKS, "extra": {"zero_optimization": {   # torch's F.linear,
        "memory_efficient_linear": False}}},                                              # not DeepSpeed's
}
LOOP_VARIANTS = ("loop", "loop-16", "loop-compile", "loop-liger")
DEFAULT_VARIANTS = ("zero2", "zero3", "zero3-leaf", "zero3-plain", "zero3-prefetch", "zero3-resident", "zero0", "loop",
                    "loop-16", "loop-compile", "loop-liger")


def _step_times(step, warmup: int, steps: int, cuda: bool) -> tuple[list[float], float | None]:
    import torch

    times = []
    for index in range(warmup + steps):
        if index == warmup and cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    return times, peak


def _summary(name: str, times: list[float], warmup: int, pairs: int, peak: float | None, **extra) -> dict:
    timed = times[warmup:]
    seconds = sum(timed) / len(timed)
    row = {"variant": name, "pairs": pairs, "s_per_step": seconds, "pairs_per_s": pairs / seconds,
           "first_steps_s": [round(t, 3) for t in times[:warmup]], "peak_gb": peak, **extra}
    print("RESULT " + json.dumps(row), flush=True)
    return row


def _batch(dpo_step, model, pairs: int, answer_tokens: int, device: str, dtype):
    import torch

    inputs, labels, _ = dpo_step.make_batch(model, pairs, answer_tokens, device, dtype)
    packed = dpo_step.make_packed(model, inputs, labels, pairs, device, dtype)
    generator = torch.Generator().manual_seed(1)
    # stand-in cached reference log-probs of the right magnitude (sums over 128 tokens)
    packed.reference = (-300 - 10 * torch.rand(pairs, generator=generator),
                        -300 - 10 * torch.rand(pairs, generator=generator))
    return packed


def run_engine_variant(name: str, args) -> dict:
    """One DeepSpeed variant through the recipe's engine and loss (this process: --engine-child)."""
    import torch
    import torch.distributed as dist

    from orchestrator.config import TrainConfig
    from orchestrator.train.engine import make_engine
    from orchestrator.model.lora import add_lora, freeze_vision
    from orchestrator.train.recipe import compute_loss

    spec = ENGINE_VARIANTS[name]
    cuda = not args.tiny and torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if cuda:
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = True
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    dpo_step = load_benchmark("dpo_step")
    dtype = torch.bfloat16 if cuda else torch.float32
    started = time.perf_counter()
    model = dpo_step.build_model(args.tiny, device.type, dtype)
    model.config.use_cache = False
    freeze_vision(model)
    packed = _batch(dpo_step, model, args.pairs, args.answer_tokens, device.type, dtype)
    rank = 8 if args.tiny else 128
    train = TrainConfig.model_validate({
        "batch_size_per_worker": args.pairs, "lora": {"rank": rank, "alpha": 2 * rank, "dropout": 0.05},
        "deepspeed": {"zero_stage": spec["stage"], "torch_adam": True, "config": spec.get("extra"),
                      **spec.get("deepspeed", {})},
        "gradient_checkpointing": False, "beta": 0.1})
    model = add_lora(model, train)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine = make_engine(model, trainable, train, learning_rate=2e-6, total_steps=10_000, use_ds=True, on_gpu=cuda,
                         bf16=cuda)
    setup_s = time.perf_counter() - started

    def step():
        loss, _ = compute_loss(engine, None, packed, "dpo", train, device, cuda, "sdpa")
        engine.backward(loss)
        engine.step()

    times, peak = _step_times(step, args.warmup, args.steps, cuda)
    return _summary(name, times, args.warmup, args.pairs, peak, setup_s=round(setup_s, 1),
                    engine=engine.describe(), leaf_layers=engine.leaf_layers)


def run_loop_variants(names: list[str], args) -> list[dict]:
    """The plain torch loop (dpo_step.py's packed+cache step) and its levers, one model in this process."""
    import torch

    dpo_step = load_benchmark("dpo_step")
    from orchestrator.model.lora import set_lora_input_casting

    cuda = not args.tiny and torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else \
        (lambda: torch.autocast("cpu", enabled=False))
    base = dpo_step.build_model(args.tiny, device, dtype)
    batches = {}
    for name in names:
        pairs = 16 if name == "loop-16" and not args.tiny else args.pairs
        if pairs not in batches:
            batches[pairs] = _batch(dpo_step, base, pairs, args.answer_tokens, device, dtype)
    policy = dpo_step.add_lora(base, 8 if args.tiny else 128)
    dpo_step.set_checkpointing(policy, False)
    set_lora_input_casting(policy, False)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=2e-6)
    rows = []
    # liger patches classes and functions for good: last
    for name in sorted(names, key=lambda n: (n == "loop-liger", n == "loop-compile")):
        pairs = 16 if name == "loop-16" and not args.tiny else args.pairs
        packed = batches[pairs]
        extra = {}
        try:
            started = time.perf_counter()
            if name == "loop-liger":
                from liger_kernel.transformers import apply_liger_kernel_to_llava

                apply_liger_kernel_to_llava(fused_linear_cross_entropy=False, model=base)
            if name == "loop-compile":
                layers = base.model.language_model.layers
                for layer in layers:
                    layer.compile(dynamic=True)
            extra["setup_s"] = round(time.perf_counter() - started, 1)
            reference = tuple(values.to(device) for values in packed.reference)
            step = lambda: dpo_step.our_step(policy, optimizer, packed, 0.1, device, dtype, autocast,  # noqa: E731
                                             reference=reference)
            times, peak = _step_times(step, args.warmup, args.steps, cuda)
            rows.append(_summary(name, times, args.warmup, pairs, peak, **extra))
        except Exception as error:  # one lever failing must not lose the others
            print(f"RESULT {json.dumps({'variant': name, 'error': f'{type(error).__name__}: {error}'[:400]})}",
                  flush=True)
            rows.append({"variant": name, "error": f"{type(error).__name__}: {error}"[:400]})
            if cuda:
                torch.cuda.empty_cache()
        if name == "loop-compile":  # later variants run eagerly again
            for layer in base.model.language_model.layers:
                layer._compiled_call_impl = None
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny LLaVA on CPU in fp32 (smoke test)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        choices=list(ENGINE_VARIANTS) + list(LOOP_VARIANTS))
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--answer-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--budget", type=float, default=480, help="seconds; variants that would start later are skipped")
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--engine-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.answer_tokens = min(args.answer_tokens, 8)
    if args.engine_child:
        run_engine_variant(args.engine_child, args)
        return 0

    started = time.time()
    rows: list[dict] = []
    for name in [n for n in args.variants if n in ENGINE_VARIANTS]:
        if time.time() - started > args.budget - 45:
            rows.append({"variant": name, "error": "skipped: budget"})
            continue
        command = [sys.executable, __file__, "--engine-child", name, "--pairs", str(args.pairs), "--answer-tokens",
                   str(args.answer_tokens), "--warmup", str(args.warmup), "--steps", str(args.steps)]
        if args.tiny:
            command.append("--tiny")
        print(f"[{time.time() - started:6.1f}s] {name} ...", flush=True)
        env = {**os.environ, **ENGINE_VARIANTS[name].get("env", {})}
        process = subprocess.run(command, capture_output=True, text=True, env=env,
                                 timeout=max(60, args.budget - (time.time() - started)))
        result = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
        if result:
            rows.append(json.loads(result[-1][len("RESULT "):]))
            print(result[-1], flush=True)
        else:
            tail = (process.stdout + process.stderr)[-1500:]
            rows.append({"variant": name, "error": f"exit {process.returncode}: {tail}"})
            print(f"{name} failed (exit {process.returncode}):\n{tail}", flush=True)
    loops = [n for n in args.variants if n in LOOP_VARIANTS]
    if loops and time.time() - started < args.budget - 60:
        print(f"[{time.time() - started:6.1f}s] loop variants {loops} ...", flush=True)
        rows.extend(run_loop_variants(loops, args))

    base = next((r for r in rows if r.get("variant") == "zero2" and "pairs_per_s" in r), None)
    loop = next((r for r in rows if r.get("variant") == "loop" and "pairs_per_s" in r), None)
    print(f"\nLoRA DPO step levers ({'tiny, CPU' if args.tiny else 'LLaVA-1.5-7B shape'}), "
          f"{args.warmup} warm-up + {args.steps} timed steps each")
    header = f"{'variant':<14}{'pairs':>6}{'s/step':>9}{'pairs/s':>9}{'x zero2':>9}{'x loop':>8}{'peak GB':>9}  first steps (s)"
    print(header + "\n" + "-" * len(header))
    for row in rows:
        if "pairs_per_s" not in row:
            print(f"{row['variant']:<14}  {row.get('error', '')[:100]}")
            continue
        vs2 = f"{row['pairs_per_s'] / base['pairs_per_s']:9.2f}" if base else f"{'-':>9}"
        vsl = f"{row['pairs_per_s'] / loop['pairs_per_s']:8.2f}" if loop else f"{'-':>8}"
        peak = f"{row['peak_gb']:9.1f}" if row.get("peak_gb") else f"{'-':>9}"
        print(f"{row['variant']:<14}{row['pairs']:6d}{row['s_per_step']:9.3f}{row['pairs_per_s']:9.2f}{vs2}{vsl}{peak}  "
              f"{row.get('first_steps_s')}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
