"""The one error boundary of the `hadpo` command line and the `ray job submit` entrypoints.

`run_command` runs one command and turns how it ended into what a user needs:

- a *known* failure (a bad config, a malformed data file, a missing or unwritable path, a corrupt
  parquet / JSON file, resources the cluster can never give, or an error our own code raised with its
  message: one of this package's error classes, or a ValueError / RuntimeError raised by its code)
  prints one line, ``error: ...``, and exits 1 (2 for a config error). ``-v`` adds the
  traceback. Anything else is a bug: its traceback is shown as Python shows it;
- SIGTERM / SIGINT (Ctrl-C) stop the Ray work (a local Ray this process started shuts down with all
  its workers), print what is kept on disk and how to resume, and exit 143 / 130.

A failure raised inside a Ray task, actor or Ray Train worker arrives wrapped; the boundary looks
through the wrapping for its cause.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

from orchestrator import layout
from orchestrator.config import ConfigError
from orchestrator.console import release_terminal
from orchestrator.data.schema import DataFormatError
from orchestrator.errors import CorruptFileError
from orchestrator.paths import PathOutsideRoot
from orchestrator.ray_session import handle_stop_signals, ray_released_after, received_signal, stop_ray
from orchestrator.resources import ResourceError
from orchestrator.train.checkpoints import newest_complete

log = logging.getLogger("hadpo")

EXIT_FAILURE = 1
EXIT_CONFIG = 2
_RUN_DIRS: list[Path] = []


def watch_run_dir(run_dir: Path) -> None:
    """The run folder of the command's config: what an interruption reports as kept."""
    if run_dir not in _RUN_DIRS:
        _RUN_DIRS.append(run_dir)


# ----------------------------------------------------------------------------------------------
# Which failures are known


def causes(error: BaseException) -> Iterator[BaseException]:
    """`error` and what it wraps: Python's explicit cause chain, Ray task errors and Ray Train's worker
    and controller failures."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.append(getattr(current, "cause", None))                # ray.exceptions.RayTaskError
        pending.append(getattr(current, "controller_failure", None))   # ray.train.ControllerError
        pending.extend((getattr(current, "worker_failures", None) or {}).values())  # ray.train.WorkerGroupError
        pending.append(current.__cause__)  # `raise X from Y` (not __context__: a bug raised while handling
                                           # a known failure is still a bug)


def _raised_by_us(error: BaseException) -> bool:
    """Whether the innermost frame that raised `error` is in this package (a deliberate message)."""
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ else []
    package = str(Path(__file__).resolve().parent) + os.sep
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(package)


def _ours(kind: type) -> bool:
    """An error class of this package (DeepSpeedConfigError, ConversionError, ...): a deliberate message,
    even when it comes back from a Ray worker without its traceback."""
    return kind.__module__.split(".")[0] == __name__.split(".")[0]


def known_failure(error: BaseException) -> tuple[int, str] | None:
    """(exit code, one-line message) for a known failure, else None."""
    import pyarrow  # here, not at the top: `hadpo --help` and a config error need not load it

    for cause in causes(error):
        if isinstance(cause, ConfigError):
            return EXIT_CONFIG, str(cause)
        if isinstance(cause, (DataFormatError, CorruptFileError, PathOutsideRoot, ResourceError)):
            return EXIT_FAILURE, str(cause)
        if isinstance(cause, OSError):
            return EXIT_FAILURE, _os_error(cause)
        if isinstance(cause, pyarrow.ArrowException):
            return EXIT_FAILURE, f"cannot read a file: {cause}"
        if isinstance(cause, (ValueError, RuntimeError)) and (_raised_by_us(cause) or _ours(type(cause))):
            return EXIT_FAILURE, str(cause)
    return None


def _os_error(error: OSError) -> str:
    if not error.strerror:  # raised by us with a whole message, e.g. FileNotFoundError("x: run directory not found")
        return str(error)
    what = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    if error.filename2:
        what += f" (and {error.filename2})"
    for run_dir in _RUN_DIRS:
        root = run_dir.parent
        if error.filename and (str(error.filename).startswith(str(root)) or str(root).startswith(str(error.filename))):
            return f"cannot use output_root {root}: {what}"
    return what


# ----------------------------------------------------------------------------------------------
# What an interruption keeps


def describe_kept(run_dir: Path) -> str:
    """What finished work lies in a run folder: stages done, training checkpoints, evaluation answers."""
    # pyarrow and pandas (through the answer store) only when an interruption reports what it kept
    import pyarrow.parquet as pq

    from orchestrator.eval.results import answer_files

    if not run_dir.is_dir():
        return f"nothing under {run_dir} yet"
    parts = []
    stages = list(layout.stage_records(run_dir))
    if stages:
        parts.append("stages done: " + ", ".join(stages))
    for folder in sorted(p for p in layout.train_dir(run_dir).glob("*") if p.is_dir()):
        newest = newest_complete(str(folder))
        if newest is not None:
            parts.append(f"training {folder.name} checkpointed at step {newest.step}")
    for folder in layout.eval_dirs(run_dir):
        files = answer_files(layout.answers_dir(run_dir, folder.name))
        if files:
            rows = sum(pq.ParquetFile(path).metadata.num_rows for path in files)
            parts.append(f"{rows} answers of evaluation {folder.name}")
    return f"kept under {run_dir}: " + ("; ".join(parts) if parts else "nothing finished yet")


# ----------------------------------------------------------------------------------------------
# The boundary


def run_command(command: Callable[[Any], int], args: Any, resume: list[str], verbose: bool = False) -> int:
    """Run `command(args)` inside the boundary; returns the exit code. `resume`: the command line that
    continues the work (shown after an interruption)."""
    _RUN_DIRS.clear()  # the run folders of this command only (main may run several in one process)
    restore_signals = handle_stop_signals()
    try:
        with ray_released_after():  # the Ray this command starts stops before it returns
            return command(args)
    except KeyboardInterrupt:
        signum = received_signal() or signal.SIGINT
        try:
            stop_ray()
        except Exception as error:  # reporting what was kept matters more than a clean shutdown message
            log.warning("stopping Ray: %s", error)
        kept = "; ".join(describe_kept(run_dir) for run_dir in _RUN_DIRS) or "nothing to keep (no run folder)"
        again = " ".join(shlex.quote(part) for part in resume)
        release_terminal()
        print(f"\ninterrupted by {signal.Signals(signum).name}: Ray work stopped; {kept}. "
              f"Run the same command again to resume: {again}", file=sys.stderr, flush=True)
        return 128 + int(signum)
    except Exception as error:
        known = known_failure(error)
        if known is None:
            raise
        code, message = known
        log.info("command failed: %s", message, exc_info=True)  # the traceback in the log file, not on the terminal
        release_terminal()
        if verbose:
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr, flush=True)
        return code
    finally:
        restore_signals()
