"""SIGTERM / SIGINT stop the Ray work cleanly: exit 143 / 130, one line saying what was kept and how to
resume, and no Ray process of ours left behind. `hadpo` runs as a user runs it: a subprocess. SIGTERM is
sent during an evaluation, SIGINT (Ctrl-C) during training, where Ray Train would otherwise handle it; the
two commands run at the same time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from scripts.local_cluster import wait_exited

ROOT = Path(__file__).resolve().parents[2]


def start(tmp_path, *args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    process = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    return process, lines, reader


def wait_for(lines, words, process, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(words in line for line in lines):
            return
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"never saw {words!r}:\n" + "".join(lines[-40:]))


def config_file(tmp_path, extra: str = ""):
    path = tmp_path / "c.yaml"
    # POPE in 32 one-image blocks (576 questions, ~1 s of answering): the evaluation is still answering when the
    # signal comes (8 blocks were answered ~0.2 s after the first progress line, about when the signal came)
    path.write_text(f"name: sig\noutput_root: {tmp_path / 'runs'}\n"
                    "data: {synthetic: {num_images: 12, num_pope_images: 32, image_size: 48, milebench_tasks: 0}}\n"
                    "eval: {batch_size: 4, prefix_images: 1, cpus_per_actor: 0.5}\n" + extra)
    return path


@dataclass
class Stopped:
    """A `hadpo` command stopped by a signal: its folder, its terminal lines, exit code and Ray processes."""

    folder: Path
    lines: list[str]
    code: int | None  # None: still running 60 s after the signal (then killed)
    left_alive: list  # (pid, command line) of its Ray processes still running 30 s after it exited

    @property
    def output(self) -> str:
        return "".join(self.lines)


def run_and_stop(folder: Path, command: str, extra: str, words: str, signum: int, timeout: float) -> Stopped:
    """`hadpo <command>` of a small config in `folder`; once it prints `words`, `signum`; then wait."""
    folder.mkdir()
    process, lines, reader = start(folder, command, str(config_file(folder, extra)))
    wait_for(lines, words, process, timeout=timeout)
    ours = psutil.Process(process.pid).children(recursive=True)
    assert ours, "Ray started no processes?"
    process.send_signal(signum)
    try:
        code = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        process.kill()
    reader.join(timeout=10)
    alive = wait_exited(ours, timeout_s=30)
    return Stopped(folder, lines, code, [(p.pid, p.cmdline()[:3]) for p in alive])


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> dict[str, Stopped]:
    """SIGTERM during an evaluation and SIGINT (Ctrl-C) during training, both commands running at once (each
    mostly waits for its own Ray to start)."""
    root = tmp_path_factory.mktemp("signals")
    # training: a progress line every step, so the first says the workers are training (by default the 10th
    # step's is the first)
    runs = {"SIGTERM": (root / "term", "eval", "", "eval [inference]", signal.SIGTERM, 240),
            "SIGINT": (root / "int", "train", "train: {epochs: 300, log_every_steps: 1}\n", "[dpo] step",
                       signal.SIGINT, 300)}
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        futures = {name: pool.submit(run_and_stop, *args) for name, args in runs.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.slow
def test_sigterm_during_an_evaluation_stops_ray_says_what_was_kept_and_leaves_no_ray_process(stopped):
    run = stopped["SIGTERM"]
    assert run.code == 143, run.output[-3000:]
    assert "Traceback" not in run.output and "SIGTERM received" not in run.output, run.output[-3000:]
    (line,) = [line for line in run.lines if line.startswith("interrupted by ")]
    assert f"interrupted by SIGTERM: Ray work stopped; kept under {run.folder / 'runs' / 'sig'}" in line
    assert "answers of evaluation" in line and "Run the same command again to resume: hadpo eval" in line
    assert not run.left_alive, run.left_alive


@pytest.mark.slow
def test_ctrl_c_during_training_is_the_boundarys_not_ray_trains(stopped):
    """Ray Train puts its own Ctrl-C handler in at `fit` (abort, then exit 0 or 1 with nothing said); under
    `hadpo` the boundary keeps it: exit 130 and the line that says what was kept and how to resume."""
    run = stopped["SIGINT"]
    assert run.code == 130, run.output[-3000:]
    assert "Traceback" not in run.output, run.output[-3000:]
    (line,) = [line for line in run.lines if line.startswith("interrupted by ")]
    assert f"interrupted by SIGINT: Ray work stopped; kept under {run.folder / 'runs' / 'sig'}" in line
    assert "Run the same command again to resume: hadpo train" in line
    # Ray Train's placement-group cleaner asks a state API the local Ray does not serve: not started, no
    # warning a second in the run's log
    assert "Failed to query Ray Train Controller" not in (run.folder / "runs" / "sig" / "logs" / "hadpo.log").read_text()
    assert not run.left_alive, run.left_alive
