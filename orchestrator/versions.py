"""What code ran: installed package versions and the checkout's git commit, and whether those packages are
compiled to bytecode (standard library only)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Iterable


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """Each package's installed version, "not installed" where it is absent."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_sha(cwd: Path | None = None) -> str:
    """HEAD of the checkout the package runs from, with "-dirty" when tracked files have changes."""
    cwd = cwd or Path(__file__).parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# what every training worker and evaluation actor imports (numpy and sympy come with torch)
IMPORTED_BY_WORKERS = ("torch", "numpy", "sympy", "transformers", "ray")


def packages_compiled_in_every_process(names: Iterable[str] = IMPORTED_BY_WORKERS) -> list[str]:
    """The installed packages among `names` that each new Python process compiles from source: their
    bytecode is absent where Python looks for it (beside the source or under PYTHONPYCACHEPREFIX) and Python
    may not write it there (PYTHONDONTWRITEBYTECODE, or a read-only folder). Images built that way are
    common; on the H200 we benchmark on, torch, numpy and sympy compiled in every Ray worker made their
    imports take 13.7 s instead of 4.6 s. `python -m compileall <site-packages>` once, as pip does at
    install, fixes it. Finding a package's spec imports nothing."""
    compiled_anew = []
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        cached = spec.cached or importlib.util.cache_from_source(spec.origin)
        if os.path.exists(cached):
            continue
        writes_into = sys.pycache_prefix or os.path.dirname(spec.origin)  # where Python would create the folder
        if sys.flags.dont_write_bytecode or not os.access(writes_into, os.W_OK):
            compiled_anew.append(name)
    return compiled_anew


def bytecode_warning(names: Iterable[str] = IMPORTED_BY_WORKERS) -> str | None:
    """What to tell a user whose workers compile their imports anew (None when nothing does)."""
    compiled_anew = packages_compiled_in_every_process(names)
    if not compiled_anew:
        return None
    spec = importlib.util.find_spec(compiled_anew[0])
    site = os.path.dirname(os.path.dirname(spec.origin)) if spec and spec.origin else "<site-packages>"
    return (f"{', '.join(compiled_anew)} have no compiled bytecode and Python may not write it "
            "(PYTHONDONTWRITEBYTECODE or a read-only folder): every training worker and evaluation actor compiles "
            f"them again, seconds each (9 s on the H200 we benchmark on); compile them once: "
            f"python -m compileall -q {site}")
