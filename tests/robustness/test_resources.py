"""Resources a stage can never get fail in seconds, saying what was asked and what exists.

The rules are pure functions of a request and a cluster view; the slow tests ask a real local Ray
(2 CPUs, no GPU) for what it does not have, through the same entry points a user calls.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.resources import (ClusterView, NodeType, ResourceError, ResourceRequest, autoscaler_node_types,
                                    check_resources, fits_on, node_types_for_bundle, node_types_from_cluster_yaml,
                                    shortfall)

ROOT = Path(__file__).resolve().parents[2]
LAPTOP = ClusterView([{"CPU": 2.0}])


def workers(n, **bundle):
    return ResourceRequest("dpo training", tuple([dict(bundle)] * n), "scaling.num_workers")


def test_a_gpu_on_a_cpu_machine_is_refused_naming_the_bundle_and_the_cluster():
    reason = shortfall(workers(1, CPU=1, GPU=1), LAPTOP)
    assert "{CPU: 1, GPU: 1} on one node" in reason and "no node has that" in reason
    with pytest.raises(ResourceError) as excinfo:
        check_resources(workers(1, CPU=1, GPU=1), view=lambda: LAPTOP)
    message = str(excinfo.value)
    assert "dpo training asks for 1 x {CPU: 1, GPU: 1}" in message
    assert "1 node(s) with {CPU: 2} in all; no autoscaler node types" in message
    assert "scaling.num_workers" in message


def test_more_workers_than_cores_are_refused_with_the_totals():
    reason = shortfall(workers(64, CPU=1), LAPTOP)
    assert reason == "together they need 64 CPU, and at most 2 can exist"


def test_bundles_that_fit_only_spread_over_nodes_that_cannot_hold_them_together():
    two_small = ClusterView([{"CPU": 1.5}, {"CPU": 1.5}])
    assert fits_on([{"CPU": 1.0}] * 2, two_small.nodes)
    assert not fits_on([{"CPU": 1.0}] * 3, two_small.nodes)  # 3 CPU in all, but 1 worker per node
    assert "do not fit on the nodes together" in shortfall(workers(3, CPU=1), two_small)


def test_what_fits_now_passes_at_once():
    started = time.monotonic()
    assert check_resources(workers(2, CPU=1), view=lambda: LAPTOP) is not None
    assert time.monotonic() - started < 1


def test_the_repository_cluster_yaml_node_types_can_hold_the_recipe_but_not_more():
    types = node_types_from_cluster_yaml(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    assert [(t.name, t.resources["GPU"], t.max_count) for t in types] == [("gpu.a100x8", 8.0, 2)]
    head = ClusterView([{"CPU": 8.0, "GPU": 0.0}], types)
    assert shortfall(workers(8, CPU=1, GPU=1), head) is None          # one gpu.a100x8 node
    assert shortfall(workers(17, CPU=1, GPU=1), head) == "together they need 17 GPU, and at most 16 can exist"
    assert "no node or node type has that" in shortfall(workers(1, CPU=1, GPU=9), head)


def test_work_only_an_autoscaler_can_hold_waits_for_its_nodes_then_passes():
    gpu_type = NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, 2)
    views = iter([ClusterView([{"CPU": 2.0}], [gpu_type]), ClusterView([{"CPU": 2.0}], [gpu_type]),
                  ClusterView([{"CPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}], [gpu_type])])
    asked: list[list[dict]] = []
    slept: list[float] = []
    view = check_resources(workers(1, CPU=1, GPU=1), wait_s=60, poll_s=5, view=lambda: next(views),
                           ask_autoscaler=asked.append, sleep=slept.append)
    assert len(view.nodes) == 2 and slept == [5, 5]
    assert asked == [[{"CPU": 1, "GPU": 1}], []]  # asked for the nodes, then withdrew the request


def test_an_autoscaler_that_adds_nothing_fails_after_the_configured_wait():
    gpu_type = NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, -1)
    clock = {"now": 0.0}
    with pytest.raises(ResourceError) as excinfo:
        check_resources(workers(1, CPU=1, GPU=1), wait_s=30, poll_s=10,
                        view=lambda: ClusterView([{"CPU": 2.0}], [gpu_type]), ask_autoscaler=lambda b: None,
                        sleep=lambda s: clock.__setitem__("now", clock["now"] + s), clock=lambda: clock["now"])
    assert "did not add the nodes within 30 s (scaling.resource_wait_s)" in str(excinfo.value)
    assert "any number x gpu {CPU: 8, GPU: 1}" in str(excinfo.value)


def test_requests_carry_the_custom_resources_of_workers_and_actors():
    from orchestrator.config import config_from_dict
    from orchestrator.resources import eval_request, reference_request, training_request

    config = config_from_dict({"scaling": {"num_workers": 2, "cpus_per_worker": 0.5,
                                           "resources_per_worker": {"gpu_stand_in": 1}},
                               "eval": {"resources_per_actor": {"gpu_stand_in": 1}}})
    assert training_request(config).bundles == ({"CPU": 0.5, "gpu_stand_in": 1.0},) * 2
    assert "scaling.resources_per_worker" in training_request(config).knobs
    assert eval_request(config).bundles == ({"CPU": 0.5, "gpu_stand_in": 1.0},)
    assert reference_request(config).bundles == ({"CPU": 0.5, "gpu_stand_in": 1.0},)


def test_only_node_types_whose_one_node_holds_the_whole_bundle_are_named():
    head = ClusterView([{"CPU": 8.0, "GPU": 0.0}],
                       node_types_from_cluster_yaml(yaml.safe_load((ROOT / "cluster.yaml").read_text())))
    assert node_types_for_bundle({"CPU": 1, "GPU": 1}, head) == ["gpu.a100x8"]
    assert node_types_for_bundle({"CPU": 96, "GPU": 8}, head) == ["gpu.a100x8"]
    assert node_types_for_bundle({"CPU": 1, "GPU": 9}, head) == []     # more GPUs than any node has
    assert node_types_for_bundle({"CPU": 97}, head) == []
    assert node_types_for_bundle({"CPU": 9, "GPU": 0}, head) == ["gpu.a100x8"]  # zero asks for nothing
    assert node_types_for_bundle({"CPU": 1, "gpu_stand_in": 1}, head) == []


def test_a_type_whose_resources_come_at_launch_is_waited_for_but_has_no_custom_resource():
    config = {"max_workers": 3, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 4}, "max_workers": 0},
        "auto": {"node_config": {"InstanceType": "g5.xlarge"}},            # resources filled in at launch
        "fast": {"resources": {"CPU": 8, "nvme": 1}, "max_workers": 5},   # capped by the global 3
        "off": {"resources": {"CPU": 64, "nvme": 1}, "max_workers": 0},   # may never be launched
    }}
    types = node_types_from_cluster_yaml(config)
    assert [(t.name, t.max_count) for t in types] == [("auto", 3), ("fast", 3)]
    head = ClusterView([{"CPU": 4.0}], types)
    assert node_types_for_bundle({"CPU": 2, "GPU": 1}, head) == ["auto"]
    assert node_types_for_bundle({"CPU": 2, "nvme": 1}, head) == ["fast"]
    assert shortfall(workers(100, CPU=2, GPU=1), head) is None             # unknown: waiting may help
    assert shortfall(workers(4, CPU=2, nvme=1), head) == "together they need 4 nvme, and at most 3 can exist"
    assert "no node or node type has that" in shortfall(workers(1, CPU=16, nvme=1), head)
    assert "up to 3 x auto {CPU: set at launch, GPU: set at launch}" in head.describe()
    assert node_types_from_cluster_yaml({**config, "max_workers": 0}) == []  # no worker node at all


def test_node_types_come_from_the_autoscalers_config_file_when_ray_publishes_none(tmp_path):
    """Ray's default autoscaler (v1: `ray up`, `ray start --autoscaling-config`) publishes no node types; its
    config file names them. A head with no worker node then waits for what a node type can hold and fails
    at once for what none can."""
    from orchestrator.cluster import load_cluster_yaml, local_autoscaling_config

    path = tmp_path / "autoscaling.yaml"
    path.write_text(yaml.safe_dump(local_autoscaling_config(load_cluster_yaml(ROOT / "cluster.yaml"),
                                                            gcs_address="h:1")))
    types, source = autoscaler_node_types(path)
    assert [(t.name, t.resources["gpu_stand_in"], t.max_count) for t in types] == [("gpu.a100x8", 1.0, 2)]
    assert source == f"node types from {path}"
    head_only = ClusterView([{"CPU": 1.0}], types, source)
    assert shortfall(workers(2, CPU=0.5, gpu_stand_in=1), head_only) is None          # the autoscaler can add them
    assert shortfall(workers(3, CPU=0.5, gpu_stand_in=1), head_only) == (
        "together they need 3 gpu_stand_in, and at most 2 can exist")
    with pytest.raises(ResourceError) as excinfo:
        check_resources(workers(1, CPU=0.5, gpu_stand_in=2), view=lambda: head_only)
    assert "no node or node type has that" in str(excinfo.value) and str(path) in str(excinfo.value)


def test_a_missing_or_broken_autoscaler_config_means_no_node_types_and_says_so(tmp_path):
    types, source = autoscaler_node_types(tmp_path / "absent.yaml")
    assert types == [] and f"no autoscaler config at {tmp_path / 'absent.yaml'}" in source
    broken = tmp_path / "broken.yaml"
    broken.write_text("available_node_types: [\n")
    types, source = autoscaler_node_types(broken)
    assert types == [] and f"{broken} is not a readable autoscaling config" in source
    assert autoscaler_node_types(None) == ([], "none published by the autoscaler")


def test_the_wait_says_which_node_types_it_waits_for(caplog):
    gpu_type, cpu_type = NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, 2), NodeType("cpu", {"CPU": 8.0}, 2)
    views = iter([ClusterView([{"CPU": 2.0}], [cpu_type, gpu_type]),
                  ClusterView([{"CPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}], [cpu_type, gpu_type])])
    with caplog.at_level("INFO", logger="orchestrator.resources"):
        check_resources(workers(1, CPU=1, GPU=1), wait_s=60, view=lambda: next(views), ask_autoscaler=lambda b: None,
                        sleep=lambda s: None)
    assert "dpo training needs 1 x {CPU: 1, GPU: 1}; waiting up to 60 s for the autoscaler to add gpu node(s)" in (
        caplog.text)


# ----------------------------------------------------------------------------------------------
# Through the real entry points, on a real local Ray (2 CPUs, no GPU)


@pytest.mark.slow
@pytest.mark.parametrize("overrides, words", [
    (("scaling.use_gpu=true",), "{CPU: 1, GPU: 1} on one node"),
    (("scaling.num_workers=64",), "together they need 64 CPU"),
])
def test_training_that_can_never_be_scheduled_fails_in_seconds(ray_session, synth_world, tmp_path, overrides,
                                                                 words):
    from orchestrator.train.trainer import run_training
    from tests.train import tiny_config

    config = tiny_config(tmp_path, synth_world[0], *overrides)
    started = time.monotonic()
    with pytest.raises(ResourceError) as excinfo:
        run_training(config, "dpo")
    assert time.monotonic() - started < 20
    assert words in str(excinfo.value) and "{CPU: 2" in str(excinfo.value)
    assert not (config.run_dir / "train").exists()  # nothing was started


@pytest.mark.slow
def test_evaluation_on_a_gpu_the_cluster_lacks_fails_before_any_actor_starts(ray_session, synth_world, tmp_path):
    from orchestrator.eval.runner import run_eval
    from tests.train import tiny_config

    config = tiny_config(tmp_path, synth_world[0], "eval.gpus_per_actor=1", "model.path=" + str(tmp_path / "none"))
    started = time.monotonic()
    with pytest.raises(ResourceError, match=r"evaluation \(1 actor\(s\)\) asks for 1 x \{CPU: 0.5, GPU: 1\}"):
        run_eval(config, model_path=str(tmp_path / "none"), benchmarks=("pope",))
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_a_local_run_ignores_an_autoscaler_config_left_in_the_home_folder(tmp_path):
    """The local Ray a command starts has no autoscaler: node types in a stale ~/ray_bootstrap_config.yaml
    (the default `scaling.autoscaling_config`) must not make it wait for nodes that never come."""
    import subprocess
    import sys

    from orchestrator.cluster import load_cluster_yaml, local_autoscaling_config

    stale = tmp_path / "ray_bootstrap_config.yaml"
    stale.write_text(yaml.safe_dump(local_autoscaling_config(load_cluster_yaml(ROOT / "cluster.yaml"),
                                                             gcs_address="h:1")))
    config = tmp_path / "c.yaml"
    config.write_text(f"name: stale\noutput_root: {tmp_path / 'runs'}\ndata: {{synthetic: {{num_images: 8}}}}\n"
                      f"scaling: {{resources_per_worker: {{gpu_stand_in: 1}}, "
                      f"autoscaling_config: {stale}, resource_wait_s: 300}}\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(config)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "no node has that" in done.stderr and "waiting up to" not in done.stdout + done.stderr, done.stderr
    assert time.monotonic() - started < 120
