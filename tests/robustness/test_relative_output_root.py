"""A relative output_root (the demo's `runs`): every file the run writes lands under it, the stage records
point at files that exist, and the report finds the training curves.

Ray Train runs its workers in another working directory (a folder in Ray's session folder), and Ray's actors
in the one Ray itself was started in (here the test suite's, not the run's), so a path left relative until a
worker or actor resolves it lands there; the config makes every path absolute on the driver.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.slow
def test_the_demo_with_a_relative_output_root_writes_everything_under_it(demo_run):
    # the run of the demo at its smallest shared with test_console and test_pipeline (conftest.demo_run)
    assert demo_run.config["output_root"] == "runs"
    runs = demo_run.folder / "runs"
    outside = [p for p in demo_run.files if runs not in p.parents and p.name != "demo.yaml"]
    assert outside == []
    run_dir = demo_run.run_dir
    made = {p.relative_to(run_dir) for p in demo_run.files if run_dir in p.parents}
    for path in ["train/sft_curves.parquet", "train/dpo_curves.parquet", "run_record.json", "report/report.html"]:
        assert Path(path) in made, path
    name = demo_run.config["name"]
    assert any(p.match(f"train/{name}-dpo/checkpoint_*/adapter/adapter_model.safetensors") for p in made)
    assert any(p.match("eval/*/answers/*.parquet") for p in made)
    for stage, outputs in demo_run.stages.items():
        for key in ("model", "adapter", "curves", "answers_dir", "metrics_path"):
            if key in outputs:
                assert Path(outputs[key]).is_absolute() and Path(outputs[key]) in demo_run.paths, (stage, key)
                assert runs in Path(outputs[key]).parents
    # nothing the run made went to Ray's session folder (where the workers' working directory is)
    assert demo_run.ray_session_products == frozenset()

    markdown = demo_run.report_markdown
    assert "2 training curve(s)" in markdown and "not found" not in demo_run.report.stdout, demo_run.report.stdout
