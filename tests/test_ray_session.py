"""The local Ray a command (or the suite) starts with `init_ray`: what its workers inherit."""

import os

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
