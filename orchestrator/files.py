"""File writing every layer shares: whole files or nothing (a reader never sees half a file)."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(temp)` on a temporary file beside `path`, then move it over `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()
    return path


def write_json_atomic(path: str | Path, data: dict, sort_keys: bool = True) -> Path:
    """`data` as indented JSON; `sort_keys=False` keeps a record in the order it was built."""
    text = json.dumps(data, indent=2, sort_keys=sort_keys, default=str)
    return atomic_write(path, lambda temp: temp.write_text(text))


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
