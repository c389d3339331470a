"""Before work is submitted: can the cluster ever give it the resources it asks for?

Ray waits, without a word, for resources that never come: `scaling.use_gpu=true` on a machine without
a GPU, or 64 workers on 2 cores, hang until killed. `check_resources` answers first, in seconds:

- the request is a list of *bundles*, one per Ray Train worker or evaluation actor (each must fit on
  one node);
- the cluster is the alive nodes' total resources plus, when an autoscaler runs, the node types it may
  start (`ClusterView`; from Ray's GCS, or from the autoscaler's config file, ``scaling.autoscaling_config``);
- work that no node and no node type can hold, or more than all of them together can hold, fails at
  once with `ResourceError` saying what was asked and what exists;
- work the nodes can hold now passes at once;
- work only the autoscaler's nodes can hold waits up to `wait_s` (``scaling.resource_wait_s``), saying
  which node types it waits for (`node_types_for_bundle`), while the nodes are requested
  (`ray.autoscaler.sdk.request_resources`), then fails with what was asked and what came.

What it compares is capacity (the nodes' totals), not what is free at this moment: resources that other
work holds now are released later, so they are not a reason to fail. `shortfall` and `fits_on` are pure
functions of a request and a view, so the rules are tested without a cluster.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import yaml

from orchestrator import console
from orchestrator.cluster import worker_node_types

log = logging.getLogger(__name__)

# Resources every node reports that no stage asks for; left out of messages.
_BOOKKEEPING = ("memory", "object_store_memory")
_EPSILON = 1e-9


class ResourceError(RuntimeError):
    """The resources a stage asks for cannot be had; the message says what was asked and what exists."""


@dataclass(frozen=True)
class ResourceRequest:
    """What a stage will ask Ray for: one bundle per worker or actor."""

    what: str                                  # e.g. "DPO training (Ray Train workers)"
    bundles: tuple[dict[str, float], ...]
    knobs: str = ""                            # the config keys that set it, for the message

    def total(self) -> dict[str, float]:
        return _sum(self.bundles)

    def describe(self) -> str:
        shapes: dict[str, int] = {}
        for bundle in self.bundles:
            shapes[_fmt(bundle)] = shapes.get(_fmt(bundle), 0) + 1
        return ", ".join(f"{n} x {shape}" for shape, n in shapes.items())


@dataclass(frozen=True)
class NodeType:
    """A node type the autoscaler may start: its resources and how many (-1: no limit).

    A CPU or GPU count of `math.inf` stands for "filled in by the cloud provider at launch" (a launcher
    config type without `resources`): unknown here, so it never makes a request fail.
    """

    name: str
    resources: dict[str, float]
    max_count: int

    def describe(self) -> str:
        count = "any number" if self.max_count < 0 else f"up to {self.max_count}"
        return f"{count} x {self.name} {_fmt(self.resources)}"


@dataclass
class ClusterView:
    """The alive nodes' total resources, and the node types an autoscaler may add (and where they were read)."""

    nodes: list[dict[str, float]]
    node_types: list[NodeType] = field(default_factory=list)
    node_types_source: str = ""

    def describe(self) -> str:
        total = _sum(self.nodes)
        text = f"{len(self.nodes)} node(s) with {_fmt(total) if total else 'nothing'} in all"
        if self.node_types:
            text += "; the autoscaler may add " + ", ".join(t.describe() for t in self.node_types)
        else:
            text += "; no autoscaler node types"
        return text + (f" ({self.node_types_source})" if self.node_types_source else "")


def training_request(cfg, stage: str = "dpo") -> ResourceRequest:
    """The Ray Train workers of a training stage."""
    scaling = cfg.scaling
    bundle = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    if scaling.use_gpu:
        bundle["GPU"] = scaling.gpus_per_worker
    return ResourceRequest(f"{stage} training ({scaling.num_workers} Ray Train worker(s))",
                           (bundle,) * scaling.num_workers,
                           "scaling.num_workers, scaling.cpus_per_worker, scaling.use_gpu, scaling.gpus_per_worker, "
                           "scaling.resources_per_worker")


def eval_request(cfg) -> ResourceRequest:
    """The evaluation actor pool."""
    bundle = {"CPU": cfg.eval.cpus_per_actor, **cfg.eval.resources_per_actor}
    if cfg.eval.gpus_per_actor:
        bundle["GPU"] = cfg.eval.gpus_per_actor
    return ResourceRequest(f"evaluation ({cfg.eval.num_actors} actor(s))", (bundle,) * cfg.eval.num_actors,
                           "eval.num_actors, eval.cpus_per_actor, eval.gpus_per_actor, eval.resources_per_actor")


def reference_request(cfg) -> ResourceRequest:
    """The actor pool that caches the reference log-probs (one GPU per actor when training uses GPUs)."""
    bundle = {"CPU": cfg.eval.cpus_per_actor, **cfg.eval.resources_per_actor}
    if cfg.scaling.use_gpu:
        bundle["GPU"] = 1.0
    return ResourceRequest(f"reference log-prob pass ({cfg.eval.num_actors} actor(s))",
                           (bundle,) * cfg.eval.num_actors,
                           "eval.num_actors, eval.cpus_per_actor, eval.resources_per_actor, scaling.use_gpu")


# ----------------------------------------------------------------------------------------------
# The rules (pure)


def fits_on(bundles: Sequence[dict[str, float]], nodes: Sequence[dict[str, float]]) -> bool:
    """Whether the bundles can all be placed on the nodes at once (first fit, largest bundle first).

    First-fit decreasing is exact for the identical bundles a stage asks for; for mixed bundles it may
    say no where a cleverer packing exists, which is why `shortfall` fails on it only for identical ones.
    """
    free = [dict(node) for node in nodes]
    for bundle in sorted(bundles, key=lambda b: sum(b.values()), reverse=True):
        for node in free:
            if _holds(node, bundle):
                for key, amount in bundle.items():
                    node[key] = node.get(key, 0.0) - amount
                break
        else:
            return False
    return True


def node_types_for_bundle(bundle: dict[str, float], view: ClusterView) -> list[str]:
    """Names of the node types the autoscaler may add whose one node holds `bundle` ([]: waiting cannot help)."""
    return [t.name for t in view.node_types if t.max_count != 0 and _holds(t.resources, bundle)]


def shortfall(request: ResourceRequest, view: ClusterView) -> str | None:
    """Why the request can never be satisfied by this cluster (with its autoscaler), or None."""
    for bundle in {_fmt(b): b for b in request.bundles}.values():
        if not any(_holds(node, bundle) for node in view.nodes) and not node_types_for_bundle(bundle, view):
            return (f"each of them needs {_fmt(bundle)} on one node, and no node "
                    + ("or node type " if view.node_types else "") + "has that")
    if fits_on(request.bundles, view.nodes):
        return None
    possible = _sum(view.nodes)
    unlimited: set[str] = set()
    for node_type in view.node_types:
        for key, amount in node_type.resources.items():
            if node_type.max_count < 0:
                unlimited.add(key)
            else:
                possible[key] = possible.get(key, 0.0) + amount * node_type.max_count
    for key, needed in request.total().items():
        if key not in unlimited and needed > possible.get(key, 0.0) + _EPSILON:
            return f"together they need {_num(needed)} {key}, and at most {_num(possible.get(key, 0.0))} can exist"
    if not view.node_types and len({_fmt(b) for b in request.bundles}) == 1:
        return "they do not fit on the nodes together (each node holds only some of them)"
    return None


# ----------------------------------------------------------------------------------------------
# The cluster


def autoscaler_node_types(autoscaling_config: str | Path | None = None) -> tuple[list[NodeType], str]:
    """The node types the running autoscaler may add, and where they were found ([] without an autoscaler).

    Autoscaler v2 publishes them to Ray's GCS, under a private API (`ray._private.state.state.
    get_cluster_config`, which Ray Data uses for the same purpose). Ray's default autoscaler (v1, the one
    `ray up` and `ray start --autoscaling-config` run) publishes nothing: then they are read from its config
    file, `autoscaling_config` (``scaling.autoscaling_config``), when that exists. Without either, the
    check knows the alive nodes only.
    """
    published = _published_node_types()
    if published:
        return published, "node types published by the autoscaler"
    if not autoscaling_config:
        return [], "none published by the autoscaler"
    path = Path(autoscaling_config).expanduser()
    if not path.is_file():
        return [], f"none published by the autoscaler; no autoscaler config at {path} (scaling.autoscaling_config)"
    try:
        config = yaml.safe_load(path.read_text())
        types = node_types_from_cluster_yaml(config if isinstance(config, dict) else {})
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError, TypeError, ValueError) as error:
        log.warning("resources: %s: not a readable autoscaling config (%s); node types unknown", path, error)
        return [], f"none published by the autoscaler; {path} is not a readable autoscaling config"
    return types, f"node types from {path}"


def _published_node_types() -> list[NodeType]:
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception as error:  # a private API: never let it break a run
        log.debug("autoscaler node types not available: %s", error)
        return []
    if not config or not config.node_group_configs:
        return []
    types = []
    for group in config.node_group_configs:
        resources = {key: float(value) for key, value in dict(group.resources).items()}
        if resources and group.max_count != 0:
            types.append(NodeType(group.name or _fmt(resources), resources, int(group.max_count)))
    return types


def node_types_from_cluster_yaml(config: dict[str, Any]) -> list[NodeType]:
    """The node types a `ray up` cluster config (``available_node_types``) lets the autoscaler launch
    (`orchestrator.cluster.worker_node_types`): their resources, and how many (the type's `max_workers`,
    at most the config's global one).

    A type without `resources` gets them from the cloud provider at launch (`ray up` fills them in from the
    instance type); what it will get is not known here, so its CPU and GPU count as `math.inf` (waiting may
    help) and it has no custom resource (one would have to be in the config).
    """
    global_max = config.get("max_workers")
    types = []
    for name, spec in worker_node_types(config).items():
        resources = {key: float(value) for key, value in (spec.get("resources") or {}).items()}
        count = int(spec.get("max_workers", global_max or 0))
        if global_max is not None:
            count = min(count, int(global_max))
        types.append(NodeType(name, resources or {"CPU": math.inf, "GPU": math.inf}, count))
    return types


def cluster_view(autoscaling_config: str | Path | None = None) -> ClusterView:
    """The alive nodes of the connected Ray cluster and its autoscaler's node types (`autoscaler_node_types`)."""
    import ray

    nodes = [{key: float(value) for key, value in node["Resources"].items()
              if not key.startswith("node:") and key not in _BOOKKEEPING}
             for node in ray.nodes() if node.get("Alive")]
    return ClusterView(nodes, *autoscaler_node_types(autoscaling_config))


def check_resources(request: ResourceRequest, wait_s: float = 0.0, poll_s: float = 5.0,
                    view: Callable[[], ClusterView] = cluster_view,
                    ask_autoscaler: Callable[[list[dict[str, float]]], None] | None = None,
                    sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic) -> ClusterView:
    """Fail fast (`ResourceError`) when `request` can never be satisfied; wait for an autoscaler when
    only nodes it may still add can satisfy it (at most `wait_s` seconds, polling every `poll_s`).

    Returns the view it decided on. `ask_autoscaler(bundles)` asks for the nodes while waiting (default:
    `ray.autoscaler.sdk.request_resources`; the request is withdrawn when the wait ends); `sleep` and
    `clock` let a test run the wait without waiting.
    """
    current = view()
    reason = shortfall(request, current)
    if reason:
        raise ResourceError(_message(request, current, reason))
    if fits_on(request.bundles, current.nodes) or not current.node_types:
        return current
    ask = ask_autoscaler or _request_from_autoscaler
    waited_for = dict.fromkeys(name for bundle in request.bundles for name in node_types_for_bundle(bundle, current))
    # on the terminal too: a person waiting minutes for nodes sees what for
    log.info("resources: %s needs %s; waiting up to %.0f s for the autoscaler to add %s node(s) (%s)",
             request.what, request.describe(), wait_s, " / ".join(waited_for) or "more", current.describe(),
             extra=console.LINE)
    deadline = clock() + wait_s
    ask(list(request.bundles))
    try:
        while True:
            if fits_on(request.bundles, current.nodes):
                log.info("resources: %s fits now (%s)", request.what, current.describe())
                return current
            if clock() >= deadline:
                raise ResourceError(_message(request, current, f"the autoscaler did not add the nodes within "
                                             f"{wait_s:.0f} s (scaling.resource_wait_s)"))
            sleep(max(0.0, min(poll_s, deadline - clock())))
            current = view()
            reason = shortfall(request, current)
            if reason:
                raise ResourceError(_message(request, current, reason))
    finally:
        ask([])


def preflight(cfg, *requests: ResourceRequest) -> None:
    """`check_resources` for each request, waiting at most ``scaling.resource_wait_s`` for an autoscaler (none
    on the local Ray a command starts: a stale autoscaler config in the home folder must not make it wait)."""
    from orchestrator.ray_session import local_session

    autoscaling_config = None if local_session() else cfg.scaling.autoscaling_config
    for request in requests:
        check_resources(request, wait_s=cfg.scaling.resource_wait_s, view=lambda: cluster_view(autoscaling_config))


def _request_from_autoscaler(bundles: list[dict[str, float]]) -> None:
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as error:  # no autoscaler to ask: waiting still shows whether nodes come
        log.debug("request_resources failed: %s", error)


def _message(request: ResourceRequest, view: ClusterView, reason: str) -> str:
    text = (f"{request.what} asks for {request.describe()}: {reason}. The cluster has {view.describe()}.")
    if request.knobs:
        text += f" Lower {request.knobs}, or add nodes that have it."
    return text


def _holds(node: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(node.get(key, 0.0) + _EPSILON >= amount for key, amount in bundle.items() if amount > 0)


def _sum(items: Iterable[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for item in items:
        for key, value in item.items():
            if key not in _BOOKKEEPING and not key.startswith("node:"):
                total[key] = total.get(key, 0.0) + value
    return total


def _num(value: float) -> str:
    if math.isinf(value):
        return "set at launch"
    return str(int(value)) if math.isclose(value, round(value)) else f"{value:g}"


def _fmt(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if k not in _BOOKKEEPING and not k.startswith("node:")}
    return "{" + ", ".join(f"{key}: {_num(value)}" for key, value in sorted(shown.items())) + "}"
