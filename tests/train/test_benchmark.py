"""benchmarks/dpo_step.py runs end to end at the tiny shape on CPU (a smoke test, not a timing)."""

import importlib.util
import json

from tests.train import ROOT


def test_dpo_step_benchmark_runs_tiny_on_cpu_and_both_loops_score_the_same(tmp_path):
    spec = importlib.util.spec_from_file_location("dpo_step", ROOT / "benchmarks" / "dpo_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--pairs", "1", "--answer-tokens", "8", "--warmup", "0", "--steps", "1",
                       "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["ours"]["pairs_per_s"] > 0 and results["baseline"]["pairs_per_s"] > 0
    assert results["logp_max_abs_diff"] < 1e-3  # the logits window changes no log-prob
    assert results["sequence_tokens"] == 35 + 16 + 20 + 8
