"""How many tokens one image becomes, per family, as plain arithmetic (no torch): the memory planner
(`orchestrator.plan`) and the loader (`families.max_image_tokens`) count the same way.

- LLaVA-1.5: one tile of `image_size` px cut into `patch_size` px patches, CLS dropped (the ``default``
  feature strategy): (336 / 14)^2 = 576.
- LLaVA-NeXT ("anyres", transformers' ``LlavaNextProcessor._get_number_of_features``): the base tile
  (576) plus the image resized into the best grid resolution of ``image_grid_pinpoints``, whose
  (rows x side) x (cols x side) patch features are cropped back to the image's aspect ratio ("unpadded"),
  plus one ``image_newline`` token per feature row. The most an image can take is an image of exactly a
  pinpoint's shape (nothing is unpadded): for llava-v1.6's pinpoints the 672 x 672 grid,
  576 + 48 x 48 + 48 = 2,928 tokens. (LLaVA-NeXT's blog counts 5 x 576 = 2,880, without the newlines.)
- Qwen2.5-VL: the image is resized to multiples of patch x merge (28 px) with at most ``max_pixels``
  pixels (``smart_resize``), then each 2 x 2 block of 14 px patches becomes one token: at most
  max_pixels / 28^2, e.g. 1280 x 28 x 28 px -> 1280 tokens; Qwen2.5-VL-7B-Instruct's own
  ``max_pixels`` 12,845,056 -> 16,384.
"""

from __future__ import annotations

from typing import Iterable, Sequence

# Qwen2.5-VL-7B-Instruct's preprocessor_config.json ("max_pixels": 12845056 = 16384 x 28 x 28)
QWEN2_5_VL_MAX_PIXELS = 12_845_056
# transformers' Qwen2VLImageProcessor when a folder names no budget (size.longest_edge = 28 x 28 x 1280)
QWEN_PROCESSOR_DEFAULT_MAX_PIXELS = 28 * 28 * 1280


def llava_image_tokens(image_size: int, patch_size: int) -> int:
    """LLaVA-1.5: (size / patch)^2 patch features of one tile, CLS dropped."""
    return (image_size // patch_size) ** 2


def llava_next_max_image_tokens(image_size: int, patch_size: int, pinpoints: Iterable[Sequence[int]]) -> int:
    """LLaVA-NeXT: the most tokens one image takes, over the grid resolutions `pinpoints` ((height, width)
    in px, multiples of `image_size`): base tile + the grid's features + one newline per feature row."""
    side = image_size // patch_size
    counts = []
    for height, width in pinpoints:
        rows, cols = height // image_size, width // image_size
        counts.append(side * side + rows * side * cols * side + rows * side)
    if not counts:
        raise ValueError("LLaVA-NeXT: image_grid_pinpoints is empty")
    return max(counts)


def qwen_max_image_tokens(max_pixels: int, patch_size: int = 14, merge_size: int = 2) -> int:
    """Qwen2.5-VL: the most tokens one image takes with at most `max_pixels` pixels (one token per merged
    `merge_size` x `merge_size` block of `patch_size` px patches)."""
    return max_pixels // (patch_size * merge_size) ** 2
