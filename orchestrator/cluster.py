"""The Ray cluster launcher's config (`cluster.yaml`): the node types the autoscaler may launch, and the same
node types on Ray's local autoscaler.

- `worker_node_types(config)`: the node types of a launcher config the autoscaler may ever add (not the
  head, none whose `max_workers` is 0). The resource check (`orchestrator.resources`) reads them from the
  running autoscaler's config to tell work worth waiting for from work no node will ever hold.
- `local_autoscaling_config(cluster, ...)`: the config Ray's fake multi-node provider runs on one machine
  (``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...``): the launcher config's worker node
  types under the same names, with their `max_workers`, `idle_timeout_minutes` and `upscaling_speed`,
  `min_workers: 0`, and resources scaled down to this machine. GPUs become a custom resource
  (`GPU_STAND_IN`), because a node that advertised GPUs it does not have would hand Ray Train workers
  a CUDA device that does not exist; a run rehearsed on it asks for the stand-in through
  `scaling.resources_per_worker` / `eval.resources_per_actor` where the real run sets `use_gpu`.

Both are pure functions of dicts (the YAML as loaded), so they are tested without a cluster.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

# The custom resource that stands in for GPUs on the local autoscaling cluster.
GPU_STAND_IN = "gpu_stand_in"
# Ray's fake provider tags its head node with this type name, whatever the config calls it
# (ray/autoscaler/_private/fake_multi_node/node_provider.py, FAKE_HEAD_NODE_TYPE); the head's type must
# carry it, or the autoscaler ignores the head's resources.
FAKE_HEAD_NODE_TYPE = "ray.head.default"
# Keys the autoscaler reads without filling defaults (Ray's fake_multi_node/example.yaml, which the
# installed wheel lacks).
_EMPTY_LAUNCHER_KEYS: dict[str, Any] = {
    "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
    "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [],
}


def load_cluster_yaml(path: str | Path) -> dict[str, Any]:
    """A cluster launcher config as a dict; a missing file or one without node types is a clear error."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: cluster config not found") from None
    if not isinstance(config, dict) or not isinstance(config.get("available_node_types"), dict):
        raise ValueError(f"{path}: not a Ray cluster launcher config (no available_node_types mapping)")
    if config.get("head_node_type") not in config["available_node_types"]:
        raise ValueError(f"{path}: head_node_type {config.get('head_node_type')!r} is not one of "
                         f"available_node_types {sorted(config['available_node_types'])}")
    return config


def worker_node_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The node types the autoscaler may launch: all but the head, and none whose max_workers is 0.

    A type without its own `max_workers` may have up to the config's global `max_workers`, as Ray fills it in;
    a global `max_workers: 0` allows no worker node at all.
    """
    global_max = int(config.get("max_workers", 0) or 0)
    if "max_workers" in config and global_max == 0:
        return {}
    types = {}
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == config.get("head_node_type"):
            continue
        if int(spec.get("max_workers", global_max) or 0) > 0:
            types[name] = spec
    return types


def local_autoscaling_config(cluster: dict[str, Any], *, gcs_address: str, head_cpus: float = 1,
                             worker_cpus: float = 1, gpus_per_node: int = 1,
                             object_store_bytes: int = 100 * 1024**2,
                             idle_timeout_minutes: float | None = None) -> dict[str, Any]:
    """`cluster` (a `ray up` config) as a config for Ray's fake multi-node provider on this machine.

    Worker node types keep their names, `max_workers` (per type and overall), `upscaling_speed` and, unless
    `idle_timeout_minutes` is given, `idle_timeout_minutes`; each starts at `min_workers: 0`. Their
    resources: `worker_cpus` CPUs, ``min(GPU, gpus_per_node)`` of `GPU_STAND_IN` for a type with GPUs,
    custom resources kept, and a small object store. The head, named `FAKE_HEAD_NODE_TYPE` as the fake
    provider requires, gets `head_cpus` CPUs and no stand-in (the launcher config's head has no GPU, so
    no training worker or GPU actor runs there). `gcs_address` ("ip:port") is where the fake nodes find
    the head (the provider's default is port 6379, which another Ray on the machine may hold).
    """
    if gpus_per_node < 1:
        raise ValueError(f"gpus_per_node must be at least 1, got {gpus_per_node}")
    workers = {}
    for name, spec in worker_node_types(cluster).items():
        original = {key: float(value) for key, value in (spec.get("resources") or {}).items()}
        resources: dict[str, Any] = {key: value for key, value in original.items()
                                     if key not in ("CPU", "GPU", "memory", "object_store_memory")}
        resources["CPU"] = worker_cpus
        if original.get("GPU", 0) > 0:
            resources[GPU_STAND_IN] = min(math.ceil(original["GPU"]), gpus_per_node)
        resources["object_store_memory"] = object_store_bytes
        workers[name] = {"resources": resources, "node_config": {}, "min_workers": 0,
                         "max_workers": int(spec.get("max_workers", cluster.get("max_workers", 0)))}
    if FAKE_HEAD_NODE_TYPE in workers:
        raise ValueError(f"a worker node type may not be called {FAKE_HEAD_NODE_TYPE!r} (the fake provider's head)")
    return {
        **_EMPTY_LAUNCHER_KEYS,
        "cluster_name": f"{cluster.get('cluster_name', 'cluster')}-local",
        "max_workers": int(cluster.get("max_workers", sum(spec["max_workers"] for spec in workers.values()))),
        "upscaling_speed": float(cluster.get("upscaling_speed", 1.0)),
        "idle_timeout_minutes": float(idle_timeout_minutes if idle_timeout_minutes is not None
                                      else cluster.get("idle_timeout_minutes", 5)),
        # launch_multiple: the provider starts as many nodes as the autoscaler asks for at once (by default it
        # starts one per request, while the autoscaler's event says "Adding N node(s)").
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "launch_multiple": True, "gcs_address": gcs_address},
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        "available_node_types": {
            FAKE_HEAD_NODE_TYPE: {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            **workers,
        },
    }
