"""Run by test_multinode.py in its own process: a 2-node simulated cluster (ray.cluster_utils.Cluster)
running a 2-worker DPO training and a 2-actor POPE evaluation, then printing where each actor ran."""

import json
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from orchestrator.config import config_from_dict
from orchestrator.eval.runner import run_eval
from orchestrator.train.trainer import run_training

out = Path(sys.argv[1])
# Cluster records the head's address in Ray's default temp dir (/tmp/ray) even when the head has its own
# temp_dir, and fails if that folder does not exist yet (a fresh machine where Ray never ran).
from ray._common.utils import get_default_ray_temp_dir  # noqa: E402

Path(get_default_ray_temp_dir()).mkdir(parents=True, exist_ok=True)
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "temp_dir": sys.argv[2]})
cluster.add_node(num_cpus=2)
# RAY_ADDRESS: every worker of the run finds this cluster by it, not as the machine's "latest cluster", which may
# be another user's (Ray Train's placement-group cleaner asks that one whether the run's controller lives)
ray.init(address=cluster.address, runtime_env={"env_vars": {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
                                                            "RAY_ADDRESS": cluster.address}})
cluster.wait_for_nodes()
# What is checked is where the workers and actors run, so the evaluation is the least that starts them all: two
# POPE images, 36 questions (both actors start before any block runs, below; 12 images took twice as long).
config = config_from_dict({
    "name": "multinode", "output_root": str(out),
    "data": {"synthetic": {"num_images": 8, "num_pope_images": 2, "milebench_tasks": 0}},
    "model": {"tiny": {"text_layers": 1, "vision_layers": 1}},
    "train": {"max_steps": 2, "batch_size_per_worker": 2, "learning_rate": 1e-3, "checkpoint_every_steps": 2,
              "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}, "deepspeed": {"enabled": False},
              "gradient_checkpointing": False, "max_length": 256, "log_every_steps": 1},
    # 1.5 CPUs per worker/actor on 2-CPU nodes: two cannot share a node, so they spread (0.5 is left
    # on each node for Ray Data tasks).
    "scaling": {"num_workers": 2, "cpus_per_worker": 1.5},
    "eval": {"num_actors": 2, "cpus_per_actor": 1.5, "batch_size": 4},
})
trained = run_training(config, stage="dpo")
# Start the whole actor pool before any block runs (by default actors start asynchronously, and a
# small evaluation can finish on the first actor before the second is placed).
ray.data.DataContext.get_current().wait_for_min_actors_s = 120
run_eval(config, adapter=trained.checkpoint_path, benchmarks=("pope",))
from ray.util.state import list_actors

placement = {}
for actor in list_actors(address=cluster.address, limit=1000, detail=True):  # this cluster, not another Ray on the machine
    if actor.node_id:  # actors that never got placed have none
        placement.setdefault(actor.class_name, set()).add(actor.node_id)
print("PLACEMENT " + json.dumps({name: sorted(nodes) for name, nodes in placement.items()}))
print("NODES " + json.dumps(sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])))
ray.shutdown()
cluster.shutdown()
