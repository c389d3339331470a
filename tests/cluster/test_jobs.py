"""`ray job submit` of the evaluation entrypoint to a real local head started with `ray start --head`, token
authentication on: the package's cluster (conftest), whose head takes the job's driver and actor itself."""

import sys
from pathlib import Path

import pytest

from scripts.local_cluster import autoscaler_events

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_eval_job_submitted_with_ray_job_submit_writes_its_outputs(cluster, tmp_path):
    out = tmp_path / "runs"
    config = tmp_path / "job.yaml"
    config.write_text(
        f"name: job\noutput_root: {out}\n"
        "data:\n  synthetic: {num_images: 8, num_pope_images: 4, milebench_tasks: 0}\n"
        "eval: {batch_size: 8, cpus_per_actor: 0.5}\n")
    launched_before = _launches(cluster)
    submit = cluster.submit("--submission-id", "hadpo-eval", "--working-dir", str(ROOT),
                            "--runtime-env", str(ROOT / "jobs/runtime_env.yaml"),
                            "--", sys.executable, "jobs/eval.py", "--config", str(config))
    log = submit.stdout + submit.stderr
    assert submit.returncode == 0, log[-4000:]
    assert "succeeded" in log.lower()
    assert "adversarial" in log and "mean F1" in log  # the POPE table printed by the job
    metrics = list(out.glob("job/eval/*/metrics.parquet"))
    assert metrics, f"no metrics parquet under {out}"
    assert cluster.job_status("hadpo-eval") == "SUCCEEDED"
    status = cluster.ray("job", "list")
    assert "hadpo-eval" in status.stdout and "SUCCEEDED" in status.stdout
    assert _launches(cluster) == launched_before  # the job's driver, actor and tasks fit on the head


def _launches(cluster) -> list[str]:
    return [message for message in autoscaler_events(cluster) if message.startswith("Adding")]
