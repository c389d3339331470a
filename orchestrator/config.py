"""The one typed experiment config that every stage reads.

A YAML file maps one-to-one onto these pydantic models. Unknown keys and bad values fail at load with
the key path and the reason (``train.lora.rank: Input should be greater than 0``). Stages receive the
validated `ExperimentConfig`; none reads environment variables on its own: the environment knobs a
run needs (HF_HOME, HF_ENDPOINT, offline mode, wandb mode) are declared here and passed to every Ray
worker through `runtime_env()`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator import layout
from orchestrator.data.schema import POPE_DEFAULT_DATASET
from orchestrator.files import atomic_write
from orchestrator.paths import absolute_path


class ConfigError(ValueError):
    """An experiment config that cannot be used; the message names the file and key path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticWorldConfig(_Section):
    """Sizes of the embedded synthetic world used when no real data paths are given."""

    seed: int = 0
    num_images: int = Field(120, gt=0, description="training (VG-like) images")
    num_pope_images: int = Field(40, gt=0, description="COCO-named evaluation images")
    image_size: int = Field(64, ge=16)
    milebench_tasks: int = Field(2, ge=0)
    milebench_samples: int = Field(8, ge=0)
    objects_per_image: tuple[int, int] = Field((2, 4), description=(
        "objects per training image, lowest and highest (an evaluation image holds at least 3: POPE asks 3 yes-"
        "questions per image)"))
    theme_purity: float = Field(0.9, ge=0.0, le=1.0)
    pair_cooccurrence: float = Field(0.0, ge=0.0, le=1.0, description=(
        "P(an object's partner in its theme - cup and fork, bowl and knife - is drawn right after it); above 0 "
        "the warm-up's wrong Yes (sft_cooccurrence_noise) is about the absent partner of a present object only"))
    sft_cooccurrence_noise: float = Field(0.3, ge=0.0, le=1.0)

    @field_validator("objects_per_image")
    @classmethod
    def _objects_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= value[0] <= value[1] <= 9:
            raise ValueError(f"expected 1 <= lowest <= highest <= 9 (the cells of the 3x3 grid), got {list(value)}")
        return value


_POPE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # no "/": it separates dataset and split in names


def _check_pope_names(names, what: str) -> None:
    for name in names:
        if not re.match(_POPE_NAME, name) or name == "mean":
            raise ValueError(f"{what} {name!r} must be letters, digits, '_', '.' or '-' (no '/'), and not 'mean'")


class PopeDatasetConfig(_Section):
    """One POPE dataset (e.g. COCO, A-OKVQA or GQA as the POPE repository ships them): its question files
    (JSON lines, or a pretty-printed JSON array) per split, and the folder holding its images."""

    questions: dict[str, str] = Field(description="split name -> question file, e.g. random: gqa_pope_seem_random.json")
    image_root: str = Field(description="folder the question files' image names are joined onto")

    @field_validator("questions")
    @classmethod
    def _splits(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("name at least one split -> question file")
        _check_pope_names(value, "split name")
        return value


class PopeFilesConfig(_Section):
    """POPE question files. Either the single form (`questions` + `image_root`: the dataset named "coco") or
    `datasets` (name -> {questions, image_root}: any number of POPE datasets, each with its own image root,
    evaluated and reported per dataset and split)."""

    questions: dict[str, str] = Field(
        default_factory=dict, description=f"single form: split name -> question file (the dataset named "
        f"{POPE_DEFAULT_DATASET!r})")
    image_root: str | None = Field(None, description="single form: the folder holding the images")
    datasets: dict[str, PopeDatasetConfig] = Field(
        default_factory=dict, description=f"several datasets: name -> {{questions, image_root}}; the one named "
        f"{POPE_DEFAULT_DATASET!r} keeps bare split names (pope/adversarial/f1), others are <name>/<split> "
        "(pope/gqa/adversarial/f1)")

    @model_validator(mode="after")
    def _one_form(self) -> "PopeFilesConfig":
        if self.datasets and (self.questions or self.image_root):
            raise ValueError("give either questions + image_root (one dataset) or datasets (several), not both")
        _check_pope_names(self.datasets, "dataset name")
        if self.questions:
            _check_pope_names(self.questions, "split name")
        return self

    def by_name(self) -> dict[str, PopeDatasetConfig]:
        """Dataset name -> its question files and image root (the single form is the dataset "coco")."""
        if self.datasets:
            return dict(self.datasets)
        if not self.questions:
            return {}
        single = PopeDatasetConfig(questions=dict(self.questions), image_root=self.image_root or "")
        return {POPE_DEFAULT_DATASET: single}


class PreferenceSource(_Section):
    """One preference data source of `data.preference`."""

    format: Literal["hadpo", "trl", "rlaif_v"]
    path: str = Field(description="hadpo: the folder holding desc_data.json and/or pope_data.json; trl: a parquet, "
                      "JSON lines or JSON file, a folder of them, a glob (data/train-*.parquet) or a `datasets` "
                      "save_to_disk folder; rlaif_v: its parquet shards (a file, folder or glob) or JSON lines")
    image_root: str | None = Field(
        None, description="folder the image paths are relative to (hadpo: the VG folder holding image_data.json, "
        "VG_100K/ and VG_100K_2/); not needed for images embedded as bytes")
    weight: float = Field(1.0, gt=0.0, description="times each row is used per epoch: 2 = twice, 0.5 = a seeded half")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                             description="the rows' source name (sample ids <name>:...); default <format>-<position>")


class DataConfig(_Section):
    """Where the data lives. Leave every path empty to use the synthetic world under `synthetic_dir`."""

    preference: list[PreferenceSource] = Field(
        default_factory=list, description="preference data sources, mixed by weight (empty: the HA-DPO files below, "
        "or the synthetic world's)")
    hadpo_desc: str | None = Field(None, description="HA-DPO desc_data.json")
    hadpo_pope: str | None = Field(None, description="HA-DPO pope_data.json")
    vg_image_data: str | None = Field(None, description="Visual Genome image_data.json")
    vg_root: str | None = Field(None, description="folder holding VG_100K/ and VG_100K_2/")
    sft: str | None = Field(None, description="supervised warm-up set (synthetic world only)")
    pope: PopeFilesConfig = Field(default_factory=PopeFilesConfig)
    milebench_root: str | None = None
    milebench_tasks: list[str] = Field(default_factory=list, description="task folder names; [] = all")
    desc_repeats: int = Field(2, ge=1, description="the recipe uses each description pair twice")
    desc_string_answers: Literal["character", "whole"] = Field(
        "character", description="a desc_data.json chosen/rejected given as one string, not a list: 'character' "
        "draws one character of it, as HA-DPO's random.choice(str) does (reproduces upstream; logged as a "
        "warning); 'whole' uses the whole string, a deliberate deviation that leaves every other draw unchanged")
    seed: int = 42
    synthetic: SyntheticWorldConfig = Field(default_factory=SyntheticWorldConfig)
    synthetic_dir: str | None = Field(None, description="default: <output_root>/world")
    allow_absolute_image_paths: bool = Field(
        False, description="accept absolute image paths in POPE / MileBench files (off: every image path read "
        "from data must stay inside its image root; one that does not is a counted reject)")

    @model_validator(mode="after")
    def _one_way_to_name_preference_data(self) -> "DataConfig":
        if self.preference and (self.hadpo_desc or self.hadpo_pope):
            raise ValueError("data.preference and data.hadpo_desc / data.hadpo_pope both name preference data: use "
                             "one (an HA-DPO source is {format: hadpo, path: <folder>, image_root: <VG folder>})")
        names = [source_name(source, index) for index, source in enumerate(self.preference)]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"data.preference: source names must differ, {repeated} repeats")
        for index, source in enumerate(self.preference):
            if source.format == "hadpo" and not source.image_root:
                raise ValueError(f"data.preference.{index}: an hadpo source needs image_root (the VG folder)")
        return self

    @property
    def uses_synthetic_world(self) -> bool:
        return not any([self.hadpo_desc, self.hadpo_pope, self.pope.by_name(), self.milebench_root])


def source_name(source: PreferenceSource, index: int) -> str:
    """A preference source's name: its own, or <format>-<position from 1>."""
    return source.name or f"{source.format}-{index + 1}"


class TinyModelConfig(_Section):
    """Shape of the tiny built-in LLaVA (CLIP ViT + Llama), built from configs with no download."""

    image_size: int = Field(48, ge=8, description="48 px / 16 px patches: one image token per grid cell")
    patch_size: int = Field(16, ge=2)
    vision_hidden: int = Field(64, gt=0)
    vision_layers: int = Field(2, gt=0)
    vision_heads: int = Field(4, gt=0)
    text_hidden: int = Field(96, gt=0)
    text_layers: int = Field(2, gt=0)
    text_heads: int = Field(4, gt=0)
    text_intermediate: int = Field(192, gt=0)
    max_positions: int = Field(256, gt=0)
    # 0.1, not transformers' 0.02: at 0.02 the tiny model's attention and projector outputs start too
    # small next to the residual stream and it never learns to look at the image in a CPU-sized run.
    initializer_range: float = Field(0.1, gt=0.0)

    @model_validator(mode="after")
    def _shapes_divide(self) -> "TinyModelConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for hidden, heads, name in [(self.vision_hidden, self.vision_heads, "vision"),
                                    (self.text_hidden, self.text_heads, "text")]:
            if hidden % heads:
                raise ValueError(f"{name}_hidden {hidden} is not divisible by {name}_heads {heads}")
        return self


class ModelConfig(_Section):
    path: str | None = Field(None, description="HF model folder (llava-hf LLaVA-1.5 or LLaVA-NeXT, Qwen2.5-VL); "
                             "empty = the tiny built-in model")
    family: Literal["auto", "llava", "llava_next", "qwen2_5_vl"] = Field(
        "auto", description="auto: read from the folder's config.json (model_type); a folder of another family is "
        "refused. Without `path` it picks the tiny model built (auto: LLaVA-1.5)")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    max_image_pixels: int | None = Field(
        None, gt=0, description="Qwen2.5-VL: the most pixels one image is resized to (its image processor's "
        "max_pixels), so at most max_image_pixels / 28^2 image tokens (1003520 = 1280 x 28 x 28 -> 1280). Unset: the "
        "folder's preprocessor_config.json (Qwen2.5-VL-7B-Instruct: 12845056 px, up to 16384 tokens). Training, the "
        "reference cache (part of its key), evaluation and `hadpo plan` use it; LLaVA families ignore it (fixed tiles)")
    train_template: Literal["v1", "llava_v1", "chat"] = Field(
        "v1", description="v1 / llava_v1: HA-DPO's LLaVA-1.5 text templates; chat: the model's own chat template "
        "(what LLaVA-NeXT and Qwen2.5-VL were tuned with)")
    eval_template: Literal["v1", "llava_v1", "chat"] = "llava_v1"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    cudnn_attention: bool = Field(
        False, description="let SDPA use cuDNN's attention, torch's first choice on Hopper GPUs. It builds a plan "
        "for every new attention shape (0.1-2.2 s each, measured on an H200), so DPO's first step and each step of "
        "a new packed width, and an eval actor's first blocks, waited seconds for it. Off: flash / memory-efficient "
        "attention, which need no set-up per shape (orchestrator/model/kernels.py)")


class LoraConfig(_Section):
    enabled: bool = True
    rank: int = Field(128, gt=0)
    alpha: int = Field(256, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="linear layers of the language model only (vision tower, projector, lm_head stay frozen)",
    )


class DeepSpeedConfig(_Section):
    enabled: bool = True
    zero_stage: Literal[0, 1, 2, 3, "auto"] = Field(
        "auto", description="auto: the planner picks per run from the model, LoRA or not, the GPU count and each "
        "GPU's memory (`hadpo plan` says which and why): the fastest stage that fits; ZeRO-3 only where needed")
    offload_optimizer: bool = False
    offload_params: bool = False
    torch_adam: bool = Field(
        True, description="torch AdamW (fused on GPU) instead of DeepSpeed's FusedAdam op, which is compiled "
        "on first use (tens of seconds before the first step)")
    zero3_leaf_layers: bool = Field(
        True, description="ZeRO-3: fetch and release each transformer layer (language model, vision encoder) "
        "as one unit (DeepSpeed leaf modules): DeepSpeed hooks the layer instead of each of its sub-modules "
        "(five per LoRA linear); false: DeepSpeed's per-module hooks")
    config: dict[str, Any] | str | None = Field(
        None, description="your own DeepSpeed settings (a dict, or the path of a ds_config.json), merged into the "
        "generated config; keys the recipe owns (batch sizes, precision, gradient clipping, the ZeRO stage "
        "when zero_stage is auto, the schedule) must be absent, \"auto\" or equal to the recipe's value")


class SftStageConfig(_Section):
    """Supervised warm-up (`stage="sft"`): what differs from the DPO stage; the rest of `train` is shared."""

    lora: bool = Field(False, description="false = full fine-tune of the language model (the demo's base model)")
    learning_rate: float = Field(1e-4, gt=0.0)
    epochs: float = Field(1.0, gt=0.0)
    max_steps: int | None = Field(None, gt=0)
    batch_size_per_worker: int | None = Field(None, gt=0, description="default: train.batch_size_per_worker")
    train_vision: bool = Field(
        False, description="also train the vision tower and projector (a tiny model built from scratch needs it)")
    first_token_weight: float = Field(
        1.0, ge=0.0, description="loss weight of each answer's first token (the Yes/No of a QA answer)")
    checkpoint_every_steps: int | None = Field(None, gt=0, description="default: train.checkpoint_every_steps")


class TrainConfig(_Section):
    """DPO (or supervised warm-up) hyper-parameters; defaults are the HA-DPO LLaVA recipe's."""

    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid", description="sigmoid: DPO (HA-DPO's); ipo: IPO as TRL computes it, on log-probs AVERAGED over "
        "each answer's tokens, (logits - 1/(2 beta))^2; hinge: SLiC; robust: robust DPO (TRL's formula; "
        "the same as sigmoid at label_smoothing 0)")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="probability that a preference label is flipped: sigmoid -> cDPO "
        "(TRL's formula up to 0.28; later TRL keeps it for robust only), robust -> robust DPO; must be 0 for "
        "ipo and hinge")
    beta: float = Field(0.1, gt=0.0)
    sft_gamma: float = Field(0.0, ge=0.0, description="weight of an auxiliary LM loss on chosen answers")
    learning_rate: float = Field(2e-6, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    epochs: float = Field(1.0, gt=0.0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    batch_size_per_worker: int = Field(16, gt=0, description="pairs per worker per micro-step")
    gradient_accumulation: int = Field(1, gt=0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    max_length: int = Field(2048, gt=0)
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="auto: off when the planner says the run fits in scaling.gpu_memory_gb without it")
    prefix_sharing: bool = Field(
        True, description="DPO: one packed row [prompt, chosen, rejected] per pair, so the shared image + prompt "
        "prefix is computed once (eager or sdpa attention)")
    reference_cache: bool = Field(
        True, description="DPO: reference log-probs computed once per pair (see reference_fill) and cached in "
        "parquet (keyed by sample id and reference-model hash) instead of a reference forward every step")
    reference_fill: Literal["auto", "pass", "loop"] = Field(
        "auto", description="DPO with reference_cache: how the pairs the cache lacks get their reference "
        "log-probs. pass: a Ray Data pass before training (its own actors load the model; the first step waits "
        "for all pairs). loop: the training workers compute them in the first epoch (the policy with adapters "
        "off, no second model) and write them to the cache at each checkpoint, so training starts at once and "
        "later epochs, runs and sweep trials read them. auto: loop with LoRA, pass for full fine-tuning (whose "
        "reference would be a second model in memory)")
    pad_to_multiple_of: int = Field(
        64, gt=0, description="packed DPO rows padded to a multiple of this many tokens: few distinct shapes, so "
        "the GPU sets its kernels up for each once (rows of new lengths made the first steps slow; the padding "
        "is masked)")
    bf16: bool = Field(True, description="bf16 on GPU; CPU runs always use float32")
    fused_kernels: Literal["auto", "liger", "none"] = Field(
        "auto", description="fused RMSNorm / SwiGLU / RoPE kernels for the language model (orchestrator/model/"
        "kernels.py); auto: liger-kernel on a GPU where it is installed (the [gpu] extra), none elsewhere")
    warm_kernels: bool = Field(
        True, description="with fused kernels: compile them on small tensors of the model's sizes in a background "
        "thread while the worker loads the model (orchestrator/model/kernels.py), so the first steps do not")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    checkpoint_every_steps: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    max_failures: int = Field(2, ge=-1, description="worker failures tolerated before the run fails")
    log_every_steps: int = Field(10, gt=0)
    seed: int = 42
    sft: SftStageConfig = Field(default_factory=SftStageConfig)
    storage_path: str | None = Field(
        None, description="Ray Train checkpoint storage; default <run_dir>/train; a cloud URI (s3://...) is passed on")

    @model_validator(mode="after")
    def _smoothing_applies(self) -> "TrainConfig":
        if self.label_smoothing and self.loss not in ("sigmoid", "robust"):
            raise ValueError(f"label_smoothing {self.label_smoothing} applies to the sigmoid and robust losses, "
                             f"not {self.loss!r} (TRL ignores it there with a warning; set it to 0)")
        return self

    @model_validator(mode="after")
    def _loop_fill_needs_lora(self) -> "TrainConfig":
        if self.reference_cache and self.reference_fill == "loop" and not self.lora.enabled:
            raise ValueError("reference_fill: loop computes the reference as the policy with its adapters off, so "
                             "it needs LoRA (train.lora.enabled); use pass (or auto) for full fine-tuning")
        return self


def _custom_resources(resources: dict[str, float], own_keys: str) -> dict[str, float]:
    """Custom Ray resources: no CPU/GPU/memory (their own keys set those), no negative amounts."""
    for name, amount in resources.items():
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ValueError(f"{name!r} is not a custom resource; set it with {own_keys}")
        if amount < 0:
            raise ValueError(f"{name!r}: amount must be >= 0, got {amount}")
    return resources


class ScalingSection(_Section):
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, ge=0.0)
    gpu_memory_gb: float | None = Field(
        None, gt=0.0, description="memory of one GPU in GiB for the planner (ZeRO stage and checkpointing auto); "
        "empty: the training workers read their GPU's own memory, and `hadpo plan` reads this machine's GPU or "
        "assumes 80")
    resource_wait_s: float = Field(
        600.0, ge=0.0, description="how long to wait for an autoscaler to add the nodes a stage needs; work that "
        "no node (or node type) can hold fails at once")
    autoscaling_config: str | None = Field(
        "~/ray_bootstrap_config.yaml", description="the running autoscaler's config file as the driver sees it: the "
        "resource check reads the node types it may add there when the autoscaler does not publish them (Ray's "
        "default autoscaler does not); default: where `ray up` writes it on the head, where `ray job submit` runs "
        "the driver. A missing file means no node types beyond the alive nodes")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each training worker asks for besides CPU and GPU, "
        "e.g. one a node type of the cluster advertises, to keep the workers on those nodes")

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_only(cls, value: dict[str, float]) -> dict[str, float]:
        return _custom_resources(value, "scaling.cpus_per_worker / scaling.gpus_per_worker")


class EvalConfig(_Section):
    mode: Literal["score", "generate"] = "score"
    batch_size: int = Field(16, gt=0)
    max_new_tokens: int = Field(128, gt=0, description="POPE in generate mode (MileBench: milebench_max_new_tokens)")
    answer_suffix: str = Field("", description='e.g. "\\nAnswer the question using a single word or phrase."')
    num_actors: int = Field(1, gt=0)
    cpus_per_actor: float = Field(0.5, gt=0.0)
    gpus_per_actor: float = Field(0.0, ge=0.0)
    resources_per_actor: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each evaluation actor (and reference log-prob "
        "actor) asks for besides CPU and GPU")
    # MileBench, as MileBench's own code (generate.py, utils.py, its LLaVA worker) runs LLaVA-1.5; docs/milebench.md
    milebench_image_budget: int = Field(
        24, gt=0, description="images per MileBench model batch (eval.sh's --batch-image 24: floor(24 / images) "
        "samples); a sample with more is answered alone; 1 answers one sample at a time, as MileBench's worker does")
    milebench_token_budget: int = Field(
        4096, gt=0, description="MileBench's max_context_len: tokens the instruction + context may take, each kept "
        "image counted at the model's tokens per image (576 for LLaVA-1.5; for LLaVA-NeXT and Qwen2.5-VL the most one "
        "image may take, an upper bound: images are counted before they are opened); the context is left-truncated "
        "to it. "
        "MileBench's repository gives no value for llava-v1.5-7b; 4096 is LLaVA-1.5's context ('Maximum number "
        "of tokens the model can handle', utils.py). The template and the answer are not counted, as upstream")
    milebench_fit_context: bool = Field(
        False, description="not MileBench's: lower the token budget so that template + context + "
        "milebench_max_new_tokens fit the model's positions (upstream generates past them)")
    milebench_template: Literal["auto", "llava_llama_2", "v1", "llava_v1", "chat"] = Field(
        "auto", description="MileBench's conversation template. auto: llava_llama_2 (MileBench's LLaVA worker) for "
        "LLaVA-1.5, chat (the model's own chat template, recorded as such) for LLaVA-NeXT and Qwen2.5-VL, which "
        "MileBench has no worker for (it runs each model it has a worker for in its own format; LLaVA-NeXT's llava-hf "
        "chat template puts a turn's images before its text); llava_llama_2 named for another family is an error; "
        "v1 / llava_v1 (LLaVA's own) are not MileBench's. docs/milebench.md")
    milebench_max_new_tokens: int = Field(512, gt=0, description="MileBench's gen_kwargs for llava-v1.5-7b: 512")
    milebench_min_new_tokens: int = Field(1, ge=0, description="MileBench's gen_kwargs for llava-v1.5-7b: 1")
    prefix_reuse: bool = Field(True, description="POPE, score and generate mode: the image + system prefix computed "
                               "once per image and its KV cache shared by the image's questions (prefill and decoding); "
                               "LLaVA-1.5 and LLaVA-NeXT (Qwen2.5-VL's multimodal rotary positions: the plain path)")
    prefix_images: int = Field(0, ge=0, description="images per prefix-reuse block and model batch, each with all "
                               "its questions (POPE: 18); 0: batch_size images")

    @field_validator("resources_per_actor")
    @classmethod
    def _custom_only(cls, value: dict[str, float]) -> dict[str, float]:
        return _custom_resources(value, "eval.cpus_per_actor / eval.gpus_per_actor")


class SearchDimension(_Section):
    """One hyper-parameter's range: `choice`/`grid` take `values`; `uniform`/`loguniform`/`randint` take low/high."""

    kind: Literal["choice", "grid", "uniform", "loguniform", "randint"]
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None

    @model_validator(mode="after")
    def _complete(self) -> "SearchDimension":
        if self.kind in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"{self.kind} needs a non-empty `values` list")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"{self.kind} needs low < high")
        elif self.kind == "loguniform" and self.low <= 0:
            raise ValueError("loguniform needs low > 0")
        return self


class AshaConfig(_Section):
    """ASHA: at each rung (grace_period x reduction_factor^k evaluations) keep the best 1/reduction_factor."""

    grace_period: int = Field(2, gt=0, description="objective evaluations before a trial may be stopped")
    reduction_factor: float = Field(2.0, gt=1.0)


class MedianStoppingConfig(_Section):
    """Median stopping: stop a trial whose best objective so far is worse than the median of the others'
    running means at the same evaluation."""

    grace_period: int = Field(2, gt=0, description="objective evaluations before a trial may be stopped")
    min_samples_required: int = Field(2, gt=0, description="other trials needed to compute the median")


# pope/adversarial/f1, pope/mean_f1, pope/adversarial/yes_ratio_gap; a named POPE dataset may come first
# (pope/gqa/adversarial/f1, pope/gqa/mean_f1)
OBJECTIVE_PATTERN = re.compile(r"^pope/(?:[\w.-]+/)?(?:mean_f1|[\w.-]+/(?:accuracy|precision|recall|f1|yes_ratio|"
                               r"yes_ratio_gap))$")


class TuneSection(_Section):
    """A Ray Tune sweep: each trial = DPO training (with the objective on a POPE subset every
    `eval_every_steps`) + POPE evaluation of the trained adapter (the final objective)."""

    search_space: dict[str, SearchDimension] = Field(
        default_factory=dict, description="dotted config key (e.g. train.beta) -> its range")
    search: Literal["random", "grid", "optuna", "hyperopt"] = Field(
        "random", description="random: Tune's variant generator (grid dimensions expanded, the rest sampled); "
        "grid: every combination of grid/choice values; optuna / hyperopt: Ray Tune's OptunaSearch (TPE) / "
        "HyperOptSearch, which learn from the trials' objectives (no grid dimensions)")
    seed: int = Field(0, description="seed of the searcher (the sampled values), apart from train.seed")
    num_samples: int = Field(1, gt=0, description="trials (random: samples per grid point; grid: repeats)")
    metric: str = Field(
        "pope/adversarial/f1", description="objective: pope/<split>/<accuracy|precision|recall|f1|yes_ratio|"
        "yes_ratio_gap> or pope/mean_f1 (yes_ratio_gap = |yes-ratio - 0.5|, with mode min)")
    mode: Literal["max", "min"] = "max"
    eval_every_steps: int | None = Field(
        50, gt=0, description="measure the objective on a fixed POPE subset every this many optimizer steps "
        "of each trial (what the scheduler stops on); null: only after training (then scheduler: none)")
    probe_questions: int = Field(100, gt=1, description="questions per POPE split in that subset (half yes)")
    scheduler: Literal["none", "asha", "median"] = Field(
        "asha", description="early stopping on the objective measured during training (needs eval_every_steps)")
    asha: AshaConfig = Field(default_factory=AshaConfig)
    median: MedianStoppingConfig = Field(default_factory=MedianStoppingConfig)
    max_concurrent_trials: int | None = Field(None, gt=0)
    cpus_per_trial_driver: float = Field(0.25, gt=0.0)

    @field_validator("metric")
    @classmethod
    def _pope_objective(cls, value: str) -> str:
        if not OBJECTIVE_PATTERN.match(value):
            raise ValueError(f"{value!r} is not a POPE objective: expected pope/<split>/<accuracy|precision|recall|"
                             "f1|yes_ratio|yes_ratio_gap> (e.g. pope/adversarial/f1) or pope/mean_f1")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "TuneSection":
        if self.search_space and self.scheduler != "none" and self.eval_every_steps is None:
            raise ValueError(f"scheduler {self.scheduler!r} stops trials on the objective measured during training: "
                             "set tune.eval_every_steps, or tune.scheduler: none")
        kinds = {key: dim.kind for key, dim in self.search_space.items()}
        if self.search == "grid":
            sampled = [key for key, kind in kinds.items() if kind not in ("grid", "choice")]
            if sampled:
                raise ValueError(f"search grid takes grid or choice dimensions only; {sampled} are sampled ranges")
        if self.search in ("optuna", "hyperopt"):
            grids = [key for key, kind in kinds.items() if kind == "grid"]
            if grids:
                raise ValueError(f"search {self.search} samples every dimension itself: make {grids} kind choice")
        return self


TRACKERS = ("wandb", "tensorboard", "mlflow")


class WandbConfig(_Section):
    project: str = "hadpo"
    mode: Literal["offline", "online", "disabled"] = "offline"
    api_key_env: str = Field("WANDB_API_KEY", description="name of the env var holding the key (never the key)")


class MlflowConfig(_Section):
    """The MLflow file store rank 0 writes (no MLflow server, no network)."""

    store: str | None = Field(
        None, description="folder of the file store (`mlflow ui --backend-store-uri DIR`); default <run_dir>/mlruns")
    experiment: str | None = Field(None, description="experiment name; default: the config's name")


class ExportConfig(_Section):
    """`hadpo export`: how a merged model is written and where the hub token comes from."""

    hub_token_env: str = Field("HF_TOKEN", description="name of the env var holding the hub token (never the token)")
    max_shard_size: str = Field("5GB", description="largest safetensors shard of a merged export")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the merged weights; auto = the base model's (the merge itself runs in float32)")


class EnvConfig(_Section):
    """Environment knobs passed to every Ray worker (runtime_env), never set by hand per machine."""

    hf_home: str | None = None
    hf_endpoint: str | None = None
    offline: bool = Field(True, description="HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE: never reach the hub")
    extra: dict[str, str] = Field(default_factory=dict)


# Every config value that names a file or folder ("*": each value of a mapping or item of a list). They are made absolute
# (against the current directory, "~" expanded) when the config is validated on the driver, so that a Ray
# worker, whose working directory is somewhere else, reads and writes exactly the same places; a URI
# (s3://...) is kept. A new path key must be listed here (tests/robustness/test_contained_paths.py checks it).
PATH_KEYS = ("output_root", "data.preference.*.path", "data.preference.*.image_root", "data.hadpo_desc",
             "data.hadpo_pope", "data.vg_image_data", "data.vg_root", "data.sft", "data.pope.questions.*",
             "data.pope.image_root", "data.pope.datasets.*.questions.*", "data.pope.datasets.*.image_root",
             "data.milebench_root", "data.synthetic_dir", "model.path", "train.storage_path",
             "scaling.autoscaling_config",
             "train.deepspeed.config", "mlflow.store", "env.hf_home")  # deepspeed.config: a path; a dict stays


def _make_paths_absolute(config: "ExperimentConfig") -> None:
    """Set every PATH_KEYS value of a validated config to its absolute form, in place.

    Written straight into the models' fields (no re-validation, which would recurse): the values are
    the same paths, only spelled absolutely.
    """
    def children(node: Any, part: str) -> list[tuple[Any, Any]]:
        if part == "*":
            if isinstance(node, list):
                return list(enumerate(node))
            return list(node.items()) if isinstance(node, dict) else []
        if isinstance(node, BaseModel) and part in type(node).model_fields:
            return [(part, getattr(node, part))]
        return []

    def visit(node: Any, parts: list[str]) -> None:
        for key, value in children(node, parts[0]):
            if len(parts) > 1:
                visit(value, parts[1:])
            elif isinstance(value, str) and value.strip():
                if isinstance(node, (dict, list)):
                    node[key] = absolute_path(value)
                else:
                    node.__dict__[key] = absolute_path(value)

    for dotted in PATH_KEYS:
        visit(config, dotted.split("."))


class ExperimentConfig(_Section):
    name: str = Field("hadpo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    output_root: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tune: TuneSection = Field(default_factory=TuneSection)
    tracking: list[Literal["wandb", "tensorboard", "mlflow"]] = Field(
        default_factory=lambda: list(TRACKERS),
        description="where rank 0 logs the training metrics besides the curves parquet: wandb (in wandb.mode, "
        "offline by default), tensorboard (event files under <run_dir>/tensorboard), mlflow (a file store, "
        "see mlflow.store); all of them write files only")
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)

    @model_validator(mode="after")
    def _paths_absolute(self) -> "ExperimentConfig":
        _make_paths_absolute(self)
        return self

    @model_validator(mode="after")
    def _search_space_keys_exist(self) -> "ExperimentConfig":
        for key in self.tune.search_space:
            node: Any = self
            for part in key.split("."):
                if not isinstance(node, BaseModel) or part not in type(node).model_fields:
                    raise ValueError(f"tune.search_space: {key!r} is not a config key")
                node = getattr(node, part)
            if isinstance(node, BaseModel):
                raise ValueError(f"tune.search_space: {key!r} is a section, not a value")
        return self

    @field_validator("output_root")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    # Paths derived from the config, so each stage can run, resume or be re-run alone.
    # (`orchestrator.layout` names every file under them.)
    @property
    def output_dir(self) -> Path:
        """`output_root`, resolved: the folder of every run and of what runs share (caches, the world)."""
        return Path(self.output_root).expanduser().resolve()

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name

    @property
    def mlflow_store(self) -> Path:
        if self.mlflow.store:
            return Path(self.mlflow.store).expanduser().resolve()
        return layout.mlflow_store(self.run_dir)

    @property
    def tensorboard_dir(self) -> Path:
        return layout.tensorboard_dir(self.run_dir)

    @property
    def world_dir(self) -> Path:
        if self.data.synthetic_dir:
            return Path(self.data.synthetic_dir).expanduser().resolve()
        return layout.world_dir(self.output_dir)

    def runtime_env(self) -> dict[str, Any]:
        """The Ray runtime_env (environment variables) every worker and actor of this run gets."""
        # expandable segments: the allocator grows its pools in place instead of new cudaMalloc blocks for
        # every new shape (packed DPO rows and eval batches change length from step to step)
        # Ray Train's controller collects a worker's report every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s) and a
        # worker's next report waits until the last one was collected (a queue of one): the demo's warm-up,
        # reporting every 10 steps of ~0.15 s, waited 0.4-0.6 s at each of its 80 reports (40-50 s of ~190 s
        # on 2 busy cores); with 0.5 s, 0.07 s
        env = {"WANDB_MODE": self.wandb.mode, "TOKENIZERS_PARALLELISM": "false",
               "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
        if self.env.hf_home:
            env["HF_HOME"] = self.env.hf_home
        if self.env.hf_endpoint:
            env["HF_ENDPOINT"] = self.env.hf_endpoint
        if self.env.offline:
            env["HF_HUB_OFFLINE"] = "1"
            env["TRANSFORMERS_OFFLINE"] = "1"
        env.update(self.env.extra)
        return {"env_vars": env}

    def content_hash(self) -> str:
        """A stable hash of the resolved config (stages use it to tell whether outputs are current)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid experiment config"]
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "<root>"
        lines.append(f"  {path}: {item['msg']}")
    return "\n".join(lines)


def config_from_dict(raw: dict[str, Any], source: str = "<config>") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML experiment config; `overrides` are "a.b.c=value" strings (value parsed as YAML)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8-sig")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{path}: config file not readable (permission denied)") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    for override in overrides or []:
        apply_override(raw, override)
    return config_from_dict(raw, str(path))


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set one dotted key in a raw config dict, e.g. ``train.beta=0.5``."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. train.beta=0.5")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as error:
        reason = str(error).replace("\n", " ")
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({reason})") from None


def dump_config(config: ExperimentConfig, path: str | Path) -> None:
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    atomic_write(path, lambda temp: temp.write_text(text))
