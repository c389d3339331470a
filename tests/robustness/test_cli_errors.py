"""Known failures print one line naming the thing, exit non-zero, and never show a traceback.

Run in-process through `orchestrator.cli.main` (the same boundary `hadpo` and `jobs/*.py` use); the
ones that must reach Ray run `hadpo` as a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from orchestrator.boundary import known_failure
from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[2]


def run_main(args, capsys):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.err


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_config_path_that_is_a_directory(tmp_path, capsys):
    code, err = run_main(["plan", str(tmp_path)], capsys)
    assert code == 2 and one_error_line(err) == f"error: {tmp_path}: is a directory, not a config file"


def test_a_config_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    code, err = run_main(["plan", str(path)], capsys)
    assert code == 2 and f"{path}: not UTF-8 text (byte 9" in one_error_line(err)


def test_a_malformed_set_value(tmp_path, capsys):
    code, err = run_main(["plan", "--set", "train.beta=[0.1", str(ROOT / "configs/demo.yaml")], capsys)
    line = one_error_line(err)
    assert code == 2 and "override 'train.beta=[0.1': the value is not valid YAML" in line


def test_report_on_a_missing_run(tmp_path, capsys):
    code, err = run_main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "out")], capsys)
    assert code == 1 and one_error_line(err) == f"error: {tmp_path / 'nope'}: run directory not found"


def test_report_on_a_corrupt_json_record(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "stages").mkdir(parents=True)
    (run / "run_record.json").write_text("{\"name\": ")
    code, err = run_main(["report", str(run), "--out", str(tmp_path / "out")], capsys)
    line = one_error_line(err)
    assert code == 1 and f"{run / 'run_record.json'}: not valid JSON" in line


def test_report_on_a_corrupt_metrics_parquet_keeps_the_answers(tmp_path, capsys):
    run = tmp_path / "run"
    folder = run / "eval" / "abc"
    (folder / "answers").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"run_id": "abc"}))
    (folder / "metrics.parquet").write_bytes(b"PAR1 this is not a parquet file")
    code, err = run_main(["report", str(run), "--out", str(tmp_path / "out")], capsys)
    line = one_error_line(err)
    assert code == 1 and str(folder / "metrics.parquet") in line
    assert (folder / "answers").is_dir()  # the boundary reports; it deletes nothing


def test_an_output_root_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    config = tmp_path / "c.yaml"
    config.write_text(f"name: x\noutput_root: {blocker / 'runs'}\n")
    ray_before = ray.is_initialized()  # the suite's shared Ray may be up already
    code, err = run_main(["data", "check", str(config)], capsys)
    line = one_error_line(err)
    assert code == 1 and "cannot use output_root" in line and str(blocker) in line and "Not a directory" in line
    assert ray.is_initialized() == ray_before  # it failed before starting any Ray process


def test_a_read_only_output_root(tmp_path, capsys):
    if os.geteuid() == 0:  # root writes anywhere chmod forbids; a read-only file system stops root too
        root = Path("/sys/hadpo-robustness/runs")
        if os.access("/sys", os.W_OK) and not Path("/sys").is_mount():
            pytest.skip("no read-only location to write to")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        root = locked / "runs"
    config = tmp_path / "c.yaml"
    config.write_text(f"name: x\noutput_root: {root}\n")
    ray_before = ray.is_initialized()
    code, err = run_main(["data", "check", str(config)], capsys)
    line = one_error_line(err)
    assert code == 1 and "cannot use output_root" in line and str(root.parent) in line
    assert ray.is_initialized() == ray_before


def test_errors_raised_inside_ray_are_found_through_their_wrapping():
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from orchestrator.data.schema import DataFormatError

    inner = DataFormatError("/d/pope.json", 3, "label", '"yes" or "no"', "maybe")
    wrapped = WorkerGroupError("training failed", {1: RayTaskError("fn", "tb", inner)})
    assert known_failure(wrapped) == (1, str(inner))
    assert known_failure(KeyError("a bug")) is None  # a bug keeps its traceback


def test_a_bug_still_shows_its_traceback(tmp_path):
    script = "from orchestrator.boundary import run_command\nrun_command(lambda a: {}['x'], None, ['hadpo'])\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1 and "Traceback" in result.stderr and "KeyError" in result.stderr
