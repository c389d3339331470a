"""cluster.yaml's node types on Ray's local autoscaler: rehearse the cluster path on one machine.

    python scripts/local_cluster.py config [--cluster-yaml cluster.yaml]    # print the derived config
    python scripts/local_cluster.py up --dir /tmp/hc1 [--idle-timeout-minutes 0.5]
    python scripts/local_cluster.py reclaim --dir /tmp/hc1 [NODE_ID]         # a worker node dies
    python scripts/local_cluster.py down --dir /tmp/hc1

`up` derives the autoscaling config from cluster.yaml (`orchestrator.cluster.local_autoscaling_config`:
same worker node types, min_workers 0, GPUs replaced by the custom resource `gpu_stand_in`), writes it to
`<dir>/autoscaling.yaml` and starts `RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...` with
token authentication on: the token comes from RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN when set, otherwise a new
one is written to `<dir>/auth_token` (mode 600; never into the repository). Ports are free ones, so the
cluster does not collide with another Ray on the machine. The autoscaler then starts "nodes" (local raylets)
when work asks for resources only a worker node type has, and stops them after the idle timeout. It prints
the environment a client needs (RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH). The provider is Ray's fake
multi-node provider with one addition (reclaimable_provider.py): `reclaim` makes it take a node away as a
cloud reclaims an instance. `down` stops every process of that cluster and nothing else (`ray stop` would
stop every Ray on the machine).

What the rehearsal cannot show (no cloud here): instance start-up and setup_commands, the EFS mount, the AWS
provider itself (quotas, capacity, how it reports a reclaimed spot instance), SSH, real GPUs and NCCL.
tests/cluster/test_autoscaling.py uses it; README's cluster walk-through says what it covers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from orchestrator.cluster import local_autoscaling_config, load_cluster_yaml  # noqa: E402
from orchestrator.files import atomic_write  # noqa: E402

BIN = Path(sys.executable).parent
# Ray appends "/session_<date>_<time>_<pid>/sockets/plasma_store" (~62 bytes) to its temp dir, and a Unix
# socket path may not exceed 107 bytes.
MAX_TEMP_DIR = 107 - 64
STATE_FILE = "cluster.json"
RECLAIM_DIR = "reclaim"
# Set to the cluster's folder in the environment its head starts with; every process of the cluster inherits
# it (nodes, workers, job drivers), and `down` stops exactly those.
MARKER = "HADPO_LOCAL_CLUSTER"
# The fake provider's fixed node id of the head (its workers count up from ...00001).
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"


@dataclass
class LocalCluster:
    """A running local autoscaling cluster: where it lives, how to reach it, the token file."""

    dir: str
    gcs_address: str
    dashboard_url: str
    token_path: str
    config_path: str

    def client_env(self) -> dict[str, str]:
        """An environment for `ray job submit` / `ray status` / `ray.init` against this cluster, with the token."""
        env = dict(os.environ)
        env.pop("RAY_AUTH_TOKEN", None)
        env.update(RAY_ADDRESS=self.dashboard_url, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=self.token_path,
                   PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
        return env

    def ray(self, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a `ray` CLI command as a client of this cluster."""
        return subprocess.run([str(BIN / "ray"), *args], env=env or self.client_env(), capture_output=True,
                              text=True, timeout=timeout)

    def api(self, path: str, timeout: float = 60):
        """GET `path` of the dashboard's REST API with the token, as JSON, or None for 404. Cheaper than the
        `ray` CLI (which starts a Python process importing Ray): the test polls with it while a job runs."""
        request = urllib.request.Request(f"{self.dashboard_url}{path}", headers={
            "Authorization": f"Bearer {Path(self.token_path).read_text().strip()}"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise

    def job_status(self, submission_id: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED (the Jobs API); UNKNOWN for a job it does not know."""
        job = self.api(f"/api/jobs/{submission_id}")
        return job["status"] if job else "UNKNOWN"

    def submit(self, *args: str, wait_for_agent_s: float = 180, timeout: float = 600) -> subprocess.CompletedProcess:
        """`ray job submit ARGS`, again while the head's job agent is not up yet (it comes after `ray start`)."""
        deadline = time.time() + wait_for_agent_s
        while True:
            submitted = self.ray("job", "submit", *args, timeout=timeout)
            if "No available agent" not in submitted.stdout + submitted.stderr or time.time() > deadline:
                return submitted
            time.sleep(3)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def short_dir(preferred: Path):
    """`preferred`, or, when it is too long for Ray's sockets, a short folder in /tmp removed afterwards."""
    if len(str(Path(preferred).resolve() / "ray")) <= MAX_TEMP_DIR:
        yield Path(preferred)
        return
    fallback = Path(tempfile.mkdtemp(prefix="hc", dir="/tmp"))
    try:
        yield fallback
    finally:
        shutil.rmtree(fallback, ignore_errors=True)


def derived_config(cluster_yaml: Path, gcs_address: str, idle_timeout_minutes: float | None) -> dict:
    return local_autoscaling_config(load_cluster_yaml(cluster_yaml), gcs_address=gcs_address,
                                    idle_timeout_minutes=idle_timeout_minutes)


def _token_file(directory: Path) -> Path:
    """The token the cluster runs with: the caller's RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN, else a new one."""
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser().resolve()
        if not path.is_file() or not path.read_text().strip():
            raise SystemExit(f"RAY_AUTH_TOKEN_PATH={path}: no token in that file")
        return path
    path = directory / "auth_token"
    token = os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token)
    return path


def up(directory: str | Path, cluster_yaml: str | Path = ROOT / "cluster.yaml", *,
       idle_timeout_minutes: float | None = None, timeout_s: float = 300, attempts: int = 3) -> LocalCluster:
    """Start the fake autoscaling head for `cluster_yaml` with its state in `directory` (created; short path).

    On a loaded machine `ray start` can give up waiting for its own raylet (Ray allows it 30 s): the head is
    then stopped and started again, on new ports, up to `attempts` times.
    """
    directory = Path(directory).resolve()
    if directory == ROOT or ROOT in directory.parents:
        raise SystemExit(f"{directory}: inside the repository; the cluster's token and logs must live elsewhere")
    temp_dir = directory / "ray"
    if len(str(temp_dir)) > MAX_TEMP_DIR:
        raise SystemExit(f"{directory}: too long for Ray's Unix sockets; use a path of at most "
                         f"{MAX_TEMP_DIR - len('/ray')} characters, e.g. /tmp/hc1")
    directory.mkdir(parents=True, exist_ok=True)
    token_path = _token_file(directory)
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token_path), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    # Every node's raylet waits for its dashboard agent (30 s) and for each worker process (60 s) to register,
    # and dies when they do not: on a busy machine starting Python processes takes longer than that.
    env.setdefault("RAY_agent_register_timeout_ms", "300000")
    env.setdefault("RAY_worker_register_timeout_seconds", "300")
    # A reclaimed node's raylet is gone at once, but the GCS declares the node dead (and Ray Train restarts its
    # workers) only after 5 failed health checks, by default one every 3 s: 15 s. A check of a dead raylet fails
    # at once (connection refused), one of a live but busy raylet only after its timeout (10 s, unchanged), so
    # checking every second finds a dead node in ~5 s without declaring a slow one dead any sooner.
    env.setdefault("RAY_health_check_period_ms", "1000")
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(name, None)
    # The nodes and the jobs' drivers inherit this environment. The code must reach them through the job's
    # working_dir: PYTHONPATH holds only this folder, for the autoscaler to import the provider.
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent)
    env[MARKER] = str(directory)  # every process of this cluster carries it, so `down` finds them all
    import ray.util

    ip = ray.util.get_node_ip_address()
    for attempt in range(1, attempts + 1):
        port, dashboard, agent, client = free_port(), free_port(), free_port(), free_port()
        config = derived_config(Path(cluster_yaml), f"{ip}:{port}", idle_timeout_minutes)
        # foreground_node_launch: the autoscaler launches in its update loop, not on a thread. The fake provider
        # starts a node's processes while it holds its lock, seconds on a loaded machine; an update that listed
        # the nodes while a background launch was under way counted the launch neither as a node nor, once it
        # had finished, as pending, and launched one more (then removed it: "max_workers_per_type").
        config["provider"].update(type="external", module="reclaimable_provider.ReclaimableFakeProvider",
                                  reclaim_dir=str(directory / RECLAIM_DIR), foreground_node_launch=True)
        (directory / RECLAIM_DIR).mkdir(exist_ok=True)
        config_path = directory / "autoscaling.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        head = config["available_node_types"][config["head_node_type"]]["resources"]
        command = [str(BIN / "ray"), "start", "--head", f"--port={port}", f"--num-cpus={int(head['CPU'])}",
                   "--num-gpus=0", f"--object-store-memory={100 * 1024**2}", f"--temp-dir={temp_dir}",
                   "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                   f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
                   f"--autoscaling-config={config_path}", "--disable-usage-stats"]
        # Every process of the cluster finds it by RAY_ADDRESS, not as Ray's "latest cluster" (the last one any user
        # started on this machine, or none when several run): Ray Train's placement-group cleaner asks that cluster
        # whether the run's controller lives, and removes the run's placement group when it does not know it.
        started = subprocess.run(command, env={**env, "RAY_ADDRESS": f"{ip}:{port}"}, capture_output=True, text=True,
                                 timeout=timeout_s)
        if started.returncode == 0:
            break
        down(directory)
        output = started.stdout[-3000:] + started.stderr[-3000:]
        if "timed out during startup" not in output or attempt == attempts:
            raise RuntimeError(f"`{shlex.join(command)}` failed:\n{output}")
        print(f"ray start timed out on this loaded machine (attempt {attempt} of {attempts}); again", file=sys.stderr)
    cluster = LocalCluster(str(directory), f"{ip}:{port}", f"http://127.0.0.1:{dashboard}", str(token_path),
                           str(config_path))
    (directory / STATE_FILE).write_text(json.dumps(asdict(cluster), indent=2))
    return cluster


def load(directory: str | Path) -> LocalCluster:
    state = Path(directory).resolve() / STATE_FILE
    if not state.is_file():
        raise SystemExit(f"{state}: no local cluster was started there")
    return LocalCluster(**json.loads(state.read_text()))


def processes_of(directory: str | Path) -> list:
    """Processes of the cluster in `directory`: those whose environment carries its marker (`MARKER`, set in
    the environment the head starts with, which its nodes, workers and job drivers inherit). A command-line
    match would also catch the shell that runs `down --dir ...`."""
    import psutil

    directory = str(Path(directory).resolve())
    spared = {os.getpid(), *(parent.pid for parent in psutil.Process().parents())}
    found = []
    for process in psutil.process_iter():
        if process.pid in spared:
            continue
        try:
            if process.environ().get(MARKER) == directory:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def down(directory: str | Path, timeout_s: float = 10) -> int:
    """Stop every process of the cluster in `directory` (and nothing else); return how many there were.

    In the order `ray stop` uses: the raylets, then the other processes (workers, agents, dashboard, autoscaler),
    the GCS last, each group SIGKILLed after `timeout_s`. Sent SIGTERM all at once, the raylets and the
    autoscaler hang in their shutdown calls to a GCS that is going too, and every `down` waited the whole
    `timeout_s` for the SIGKILL (10 s; in order it takes under a second).
    """
    import psutil

    stopped: set[int] = set()
    groups = (lambda name: name == "raylet", lambda name: name not in ("raylet", "gcs_server"), lambda name: True)
    for in_group in groups:
        group = [process for process in processes_of(directory)
                 if process.pid not in stopped and in_group(_process_name(process))]
        for process in group:
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                pass
        for process in wait_exited(group, timeout_s):
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        stopped.update(process.pid for process in group)
    return len(stopped)


def wait_exited(processes: list, timeout_s: float) -> list:
    """Wait up to `timeout_s` for `processes` (psutil) to exit; return those still running.

    A process that exited after its parent stays a zombie until init collects it, and psutil.wait_procs counts
    a zombie as running: waiting with it took ~2 s for each group `down` stops, 6 s in all; this takes 0.6 s.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        running = [process for process in processes if not _exited(process)]
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(0.05)


def _exited(process) -> bool:
    import psutil

    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _process_name(process) -> str:
    """The executable's name ("raylet", "gcs_server", "python"...), "" for a process already gone."""
    import psutil

    try:
        return process.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def reclaim_node(cluster: LocalCluster, node_id: str, timeout_s: float = 120) -> None:
    """Take one autoscaler-launched node away as a cloud reclaims an instance (reclaimable_provider.py): its
    processes are killed at once and the provider stops listing it; the autoscaler launches a replacement
    if work still asks for one. Returns once the provider has done it."""
    request = Path(cluster.dir) / RECLAIM_DIR / node_id
    request.touch()
    wait_for(lambda: not request.exists(), timeout_s, f"the provider did not reclaim node {node_id}", poll_s=0.5)


def launched_node_ids(cluster: LocalCluster) -> list[str]:
    """Ids of the nodes the autoscaler launched that are running now (their raylets' command lines)."""
    ids = set()
    for process in processes_of(cluster.dir):
        try:
            line = " ".join(process.cmdline())
        except Exception:
            continue
        if "raylet" in line and "--node_id=" in line:
            node_id = line.split("--node_id=", 1)[1].split()[0]
            if node_id != FAKE_HEAD_NODE_ID:
                ids.add(node_id)
    return sorted(ids)


def worker_nodes(cluster: LocalCluster) -> dict[str, int]:
    """Active worker nodes per node type, as the autoscaler reports them: the text `ray status` prints, read
    from the dashboard (``/api/cluster_status?format=1``, the same record in Ray's GCS)."""
    status = cluster.api("/api/cluster_status?format=1")
    text = ((status or {}).get("data") or {}).get("clusterStatus")
    if not text:
        raise RuntimeError(f"no autoscaler status from the dashboard: {status}")
    return parse_active_nodes(text, exclude=(load_config(cluster)["head_node_type"],))


def state(cluster: LocalCluster, *args: str, attempts: int = 3) -> list[dict]:
    """`ray list ARGS --format json` (Ray's state API through the dashboard), again when a busy dashboard does
    not answer in time."""
    for attempt in range(1, attempts + 1):
        listed = cluster.ray("list", *args, "--format", "json", "--limit", "10000", "--timeout", "120", timeout=300)
        if listed.returncode == 0:
            return json.loads(listed.stdout)
        if attempt == attempts:
            raise RuntimeError(f"ray list {' '.join(args)} failed:\n{listed.stdout[-2000:]}{listed.stderr[-2000:]}")
        time.sleep(5)
    return []


def autoscaler_events(cluster: LocalCluster) -> list[str]:
    """The autoscaler's own events, oldest first: "Adding 2 node(s) of type ...", "Removing ... (idle)".

    Read from the event log the autoscaler writes on the head (what `ray list cluster-events` serves; in Ray
    2.60 that listing fails with a TypeError once events of other sources, with numeric timestamps, join).
    """
    path = Path(cluster.dir) / "ray" / "session_latest" / "logs" / "events" / "event_AUTOSCALER.log"
    if not path.is_file():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e["message"] for e in sorted(events, key=lambda e: int(e.get("timestamp", 0)))]


def load_config(cluster: LocalCluster) -> dict:
    return yaml.safe_load(Path(cluster.config_path).read_text())


def set_idle_timeout(cluster: LocalCluster, minutes: float) -> None:
    """Change the running cluster's idle timeout: the autoscaler reads its config file again at every update
    (AUTOSCALER_UPDATE_INTERVAL_S, 1 s here) and removes a node once it has been idle that long."""
    config = load_config(cluster)
    config["idle_timeout_minutes"] = minutes
    atomic_write(cluster.config_path, lambda path: path.write_text(yaml.safe_dump(config, sort_keys=False)))


def parse_active_nodes(status_text: str, exclude: tuple[str, ...] = ()) -> dict[str, int]:
    """{node type: count} from the "Active:" block of `ray status` (lines like " 2 gpu.a100x8")."""
    counts: dict[str, int] = {}
    lines = status_text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Active:")
    except StopIteration:
        raise ValueError(f"no 'Active:' block in ray status output:\n{status_text[:2000]}") from None
    for line in lines[start + 1:]:
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            break
        if parts[1] not in exclude:
            counts[parts[1]] = counts.get(parts[1], 0) + int(parts[0])
    return counts


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 2.0):
    """Poll `predicate()` until it returns something truthy; fail with `what` after `timeout_s`."""
    deadline = time.time() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise TimeoutError(f"after {timeout_s:.0f} s: {what}")
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("config", help="print the autoscaling config derived from cluster.yaml")
    start = commands.add_parser("up", help="start the local autoscaling head")
    stop = commands.add_parser("down", help="stop every process of the local cluster")
    for sub in (show, start):
        sub.add_argument("--cluster-yaml", default=str(ROOT / "cluster.yaml"))
        sub.add_argument("--idle-timeout-minutes", type=float, help="default: cluster.yaml's")
    for sub in (start, stop):
        sub.add_argument("--dir", required=True, help="short folder outside the repository, e.g. /tmp/hc1")
    reclaim = commands.add_parser("reclaim", help="take a worker node away, as a cloud reclaims an instance")
    reclaim.add_argument("--dir", required=True)
    reclaim.add_argument("node_id", nargs="?", help="default: the first running worker node")
    args = parser.parse_args(argv)
    if args.command == "config":
        print(yaml.safe_dump(derived_config(Path(args.cluster_yaml), "<head-ip>:<port>", args.idle_timeout_minutes),
                             sort_keys=False), end="")
    elif args.command == "up":
        cluster = up(args.dir, args.cluster_yaml, idle_timeout_minutes=args.idle_timeout_minutes)
        print(f"local autoscaling cluster up; config {cluster.config_path}\n"
              f"export RAY_ADDRESS={cluster.dashboard_url} RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={cluster.token_path}\n"
              f"then: ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/run.py "
              f"--config CONFIG   (stop it with: python scripts/local_cluster.py down --dir {cluster.dir})")
    elif args.command == "reclaim":
        cluster = load(args.dir)
        nodes = [args.node_id] if args.node_id else launched_node_ids(cluster)[:1]
        if not nodes:
            raise SystemExit("no worker node is running")
        reclaim_node(cluster, nodes[0])
        print(f"reclaimed node {nodes[0]}")
    else:
        print(f"stopped {down(args.dir)} process(es)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
