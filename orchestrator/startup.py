"""A process's start-up with Python's cyclic garbage collector paused (`collector_paused`).

Importing torch, transformers and a model family's code makes about a million objects that live as long as
the process. Python's collector runs every few hundred new objects, and every so often it walks the whole
grown heap again, finding almost nothing to free: in an evaluation actor the imports took 3.3-3.7 s of CPU
with it and 2.65 s without (one full collection afterwards: 0.3 s). Paused around a bounded start-up (an
evaluation actor's imports and model load, a training worker's set-up), it runs as usual right after. Not
for a driver's whole run: Ray Data's actor pools sit in reference cycles, and their actors are only given
back when the collector finds them.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from typing import Iterator

_lock = threading.Lock()
_paused = {"depth": 0, "was_enabled": False}


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The block runs with the cyclic garbage collector off; nested or concurrent blocks (another thread)
    turn it back on only when the last one ends, and only if it was on before the first."""
    with _lock:
        if _paused["depth"] == 0:
            _paused["was_enabled"] = gc.isenabled()
            gc.disable()
        _paused["depth"] += 1
    try:
        yield
    finally:
        with _lock:
            _paused["depth"] -= 1
            if _paused["depth"] == 0 and _paused["was_enabled"]:
                gc.enable()
