"""benchmarks/pope_throughput.py: its fast random-weight build, and --tiny end to end on CPU (a smoke test, not a timing)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "pope_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("pope_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_random_weights_are_filled_in_place_and_the_buffers_computed_as_usual(bench, tiny_model_dir):
    from orchestrator.model.families import load_model

    model = bench.random_model(tiny_model_dir, "cpu")
    reference = load_model(tiny_model_dir).model
    assert not any(p.is_meta for p in model.parameters()) and {p.dtype for p in model.parameters()} == {torch.float32}
    ours, theirs = (dict(m.named_buffers(remove_duplicate=False)) for m in (model, reference))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)  # rotary, positions
    assert model.state_dict().keys() == reference.state_dict().keys()
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            assert (param == 0).all(), name
        elif "norm" in name:
            assert (param == 1).all(), name
        elif param.numel() >= 4096:
            assert 0.018 < param.std().item() < 0.022, name
    again = bench.random_model(tiny_model_dir, "cpu")           # seeded: the same weights in every process
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    ids = torch.tensor([[1] + [model.config.image_token_index] * 9 + [5, 6]])
    logits = model(input_ids=ids, pixel_values=torch.randn(1, 3, 48, 48)).logits
    assert torch.isfinite(logits).all() and logits.std() > 0


@pytest.mark.slow
def test_tiny_run_answers_every_question_and_breaks_the_seconds_down(ray_session, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "pope.json"
    modes = ["prefix", "generate", "prefix-generate", "generate-hadpo", "prefix-generate-hadpo", "milebench",
             "milebench-single"]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--modes", *modes, "--hadpo-new-tokens", "6",
                           "--workdir", str(tmp_path / "work"), "--json", str(out),
                           "--ray-address", ray_session.get_runtime_context().gcs_address],  # the suite's Ray
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "ours: Ray Data, score, prefix reuse" in proc.stdout and "prefix reuse, end to end (s):" in proc.stdout
    results = json.loads(out.read_text())
    prefix = results["results"]["prefix"]
    assert prefix["questions_timed"] == 4 * 6 * 3 and prefix["errors"] == 0 and prefix["seconds_all_measured"]
    phases = prefix["phases"]
    steps = ("actor_start_s", "imports_s", "model_s", "wait_first_block_s", "first_block_s", "to_driver_s", "steady_s")
    assert all(phases[step] >= 0 for step in steps)
    assert sum(phases[step] for step in steps) == pytest.approx(phases["total_s"])
    assert prefix["seconds_all"] == pytest.approx(phases["total_s"]) and results["ray_init_s"] > 0
    assert {"modeling_import_s", "weights_s", "processor_s"} <= set(phases["model_steps"])
    assert phases["prefix_stats"]["pixels_given"] == phases["prefix_stats"]["prefix_computed"] == 4

    # generate with prefix reuse under both protocols: all questions, the decode stage made the pixels,
    # HA-DPO's answers forced to 6 new tokens each distinct question, LLaVA's short answers at most 3
    for mode, most in (("prefix-generate", 3), ("prefix-generate-hadpo", 6)):
        row = results["results"][mode]
        assert row["questions_timed"] == 72 and row["errors"] == 0 and row["seconds_all_measured"]
        stats = row["phases"]["prefix_stats"]
        assert stats["pixels_given"] == stats["prefix_computed"] == 4 and stats["questions"] == 72
        assert stats["new_tokens"] <= most * stats["suffixes"]
    hadpo = results["results"]["prefix-generate-hadpo"]["phases"]["prefix_stats"]
    assert hadpo["new_tokens"] == 6 * hadpo["suffixes"] and hadpo["suffixes"] < 72   # shared questions once
    # fp32 on the CPU: the prefix-reused answers are the plain batched ones, word for word
    agreement = results["agreement"]
    for pair in ("prefix-generate vs generate", "prefix-generate-hadpo vs generate-hadpo"):
        assert agreement[pair] == {"n": 72, "identical_text": 1.0, "identical_yes_no": 1.0}
    assert agreement["prefix vs prefix-generate"]["n"] == 72 and "prefix vs generate-hadpo" in agreement
    assert "agreement prefix-generate vs generate: 100.00 % identical answers" in proc.stdout
    mile = results["results"]["milebench"]
    assert mile["questions_timed"] == 2 * 4 and mile["errors"] == 0
    # MileBench's way, one sample per generate (the "before"): the same items, each its own model batch
    single = results["results"]["milebench-single"]
    assert single["questions_timed"] == 2 * 4 and single["errors"] == 0 and "MileBench's way" in proc.stdout
