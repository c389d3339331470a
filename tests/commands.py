"""`hadpo` run as a user runs it: a subprocess of this checkout's code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def hadpo(*args: str, cwd: Path = ROOT, ray_address: str | None = None,
          timeout: int = 600) -> subprocess.CompletedProcess:
    """`hadpo ARGS` in `cwd`; with `ray_address` it joins that Ray (RAY_ADDRESS, as on a cluster), else a
    command that needs Ray starts its own local one."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
