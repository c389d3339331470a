"""Helpers shared by the training tests (configs built from configs/train_tiny.yaml)."""

from __future__ import annotations

from pathlib import Path

import yaml

from orchestrator.config import ExperimentConfig, apply_override, config_from_dict

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "configs" / "train_tiny.yaml"


def tiny_config(output_root: Path, world: Path, *overrides: str) -> ExperimentConfig:
    """configs/train_tiny.yaml pointed at a test's output folder and the shared synthetic world."""
    raw = yaml.safe_load(TINY_YAML.read_text())
    raw["output_root"] = str(output_root)
    raw.setdefault("data", {})["synthetic_dir"] = str(world)
    for override in overrides:
        apply_override(raw, override)
    return config_from_dict(raw, str(TINY_YAML))
