"""Preference pairs as model inputs, in two layouts, and their log-probs under a model.

*plain* (`collate_preference`): 2B rows, the B chosen answers first and then the B rejected ones, each
row the whole prompt (image tokens included) plus one answer, each with its own copy of the image.

*packed* (`collate_packed`, `train.prefix_sharing`): ONE row per pair, ``[prompt, chosen, rejected]``,
one image. The chosen and the rejected answer share their prompt (DPO relies on that: same image,
same question), so its ~611 tokens (576 of them the image's) and the vision tower run once per pair
instead of twice. Two things keep every log-prob equal to the plain layout's:

- an attention mask in which the prompt sees itself (causally), the chosen answer sees the prompt and
  itself, and the rejected answer sees the prompt and itself but never the chosen answer;
- position ids that restart after the prompt for the rejected answer (``0..P-1, P..P+C-1, P..P+R-1``),
  so rotary embeddings see the same positions as in the plain rows.

The first token of each answer is scored by the logits at the prompt's last position (shared); every
later answer token by the logits of the answer token before it. `scored_positions` maps each answer
token to the position whose logits score it, so no shifted-label trick is needed.

The mask is built on the device at forward time from a small `segments` tensor (0 padding, 1 prompt,
2 chosen, 3 rejected), in the form the attention implementation wants: boolean for SDPA, additive
float for eager. transformers passes a 4D mask through unchanged.

Packing needs plain 1-D positions (`ModelFamily.one_d_positions`): LLaVA-1.5 and LLaVA-NeXT (its anyres
image features take the place of its image tokens one for one, so positions stay token counts).
Qwen2.5-VL computes 3-D multimodal rotary positions from the whole row (input_ids, image_grid_thw and
the attention mask), which the restarted positions above cannot express: `collate_pairs` gives it the
plain rows, saying so once per loaded model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from orchestrator.images import ImageLoadError, image_size
from orchestrator.model.families import LoadedModel, VisionInputs
from orchestrator.model.templates import IGNORE_INDEX, encode_answer
from orchestrator.train.collate import Collated, collate_preference, encode_pairs, row_image_paths
from orchestrator.train.losses import token_logps

log = logging.getLogger(__name__)

PAD, PROMPT, CHOSEN, REJECTED = 0, 1, 2, 3


@dataclass
class PairLogps:
    """Per-token log-probs of each pair's chosen and rejected answer ([B, L], zero where masked)."""

    chosen: torch.Tensor
    chosen_mask: torch.Tensor
    rejected: torch.Tensor
    rejected_mask: torch.Tensor

    def sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence log-probs (sum over each answer's tokens): ([B], [B]) float32."""
        return self.chosen.sum(-1), self.rejected.sum(-1)

    def token_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """How many tokens each answer has (its scored positions): ([B], [B]) float32; IPO averages over them."""
        return self.chosen_mask.sum(-1).float(), self.rejected_mask.sum(-1).float()


@dataclass
class PackedPairs:
    """Model inputs for B pairs packed as B rows ``[prompt, chosen, rejected]`` (right-padded)."""

    input_ids: torch.Tensor        # [B, T]
    segments: torch.Tensor         # [B, T] PAD / PROMPT / CHOSEN / REJECTED
    position_ids: torch.Tensor     # [B, T]
    vision: VisionInputs           # each pair's images (one for most data), pair by pair
    logits_to_keep: int            # logits are computed for the last K positions only
    chosen_source: torch.Tensor    # [B, Lc] position whose logits score chosen token j
    chosen_target: torch.Tensor    # [B, Lc] chosen token j (IGNORE_INDEX on padding)
    rejected_source: torch.Tensor  # [B, Lr]
    rejected_target: torch.Tensor  # [B, Lr]
    num_examples: int
    num_tokens: int                # non-padding tokens of the B rows
    sample_ids: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    reference: tuple[torch.Tensor, torch.Tensor] | None = None  # cached reference log-probs ([B], [B])

    def model_inputs(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                     attn_implementation: str = "sdpa") -> dict[str, Any]:
        return {
            "input_ids": self.input_ids.to(device), "position_ids": self.position_ids.to(device),
            "attention_mask": attention_mask(self.segments.to(device), attn_implementation, dtype or torch.float32),
            **self.vision.to(device, dtype), "logits_to_keep": self.logits_to_keep,
        }


def attention_mask(segments: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, T] mask: causal, answers see the prompt and themselves only; padding sees itself.

    SDPA takes it as booleans (True = may attend); eager adds it to the scores (0 or the dtype's min).
    """
    length = segments.shape[1]
    query, key = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & (query != PAD) & (key != PAD) & ((key == PROMPT) | (key == query))
    # a padding position attends to itself only, so no row of the softmax is empty (NaN)
    allowed |= torch.eye(length, dtype=torch.bool, device=segments.device) & (query == PAD)
    allowed = allowed[:, None]
    if attn_implementation == "sdpa":
        return allowed
    if attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    raise ValueError(f"train.prefix_sharing needs attn_implementation 'sdpa' or 'eager' (a 4D mask), "
                     f"not {attn_implementation!r}")


def longest_row_tokens(rows: Sequence[Mapping[str, Any]], loaded: LoadedModel, template: str, max_length: int,
                       answer_columns: Sequence[str] = ("chosen", "rejected")) -> int:
    """Tokens of the longest prompt + answer row of `rows` (cut at max_length), as the planner counts a row.

    Each image counts its own tokens (`LoadedModel.image_tokens`, from the image's size: only the headers are
    read, and only for families whose count varies); a row whose image cannot be opened is left out, as
    collation leaves it out."""
    tokenizer = loaded.tokenizer
    prompts: dict[tuple[str, tuple[int, ...]], int] = {}
    longest = 0
    for row in rows:
        prompt = str(row["prompt"])
        paths = row_image_paths(row)
        try:
            tokens = (loaded.tokens_per_image,) * len(paths) if loaded.family.fixed_image_tokens else \
                tuple(loaded.image_tokens([image_size(path) for path in paths]))  # headers only
        except ImageLoadError:
            continue
        if (prompt, tokens) not in prompts:
            prompts[prompt, tokens] = len(loaded.prompt_ids(prompt, template, tokens))
        for column in answer_columns:
            if column in row:
                longest = max(longest, prompts[prompt, tokens] + len(encode_answer(tokenizer, str(row[column]))))
    return min(longest, max_length) if longest else max_length


def collate_packed(batch: Mapping[str, Sequence[Any]], loaded: LoadedModel, template: str = "v1",
                   max_length: int = 2048, pad_to_multiple_of: int = 1) -> PackedPairs | None:
    """Preference rows (PREFERENCE_COLUMNS) -> B packed rows. None if every row was skipped. Only for families
    with 1-D positions (`collate_pairs` chooses the layout)."""
    refusal = packing_refusal(loaded)
    if refusal:
        raise ValueError(f"packed pairs: {refusal}; use the plain rows (collate_pairs picks them)")
    kept, skipped = encode_pairs(batch, loaded, template, max_length)
    if not kept:
        return None
    return pack_pairs([(prompt, chosen, rejected) for _, _, prompt, chosen, rejected in kept],
                      VisionInputs.concat([vision for _, vision, *_ in kept]), loaded.tokenizer.pad_token_id,
                      sample_ids=[sample_id for sample_id, *_ in kept], skipped=skipped,
                      pad_to_multiple_of=pad_to_multiple_of)


def pack_pairs(token_pairs: Sequence[tuple[list[int], list[int], list[int]]], vision: VisionInputs, pad_id: int,
               sample_ids: list[str] | None = None, skipped: list[dict[str, str]] | None = None,
               pad_to_multiple_of: int = 1) -> PackedPairs:
    """(prompt ids, chosen answer ids, rejected answer ids) per pair -> right-padded packed rows.

    `pad_to_multiple_of` rounds the row width up (`train.pad_to_multiple_of`): fewer distinct shapes for the
    GPU kernels to set up (the padding is masked; no log-prob changes).
    """
    longest = max(len(p) + len(c) + len(r) for p, c, r in token_pairs)
    width = -(-longest // max(pad_to_multiple_of, 1)) * max(pad_to_multiple_of, 1)
    count = len(token_pairs)
    input_ids = torch.full((count, width), pad_id, dtype=torch.long)
    segments = torch.full((count, width), PAD, dtype=torch.uint8)
    positions = torch.zeros((count, width), dtype=torch.long)
    longest_c = max(len(c) for _, c, _ in token_pairs)
    longest_r = max(len(r) for _, _, r in token_pairs)
    chosen_source = torch.zeros((count, longest_c), dtype=torch.long)
    chosen_target = torch.full((count, longest_c), IGNORE_INDEX, dtype=torch.long)
    rejected_source = torch.zeros((count, longest_r), dtype=torch.long)
    rejected_target = torch.full((count, longest_r), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, chosen, rejected) in enumerate(token_pairs):
        p, c, r = len(prompt), len(chosen), len(rejected)
        input_ids[row, :p + c + r] = torch.tensor(list(prompt) + list(chosen) + list(rejected))
        segments[row, :p], segments[row, p:p + c], segments[row, p + c:p + c + r] = PROMPT, CHOSEN, REJECTED
        positions[row, :p + c] = torch.arange(p + c)
        positions[row, p + c:p + c + r] = torch.arange(p, p + r)
        # token j of an answer is scored by the logits before it: the prompt's last for j = 0
        chosen_source[row, :c] = torch.arange(p - 1, p + c - 1)
        chosen_target[row, :c] = torch.tensor(list(chosen))
        rejected_source[row, :r] = torch.cat([torch.tensor([p - 1]), torch.arange(p + c, p + c + r - 1)])
        rejected_target[row, :r] = torch.tensor(list(rejected))
    first_scored = min(len(prompt) - 1 for prompt, _, _ in token_pairs)
    return PackedPairs(
        input_ids=input_ids, segments=segments, position_ids=positions, vision=vision,
        logits_to_keep=width - first_scored, chosen_source=chosen_source, chosen_target=chosen_target,
        rejected_source=rejected_source, rejected_target=rejected_target, num_examples=count,
        num_tokens=int((segments != PAD).sum()), sample_ids=list(sample_ids or []), skipped=list(skipped or []),
    )


def collate_pairs(batch: Mapping[str, Sequence[Any]], loaded: LoadedModel, template: str = "v1",
                  max_length: int = 2048, packed: bool = True, pad_to_multiple_of: int = 1
                  ) -> PackedPairs | Collated | None:
    """Preference rows in the packed or the plain layout (`train.prefix_sharing`). A family whose positions are
    not 1-D gets the plain rows (`packing_refusal`), said once per loaded model."""
    if packed:
        refusal = packing_refusal(loaded)
        if refusal and not loaded.extra.get("packing_refusal_logged"):
            loaded.extra["packing_refusal_logged"] = True
            log.info("train.prefix_sharing: plain rows instead of packed pairs: %s", refusal)
        packed = not refusal
    if packed:
        return collate_packed(batch, loaded, template, max_length, pad_to_multiple_of)
    return collate_preference(batch, loaded, template, max_length)


def packing_refusal(loaded: LoadedModel) -> str:
    """'' if this model's pairs can be packed (1-D positions), else why not."""
    if loaded.family.one_d_positions:
        return ""
    return (f"{loaded.family.name} computes its multimodal rotary positions from the whole row, so the rejected "
            "answer's positions cannot restart after a shared prompt")


def _gathered_logps(logits: torch.Tensor, first: int, source: torch.Tensor, target: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) under the logits at `source` positions; logits cover positions first.. ([B, K, V])."""
    mask = target != IGNORE_INDEX
    index = (source - first).clamp(min=0)
    picked = torch.gather(logits, 1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    logps = torch.gather(picked.float().log_softmax(-1), 2, target.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return logps * mask, mask


def pair_token_logps(logits: torch.Tensor, inputs: PackedPairs | Collated) -> PairLogps:
    """Per-token answer log-probs of a forward's logits, for either layout."""
    if isinstance(inputs, PackedPairs):
        device = logits.device
        first = inputs.input_ids.shape[1] - logits.shape[1]  # logits cover the last K positions
        chosen, chosen_mask = _gathered_logps(logits, first, inputs.chosen_source.to(device),
                                              inputs.chosen_target.to(device))
        rejected, rejected_mask = _gathered_logps(logits, first, inputs.rejected_source.to(device),
                                                  inputs.rejected_target.to(device))
        return PairLogps(chosen, chosen_mask, rejected, rejected_mask)
    pairs = inputs.num_examples
    logps, mask = token_logps(logits, inputs.labels.to(logits.device))
    return PairLogps(logps[:pairs], mask[:pairs], logps[pairs:], mask[pairs:])


def score_pairs(model, inputs: PackedPairs | Collated, device: torch.device | str, dtype: torch.dtype | None = None,
                attn_implementation: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the chosen and rejected answers under `model` ([B], [B] float32).

    Runs one forward; the caller chooses grad mode and autocast. `dtype` casts the pixels (the model's
    dtype); `attn_implementation` defaults to the model's own.
    """
    logits = pair_forward(model, inputs, device, dtype, attn_implementation)
    return pair_token_logps(logits, inputs).sums()


def model_inputs_for(inputs: PackedPairs | Collated, device: torch.device | str, dtype: torch.dtype | None,
                     attn_implementation: str) -> dict[str, Any]:
    """Forward keyword arguments for either layout (only packed rows need the attention implementation)."""
    if isinstance(inputs, PackedPairs):
        return inputs.model_inputs(device, dtype, attn_implementation)
    return inputs.model_inputs(device, dtype)


def pair_forward(model, inputs: PackedPairs | Collated, device: torch.device | str, dtype: torch.dtype | None = None,
                 attn_implementation: str | None = None) -> torch.Tensor:
    """The logits (over the scored window) of one forward of `model` on either layout."""
    model_inputs = model_inputs_for(inputs, device, dtype, attn_implementation or _attn_implementation(model))
    return model(**model_inputs, use_cache=False).logits


def _attn_implementation(model) -> str:
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", config)
    return getattr(text, "_attn_implementation", None) or "sdpa"

