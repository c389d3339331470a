"""The decode stage before the evaluation actors (POPE with prefix reuse, LLaVA-1.5).

`predictor.predict` puts `add_pixels` before the `Predictor` actors as Ray Data tasks on the CPUs the
actors leave free: each block's POPE images are decoded and preprocessed for the vision tower there, so
the GPU does not wait on image decoding. The actor takes the pixels back out of the rows
(`take_pixels`, `pixel_tensor`); they come from the same `pixel_values` as in the actor, so the answers
are the same with or without this stage.
"""

from __future__ import annotations

import functools
import io
import logging

import numpy as np
import pyarrow as pa

from orchestrator.images import load_image
from orchestrator.startup import collector_paused

log = logging.getLogger(__name__)

# Added by `add_pixels` on the first row of each POPE image of a block: the image's vision-tower input
# (float32 [3, H, W] as `np.save` bytes); null on the other rows and where the image did not open.
PIXELS_COLUMN = "pixels"
DECODE_TASK_CPUS = 0.25  # logical CPUs of one `add_pixels` task (see `predictor.predict`)


@functools.lru_cache(maxsize=4)
def _pixel_source(model_path: str):
    """What `pixel_values` reads of a model (its image processor, the CLIP mean for padding), as
    `load_model` loads them; once per worker process. None if the folder has no processor."""
    from types import SimpleNamespace

    from orchestrator.model.llava import load_processor

    try:
        processor = load_processor(model_path)
        return SimpleNamespace(image_processor=processor.image_processor,
                               image_mean=tuple(processor.image_processor.image_mean))
    except Exception as error:  # a plug-in model without a llava-hf folder: the actors decode themselves
        log.warning("no image processor in %s (%s): images are decoded in the actors", model_path, error)
        return None


def add_pixels(batch: pa.Table, model_path: str) -> pa.Table:
    """`batch` (ITEM_SCHEMA rows) with PIXELS_COLUMN: each POPE image of the block decoded and
    preprocessed for the vision tower once, on its first row.

    The Ray Data stage `predictor.predict` puts before the actors with prefix reuse: it runs on CPU tasks while
    the GPU answers earlier blocks. An image that does not open gets null, and the actor then tries
    it itself and reports the error as it always does.
    """
    with collector_paused():  # a worker's first block imports transformers' image processing (orchestrator/startup)
        from orchestrator.model.llava import pixel_values

        source = _pixel_source(model_path)
    first_row: dict[str, int] = {}
    if source is not None:
        benchmarks, images = batch.column("benchmark").to_pylist(), batch.column("images").to_pylist()
        for row, (benchmark, paths) in enumerate(zip(benchmarks, images)):
            if benchmark == "pope" and len(paths) == 1:
                first_row.setdefault(paths[0], row)
    opened = {}
    for path in first_row:
        try:
            opened[path] = load_image(path)
        except Exception:  # reported by the actor, with the same message as without this stage
            continue
    values: list[bytes | None] = [None] * batch.num_rows
    if opened:
        for path, array in zip(opened, pixel_values(source, list(opened.values())).numpy()):
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            values[first_row[path]] = buffer.getvalue()
    return batch.append_column(PIXELS_COLUMN, pa.array(values, type=pa.binary()))


def take_pixels(rows: list[dict]) -> dict[str, bytes]:
    """Image path -> pixel bytes that `add_pixels` made (taken out of the rows; none without that stage)."""
    given = {}
    for row in rows:
        data = row.pop(PIXELS_COLUMN, None)
        if isinstance(data, bytes) and row["images"]:
            given[row["images"][0]] = data
    return given


def pixel_tensor(data: bytes):
    import torch

    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
