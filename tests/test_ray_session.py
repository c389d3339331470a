"""The local Ray a command (or the suite) starts with `init_ray`: what its workers inherit."""

import os
import time

import pytest

from orchestrator.config import ExperimentConfig
from orchestrator.console import WORKER_LOG_MARKS


@pytest.mark.slow
def test_the_local_rays_workers_get_the_runs_variables_without_a_runtime_env(ray_session, ray_temp):
    """The run's variables reach every worker through the inherited environment, with no runtime_env (one
    would start each worker through Ray's setup process); the driver's own environment is left as it was."""
    expected = ExperimentConfig(name="suite", output_root=str(ray_temp)).runtime_env()["env_vars"]

    @ray_session.remote(num_cpus=0.1)
    def seen(names):
        import ray

        return ({name: os.environ.get(name) for name in names}, ray.get_runtime_context().runtime_env,
                os.environ.get(WORKER_LOG_MARKS))

    values, runtime_env, marks = ray_session.get(seen.remote(sorted(expected)))
    assert values == expected
    assert not runtime_env, runtime_env
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in os.environ  # a worker's setting, not the driver's
    assert marks is None and WORKER_LOG_MARKS not in os.environ  # no command's console here


@pytest.mark.slow
def test_a_worker_of_the_local_ray_knows_it_runs_on_the_local_ray(ray_session):
    """A Tune trial's driver function runs in a worker and starts its trial's training there: it must treat the
    Ray as the command that started it does (no placement-group cleaner per run, polling a state API this Ray
    does not serve; no wait for the nodes of an autoscaler config left in the home folder)."""
    from orchestrator.ray_session import LOCAL_RAY_MARK, local_session

    @ray_session.remote(num_cpus=0.1)
    def seen():
        return local_session()

    assert local_session() and ray_session.get(seen.remote())
    assert LOCAL_RAY_MARK not in os.environ  # the driver's own environment is left as it was


@pytest.mark.slow
def test_the_local_ray_keeps_its_idle_task_workers_while_actors_hold_the_cpus(ray_session):
    """Ray's default keeps as many idle task workers as there are unreserved CPUs: while actors hold them (a
    training run, an evaluation pool) none, and the next Ray Data operation starts new processes. The local
    Ray keeps them: a task after a pause runs in the same worker process as the one before it."""
    free = ray_session.available_resources()["CPU"]

    @ray_session.remote(num_cpus=free - 0.5)
    class Holder:
        def ready(self):
            return True

    @ray_session.remote(num_cpus=0.5)
    def worker_pid():
        return os.getpid()

    holder = Holder.remote()
    try:
        ray_session.get(holder.ready.remote())
        first = ray_session.get(worker_pid.remote())
        time.sleep(2.5)  # Ray kills a worker idle for more than 1 s (it looks every 0.2 s)
        assert ray_session.get(worker_pid.remote()) == first
    finally:
        ray_session.kill(holder)


# A command whose Ray `init_ray` starts inside it (output_root: sys.argv[1]); then what is left of that Ray when
# `run_command` returns: whether Ray is initialized, this process's children still running (Ray's own: GCS,
# raylet, monitor ...), and any process of that Ray (workers and agents included) still running 30 s later.
COMMAND_THEN_LOOK = """
import json, sys
import psutil, ray
from orchestrator.boundary import run_command
from orchestrator.config import ExperimentConfig
from orchestrator.ray_session import init_ray
from scripts.local_cluster import wait_exited

processes = []

def command(args):
    init_ray(ExperimentConfig(name="c", output_root=sys.argv[1]), num_cpus=1, num_gpus=0)
    processes.extend(psutil.Process().children(recursive=True))
    return len(ray.nodes())

code = run_command(command, None, ["hadpo", "c"])
running = [p.pid for p in psutil.Process().children() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
print(json.dumps({"code": code, "initialized": ray.is_initialized(), "running_children": running,
                  "ray_processes": len(processes), "left": [p.pid for p in wait_exited(processes, 30)]}))
"""


@pytest.mark.slow
def test_a_command_stops_the_local_ray_it_started_before_it_returns(tmp_path):
    """Not in Ray's exit hook after it (which first sleeps half a second for late log lines): when
    `run_command` returns, Ray is disconnected and the local Ray's processes it started (its autoscaler
    monitor among them) have exited. A Ray that was up before the command stays up (the data check in
    tests/data/test_preference_sources.py)."""
    import json
    import subprocess
    import sys

    from tests.commands import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", COMMAND_THEN_LOOK, str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["ray_processes"] > 0, seen
    assert seen == {**seen, "code": 1, "initialized": False, "running_children": [], "left": []}, seen
