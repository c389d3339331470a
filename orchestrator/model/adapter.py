"""Where a LoRA adapter lives: the folder with ``adapter_config.json`` (peft's layout).

Training writes one into each Ray Train checkpoint (``<checkpoint>/adapter/``, `train.checkpoints.stage_output_dir`);
evaluation, export and conversion all find it with `find_adapter`, so a checkpoint folder or the adapter
folder itself can be named on the command line.
"""

from __future__ import annotations

from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"


def find_adapter(path: str | Path) -> Path:
    """The folder holding ``adapter_config.json``: `path` itself or one directly below it."""
    path = Path(path).expanduser()
    if (path / ADAPTER_CONFIG).is_file():
        return path
    if path.is_dir():
        found = sorted(p.parent for p in path.glob(f"*/{ADAPTER_CONFIG}"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"{path}: several LoRA adapters below it ({[str(p) for p in found]}); name one")
    raise FileNotFoundError(f"{path}: no LoRA adapter ({ADAPTER_CONFIG}) there or one level below")
