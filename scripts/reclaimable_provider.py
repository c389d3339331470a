"""Ray's fake multi-node provider, whose nodes can be taken away the way a cloud reclaims an instance.

scripts/local_cluster.py runs the autoscaler with this provider (`provider.type: external`). Killing a fake
node's processes from outside is not enough to rehearse a lost instance: the fake provider keeps the node in
its list, tagged "uninitialized" (no node updater ever marks it up to date), so the autoscaler's liveness
check skips it, and `request_resources` (Ray Train asks through it) keeps the dead node's resources counted:
no replacement is ever launched. A cloud provider instead stops listing an instance that is gone. This
provider does the same on request: a file named after a node id in `provider.reclaim_dir` makes it kill
that node's processes at once (SIGKILL: no draining, as when a spot instance is reclaimed) and drop it from
its node list; the autoscaler then sees the demand again and launches a replacement. And each node keeps
its runtime environments (a job's working_dir) in a folder of its own, as separate machines do.
"""

from __future__ import annotations

import logging
from pathlib import Path

import ray._private.ray_constants as ray_constants
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE

log = logging.getLogger(__name__)


class ReclaimableFakeProvider(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        # Each node unpacks runtime environments (a job's working_dir) into a folder of its own. The fake nodes
        # share one session folder, and a node setting up a working_dir removes and unpacks it again: in a
        # shared folder that deletes the current directory of the other nodes' workers under them. Ray reads
        # the folder's name from this constant when the node's parameters are built (parameter.py).
        with self.lock:
            shared = ray_constants.DEFAULT_RUNTIME_ENV_DIR_NAME
            ray_constants.DEFAULT_RUNTIME_ENV_DIR_NAME = f"{shared}_node{self._next_node_id + 1:05d}"
            try:
                super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            finally:
                ray_constants.DEFAULT_RUNTIME_ENV_DIR_NAME = shared

    def non_terminated_nodes(self, tag_filters):
        self._reclaim_requested_nodes()
        return super().non_terminated_nodes(tag_filters)

    def _reclaim_requested_nodes(self) -> None:
        directory = self.provider_config.get("reclaim_dir")
        if not directory or not Path(directory).is_dir():
            return
        for request in sorted(Path(directory).iterdir()):
            node_id = request.name
            with self.lock:
                node = self._nodes.get(node_id)
                if node is not None and node_id != self._head_node_id:
                    self._nodes.pop(node_id)
                    node["node"].kill_all_processes(check_alive=False, allow_graceful=False)
                    log.info("reclaimed node %s (%s)", node_id, node["tags"].get(TAG_RAY_USER_NODE_TYPE))
            request.unlink(missing_ok=True)
