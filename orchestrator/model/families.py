"""Model families behind one interface: LLaVA-1.5, LLaVA-NeXT (llava-hf v1.6) and Qwen2.5-VL.

Training and evaluation never name a model class. They ask the loaded model's `ModelFamily` for what
differs between families:

- how images become the model's vision inputs (`vision_inputs`): LLaVA-1.5 pads each image to a square and
  gives one fixed-size tile (576 tokens at 336 px); LLaVA-NeXT tiles it at the best of its grid
  resolutions ("anyres": base tile + grid tiles, `image_sizes`, ~2,000 tokens at 336 px); Qwen2.5-VL cuts
  it into 14 px patches merged 2x2 at its own resolution (`image_grid_thw`, tokens vary with the image);
- what a prompt holds per image before expansion (`image_text`) and how many tokens each image expands to
  (`VisionInputs.tokens`, known once the images are processed);
- whether a sequence's positions are plain 1-D counts, so pairs can be packed (chosen and rejected answers
  after one shared prompt) and POPE's image prefix reused (`one_d_positions`); Qwen2.5-VL's multimodal
  rotary positions are computed by the model from the whole row, so it takes the plain paths;
- nothing about LoRA: every family keeps its language model under ``language_model`` (LoRA goes there,
  `lora.lora_target_regex`) and everything outside it and the output head stays frozen (`lora.freeze_vision`).

The family is read from the folder's ``config.json`` (``model_type``) unless the config names it
(`model.family`); a folder of another family is refused naming both.

Prompts: LLaVA-1.5 keeps HA-DPO's ``v1`` / ``llava_v1`` text templates (`templates.build_prompt`); every
family can also use its own chat template (``chat``: the processor's or tokenizer's Jinja template,
rendered with one image entry per image before the question, or in place of each ``<image>`` of a
MileBench context).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from orchestrator.images import load_image
from orchestrator.model.image_tokens import QWEN2_5_VL_MAX_PIXELS, llava_next_max_image_tokens, qwen_max_image_tokens
from orchestrator.model.templates import CHAT_TEMPLATE, IMAGE_PLACEHOLDER, build_prompt, expand_image_tokens

log = logging.getLogger(__name__)

# What `LoadedModel.image_file_inputs` keeps per process: all of the demo's images; ~380 of LLaVA-1.5's
# 336 px ones (1.35 MB of float32 pixels each)
IMAGE_CACHE_BYTES = 512 * 2**20


@dataclass
class VisionInputs:
    """The vision side of a model call for a list of images (in order)."""

    tensors: dict[str, torch.Tensor]   # keyword arguments of the model's forward: pixel_values, ...
    tokens: list[int]                  # image tokens each image expands to in the prompt

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
           ) -> dict[str, torch.Tensor]:
        """The tensors on `device`, floating ones (the pixels) cast to `dtype`."""
        out = {}
        for name, tensor in self.tensors.items():
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            out[name] = tensor.to(device) if device is not None else tensor
        return out

    @staticmethod
    def concat(parts: Sequence["VisionInputs"]) -> "VisionInputs":
        """Several lists' inputs as one (the images one after the other), e.g. one per training row."""
        parts = [part for part in parts if part.tokens]
        if not parts:
            return VisionInputs({}, [])
        names = parts[0].tensors.keys()
        tensors = {}
        for name in names:
            pieces = [part.tensors[name] for part in parts]
            if pieces[0].dim() == 5:  # LLaVA-NeXT tiles [images, tiles, 3, H, W]: pad to the most tiles
                most = max(piece.shape[1] for piece in pieces)
                pieces = [torch.nn.functional.pad(piece, (0, 0, 0, 0, 0, 0, 0, most - piece.shape[1]))
                          for piece in pieces]
            tensors[name] = torch.cat(pieces)
        return VisionInputs(tensors, [count for part in parts for count in part.tokens])


@dataclass(frozen=True)
class ModelFamily:
    """What differs between model families (see the module docstring); LLaVA-1.5 is the base."""

    name: str
    model_type: str                  # config.json's model_type
    model_class: str                 # the transformers class `load_model` gets through the Auto class
    image_text: str = IMAGE_PLACEHOLDER   # what a prompt holds per image before expansion
    one_d_positions: bool = True     # plain 1-D positions: pairs can be packed and prefixes reused
    fixed_image_tokens: bool = False  # every image expands to tokens_per_image (LLaVA-1.5's one tile)

    def image_token_id(self, model_config) -> int:
        value = getattr(model_config, "image_token_id", None)
        if value is None:
            value = getattr(model_config, "image_token_index", None)
        if value is None:
            raise ValueError(f"{self.name}: the model config names no image token (image_token_id)")
        return int(value)

    def vision_inputs(self, loaded: "LoadedModel", images: Sequence[Image.Image]) -> VisionInputs:
        images = [image.convert("RGB") for image in images]
        if not images:
            return VisionInputs({}, [])
        if self.name == "llava":
            from orchestrator.model.llava import pixel_values

            return VisionInputs({"pixel_values": pixel_values(loaded, images)}, [loaded.tokens_per_image] * len(images))
        if self.name == "llava_next":
            # The processor expands one <image> per text to that image's anyres token count.
            processed = loaded.processor(text=[IMAGE_PLACEHOLDER] * len(images), images=images,
                                         return_tensors="pt", padding=True)
            tokens = (processed["input_ids"] == loaded.image_token_id).sum(-1).tolist()
            return VisionInputs({"pixel_values": processed["pixel_values"],
                                 "image_sizes": processed["image_sizes"]}, [int(count) for count in tokens])
        processed = loaded.image_processor(images=images, return_tensors="pt")
        grid = processed["image_grid_thw"]
        merge = int(getattr(loaded.image_processor, "merge_size", 2))
        tokens = (grid.prod(-1) // (merge * merge)).tolist()
        return VisionInputs({"pixel_values": processed["pixel_values"], "image_grid_thw": grid},
                            [int(count) for count in tokens])


FAMILIES = {
    "llava": ModelFamily("llava", "llava", "LlavaForConditionalGeneration", fixed_image_tokens=True),
    "llava_next": ModelFamily("llava_next", "llava_next", "LlavaNextForConditionalGeneration"),
    "qwen2_5_vl": ModelFamily("qwen2_5_vl", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration",
                              image_text="<|vision_start|><|image_pad|><|vision_end|>", one_d_positions=False),
}


def family_of(path: str | Path) -> str:
    """The family of a model folder, from its config.json's ``model_type``."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face model folder (no config.json)")
    model_type = json.loads(config_path.read_text()).get("model_type")
    for family in FAMILIES.values():
        if family.model_type == model_type:
            return family.name
    raise ValueError(f"{config_path}: model_type {model_type!r} is not a supported family "
                     f"(supported: {', '.join(f.model_type for f in FAMILIES.values())})")


def resolve_family(configured: str, path: str | Path) -> ModelFamily:
    """`configured` ("auto" reads the folder), checked against the folder's own model_type."""
    found = family_of(path)
    if configured not in ("auto", found):
        raise ValueError(f"model.family is {configured!r} but {path} holds a {found!r} model "
                         f"(config.json model_type); set model.family: auto or {found}")
    return FAMILIES[found]


class ImageInputsCache:
    """Vision inputs by image file (path, size, modification time), kept while they fit in `max_bytes`,
    least recently used out first; safe to share between threads."""

    def __init__(self, max_bytes: int = IMAGE_CACHE_BYTES):
        self.max_bytes, self.held = max_bytes, 0
        self._entries: OrderedDict[tuple, tuple[VisionInputs, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str, make: Callable[[], VisionInputs]) -> VisionInputs:
        try:
            stat = os.stat(path)
        except OSError:  # `make` says why (file not found, ...)
            return make()
        key = (path, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0]
        inputs = make()
        size = sum(tensor.nbytes for tensor in inputs.tensors.values())
        with self._lock:
            if size <= self.max_bytes and key not in self._entries:
                self._entries[key] = (inputs, size)
                self.held += size
                while self.held > self.max_bytes:
                    self.held -= self._entries.popitem(last=False)[1][1]
        return inputs

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class LoadedModel:
    """A model of any family with what training and evaluation need to feed it."""

    model: torch.nn.Module
    family: ModelFamily
    tokenizer: Any
    image_processor: Any
    processor: Any | None            # the full processor where the family needs it (LLaVA, LLaVA-NeXT)
    image_token_id: int
    tokens_per_image: int            # LLaVA-1.5: exact; other families: the most one image may take
    image_mean: tuple[float, float, float]
    chat_template: str | None = None
    extra: dict = field(default_factory=dict)
    image_cache: "ImageInputsCache" = field(default_factory=lambda: ImageInputsCache(), repr=False, compare=False)

    @property
    def image_size(self) -> int:
        """The side of the square pixel tensor a LLaVA-1.5 image becomes (its image processor's crop)."""
        crop = getattr(self.image_processor, "crop_size", None)
        if crop:
            return int(crop["height"])
        return int(getattr(self.model.config.vision_config, "image_size", 0) or 0)

    def vision_inputs(self, images: Sequence[Image.Image]) -> VisionInputs:
        return self.family.vision_inputs(self, images)

    def image_file_inputs(self, path: str) -> VisionInputs:
        """One image file's vision inputs (ImageLoadError if it cannot be read), remembered (`ImageInputsCache`).

        Training rows come back to the same images every epoch (the demo's warm-up reads each of its 300 images
        ~85 times), and decoding and processing them again took ~35 ms of every 32-row batch on the prefetch
        thread, whose Python holds the GIL the step needs: the tiny model's steps ran 1.4x slower beside it.
        The inputs returned are shared: callers copy them (`VisionInputs.concat`, `.to`), never write into them.
        """
        return self.image_cache.get(path, lambda: self.vision_inputs([load_image(path)]))

    def image_tokens(self, sizes: Sequence[tuple[int, int]]) -> list[int]:
        """Image tokens each image of these (width, height) sizes expands to, without its pixels: every family's
        count follows from the image's size alone, so a blank image of that size is processed once per size.
        What token budgets count before the images themselves are decoded."""
        if self.family.fixed_image_tokens:
            return [self.tokens_per_image] * len(sizes)
        by_size = self.extra.setdefault("image_tokens_by_size", {})
        for size in dict.fromkeys(sizes):
            if size not in by_size:
                by_size[size] = self.vision_inputs([Image.new("RGB", size)]).tokens[0]
        return [by_size[size] for size in sizes]

    def save_processing(self, folder: str | Path) -> None:
        """What turns text and images into this model's inputs (processor or tokenizer + image processor,
        chat template), saved beside a model's weights so the folder loads on its own."""
        save_processing_files(folder, self.processor, self.tokenizer, self.image_processor, self.chat_template)

    def prompt_text(self, question: str, template: str, num_images: int = 1) -> str:
        """The prompt up to where the answer starts, one `family.image_text` per image (not yet expanded).

        `template` is ``v1`` / ``llava_v1`` (HA-DPO's text templates) or ``chat`` (the model's chat
        template). A question that holds ``<image>`` placeholders (MileBench contexts) keeps them where
        they are; otherwise the images come first.
        """
        if template == CHAT_TEMPLATE:
            if not self.chat_template:
                raise ValueError(f"template 'chat': the {self.family.name} model folder has no chat template "
                                 "(chat_template.jinja/.json or the tokenizer's); use v1 or llava_v1")
            if IMAGE_PLACEHOLDER in question:  # a MileBench context: each image where it stands
                content: list[dict] = []
                for index, text in enumerate(question.split(IMAGE_PLACEHOLDER)):
                    if index:
                        content.append({"type": "image"})
                    if text.strip():
                        content.append({"type": "text", "text": text.strip()})
            else:  # images first, then the question
                content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
            return self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                      chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=True)
        text = build_prompt(question, template, num_images)
        return text if self.family.image_text == IMAGE_PLACEHOLDER else \
            text.replace(IMAGE_PLACEHOLDER, self.family.image_text)

    def encode(self, text: str, image_tokens: Sequence[int]) -> list[int]:
        """Token ids of a prompt text, each image token repeated as often as its image needs.

        BOS is added where the tokenizer adds one and the text does not already start with it."""
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        ids = list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])
        return expand_image_tokens(ids, self.image_token_id, list(image_tokens))

    def prompt_ids(self, question: str, template: str, image_tokens: Sequence[int]) -> list[int]:
        """`encode(prompt_text(...))`: ids of `question` in `template` with these images' token counts."""
        return self.encode(self.prompt_text(question, template, len(image_tokens)), image_tokens)


def save_processing_files(folder: str | Path, processor, tokenizer, image_processor, chat_template: str | None) -> None:
    """The processor where the family has one, else the tokenizer, the image processor and the chat template."""
    if processor is not None:
        processor.save_pretrained(str(folder))
        return
    tokenizer.save_pretrained(str(folder))
    image_processor.save_pretrained(str(folder))
    if chat_template:
        (Path(folder) / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}))


def load_processing(path: str | Path, family: ModelFamily, max_image_pixels: int | None = None
                    ) -> tuple[Any | None, Any, Any]:
    """(processor or None, tokenizer, image processor) of a model folder, as saved there.

    Qwen2.5-VL's processor class also wants a video processor (torchvision): its tokenizer and image processor
    are all we use, so no processor is built for it. `max_image_pixels` (``model.max_image_pixels``) lowers
    Qwen2.5-VL's per-image pixel budget (its image processor's ``size.longest_edge``, i.e. max_pixels); the
    LLaVA families' tiles are fixed and ignore it."""
    from transformers import AutoImageProcessor, AutoTokenizer

    if family.name == "qwen2_5_vl":
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        if max_image_pixels:
            size = dict(getattr(image_processor, "size", None) or {})
            size["longest_edge"] = int(max_image_pixels)
            size["shortest_edge"] = min(int(size.get("shortest_edge") or max_image_pixels), int(max_image_pixels))
            image_processor.size = size
            for name, key in (("max_pixels", "longest_edge"), ("min_pixels", "shortest_edge")):
                if getattr(image_processor, name, None) is not None:  # older processors keep the budget here too
                    setattr(image_processor, name, size[key])
        return None, tokenizer, image_processor
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    return processor, processor.tokenizer, processor.image_processor


def read_chat_template(path: str | Path, *holders) -> str | None:
    """The folder's chat template: the processor's or tokenizer's, else chat_template.jinja / .json."""
    for holder in holders:
        template = getattr(holder, "chat_template", None)
        if isinstance(template, str) and template:
            return template
    folder = Path(path)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    return None


def max_image_tokens(family: ModelFamily, model_config, image_processor) -> int:
    """Tokens one image takes at most (exact for LLaVA-1.5): what prompt budgets count per image
    (`image_tokens` says how each family counts; the planner counts the same way)."""
    from orchestrator.model.llava import tokens_per_image

    if family.name == "llava":
        return tokens_per_image(model_config)
    if family.name == "llava_next":
        vision = model_config.vision_config
        return llava_next_max_image_tokens(vision.image_size, vision.patch_size, model_config.image_grid_pinpoints)
    merge = int(getattr(image_processor, "merge_size", 2))
    patch = int(getattr(image_processor, "patch_size", 14))
    size = getattr(image_processor, "size", None) or {}
    most_pixels = int(size.get("longest_edge") or getattr(image_processor, "max_pixels", 0) or QWEN2_5_VL_MAX_PIXELS)
    return qwen_max_image_tokens(most_pixels, patch, merge)


def load_model(path: str | Path, dtype: str = "auto", device: str | torch.device = "cpu",
               attn_implementation: str = "sdpa", family: str = "auto", max_image_pixels: int | None = None
               ) -> LoadedModel:
    """Load a model folder of any supported family (tiny or real) from local disk only (`max_image_pixels`:
    see `load_processing`)."""
    from transformers import AutoModelForImageTextToText
    from transformers.integrations import is_deepspeed_zero3_enabled

    from orchestrator.model.llava import resolve_dtype

    path = Path(path)
    chosen = resolve_family(family, path)
    torch_dtype = resolve_dtype(dtype, device)
    placement = {}
    if not is_deepspeed_zero3_enabled():  # ZeRO-3 partitions the weights itself and refuses a device_map
        target = torch.device(device)
        if target.type == "cuda" and target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        # the safetensors are read straight into `device`: no CPU copy of a 7B model first
        placement["device_map"] = {"": target}
    model = AutoModelForImageTextToText.from_pretrained(
        str(path), dtype=torch_dtype, local_files_only=True, attn_implementation=attn_implementation, **placement,
    ).to(device)
    processor, tokenizer, image_processor = load_processing(path, chosen, max_image_pixels)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return LoadedModel(
        model=model, family=chosen, tokenizer=tokenizer, image_processor=image_processor, processor=processor,
        image_token_id=chosen.image_token_id(model.config),
        tokens_per_image=max_image_tokens(chosen, model.config, image_processor),
        image_mean=tuple(getattr(image_processor, "image_mean", (0.5, 0.5, 0.5))),
        chat_template=read_chat_template(path, processor, tokenizer),
    )
