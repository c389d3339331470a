"""benchmarks/dpo_step.py runs end to end at the tiny shape on CPU (a smoke test, not a timing)."""

import importlib.util
import json

from tests.train import ROOT


def test_dpo_step_benchmark_runs_tiny_on_cpu_and_every_loop_scores_the_same(tmp_path):
    spec = importlib.util.spec_from_file_location("dpo_step", ROOT / "benchmarks" / "dpo_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--pairs", "1", "--answer-tokens", "8", "--warmup", "0", "--steps", "1",
                       "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    for loop in ("plain", "packed", "packed+cache", "ref pass", "baseline"):
        assert results[loop]["pairs_per_s"] > 0, loop
    diffs = results["logp_max_abs_diff"]
    # neither the logits window nor packing changes a log-prob (fp32: relative error ~1e-7)
    assert diffs["windowed"] < 1e-6 * diffs["logp_magnitude"] + 1e-4
    assert diffs["packed"] < 1e-6 * diffs["logp_magnitude"] + 1e-4
    assert results["sequence_tokens"] == 35 + 16 + 20 + 8
    assert results["packed_tokens"] == 35 + 16 + 20 + 2 * 8
