"""The model a stage starts from: a llava-hf folder the caller or the config names, else the run's tiny LLaVA.

Training, evaluation and sweeps all start from `base_model_path`, so an adapter trained on the tiny model
is evaluated on the very same folder (``<run_dir>/model/tiny``, built once with the synthetic world's
vocabulary).
"""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator import layout
from orchestrator.config import ExperimentConfig
from orchestrator.data.synthetic import world_vocabulary
from orchestrator.model.tiny import ensure_model, tiny_family


def base_model_path(cfg: ExperimentConfig, base_model: str | None = None, texts: list[str] | None = None) -> Path:
    """The model a stage starts from: `base_model`, else `model.path`, else the tiny model.

    The tiny model is built once under ``<run_dir>/model/tiny`` with the synthetic world's vocabulary
    (or `texts` for other data).
    """
    if base_model:
        path = Path(base_model).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"base model {path}: not a Hugging Face model folder (no config.json)")
        return path
    cache = layout.tiny_model_dir(cfg.run_dir, tiny_family(cfg.model))
    if cfg.model.path or (cache / "config.json").is_file():
        return ensure_model(cfg.model, None, cache, seed=cfg.data.synthetic.seed)
    return ensure_model(cfg.model, texts if texts is not None else world_texts(cfg), cache,
                        seed=cfg.data.synthetic.seed)


def world_texts(cfg: ExperimentConfig) -> list[str]:
    """The synthetic world's vocabulary as one text: from its ``world.json``, else as the generator makes it."""
    world_json = cfg.world_dir / "world.json"
    if world_json.is_file():
        vocabulary = json.loads(world_json.read_text()).get("vocabulary")
        if vocabulary:
            return [" ".join(vocabulary)]
    return [" ".join(world_vocabulary())]
