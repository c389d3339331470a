"""orchestrator/cluster.py: the node types the autoscaler may launch, and cluster.yaml's node types for Ray's
local autoscaler (pure functions of the YAML)."""

from pathlib import Path

import pytest
import yaml

from orchestrator.cluster import (FAKE_HEAD_NODE_TYPE, GPU_STAND_IN, load_cluster_yaml, local_autoscaling_config,
                                  worker_node_types)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return load_cluster_yaml(ROOT / "cluster.yaml")


def test_the_autoscaler_may_launch_every_type_but_the_head_and_those_capped_at_zero(cluster):
    assert list(worker_node_types(cluster)) == ["gpu.a100x8"]   # the head (max_workers 0) is never launched
    config = {"max_workers": 3, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 4}, "max_workers": 0},
        "auto": {"node_config": {"InstanceType": "g5.xlarge"}},          # up to the global max_workers
        "off": {"resources": {"CPU": 64}, "max_workers": 0},
    }}
    assert list(worker_node_types(config)) == ["auto"]
    assert worker_node_types({**config, "max_workers": 0}) == {}           # no worker node at all
    assert worker_node_types({"head_node_type": "head"}) == {}             # no node types


def test_local_config_keeps_names_limits_and_timeout_with_resources_scaled_down(cluster):
    local = local_autoscaling_config(cluster, gcs_address="10.0.0.1:6380")
    types = local["available_node_types"]
    assert set(types) == {FAKE_HEAD_NODE_TYPE, "gpu.a100x8"}
    assert local["head_node_type"] == FAKE_HEAD_NODE_TYPE
    worker = types["gpu.a100x8"]
    assert worker["min_workers"] == 0 and worker["max_workers"] == cluster["available_node_types"]["gpu.a100x8"]["max_workers"]
    assert worker["resources"] == {"CPU": 1, GPU_STAND_IN: 1, "object_store_memory": 100 * 1024**2}
    assert types[FAKE_HEAD_NODE_TYPE]["resources"] == {"CPU": 1}  # no stand-in: nothing GPU-bound runs there
    assert local["max_workers"] == cluster["max_workers"]
    assert local["idle_timeout_minutes"] == cluster["idle_timeout_minutes"]
    assert local["upscaling_speed"] == cluster["upscaling_speed"]
    assert local["provider"]["type"] == "fake_multinode" and local["provider"]["gcs_address"] == "10.0.0.1:6380"
    # nothing of the cloud: no commands to run, no files to sync, no SSH
    assert local["setup_commands"] == [] and local["file_mounts"] == {} and local["auth"] == {}


def test_local_config_options_override_the_timeout_and_cap_the_stand_ins(cluster):
    local = local_autoscaling_config(cluster, gcs_address="h:1", idle_timeout_minutes=0.5, gpus_per_node=4,
                                     worker_cpus=2)
    assert local["idle_timeout_minutes"] == 0.5
    assert local["available_node_types"]["gpu.a100x8"]["resources"][GPU_STAND_IN] == 4
    assert local["available_node_types"]["gpu.a100x8"]["resources"]["CPU"] == 2
    with pytest.raises(ValueError, match="gpus_per_node must be at least 1"):
        local_autoscaling_config(cluster, gcs_address="h:1", gpus_per_node=0)


def test_ray_accepts_the_local_config_and_names_the_head_as_its_fake_provider_does(cluster):
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE as rays
    from ray.autoscaler._private.util import validate_config

    assert FAKE_HEAD_NODE_TYPE == rays
    validate_config(local_autoscaling_config(cluster, gcs_address="h:1"))  # what the autoscaler runs on start


def test_unusable_cluster_files_say_why(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml: cluster config not found"):
        load_cluster_yaml(tmp_path / "nope.yaml")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"cluster_name": "x"}))
    with pytest.raises(ValueError, match="c.yaml: not a Ray cluster launcher config"):
        load_cluster_yaml(path)
    path.write_text(yaml.safe_dump({"available_node_types": {"a": {}}, "head_node_type": "b"}))
    with pytest.raises(ValueError, match="head_node_type 'b' is not one of available_node_types"):
        load_cluster_yaml(path)
