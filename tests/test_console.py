"""The terminal shows the stages, their progress, warnings and results; the run's log file everything else.

Pure tests of the routing rules, then `hadpo` run as a user runs it (a subprocess joining the suite's Ray).
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from orchestrator import console
from orchestrator.console import (Console, ConsoleHandler, adopt_library_loggers, console_kind, log_worker_lines,
                                  parse_marked, status_line)
from tests.commands import hadpo

ROOT = Path(__file__).resolve().parents[1]


def record(name: str, level: int, message: str, **extra) -> logging.LogRecord:
    made = logging.getLogger(name).makeRecord(name, level, "x.py", 1, message, None, None)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def test_our_warnings_marked_lines_and_lines_with_an_eta_reach_the_terminal_other_info_does_not():
    assert console_kind(record("hadpo.pipeline", logging.INFO, "stage data: done in 3 s", console="line")) == "line"
    assert console_kind(record("hadpo.pipeline", logging.INFO, "stage data: running", console="stage")) == "stage"
    assert console_kind(record("orchestrator.eval.runner", logging.INFO,
                               "eval [inference] r: 32/64 (50%), 3.2 items/s, ETA 0m10s, 0 errors")) == "progress"
    assert console_kind(record("hadpo.train", logging.INFO, "[sft] step 10/80 | loss 0.4 | ETA 00:01:10")) == "progress"
    assert console_kind(record("orchestrator.eval.runner", logging.WARNING, "3 answers failed")) == "line"
    assert console_kind(record("orchestrator.ray_session", logging.INFO, "Ray resources: {}")) is None
    assert console_kind(record("hadpo.train", logging.INFO, "setup 6.6s: model 3.0s")) is None
    assert console_kind(record("hadpo.train", logging.DEBUG, "x", console="line")) is None
    # "ETAs" or "BETA" are not an ETA
    assert console_kind(record("hadpo.train", logging.INFO, "BETA 0.1, ETAs unknown")) is None


def test_libraries_records_go_to_the_file_unless_there_is_none_or_verbose():
    ray_warning = record("ray.data._internal.progress", logging.WARNING, "Progress bars disabled")
    assert console_kind(ray_warning) is None
    assert console_kind(ray_warning, has_log_file=False) == "line"  # nothing hidden without a file to hide it in
    assert console_kind(record("ray.data", logging.INFO, "Running Dataset"), has_log_file=False) is None
    assert console_kind(record("ray.data", logging.INFO, "Running Dataset"), verbose=True) == "line"
    assert console_kind(record("worker_output", logging.INFO, "TrainingReport(...)"), verbose=True) == "line"


class Screen(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def show(handler: ConsoleHandler, *records: logging.LogRecord) -> None:
    for made in records:
        handler.handle(made)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_off_a_terminal_progress_lines_are_plain_at_most_one_per_source_per_interval_and_none_early(monkeypatch):
    screen = Screen(tty=False)
    monkeypatch.setattr(sys, "stderr", screen)
    clock = Clock()
    handler = ConsoleHandler(interval_s=10, clock=clock)

    def at(seconds: float, made: logging.LogRecord) -> None:
        clock.now = seconds
        handler.handle(made)

    at(100, record("hadpo.pipeline", logging.INFO, "stage warmup: running", console="stage"))
    at(101, record("hadpo.train", logging.INFO, "[sft] step 1/30 | ETA 00:09:00"))     # the stage's first seconds
    at(111, record("hadpo.train", logging.INFO, "[sft] step 10/30 | ETA 00:00:20"))
    at(115, record("hadpo.train", logging.INFO, "[sft] step 20/30 | ETA 00:00:10"))    # same source: held back
    at(115, record("orchestrator.eval.runner", logging.INFO, "eval [inference] r: 1/2 (50%), ETA 0m01s"))
    at(116, record("hadpo.train", logging.WARNING, "reference cache lacks 2 rows"))
    at(130, record("hadpo.pipeline", logging.INFO, "stage warmup: done in 30 s (loss 0.2)", console="line"))
    at(131, record("hadpo.pipeline", logging.INFO, "stage dpo: running", console="stage"))
    at(135, record("hadpo.train", logging.INFO, "[dpo] step 1/9 | ETA 00:00:40"))       # a new stage: quiet again
    assert screen.getvalue().splitlines() == [
        "stage warmup: running", "[sft] step 10/30 | ETA 00:00:20", "eval [inference] r: 1/2 (50%), ETA 0m01s",
        "warning: reference cache lacks 2 rows", "stage warmup: done in 30 s (loss 0.2)", "stage dpo: running"]
    assert "\x1b" not in screen.getvalue() and "\r" not in screen.getvalue()


def test_on_a_terminal_the_running_stage_and_its_progress_are_one_line_rewritten_in_place(monkeypatch):
    screen = Screen(tty=True)
    monkeypatch.setattr(sys, "stderr", screen)
    handler = ConsoleHandler()
    show(handler,
         record("hadpo.pipeline", logging.INFO, "stage warmup: running", console="stage"),
         record("hadpo.train", logging.INFO, "[sft] step 10/30 | ETA 00:00:20"),
         record("hadpo.train", logging.INFO, "[sft] step 20/30 | ETA 00:00:10"))
    assert screen.getvalue() == ("\r\x1b[Kstage warmup: running"
                                 "\r\x1b[Kstage warmup: running · [sft] step 10/30 | ETA 00:00:20"
                                 "\r\x1b[Kstage warmup: running · [sft] step 20/30 | ETA 00:00:10")
    screen.seek(0), screen.truncate()
    show(handler, record("hadpo.train", logging.WARNING, "slow"))  # the warning above, the status back below it
    assert screen.getvalue() == ("\r\x1b[K" "warning: slow\n" "\r\x1b[Kstage warmup: running · [sft] step 20/30 | ETA "
                                 "00:00:10")
    screen.seek(0), screen.truncate()
    show(handler, record("hadpo.pipeline", logging.INFO, "stage warmup: done in 30 s", console="line"))
    assert screen.getvalue() == "\r\x1b[Kstage warmup: done in 30 s\n"  # the stage's one line stays
    handler.end_status()
    assert screen.getvalue().endswith("done in 30 s\n")  # nothing left to clear


def test_a_status_line_too_wide_for_the_terminal_keeps_its_eta():
    progress = "[sft] step 10/800 | loss 4.4048 | lr 5.00e-04 | 195.73 samples/s | ETA 00:01:40"
    assert status_line("stage warmup: running", progress, 200) == f"stage warmup: running · {progress}"
    assert status_line("stage warmup: running", progress, 60) == \
        "stage warmup: running · [sft] step 10/800 | lo… ETA 00:01:40"
    assert len(status_line("stage warmup: running", progress, 60)) == 60
    assert status_line("stage data: running", "", 12) == "stage data:…"  # nothing to keep: cut at the end


def test_a_marked_worker_line_becomes_a_record_of_its_logger_and_anything_else_worker_output():
    formatter = console._MarkedFormatter("%(message)s")
    line = formatter.format(record("hadpo.train", logging.WARNING, "reference cache lacks 2 rows"))
    assert line == "[hadpo-log] WARNING hadpo.train: reference cache lacks 2 rows"
    assert parse_marked(line) == ("hadpo.train", logging.WARNING, "reference cache lacks 2 rows", None)
    marked = formatter.format(record("hadpo.pipeline", logging.INFO, "a\nb", console="line"))
    assert [parse_marked(part) for part in marked.splitlines()] == [("hadpo.pipeline", logging.INFO, "a", "line"),
                                                                   ("hadpo.pipeline", logging.INFO, "b", "line")]
    assert parse_marked("Reporting training result 1: TrainingReport(metrics={}) from rank 0") is None

    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, made):
            seen.append(made)

    keep = Keep(logging.DEBUG)
    root = logging.getLogger()
    level = root.level
    root.addHandler(keep), root.setLevel(logging.INFO)
    try:
        log_worker_lines({"pid": 42, "actor_name": "RayTrainWorker", "is_err": True, "lines": [
            "[hadpo-log] INFO hadpo.train: [sft] step 3/3 | loss 1.0 | ETA 00:00:00",
            "Reporting training result 3: TrainingReport(...) from rank 0",
            '{"__ray_tqdm_magic_token__": true, "x": 1}']})
        log_worker_lines({"pid": "autoscaler", "lines": ["======== Autoscaler status ========",
                                                         ":event_summary:Adding 1 node(s) of type gpu."]})
    finally:
        root.removeHandler(keep), root.setLevel(level)
    assert [(r.name, r.getMessage(), r.worker) for r in seen] == [
        ("hadpo.train", "[sft] step 3/3 | loss 1.0 | ETA 00:00:00", "RayTrainWorker pid=42"),
        ("worker_output", "Reporting training result 3: TrainingReport(...) from rank 0", "RayTrainWorker pid=42"),
        ("worker_output", "Adding 1 node(s) of type gpu.", "autoscaler")]


def test_a_librarys_own_terminal_handler_is_taken_over_and_its_file_handler_kept(tmp_path):
    library = logging.getLogger("somelib.data")
    terminal, session_file = logging.StreamHandler(io.StringIO()), logging.FileHandler(tmp_path / "session.log")
    library.addHandler(terminal), library.addHandler(session_file)
    library.propagate = False
    try:
        adopt_library_loggers()
        assert library.handlers == [session_file] and library.propagate
    finally:
        library.removeHandler(session_file), session_file.close()


def test_the_log_file_gets_everything_from_the_start_and_the_terminal_only_ours(tmp_path, monkeypatch):
    screen = Screen(tty=False)
    monkeypatch.setattr(sys, "stderr", screen)
    root_level = logging.getLogger().level
    session = Console().start(["run", "c.yaml"])
    try:
        logging.getLogger("hadpo.pipeline").info("before the file: on both", extra=console.LINE)
        logging.getLogger("orchestrator.ray_session").info("Ray resources: {'CPU': 2.0}")
        path = console.log_to_run_dir(tmp_path / "run")
        logging.getLogger("ray.data").info("Running Dataset: dataset_1")
        logging.getLogger("ray.data").warning("Progress bars disabled")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("pyarrow fell back to pickling", UserWarning)
        logging.getLogger("hadpo.pipeline").info("stage data: done in 1 s", extra=console.LINE)
    finally:
        session.close()
    assert path == tmp_path / "run" / "logs" / "hadpo.log"
    assert screen.getvalue().splitlines() == ["before the file: on both", "stage data: done in 1 s"]
    logged = path.read_text()
    assert "hadpo run c.yaml" in logged  # the command's header
    for text in ["INFO hadpo.pipeline: before the file: on both", "INFO orchestrator.ray_session: Ray resources",
                 "INFO ray.data: Running Dataset", "WARNING ray.data: Progress bars disabled",
                 "WARNING py.warnings:", "pyarrow fell back to pickling", "stage data: done in 1 s"]:
        assert text in logged, text
    assert logging.getLogger().level == root_level and console.active() is None
    assert not any(isinstance(h, ConsoleHandler) or str(tmp_path) in str(getattr(h, "baseFilename", ""))
                   for h in logging.getLogger().handlers)


# ----------------------------------------------------------------------------------------------
# The process's own stderr, and libraries that print while being imported


def test_in_a_process_of_its_own_what_is_written_below_logging_goes_to_the_log_file(tmp_path):
    """Without -v the process's stderr descriptor (Ray's C++ log lines, tqdm bars) goes to the log file; the
    console keeps the terminal, and the error boundary's last message reaches it again."""
    script = f"""
import logging, os, sys
from orchestrator import console
session = console.Console().start(["run", "c.yaml"])
console.log_to_run_dir({str(tmp_path / 'run')!r})
logging.getLogger("hadpo.pipeline").info("stage data: running", extra=console.STAGE)
os.write(2, b"[2026-12-02 01:23:34,851 E 1 1] core_worker.cc:2465: Actor with class name\\n")
sys.stderr.write("Writing model shards: 100%|##########| 1/1\\n")
logging.getLogger("hadpo.pipeline").info("stage data: done in 1 s", extra=console.LINE)
console.release_terminal()
print("error: the last word", file=sys.stderr, flush=True)
session.close()
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["stage data: running", "stage data: done in 1 s", "error: the last word"]
    logged = (tmp_path / "run" / "logs" / "hadpo.log").read_text()
    assert "core_worker.cc:2465" in logged and "Writing model shards" in logged and "stage data: done" in logged


def test_a_library_that_prints_while_imported_prints_into_the_log_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "noisy_library.py").write_text(
        "import logging, sys\n"
        "logger = logging.getLogger('NoisyLibrary')\n"
        "logger.propagate = False\n"
        "logger.addHandler(logging.StreamHandler(sys.stdout))\n"
        "logger.warning('Setting accelerator to CPU')\n"
        "print('hello from import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    session = Console().start(["run"])
    try:
        path = console.log_to_run_dir(tmp_path / "run")
        console.import_quietly("noisy_library", "not_installed_anywhere")
        logging.getLogger("NoisyLibrary").warning("later: to the file as well")
    finally:
        session.close()
        sys.modules.pop("noisy_library", None)
    assert capsys.readouterr().out == ""
    logged = path.read_text()
    assert "Setting accelerator to CPU" in logged and "hello from import" in logged
    assert "WARNING NoisyLibrary: later: to the file as well" in logged
    assert not logging.getLogger("NoisyLibrary").handlers and logging.getLogger("NoisyLibrary").propagate


# ----------------------------------------------------------------------------------------------
# `hadpo` as a user runs it

# what the terminal showed before (issue 14) and the log file gets now
NOISE = ["TrainingReport(", "Failed to query Ray Train Controller", "core_worker.cc", "Writing model shards",
         "real_accelerator", "Running Dataset", "streaming_executor", "pid=", "FutureWarning", "DeprecationWarning",
         "Setting up process group", "\x1b[", "\r"]


def tiny_config(tmp_path: Path) -> Path:
    """A small pipeline config (what `data check` reads of it: the synthetic world)."""
    config = tmp_path / "c.yaml"
    config.write_text(f"""name: quiet
output_root: {tmp_path / 'runs'}
data:
  synthetic: {{num_images: 12, num_pope_images: 4, image_size: 48, milebench_tasks: 1, milebench_samples: 2}}
model:
  tiny: {{text_layers: 1, vision_layers: 1}}
train:
  max_steps: 2
  batch_size_per_worker: 4
  max_length: 256
  gradient_checkpointing: false
  checkpoint_every_steps: 2
  log_every_steps: 1
  lora: {{rank: 4, alpha: 8, dropout: 0.0}}
  deepspeed: {{enabled: false}}
  sft: {{max_steps: 3, train_vision: true, batch_size_per_worker: 4}}
scaling: {{num_workers: 1, cpus_per_worker: 0.5}}
eval: {{batch_size: 16, cpus_per_actor: 0.5, milebench_max_new_tokens: 4}}
tracking: []
""")
    return config


@pytest.mark.slow
def test_hadpo_run_shows_one_line_per_stage_and_its_progress_and_sends_the_rest_to_the_log_file(demo_run):
    # `hadpo run` of the demo at its smallest, joining the suite's Ray (conftest.demo_run, shared with
    # test_relative_output_root and test_pipeline)
    terminal = demo_run.terminal
    lines = terminal.splitlines()
    for stage in ["data", "warmup", "dpo"]:
        assert f"stage {stage}: running" in lines, (stage, terminal)
    # the evaluations come last, in one pass (one actor pool)
    assert "stage eval_baseline: running (with eval_hadpo: one pass)" in lines, terminal
    assert "stage eval_hadpo: running (with eval_baseline: one pass)" in lines, terminal
    for stage in ["data", "warmup", "dpo", "eval_baseline", "eval_hadpo"]:
        assert any(line.startswith(f"stage {stage}: done in ") for line in lines), (stage, terminal)
    assert any(line.startswith("stage data: done in ") and "usable" in line for line in lines)
    assert any(line.startswith("stage eval_baseline: done in ") and "POPE mean F1" in line for line in lines)
    assert "run record:" in terminal
    for noise in NOISE:
        assert noise not in terminal, (noise, terminal)
    logged = demo_run.log
    steps = demo_run.config["train"]["sft"]["max_steps"]
    assert "(RayTrainWorker pid=" in logged and f"[sft] step {steps}/{steps}" in logged  # where each line came from
    assert "TrainingReport(" in logged and "Running Dataset" in logged and "stage eval_hadpo: done in" in logged


@pytest.mark.slow
def test_verbose_brings_the_log_files_lines_back_to_the_terminal(ray_session, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    result = hadpo("-v", "data", "check", str(tiny_config(tmp_path)), ray_address=address)
    terminal = result.stdout + result.stderr
    assert result.returncode == 0, terminal[-3000:]
    assert "preference:" in terminal and "sample row:" in terminal
    assert "INFO ray.data" in terminal and "Running Dataset" in terminal
    assert "Connecting to existing Ray cluster" in terminal
