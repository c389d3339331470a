"""A model batch that fails is retried item by item; an item that still fails becomes an error row.

Shared by every pass that runs a model over many items and must finish whatever one item does: the
evaluation's answers (`eval.predictor`: items, or whole images with their questions under prefix reuse)
and the reference log-prob cache (`train.reference_cache`: preference rows). One bad item (an image the
processor cannot take, a prompt over the positions) or a batch too large for the GPU then costs only
that item, and the message names what failed.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence, TypeVar

Item = TypeVar("Item")

log = logging.getLogger("hadpo")


def model_failure(error: BaseException) -> str:
    """The error-row text of an item the model failed on: ``model failed: <Type>: <message>``."""
    return f"model failed: {type(error).__name__}: {error}"


def run_batch_retrying_items(items: Sequence[Item], run: Callable[[list[Item]], None],
                             record_error: Callable[[Item, str], None], *, batch: str = "batch",
                             unit: str = "item", logger: logging.Logger = log) -> None:
    """`run(items)`; if it raises, `run([item])` for each item alone, and `record_error(item, text)` for
    each item that still raises (`model_failure`'s text). A batch of one is not run twice.

    `batch` and `unit` word the warning logged when a batch of several fails ("reference batch of 8 rows
    failed (...); retrying row by row"). Exceptions are caught as the passes need (`Exception`, not
    `BaseException`: an interrupt still stops the run).
    """
    items = list(items)
    if not items:
        return
    try:
        run(items)
        return
    except Exception as error:  # a bad item or an out-of-memory batch must not stop the pass
        if len(items) == 1:
            record_error(items[0], model_failure(error))
            return
        logger.warning("%s of %d %ss failed (%s); retrying %s by %s", batch, len(items), unit, error, unit, unit)
    for item in items:
        try:
            run([item])
        except Exception as error:
            record_error(item, model_failure(error))
