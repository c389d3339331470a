"""Time one LoRA DPO optimizer step: our recipe's loops against a TRL / HA-DPO style baseline, same process.

    python benchmarks/dpo_step.py                 # LLaVA-1.5-7B shape on one GPU (bf16, SDPA)
    python benchmarks/dpo_step.py --tiny          # a tiny LLaVA on CPU (fp32): a smoke test of the script

The model is built from configs (the planner's LLaVA-1.5-7B shape, benchmarks/common.py) with random
weights and nothing downloaded: the answers are meaningless, the throughput is real. Every loop trains the
same LoRA (rank 128, alpha 256, dropout 0.05, every linear layer of the language model, weights in fp32,
bf16 autocast, AdamW, grad clipping) on the same `--pairs` pairs (same prompt + image per pair, 128-token
answers). The loops:

  baseline      HA-DPO / TRL style: chosen and rejected as 2B rows (images duplicated), a separate frozen
                reference model (a full second copy), full-sequence logits, gradient checkpointing.
  plain         our recipe with `train.prefix_sharing: false`, `train.reference_cache: false`: 2B rows,
                reference = the same model with adapters disabled, logits only on the answer window,
                adapted activations kept in bf16 (`model.lora.set_lora_input_casting`; the baseline keeps
                peft's default bf16 -> fp32 cast of every adapted activation).
  packed        `prefix_sharing: true`: one row [prompt, chosen, rejected] per pair, the answers kept
                apart by the attention mask (orchestrator.train.pairs), so the image + prompt (631 of 759
                tokens here) and the vision tower run once per pair; in-loop reference (also packed).
  packed+cache  packed, reference log-probs taken from the precompute pass (`reference_cache: true`: no
                reference forward in training) and no gradient checkpointing (what `auto` picks when
                the planner says it fits); `--fast-pairs` pairs per step.
  ref pass      the precompute pass itself: packed no-grad forwards of the base model (pairs/s), run
                once per reference model and shared by every seed / trial that trains from it.

Useful FLOPs per pair = 6 * N_llm * (2 x row tokens of the plain layout), the formula of
shared/tools/gpu_anchor.py, the same for every loop, so "useful TFLOP/s" ratios are speed ratios.
"executed TFLOP/s" counts what each loop actually multiplies: 2 * N_llm per token per forward (policy,
gradient-checkpointing recompute, in-loop reference) and 2 * N_llm per token for the activation gradients
(the frozen base needs no weight gradients); the packed rows have 631 + 2 x 128 tokens per pair instead of
2 x 759. LoRA matmuls, the vision tower and lm_head are not counted in either.

Only torch, transformers and peft run in the timed part (no Ray, no DeepSpeed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (LLAVA_15_7B, LLAVA_IMAGE_TOKEN_ID, TINY_MAX_POSITIONS, TINY_SHAPE,  # noqa: E402
                               llava_config)

IMAGE_TOKEN = LLAVA_IMAGE_TOKEN_ID
PROMPT_BEFORE_IMAGE = 35  # BOS + system prompt + "USER:" (v1 template, LLaMA tokenizer)
PROMPT_AFTER_IMAGE = 20   # "\n" + question + "ASSISTANT:"


def build_model(tiny: bool, device: str, dtype: torch.dtype):
    """The planner's LLaVA-1.5-7B shape (or `common.TINY_SHAPE`) with random weights, built on `device`."""
    from transformers import LlavaForConditionalGeneration

    config = llava_config(TINY_SHAPE, max_positions=TINY_MAX_POSITIONS) if tiny else llava_config(LLAVA_15_7B)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(torch.float32)
    return model


def make_batch(model, pairs: int, answer_tokens: int, device: str, dtype: torch.dtype):
    """2B rows (chosen first): identical prompt with 576 (or tiny: 16) image tokens, different answers."""
    vision = model.config.vision_config
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    prompt = PROMPT_BEFORE_IMAGE + image_tokens + PROMPT_AFTER_IMAGE
    length = prompt + answer_tokens
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(100, 31000, (pairs, prompt), generator=generator)
    prompt_ids[:, 0] = 1
    prompt_ids[:, PROMPT_BEFORE_IMAGE:PROMPT_BEFORE_IMAGE + image_tokens] = IMAGE_TOKEN
    answers = torch.randint(100, 31000, (2 * pairs, answer_tokens), generator=generator)
    answers[:, -1] = 2  # </s>
    ids = torch.cat([prompt_ids.repeat(2, 1), answers], dim=1)
    labels = ids.clone()
    labels[:, :prompt] = -100
    pixels = torch.randn(pairs, 3, vision.image_size, vision.image_size, generator=generator).repeat(2, 1, 1, 1)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype)}, labels.to(device), length


def make_packed(model, plain_inputs, labels, pairs: int, device: str, dtype):
    """The same pairs as `make_batch`'s 2B rows, packed as B rows [prompt, chosen, rejected]."""
    from orchestrator.model.families import VisionInputs
    from orchestrator.train.pairs import pack_pairs

    ids = plain_inputs["input_ids"].cpu()
    prompt_len = int((labels[0] == -100).sum())
    token_pairs = [(ids[k, :prompt_len].tolist(), ids[k, prompt_len:].tolist(), ids[pairs + k, prompt_len:].tolist())
                   for k in range(pairs)]
    image_tokens = prompt_len - PROMPT_BEFORE_IMAGE - PROMPT_AFTER_IMAGE
    vision = VisionInputs({"pixel_values": plain_inputs["pixel_values"][:pairs].cpu()}, [image_tokens] * pairs)
    return pack_pairs(token_pairs, vision, pad_id=0)


def plain_collated(inputs, labels, pairs: int):
    """`make_batch`'s rows as the recipe's plain `Collated` (labels cut to the answer window)."""
    from orchestrator.model.families import VisionInputs
    from orchestrator.train.collate import Collated, labelled_window

    keep = labelled_window(labels)
    image_tokens = (inputs["input_ids"] == IMAGE_TOKEN).sum(-1).tolist()
    vision = VisionInputs({"pixel_values": inputs["pixel_values"]}, image_tokens)
    return Collated(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    labels=labels[:, -keep:], vision=vision, logits_to_keep=keep,
                    num_examples=pairs, num_tokens=int(inputs["attention_mask"].sum()))


def add_lora(model, rank: int):
    from peft import LoraConfig, get_peft_model

    from orchestrator.model.lora import lora_target_regex

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05,
                                                  target_modules=lora_target_regex(targets)))
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # LoRA weights in fp32, as mixed-precision trainers keep them
    peft_model.config.use_cache = False
    peft_model.train()
    return peft_model


def set_checkpointing(policy, enabled: bool) -> None:
    if enabled:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        policy.gradient_checkpointing_disable()


def reference_pass(policy, inputs, device: str, dtype, autocast):
    """The reference log-probs (adapters disabled), as the precompute pass and the in-loop reference get them."""
    from orchestrator.train.pairs import score_pairs

    with autocast(), torch.no_grad(), policy.disable_adapter():
        return score_pairs(policy, inputs, device, dtype)


def our_step(policy, optimizer, inputs, beta, device: str, dtype, autocast, reference=None):
    """The recipe's step for either layout; `reference`: cached (chosen, rejected) log-probs, else in-loop."""
    from orchestrator.train.losses import dpo_loss
    from orchestrator.train.pairs import pair_forward, pair_token_logps

    if reference is None:
        reference = reference_pass(policy, inputs, device, dtype, autocast)
    with autocast():
        chosen, rejected = pair_token_logps(pair_forward(policy, inputs, device, dtype), inputs).sums()
    losses, _, _ = dpo_loss(chosen, rejected, reference[0], reference[1], beta)
    loss = losses.mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def baseline_logps(logits, labels):
    """TRL's `get_batch_logps`: full-sequence float32 log-softmax, gathered at the shifted labels."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:].clone()
    mask = labels != -100
    labels[~mask] = 0
    per_token = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
    return (per_token * mask).sum(-1)


def baseline_step(policy, reference_model, optimizer, inputs, labels, beta, autocast):
    """HA-DPO / TRL style: a separate frozen reference model, full logits for both."""
    pairs = labels.shape[0] // 2
    with autocast():
        with torch.no_grad():
            reference = baseline_logps(reference_model(**inputs, use_cache=False).logits, labels)
        logps = baseline_logps(policy(**inputs, use_cache=False).logits, labels)
    logits = (logps[:pairs] - logps[pairs:]) - (reference[:pairs] - reference[pairs:])
    loss = -F.logsigmoid(beta * logits).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def same_logps_check(policy, inputs, labels, packed, device: str, dtype, autocast) -> dict[str, float]:
    """All loops score the same thing: windowed and packed log-probs vs full-sequence ones (max |diff|)."""
    from orchestrator.train.pairs import score_pairs

    pairs = labels.shape[0] // 2
    policy.eval()
    with torch.no_grad(), autocast():
        full = baseline_logps(policy(**inputs, use_cache=False).logits, labels)
        windowed = torch.cat(score_pairs(policy, plain_collated(inputs, labels, pairs), device, dtype))
        packed_logps = torch.cat(score_pairs(policy, packed, device, dtype))
    policy.train()
    return {"windowed": float((windowed - full).abs().max()), "packed": float((packed_logps - full).abs().max()),
            "logp_magnitude": float(full.abs().max())}


def timed(step, warmup: int, steps: int, device: str) -> tuple[float, float | None]:
    """Seconds per step after `warmup` steps, and the peak GPU memory (GB) over the timed steps."""
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    return seconds, peak


def matmul_ceiling(device: str) -> float | None:
    """Measured bf16 8192^3 matmul TFLOP/s (the ceiling GPU.md's percentages use)."""
    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 / ((time.perf_counter() - started) / 20) / 1e12


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny LLaVA on CPU in fp32 (smoke test)")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--fast-pairs", type=int, default=None, help="pairs per step of packed+cache (default --pairs)")
    parser.add_argument("--answer-tokens", type=int, default=128)
    parser.add_argument("--lora-rank", type=int, default=None, help="default 128 (tiny: 8)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; tiny: 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5; tiny: 2)")
    parser.add_argument("--loops", nargs="+", default=list(LOOPS), choices=list(LOOPS))
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if not args.tiny and device == "cpu":
        parser.error("the 7B shape needs a GPU; use --tiny for the CPU smoke test")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True
    rank = args.lora_rank or (8 if args.tiny else 128)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    steps = args.steps if args.steps is not None else (2 if args.tiny else 5)
    fast_pairs = args.fast_pairs or args.pairs
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else \
        (lambda: torch.autocast("cpu", enabled=False))

    results: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "shape":
                     "tiny" if args.tiny else "llava-1.5-7b", "pairs": args.pairs, "fast_pairs": fast_pairs,
                     "answer_tokens": args.answer_tokens, "lora_rank": rank, "torch": torch.__version__,
                     "matmul_tflops": matmul_ceiling(device)}
    started = time.perf_counter()
    base = build_model(args.tiny, device, dtype)
    language_model = base.model.language_model
    n_llm = sum(p.numel() for name, p in language_model.named_parameters() if "embed_tokens" not in name)
    results.update(build_s=time.perf_counter() - started, params_total=sum(p.numel() for p in base.parameters()),
                   params_llm_nonembed=n_llm)
    batches = {}
    for count in sorted({args.pairs, fast_pairs}):
        inputs, labels, length = make_batch(base, count, args.answer_tokens, device, dtype)
        batches[count] = (inputs, labels, make_packed(base, inputs, labels, count, device, dtype))
    inputs, labels, packed = batches[args.pairs]
    prompt_tokens = length - args.answer_tokens
    packed_tokens = prompt_tokens + 2 * args.answer_tokens
    results.update(sequence_tokens=length, packed_tokens=packed_tokens)

    from orchestrator.model.lora import set_lora_input_casting

    policy = add_lora(base, rank)
    results["lora_params"] = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=2e-6)
    results["logp_max_abs_diff"] = same_logps_check(policy, inputs, labels, packed, device, dtype, autocast)

    # what each loop multiplies per pair, in units of 2 * N_llm * token (see the module docstring)
    plain_rows, packed_rows = 2 * length, packed_tokens
    executed_units = {"baseline": 4 * plain_rows, "plain": 4 * plain_rows, "packed": 4 * packed_rows,
                      "packed+cache": 2 * packed_rows, "ref pass": packed_rows}
    rows = {}
    for name in args.loops:
        count = fast_pairs if name in ("packed+cache", "ref pass") else args.pairs
        batch_inputs, batch_labels, batch_packed = batches[count]
        set_checkpointing(policy, name not in ("packed+cache", "ref pass"))
        # ours run as the recipe does: adapted activations stay bf16 (DeepSpeed bf16 holds bf16 adapters, the
        # DDP path turns peft's fp32 input cast off); the baseline keeps peft's default cast, as TRL + peft do
        set_lora_input_casting(policy, name == "baseline")
        if name == "plain":
            collated = plain_collated(batch_inputs, batch_labels, count)
            step = lambda: our_step(policy, optimizer, collated, args.beta, device, dtype, autocast)  # noqa: E731
        elif name == "packed":
            step = lambda: our_step(policy, optimizer, batch_packed, args.beta, device, dtype, autocast)  # noqa: E731
        elif name == "packed+cache":
            cached = reference_pass(policy, batch_packed, device, dtype, autocast)
            step = lambda: our_step(policy, optimizer, batch_packed, args.beta, device, dtype, autocast,  # noqa: E731
                                    reference=cached)
        elif name == "ref pass":
            step = lambda: reference_pass(policy, batch_packed, device, dtype, autocast)  # noqa: E731
        else:
            # A second full copy of the base weights, built after ours were timed (same seed: same weights).
            reference_model = build_model(args.tiny, device, dtype).eval().requires_grad_(False)
            step = lambda: baseline_step(policy, reference_model, optimizer, batch_inputs, batch_labels,  # noqa: E731
                                         args.beta, autocast)
        try:
            seconds, peak = timed(step, warmup, steps, device)
        except torch.OutOfMemoryError as error:  # report it as a row rather than lose the others
            print(f"{name}: out of memory ({error})")
            seconds, peak = float("nan"), None
            if device == "cuda":
                torch.cuda.empty_cache()
        rows[name] = (seconds, peak, count)

    useful_per_pair = 6 * n_llm * 2 * length
    print(f"\nLoRA DPO step, {results['shape']} on {results['device']}: {args.pairs} pairs "
          f"({fast_pairs} for packed+cache / ref pass) x {length} tokens per row "
          f"({args.answer_tokens}-token answers; packed row {packed_tokens}), LoRA r{rank}, "
          f"{results['lora_params'] / 1e6:.1f}M trainable")
    print(f"useful FLOPs/pair = 6 * N_llm * 2 * {length} = {useful_per_pair:.4g} FLOP (N_llm = {n_llm:.4g})")
    diffs = results["logp_max_abs_diff"]
    print(f"sequence log-probs vs full logits (|logp| up to {diffs['logp_magnitude']:.0f}): windowed max |diff| "
          f"{diffs['windowed']:.2e}, packed max |diff| {diffs['packed']:.2e}")
    ceiling = results["matmul_tflops"]
    if ceiling:
        print(f"bf16 matmul ceiling measured: {ceiling:.0f} TFLOP/s")
    header = (f"{'loop':<14}{'pairs':>6}{'s/step':>9}{'pairs/s':>9}{'useful TFLOP/s':>16}"
              f"{'executed TFLOP/s':>18}{'% ceiling':>10}{'peak GB':>9}")
    print(header + "\n" + "-" * len(header))
    for name, (seconds, peak, count) in rows.items():
        executed = 2 * n_llm * executed_units[name] * count / seconds / 1e12
        row = {"pairs": count, "s_per_step": seconds, "pairs_per_s": count / seconds,
               "useful_tflops": useful_per_pair * count / seconds / 1e12, "executed_tflops": executed,
               "peak_gb": peak}
        results[name] = row
        peak_text = f"{peak:9.1f}" if peak is not None else f"{'n/a':>9}"
        share = f"{100 * executed / ceiling:9.1f}%" if ceiling else f"{'n/a':>10}"
        print(f"{name:<14}{count:6d}{seconds:9.3f}{row['pairs_per_s']:9.2f}{row['useful_tflops']:16.1f}"
              f"{executed:18.1f}{share}{peak_text}")
    if "baseline" in rows:
        for name in rows:
            if name not in ("baseline", "ref pass"):
                ratio = results[name]["pairs_per_s"] / results["baseline"]["pairs_per_s"]
                results.setdefault("speedup_over_baseline", {})[name] = ratio
                print(f"{name} / baseline: {ratio:.2f}x pairs/s")
    if "packed+cache" in rows and "ref pass" in rows:
        train_rate, ref_rate = results["packed+cache"]["pairs_per_s"], results["ref pass"]["pairs_per_s"]
        once = 1 / (1 / train_rate + 1 / ref_rate)
        results["packed+cache_incl_ref_pass_pairs_per_s"] = once
        print(f"packed+cache counting its precompute pass (one epoch, one run): {once:.2f} pairs/s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(math.isfinite(v[0]) for v in rows.values()) else 1


LOOPS = ("plain", "packed", "packed+cache", "ref pass", "baseline")


if __name__ == "__main__":
    sys.exit(main())
