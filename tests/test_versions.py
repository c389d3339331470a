"""Finding packages that every new process compiles from source (the H200 image shipped torch so)."""

from __future__ import annotations

import json
import py_compile
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _compiled_anew(site: Path, *python_flags: str) -> tuple[list[str], str | None]:
    script = ("import json, sys; sys.path.insert(0, sys.argv[1]); "
              "from orchestrator.versions import bytecode_warning, packages_compiled_in_every_process as f; "
              "print(json.dumps([f(['pkg_probe']), bytecode_warning(['pkg_probe'])]))")
    out = subprocess.run([sys.executable, *python_flags, "-c", script, str(site)], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": str(ROOT)})
    found, warning = json.loads(out.stdout)
    return found, warning


def test_a_package_without_bytecode_that_python_may_not_write_is_found_and_compileall_clears_it(tmp_path):
    package = tmp_path / "pkg_probe"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 1\n")

    found, warning = _compiled_anew(tmp_path, "-B")  # -B: as PYTHONDONTWRITEBYTECODE=1
    assert found == ["pkg_probe"]
    assert "pkg_probe have no compiled bytecode" in warning and f"compileall -q {tmp_path}" in warning

    found, _ = _compiled_anew(tmp_path)  # Python may write it: the first process does, no warning
    assert found == []

    for cached in package.rglob("*.pyc"):
        cached.unlink()
    py_compile.compile(str(package / "__init__.py"), doraise=True)  # what compileall / pip write
    found, warning = _compiled_anew(tmp_path, "-B")
    assert found == [] and warning is None
