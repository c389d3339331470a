"""Multi-node behaviour by simulation: two Ray nodes on this machine (ray.cluster_utils.Cluster)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("multinode_script.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_training_workers_and_eval_actors_spread_over_two_nodes(tmp_path):
    # Its own process: the suite's shared Ray session cannot also be a simulated cluster.
    temp_dir = Path("/tmp") / f"hadpo-mn-{os.getpid()}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), str(temp_dir)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-5000:]
    placement = json.loads(next(l for l in run.stdout.splitlines() if l.startswith("PLACEMENT "))[10:])
    nodes = json.loads(next(l for l in run.stdout.splitlines() if l.startswith("NODES "))[6:])
    assert len(nodes) == 2
    train_workers = [set(n) for name, n in placement.items() if "RayTrainWorker" in name]
    assert train_workers and set().union(*train_workers) == set(nodes), placement
    eval_actors = [set(n) for name, n in placement.items() if "MapWorker" in name or "Predictor" in name]
    assert eval_actors and set().union(*eval_actors) == set(nodes), placement
