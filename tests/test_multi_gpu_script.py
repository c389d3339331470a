"""benchmarks/multi_gpu.py runs end to end with --tiny on CPU (a check of the script's logic, not a timing).

The script runs in a subprocess joining the suite's Ray. To stay within ~90 s on 2 cores it runs the model, data,
N-worker DPO and POPE sections; the 1-worker DPO, full fine-tune and kill sections (same code paths,
another ~2 minutes) are skipped here and their skipped status is checked.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.train import ROOT

SCRIPT = ROOT / "benchmarks" / "multi_gpu.py"


@pytest.mark.slow
def test_multi_gpu_script_tiny_runs_and_writes_the_expected_results(ray_session, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "mg"), "--tiny", "--steps", "4",
         "--skip", "dpo1,full,kill", "--ray-address", ray_session.get_runtime_context().gcs_address],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "| section | status | result | seconds |" in proc.stdout  # the final Markdown table

    results = json.loads((tmp_path / "mg" / "results.json").read_text())
    assert results["meta"]["tiny"] is True and results["meta"]["gpus"] == 2
    sections = results["sections"]
    assert set(sections) == {"model", "data", "dpo1", "dpoN", "full", "kill", "pope"}
    for name in ("dpo1", "full", "kill"):
        assert sections[name]["status"] == "skipped" and sections[name]["reason"] == "--skip"

    model = sections["model"]
    assert model["status"] == "ok" and model["shape"] == "tiny"
    assert model["image_token_id"] == 32000 and model["tokenizer_size"] <= model["vocab_size"] == 32064

    data = sections["data"]
    assert data["status"] == "ok" and data["unknown_tokens"] == 0
    assert data["chosen_tokens_mean"] == data["rejected_tokens_mean"] == 16  # --answer-tokens default (tiny)
    assert data["pope_questions"] == data["pope_images"] * 6 * 3

    dpo = sections["dpoN"]
    assert dpo["status"] == "ok" and dpo["workers"] == 2 and dpo["planned_stop"] is True
    assert dpo["steps_done"] == 5 and dpo["timed_steps"] == 4 - dpo["warmup_steps"]
    for key in ("pairs_per_s", "pairs_per_s_per_gpu", "s_per_step", "curves_pairs_per_s_per_gpu", "to_first_step_s"):
        assert dpo[key] > 0, key
    assert set(dpo["memory_per_rank"]) == {"0", "1"}
    assert [row["step"] for row in dpo["curves"]] == [1, 2, 3, 4]

    pope = sections["pope"]
    assert pope["status"] == "ok" and pope["actors_n"] == 2
    for actors in ("actors_1", "actors_2"):
        run = pope[actors]
        assert run["computed"] == pope["questions"] == data["pope_questions"] and run["errors"] == 0
        assert run["qps_wall"] > 0 and run["first_block_s"] > 0
    assert pope["ratio_wall"] > 0
