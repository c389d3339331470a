"""What code ran: installed package versions and the checkout's git commit (standard library only)."""

from __future__ import annotations

import subprocess
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
