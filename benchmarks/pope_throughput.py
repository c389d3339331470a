"""POPE throughput: our Ray Data predictor (score and generate modes) vs the batch-1 generate loop.

Everything runs in ONE process and one run, on the same model folder and the same questions:

* **baseline**: the HA-DPO / LLaVA evaluation loop: one question at a time, image loaded and
  preprocessed per question, greedy ``generate`` with 3 new tokens (as GPU.md's baseline);
* **ours, score**: `orchestrator.eval.predictor` through Ray Data (an actor pool, length-sorted
  batches, left padding), one forward pass per batch reading the "Yes"/"No" logits;
* **ours, generate**: the same actors with batched greedy ``generate`` (3 new tokens).

The model is the real LLaVA-1.5-7B shape (CLIP ViT-L/14-336, Vicuna-7B, 32064 vocab, bf16, SDPA),
built from configs with RANDOM weights (no download: the answers are meaningless, the throughput is
real), saved once as a llava-hf folder that the actors load. Its tokenizer is the project's word-level
one (so prompts are a few tokens shorter than with LLaMA's). Questions are POPE-structured:
N images x 6 questions x 3 splits, from the synthetic world generator at 336 px.

``--tiny`` swaps in the tiny LLaVA on CPU as a smoke test of the whole path (numbers meaningless).

Reported: questions/s in steady state (from the arrival of a first, one-batch block to the last
block, so model loading and warm-up are excluded as they are for the baseline loop) and end to end (actor start and model
load included), and the ratio to the baseline. The figures GPU.md measured on an H100 are printed
beside them for reference.

    python benchmarks/pope_throughput.py --tiny                     # CPU smoke test, ~1 minute
    python benchmarks/pope_throughput.py --images 100 --batch-size 32   # one GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Figures from shared/docs/GPU.md (H100 80GB, transformers 5.17, 2026-11-25), questions/s.
GPU_MD_REFERENCE = {
    "batch-1 generate, 3 new tokens": 10.4,
    "batched generate, batch 32, 3 new tokens": 45.4,
    "one forward yes/no scoring, batch 16-64": 50.7,
}

log = logging.getLogger("pope_throughput")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny LLaVA on CPU (smoke test)")
    parser.add_argument("--images", type=int, default=None, help="POPE images (x 6 questions x 3 splits); "
                        "default 100 (tiny: 4)")
    parser.add_argument("--baseline-questions", type=int, default=None,
                        help="questions timed in the batch-1 loop (default 120; tiny: 24)")
    parser.add_argument("--batch-size", type=int, default=None, help="our model batch size (default 32; tiny: 8)")
    parser.add_argument("--modes", nargs="+", default=["score", "generate"], choices=["score", "generate"])
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=float, default=None, help="default 4 with a GPU, 1 without")
    parser.add_argument("--max-new-tokens", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="model, world and Ray temp files (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Model and questions


def build_llava15_7b_shape(out_dir: Path, texts: list[str], device: str) -> Path:
    """A LLaVA-1.5-7B-shaped llava-hf folder with random bf16 weights (built on `device`, fast on a GPU)."""
    import torch
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from orchestrator.model.llava import CLIP_MEAN, CLIP_STD, build_word_tokenizer
    from orchestrator.model.templates import IMAGE_PLACEHOLDER

    tokenizer = build_word_tokenizer(texts)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         image_seq_length=576, projector_hidden_act="gelu",
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    config.pad_token_id = 0
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(torch.float32)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                              image_mean=CLIP_MEAN, image_std=CLIP_STD),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    n = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    log.info("built a LLaVA-1.5-7B-shaped model (%.2fB parameters, random bf16) at %s", n / 1e9, out_dir)
    return out_dir


def make_world_and_model(args, workdir: Path, device: str):
    from orchestrator.config import TinyModelConfig
    from orchestrator.data.synthetic import SynthConfig, generate_world, world_vocabulary
    from orchestrator.model.llava import build_tiny_llava

    size = TinyModelConfig().image_size if args.tiny else 336
    synth = SynthConfig(seed=0, num_images=2, num_pope_images=args.images, image_size=size, milebench_tasks=0)
    world = workdir / "world"
    if not (world / "world.json").is_file():
        generate_world(world, synth)
    texts = [" ".join(world_vocabulary(synth))]
    model_dir = workdir / ("tiny-llava" if args.tiny else "llava15-7b-random")
    if not (model_dir / "config.json").is_file():
        if args.tiny:
            build_tiny_llava(model_dir, texts, TinyModelConfig(), seed=0)
        else:
            build_llava15_7b_shape(model_dir, texts, device)
    return world, model_dir


def pope_questions(world: Path) -> list[dict]:
    from orchestrator.data import formats
    from orchestrator.eval.predictor import pope_items

    rows = []
    for split in ("random", "popular", "adversarial"):
        rows += formats.read_pope_questions(world / "pope" / f"coco_pope_{split}.json", split=split,
                                            image_root=str(world / "coco" / "val2014"))
    return pope_items(rows)


# ----------------------------------------------------------------------------------------------
# The two ways of answering


def baseline_loop(model_dir: Path, items: list[dict], device: str, max_new_tokens: int) -> dict:
    """HA-DPO's / LLaVA's POPE loop: per question, load + preprocess the image, greedy generate."""
    import torch

    from orchestrator.eval.milebench import open_image
    from orchestrator.model.llava import load_llava, pixel_values
    from orchestrator.model.templates import build_prompt, encode_prompt

    loaded = load_llava(model_dir, dtype="auto", device=device)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer

    def answer(item):
        ids = encode_prompt(tokenizer, build_prompt(item["question"], "llava_v1"), loaded.image_token_id,
                            loaded.tokens_per_image)
        input_ids = torch.tensor([ids], device=device)
        pixels = pixel_values(loaded, [open_image(item["images"][0])]).to(device, model.dtype)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels,
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True), len(ids)

    for item in items[:2]:  # warm-up (kernels, allocator), not timed
        answer(item)
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    lengths = [answer(item)[1] for item in items]
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    del model, loaded
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"questions": len(items), "seconds": seconds, "qps": len(items) / seconds, "qps_wall": None,
            "prompt_tokens": sum(lengths) / len(lengths)}


def ours(model_dir: Path, items: list[dict], mode: str, args, use_gpu: bool) -> dict:
    """Our predictor through Ray Data; steady-state q/s from the first answered block to the last."""
    import ray

    from orchestrator.eval.predictor import PredictorSettings, items_table, predict

    settings = PredictorSettings(run_id=f"bench-{mode}", model_path=str(model_dir), mode=mode,
                                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                 dtype="auto")
    # a first block of one batch warms the actor up; the steady state is timed from its arrival
    rows_per_block = args.batch_size * 4
    table = items_table(sorted(items, key=lambda i: (len(i["question"]), i["split"], i["item_id"])))
    cuts = [0, min(args.batch_size, table.num_rows)]
    while cuts[-1] < table.num_rows:
        cuts.append(min(cuts[-1] + rows_per_block, table.num_rows))
    blocks = [table.slice(a, b - a) for a, b in zip(cuts, cuts[1:])]
    cpus = args.cpus_per_actor or (4.0 if use_gpu else 1.0)
    answered = predict(ray.data.from_arrow(blocks), settings, num_actors=args.num_actors, cpus_per_actor=cpus,
                       gpus_per_actor=1.0 if use_gpu else 0.0)
    started = time.perf_counter()
    first_at, first_rows, rows, errors, batch_sizes = None, 0, 0, 0, []
    for block in answered.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows += block.num_rows
        errors += sum(1 for e in block.column("error").to_pylist() if e)
        batch_sizes += block.column("batch_size").to_pylist()
        if first_at is None:
            first_at, first_rows = time.perf_counter(), rows
    finished = time.perf_counter()
    steady_rows, steady_seconds = rows - first_rows, finished - (first_at or finished)
    # under a second of steady state (tiny runs) is too short to time: reported as NaN
    return {"questions": rows, "seconds": finished - started, "errors": errors,
            "qps": steady_rows / steady_seconds if steady_rows and steady_seconds >= 1.0 else float("nan"),
            "qps_wall": rows / (finished - started), "mean_batch": sum(batch_sizes) / max(len(batch_sizes), 1)}


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import torch

    use_gpu = torch.cuda.is_available() and not args.tiny
    device = "cuda" if use_gpu else "cpu"
    if not args.tiny and not use_gpu:
        print("no GPU: the 7B shape on CPU would take hours; use --tiny for a smoke test", file=sys.stderr)
        return 2
    args.images = args.images or (4 if args.tiny else 100)
    args.baseline_questions = args.baseline_questions or (24 if args.tiny else 120)
    args.batch_size = args.batch_size or (8 if args.tiny else 32)
    if use_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="pope-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        world, model_dir = make_world_and_model(args, workdir, device)
        items = pope_questions(world)
        log.info("%d POPE questions (%d images x 6 x 3 splits); model and world ready in %.0fs",
                 len(items), args.images, time.perf_counter() - t0)

        results = {}
        # the loop walks images in order (as the question files list them), spread over the splits
        baseline_items = items[:: max(1, len(items) // args.baseline_questions)][: args.baseline_questions]
        results["baseline"] = baseline_loop(model_dir, baseline_items, device, args.max_new_tokens)
        log.info("baseline: %.2f questions/s", results["baseline"]["qps"])

        import ray

        if not ray.is_initialized():
            ray.init(num_cpus=os.cpu_count(), num_gpus=1 if use_gpu else 0, include_dashboard=False,
                     _temp_dir=str(workdir / "ray"), log_to_driver=True)
        for mode in args.modes:
            results[mode] = ours(model_dir, items, mode, args, use_gpu)
            log.info("ours (%s): %.2f questions/s steady, %.2f end to end", mode, results[mode]["qps"],
                     results[mode]["qps_wall"])
        ray.shutdown()
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    name = torch.cuda.get_device_name(0) if use_gpu else f"CPU ({os.cpu_count()} cores)"
    shape = "tiny LLaVA (smoke test: numbers meaningless)" if args.tiny else "LLaVA-1.5-7B shape, random bf16, SDPA"
    base = results["baseline"]["qps"]
    print(f"\nPOPE throughput on {name}; {shape}; {len(items)} questions, batch {args.batch_size}, "
          f"{args.max_new_tokens} new tokens in generate modes")
    print(f"{'method':<46} {'questions':>9} {'q/s steady':>11} {'q/s e2e':>9} {'x baseline':>11}")
    # "x baseline" compares steady states; where no steady state could be timed, the end-to-end figure
    labels = {"baseline": "batch-1 generate loop (HA-DPO / LLaVA)",
              "score": "ours: Ray Data, score (1 forward, Yes/No)",
              "generate": "ours: Ray Data, batched generate"}
    for key, result in results.items():
        e2e = f"{result['qps_wall']:>9.2f}" if result.get("qps_wall") else f"{'-':>9}"
        steady = f"{result['qps']:>11.2f}" if result["qps"] == result["qps"] else f"{'-':>11}"
        ratio = result["qps"] / base if result["qps"] == result["qps"] else result["qps_wall"] / base
        print(f"{labels[key]:<46} {result['questions']:>9} {steady} {e2e} {ratio:>11.2f}")
    for key in args.modes:
        if results[key]["errors"]:
            print(f"WARNING: {results[key]['errors']} error rows in {key} mode")
    print("\nreference, GPU.md (H100 80GB, same model shape): " +
          "; ".join(f"{k}: {v} q/s" for k, v in GPU_MD_REFERENCE.items()))
    print(f"baseline prompt length here: {results['baseline']['prompt_tokens']:.0f} tokens")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "shape": shape, "args": vars(args),
                                               "results": results, "reference": GPU_MD_REFERENCE}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
