"""Batches of dataset rows -> model inputs (token ids, labels, attention mask, pixel values).

A *preference* batch of B pairs becomes 2B sequences, the B chosen answers first and then the B
rejected ones, each with its own copy of the image (CONTEXT.md section 3: "chosen and rejected are
batched together as 2B rows, images duplicated"). The prompt is built with the config's train
template (`build_prompt`), tokenized once per pair (`encode_prompt`, image tokens expanded), and each
answer is appended by `encode_example` (labels -100 on the prompt, the answer's ``</s>`` labelled).

Padding uses the tokenizer's pad id with label -100 and attention 0. Right padding is the default for
training: Llama's position ids count from the start of the row, so right padding leaves every real
token's position unchanged (left padding would shift them). Both sides are supported.

`logits_to_keep` tells the model to compute logits only for the last positions that can carry a
label (from just before the earliest answer token to the end): for LLaVA's 611-token prompts and
128-token answers that is about 1/6 of the positions, which saves most of the float32 logits memory
without changing a single log-prob. Labels are returned already cut to the same window.

A row whose image cannot be loaded is skipped and reported in `skipped` (datasets.py filters such rows
before training, so this is a rare race, e.g. a file deleted mid-run), never an exception; a prompt
longer than `max_length` is skipped the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from orchestrator.images import ImageLoadError, load_image
from orchestrator.model.families import LoadedModel
from orchestrator.model.llava import pixel_values
from orchestrator.model.templates import (IGNORE_INDEX, build_prompt, encode_answer, encode_example,
                                          encode_prompt)

log = logging.getLogger(__name__)


@dataclass
class Collated:
    """Model inputs for one micro-batch (2B rows for DPO, B rows for SFT)."""

    input_ids: torch.Tensor        # [N, T]
    attention_mask: torch.Tensor   # [N, T]
    labels: torch.Tensor           # [N, K]: the last K positions (K = logits_to_keep)
    pixel_values: torch.Tensor     # [N, 3, H, W]
    logits_to_keep: int
    num_examples: int              # pairs (DPO) or examples (SFT) kept
    num_tokens: int                # non-padding tokens of the N rows
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"sample_id", "reason"}
    sample_ids: list[str] = field(default_factory=list)  # of the kept examples, in row order
    reference: tuple[torch.Tensor, torch.Tensor] | None = None  # cached reference log-probs ([B], [B])

    def model_inputs(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
                     ) -> dict[str, Any]:
        """Keyword arguments for `LlavaForConditionalGeneration.forward` (without labels)."""
        pixels = self.pixel_values if dtype is None else self.pixel_values.to(dtype)
        return {
            "input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device),
            "pixel_values": pixels.to(device), "logits_to_keep": self.logits_to_keep,
        }


def _column(batch: Mapping[str, Sequence[Any]], name: str) -> list[Any]:
    if name not in batch:
        raise KeyError(f"batch has no column {name!r} (columns: {sorted(batch)})")
    return [value.item() if hasattr(value, "item") and not isinstance(value, str) else value
            for value in batch[name]]


def pad_sequences(ids: list[list[int]], labels: list[list[int]], pad_id: int, side: str = "right"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad to the longest row: ids with `pad_id`, labels with -100, attention mask 1 on real tokens."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max(len(row) for row in ids)
    out_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    out_labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (row, row_labels) in enumerate(zip(ids, labels)):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        out_ids[i, span] = torch.tensor(row, dtype=torch.long)
        out_labels[i, span] = torch.tensor(row_labels, dtype=torch.long)
        mask[i, span] = 1
    return out_ids, out_labels, mask


def labelled_window(labels: torch.Tensor) -> int:
    """How many trailing positions' logits are needed to score every label of `labels` [N, T].

    Logits at position t score the label at t + 1, so the window starts one before the earliest
    labelled position of any row.
    """
    labelled = (labels != IGNORE_INDEX).any(0).nonzero()
    if len(labelled) == 0:
        return labels.shape[1]
    return labels.shape[1] - int(labelled[0]) + 1


def _finish(ids, labels, images, loaded, pad_id, padding_side, sample_ids, skipped) -> Collated:
    input_ids, full_labels, mask = pad_sequences(ids, labels, pad_id, padding_side)
    keep = labelled_window(full_labels)
    return Collated(
        input_ids=input_ids, attention_mask=mask, labels=full_labels[:, -keep:],
        pixel_values=pixel_values(loaded, images), logits_to_keep=keep, num_examples=len(sample_ids),
        num_tokens=int(mask.sum()), skipped=skipped, sample_ids=sample_ids,
    )


def _load(path: str, sample_id: str, skipped: list[dict[str, str]]):
    try:
        return load_image(path)
    except ImageLoadError as error:
        skipped.append({"sample_id": sample_id, "reason": str(error)})
        log.warning("skipping %s: %s", sample_id, error)
        return None


def template_prompt_ids(loaded: LoadedModel, prompt: str, template: str, num_images: int = 1) -> list[int]:
    """Token ids of `prompt` in the conversation `template`, each image placeholder expanded to the model's
    image tokens."""
    return encode_prompt(loaded.tokenizer, build_prompt(prompt, template, num_images), loaded.image_token_id,
                         loaded.tokens_per_image)


def row_images(batch: Mapping[str, Sequence[Any]]) -> list[list[str]]:
    """Each row's image paths: the `images` column (multi-image sources) or the one `image`."""
    if "images" in batch:
        return [[str(path) for path in paths] for paths in batch["images"]]
    return [[path] for path in _column(batch, "image")]


def encode_pairs(batch: Mapping[str, Sequence[Any]], loaded: LoadedModel, template: str, max_length: int):
    """(sample_id, images, prompt ids, chosen answer ids, rejected answer ids) per usable row, and the skipped.

    Answers are cut as `encode_example` cuts them (to max_length - prompt), so the plain and the packed
    layout (`pairs.collate_packed`) score exactly the same tokens. A row may have several images (the
    `images` column): the prompt gets one image placeholder per image, and the images follow in order.
    """
    tokenizer = loaded.tokenizer
    kept, skipped = [], []
    for sample_id, paths, prompt, chosen, rejected in zip(
            _column(batch, "sample_id"), row_images(batch), _column(batch, "prompt"),
            _column(batch, "chosen"), _column(batch, "rejected")):
        images = [_load(path, str(sample_id), skipped) for path in paths]
        if any(image is None for image in images):
            continue
        prompt_ids = template_prompt_ids(loaded, prompt, template, len(images))
        room = max_length - len(prompt_ids)
        if room <= 0:
            skipped.append({"sample_id": str(sample_id),
                            "reason": f"prompt of {len(prompt_ids)} tokens does not fit max_length {max_length}"})
            continue
        kept.append((str(sample_id), images, prompt_ids, encode_answer(tokenizer, chosen)[:room],
                     encode_answer(tokenizer, rejected)[:room]))
    return kept, skipped


def collate_preference(batch: Mapping[str, Sequence[Any]], loaded: LoadedModel, template: str = "v1",
                       max_length: int = 2048, padding_side: str = "right") -> Collated | None:
    """Preference rows (PREFERENCE_COLUMNS) -> 2B sequences, chosen first. None if every row was skipped."""
    kept, skipped = encode_pairs(batch, loaded, template, max_length)
    if not kept:
        return None
    ids, labels = [], []
    for answer in (3, 4):  # the chosen rows, then the rejected ones
        for pair in kept:
            prompt_ids, answer_ids = pair[2], pair[answer]
            ids.append(prompt_ids + answer_ids)
            labels.append([IGNORE_INDEX] * len(prompt_ids) + answer_ids)
    images = [image for _, pair_images, *_ in kept for image in pair_images]  # the rows' images, row by row
    return _finish(ids, labels, images + images, loaded, loaded.tokenizer.pad_token_id, padding_side,
                   [sample_id for sample_id, *_ in kept], skipped)


def collate_sft(batch: Mapping[str, Sequence[Any]], loaded: LoadedModel, template: str = "v1",
                max_length: int = 2048, padding_side: str = "right") -> Collated | None:
    """Supervised rows (SFT_COLUMNS) -> B sequences labelled on the response. None if all were skipped."""
    tokenizer = loaded.tokenizer
    ids, labels, images, kept = [], [], [], []
    skipped: list[dict[str, str]] = []
    for sample_id, path, prompt, response in zip(
            _column(batch, "sample_id"), _column(batch, "image"), _column(batch, "prompt"),
            _column(batch, "response")):
        image = _load(path, str(sample_id), skipped)
        if image is None:
            continue
        try:
            row_ids, row_labels = encode_example(tokenizer, template_prompt_ids(loaded, prompt, template), response,
                                                 max_length)
        except ValueError as error:
            skipped.append({"sample_id": str(sample_id), "reason": str(error)})
            continue
        ids.append(row_ids), labels.append(row_labels), images.append(image), kept.append(str(sample_id))
    if not images:
        return None
    return _finish(ids, labels, images, loaded, tokenizer.pad_token_id, padding_side, kept, skipped)
