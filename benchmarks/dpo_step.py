"""Time one LoRA DPO optimizer step: our recipe against a TRL / HA-DPO style baseline, same process, same batch.

    python benchmarks/dpo_step.py                 # LLaVA-1.5-7B shape on one GPU (bf16, SDPA)
    python benchmarks/dpo_step.py --tiny          # a tiny LLaVA on CPU (fp32): a smoke test of the script

The model is built from configs (CLIP ViT-L/14-336 + Vicuna-7B shapes, CONTEXT.md section 2) with random
weights and nothing downloaded: the answers are meaningless, the throughput is real. Both loops train the
same LoRA (rank 128, alpha 256, dropout 0.05, every linear layer of the language model) on the same batch
of `--pairs` pairs, chosen and rejected concatenated as 2B rows, with gradient checkpointing, bf16
autocast and LoRA weights in fp32, AdamW. They differ in exactly what our recipe changes:

  ours      reference log-probs = the same model with adapters disabled (no second copy of the weights);
            logits only for the positions that carry a label (`logits_to_keep`, the answer window), so
            the lm_head and the float32 log-softmax run on ~1/6 of the positions.
            (orchestrator.train.recipe / collate / losses)
  baseline  HA-DPO / TRL style: a separate frozen reference model (a full second copy), full-sequence
            logits for policy and reference, log-softmax over every position.

Useful FLOPs per step = 6 * N_llm * T, the formula of shared/tools/gpu_anchor.py so the figures compare:
N_llm = language-model parameters without embeddings, T = tokens of the 2B sequences; 2NT for the policy
forward, 2NT for the backward's activation gradients, 2NT for the reference forward. LoRA weight
gradients, the recompute of gradient checkpointing, the vision tower and lm_head are not counted, and
both loops do the same useful work, so the TFLOP/s ratio is the speed ratio.

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

IMAGE_TOKEN = 32000
PROMPT_BEFORE_IMAGE = 35  # BOS + system prompt + "USER:" (v1 template, LLaMA tokenizer)
PROMPT_AFTER_IMAGE = 20   # "\n" + question + "ASSISTANT:"


def build_model(tiny: bool, device: str, dtype: torch.dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if tiny:
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=64, patch_size=16, projection_dim=64, hidden_act="quick_gelu")
        text = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=32064, max_position_embeddings=1024,
                           rms_norm_eps=1e-5, pad_token_id=0)
    else:
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                                  hidden_act="quick_gelu")
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                           rms_norm_eps=1e-5, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         projector_hidden_act="gelu", vision_feature_select_strategy="default",
                         vision_feature_layer=-2)
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


def add_lora(model, rank: int):
    from peft import LoraConfig, get_peft_model

    from orchestrator.train.recipe import lora_target_regex

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05,
                                                  target_modules=lora_target_regex(targets)))
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # LoRA weights in fp32, as mixed-precision trainers keep them
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.config.use_cache = False
    peft_model.train()
    return peft_model


def our_step(policy, optimizer, inputs, labels, beta, autocast):
    """The recipe's step: reference = adapters disabled; logits only over the labelled window."""
    from orchestrator.train.collate import labelled_window
    from orchestrator.train.losses import dpo_loss, sequence_logps

    pairs = labels.shape[0] // 2
    keep = labelled_window(labels)
    window = labels[:, -keep:]
    with autocast():
        with torch.no_grad(), policy.disable_adapter():
            reference = sequence_logps(policy(**inputs, logits_to_keep=keep, use_cache=False).logits, window)
        logps = sequence_logps(policy(**inputs, logits_to_keep=keep, use_cache=False).logits, window)
    losses, _, _ = dpo_loss(logps[:pairs], logps[pairs:], reference[:pairs], reference[pairs:], beta)
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


def same_logps_check(policy, inputs, labels, autocast) -> float:
    """Both loops score the same thing: our windowed log-probs vs full-sequence ones (max |diff|)."""
    from orchestrator.train.collate import labelled_window
    from orchestrator.train.losses import sequence_logps

    keep = labelled_window(labels)
    policy.eval()
    with torch.no_grad(), autocast():
        ours = sequence_logps(policy(**inputs, logits_to_keep=keep, use_cache=False).logits, labels[:, -keep:])
        full = baseline_logps(policy(**inputs, use_cache=False).logits, labels)
    policy.train()
    return float((ours - full).abs().max())


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
    parser.add_argument("--answer-tokens", type=int, default=128)
    parser.add_argument("--lora-rank", type=int, default=None, help="default 128 (tiny: 8)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; tiny: 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5; tiny: 2)")
    parser.add_argument("--skip-baseline", action="store_true")
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
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else \
        (lambda: torch.autocast("cpu", enabled=False))

    results: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "shape":
                     "tiny" if args.tiny else "llava-1.5-7b", "pairs": args.pairs, "answer_tokens": args.answer_tokens,
                     "lora_rank": rank, "torch": torch.__version__, "matmul_tflops": matmul_ceiling(device)}
    started = time.perf_counter()
    base = build_model(args.tiny, device, dtype)
    language_model = base.model.language_model
    n_llm = sum(p.numel() for name, p in language_model.named_parameters() if "embed_tokens" not in name)
    results.update(build_s=time.perf_counter() - started, params_total=sum(p.numel() for p in base.parameters()),
                   params_llm_nonembed=n_llm)
    inputs, labels, length = make_batch(base, args.pairs, args.answer_tokens, device, dtype)
    tokens = 2 * args.pairs * length
    results.update(sequence_tokens=length, step_tokens=tokens)

    policy = add_lora(base, rank)
    results["lora_params"] = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=2e-6)

    results["logp_max_abs_diff"] = same_logps_check(policy, inputs, labels, autocast)
    rows = {}
    seconds, peak = timed(lambda: our_step(policy, optimizer, inputs, labels, args.beta, autocast),
                          warmup, steps, device)
    rows["ours"] = (seconds, peak)
    if not args.skip_baseline:
        # A second full copy of the base weights, built after ours was timed (same seed: same weights).
        reference_model = build_model(args.tiny, device, dtype).eval().requires_grad_(False)
        seconds, peak = timed(lambda: baseline_step(policy, reference_model, optimizer, inputs, labels, args.beta,
                                                    autocast), warmup, steps, device)
        rows["baseline"] = (seconds, peak)

    flops = 6 * n_llm * tokens
    print(f"\nLoRA DPO step, {results['shape']} on {results['device']}: {args.pairs} pairs x {length} tokens "
          f"({args.answer_tokens}-token answers), LoRA r{rank}, {results['lora_params'] / 1e6:.1f}M trainable")
    print(f"useful FLOPs/step = 6 * N_llm * T = 6 * {n_llm:.4g} * {tokens} = {flops:.4g} FLOP")
    print(f"sequence log-probs, ours vs full logits: max |diff| {results['logp_max_abs_diff']:.2e}")
    if results["matmul_tflops"]:
        print(f"bf16 matmul ceiling measured: {results['matmul_tflops']:.0f} TFLOP/s")
    header = f"{'loop':<10}{'s/step':>9}{'pairs/s':>10}{'tokens/s':>11}{'TFLOP/s':>10}{'peak GB':>9}"
    print(header + "\n" + "-" * len(header))
    for name, (seconds, peak) in rows.items():
        row = {"s_per_step": seconds, "pairs_per_s": args.pairs / seconds, "tokens_per_s": tokens / seconds,
               "useful_tflops": flops / seconds / 1e12, "peak_gb": peak}
        results[name] = row
        peak_text = f"{peak:9.1f}" if peak is not None else f"{'n/a':>9}"
        print(f"{name:<10}{seconds:9.3f}{row['pairs_per_s']:10.2f}{row['tokens_per_s']:11.0f}"
              f"{row['useful_tflops']:10.3f}{peak_text}")
    if "baseline" in rows:
        results["speedup_ours_over_baseline"] = rows["baseline"][0] / rows["ours"][0]
        print(f"ours / baseline: {results['speedup_ours_over_baseline']:.2f}x pairs/s", end="")
        if rows["ours"][1] is not None:
            print(f", {rows['ours'][1] / rows['baseline'][1]:.2f}x peak memory", end="")
        print()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(math.isfinite(v[0]) for v in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
