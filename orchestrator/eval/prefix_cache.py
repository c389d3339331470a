"""POPE with the image prefix computed once per image and its KV cache reused: score AND greedy generate.

A POPE prompt is ``{system} USER: <image>\\n{question} ASSISTANT:``. Everything up to and including
the last image token (BOS, system prompt, ``USER:``, the 576 image tokens of LLaVA-1.5) is the same
for every question on an image: about 611 of ~630 tokens. `PrefixReuse` therefore

1. splits each prompt's token ids right after the last image token: the full prompt is tokenized
   once, as the plain path does, and cut there, so ``prefix + suffix == full prompt ids`` holds by
   construction for any tokenizer (our word-level one, LLaMA's SentencePiece: the image token is a
   special token, so nothing before it depends on the question);
2. runs the vision tower and the language model on the prefixes of several images in one batch
   (``use_cache=True``, no padding: the prefixes have the same length), keeping the KV cache;
3. answers all questions of those images in ONE more forward pass against the cached prefixes:
   row k of the batch is image k's cache, and its query is the image's distinct question suffixes
   (question + `` ASSISTANT:``) packed one after another (right-padded across rows). A 4-D additive
   attention mask lets each suffix token see the whole prefix and the earlier tokens of its own
   suffix only, and position ids restart at the prefix length for each suffix, so every suffix is
   computed exactly as at the end of its full prompt. No KV is copied per question (the cache is
   not repeated along the batch: questions share their image's row);
4. **score** (`score`): reads the "Yes"/"No" logits at each suffix's last token: p(yes) = softmax
   over the two, as the plain path does;
5. **greedy generate** (`generate`): the argmax at each suffix's last token is its first new token;
   then every decode step feeds, in each image's row, one token per question (the row's keys grow
   by its number of question slots per step). The mask lets a new token see the prefix, its own
   suffix and its own earlier new tokens only, at position ``prefix + len(own suffix) + t``, so
   each question decodes exactly as alone with its full prompt, while the image's prefix KV is
   stored once and read once per step for all its questions. A question stops at its own EOS (the
   tokenizer's, as `VisionLanguageModel.forward`) or at ``max_new_tokens``; finished questions are ignored
   (their slots keep computing until their whole row is done: a row whose questions have all
   finished is dropped from the batch and its cache); the loop ends when all are done. Everything
   stays on the device; the only host sync per step is the stop check. ``min_new_tokens`` forbids
   EOS before that many new tokens, as transformers' `MinNewTokensLengthLogitsProcessor` (with
   ``min_new_tokens == max_new_tokens`` every question gets exactly that many: throughput runs
   with random weights).

LLaVA-1.5 and LLaVA-NeXT (1-D positions). A LLaVA-NeXT image expands to its own number of tokens (anyres
tiles), so its prefix is the question-independent text with that image's count of image tokens, and its vision
inputs (tiles and ``image_sizes``) come from `LoadedModel.vision_inputs`; prefixes of one length go in one batch.
Qwen2.5-VL takes the predictor's plain batched path (`prefix_reuse_blocker` says why: its multimodal rotary
positions).

Identical (image, question) pairs, e.g. POPE's yes-questions, which the three splits share, are
computed once. A small LRU keeps the prefix KV of the last images of a call (``cache_images``), so
an image whose questions are split across two Ray Data blocks still reuses its prefix.

Only public transformers APIs are used (`DynamicCache.update` / ``batch_select_indices``,
``past_key_values``, ``use_cache``, ``position_ids``, a 4-D ``attention_mask``), with SDPA or eager
attention, so it runs with transformers 5.17 and 5.23. Memory of a generate batch: the prefixes,
plus ``rows x question slots x steps`` generated keys (a row of 12 distinct questions decoding 16
tokens adds 192 keys to its ~611); the caller bounds it with the number of images per call.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from orchestrator.model.llava import pixel_values


def prefix_reuse_blocker(family: str) -> str:
    """Why a model family cannot reuse the image prefix: its positions are not 1-D
    (`ModelFamily.one_d_positions`: Qwen2.5-VL). "" when it can: LLaVA-1.5, LLaVA-NeXT, or an unknown
    plug-in, whose actor then asks `PrefixReuse.supports`."""
    from orchestrator.model.families import FAMILIES

    known = FAMILIES.get(family)
    if known is None or known.one_d_positions:
        return ""
    return (f"{known.name} computes its multimodal rotary positions from the whole row (image_grid_thw), "
            "so a cached prefix cannot be continued with 1-D position ids")


def cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values), each [batch, kv_heads, seq, head_dim], of a transformers KV cache."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    if hasattr(cache, "key_cache"):  # older DynamicCache
        return list(zip(cache.key_cache, cache.value_cache))
    return [(item[0], item[1]) for item in cache]  # legacy tuple of tuples


def build_cache(tensors: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """A `DynamicCache` holding these per-layer keys and values (filled through its public `update`)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (keys, values) in enumerate(tensors):
        cache.update(keys, values, layer)
    return cache


def _base_model(net):
    """The llava-hf model under a peft wrapper (its LoRA layers are in place in it), else `net` itself."""
    return net.get_base_model() if hasattr(net, "get_base_model") else net


@dataclass
class _Unit:
    """One image (and prefix) with its distinct question suffixes."""

    key: tuple                                   # (image key, prefix ids)
    image: Any                                   # LLaVA-1.5: PIL image or pixel tensor; else VisionInputs
    prefix: tuple[int, ...]
    suffixes: dict[tuple[int, ...], int] = field(default_factory=dict)   # suffix ids -> index
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None            # per layer, [1, H, L, D]
    p_yes: list[float] = field(default_factory=list)
    new_tokens: list[list[int]] = field(default_factory=list)            # per suffix, EOS included


@dataclass
class SuffixLayout:
    """Where each suffix of each row sits in the packed suffix pass, and the masks that keep them apart.

    Rows are units (images), slots are a row's suffixes (``slots`` = the most any row has). All
    tensors are on the CPU; `allowed` and `decode_allowed` are boolean ("query may see key").
    """

    input_ids: torch.Tensor        # [rows, width] packed suffixes, right-padded
    position_ids: torch.Tensor     # [rows, width] prefix length + offset within the own suffix
    allowed: torch.Tensor          # [rows, width, prefix + width] the suffix pass's mask
    lengths: torch.Tensor          # [rows, slots] suffix lengths (0: no suffix in that slot)
    last: torch.Tensor             # [rows, slots] column of each suffix's last token (0 for empty slots)

    @property
    def valid(self) -> torch.Tensor:
        return self.lengths > 0

    def decode_allowed(self, prefix: int, steps: int, pad_to: int = 16) -> torch.Tensor:
        """[rows, slots, keys] mask of all decode steps: slot j of a row sees the prefix, its own
        suffix, and its own new token of every step so far (keys of step s at prefix + width + slots * s + j).

        The key axis is padded to a multiple of `pad_to` (step k uses ``[..., :prefix + width + slots * k]``,
        a view whose strides stay aligned, so SDPA's memory-efficient kernel takes it without a copy).
        """
        rows, slots = self.lengths.shape
        width = self.input_ids.shape[1]
        keys = prefix + width + slots * steps
        keys += -keys % pad_to
        allowed = torch.zeros((rows, slots, keys), dtype=torch.bool)
        allowed[:, :, :prefix] = True
        columns = torch.arange(width)
        start = self.last - self.lengths + 1
        allowed[:, :, prefix:prefix + width] = ((columns >= start[..., None]) & (columns <= self.last[..., None])
                                                & self.valid[..., None])
        own = torch.eye(slots, dtype=torch.bool).repeat(1, steps)           # [slots, slots * steps]
        allowed[:, :, prefix + width:prefix + width + slots * steps] = own
        return allowed


def suffix_layout(suffixes: Sequence[Sequence[Sequence[int]]], prefix: int, pad_id: int) -> SuffixLayout:
    """The packed layout of each row's suffixes after a prefix of `prefix` tokens (see `SuffixLayout`)."""
    rows = len(suffixes)
    slots = max(len(row) for row in suffixes)
    width = max(sum(len(suffix) for suffix in row) for row in suffixes)
    input_ids = torch.full((rows, width), int(pad_id), dtype=torch.long)
    position_ids = torch.full((rows, width), prefix, dtype=torch.long)
    allowed = torch.zeros((rows, width, prefix + width), dtype=torch.bool)
    allowed[:, :, :prefix] = True
    lengths = torch.zeros((rows, slots), dtype=torch.long)
    last = torch.zeros((rows, slots), dtype=torch.long)
    for b, row in enumerate(suffixes):
        start = 0
        for j, suffix in enumerate(row):
            if not suffix:
                raise ValueError("an empty question suffix")
            end = start + len(suffix)
            input_ids[b, start:end] = torch.tensor(list(suffix), dtype=torch.long)
            position_ids[b, start:end] = torch.arange(prefix, prefix + len(suffix))
            allowed[b, start:end, prefix + start:prefix + end] = torch.ones((len(suffix), len(suffix)),
                                                                            dtype=torch.bool).tril()
            lengths[b, j], last[b, j] = len(suffix), end - 1
            start = end
    return SuffixLayout(input_ids, position_ids, allowed, lengths, last)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean "may see" mask [rows, queries, keys] as the additive [rows, 1, queries, keys] mask
    transformers passes to eager and SDPA attention (0 where allowed, the dtype's minimum elsewhere)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


class PrefixReuse:
    """POPE answers with the image prefix computed once per image (see the module doc): p(yes) by
    `score`, greedy answers by `generate`.

    `model` is a `VisionLanguageModel` (``orchestrator.eval.model_adapter``): it provides ``prompt_ids``,
    ``loaded`` (processor, image token id, family), ``model`` (a llava-hf `LlavaForConditionalGeneration` or
    `LlavaNextForConditionalGeneration`, LoRA merged or a peft wrapper around one), ``pad_id``, ``device``,
    and for scoring ``yes_no_ids``, for generating ``tokenizer`` (its EOS).
    """

    def __init__(self, model, cache_images: int = 4):
        self.adapter = model
        self.net = model.model
        base = _base_model(self.net)
        self.body = getattr(base, "model", None)               # LlavaModel: vision + projector + LM
        self.head = base.get_output_embeddings()               # lm_head
        self.image_token_id = int(model.loaded.image_token_id)
        # LLaVA-1.5: every image is one tile of `tokens_per_image` tokens; other families: counted per image
        self.fixed_image_tokens = getattr(getattr(model.loaded, "family", None), "fixed_image_tokens", True)
        self.cache_images = max(int(cache_images), 0)
        self._lru: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._splits: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # POPE repeats its questions
        self.stats: Counter = Counter()

    @staticmethod
    def supports(model, mode: str = "score") -> bool:
        """Whether `model` is a LLaVA-1.5 / LLaVA-NeXT adapter this class can drive in `mode` (else: the plain
        path)."""
        family = getattr(getattr(model, "loaded", None), "family", None)
        if family is not None and prefix_reuse_blocker(family.name):
            return False
        net = _base_model(getattr(model, "model", None))
        needed = ("prompt_ids", "loaded", "pad_id", "tokens_per_image") + (
            ("yes_no_ids",) if mode == "score" else ("tokenizer",))
        return (all(hasattr(model, name) for name in needed)
                and net is not None and getattr(net, "model", None) is not None
                and hasattr(net, "get_output_embeddings") and net.get_output_embeddings() is not None)

    # -- prompts --------------------------------------------------------------------------------
    def split(self, question: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(prefix ids, suffix ids) of a one-image prompt, cut right after its last image token (the image
        counted at ``tokens_per_image``: `image_prefix` gives another image's count)."""
        found = self._splits.get(question)
        if found is not None:
            return found
        ids = list(self.adapter.prompt_ids(question, [self.adapter.tokens_per_image]))
        last = max((k for k, token in enumerate(ids) if token == self.image_token_id), default=-1)
        if last < 0 or last == len(ids) - 1:
            raise ValueError("the prompt has no text after its image")
        if len(self._splits) >= 100_000:
            self._splits.clear()
        found = self._splits[question] = (tuple(ids[: last + 1]), tuple(ids[last + 1:]))
        return found

    def image_prefix(self, prefix: tuple[int, ...], image_tokens: int) -> tuple[int, ...]:
        """`prefix` (from `split`) with its image expanded to `image_tokens` tokens instead of ``tokens_per_image``."""
        counted = int(self.adapter.tokens_per_image)
        if image_tokens == counted:
            return prefix
        return prefix[:len(prefix) - counted] + (self.image_token_id,) * int(image_tokens)

    def _vision(self, image):
        """(image tokens, what `_prefixes` feeds the vision tower) of one image: LLaVA-1.5's PIL image or
        pixel tensor as it is; another family's image through `LoadedModel.vision_inputs` (once per call)."""
        from orchestrator.model.families import VisionInputs

        if self.fixed_image_tokens:
            return int(self.adapter.tokens_per_image), image
        vision = image if isinstance(image, VisionInputs) else self.adapter.loaded.vision_inputs([image])
        return vision.tokens[0], vision

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    # -- the two ways of answering --------------------------------------------------------------
    def score(self, groups: Sequence[tuple[str, Any, Sequence[str]]]) -> list[list[float]]:
        """p(yes) per question for groups (image key, image, questions on that image).

        An image is a PIL image, or for LLaVA-1.5 its pixel tensor [3, H, W] already preprocessed by
        `pixel_values` (the predictor's decode stage makes them off the GPU actor's critical path), or for the
        other families its `VisionInputs`.

        The prefixes of all images not in the LRU are computed in one batch, then every suffix in
        one more; the caller decides how many images go together (GPU memory grows with it).
        """
        where = self._run(groups, self._suffixes)
        return [[unit.p_yes[index] for unit, index in placed] for placed in where]

    def generate(self, groups: Sequence[tuple[str, Any, Sequence[str]]], max_new_tokens: int,
                 min_new_tokens: int = 0, eos_token_id: int | None = None) -> list[list[list[int]]]:
        """Greedy new token ids per question (EOS included when reached) for groups as in `score`.

        `eos_token_id` defaults to the tokenizer's. The images of one call decode together, as one
        batch (see the module doc).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        eos = self.adapter.tokenizer.eos_token_id if eos_token_id is None else eos_token_id

        def decode(units, cache):
            self._decode(units, cache, int(max_new_tokens), int(min_new_tokens), None if eos is None else int(eos))

        where = self._run(groups, decode)
        return [[list(unit.new_tokens[index]) for unit, index in placed] for placed in where]

    def _run(self, groups, answer) -> list[list[tuple[_Unit, int]]]:
        """Group questions into units (image + prefix, distinct suffixes), compute the prefixes of each
        same-length part in one batch and `answer(units, cache)` them; where each question landed."""
        units: dict[tuple, _Unit] = {}
        where: list[list[tuple[_Unit, int]]] = []
        for image_key, image, questions in groups:
            placed = []
            image_tokens, image = self._vision(image)
            for question in questions:
                prefix, suffix = self.split(question)
                prefix = self.image_prefix(prefix, image_tokens)
                key = (image_key, prefix)
                unit = units.get(key)
                if unit is None:
                    unit = units[key] = _Unit(key=key, image=image, prefix=prefix)
                index = unit.suffixes.setdefault(suffix, len(unit.suffixes))
                placed.append((unit, index))
            where.append(placed)
        self.stats["questions"] += sum(len(placed) for placed in where)
        # same-length prefixes go together (no padding anywhere); in practice there is one length
        by_length: dict[int, list[_Unit]] = {}
        for unit in units.values():
            by_length.setdefault(len(unit.prefix), []).append(unit)
        with torch.inference_mode():
            for part in by_length.values():
                cache = self._prefixes(part)
                self._remember(part)
                if cache is None:  # some prefixes came from the LRU: one cache row per unit, stacked
                    cache = build_cache([(torch.cat([unit.kv[layer][0] for unit in part]),
                                          torch.cat([unit.kv[layer][1] for unit in part]))
                                         for layer in range(len(part[0].kv))])
                for unit in part:
                    unit.kv = None
                answer(part, cache)
                del cache
        return where

    # -- prefixes -------------------------------------------------------------------------------
    def _prefixes(self, units: list[_Unit]):
        """Fill each unit's prefix KV: from the LRU, or from one batched forward of the missing images.

        Returns the forward's own KV cache when it holds exactly `units`, in order (the common case:
        the suffix pass then continues it without a copy), else None.
        """
        missing = []
        for unit in units:
            cached = self._lru.get(unit.key)
            if cached is not None:
                self._lru.move_to_end(unit.key)
                unit.kv = cached
                self.stats["prefix_reused"] += 1
            else:
                missing.append(unit)
        if not missing:
            return None
        device = self.adapter.device
        length = len(missing[0].prefix)
        input_ids = torch.tensor(missing[0].prefix, dtype=torch.long, device=device).expand(len(missing), length)
        if any(unit.prefix != missing[0].prefix for unit in missing):
            input_ids = torch.tensor([unit.prefix for unit in missing], dtype=torch.long, device=device)
        if self.fixed_image_tokens:
            vision = {"pixel_values": self._pixel_batch([unit.image for unit in missing]).to(device, self.dtype)}
        else:
            from orchestrator.model.families import VisionInputs

            vision = VisionInputs.concat([unit.image for unit in missing]).to(device, self.dtype)
        out = self.body(input_ids=input_ids.contiguous(), use_cache=True, **vision)
        tensors = cache_tensors(out.past_key_values)
        for row, unit in enumerate(missing):
            unit.kv = [(keys[row:row + 1], values[row:row + 1]) for keys, values in tensors]
        self.stats["prefix_computed"] += len(missing)
        self.stats["prefix_tokens"] += len(missing) * length
        return out.past_key_values if len(missing) == len(units) else None

    def _pixel_batch(self, images: list) -> torch.Tensor:
        """The vision tower's input for `images`: PIL images are preprocessed here (in one call), tensors
        ([3, H, W], made upstream by the same `pixel_values`, see `pixels.add_pixels`) used as they are."""
        raw = [image for image in images if not isinstance(image, torch.Tensor)]
        made = iter(pixel_values(self.adapter.loaded, raw)) if raw else iter(())
        self.stats["pixels_given"] += len(images) - len(raw)
        return torch.stack([image if isinstance(image, torch.Tensor) else next(made) for image in images])

    # -- suffixes -------------------------------------------------------------------------------
    def _suffix_pass(self, units: list[_Unit], cache) -> tuple[SuffixLayout, torch.Tensor]:
        """One forward of every unit's packed suffixes against its cached prefix (the cache grows by
        the packed width); the layout and the last hidden state at each suffix's last token [rows, slots, hidden]."""
        device = self.adapter.device
        prefix = len(units[0].prefix)
        layout = suffix_layout([list(unit.suffixes) for unit in units], prefix, self.adapter.pad_id)
        out = self.body(input_ids=layout.input_ids.to(device),
                        attention_mask=additive_mask(layout.allowed.to(device), self.dtype),
                        position_ids=layout.position_ids.to(device), past_key_values=cache, use_cache=True)
        rows = torch.arange(len(units), device=device)[:, None]
        hidden = out.last_hidden_state[rows, layout.last.to(device)]
        self.stats["suffixes"] += int(layout.valid.sum())
        self.stats["suffix_tokens"] += int(layout.lengths.sum())
        self.stats["forwards"] += 1
        return layout, hidden

    def _suffixes(self, units: list[_Unit], cache) -> None:
        """p(yes) per suffix: softmax over the "Yes"/"No" logits at its last token."""
        yes, no = self.adapter.yes_no_ids()
        layout, hidden = self._suffix_pass(units, cache)
        logits = self.head(hidden[layout.valid.to(hidden.device)])[:, [yes, no]].float()
        p_yes = torch.softmax(logits, dim=-1)[:, 0].tolist()
        k = 0
        for unit in units:
            unit.p_yes = p_yes[k:k + len(unit.suffixes)]
            k += len(unit.suffixes)

    def _decode(self, units: list[_Unit], cache, max_new_tokens: int, min_new_tokens: int, eos: int | None) -> None:
        """Greedy decoding of every suffix of `units` (see the module doc, step 5); fills `unit.new_tokens`."""
        device = self.adapter.device
        prefix = len(units[0].prefix)
        pad = int(self.adapter.pad_id)
        layout, hidden = self._suffix_pass(units, cache)
        rows, slots = layout.lengths.shape
        width = layout.input_ids.shape[1]
        steps = max_new_tokens - 1                    # forwards after the suffix pass
        mask = additive_mask(layout.decode_allowed(prefix, steps).to(device), self.dtype) if steps else None
        positions = (prefix + layout.lengths).to(device)          # of each slot's first new token
        finished = ~layout.valid.to(device)                       # empty slots count as finished
        tokens = self._next_tokens(hidden, 0, min_new_tokens, eos)
        new = torch.full((rows, slots, max_new_tokens), pad, dtype=torch.long, device=device)
        new[:, :, 0] = tokens.masked_fill(finished, pad)
        if eos is not None:
            finished |= tokens == eos
        row_ids = torch.arange(rows, device=device)               # rows still in the batch -> their unit
        for step in range(1, max_new_tokens):
            alive = (~finished).any(dim=1).cpu()                  # the one host sync of the step
            if not alive.any():
                break
            if not alive.all():                                   # drop finished rows from the batch and cache
                keep = alive.nonzero().squeeze(1).to(device)
                cache.batch_select_indices(keep)
                row_ids, tokens, finished, positions, mask = (row_ids[keep], tokens[keep], finished[keep],
                                                              positions[keep], mask[keep])
            keys = prefix + width + slots * step
            out = self.body(input_ids=tokens, attention_mask=mask[..., :keys], position_ids=positions + step - 1,
                            past_key_values=cache, use_cache=True)
            tokens = self._next_tokens(out.last_hidden_state, step, min_new_tokens, eos)
            new[row_ids, :, step] = tokens.masked_fill(finished, pad)
            if eos is not None:
                finished |= tokens == eos
            self.stats["decode_steps"] += 1
            self.stats["decode_slots"] += int(row_ids.numel()) * slots
        # to the host once: each suffix's tokens up to its EOS (included) or max_new_tokens
        values = new.tolist()
        for b, unit in enumerate(units):
            unit.new_tokens = []
            for j in range(len(unit.suffixes)):
                answer = values[b][j]
                if eos is not None and eos in answer:
                    answer = answer[:answer.index(eos) + 1]
                unit.new_tokens.append(answer)
                self.stats["new_tokens"] += len(answer)

    def _next_tokens(self, hidden: torch.Tensor, generated: int, min_new_tokens: int, eos: int | None) -> torch.Tensor:
        """Greedy next tokens [rows, slots] from the hidden states at the slots; EOS barred before
        `min_new_tokens` new tokens (`generated` = new tokens so far)."""
        logits = self.head(hidden)
        if eos is not None and generated < min_new_tokens:
            logits[..., eos] = torch.finfo(logits.dtype).min
        return logits.argmax(dim=-1)

    def _remember(self, units: list[_Unit]) -> None:
        """Keep the prefix KV of the last `cache_images` images (copied, so a batch's tensors are freed)."""
        if not self.cache_images:
            return
        for unit in units[-self.cache_images:]:
            if unit.key not in self._lru:
                self._lru[unit.key] = [(keys.clone(), values.clone()) for keys, values in unit.kv]
            self._lru.move_to_end(unit.key)
        while len(self._lru) > self.cache_images:
            self._lru.popitem(last=False)

    def clear(self) -> None:
        self._lru.clear()


__all__ = ["PrefixReuse", "prefix_reuse_blocker", "SuffixLayout", "suffix_layout", "additive_mask", "cache_tensors",
           "build_cache"]
