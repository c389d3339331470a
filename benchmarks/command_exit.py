"""How long a `hadpo` command takes to end once its work is done, as a user runs it (a subprocess):

    python benchmarks/command_exit.py --out /tmp/exit               # 2-core CPU: ~2.5 minutes
    python benchmarks/command_exit.py --out /tmp/exit --runs 5 --json $OUT/exit.json

`hadpo data check` of the synthetic world with the local Ray the command starts, timed from the start to its
last line on the terminal and from that line to the process's exit, in four ways, alternating, in one run,
each adding one lever to the one before:

  exit hook        Ray stopped by its own exit hook after `main` returns (the way before 2026-12-04): the hook
                   sleeps 0.5 s for late log lines, then `ray.shutdown` stops the GCS before the autoscaler
                   monitor, whose SIGTERM handler then hangs reporting to it until Ray kills it a second later;
                   then the interpreter's exit collects the garbage of every object the process made.
  released         the command stops its Ray before it returns (`ray_session.ray_released_after`), the
                   monitor given SIGTERM as Ray does.
  monitor killed   released, the monitor killed first (`ray_session._kill_autoscaler_monitor`).
  as shipped       the heap frozen before the exit (`cli.exit_with`): no garbage collection at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import fmt  # noqa: E402

# `hadpo ARGS` with one lever taken back: the variants patch the shipped code before `main` runs
NO_FREEZE = "import gc; gc.freeze = lambda: None"
VARIANT_PATCHES = {
    "exit hook": f"{NO_FREEZE}; import contextlib, orchestrator.boundary as b; "
                 "b.ray_released_after = contextlib.nullcontext",
    "released": f"{NO_FREEZE}; import orchestrator.ray_session as s; s._kill_autoscaler_monitor = lambda: None",
    "monitor killed": NO_FREEZE,
    "as shipped": "",
}
RUN = "import sys; {patch}\nfrom orchestrator.cli import exit_with, main\nexit_with(main(sys.argv[1:]))"


def timed(command: list[str], cwd: Path) -> dict[str, float]:
    """Seconds from the start to the last line the command printed, and from that line to its exit."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    last_line, lines = started, []
    for line in process.stdout:
        last_line = time.perf_counter()
        lines.append(line)
    code = process.wait()
    ended = time.perf_counter()
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({code}):\n" + "".join(lines[-30:]))
    return {"to_last_line_s": last_line - started, "after_last_line_s": ended - last_line, "total_s": ended - started}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="working folder (the synthetic world, the runs)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each variant (alternating)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    world = out / "world"
    if not (world / "world.json").is_file():
        subprocess.run([sys.executable, "-m", "orchestrator.cli", "data", "synth", "--out", str(world),
                        "--num-images", "12", "--num-pope-images", "6"], cwd=out, check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    config = out / "check.yaml"
    config.write_text(f"name: check\noutput_root: {out / 'runs'}\ndata:\n  synthetic_dir: {world}\n")

    samples: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANT_PATCHES}
    for run in range(args.runs):
        for name, patch in VARIANT_PATCHES.items():
            command = [sys.executable, "-c", RUN.format(patch=patch), "data", "check", str(config)]
            samples[name].append(timed(command, out))
            print(f"run {run + 1}/{args.runs} {name}: {samples[name][-1]['total_s']:.2f} s", flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(sample[key] for sample in samples[name])

    before = median("exit hook", "after_last_line_s")
    print(f"\n`hadpo data check` with its local Ray, {os.cpu_count()} CPUs, median of {args.runs} runs each\n")
    print("| variant | to the last line (s) | last line to exit (s) | exit vs exit hook | total (s) |")
    print("|---|---|---|---|---|")
    for name in VARIANT_PATCHES:
        after = median(name, "after_last_line_s")
        print(f"| {name} | {fmt(median(name, 'to_last_line_s'))} | {fmt(after)} | {fmt(after / before, '.2f', 'x')} "
              f"| {fmt(median(name, 'total_s'))} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpus": os.cpu_count(), "runs": args.runs, "samples": samples},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
