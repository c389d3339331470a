"""The cluster path on Ray's local autoscaler: cluster.yaml's node types (scripts/local_cluster.py), token
authentication on, `jobs/run.py` submitted with `ray job submit`, worker nodes launched from zero, one of
them reclaimed mid-training as a cloud reclaims an instance, all of them removed when idle.

One scenario runs once for the module (on the package's fake autoscaling head: the job, then the idle wait)
and the tests below each check one behaviour of it; the local run it is compared with runs on the suite's Ray
while the scenario finishes (`runs`).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator.cluster import FAKE_HEAD_NODE_TYPE, GPU_STAND_IN
from orchestrator.config import apply_override
from orchestrator.train.checkpoints import step_of
from scripts import local_cluster
from tests.train import recorded_checkpoint

ROOT = Path(__file__).resolve().parents[2]

IDLE_TIMEOUT_AFTER_JOB_MINUTES = 0.1
WORKER_TYPE = "gpu.a100x8"
FAKE_HEAD_NODE_ID = local_cluster.FAKE_HEAD_NODE_ID
JOB_ID = "hadpo-autoscaling"


def test_active_nodes_are_read_from_ray_status_per_type():
    text = ("======== Autoscaler status ========\nNode status\n------\nActive:\n 1 ray.head.default\n 2 gpu.a100x8\n"
            "Pending:\n (no pending nodes)\n")
    assert local_cluster.parse_active_nodes(text, exclude=(FAKE_HEAD_NODE_TYPE,)) == {"gpu.a100x8": 2}
    assert local_cluster.parse_active_nodes("Active:\n 1 ray.head.default\nPending:\n",
                                            exclude=(FAKE_HEAD_NODE_TYPE,)) == {}


def test_a_process_that_exited_counts_as_gone_while_it_waits_to_be_collected():
    import subprocess

    import psutil

    exited = subprocess.Popen(["sleep", "0"])  # not waited for: a zombie until collected below
    running = subprocess.Popen(["sleep", "30"])
    try:
        local_cluster.wait_for(lambda: psutil.Process(exited.pid).status() == psutil.STATUS_ZOMBIE, 10, "no zombie",
                               poll_s=0.05)
        started = time.monotonic()
        assert local_cluster.wait_exited([psutil.Process(exited.pid)], timeout_s=10) == []
        assert time.monotonic() - started < 1
        assert [p.pid for p in local_cluster.wait_exited([psutil.Process(running.pid)], timeout_s=0.2)] == [running.pid]
    finally:
        running.kill()
        running.wait()
        exited.wait()


def job_config(out: Path, model: Path, cluster=None, stand_ins_per_worker: int = 1) -> dict:
    """The demo config at tiny sizes: 2 training workers and 2 evaluation actors, each asking on `cluster` for
    the GPU stand-in that only the worker node type has (one per node: they spread over two nodes), and the
    resource check reading the cluster's node types from its autoscaling config (the local run leaves both
    out; they do not change a number)."""
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    overrides = [
        f"output_root={out}", "name=cluster", f"model.path={model}",  # a built tiny model: no warm-up stage
        "data.synthetic.num_images=16", "data.synthetic.num_pope_images=4", "data.synthetic.milebench_tasks=0",
        "train.max_steps=24", "train.batch_size_per_worker=2", "train.checkpoint_every_steps=3",
        "train.log_every_steps=3", "train.max_failures=2", "train.reference_cache=false",
        "train.lora={enabled: true, rank: 4, alpha: 8, dropout: 0.0}",
        "scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
        "eval.num_actors=2", "eval.cpus_per_actor=0.5", "eval.batch_size=8",
    ]
    if cluster:
        overrides += [f"scaling.resources_per_worker={{{GPU_STAND_IN}: {stand_ins_per_worker}}}",
                      f"eval.resources_per_actor={{{GPU_STAND_IN}: 1}}",
                      f"scaling.autoscaling_config={cluster.config_path}"]
    for override in overrides:
        apply_override(raw, override)
    return raw


@dataclass
class Scenario:
    nodes_before: dict
    most_worker_nodes: int = 0     # active worker nodes in `ray status`
    most_live_nodes: int = 0       # worker nodes whose raylet runs (the reclaimed one not counted once reclaimed)
    live_samples: list = field(default_factory=list)  # (seconds since submission, ids of the live worker nodes)
    reclaimed_node: str = ""
    checkpoint_at_reclaim: str = ""  # the newest checkpoint Ray Train had recorded then
    submitted_at: float = 0.0
    reclaimed_at: float = 0.0
    status: str = ""
    log: str = ""
    actors: list = field(default_factory=list)
    events: list = field(default_factory=list)
    nodes_after_idle: dict | None = None
    idle_wait_s: float = 0.0
    run_dir: Path | None = None


def run_on_cluster(cluster, out: Path, model: Path, trained: threading.Event) -> Scenario:
    """Submit jobs/run.py, have the provider reclaim the node of one training worker after the first DPO
    checkpoint, wait for the job, then for the idle timeout; record what the autoscaler and the job did.
    `trained` is set once the job's DPO stage is over (or the job is)."""
    config_path = out / "job.yaml"
    config_path.write_text(yaml.safe_dump(job_config(out, model, cluster), sort_keys=False))
    record = Scenario(nodes_before=local_cluster.worker_nodes(cluster), run_dir=out / "cluster")
    record.submitted_at = time.time()
    submit = cluster.submit("--no-wait", "--submission-id", JOB_ID, "--working-dir", str(ROOT),
                            "--runtime-env", str(ROOT / "jobs/runtime_env.yaml"),
                            "--", "python", "jobs/run.py", "--config", str(config_path))
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]

    # While the job runs: count the worker nodes; once Ray Train has recorded the first DPO checkpoint, have a
    # worker node reclaimed (during DPO each of the two holds one training worker: one GPU stand-in per node).
    checkpoints = record.run_dir / "train" / "cluster-dpo"
    deadline, next_look = time.time() + 1800, 0.0
    while time.time() < deadline:
        if (record.run_dir / "stages" / "dpo.json").is_file():
            trained.set()
        recorded = None if record.reclaimed_node else recorded_checkpoint(checkpoints)
        if recorded:
            nodes = local_cluster.launched_node_ids(cluster)
            if nodes:
                record.reclaimed_node, record.checkpoint_at_reclaim = nodes[0], recorded
                local_cluster.reclaim_node(cluster, record.reclaimed_node)
                record.reclaimed_at = time.time()
        status = cluster.job_status(JOB_ID)  # one HTTP request to the dashboard
        if status not in ("PENDING", "RUNNING", "UNKNOWN"):
            break
        if time.time() >= next_look:  # another request and a look at the processes
            record.most_worker_nodes = max(record.most_worker_nodes,
                                           local_cluster.worker_nodes(cluster).get(WORKER_TYPE, 0))
            live = local_cluster.launched_node_ids(cluster)
            record.live_samples.append((round(time.time() - record.submitted_at, 1), live))
            # a SIGKILLed raylet can take a moment to go on a loaded machine: it is no longer a node
            counted = [node for node in live if node != record.reclaimed_node]
            record.most_live_nodes = max(record.most_live_nodes, len(counted))
            next_look = time.time() + 3
        time.sleep(0.5)
    trained.set()
    # After the job: the autoscaler removes the idle worker nodes. Idle since the job's evaluation ended, they
    # would stay up to 30 s more: the idle timeout, long enough to keep them through the job's pauses between
    # stages on this busy machine, now comes down to IDLE_TIMEOUT_AFTER_JOB_MINUTES.
    local_cluster.set_idle_timeout(cluster, IDLE_TIMEOUT_AFTER_JOB_MINUTES)
    started_idle = time.time()
    record.status = status
    record.log = cluster.ray("job", "logs", JOB_ID).stdout
    record.actors = local_cluster.state(cluster, "actors", "--detail")
    try:
        local_cluster.wait_for(lambda: not local_cluster.worker_nodes(cluster),
                               IDLE_TIMEOUT_AFTER_JOB_MINUTES * 60 + 90, "the worker nodes were not removed", poll_s=1)
        record.nodes_after_idle = {}
    except TimeoutError:
        record.nodes_after_idle = local_cluster.worker_nodes(cluster)
    record.idle_wait_s = time.time() - started_idle
    record.events = local_cluster.autoscaler_events(cluster)
    return record


def run_locally(out: Path, model: Path) -> Path:
    """The same config run on the suite's local Ray (no autoscaler, no custom resources); its run folder."""
    from orchestrator.config import config_from_dict
    from orchestrator.pipeline import run_pipeline

    config = config_from_dict(job_config(out, model))
    run_pipeline(config)
    return config.run_dir


@pytest.fixture(scope="module")
def runs(cluster, ray_session, tmp_path_factory, tiny_model_dir) -> tuple[Scenario, Path]:
    """The job on the cluster, and the local run once the job's training is over: the local run then runs
    beside what the scenario does after the training (the job's last evaluation and exit, the idle timeout,
    mostly waiting) instead of after it, and cannot delay the reclaim, whose timing matters, by taking the
    CPUs from the training.

    The job is watched from a thread (HTTP requests, files, `ray` commands); the local run stays in this one,
    the main thread, the only one where Ray Train may install its Ctrl-C handler. Neither run reads or
    changes the other's Ray."""
    cluster_out, local_out = tmp_path_factory.mktemp("cluster-runs"), tmp_path_factory.mktemp("local-runs")
    trained = threading.Event()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cluster-job") as pool:
        on_cluster = pool.submit(run_on_cluster, cluster, cluster_out, tiny_model_dir, trained)
        while not trained.wait(timeout=1):
            if on_cluster.done():  # failed before the training was over: say why now
                on_cluster.result()
        local = run_locally(local_out, tiny_model_dir)
        return on_cluster.result(), local


@pytest.fixture(scope="module")
def scenario(runs) -> Scenario:
    return runs[0]


@pytest.fixture(scope="module")
def local_run(runs) -> Path:
    return runs[1]


def _stage(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / "stages" / f"{name}.json").read_text())["outputs"]


def _answers(run_dir: Path, stage: str):
    from orchestrator.eval.results import read_answers

    answers = read_answers(Path(_stage(run_dir, stage)["answers_dir"]))
    return answers.sort_values(["split", "item_id"]).reset_index(drop=True)


@pytest.mark.slow
def test_a_client_without_the_token_is_refused_with_a_clear_error(cluster, tmp_path):
    env = cluster.client_env()
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either: a laptop that never got the token
    refused = cluster.ray("job", "submit", "--submission-id", "no-token", "--working-dir", str(ROOT / "jobs"),
                          "--", "python", "-c", "print('ran')", env=env)
    message = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert "Authentication required" in message and "Missing authentication token" in message
    assert "RAY_AUTH_TOKEN" in message and "ray get-auth-token" in message  # says where a token goes
    assert cluster.job_status("no-token") == "UNKNOWN"  # nothing ran: the Jobs API does not know it


@pytest.mark.slow
def test_a_job_asking_for_what_no_node_type_has_fails_in_seconds_without_launching_a_node(cluster, tmp_path,
                                                                                         tiny_model_dir):
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(job_config(tmp_path / "runs", tiny_model_dir, cluster,
                                                     stand_ins_per_worker=2)))
    started = time.monotonic()
    submitted = cluster.submit("--submission-id", "impossible", "--working-dir", str(ROOT),
                               "--runtime-env", str(ROOT / "jobs/runtime_env.yaml"),
                               "--", "python", "jobs/run.py", "--config", str(config_path))
    took_s = time.monotonic() - started  # upload, driver start-up (torch imports) and the check
    log = submitted.stdout + submitted.stderr
    assert submitted.returncode != 0, log[-3000:]
    assert f"asks for 2 x {{CPU: 0.5, {GPU_STAND_IN}: 2}}" in log and "no node or node type has that" in log
    # what the autoscaler could add, read from its config
    assert f"up to 2 x {WORKER_TYPE} {{CPU: 1, {GPU_STAND_IN}: 1}} (node types from {cluster.config_path})" in log
    assert took_s < 120, took_s  # not scaling.resource_wait_s (600 s): nothing was waited for
    assert cluster.job_status("impossible") == "FAILED"
    assert not any(m.startswith("Adding") for m in local_cluster.autoscaler_events(cluster))


@pytest.mark.slow
def test_worker_nodes_are_launched_from_zero_for_the_job(scenario, cluster):
    assert scenario.nodes_before == {}
    assert scenario.most_worker_nodes >= 2  # two training workers, one stand-in GPU per node
    # never more than max_workers at once (`ray status` may still count a reclaimed node for a moment); the
    # message has the timeline of live nodes and the autoscaler's events
    assert scenario.most_live_nodes == 2, (scenario.live_samples, scenario.reclaimed_node, scenario.events)
    assert any(f"of type {WORKER_TYPE}" in m and m.startswith("Adding") for m in scenario.events), scenario.events
    # the resource check waited for them, saying for what and which node types the autoscaler may add
    assert f"waiting up to 600 s for the autoscaler to add {WORKER_TYPE} node(s)" in scenario.log, scenario.log[-3000:]
    assert f"up to 2 x {WORKER_TYPE} {{CPU: 1, {GPU_STAND_IN}: 1}} (node types from {cluster.config_path})" in (
        scenario.log)


@pytest.mark.slow
def test_training_workers_and_eval_actors_run_on_the_worker_nodes_only_one_per_node(scenario):
    trainers = [a for a in scenario.actors if "RayTrainWorker" in a["class_name"]]
    evaluators = [a for a in scenario.actors if "Predictor" in a["class_name"]]
    # each asked Ray for the GPU stand-in that only the worker node type has: scaling.resources_per_worker (in
    # Ray Train's placement-group bundles) and eval.resources_per_actor reached the scheduler
    assert trainers and all(any(key.startswith(f"{GPU_STAND_IN}_group_") for key in a["required_resources"])
                            for a in trainers), trainers
    assert len(evaluators) >= 2 and all(a["required_resources"].get(GPU_STAND_IN) == 1 for a in evaluators), (
        evaluators)
    trainer_nodes = {a["node_id"] for a in trainers if a.get("node_id")}
    evaluator_nodes = [a["node_id"] for a in evaluators if a.get("node_id")]
    # the two training workers of one group spread over two nodes (one stand-in each); so do the evaluation
    # actors that started, one per node. Both need not start: when a worker node was removed as idle between
    # the training and the evaluation (a 30 s idle timeout here, the machine busy with the local run), the
    # pool starts on the node left and the tiny evaluation may end before the replacement node comes.
    assert len(trainer_nodes) >= 2, trainer_nodes
    assert evaluator_nodes and len(set(evaluator_nodes)) == len(evaluator_nodes), evaluator_nodes
    assert FAKE_HEAD_NODE_ID not in trainer_nodes | set(evaluator_nodes)


@pytest.mark.slow
def test_the_job_succeeds_with_the_pope_table_of_a_local_run(scenario, local_run):
    assert scenario.status == "SUCCEEDED", scenario.log[-5000:]
    for stage in ("eval_baseline", "eval_hadpo"):
        on_cluster, local = _stage(scenario.run_dir, stage), _stage(local_run, stage)
        assert on_cluster["pope"] and on_cluster["pope"] == local["pope"], stage
        # item by item: the same answers and P(yes), so the tables agree for the right reason
        cluster_answers, local_answers = _answers(scenario.run_dir, stage), _answers(local_run, stage)
        assert cluster_answers["answer"].tolist() == local_answers["answer"].tolist(), stage
        np.testing.assert_allclose(cluster_answers["p_yes"], local_answers["p_yes"], atol=1e-6, err_msg=stage)
    # DPO moved the answers' P(yes): a training that went wrong on the cluster would show
    moved = _answers(scenario.run_dir, "eval_hadpo")["p_yes"] - _answers(scenario.run_dir, "eval_baseline")["p_yes"]
    assert np.abs(moved).max() > 1e-4


@pytest.mark.slow
def test_training_interrupted_on_the_cluster_ends_with_the_adapter_of_an_uninterrupted_local_run(scenario,
                                                                                                  local_run):
    from safetensors.numpy import load_file

    on_cluster = load_file(Path(_stage(scenario.run_dir, "dpo")["adapter"]) / "adapter_model.safetensors")
    local = load_file(Path(_stage(local_run, "dpo")["adapter"]) / "adapter_model.safetensors")
    assert scenario.reclaimed_node and sorted(on_cluster) == sorted(local)
    for name, weight in local.items():
        np.testing.assert_allclose(on_cluster[name], weight, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_a_worker_node_reclaimed_mid_training_is_replaced_and_training_resumes_from_its_last_checkpoint(
        scenario):
    assert scenario.reclaimed_node
    lost_workers = [a for a in scenario.actors if "RayTrainWorker" in a["class_name"]
                      and a.get("node_id") == scenario.reclaimed_node]
    assert lost_workers and all(a["state"] == "DEAD" for a in lost_workers)
    adds = [m for m in scenario.events if m.startswith("Adding") and WORKER_TYPE in m]
    assert len(adds) >= 2, scenario.events  # the first launch, then the replacement
    dpo = _stage(scenario.run_dir, "dpo")
    assert dpo["metrics"]["step"] == 24
    # from the checkpoint recorded before the node went (or a later one written before Ray noticed)
    assert step_of(scenario.checkpoint_at_reclaim) <= dpo["metrics"]["resumed_from_step"] < 24, (
        scenario.checkpoint_at_reclaim, dpo["metrics"])
    # the replacement node (launched after the job started) ran a training worker: the job's working_dir
    # and runtime_env reached it
    worker_nodes = {a["node_id"] for a in scenario.actors if "RayTrainWorker" in a["class_name"]}
    assert len(worker_nodes - {scenario.reclaimed_node}) >= 2, worker_nodes


@pytest.mark.slow
def test_idle_worker_nodes_are_removed_after_the_idle_timeout(scenario):
    assert scenario.nodes_after_idle == {}, scenario.nodes_after_idle
    assert any(m.startswith("Removing") and "(idle)" in m for m in scenario.events), scenario.events
