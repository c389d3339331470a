"""POPE throughput: our Ray Data predictor (score and generate, with and without prefix reuse) vs the batch-1 loop.

Everything runs in ONE process and one run, on the same model and the same questions:

* **baseline**: the HA-DPO / LLaVA evaluation loop: one question at a time, image loaded and
  preprocessed per question, greedy ``generate`` with 3 new tokens (as GPU.md's baseline); timed on
  ``--baseline-questions`` questions (default 100) and extrapolated to all of them;
* **ours, prefix reuse** (``eval.prefix_reuse``, the default score mode): `orchestrator.eval.predictor`
  through Ray Data with rows grouped by image; per image the vision tower and the image + system
  prefix (~611 tokens at the 7B shape) run once, batched over ``--prefix-images`` images, and all the
  image's questions from the three splits are answered in one more forward against the cached
  prefix (`orchestrator.eval.prefix_cache`); "Yes"/"No" logits as below. A CPU stage before the
  actors decodes and preprocesses the images (`orchestrator.eval.pixels`), so the GPU does not wait on
  them. Runs on ALL questions, and its end-to-end seconds are broken down into phases (Ray init,
  actor start, imports, model build, first block, steady state) from the actor's own timings;
* **ours, plain score**: the same actors, whole prompts, length-sorted batches of ``--batch-size``,
  one forward per batch reading the "Yes"/"No" logits at the last position;
* **ours, generate** (plain batched, the baseline of generation): the same actors with length-sorted
  batches of whole prompts and transformers' greedy ``generate`` (left padding, each row stops at its EOS);
* **ours, generate + prefix reuse** (``eval.prefix_reuse`` in generate mode): rows grouped by image as
  for prefix-reused scoring; the image prefix KV is computed once per image and read once per image
  in the suffix prefill and in every decode step, every distinct question of the image decoding in
  the image's row (`PrefixReuse.generate`);
* **ours, MileBench** (``milebench``, not in the default modes): plain batched generate on synthetic
  multi-image MileBench items (``--milebench-samples`` per task, 2 tasks, 2-4 images each), batched by
  prompt length within the image budget; ``milebench-single``: the same items one sample per ``generate``
  (``eval.milebench_image_budget=1``), as MileBench's LLaVA worker answers them: the "before".

Generate modes run under two protocols, each with and without prefix reuse:

* ``generate`` / ``prefix-generate``: LLaVA's short-answer protocol, the question +
  "\nAnswer the question using a single word or phrase.", at most 3 new tokens;
* ``generate-hadpo`` / ``prefix-generate-hadpo``: HA-DPO's ``pope_eval.py``, the bare question,
  greedy up to 512 new tokens, stop at ``</s>``. Random weights never say ``</s>``, so by default
  exactly ``--hadpo-new-tokens`` (16, about LLaVA-1.5's sentence answers) are forced
  (``min_new_tokens = max_new_tokens``); ``--hadpo-new-tokens 0`` runs the protocol as published.

The prefix modes answer ALL questions; the plain score and generate modes the questions of
``--compare-images`` images (default 100, i.e. 1,800 questions), their seconds for all questions
extrapolated (marked ``*``). On the questions both answered, the benchmark prints the share of
identical answers between prefix-reused and plain batched generate of each protocol (text and parsed
yes/no), and the share of questions where score mode (prefix reuse) and each generate mode disagree
(parsed yes/no; `pope.answer_agreement`).

The model is the real LLaVA-1.5-7B shape (CLIP ViT-L/14-336: 576 image tokens, Vicuna-7B, 32064
vocab, bf16, SDPA) with RANDOM weights (no download: answers are meaningless, throughput is real).
By default (``--weights random-init``) only its config and processor are written; the driver and
each Ray actor build the model from the config on the meta device and fill its weights in place on
the GPU in bf16 (`random_llava`: no per-module init, no 14 GB weight file). Its tokenizer is the
project's word-level one (prompts a few tokens shorter than with LLaMA's). Questions are POPE-structured: N images x 6 questions x 3 splits (the splits share the
images and the yes-questions), from the synthetic world generator at 336 px.

``--tiny`` swaps in the tiny LLaVA on CPU (fp32, random weights built the same way) as a smoke test
of the whole path (numbers meaningless).

Reported per method: questions/s in steady state (from the arrival of a first, small warm-up block
to the last block, so actor start, model build and warm-up are excluded as they are for the
baseline loop) and end to end; seconds for all questions; ratio to the batch-1 loop and to plain
batched scoring; achieved TFLOP/s against the 793 TFLOP/s bf16 ceiling GPU.md measured, with

    FLOPs = 2 * params_LM * (LM tokens computed) + 2 * params_vision * 577 * (images encoded)

(params_LM = language model with embeddings and LM head, as GPU.md's 8.5 TFLOP per question;
tokens computed: the whole prompt per question for the plain modes, plus ``new tokens - 1`` decode
steps for generate; for prefix reuse, one prefix per image plus each distinct question suffix, plus
``new tokens - 1`` decode steps per distinct suffix in generate mode; not counted where the number of
new tokens is not fixed); and peak GPU memory in use on the device (sampled every 0.1 s, all processes).

    python benchmarks/pope_throughput.py --tiny                        # CPU smoke test, ~3 minutes
    python benchmarks/pope_throughput.py --images 500                  # one H200: 9,000 questions, ~6 minutes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from benchmarks.common import LLAVA_15_7B, fmt, llava_config, shape_processor  # noqa: E402
from orchestrator.eval.model_adapter import VisionLanguageModel  # noqa: E402
from orchestrator.eval.pope import answer_agreement  # noqa: E402

# Figures from shared/docs/GPU.md (H100 80GB, transformers 5.17, 2026-11-25), questions/s.
GPU_MD_REFERENCE = {
    "batch-1 generate, 3 new tokens": 10.4,
    "batched generate, batch 32, 3 new tokens": 45.4,
    "one forward yes/no scoring, batch 16-64": 50.7,
}
CEILING_TFLOPS = 793.0   # bf16 8192^3 matmul measured on the H100 (GPU.md)

SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."   # LLaVA's POPE test file
# mode -> (label, answering mode, prefix reuse, protocol); "baseline" is the batch-1 loop
MODES = {
    "baseline": ("batch-1 generate loop (HA-DPO / LLaVA)", "generate", False, None),
    "prefix": ("ours: Ray Data, score, prefix reuse", "score", True, None),
    "score": ("ours: Ray Data, plain score (1 forward)", "score", False, None),
    "generate": ("ours: generate, plain batched, LLaVA short", "generate", False, "short"),
    "prefix-generate": ("ours: generate, prefix reuse, LLaVA short", "generate", True, "short"),
    "generate-hadpo": ("ours: generate, plain batched, HA-DPO", "generate", False, "hadpo"),
    "prefix-generate-hadpo": ("ours: generate, prefix reuse, HA-DPO", "generate", True, "hadpo"),
    "milebench": ("ours: MileBench, plain batched generate", "generate", False, "milebench"),
    "milebench-single": ("MileBench's way: one sample per generate", "generate", False, "milebench-single"),
}
MILEBENCH_MODES = ("milebench", "milebench-single")
DEFAULT_MODES = [mode for mode in MODES if mode not in MILEBENCH_MODES]

log = logging.getLogger("pope_throughput")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny LLaVA on CPU (smoke test)")
    parser.add_argument("--images", type=int, default=None, help="POPE images (x 6 questions x 3 splits); "
                        "default 500 = 9,000 questions (tiny: 4)")
    parser.add_argument("--baseline-questions", type=int, default=None,
                        help="questions timed in the batch-1 loop (default 100; tiny: 18), extrapolated")
    parser.add_argument("--compare-images", type=int, default=None,
                        help="images whose questions the plain score and generate modes answer "
                             "(default 100; tiny: all), extrapolated")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="plain score / generate model batch (default 32; tiny: 8)")
    parser.add_argument("--prefix-images", type=int, default=None,
                        help="images per prefix-reuse model batch and Ray Data block (default 32; tiny: 2)")
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES))
    parser.add_argument("--weights", choices=["random-init", "saved"], default="random-init",
                        help="build random weights in each process from the config (default), or save them "
                             "once (7B: 14 GB) and load them with load_model")
    parser.add_argument("--cudnn-attention", action="store_true",
                        help="let SDPA use cuDNN's attention (model.cudnn_attention; off as in the product)")
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=float, default=None, help="default 4 with a GPU, 1 without")
    parser.add_argument("--max-new-tokens", type=int, default=3, help="new tokens of the batch-1 loop")
    parser.add_argument("--hadpo-new-tokens", type=int, default=16,
                        help="HA-DPO protocol: new tokens forced per answer (0: up to 512, stop at </s>)")
    parser.add_argument("--milebench-samples", type=int, default=None,
                        help="MileBench samples per task, 2 tasks (default 64; tiny: 4)")
    parser.add_argument("--milebench-new-tokens", type=int, default=16, help="new tokens forced per MileBench answer")
    parser.add_argument("--workdir", default=None, help="model, world and Ray temp files (default: a temp dir)")
    parser.add_argument("--ray-address", default=None,
                        help="join the Ray at this address instead of starting a local one (the tests join theirs)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Model and questions


def llava15_7b_config(tokenizer):
    """The planner's LLaVA-1.5-7B shape (`common.llava_config`) with the word-level tokenizer's <image> id."""
    from orchestrator.model.templates import IMAGE_PLACEHOLDER

    return llava_config(LLAVA_15_7B, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER))


def random_llava(config, device: str):
    """A `LlavaForConditionalGeneration` of `config` with random weights on `device` (bf16 on a GPU,
    fp32 on the CPU), built without the per-module init of torch and transformers.

    The parameters are created on the meta device, given uninitialised memory on `device`
    (`to_empty`) and filled in place there: normal(0, 0.02) for matrices and embeddings, ones for
    norm weights, zeros for biases: finite and non-degenerate, which is all a throughput measurement
    needs. Buffers (rotary frequencies, position ids) are computed at construction as usual.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import LlavaForConditionalGeneration

    from orchestrator.model.llava import resolve_dtype

    with init_empty_weights(include_buffers=False):
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                           dtype=resolve_dtype("auto", device))
    buffers = list(model.named_buffers(remove_duplicate=False))
    model.to_empty(device=device)
    for name, buffer in buffers:  # to_empty emptied the buffers too: put the computed ones back
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, buffer.to(device))
    model.tie_weights()
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            is_norm = "Norm" in type(module).__name__
            for name, param in module.named_parameters(recurse=False):
                if name == "bias":
                    param.zero_()
                elif is_norm:
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02)
    return model.eval()


def random_model(model_dir: Path | str, device: str):
    """The folder's LLaVA config with random weights, built directly on `device` (`random_llava`)."""
    from transformers import AutoConfig

    return random_llava(AutoConfig.from_pretrained(str(model_dir), local_files_only=True), device)


def random_loaded(model_dir: Path | str, device: str, timings: dict | None = None):
    """`LoadedModel` (as `load_model` returns) for a random-init model folder (config + processor only);
    seconds per step go into `timings` if given."""
    import torch

    from orchestrator.model.families import FAMILIES, LoadedModel, read_chat_template
    from orchestrator.model.llava import load_processor, tokens_per_image

    timings = {} if timings is None else timings
    step = time.time()

    def lap(name):
        nonlocal step
        now = time.time()
        timings[name] = now - step
        step = now

    from transformers import LlavaForConditionalGeneration  # noqa: F401  (its import timed apart from the build)

    lap("modeling_import_s")
    if torch.device(device).type == "cuda":
        torch.zeros(1, device=device)
        lap("cuda_init_s")
    model = random_model(model_dir, device)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()  # the fill runs asynchronously: count it here, not in the first block
    lap("weights_s")
    processor = load_processor(model_dir)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    image_processor = processor.image_processor
    loaded = LoadedModel(model=model, family=FAMILIES["llava"], tokenizer=tokenizer, image_processor=image_processor,
                         processor=processor, image_token_id=model.config.image_token_index,
                         tokens_per_image=tokens_per_image(model.config), image_mean=tuple(image_processor.image_mean),
                         chat_template=read_chat_template(model_dir, processor, tokenizer))
    lap("processor_s")
    return loaded


class RandomInitLlava(VisionLanguageModel):
    """`VisionLanguageModel` (LLaVA-1.5) with random bf16 weights, built on the GPU from the folder's config (no
    weight file)."""

    name = "llava-random-init"

    def init_components(self, config: dict) -> None:
        import torch

        device = torch.device(config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.load_timings = {}   # the predictor reports these steps of the model's start-up
        loaded = random_loaded(config["model_path"], str(device), self.load_timings)
        self._attach(loaded, loaded.model, config.get("template", "llava_v1"), device,
                     config.get("milebench_template") or "auto")


def build_llava15_7b_shape(out_dir: Path, texts: list[str], device: str, save_weights: bool) -> Path:
    """A LLaVA-1.5-7B-shaped llava-hf folder: config + processor, and random bf16 weights if `save_weights`."""
    import torch

    from orchestrator.model.llava import build_word_tokenizer

    tokenizer = build_word_tokenizer(texts)
    config = llava15_7b_config(tokenizer)
    processor = shape_processor(tokenizer, LLAVA_15_7B)
    out_dir.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(out_dir)
    if not save_weights:
        config.save_pretrained(out_dir)
        return out_dir
    model = random_llava(config, device)
    model.save_pretrained(out_dir)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out_dir


def make_world_and_model(args, workdir: Path, device: str):
    from orchestrator.config import TinyModelConfig
    from orchestrator.data.synthetic import SynthConfig, generate_world, world_vocabulary
    from orchestrator.model.llava import build_tiny_llava

    size = TinyModelConfig().image_size if args.tiny else LLAVA_15_7B.image_size
    mile = args.milebench_samples if set(MILEBENCH_MODES) & set(args.modes) else 0
    synth = SynthConfig(seed=0, num_images=2, num_pope_images=args.images, image_size=size,
                        milebench_tasks=2 if mile else 0, milebench_samples=max(mile, 1))
    world = workdir / f"world-{args.images}-{size}-{mile}"
    if not (world / "world.json").is_file():
        generate_world(world, synth)
    texts = [" ".join(world_vocabulary(synth))]
    if args.tiny:
        model_dir = workdir / "tiny-llava"
        if not (model_dir / "config.json").is_file():
            build_tiny_llava(model_dir, texts, TinyModelConfig(), seed=0)
        return world, model_dir
    save = args.weights == "saved"
    model_dir = workdir / ("llava15-7b-random" if save else "llava15-7b-config")
    if not (model_dir / "config.json").is_file() or (save and not list(model_dir.glob("*.safetensors"))):
        build_llava15_7b_shape(model_dir, texts, device, save_weights=save)
    return world, model_dir


def pope_questions(world: Path) -> list[dict]:
    from orchestrator.data import formats
    from orchestrator.data.schema import POPE_SPLITS
    from orchestrator.eval.items import pope_items

    rows = []
    for split in POPE_SPLITS:
        rows += formats.read_pope_questions(world / "pope" / f"coco_pope_{split}.json", split=split,
                                            image_root=str(world / "coco" / "val2014"))
    return pope_items(rows)


def milebench_questions(world: Path) -> list[dict]:
    from orchestrator.data import formats
    from orchestrator.eval.items import milebench_items

    task_dirs = sorted(p for p in (world / "milebench").iterdir() if p.is_dir()) if (world / "milebench").is_dir() else []
    return milebench_items([row for task_dir in task_dirs for row in formats.read_milebench_task(task_dir)])


def protocol_settings(protocol: str | None, args) -> dict:
    """answer_suffix, max_new_tokens and min_new_tokens of a generate protocol (see the module doc)."""
    if protocol == "short":
        return {"answer_suffix": SHORT_ANSWER_SUFFIX, "max_new_tokens": 3, "min_new_tokens": 0}
    if protocol == "hadpo":
        forced = args.hadpo_new_tokens
        return {"answer_suffix": "", "max_new_tokens": forced or 512, "min_new_tokens": forced}
    if protocol in MILEBENCH_MODES:   # MileBench items use the milebench_* settings, POPE's are unused
        forced = args.milebench_new_tokens
        return {"answer_suffix": "", "max_new_tokens": forced, "min_new_tokens": forced,
                "milebench_max_new_tokens": forced, "milebench_min_new_tokens": forced,
                **({"image_budget": 1} if protocol == "milebench-single" else {})}
    return {"answer_suffix": "", "max_new_tokens": args.max_new_tokens, "min_new_tokens": 0}


def fixed_new_tokens(mode: str, args) -> int | None:
    """New tokens per answer when they are fixed (forced, or random weights that never say </s> within
    3 tokens), else None; 0 for score modes."""
    label, kind, prefix, protocol = MODES[mode]
    if kind == "score":
        return 0
    settings = protocol_settings(protocol, args)
    if protocol == "hadpo" and not settings["min_new_tokens"]:
        return None
    return settings["max_new_tokens"]


# ----------------------------------------------------------------------------------------------
# FLOP accounting


def flop_model(model_dir: Path) -> dict:
    """Parameter counts (from the config, on the meta device) and token counts per question."""
    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    vision = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n)
    lm = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" not in n)
    v = config.vision_config
    return {"params_lm": lm, "params_vision": vision, "vision_tokens": (v.image_size // v.patch_size) ** 2 + 1}


def token_counts(model_dir: Path, items: list[dict], answer_suffix: str = "") -> dict:
    """Per item: prompt length; per image: prefix length and distinct suffixes (for prefix reuse)."""
    from orchestrator.model.llava import load_processor
    from orchestrator.model.templates import build_prompt, encode_prompt

    processor = load_processor(model_dir)
    tokenizer = processor.tokenizer
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    image_token = config.image_token_index
    per_image = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    prompt_len, prefix_len, suffixes = {}, {}, {}
    for item in items:
        ids = encode_prompt(tokenizer, build_prompt(item["question"] + answer_suffix, "llava_v1"), image_token,
                            per_image)
        last = max(k for k, t in enumerate(ids) if t == image_token)
        prompt_len[(item["split"], item["item_id"])] = len(ids)
        prefix_len[item["images"][0]] = last + 1
        suffixes.setdefault(item["images"][0], set()).add(tuple(ids[last + 1:]))
    return {"prompt_len": prompt_len, "prefix_len": prefix_len, "suffixes": suffixes}


def flops_per_question(prefix: bool, items: list[dict], counts: dict, fm: dict, new_tokens: int | None) -> float:
    """Average FLOPs computed per question of `items` by a method (formula in the module doc); `new_tokens`
    per answer (0: score mode, None: not fixed, NaN returned)."""
    if new_tokens is None:
        return float("nan")
    vision = 2.0 * fm["params_vision"] * fm["vision_tokens"]
    decode = max(new_tokens - 1, 0)
    if prefix:
        images = {item["images"][0] for item in items}
        tokens = sum(counts["prefix_len"][i] + sum(len(s) + decode for s in counts["suffixes"][i]) for i in images)
        return (2.0 * fm["params_lm"] * tokens + vision * len(images)) / len(items)
    tokens = sum(counts["prompt_len"][(item["split"], item["item_id"])] + decode for item in items)
    return (2.0 * fm["params_lm"] * tokens + vision * len(items)) / len(items)


class MemorySampler:
    """Peak GPU memory in use on the device (all processes), sampled every 0.1 s from the driver."""

    def __init__(self, enabled: bool):
        self.enabled, self.peak, self._stop = enabled, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if enabled else None

    def _run(self):
        import torch

        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            self._stop.wait(0.1)

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread:
            self._stop.set()
            self._thread.join()

    @property
    def gib(self):
        return self.peak / 2 ** 30 if self.enabled else None


# ----------------------------------------------------------------------------------------------
# The ways of answering


def baseline_loop(model_dir: Path, items: list[dict], device: str, max_new_tokens: int, random_init: bool) -> dict:
    """HA-DPO's / LLaVA's POPE loop: per question, load + preprocess the image, greedy generate."""
    import torch

    from orchestrator.images import load_image
    from orchestrator.model.families import load_model
    from orchestrator.model.llava import pixel_values
    from orchestrator.model.templates import build_prompt, encode_prompt

    loaded = random_loaded(model_dir, device) if random_init else load_model(model_dir, dtype="auto", device=device)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer

    def answer(item):
        ids = encode_prompt(tokenizer, build_prompt(item["question"], "llava_v1"), loaded.image_token_id,
                            loaded.tokens_per_image)
        input_ids = torch.tensor([ids], device=device)
        pixels = pixel_values(loaded, [load_image(item["images"][0])]).to(device, model.dtype)
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
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None
    del model, loaded
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"questions": len(items), "seconds": seconds, "qps": len(items) / seconds, "qps_wall": None,
            "prompt_tokens": sum(lengths) / len(lengths), "peak_gib": peak}


def _image_blocks(table, items: list[dict], images_per_block: int) -> list:
    """Blocks of `images_per_block` whole images each (items sorted by image); the first one warms up."""
    starts, current = [], None
    for k, item in enumerate(items):
        if item["images"][0] != current:
            starts.append(k)
            current = item["images"][0]
    cuts = starts[::images_per_block] + [len(items)]
    return [table.slice(a, b - a) for a, b in zip(cuts, cuts[1:])]


def end_to_end_phases(timings_dir: Path, started: float, first_at: float | None, finished: float) -> dict:
    """Where the end-to-end seconds went (epoch clocks of the driver and of the first actor ready).

    Each phase runs from the previous point to the next, never negative: actor start (process up,
    Ray and our module imported, the class unpickled), imports (torch, transformers), model (build
    or load), waiting for the first block, the first block (warm-up), its way to the driver, and the
    steady state; plus how long the actor spent inside its calls in the steady state.
    """
    actors = [json.loads(path.read_text()) for path in sorted(timings_dir.glob("timings-*.json"))]
    actors = [a for a in actors if a.get("model_ready")]
    phases: dict = {"total_s": finished - started, "actors": actors}
    if not actors:
        return phases
    actor = min(actors, key=lambda a: a["model_ready"])
    points = [("actor_start_s", actor["init_started"]), ("imports_s", actor["imports_done"]),
              ("model_s", actor["model_ready"]), ("wait_first_block_s", actor.get("first_call_started")),
              ("first_block_s", actor.get("first_call_done")), ("to_driver_s", first_at), ("steady_s", finished)]
    previous = started
    for name, at in points:
        at = max(at or previous, previous)
        phases[name] = at - previous
        previous = at
    if actor.get("process_started"):
        phases["actor_process_started_s"] = actor["process_started"] - started   # < 0: a reused Ray worker
    if actor.get("busy_s") is not None and actor.get("first_call_done"):
        phases["steady_actor_busy_s"] = actor["busy_s"] - (actor["first_call_done"] - actor["first_call_started"])
    phases["model_steps"] = actor.get("model_steps", {})
    phases["prefix_stats"] = actor.get("prefix_stats", {})
    # side threads of the actor's start-up, seconds after its __init__ began (see Predictor.__init__)
    phases["side_threads"] = {name: actor[key] - actor["init_started"] for name, key in
                              (("CUDA context ready", "cuda_ready"), ("cuBLAS/cuDNN/SDPA loaded", "device_warm"),
                               ("model warm-up joined", "warm_up_joined")) if actor.get(key)}
    if actor.get("warm_up_s") is not None:
        phases["side_threads"]["model warm-up took"] = actor["warm_up_s"]
    return phases


def ours(model_dir: Path, items: list[dict], mode: str, args, use_gpu: bool, adapter, timings_dir: Path) -> dict:
    """Our predictor through Ray Data; steady-state q/s from the first answered block to the last."""
    import ray

    from orchestrator.eval.items import items_table
    from orchestrator.eval.predictor import PredictorSettings, predict

    _, kind, prefix, protocol = MODES[mode]
    settings = PredictorSettings(run_id=f"bench-{mode}", model_path=str(model_dir), mode=kind,
                                 batch_size=args.batch_size, dtype="auto", prefix_reuse=prefix,
                                 cudnn_attention=args.cudnn_attention,
                                 prefix_images=args.prefix_images, model_adapter=adapter, timings_dir=str(timings_dir),
                                 **protocol_settings(protocol, args))
    if prefix:
        # grouped by image (as run_eval feeds them): one block = whole images, all their questions
        ordered = sorted(items, key=lambda i: (i["images"][0], i["split"], i["item_id"]))
        table = items_table(ordered)
        blocks = _image_blocks(table, ordered, args.prefix_images)
    else:
        # length-sorted blocks of 4 batches; the steady state is timed from the first block's arrival
        rows_per_block = args.batch_size * 4
        table = items_table(sorted(items, key=lambda i: (len(i["images"]), len(i["question"]) + len(i["context"]),
                                                          i["split"], i["item_id"])))
        blocks = [table.slice(a, rows_per_block) for a in range(0, table.num_rows, rows_per_block)]
    cpus = args.cpus_per_actor or (4.0 if use_gpu else 1.0)
    # epoch clock (time.time) throughout: the actors' timings are compared with it
    started = time.time()
    # one block per actor call (Ray Data needs an explicit batch size with GPUs: a block's rows)
    answered = predict(ray.data.from_arrow(blocks), settings, num_actors=args.num_actors, cpus_per_actor=cpus,
                       gpus_per_actor=1.0 if use_gpu else 0.0, batch_size=max(b.num_rows for b in blocks))
    first_at, first_rows, rows, errors, batch_sizes, answers = None, 0, 0, 0, [], []
    with MemorySampler(use_gpu) as memory:
        for block in answered.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows += block.num_rows
            errors += sum(1 for e in block.column("error").to_pylist() if e)
            batch_sizes += block.column("batch_size").to_pylist()
            answers.append(block.select(["split", "item_id", "raw_answer", "answer", "error"]).to_pandas())
            if first_at is None:
                first_at, first_rows = time.time(), rows
    finished = time.time()
    steady_rows, steady_seconds = rows - first_rows, finished - (first_at or finished)
    # under a second of steady state (tiny runs) is too short to time: reported as NaN
    return {"questions": rows, "seconds": finished - started, "errors": errors,
            "qps": steady_rows / steady_seconds if steady_rows and steady_seconds >= 1.0 else float("nan"),
            "qps_wall": rows / (finished - started), "mean_batch": sum(batch_sizes) / max(len(batch_sizes), 1),
            "peak_gib": memory.gib, "phases": end_to_end_phases(timings_dir, started, first_at, finished),
            "answers": pd.concat(answers, ignore_index=True) if answers else pd.DataFrame()}


# ----------------------------------------------------------------------------------------------


def format_phases(phases: dict, ray_init_s: float | None, title: str = "prefix reuse") -> str:
    """A run's end-to-end seconds, phase by phase (see `end_to_end_phases`)."""
    names = [("actor_start_s", "actor start (process, Ray, class)"),
             ("imports_s", "imports (torch, transformers, LLaVA modeling)"),
             ("model_s", "model build/load"), ("wait_first_block_s", "wait for the first block"),
             ("first_block_s", "first block (warm-up)"), ("to_driver_s", "first block to the driver"),
             ("steady_s", "steady state")]
    lines = [f"{title}, end to end (s):"]
    if ray_init_s is not None:
        lines.append(f"  {'ray.init (before the run, not in its total)':<44} {ray_init_s:>7.2f}")
    for key, label in names:
        if key in phases:
            lines.append(f"  {label:<44} {phases[key]:>7.2f}")
        if key == "model_s":
            lines += [f"    {step.removesuffix('_s'):<42} {seconds:>7.2f}"
                      for step, seconds in (phases.get("model_steps") or {}).items()]
    if "steady_actor_busy_s" in phases:
        lines.append(f"  {'  of which the actor was in its calls':<44} {phases['steady_actor_busy_s']:>7.2f}")
    lines.append(f"  {'total (predict -> last block)':<44} {phases['total_s']:>7.2f}")
    if "actor_process_started_s" in phases:
        lines.append(f"  actor process started {phases['actor_process_started_s']:+.2f} s after predict "
                     "(negative: Ray reused a worker)")
    for name, seconds in (phases.get("side_threads") or {}).items():
        lines.append(f"  side thread: {name:<31} {seconds:>7.2f}")
    stats = phases.get("prefix_stats") or {}
    if stats:
        lines.append("  prefix stats: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
    return "\n".join(lines)


def agreements(results: dict) -> dict:
    """Prefix-reused vs plain batched generate (per protocol: shares of identical texts and yes/no), and score
    mode (prefix reuse, else plain) vs each generate mode (share of different yes/no), on the questions both
    answered (`pope.answer_agreement`)."""
    found = {}
    for plain, reused in (("generate", "prefix-generate"), ("generate-hadpo", "prefix-generate-hadpo")):
        if plain in results and reused in results:
            a, b = results[reused]["answers"], results[plain]["answers"]
            text, parsed = answer_agreement(a, b, "raw_answer"), answer_agreement(a, b, "answer")
            found[f"{reused} vs {plain}"] = {"n": text["n"], "identical_text": text["share_same"],
                                             "identical_yes_no": parsed["share_same"]}
    score = next((key for key in ("prefix", "score") if key in results), None)
    for mode in ("prefix-generate", "generate", "prefix-generate-hadpo", "generate-hadpo"):
        if score and mode in results:
            found[f"{score} vs {mode}"] = answer_agreement(results[score]["answers"], results[mode]["answers"])
    return found


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import torch

    t_start = time.perf_counter()
    use_gpu = torch.cuda.is_available() and not args.tiny
    device = "cuda" if use_gpu else "cpu"
    if not args.tiny and not use_gpu:
        print("no GPU: the 7B shape on CPU would take hours; use --tiny for a smoke test", file=sys.stderr)
        return 2
    args.images = args.images or (4 if args.tiny else 500)
    args.baseline_questions = args.baseline_questions or (18 if args.tiny else 100)
    args.compare_images = min(args.compare_images or (args.images if args.tiny else 100), args.images)
    args.batch_size = args.batch_size or (8 if args.tiny else 32)
    # 32 images = ~19.5k prefix tokens per forward: half as many per-block pauses as 16 (Ray hand-over,
    # row preparation, the sync that reads the answers), a fuller suffix pass; ~14 GB more KV at peak
    args.prefix_images = args.prefix_images or (2 if args.tiny else 32)
    args.milebench_samples = args.milebench_samples or (4 if args.tiny else 64)
    random_init = args.weights == "random-init"
    adapter = RandomInitLlava if random_init else None
    if use_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="pope-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        world, model_dir = make_world_and_model(args, workdir, device)
        items = pope_questions(world)
        images = sorted({item["images"][0] for item in items})
        compare = set(images[: args.compare_images])
        compare_items = [item for item in items if item["images"][0] in compare]
        mile_items = milebench_questions(world) if set(MILEBENCH_MODES) & set(args.modes) else []
        fm = flop_model(model_dir)
        counts = {suffix: token_counts(model_dir, items, suffix) for suffix in ("", SHORT_ANSWER_SUFFIX)}
        log.info("%d POPE questions (%d images x 6 x 3 splits, %d distinct image+question pairs); "
                 "model and world ready in %.0fs", len(items), len(images),
                 sum(len(s) for s in counts[""]["suffixes"].values()), time.perf_counter() - t_start)

        results = {}
        if "baseline" in args.modes:
            # the loop walks images in order (as the question files list them), spread over the splits
            baseline_items = items[:: max(1, len(items) // args.baseline_questions)][: args.baseline_questions]
            results["baseline"] = baseline_loop(model_dir, baseline_items, device, args.max_new_tokens, random_init)
            results["baseline"]["items"] = baseline_items
            log.info("baseline: %.2f questions/s", results["baseline"]["qps"])

        import ray

        ray_started = time.perf_counter()
        if args.ray_address:
            ray.init(address=args.ray_address, log_to_driver=True)
        elif not ray.is_initialized():
            ray.init(num_cpus=os.cpu_count(), num_gpus=1 if use_gpu else 0, include_dashboard=False,
                     _temp_dir=str(workdir / "ray"), log_to_driver=True)
        ray_init_s = time.perf_counter() - ray_started
        for mode in MODES:
            if mode == "baseline" or mode not in args.modes:
                continue
            mode_items = mile_items if mode in MILEBENCH_MODES else items if MODES[mode][2] else compare_items
            timings_dir = workdir / f"timings-{mode}-{time.time_ns()}"
            results[mode] = ours(model_dir, mode_items, mode, args, use_gpu, adapter, timings_dir)
            results[mode]["items"] = mode_items
            log.info("ours (%s): %.2f questions/s steady, %.2f end to end", mode, results[mode]["qps"],
                     results[mode]["qps_wall"])
        ray.shutdown()
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    name = torch.cuda.get_device_name(0) if use_gpu else f"CPU ({os.cpu_count()} cores)"
    shape = ("tiny LLaVA (smoke test: numbers meaningless)" if args.tiny else
             "LLaVA-1.5-7B shape, random bf16 weights, SDPA")
    table = results_table(results, args, counts, fm, n_all=len(items))
    found = agreements(results)
    print_report(name, shape, len(images), len(items), args, results, table, found, counts, fm, ray_init_s)
    print(f"total benchmark time {time.perf_counter() - t_start:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "shape": shape, "args": vars(args), "results": table,
                                               "agreement": found, "ray_init_s": ray_init_s,
                                               "reference": GPU_MD_REFERENCE}, indent=2, default=str))
    return 0


def _rate(result: dict) -> float:
    """Questions per second: steady state where timed, else end to end."""
    return result["qps"] if result["qps"] == result["qps"] else (result["qps_wall"] or float("nan"))


def results_table(results: dict, args, counts: dict, fm: dict, n_all: int) -> dict[str, dict]:
    """One row per mode run (the JSON's "results"): rates, the ratios to the batch-1 loop and to plain
    scoring, seconds for all `n_all` questions (measured or extrapolated), FLOPs and memory."""
    base = _rate(results["baseline"]) if "baseline" in results else None
    plain = _rate(results["score"]) if "score" in results else None
    table = {}
    for key, result in results.items():
        rate = _rate(result)
        _, _, prefix, protocol = MODES[key]
        measured_all = prefix and result["questions"] == n_all
        if key in MILEBENCH_MODES:
            per_q = float("nan")
        else:
            new_tokens = args.max_new_tokens if key == "baseline" else fixed_new_tokens(key, args)
            suffix = SHORT_ANSWER_SUFFIX if protocol == "short" else ""
            per_q = flops_per_question(prefix, result["items"], counts[suffix], fm, new_tokens)
        tflops = per_q * rate / 1e12
        row = {"questions_timed": result["questions"], "qps": rate, "qps_e2e": result.get("qps_wall"),
               "seconds_all": result["seconds"] if measured_all else n_all / rate, "seconds_all_measured": measured_all,
               "x_loop": rate / base if base else None, "x_plain": rate / plain if plain else None,
               "tflop_per_question": per_q / 1e12, "tflops": tflops, "pct_ceiling": 100 * tflops / CEILING_TFLOPS,
               "peak_gib": result.get("peak_gib"), "errors": result.get("errors", 0)}
        if "phases" in result:
            row["phases"] = result["phases"]
        table[key] = row
    return table


def print_report(name: str, shape: str, n_images: int, n_all: int, args, results: dict, table: dict, found: dict,
                 counts: dict, fm: dict, ray_init_s: float | None) -> None:
    """The terminal report: the settings, the table of `results_table`, each prefix mode's phases, the
    agreement between modes, the FLOPs prefix reuse saves and GPU.md's reference figures."""
    import torch
    import transformers

    hadpo = protocol_settings("hadpo", args)
    print(f"\nPOPE throughput on {name}; {shape}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{n_all} questions ({n_images} images x 6 x 3 splits); plain score / generate batch {args.batch_size}, "
          f"prefix reuse {args.prefix_images} images per batch; batch-1 loop {args.max_new_tokens} new tokens; "
          f"LLaVA short: suffix {SHORT_ANSWER_SUFFIX!r}, <= 3 new tokens; HA-DPO: bare question, "
          + (f"{hadpo['max_new_tokens']} new tokens forced" if hadpo["min_new_tokens"] else "<= 512 new tokens, stop at </s>"))
    header = (f"{'method':<44} {'timed q':>7} {'q/s':>8} {'q/s e2e':>8} {'s, all ' + str(n_all):>11} "
              f"{'x loop':>7} {'x plain':>7} {'TFLOP/q':>8} {'TFLOP/s':>8} {'%ceil':>6} {'peak GiB':>8}")
    print(header)
    print("-" * len(header))
    for key, row in table.items():
        result = results[key]
        seconds_text = f"{row['seconds_all']:.1f}" + ("" if row["seconds_all_measured"] else "*")
        if key in MILEBENCH_MODES:
            seconds_text = f"{result['seconds']:.1f} ({result['questions']} q)"
        print(f"{MODES[key][0]:<44} {result['questions']:>7} {fmt(row['qps'], '.2f', width=8)} "
              f"{fmt(row['qps_e2e'], '.2f', width=8)} {seconds_text:>11} {fmt(row['x_loop'], '.2f', width=7)} "
              f"{fmt(row['x_plain'], '.2f', width=7)} {fmt(row['tflop_per_question'], '.3f', width=8)} "
              f"{fmt(row['tflops'], '.1f', width=8)} {fmt(row['pct_ceiling'], '.1f', width=6)} "
              f"{fmt(row['peak_gib'], '.1f', width=8)}")
    print("q/s: steady state (first warm-up block excluded; end to end where too short to time); "
          "* = extrapolated from the timed questions;\n"
          "s, all: prefix modes measured end to end on all questions (actor start + model build included); "
          f"TFLOP/s = FLOPs computed / time, FLOPs = 2 * {fm['params_lm'] / 1e9:.2f}B (LM) * LM tokens + "
          f"2 * {fm['params_vision'] / 1e9:.2f}B (vision) * {fm['vision_tokens']} * images encoded; "
          f"ceiling {CEILING_TFLOPS:.0f} TFLOP/s (GPU.md);\n"
          "peak GiB: device memory in use (sampled, all processes; batch-1 loop: torch max allocated)")
    for key in results:
        if MODES[key][2]:
            print(format_phases(results[key]["phases"], ray_init_s, title=MODES[key][0]))
    for key in table:
        if table[key]["errors"]:
            print(f"WARNING: {table[key]['errors']} error rows in {key} mode")
    for pair, value in found.items():
        if "identical_text" in value:
            print(f"agreement {pair}: {fmt(100 * value['identical_text'], '.2f', width=6)} % identical answers, "
                  f"{fmt(100 * value['identical_yes_no'], '.2f', width=6)} % identical yes/no ({value['n']} questions)")
        else:
            print(f"disagreement {pair}: {fmt(100 * value['share_different'], '.2f', width=6)} % of yes/no answers "
                  f"differ ({value['n']} questions)")
    if "prefix" in table and "score" in table:
        ratio = (table["score"]["tflop_per_question"] / table["prefix"]["tflop_per_question"])
        print(f"prefix reuse computes {ratio:.1f}x fewer FLOPs per question than plain scoring "
              f"({sum(len(s) for s in counts['']['suffixes'].values())} distinct image+question pairs of {n_all})")
    print("reference, GPU.md (H100 80GB, same model shape): " +
          "; ".join(f"{k}: {v} q/s" for k, v in GPU_MD_REFERENCE.items()))
    if "baseline" in results:
        print(f"baseline prompt length here: {results['baseline']['prompt_tokens']:.0f} tokens")


if __name__ == "__main__":
    sys.exit(main())
