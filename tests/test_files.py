"""One atomic write for the whole code base (orchestrator/files.py): a reader sees a whole file or the one
before it, and no other module moves a temporary file over its target by hand."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from orchestrator.files import atomic_write, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
# a folder written whole, then renamed (an exported model): not a file, so not atomic_write's
FOLDER_RENAMES = {("orchestrator/export.py", "staging.rename(out_dir)")}


def test_a_write_that_fails_leaves_the_previous_file_and_no_temporary_file(tmp_path):
    path = write_json_atomic(tmp_path / "deep" / "record.json", {"step": 1})  # makes the folder
    assert path.read_text() == '{\n  "step": 1\n}'

    def half_written(temp: Path):
        temp.write_text('{"step": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_written)
    assert path.read_text() == '{\n  "step": 1\n}'
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]


def file_moves(source: Path) -> list[str]:
    """`os.replace/rename`, `shutil.move` and one-argument `.replace()/.rename()` calls (a pathlib move) in
    `source`, as written."""
    found = []
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        function = node.func
        by_module = isinstance(function.value, ast.Name) and function.value.id in ("os", "shutil") and (
            function.attr in ("replace", "rename", "move"))
        by_path = function.attr in ("replace", "rename") and len(node.args) == 1 and not node.keywords
        if by_module or by_path:
            found.append(ast.unparse(node))
    return found


def test_files_are_moved_into_place_only_by_atomic_write():
    moves = {(str(path.relative_to(ROOT)), call)
             for folder in ("orchestrator", "benchmarks", "jobs", "scripts")
             for path in sorted((ROOT / folder).rglob("*.py")) for call in file_moves(path)}
    assert moves - FOLDER_RENAMES == {("orchestrator/files.py", "os.replace(temp, path)")}


def test_the_scan_sees_each_way_of_moving_a_file(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("import os, shutil\nos.replace(a, b)\nos.rename(a, b)\nshutil.move(a, b)\ntmp.replace(path)\n"
                      "tmp.rename(path)\ntext.replace('a', 'b')\nframe.rename(columns={})\n")
    assert file_moves(source) == ["os.replace(a, b)", "os.rename(a, b)", "shutil.move(a, b)", "tmp.replace(path)",
                                  "tmp.rename(path)"]
