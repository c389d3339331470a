"""What a person sees in the terminal, and where everything else goes.

A `hadpo` command (and a `ray job submit` entrypoint) runs inside one `Console`:

- the **terminal** shows one line per pipeline stage (its start, then its progress and ETA, then its
  end with a summary), the warnings and errors of our own code, and what the command prints (tables,
  the verdict, paths). On a terminal the running stage and its progress are one status line rewritten
  in place; piped into a file or CI log, progress lines are printed at most every
  `PROGRESS_INTERVAL_S` seconds per source (the first one that long after its stage started), so
  nothing there carries a cursor escape;
- the **log file** ``<run_dir>/logs/hadpo.log`` (once the command knows its run folder) gets
  everything: our own INFO records, Ray's and the libraries' log records, Python warnings
  (`logging.captureWarnings`), every line the Ray workers, actors and Ray Train controller print,
  each with where it came from (``(RayTrainWorker pid=123)``), and whatever is written to the
  process's stderr below Python logging (the Ray core worker's C++ log lines, tqdm bars: see
  `Console._divert_stderr`). Libraries that print while being imported (DeepSpeed) are imported
  early, quietly (`import_quietly`). A command without a run folder (`hadpo report`, `hadpo data
  synth`) has no log file; its libraries' warnings stay on the terminal;
- ``hadpo -v`` shows on the terminal everything the log file gets (DEBUG included), as lines.

Which of our own records reach the terminal (`console_kind`): every WARNING and above; INFO records
marked with ``extra=console.LINE`` (a stage's end, a run's summary) or ``extra=console.STAGE`` (a stage
starting: the status line); and progress records, marked ``extra=console.PROGRESS`` or recognised by
the ETA they carry ("..., ETA 0m14s", the training recipe's "| ETA 00:01:10"), so that a progress
line needs no mark. Other INFO records (start-up details, resume plans) go to the file only.

Worker output: Ray prints what its worker processes write on the driver (``log_to_driver``); this
module replaces Ray's printing with `route_worker_output`, which hands every line to Python logging.
Workers run `setup_worker_logging` (on a cluster: the runtime_env's ``worker_process_setup_hook``; on
the local Ray a command starts: when the package is imported, `WORKER_LOG_MARKS` being set), which
writes our own loggers' records as marked lines (``[hadpo-log] INFO hadpo.train: ...``); on the
driver a marked line becomes a record of the same logger and level again (so a training worker's
progress line and warnings reach the terminal like the driver's), and any other line (Ray Train's
``TrainingReport(...)`` dumps, library warnings, Ray Data's progress bars) a record of the
``worker_output`` logger, which goes to the file. Ray offers no public API for this: the routing uses
``ray._private.ray_logging.global_worker_stdstream_dispatcher`` (Ray 2.60) and, where that is absent,
leaves Ray's own printing in place (noisy, nothing lost). Everything also stays in Ray's own session
logs (``<output_root>/.ray/session_*/logs``).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from orchestrator import layout

OUR_LOGGERS = ("hadpo", "orchestrator")
WORKER_OUTPUT = "worker_output"   # the logger of every worker line that is not one of our records
PROGRESS_INTERVAL_S = 10.0        # off a terminal: at most one progress line per source this often

# `extra=` marks for our own INFO records (see the module docstring)
LINE = {"console": "line"}
STAGE = {"console": "stage"}
PROGRESS = {"console": "progress"}

_ETA = re.compile(r"\bETA\b")
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s%(origin)s: %(message)s"


def is_ours(name: str) -> bool:
    return any(name == root or name.startswith(root + ".") for root in OUR_LOGGERS)


def console_kind(record: logging.LogRecord, verbose: bool = False, has_log_file: bool = True) -> str | None:
    """How the terminal shows a record: "line", "stage" (the status line: a stage is running), "progress"
    (the status line's progress part), or None (the log file only)."""
    if verbose:
        return "line"
    if not is_ours(record.name):
        # nothing is hidden when there is no file to hide it in
        return "line" if record.levelno >= logging.WARNING and not has_log_file else None
    if record.levelno >= logging.WARNING:
        return "line"
    if record.levelno < logging.INFO:
        return None
    marked = getattr(record, "console", None)
    if marked in ("line", "stage", "progress"):
        return marked
    return "progress" if _ETA.search(record.getMessage()) else None


def status_line(stage: str, progress: str, width: int) -> str:
    """The running stage and its progress in `width` characters; what does not fit is cut from the middle
    of the progress, so its ETA (at the end) stays: "stage warmup: running · [sft] step 10/800 | … | ETA 00:01:40"."""
    status = " · ".join(part for part in (stage, progress) if part)
    if len(status) <= width:
        return status
    eta = _ETA.search(progress)
    tail = progress[eta.start():] if eta else ""
    if tail and len(tail) + 2 < width:
        return status[: width - len(tail) - 2] + "… " + tail
    return status[: max(width - 1, 0)] + "…"


class _Formatter(logging.Formatter):
    """The file's format: time, level, logger, where a worker's line came from, message."""

    def format(self, record: logging.LogRecord) -> str:
        worker = getattr(record, "worker", "")
        record.origin = f" ({worker})" if worker else ""
        return super().format(record)


class ConsoleHandler(logging.Handler):
    """The terminal: lines, and one status line (the running stage and its progress) that a terminal
    rewrites in place. Writes to `terminal` once the command has taken the process's stderr for its log
    file (`Console.log_to`), else to whatever `sys.stderr` is when a record arrives (as
    `logging.lastResort` does), so pytest's capture and redirections see it.

    Off a terminal a progress line is printed at most every `interval_s` per source, and the first one
    only `interval_s` after its stage (or the command) started: an ETA after the first few items is a
    guess, and a short stage needs no progress line at all.
    """

    def __init__(self, verbose: bool = False, interval_s: float = PROGRESS_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(logging.DEBUG if verbose else logging.INFO)
        self.verbose = verbose
        self.interval_s = interval_s
        self.clock = clock
        self.has_log_file = False
        self.terminal: TextIO | None = None  # the terminal, when the process's stderr goes to the log file
        self.stage = ""              # the running stage's status text
        self.progress = ""           # its latest progress text
        self.drawn = False           # a status line is on the screen without its newline
        self.quiet_since = clock()   # when the running stage (or the command) started
        self.printed_at: dict[tuple[str, str], float] = {}  # progress source -> when its last line was printed
        self.setFormatter(_Formatter(_FILE_FORMAT, datefmt="%H:%M:%S") if verbose else None)

    @property
    def stream(self):
        return self.terminal or sys.stderr

    def _rewrites(self) -> bool:
        try:
            return not self.verbose and self.stream.isatty()
        except (AttributeError, ValueError):  # a closed or odd stream
            return False

    def text(self, record: logging.LogRecord) -> str:
        if self.verbose:
            return self.format(record)
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        return f"warning: {message}" if record.levelno >= logging.WARNING else message

    def emit(self, record: logging.LogRecord) -> None:
        try:
            kind = console_kind(record, self.verbose, self.has_log_file)
            if kind is None:
                return
            text = self.text(record)
            if kind == "line":
                if getattr(record, "console", None) == "line":  # a stage's end: its status is over
                    self.stage = self.progress = ""
                self._line(text)
            elif kind == "stage":
                self.stage, self.progress = text, ""
                self.quiet_since = self.clock()
                self._draw() if self._rewrites() else self._write(text + "\n")
            else:
                self.progress = text
                if self._rewrites():
                    self._draw()
                else:
                    source = (record.name, text.split(" ", 1)[0])
                    now = self.clock()
                    if now - max(self.printed_at.get(source, -math.inf), self.quiet_since) >= self.interval_s:
                        self.printed_at[source] = now
                        self._write(text + "\n")
        except Exception:  # a display problem must never stop the run
            self.handleError(record)

    def _line(self, text: str) -> None:
        self.end_status()
        self._write(text + "\n")
        if self.stage and self._rewrites():
            self._draw()  # a warning in the middle of a stage: the stage's status line comes back below it

    def _draw(self) -> None:
        status = status_line(self.stage, self.progress, shutil.get_terminal_size((100, 20)).columns - 1)
        self._write("\r\x1b[K" + status)
        self.drawn = True

    def end_status(self) -> None:
        """Take the status line off the screen (before anything else is written there)."""
        if self.drawn:
            self._write("\r\x1b[K")
            self.drawn = False

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


class _Buffer(logging.Handler):
    """Records logged before the command knows its run folder, handed to the log file once it does."""

    CAPACITY = 10_000

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.CAPACITY:
            self.records.append(record)


class Console:
    """The logging set-up of one command: `start` installs it, `log_to` opens the log file, `close`
    puts the previous set-up back (commands run one after another in one process in the tests)."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.level = logging.DEBUG if verbose else logging.INFO
        self.console = ConsoleHandler(verbose)
        self.buffer: _Buffer | None = _Buffer()
        self.file: logging.FileHandler | None = None
        self.log_path: Path | None = None
        self._terminal_fd: int | None = None  # the process's stderr, while its descriptor goes to the log file
        self._saved: dict[str, Any] = {}

    def start(self, command: list[str] | None = None) -> "Console":
        global _active
        root = logging.getLogger()
        self._saved = {"level": root.level}
        root.setLevel(self.level)
        root.addHandler(self.console)
        root.addHandler(self.buffer)
        logging.captureWarnings(True)
        self.command = command or []
        _active = self
        return self

    def log_to(self, path: str | Path) -> Path:
        """Send every record (those buffered so far too) to `path` from now on."""
        path = Path(path)
        if self.file is not None:
            if path == self.log_path:
                return path
            logging.getLogger().removeHandler(self.file)
            self.file.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = logging.FileHandler(path, mode="a", encoding="utf-8")
        self.file.setLevel(self.level)
        self.file.setFormatter(_Formatter(_FILE_FORMAT))
        self.log_path = path
        self.file.stream.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} hadpo "
                               f"{' '.join(shlex.quote(part) for part in self.command)} =====\n")
        if self.buffer is not None:
            logging.getLogger().removeHandler(self.buffer)
            for record in self.buffer.records:
                if record.levelno >= self.level:
                    self.file.handle(record)
            self.buffer = None
        logging.getLogger().addHandler(self.file)
        self.console.has_log_file = True
        self._divert_stderr()
        return path

    def _divert_stderr(self) -> None:
        """Without ``-v``, in a process of its own: the process's stderr descriptor goes to the log file, so
        what is written there below Python logging (the Ray core worker's C++ log lines, progress bars
        drawn with tqdm, a library's own prints) lands in the file; the console keeps the terminal. Ray's
        processes started from now on (ray.init) inherit it. Where `sys.stderr` is not the process's own
        (a test's capture) nothing changes."""
        if self.verbose or self.file is None or sys.stderr is not sys.__stderr__:
            return
        try:
            if sys.stderr.fileno() != 2:
                return
            sys.stderr.flush()
            if self._terminal_fd is None:
                self._terminal_fd = os.dup(2)
                self.console.terminal = open(self._terminal_fd, "w", encoding=sys.stderr.encoding or "utf-8",
                                             errors="replace", buffering=1, closefd=False)
            self.file.flush()
            os.dup2(self.file.stream.fileno(), 2)
        except (AttributeError, OSError, ValueError):  # no descriptor to divert: the terminal keeps everything
            return

    def release_terminal(self) -> None:
        """Clear the status line and give the process's stderr back to the terminal (before a last message
        printed past logging: the error boundary's)."""
        self.console.end_status()
        if self._terminal_fd is None:
            return
        try:
            sys.stderr.flush()
            os.dup2(self._terminal_fd, 2)
        finally:
            terminal, self.console.terminal = self.console.terminal, None
            if terminal is not None:
                terminal.close()
            os.close(self._terminal_fd)
            self._terminal_fd = None

    def close(self) -> None:
        global _active
        self.release_terminal()
        root = logging.getLogger()
        for handler in (self.console, self.buffer, self.file):
            if handler is not None:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(self._saved.get("level", logging.WARNING))
        logging.captureWarnings(False)
        if _active is self:
            _active = None


_active: Console | None = None


def active() -> Console | None:
    """The console of the command running in this process (None outside the command line)."""
    return _active


def log_to_run_dir(run_dir: Path) -> Path | None:
    """Open ``<run_dir>/logs/hadpo.log`` for the running command; None outside the command line."""
    return _active.log_to(layout.log_path(run_dir)) if _active is not None else None


def release_terminal() -> None:
    """Before printing past logging (the error boundary's last messages): the status line cleared, the
    process's stderr the terminal again."""
    if _active is not None:
        _active.release_terminal()


# ----------------------------------------------------------------------------------------------
# Ray: its own loggers, its Data progress bars, and what its workers print


def adopt_library_loggers() -> None:
    """Loggers that libraries gave their own terminal handler (Ray's ``ray`` and ``ray.data``) hand their
    records to ours instead: the log file, and the terminal only with ``-v``. Their file handlers (Ray's
    session logs) stay."""
    loggers = [logging.getLogger(name) for name, value in list(logging.root.manager.loggerDict.items())
               if isinstance(value, logging.Logger) and not is_ours(name)]
    for logger in loggers:
        terminal = [handler for handler in logger.handlers
                    if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)]
        if not terminal:
            continue
        for handler in terminal:
            logger.removeHandler(handler)
        logger.propagate = True


def import_quietly(*modules: str) -> None:
    """Import `modules` (those installed), what they print while being imported going to the log file
    (DeepSpeed warns "Setting accelerator to CPU" on its own stdout handler), then `adopt_library_loggers`."""
    import contextlib
    import importlib
    import importlib.util
    import io

    for name in modules:
        if name in sys.modules:
            continue
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                if importlib.util.find_spec(name.split(".")[0]) is not None:
                    importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - the command itself will meet (and report) a broken library
            logging.getLogger(__name__).warning("importing %s failed: %s", name, error)
        for line in printed.getvalue().splitlines():
            logging.getLogger(name).info(line)
    adopt_library_loggers()


# Set in the environment the local Ray's processes inherit: the package's import runs `setup_worker_logging`
WORKER_LOG_MARKS = "HADPO_WORKER_LOG_MARKS"


def worker_runtime_env() -> dict[str, Any]:
    """What a run's Ray runtime_env adds for this console: the workers' logging hook (nothing outside the
    command line, where Ray prints worker output itself)."""
    if _active is None:
        return {}
    return {"worker_process_setup_hook": f"{__name__}.setup_worker_logging"}


def worker_env() -> dict[str, str]:
    """`worker_runtime_env` for a Ray whose workers inherit this process's environment (the local one a
    command starts): the variable that has our package run the hook when a worker imports it."""
    return {WORKER_LOG_MARKS: "1"} if _active is not None else {}


def attach_ray() -> None:
    """After `ray.init` by a command: Ray's loggers to ours, worker output routed, and no Ray Data progress
    bar drawn on a terminal (off a terminal Ray Data logs its progress, which goes to the file)."""
    if _active is None:
        return
    adopt_library_loggers()
    route_worker_output()
    if not _active.verbose and sys.stdout.isatty():
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False


_MARK = "[hadpo-log"
_MARKED = re.compile(r"^\[hadpo-log(?::(\w+))?\] ([A-Z]+) ([\w.]+): ?(.*)$")
_TQDM_MAGIC = "__ray_tqdm_magic_token__"  # ray.experimental.tqdm_ray's progress-bar state lines
_AUTOSCALER_EVENT = ":event_summary:"       # the autoscaler's lines Ray itself prints (its status dumps it does not)


class _MarkedFormatter(logging.Formatter):
    """Worker side: each line of a record as ``[hadpo-log(:kind)] LEVEL logger: text``."""

    def format(self, record: logging.LogRecord) -> str:
        kind = getattr(record, "console", None)
        mark = f"{_MARK}:{kind}]" if kind else f"{_MARK}]"
        text = super().format(record)
        return "\n".join(f"{mark} {record.levelname} {record.name}: {line}" for line in text.splitlines() or [""])


def setup_worker_logging() -> None:
    """Ray's ``worker_process_setup_hook``: our loggers write marked lines to stderr (which Ray forwards to
    the driver, where `route_worker_output` turns them back into records). Never fails a worker."""
    try:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_MarkedFormatter("%(message)s"))
        for name in OUR_LOGGERS:
            logger = logging.getLogger(name)
            if any(isinstance(h.formatter, _MarkedFormatter) for h in logger.handlers):
                continue
            logger.addHandler(handler)
            logger.propagate = False  # not also through Ray Train's console handler on the root logger
            if logger.level == logging.NOTSET:
                logger.setLevel(logging.INFO)
    except Exception:  # noqa: BLE001 - logging is not worth a failed worker
        pass


def parse_marked(line: str) -> tuple[str, int, str, str | None] | None:
    """(logger, level, message, console mark) of a line `setup_worker_logging` wrote, else None."""
    found = _MARKED.match(line)
    if not found:
        return None
    kind, level, name, message = found.groups()
    number = logging.getLevelName(level)
    return name, number if isinstance(number, int) else logging.INFO, message, kind


def worker_origin(batch: dict[str, Any]) -> str:
    """Where a batch of worker lines came from, as Ray prints it: "RayTrainWorker pid=123"."""
    pid = batch.get("pid")
    if pid in ("raylet", "autoscaler"):
        return str(pid)
    who = batch.get("actor_name") or batch.get("task_name") or ""
    return f"{who} pid={pid}".strip()


def log_worker_lines(batch: dict[str, Any]) -> None:
    """One batch of worker output (Ray's log batch: pid, actor/task name, lines) as log records."""
    origin = worker_origin(batch)
    for line in batch.get("lines") or []:
        if _TQDM_MAGIC in line:
            continue  # a progress bar's state for the driver to draw: Ray Data logs the same progress
        if origin == "autoscaler":
            if _AUTOSCALER_EVENT not in line:
                continue  # its periodic status (in the session's monitor log), which Ray does not print either
            line = line.split(_AUTOSCALER_EVENT, 1)[1]
        parsed = parse_marked(line)
        if parsed is None:
            name, level, message, kind = WORKER_OUTPUT, logging.INFO, line, None
        else:
            name, level, message, kind = parsed
        logger = logging.getLogger(name)
        if not logger.isEnabledFor(level):
            continue
        extra = {"worker": origin, **({"console": kind} if kind else {})}
        logger.handle(logger.makeRecord(name, level, "(worker)", 0, message, None, None, extra=extra))


_RAY_PRINTER = "ray_print_logs"  # the name Ray's own printer of worker output registers under (worker.connect)


class _Routed:
    """Ray's printer of worker output, wrapped: while a console is active, the lines go to logging."""

    def __init__(self, printer):
        self.printer = printer

    def __call__(self, batch: dict[str, Any]) -> None:
        if _active is None:
            self.printer(batch)
            return
        try:
            log_worker_lines(batch)
        except Exception:  # noqa: BLE001 - Ray's log thread must keep running
            pass


def route_worker_output() -> bool:
    """Route the worker output Ray prints on this driver through `log_worker_lines` (while a console is
    active). False where this Ray has no such printer (Ray keeps printing: noisy, nothing lost)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    printers = [handler for name, handler in list(getattr(dispatcher, "handlers", [])) if name == _RAY_PRINTER]
    if not printers:
        return False
    if not isinstance(printers[0], _Routed):
        dispatcher.remove_handler(_RAY_PRINTER)  # Ray removes it by this name again at ray.shutdown
        dispatcher.add_handler(_RAY_PRINTER, _Routed(printers[0]))
    return True
