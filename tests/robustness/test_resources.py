"""Resources a stage can never get fail in seconds, saying what was asked and what exists.

The rules are pure functions of a request and a cluster view; the slow tests ask a real local Ray
(2 CPUs, no GPU) for what it does not have, through the same entry points a user calls.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from orchestrator.resources import (ClusterView, NodeType, ResourceError, ResourceRequest, check_resources,
                                    fits_on, node_types_from_cluster_yaml, shortfall)

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
