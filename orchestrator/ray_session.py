"""Starting (or joining) Ray for a run: temp dir inside the project, the config's runtime_env everywhere;
reading a dataset's blocks so that a failed pass gives its actors back (`iter_blocks`); and stopping it cleanly
on SIGTERM / SIGINT (`handle_stop_signals`)."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Callable, Iterator

from orchestrator import console
from orchestrator.config import ExperimentConfig

log = logging.getLogger(__name__)


def project_env_defaults(root: str | Path) -> dict[str, str]:
    """Process-level defaults that keep caches inside the project (set before Ray/DeepSpeed start)."""
    root = Path(root).resolve()
    return {
        "TORCH_EXTENSIONS_DIR": str(root / ".torch_extensions"),
        "WANDB_DIR": str(root),
        "RAY_TRAIN_V2_ENABLED": "1",
        # Ray Data's progress bars are useful in a terminal and noise in CI logs; both keep working.
        "RAY_DEDUP_LOGS": "1",
    }


# Ray appends "/session_<date>_<time>_<pid>/sockets/plasma_store" (~62 bytes) to its temp dir, and a
# Unix socket path may not exceed 107 bytes.
_MAX_TEMP_DIR = 107 - 64


def ray_temp_dir(output_root: Path) -> Path:
    """`<output_root>/.ray`, or a short folder in /tmp named after it when that path is too long."""
    preferred = output_root.resolve() / ".ray"
    if len(str(preferred)) <= _MAX_TEMP_DIR:
        chosen = preferred
    else:
        chosen = Path("/tmp") / f"hadpo-ray-{hashlib.sha1(str(preferred).encode()).hexdigest()[:10]}"
    chosen.mkdir(parents=True, exist_ok=True)
    return chosen


def init_ray(config: ExperimentConfig, address: str | None = None, num_cpus: int | None = None,
             num_gpus: int | None = None):
    """Connect to the cluster at `address` (or RAY_ADDRESS, read by Ray itself), else start a local one.

    A local Ray keeps its temp dir under the run's output root (short path: Unix socket paths are
    limited to ~107 bytes); every worker gets `config.runtime_env()`'s variables (on a local Ray by
    inheriting them).
    """
    import ray

    if ray.is_initialized():
        return ray
    # the run folder first: an output_root that cannot be written (read-only, under a file) fails here, in
    # one clear OSError, before any Ray process starts
    config.run_dir.mkdir(parents=True, exist_ok=True)
    if os.environ.get("HADPO_FORBID_RAY"):  # `make test-fast`: a test that starts Ray must be marked slow
        raise RuntimeError("HADPO_FORBID_RAY is set (make test-fast): this code path starts Ray; mark its test "
                           "@pytest.mark.slow")
    for key, value in project_env_defaults(Path(config.output_root)).items():
        os.environ.setdefault(key, value)
    if console.active():
        # a command's console: the libraries that give their loggers a terminal handler when imported (Ray
        # Data; DeepSpeed, which transformers imports on the driver) log to the run's log file from the start
        console.import_quietly("ray.data", "deepspeed")
    if address or os.environ.get("RAY_ADDRESS"):
        # Inside `ray job submit` the job's runtime_env is already set; merge per variable, the
        # experiment config's values winning (it is the one place that says what a run needs).
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        ray.init(address=address, runtime_env={**config.runtime_env(), **console.worker_runtime_env()},
                 log_to_driver=True, include_dashboard=False)
        _session["started"] = True
    else:
        temp_dir = ray_temp_dir(Path(config.output_root))
        # one machine, no autoscaler: no node is ever drained, so Ray Train's preemption watcher (one more actor
        # process per training run, polling for drains) has nothing to watch; the workers inherit this
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray keeps as many idle task workers as there are *unreserved* CPUs and kills the rest after 1 s: while
        # actors hold the CPUs (training workers, evaluation actors) that is none, and the next Ray Data
        # operation starts its task workers again (a process importing Ray Data, 1.5-4 s of CPU each). Keeping
        # one per CPU, reserved or not (what Ray keeps when nothing is reserved), a long-lived local Ray such as
        # the test suite's reuses them; one `hadpo demo` runs the same either way.
        idle_workers_kept = num_cpus or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                         else os.cpu_count() or 1)  # macOS has no affinity mask
        # The run's variables reach the workers through the environment the Ray processes started here
        # inherit, not a runtime_env: with one, Ray starts every worker through a setup process (one more
        # Python importing Ray, ~0.3 s before each worker and actor). Ray Train still gives its controller
        # and workers a runtime_env of its own (the RAY_TRAIN_* variables it propagates), so what this saves
        # is the evaluation actors' and Ray Data tasks' start. This process's own environment stays as it was.
        with _environment({**config.runtime_env()["env_vars"], **console.worker_env(), LOCAL_RAY_MARK: "1"}):
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, _temp_dir=str(temp_dir), log_to_driver=True,
                     include_dashboard=False, _system_config={"num_workers_soft_limit": idle_workers_kept})
        _session.update(local=True, started=True)
    if _stop_handling["on"]:
        _install_stop_handlers()  # Ray's core worker has just replaced SIGTERM's handler with an abort
    console.attach_ray()  # worker output and Ray's logs to the run's log file (outside a command: no change)
    log.info("Ray resources: %s", ray.cluster_resources())
    return ray


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """`values` in os.environ inside the block (processes started there inherit them), as before after it."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# local: the Ray this process started is a local one (`init_ray` without an address); started: `init_ray`
# started or joined a Ray in this process (not one that was up already), which `ray_released_after` stops
_session = {"local": False, "started": False}
# set in the environment the local Ray's processes inherit: its workers (a Tune trial's driver function,
# which starts that trial's training) know the Ray they run on is the local one too
LOCAL_RAY_MARK = "HADPO_LOCAL_RAY"


def local_session() -> bool:
    """Whether Ray runs as the local one `init_ray` started in this process, or this process is one of that
    Ray's workers: one machine, no autoscaler (an autoscaler config file lying in the home folder is not this
    Ray's), no dashboard and so no state API."""
    import ray

    return (_session["local"] or os.environ.get(LOCAL_RAY_MARK) == "1") and ray.is_initialized()


def state_api_served() -> bool:
    """Whether the Ray this driver runs on serves Ray's state API (its dashboard runs). Asked on a driver: in a
    worker Ray reports its default dashboard address whether a dashboard runs or not."""
    from ray._private.worker import get_dashboard_url

    try:
        return bool(get_dashboard_url())
    except Exception:  # noqa: BLE001 - a private API: when in doubt, leave Ray's behaviour as it is
        return True


def iter_blocks(dataset) -> Iterator:
    """The blocks of a Ray Data `dataset`, as pyarrow tables, in the order they finish. The caller hands the
    dataset over: it passes it without keeping a reference (`iter_blocks(ds.map_batches(...))`).

    When the pass fails (an actor's exception), the error is raised without the local frames it went through.
    Ray Data lets go of an actor pool that failed by dropping its handles, not by killing the actors, and
    Ray Data's frames in the traceback still reach them: while the exception lives (the caller keeps it; a
    notebook keeps the last one) the actors would keep their CPUs and GPUs, and the next pass in the same
    process (a resumed evaluation) would wait for them forever (ray-project/ray#24948). The error's own text
    keeps the remote traceback. The frames it goes through from here up hold no dataset either: a dataset keeps
    the executor of its last pass (to shut it down when the dataset goes), and that executor, shut down or not,
    can still hold the pool's last tasks, whose actor then lives as long as the frames do.
    """
    executors_before = _ray_data_executor_threads()
    try:
        yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")
        return
    except Exception as error:
        failure = error
    dataset = None  # noqa: F841 - this frame goes up with the error: it must not hold the failed pass
    chained, seen = failure, set()
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        chained.__traceback__ = None
        chained = chained.__cause__ or chained.__context__
    # Ray Data's shutdown gives the pass's scheduling thread 2 s to end; on a busy machine it runs longer and
    # holds the pool until it ends, after the collection below (then the actors kept their CPUs and the next
    # pass waited for them forever: seen twice in a day's test runs)
    for thread in _ray_data_executor_threads() - executors_before:
        thread.join(timeout=30)
    gc.collect()  # the pool's handles sit in reference cycles: collected now, the actors end now
    raise failure


def _ray_data_executor_threads() -> set[threading.Thread]:
    """The scheduling loops of Ray Data passes running in this process (each a thread named
    `StreamingExecutor-<dataset id>`, ray/data/_internal/execution/streaming_executor.py)."""
    return {thread for thread in threading.enumerate() if thread.name.startswith("StreamingExecutor-")}


# ----------------------------------------------------------------------------------------------
# Stopping on SIGTERM / SIGINT

_stop_handling: dict = {"on": False, "received": None}


def handle_stop_signals() -> Callable[[], None]:
    """From now on, SIGTERM and SIGINT raise KeyboardInterrupt in the main thread (remembering which).

    Ray's core worker installs, at `ray.init`, a SIGTERM handler that prints a native stack dump and
    aborts (exit 134), so `init_ray` installs these handlers again right after it. Whoever catches the
    KeyboardInterrupt (the CLI's error boundary) calls `stop_ray` and exits 128 + the signal number.
    Returns a function that puts the previous handlers back.
    """
    in_main = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
    _stop_handling.update(on=True, received=None)
    _install_stop_handlers()

    def restore() -> None:
        _stop_handling["on"] = False
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    return restore


def stop_signals_handled() -> bool:
    """Whether `handle_stop_signals` is in force (a `hadpo` command's boundary): Ctrl-C is ours to handle."""
    return bool(_stop_handling["on"])


def received_signal() -> int | None:
    """The stop signal that arrived last (None if none did)."""
    return _stop_handling["received"]


def _install_stop_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, frame):
        _stop_handling["received"] = signum
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)


def stop_ray() -> None:
    """Disconnect from Ray; a local Ray this process started shuts down with its workers."""
    import ray

    if ray.is_initialized():
        # a second signal during shutdown should not leave a half-stopped cluster: finish it first
        for signum in (signal.SIGTERM, signal.SIGINT):
            if threading.current_thread() is threading.main_thread():
                signal.signal(signum, signal.SIG_IGN)
        if _session["local"]:
            _kill_autoscaler_monitor()
        ray.shutdown()
    _session.update(local=False, started=False)


@contextlib.contextmanager
def ray_released_after():
    """Stop, when the block ends, the Ray that `init_ray` starts or joins inside it: a command's Ray goes when
    the command does, not in Ray's exit hook, which first sleeps half a second for late log lines. A Ray that
    was up before the block (the test suite's; the one a Tune trial's worker runs in) is left as it is."""
    up_before = _session["started"]
    try:
        yield
    except KeyboardInterrupt:
        raise  # a stop signal: the caller stops Ray and says what was kept
    except BaseException:
        if _session["started"] and not up_before:
            with contextlib.suppress(Exception):  # the error says what failed; Ray's exit hook still stops it
                stop_ray()
        raise
    if _session["started"] and not up_before:
        stop_ray()


def _kill_autoscaler_monitor() -> None:
    """Kill a local Ray's autoscaler monitor before `ray.shutdown`, which stops the GCS first and then sends
    the monitor SIGTERM: its handler reports the signal to the GCS, hangs on the stopped one, and Ray kills it
    a second later. A local Ray has no autoscaler config, so the monitor holds nothing to save."""
    try:
        from ray._private import ray_constants, worker

        monitors = worker._global_node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, [])
    except AttributeError:  # another Ray's internals (or no node): ray.shutdown's own way, a second slower
        return
    for monitor in monitors:
        monitor.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):  # not reaped yet: ray.shutdown waits for it as before
            monitor.process.wait(timeout=5)
