"""The local autoscaling cluster both modules here submit jobs to: one head for the package (a head costs
~10 s of process start-ups on 2 cores, and its job agent comes up seconds after `ray start` returns)."""

import pytest

from scripts import local_cluster

# cluster.yaml's idle timeout is minutes; the scenario in test_autoscaling waits for idle nodes to go
IDLE_TIMEOUT_MINUTES = 0.5


@pytest.fixture(scope="package")
def cluster(tmp_path_factory):
    """The fake autoscaling head for cluster.yaml (`ray start --head`, as a user starts one), token auth on,
    stopped (all its processes) after the package's last test."""
    with local_cluster.short_dir(tmp_path_factory.mktemp("hc")) as directory:
        started = local_cluster.up(directory, idle_timeout_minutes=IDLE_TIMEOUT_MINUTES)
        try:
            yield started
        finally:
            local_cluster.down(directory)
