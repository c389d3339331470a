"""The model adapter every evaluation calls: the reference harness's interface and our models behind it.

`MileBenchModel` has MileBench's reference harness's interface (its ``workers/model_workers.py``):
``init_components(config)`` and ``forward(questions, image_paths, device, gen_kwargs) -> list[str]``, plus
what our predictor needs to build prompts (token counting, left truncation), ``answer(benchmark, ...)``
(the predictor's call: a model whose prompt depends on the benchmark overrides it) and, optionally,
``score_yes_no`` for POPE's one-forward scoring.

`VisionLanguageModel` implements it for a model folder of any family (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL;
plus an optional LoRA adapter, merged), or, through `VisionLanguageModel.from_loaded`, for a model already
in memory (a training worker's policy, for a sweep's probe): MileBench questions go through
`milebench_template_for` (LLaVA-1.5: MileBench's LLaVA worker template, `milebench.llava_worker_prompt`;
other families: their chat template), POPE questions through the configured one (``llava_v1``). To evaluate
another model, subclass `MileBenchModel` and pass the class (or ``"module:Class"``) as
``run_eval(..., model_adapter=...)``; `load_model_adapter` resolves it.
"""

from __future__ import annotations

from typing import Sequence

from orchestrator.eval.milebench import (IMAGE_TOKEN, LLAVA_WORKER_GEN_KWARGS, LLAVA_WORKER_TEMPLATE,
                                         llava_worker_prompt)
from orchestrator.eval.pope import strip_special_tokens
from orchestrator.images import load_image
from orchestrator.model.adapter import find_adapter
from orchestrator.model.templates import CHAT_TEMPLATE, IMAGE_PLACEHOLDER, TEMPLATES

AUTO_TEMPLATE = "auto"  # eval.milebench_template: LLaVA-1.5's worker template for LLaVA-1.5, else the chat template

# ----------------------------------------------------------------------------------------------
# Batching helper shared by model adapters


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int):
    """input_ids, attention_mask and position_ids (torch, long) for left-padded sequences.

    Positions count only real tokens (0 at each sequence's first token), so a padded row sees the
    same positions, and thus gives the same logits, as the same sequence alone.
    """
    import torch

    if not sequences:
        raise ValueError("no sequences to pad")
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if len(sequence):
            input_ids[row, width - len(sequence):] = torch.as_tensor(list(sequence), dtype=torch.long)
            attention_mask[row, width - len(sequence):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


# ----------------------------------------------------------------------------------------------
# Model adapters


class MileBenchModel:
    """The reference harness's model interface: ``init_components(config)`` and ``forward``.

    Subclasses set `tokens_per_image`, `image_token` and `max_length` in `init_components` and
    implement `forward`; `score_yes_no` is optional (POPE's score mode needs it). The predictor
    calls `answer` with the benchmark's name, which by default is `forward`: a model whose prompt
    or template depends on the benchmark overrides `answer` and `prompt_length`. The default
    token counting splits on whitespace; override `count_tokens` / `keep_last_tokens` with the
    model's tokenizer for exact budgets.
    """

    name = "model"
    image_token = IMAGE_TOKEN
    tokens_per_image = 1
    max_length: int | None = None
    device = "cpu"

    def __init__(self, config: dict):
        self.config = dict(config)
        self.init_components(self.config)

    def init_components(self, config: dict) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def keep_last_tokens(self, text: str, n: int) -> str:
        return " ".join(text.split()[-n:]) if n > 0 else ""

    def prompt_length(self, question: str, n_images: int, benchmark: str = "milebench") -> int:
        """Tokens of the full prompt the model will see for `benchmark` (images expanded)."""
        return self.count_tokens(question) + n_images * self.tokens_per_image

    def load_images(self, paths: Sequence[str]):
        return [load_image(path) for path in paths]

    def forward(self, questions: list[str], image_paths: list[list[str]], device=None,
                gen_kwargs: dict | None = None, images: list[list] | None = None) -> list[str]:
        raise NotImplementedError

    def answer(self, benchmark: str, questions: list[str], image_paths: list[list[str]],
               gen_kwargs: dict | None = None, images: list[list] | None = None) -> list[str]:
        """Generated answers to one benchmark's batch ("milebench" or "pope"): `forward` by default."""
        return self.forward(questions, image_paths, device=self.device, gen_kwargs=gen_kwargs, images=images)

    def score_yes_no(self, questions: list[str], image_paths: list[list[str]],
                     images: list[list] | None = None) -> list[float]:
        raise NotImplementedError(f"{type(self).__name__} cannot score yes/no; use eval.mode=generate")


MILEBENCH_TEMPLATES = (AUTO_TEMPLATE, LLAVA_WORKER_TEMPLATE, *TEMPLATES, CHAT_TEMPLATE)  # milebench_template's values


def milebench_template_for(configured: str, family: str) -> str:
    """The MileBench template a model of `family` answers in: ``auto`` is MileBench's LLaVA worker
    (``llava_llama_2``) for LLaVA-1.5, the model's own chat template (``chat``) for the other families
    (MileBench runs every model it has a worker for in that model's own conversation format; its LLaVA
    worker's template is LLaVA-1.5's). ``llava_llama_2`` named for another family is an error."""
    if configured not in MILEBENCH_TEMPLATES:
        raise ValueError(f"eval.milebench_template {configured!r}: expected one of {MILEBENCH_TEMPLATES}")
    if configured == AUTO_TEMPLATE:
        return LLAVA_WORKER_TEMPLATE if family == "llava" else CHAT_TEMPLATE
    if configured == LLAVA_WORKER_TEMPLATE and family != "llava":
        raise ValueError(f"eval.milebench_template {LLAVA_WORKER_TEMPLATE!r} is MileBench's LLaVA-1.5 worker "
                         f"template, not a {family} model's; use 'chat' (the model's chat template) or 'auto'")
    return configured


def eos_token_ids(model, tokenizer) -> list[int]:
    """The ids that end an answer: the model's generation config's (Qwen2.5-VL-Instruct lists two), else the
    tokenizer's EOS."""
    config = getattr(model, "generation_config", None)
    value = getattr(config, "eos_token_id", None) if config is not None else None
    if value is None:
        value = tokenizer.eos_token_id
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


class VisionLanguageModel(MileBenchModel):
    """A model folder of any family `families.load_model` knows (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL; tiny or
    7B), optionally with a LoRA adapter merged in.

    config: ``model_path``, ``adapter_path`` (optional), ``family`` (``auto``: the folder's config.json),
    ``max_image_pixels`` (Qwen2.5-VL's per-image pixel budget, ``model.max_image_pixels``), ``dtype`` ("auto" =
    bf16 on GPU, fp32 on CPU), ``attn_implementation``, ``device``, and the conversation templates: ``template``
    for POPE (``llava_v1``, as HA-DPO evaluates LLaVA-1.5; ``chat``: the model's chat template) and
    ``milebench_template`` for MileBench (`milebench_template_for`: ``llava_llama_2``,
    MileBench's LLaVA worker, `llava_worker_prompt`, for LLaVA-1.5 only; ``chat``; ``v1`` / ``llava_v1``,
    not MileBench's). `forward`, the reference harness's call, answers MileBench questions.

    Each image expands to the tokens its family's vision code makes for it (`LoadedModel.vision_inputs`:
    576 for LLaVA-1.5, per image for LLaVA-NeXT's anyres tiles and Qwen2.5-VL's patches). Prompt budgets
    (`prompt_length`, MileBench's truncation) count each image at `tokens_per_image` before the images are
    opened: exact for LLaVA-1.5, the most one image may take for the other families (an upper bound; for
    Qwen2.5-VL ``max_image_pixels`` / 28^2).

    Batches are left-padded with an attention mask; for families with 1-D positions the position ids
    count real tokens only, and Qwen2.5-VL computes its multimodal rotary positions from the attention
    mask itself. So an answer does not depend on what else is in its batch (exactly in fp32; in bf16 a
    GPU's kernels may round differently for another batch shape). Generation stops at the model's EOS ids
    (`eos_token_ids`).
    """

    name = "vlm"
    template = "llava_v1"
    milebench_template = LLAVA_WORKER_TEMPLATE

    def init_components(self, config: dict) -> None:
        import torch

        from orchestrator.model.families import load_model

        device = config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        loaded = load_model(config["model_path"], dtype=config.get("dtype", "auto"), device=torch.device(device),
                            attn_implementation=config.get("attn_implementation", "sdpa"),
                            family=config.get("family") or "auto", max_image_pixels=config.get("max_image_pixels"))
        model = loaded.model
        if config.get("adapter_path"):
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(find_adapter(config["adapter_path"])))
            model = model.merge_and_unload()
        self._attach(loaded, model.eval(), config.get("template", "llava_v1"), torch.device(device),
                     config.get("milebench_template") or AUTO_TEMPLATE)

    @classmethod
    def from_loaded(cls, loaded, model, template: str = "llava_v1") -> "VisionLanguageModel":
        """An adapter around a model already in memory, e.g. the policy a training worker is training (LoRA
        unmerged): the same prompts and scoring as an evaluation actor. The caller sets train/eval mode."""
        import torch

        adapter = cls.__new__(cls)
        adapter.config = {"template": template}
        adapter._attach(loaded, model, template, next(model.parameters()).device, AUTO_TEMPLATE)
        # no_grad, not inference_mode: a model in training must not get inference tensors (ZeRO-3 may keep the
        # weights it gathers for a forward and reuse them in the next training step)
        adapter._no_grad = torch.no_grad
        return adapter

    def _attach(self, loaded, model, template: str, device, milebench_template: str) -> None:
        import torch

        self._no_grad = torch.inference_mode
        self.device = device
        self.template = template
        self.loaded = loaded
        self.family = loaded.family
        self.milebench_template = milebench_template_for(milebench_template, self.family.name)
        self.model = model
        self.tokenizer = self.loaded.tokenizer
        self.tokens_per_image = self.loaded.tokens_per_image
        # what a MileBench question holds per image: `LoadedModel.prompt_text` puts the family's own image
        # text (Qwen2.5-VL: <|vision_start|><|image_pad|><|vision_end|>) in its place
        self.image_token = IMAGE_PLACEHOLDER
        text_config = getattr(self.model.config, "text_config", self.model.config)
        self.max_length = int(getattr(text_config, "max_position_embeddings", 0)) or None
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        self._yes_no: tuple[int, int] | None = None

    # token counting for prompt budgets
    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self._ids(text)) if text else 0

    def keep_last_tokens(self, text: str, n: int) -> str:
        """``decode(encode(text)[-n:])``, also when all of `text` fits: MileBench's utils.py decodes
        every kept fragment, and a decode need not give the text back (spaces, unknown words)."""
        if n <= 0:
            return ""
        return self.tokenizer.decode(self._ids(text)[-n:], skip_special_tokens=False)

    def template_for(self, benchmark: str) -> str:
        return self.milebench_template if benchmark == "milebench" else self.template

    def prompt_ids(self, question: str, image_tokens: Sequence[int], template: str | None = None) -> list[int]:
        """Token ids (BOS first where the tokenizer adds one) of `question` in `template` (None:
        `self.template`), image ``i`` expanded to ``image_tokens[i]`` tokens.

        ``llava_llama_2`` is MileBench's LLaVA worker (`llava_worker_prompt`): `question` must hold
        its images' ``<image>``, as MileBench's questions do; the other templates put missing ones first.
        """
        template = template or self.template
        if template == LLAVA_WORKER_TEMPLATE:
            return self.loaded.encode(llava_worker_prompt(question), image_tokens)
        return self.loaded.prompt_ids(question, template, image_tokens)

    def prompt_length(self, question: str, n_images: int, benchmark: str = "milebench") -> int:
        """Tokens of the prompt with each image counted at `tokens_per_image` (exact for LLaVA-1.5, an upper
        bound for the other families: the images are not opened yet)."""
        return len(self.prompt_ids(question, [self.tokens_per_image] * n_images, self.template_for(benchmark)))

    def _inputs(self, questions, image_paths, images, template: str | None = None):
        """The model's keyword arguments for a left-padded batch: ids with each image expanded to its own
        token count, attention mask, 1-D position ids where the family has them, and the vision inputs."""
        if images is None:
            images = [self.load_images(paths) for paths in image_paths]
        flat = [image for item_images in images for image in item_images]
        vision = self.loaded.vision_inputs(flat)
        counts = iter(vision.tokens)
        ids = [self.prompt_ids(question, [next(counts) for _ in item_images], template)
               for question, item_images in zip(questions, images)]
        input_ids, attention_mask, position_ids = left_pad(ids, self.pad_id)
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
        if self.family.one_d_positions:
            inputs["position_ids"] = position_ids.to(self.device)
        if flat:
            inputs.update(vision.to(self.device, next(self.model.parameters()).dtype))
        return inputs

    def forward(self, questions: list[str], image_paths: list[list[str]], device=None,
                gen_kwargs: dict | None = None, images: list[list] | None = None) -> list[str]:
        """MileBench answers as its LLaVA worker gives them: `milebench_template`, and
        `LLAVA_WORKER_GEN_KWARGS` unless `gen_kwargs` is given."""
        return self.generate(questions, image_paths, dict(LLAVA_WORKER_GEN_KWARGS if gen_kwargs is None
                                                          else gen_kwargs), images, self.milebench_template)

    def answer(self, benchmark: str, questions: list[str], image_paths: list[list[str]],
               gen_kwargs: dict | None = None, images: list[list] | None = None) -> list[str]:
        """`generate` in the benchmark's template: MileBench's (`milebench_template`), POPE's `template`."""
        return self.generate(questions, image_paths, dict(gen_kwargs or {}), images, self.template_for(benchmark))

    def generate(self, questions: list[str], image_paths: list[list[str]], gen_kwargs: dict,
                 images: list[list] | None, template: str) -> list[str]:
        """Greedy answers (special tokens stripped) for a batch of questions with their images."""
        import torch

        inputs = self._inputs(questions, image_paths, images, template)
        kwargs = {"max_new_tokens": 128, "do_sample": False, "num_beams": 1, **gen_kwargs}
        if not kwargs["do_sample"]:
            # MileBench's gen_kwargs carry temperature 0.0, which greedy decoding never reads
            # (transformers would only warn that it is set)
            kwargs.pop("temperature", None)
        with torch.inference_mode():
            output = self.model.generate(**inputs, pad_token_id=self.pad_id, eos_token_id=self.eos_ids or None,
                                         **kwargs)
        return self.decode_answers(output[:, inputs["input_ids"].shape[1]:])

    def decode_answers(self, new_tokens) -> list[str]:
        """Answer texts of new token ids (rows; EOS and the padding after it are special tokens, stripped)."""
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [strip_special_tokens(text) for text in texts]

    def yes_no_ids(self) -> tuple[int, int]:
        """Token ids of "Yes" and "No" as the first answer token (LLaMA: "▁Yes", "▁No"; Qwen: "Yes", "No")."""
        if self._yes_no is None:
            ids = []
            for word in ("Yes", "No"):
                pieces = self._ids(word)
                if not pieces or pieces[0] == self.tokenizer.unk_token_id:
                    raise ValueError(f"the tokenizer has no token for {word!r}; score mode needs one")
                ids.append(pieces[0])
            if ids[0] == ids[1]:
                raise ValueError("'Yes' and 'No' map to the same token; score mode cannot tell them apart")
            self._yes_no = (ids[0], ids[1])
        return self._yes_no

    def score_yes_no(self, questions: list[str], image_paths: list[list[str]],
                     images: list[list] | None = None) -> list[float]:
        """p(yes) = softmax over the "Yes"/"No" logits at the last prompt position (one forward)."""
        import torch

        yes, no = self.yes_no_ids()
        inputs = self._inputs(questions, image_paths, images)
        with self._no_grad():
            logits = self.model(**inputs, logits_to_keep=1).logits[:, -1, :]
        pair = logits[:, [yes, no]].float()
        return torch.softmax(pair, dim=-1)[:, 0].tolist()


def load_model_adapter(spec) -> type[MileBenchModel]:
    """A model adapter class from a class, or a ``"package.module:ClassName"`` string."""
    if spec is None:
        return VisionLanguageModel
    if isinstance(spec, type):
        return spec
    module_name, _, class_name = str(spec).partition(":")
    if not class_name:
        raise ValueError(f"model adapter {spec!r}: expected 'package.module:ClassName'")
    import importlib

    return getattr(importlib.import_module(module_name), class_name)
