"""A relative output_root (the demo's `runs`): every file the run writes lands under it, the stage records
point at files that exist, and the report finds the training curves.

Ray Train runs its workers in another working directory (Ray's session folder), so a path left relative
until a worker resolves it lands there; the config makes every path absolute on the driver.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.ray_session import ray_temp_dir

ROOT = Path(__file__).resolve().parents[2]
TINY = {  # configs/demo.yaml at the smallest sizes that still run every stage
    "data": {"synthetic": {"num_images": 12, "num_pope_images": 4, "image_size": 48, "milebench_tasks": 0}},
    "model": {"tiny": {"text_layers": 1, "vision_layers": 1}},
    "train": {"max_steps": 2, "batch_size_per_worker": 4, "checkpoint_every_steps": 2, "log_every_steps": 1,
              "reference_cache": False, "sft": {"max_steps": 2, "batch_size_per_worker": 4}},
    "scaling": {"cpus_per_worker": 0.5},
    "eval": {"batch_size": 16},
}


def merged(base, extra):
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(base.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def hadpo(cwd, *args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_the_demo_with_a_relative_output_root_writes_everything_under_it(tmp_path):
    config = merged(yaml.safe_load((ROOT / "configs/demo.yaml").read_text()), TINY)
    assert config["output_root"] == "runs"
    config["name"] = "rel"
    (tmp_path / "rel.yaml").write_text(yaml.safe_dump(config))

    ran = hadpo(tmp_path, "run", "rel.yaml")
    assert ran.returncode == 0, ran.stderr[-4000:]
    reported = hadpo(tmp_path, "report", "runs/rel", "--out", "runs/rel/report")
    assert reported.returncode == 0, reported.stderr[-4000:]

    runs = tmp_path / "runs"
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and runs not in p.parents and p.name != "rel.yaml"]
    assert outside == []
    run_dir = runs / "rel"
    for path in ["train/sft_curves.parquet", "train/dpo_curves.parquet", "run_record.json", "report/report.html"]:
        assert (run_dir / path).is_file(), path
    assert list((run_dir / "train" / "rel-dpo").glob("checkpoint_*/adapter/adapter_model.safetensors"))
    assert list((run_dir / "eval").glob("*/answers/*.parquet"))
    for record in (run_dir / "stages").glob("*.json"):
        outputs = json.loads(record.read_text())["outputs"]
        for key in ("model", "adapter", "curves", "answers_dir", "metrics_path"):
            if key in outputs:
                assert Path(outputs[key]).is_absolute() and Path(outputs[key]).exists(), (record.name, key)
                assert runs in Path(outputs[key]).parents
    # nothing the run made went to Ray's session folder (where the workers' working directory is)
    session = ray_temp_dir(runs)
    assert not [p for p in session.rglob("*") if p.suffix == ".parquet" or "checkpoint_" in p.name]

    markdown = (run_dir / "report" / "report.md").read_text()
    assert "2 training curve(s)" in markdown and "not found" not in reported.stdout, reported.stdout
