"""Helpers shared by the training tests (configs built from configs/train_tiny.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from orchestrator.config import ExperimentConfig, apply_override, config_from_dict
from orchestrator.train.checkpoints import MARKER, RAY_RECORD

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


def sample_preference_rows(output_root: Path, world: Path, per_source: int) -> list[dict]:
    """The first `per_source` description and POPE preference rows of the synthetic world."""
    from orchestrator.data import datasets

    rows = datasets.preference_rows(tiny_config(output_root, world))
    return [row for row in rows if row["source"] == "desc"][:per_source] + \
        [row for row in rows if row["source"] == "pope"][:per_source]


def as_batch(rows: list[dict]) -> dict[str, list]:
    """Rows -> the column batch collation takes."""
    return {key: [row[key] for row in rows] for key in rows[0]}


def recorded_checkpoint(run: Path) -> str | None:
    """The newest checkpoint Ray Train has recorded for the run, once it is complete on disk (its marker is
    written): the one a restarted worker group is handed. A folder merely present may be half written."""
    try:
        record = json.loads((Path(run) / RAY_RECORD).read_text())
    except (OSError, ValueError):
        return None
    name = (record.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    return name if name and (Path(run) / name / MARKER).is_file() else None
