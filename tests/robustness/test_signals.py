"""SIGTERM / SIGINT stop the Ray work cleanly: exit 143 / 130, one line saying what was kept and how to
resume, and no Ray process of ours left behind. `hadpo` runs as a user runs it: a subprocess. SIGTERM is
sent during an evaluation, SIGINT (Ctrl-C) during training, where Ray Train would otherwise handle it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

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
    # POPE in 8 one-image blocks: the evaluation is still answering when the signal comes
    path.write_text(f"name: sig\noutput_root: {tmp_path / 'runs'}\n"
                    "data: {synthetic: {num_images: 12, num_pope_images: 8, image_size: 48, milebench_tasks: 0}}\n"
                    "eval: {batch_size: 4, prefix_images: 1, cpus_per_actor: 0.5}\n" + extra)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143)], ids=["SIGTERM"])  # SIGINT: in training, below
def test_a_signal_stops_ray_says_what_was_kept_and_leaves_no_ray_process(tmp_path, signum, code):
    process, lines, reader = start(tmp_path, "eval", str(config_file(tmp_path)))
    wait_for(lines, "eval [inference]", process, timeout=240)  # Ray is up and answers are being written
    ours = psutil.Process(process.pid).children(recursive=True)
    assert ours, "Ray started no processes?"
    process.send_signal(signum)
    try:
        assert process.wait(timeout=60) == code, "".join(lines[-40:])
    finally:
        process.kill()
    reader.join(timeout=10)
    output = "".join(lines)
    assert "Traceback" not in output and "SIGTERM received" not in output, output[-3000:]
    (line,) = [line for line in lines if line.startswith("interrupted by ")]
    assert f"interrupted by {signal.Signals(signum).name}: Ray work stopped; kept under {tmp_path / 'runs' / 'sig'}" \
        in line
    assert "answers of evaluation" in line and f"Run the same command again to resume: hadpo eval" in line
    gone, alive = psutil.wait_procs(ours, timeout=30)
    assert not alive, [(p.pid, p.cmdline()[:3]) for p in alive if p.is_running()]


@pytest.mark.slow
def test_ctrl_c_during_training_is_the_boundarys_not_ray_trains(tmp_path):
    """Ray Train puts its own Ctrl-C handler in at `fit` (abort, then exit 0 or 1 with nothing said); under
    `hadpo` the boundary keeps it: exit 130 and the line that says what was kept and how to resume."""
    # a progress line every step: the first says the workers are training (by default the 10th step's is the first)
    config = config_file(tmp_path, "train: {epochs: 300, log_every_steps: 1}\n")
    process, lines, reader = start(tmp_path, "train", str(config))
    wait_for(lines, "[dpo] step", process, timeout=300)  # the workers are training
    ours = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGINT)
    try:
        assert process.wait(timeout=60) == 130, "".join(lines[-40:])
    finally:
        process.kill()
    reader.join(timeout=10)
    output = "".join(lines)
    assert "Traceback" not in output, output[-3000:]
    (line,) = [line for line in lines if line.startswith("interrupted by ")]
    assert f"interrupted by SIGINT: Ray work stopped; kept under {tmp_path / 'runs' / 'sig'}" in line
    assert "Run the same command again to resume: hadpo train" in line
    # Ray Train's placement-group cleaner asks a state API the local Ray does not serve: not started, no
    # warning a second in the run's log
    assert "Failed to query Ray Train Controller" not in (tmp_path / "runs" / "sig" / "logs" / "hadpo.log").read_text()
    gone, alive = psutil.wait_procs(ours, timeout=30)
    assert not alive, [(p.pid, p.cmdline()[:3]) for p in alive if p.is_running()]
