"""POPE score mode with the image prefix computed once per image and its KV cache reused.

A POPE prompt is ``{system} USER: <image>\\n{question} ASSISTANT:``. Everything up to and including
the last image token (BOS, system prompt, ``USER:``, the 576 image tokens of LLaVA-1.5) is the same
for every question on an image: about 611 of ~630 tokens. `PrefixScorer` therefore

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
4. reads the "Yes"/"No" logits at each suffix's last token: p(yes) = softmax over the two, as the
   plain path does.

Identical (image, question) pairs, e.g. POPE's yes-questions, which the three splits share, are
computed once. A small LRU keeps the prefix KV of the last images of a call (``cache_images``), so
an image whose questions are split across two Ray Data blocks still reuses its prefix.

Only public transformers APIs are used (`DynamicCache.update`, ``past_key_values``,
``use_cache``, ``position_ids``, a 4-D ``attention_mask``), so it runs with transformers 5.17 and 5.23.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch


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


@dataclass
class _Unit:
    """One image (and prefix) with its distinct question suffixes."""

    key: tuple                                   # (image key, prefix ids)
    image: Any
    prefix: tuple[int, ...]
    suffixes: dict[tuple[int, ...], int] = field(default_factory=dict)   # suffix ids -> index
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None            # per layer, [1, H, L, D]
    p_yes: list[float] = field(default_factory=list)


class PrefixScorer:
    """p(yes) for POPE questions, the image prefix computed once per image (see the module doc).

    `model` is a `LlavaModel` (``orchestrator.eval.milebench``): it provides ``prompt_ids``,
    ``yes_no_ids``, ``loaded`` (processor, image token id), ``model`` (a llava-hf
    `LlavaForConditionalGeneration`), ``pad_id`` and ``device``.
    """

    def __init__(self, model, cache_images: int = 4):
        self.adapter = model
        self.net = model.model
        self.body = getattr(self.net, "model", None)           # LlavaModel: vision + projector + LM
        self.head = self.net.get_output_embeddings()           # lm_head
        self.image_token_id = int(model.loaded.image_token_id)
        self.cache_images = max(int(cache_images), 0)
        self._lru: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._splits: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # POPE repeats its questions
        self.stats: Counter = Counter()

    @staticmethod
    def supports(model) -> bool:
        """Whether `model` is a llava-hf adapter this scorer can drive (else: the plain path)."""
        net = getattr(model, "model", None)
        return (all(hasattr(model, name) for name in ("prompt_ids", "yes_no_ids", "loaded", "pad_id"))
                and net is not None and getattr(net, "model", None) is not None
                and hasattr(net, "get_output_embeddings") and net.get_output_embeddings() is not None)

    # -- prompts --------------------------------------------------------------------------------
    def split(self, question: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(prefix ids, suffix ids) of a one-image prompt, cut right after its last image token."""
        found = self._splits.get(question)
        if found is not None:
            return found
        ids = list(self.adapter.prompt_ids(question, 1))
        last = max((k for k, token in enumerate(ids) if token == self.image_token_id), default=-1)
        if last < 0 or last == len(ids) - 1:
            raise ValueError("the prompt has no text after its image")
        if len(self._splits) >= 100_000:
            self._splits.clear()
        found = self._splits[question] = (tuple(ids[: last + 1]), tuple(ids[last + 1:]))
        return found

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    # -- scoring --------------------------------------------------------------------------------
    def score(self, groups: Sequence[tuple[str, Any, Sequence[str]]]) -> list[list[float]]:
        """p(yes) per question for groups (image key, image, questions on that image).

        An image is a PIL image, or its pixel tensor [3, H, W] already preprocessed by `pixel_values`
        (the predictor's decode stage makes them off the GPU actor's critical path).

        The prefixes of all images not in the LRU are computed in one batch, then every suffix in
        one more; the caller decides how many images go together (GPU memory grows with it).
        """
        units: dict[tuple, _Unit] = {}
        where: list[list[tuple[_Unit, int]]] = []
        for image_key, image, questions in groups:
            placed = []
            for question in questions:
                prefix, suffix = self.split(question)
                key = (image_key, prefix)
                unit = units.get(key)
                if unit is None:
                    unit = units[key] = _Unit(key=key, image=image, prefix=prefix)
                index = unit.suffixes.setdefault(suffix, len(unit.suffixes))
                placed.append((unit, index))
            where.append(placed)
        todo = list(units.values())
        self.stats["questions"] += sum(len(placed) for placed in where)
        # same-length prefixes go together (no padding anywhere); in practice there is one length
        by_length: dict[int, list[_Unit]] = {}
        for unit in todo:
            by_length.setdefault(len(unit.prefix), []).append(unit)
        with torch.inference_mode():
            for part in by_length.values():
                cache = self._prefixes(part)
                self._remember(part)
                self._suffixes(part, cache)
                for unit in part:
                    unit.kv = None
        return [[unit.p_yes[index] for unit, index in placed] for placed in where]

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
        pixels = self._pixel_batch([unit.image for unit in missing]).to(device, self.dtype)
        out = self.body(input_ids=input_ids.contiguous(), pixel_values=pixels, use_cache=True)
        tensors = cache_tensors(out.past_key_values)
        for row, unit in enumerate(missing):
            unit.kv = [(keys[row:row + 1], values[row:row + 1]) for keys, values in tensors]
        self.stats["prefix_computed"] += len(missing)
        self.stats["prefix_tokens"] += len(missing) * length
        return out.past_key_values if len(missing) == len(units) else None

    def _pixel_batch(self, images: list) -> torch.Tensor:
        """The vision tower's input for `images`: PIL images are preprocessed here (in one call), tensors
        ([3, H, W], made upstream by the same `pixel_values`, see `predictor.add_pixels`) used as they are."""
        from orchestrator.model.llava import pixel_values

        raw = [image for image in images if not isinstance(image, torch.Tensor)]
        made = iter(pixel_values(self.adapter.loaded, raw)) if raw else iter(())
        self.stats["pixels_given"] += len(images) - len(raw)
        return torch.stack([image if isinstance(image, torch.Tensor) else next(made) for image in images])

    def _suffixes(self, units: list[_Unit], cache=None) -> None:
        """One forward of every unit's packed suffixes against its cached prefix; p(yes) per suffix."""
        device = self.adapter.device
        dtype = self.dtype
        yes, no = self.adapter.yes_no_ids()
        length = len(units[0].prefix)
        packed = [[token for suffix in unit.suffixes for token in suffix] for unit in units]
        width = max(len(row) for row in packed)
        n = len(units)
        input_ids = torch.full((n, width), int(self.adapter.pad_id), dtype=torch.long)
        position_ids = torch.full((n, width), length, dtype=torch.long)
        # allowed[b, q, k]: query q of row b may see key k (k < length: the prefix)
        allowed = torch.zeros((n, width, length + width), dtype=torch.bool)
        allowed[:, :, :length] = True
        rows, cols = [], []
        for b, unit in enumerate(units):
            start = 0
            input_ids[b, :len(packed[b])] = torch.tensor(packed[b], dtype=torch.long)
            for suffix in unit.suffixes:
                end = start + len(suffix)
                position_ids[b, start:end] = torch.arange(length, length + len(suffix))
                block = torch.ones((len(suffix), len(suffix)), dtype=torch.bool).tril()
                allowed[b, start:end, length + start:length + end] = block
                rows.append(b)
                cols.append(end - 1)
                start = end
        mask = torch.zeros(allowed.shape, dtype=dtype)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        if cache is None:  # some prefixes came from the LRU: one cache row per unit, stacked
            cache = build_cache([(torch.cat([unit.kv[layer][0] for unit in units]),
                                  torch.cat([unit.kv[layer][1] for unit in units]))
                                 for layer in range(len(units[0].kv))])
        out = self.body(input_ids=input_ids.to(device), attention_mask=mask[:, None].to(device),
                        position_ids=position_ids.to(device), past_key_values=cache, use_cache=True)
        del cache
        hidden = out.last_hidden_state[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        logits = self.head(hidden)[:, [yes, no]].float()
        p_yes = torch.softmax(logits, dim=-1)[:, 0].tolist()
        k = 0
        for unit in units:
            unit.p_yes = p_yes[k:k + len(unit.suffixes)]
            k += len(unit.suffixes)
        self.stats["suffixes"] += len(p_yes)
        self.stats["suffix_tokens"] += sum(len(row) for row in packed)
        self.stats["forwards"] += 1

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


__all__ = ["PrefixScorer", "cache_tensors", "build_cache"]
