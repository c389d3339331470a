"""`ray job submit` against a real local head started with `ray start --head`, token authentication on."""

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts.local_cluster import MARKER, down, free_port, short_dir

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture()
def ray_head(tmp_path_factory):
    """A Ray head started the way a user starts one (token auth on, as Ray ships it), stopped afterwards.

    The token lives in a file of the test's temp dir; the client environment points at it.
    """
    with short_dir(tmp_path_factory.mktemp("head")) as directory:
        token = directory / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        port, dashboard, agent, client = free_port(), free_port(), free_port(), free_port()
        env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
                   PATH=f"{BIN}:{os.environ['PATH']}", **{MARKER: str(directory.resolve())})
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "PYTHONPATH"):  # the code goes with the job's working_dir
            env.pop(name, None)
        start = subprocess.run(
            [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
             f"--temp-dir={directory / 'ray'}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             # The agent's default port (52365) is taken by any other Ray on this machine.
             f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
             f"--ray-client-server-port={client}", "--disable-usage-stats"],
            env=env, capture_output=True, text=True, timeout=180)
        try:
            assert start.returncode == 0, start.stdout + start.stderr
            yield f"http://127.0.0.1:{dashboard}", env
        finally:
            down(directory)  # only this head's processes (`ray stop` would stop every Ray on the machine)


@pytest.mark.slow
def test_eval_job_submitted_with_ray_job_submit_writes_its_outputs(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "runs"
    config = tmp_path / "job.yaml"
    config.write_text(
        f"name: job\noutput_root: {out}\n"
        "data:\n  synthetic: {num_images: 8, num_pope_images: 4, milebench_tasks: 0}\n"
        "eval: {batch_size: 8, cpus_per_actor: 0.5}\n")
    command = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
               "--runtime-env", str(ROOT / "jobs/runtime_env.yaml"),
               "--", sys.executable, "jobs/eval.py", "--config", str(config)]
    deadline = time.time() + 120
    while True:  # the head's job agent comes up a few seconds after `ray start` returns
        submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        log = submit.stdout + submit.stderr
        if "No available agent" not in log or time.time() > deadline:
            break
        time.sleep(3)
    assert submit.returncode == 0, log[-4000:]
    assert "succeeded" in log.lower()
    assert "adversarial" in log and "mean F1" in log  # the POPE table printed by the job
    metrics = list(out.glob("job/eval/*/metrics.parquet"))
    assert metrics, f"no metrics parquet under {out}"
    status = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                            capture_output=True, text=True, timeout=60)
    assert "SUCCEEDED" in status.stdout
