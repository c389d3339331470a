"""Batches of dataset rows -> model inputs (token ids, labels, attention mask, the vision inputs).

A *preference* batch of B pairs becomes 2B sequences, the B chosen answers first and then the B
rejected ones, each with its own copy of the image (CONTEXT.md section 3: "chosen and rejected are
batched together as 2B rows, images duplicated"). Every model family goes through the same steps: a
row's images are processed first (`LoadedModel.vision_inputs`: the vision tensors and how many image
tokens each image expands to, which varies with the image for LLaVA-NeXT and Qwen2.5-VL), then the
prompt is built with the config's train template and tokenized once per pair with those counts
(`LoadedModel.prompt_ids`), and each answer is appended as `encode_example` appends it (labels -100 on
the prompt, the answer's end of sequence labelled). The vision inputs travel as a `VisionInputs`
(pixel_values, plus image_sizes for LLaVA-NeXT or image_grid_thw for Qwen2.5-VL), the rows' images
one after the other.

Padding uses the tokenizer's pad id with label -100 and attention 0. Right padding is the default for
training: Llama's position ids count from the start of the row, so right padding leaves every real
token's position unchanged (left padding would shift them). Both sides are supported. No position ids
are passed: each model computes them from the attention mask (Qwen2.5-VL its 3-D multimodal ones from
input_ids, image_grid_thw and the mask), so a padded row scores as it does alone.

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

from orchestrator.images import ImageLoadError
from orchestrator.model.families import LoadedModel, VisionInputs
from orchestrator.model.templates import IGNORE_INDEX, encode_answer, encode_example

log = logging.getLogger(__name__)


@dataclass
class Collated:
    """Model inputs for one micro-batch (2B rows for DPO, B rows for SFT)."""

    input_ids: torch.Tensor        # [N, T]
    attention_mask: torch.Tensor   # [N, T]
    labels: torch.Tensor           # [N, K]: the last K positions (K = logits_to_keep)
    vision: VisionInputs           # the N rows' images, row by row (pixel_values and the family's extras)
    logits_to_keep: int
    num_examples: int              # pairs (DPO) or examples (SFT) kept
    num_tokens: int                # non-padding tokens of the N rows
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"sample_id", "reason"}
    sample_ids: list[str] = field(default_factory=list)  # of the kept examples, in row order
    reference: tuple[torch.Tensor, torch.Tensor] | None = None  # cached reference log-probs ([B], [B])

    def model_inputs(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
                     ) -> dict[str, Any]:
        """Keyword arguments for the model's forward (without labels); float vision tensors cast to `dtype`."""
        return {
            "input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device),
            **self.vision.to(device, dtype), "logits_to_keep": self.logits_to_keep,
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


def _finish(ids, labels, vision: VisionInputs, pad_id, padding_side, sample_ids, skipped) -> Collated:
    input_ids, full_labels, mask = pad_sequences(ids, labels, pad_id, padding_side)
    keep = labelled_window(full_labels)
    return Collated(
        input_ids=input_ids, attention_mask=mask, labels=full_labels[:, -keep:],
        vision=vision, logits_to_keep=keep, num_examples=len(sample_ids),
        num_tokens=int(mask.sum()), skipped=skipped, sample_ids=sample_ids,
    )


def row_images(batch: Mapping[str, Sequence[Any]]) -> list[list[str]]:
    """Each row's image paths: the `images` column (multi-image sources) or the one `image`."""
    if "images" in batch:
        return [[str(path) for path in paths] for paths in batch["images"]]
    return [[path] for path in _column(batch, "image")]


def row_image_paths(row: Mapping[str, Any]) -> list[str]:
    """One row's image paths (a row as a dict), as `row_images` reads them from a batch."""
    if row.get("images") is not None:
        return [str(path) for path in row["images"]]
    return [str(row["image"])]


def load_row_images(sample_id: str, paths: Sequence[str], loaded: LoadedModel, skipped: list[dict[str, str]]
                    ) -> VisionInputs | None:
    """A row's images as the model's vision inputs (with each image's token count); None, with the row
    added to `skipped`, if one of them cannot be loaded."""
    try:
        return VisionInputs.concat([loaded.image_file_inputs(path) for path in paths])
    except ImageLoadError as error:
        skipped.append({"sample_id": sample_id, "reason": str(error)})
        log.warning("skipping %s: %s", sample_id, error)
        return None


def encode_pairs(batch: Mapping[str, Sequence[Any]], loaded: LoadedModel, template: str, max_length: int):
    """(sample_id, vision inputs, prompt ids, chosen answer ids, rejected answer ids) per usable row, and the
    skipped.

    Answers are cut as `encode_example` cuts them (to max_length - prompt), so the plain and the packed
    layout (`pairs.collate_packed`) score exactly the same tokens. A row may have several images (the
    `images` column): the prompt gets one image placeholder per image, each expanded to that image's token
    count, and the images follow in order.
    """
    tokenizer = loaded.tokenizer
    kept, skipped = [], []
    for sample_id, paths, prompt, chosen, rejected in zip(
            _column(batch, "sample_id"), row_images(batch), _column(batch, "prompt"),
            _column(batch, "chosen"), _column(batch, "rejected")):
        vision = load_row_images(str(sample_id), paths, loaded, skipped)
        if vision is None:
            continue
        prompt_ids = loaded.prompt_ids(prompt, template, vision.tokens)
        room = max_length - len(prompt_ids)
        if room <= 0:
            skipped.append({"sample_id": str(sample_id),
                            "reason": f"prompt of {len(prompt_ids)} tokens does not fit max_length {max_length}"})
            continue
        kept.append((str(sample_id), vision, prompt_ids, encode_answer(tokenizer, chosen)[:room],
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
    rows_vision = [vision for _, vision, *_ in kept]
    return _finish(ids, labels, VisionInputs.concat(rows_vision + rows_vision), loaded.tokenizer.pad_token_id,
                   padding_side, [sample_id for sample_id, *_ in kept], skipped)


def collate_sft(batch: Mapping[str, Sequence[Any]], loaded: LoadedModel, template: str = "v1",
                max_length: int = 2048, padding_side: str = "right") -> Collated | None:
    """Supervised rows (SFT_COLUMNS) -> B sequences labelled on the response. None if all were skipped."""
    tokenizer = loaded.tokenizer
    ids, labels, visions, kept = [], [], [], []
    skipped: list[dict[str, str]] = []
    for sample_id, paths, prompt, response in zip(
            _column(batch, "sample_id"), row_images(batch), _column(batch, "prompt"), _column(batch, "response")):
        vision = load_row_images(str(sample_id), paths, loaded, skipped)
        if vision is None:
            continue
        try:
            row_ids, row_labels = encode_example(tokenizer, loaded.prompt_ids(prompt, template, vision.tokens),
                                                 response, max_length)
        except ValueError as error:
            skipped.append({"sample_id": str(sample_id), "reason": str(error)})
            continue
        ids.append(row_ids), labels.append(row_labels), visions.append(vision), kept.append(str(sample_id))
    if not kept:
        return None
    return _finish(ids, labels, VisionInputs.concat(visions), tokenizer.pad_token_id, padding_side, kept, skipped)
