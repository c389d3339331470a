"""Multi-node behaviour by simulation: two Ray nodes on this machine (ray.cluster_utils.Cluster)."""

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.local_cluster import MARKER, down, short_dir

SCRIPT = Path(__file__).with_name("multinode_script.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_training_workers_and_eval_actors_spread_over_two_nodes(tmp_path, tmp_path_factory):
    # Its own process: the suite's shared Ray session cannot also be a simulated cluster. Token
    # authentication on, as Ray ships it, with a token of this test's own.
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    with short_dir(tmp_path_factory.mktemp("mn")) as directory:
        env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
                   **{MARKER: str(directory.resolve())})
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
            env.pop(name, None)
        try:
            run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), str(directory / "ray")], env=env,
                                 cwd=ROOT, capture_output=True, text=True, timeout=900)
        finally:
            down(directory)  # whatever the script left running
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-5000:]
    placement = json.loads(next(l for l in run.stdout.splitlines() if l.startswith("PLACEMENT "))[10:])
    nodes = json.loads(next(l for l in run.stdout.splitlines() if l.startswith("NODES "))[6:])
    assert len(nodes) == 2
    train_workers = [set(n) for name, n in placement.items() if "RayTrainWorker" in name]
    assert train_workers and set().union(*train_workers) == set(nodes), placement
    eval_actors = [set(n) for name, n in placement.items() if "MapWorker" in name or "Predictor" in name]
    assert eval_actors and set().union(*eval_actors) == set(nodes), placement
