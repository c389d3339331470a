"""Shared start of every job entrypoint: make the uploaded working dir importable, then run a CLI command.

`ray job submit --working-dir . -- python jobs/<x>.py --config CONFIG` runs the script from the
uploaded copy of this repository; its folder (jobs/) is on sys.path but the repository root is not.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run(command: list[str]) -> None:
    import argparse

    from orchestrator.cli import exit_with, main

    parser = argparse.ArgumentParser(description=f"ray job entrypoint for `hadpo {' '.join(command)}`")
    parser.add_argument("--config", required=True, help="experiment config (YAML), relative to the working dir")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args, rest = parser.parse_known_args()
    overrides = [item for pair in args.set for item in ("--set", pair)]
    # The CLI's error boundary: one line for a known failure, exit 143 / 130 with what was kept on
    # SIGTERM (`ray job stop`) / SIGINT.
    exit_with(main([*command, args.config, *overrides, *rest], resume=["python", *sys.argv]))


def run_passthrough(command: list[str]) -> None:
    """For commands whose first argument is not a config (`hadpo export RUN_DIR ...`): all arguments go on."""
    from orchestrator.cli import exit_with, main

    exit_with(main([*command, *sys.argv[1:]], resume=["python", *sys.argv]))
