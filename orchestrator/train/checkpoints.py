"""The training run's checkpoint folders on disk: names, completion markers, the folder to resume from.

Ray Train V2 keeps its own record of a run's checkpoints (``checkpoint_manager_snapshot.json`` in the
run folder) and hands the latest one it recorded to the workers. That record is written *after* the
checkpoint folder: a run killed in between re-ran from step 0 and left the folder behind, beyond
`keep_checkpoints`. So this module keeps a record of its own, in each folder, and trusts the disk:

- names: ``checkpoint_<step, 8 digits>_<UTC time>`` (`checkpoint_dir_name`; rank 0's name is the one
  Ray Train uses), so the newest checkpoint is the one with the highest step, then the latest time;
- completion: once every rank's `ray.train.report` has uploaded its part, the ranks meet at a barrier
  and rank 0 writes ``hadpo_complete.json`` (step, world size, every file with its size) into the
  folder, atomically (`mark_complete`). A folder is *complete* when its marker is there and every
  file it lists has that size, or when Ray Train's record lists it (Ray records a checkpoint only
  when every rank has reported it);
- resume (`plan_resume`, on the driver before `fit()`): the newest complete folder. When Ray Train's
  record names exactly that folder it is left to hand it over; when the record is missing, behind,
  unreadable or names folders that are gone, it is moved aside (``.superseded``) and the folder is
  passed to the workers (``resume_from``), who load it when Ray Train hands them nothing;
- keeping (`prune`): incomplete folders and complete ones beyond the newest `keep` are deleted, never
  one that Ray Train's record still lists.

Works on a local folder or a cloud URI (pyarrow.fs), like Ray Train's own storage.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("hadpo.train")

MARKER = "hadpo_complete.json"
STATE_FILE = "trainer_state.pt"  # what every checkpoint of the recipe holds (step, schedule, ...)
RAY_RECORD = "checkpoint_manager_snapshot.json"  # Ray Train V2's record (ray.train.v2._internal.constants)
_OURS = re.compile(r"^checkpoint_(\d{8})_(\d{8}-\d{6}\.\d{6})$")


def checkpoint_dir_name(step: int) -> str:
    """The folder name of the checkpoint after optimizer step `step` (unique: the time is part of it)."""
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}"
    return f"checkpoint_{step:08d}_{stamp}"


def step_of(name: str) -> int | None:
    """The step in a name made by `checkpoint_dir_name`; None for other names (Ray's own default)."""
    match = _OURS.match(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class FoundCheckpoint:
    name: str
    path: str              # local path or URI of the folder
    step: int | None       # from the marker, else from the name; None when neither tells
    complete: bool
    why: str               # how completeness was decided, or what is missing


@dataclass(frozen=True)
class ResumePlan:
    resume_from: str | None      # folder the workers load when Ray Train hands them no checkpoint
    ray_record_kept: bool        # Ray Train's record names the newest complete folder and is left in place
    removed: tuple[str, ...]     # folders deleted (incomplete, or beyond keep)
    reason: str


# ----------------------------------------------------------------------------------------------
# Storage


def _fs(path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path)


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _read_text(fs, path: str) -> str | None:
    import pyarrow.fs

    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as handle:
        return handle.read().decode("utf-8")


def _write_atomic(fs, path: str, text: str) -> None:
    """Write `path` whole or not at all: a temporary name, then a rename (on object stores a single
    put is already atomic, and move is copy + delete of that whole object)."""
    temp = f"{path}.{int(time.time() * 1e6)}.tmp"
    with fs.open_output_stream(temp) as handle:
        handle.write(text.encode("utf-8"))
    fs.move(temp, path)


def _files(fs, folder: str) -> dict[str, int]:
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(folder, recursive=True))
    prefix = folder.rstrip("/") + "/"
    return {info.path[len(prefix):]: int(info.size) for info in infos if info.type == pyarrow.fs.FileType.File}


# ----------------------------------------------------------------------------------------------
# Writing (on the workers)


def mark_complete(run_path: str, name: str, step: int, rank: int, world_size: int) -> None:
    """After every rank's report of checkpoint `name`: wait for all ranks, then rank 0 writes the marker.

    Must be called on every rank (it holds a barrier when there are several).
    """
    import torch.distributed as dist

    if world_size > 1 and dist.is_initialized():
        dist.barrier()
    if rank != 0:
        return
    filesystem, run = _fs(run_path)
    folder = _join(run, name)
    files = {path: size for path, size in _files(filesystem, folder).items() if not path.startswith(MARKER)}
    _write_atomic(filesystem, _join(folder, MARKER), json.dumps(
        {"step": step, "world_size": world_size, "files": files, "time": time.time()}, indent=1, sort_keys=True))


# ----------------------------------------------------------------------------------------------
# Reading (on the driver)


def _ray_record(filesystem, run: str) -> tuple[dict[str, Any] | None, str]:
    """Ray Train's record of the run as JSON (None when absent or unreadable), and what is wrong with it."""
    text = _read_text(filesystem, _join(run, RAY_RECORD))
    if text is None:
        return None, "Ray Train's record is missing"
    try:
        record = json.loads(text)
        return record, ""
    except json.JSONDecodeError as error:
        return None, f"Ray Train's record is not valid JSON ({error})"


def _recorded_names(record: dict[str, Any] | None) -> tuple[str | None, set[str]]:
    if not record:
        return None, set()
    latest = (record.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    listed = {item.get("checkpoint_dir_name") for item in record.get("checkpoint_results") or []}
    listed |= {item.get("checkpoint_dir_name") for item in record.get("pending_training_results") or []}
    return latest, {name for name in listed if name}


def _validate(filesystem, folder: str, name: str, recorded: bool) -> FoundCheckpoint:
    path_step = step_of(name)
    text = _read_text(filesystem, _join(folder, MARKER))
    if text is None:
        if recorded and STATE_FILE in _files(filesystem, folder):
            return FoundCheckpoint(name, folder, path_step, True, "listed in Ray Train's record")
        return FoundCheckpoint(name, folder, path_step, False, f"no {MARKER} (the run stopped while writing it)")
    try:
        marker = json.loads(text)
        expected = {str(k): int(v) for k, v in marker["files"].items()}
        step = int(marker["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        return FoundCheckpoint(name, folder, path_step, False, f"{MARKER} unreadable ({error})")
    present = _files(filesystem, folder)
    missing = [p for p in expected if p not in present]
    wrong = [p for p in expected if p in present and present[p] != expected[p]]
    if missing or wrong:
        shown = ", ".join((missing + wrong)[:3])
        return FoundCheckpoint(name, folder, step, False,
                               f"{len(missing)} file(s) missing and {len(wrong)} of another size ({shown})")
    return FoundCheckpoint(name, folder, step, True, "complete")


def scan(run_path: str) -> list[FoundCheckpoint]:
    """Every ``checkpoint_*`` folder of a run, validated, oldest first (by step, then name)."""
    import pyarrow.fs

    filesystem, run = _fs(run_path)
    if filesystem.get_file_info(run).type != pyarrow.fs.FileType.Directory:
        return []
    record, _ = _ray_record(filesystem, run)
    _, listed = _recorded_names(record)
    found = []
    for info in filesystem.get_file_info(pyarrow.fs.FileSelector(run)):
        name = info.path.rstrip("/").rsplit("/", 1)[-1]
        if info.type == pyarrow.fs.FileType.Directory and name.startswith("checkpoint_"):
            found.append(_validate(filesystem, _uri(run_path, run, name), name, name in listed))
    return sorted(found, key=lambda c: (c.step if c.step is not None else -1, c.name))


def _uri(run_path: str, run: str, name: str) -> str:
    """The folder as the caller spelled the run (a URI stays a URI)."""
    return _join(run_path, name) if "://" in run_path else _join(run, name)


def newest_complete(run_path: str) -> FoundCheckpoint | None:
    complete = [c for c in scan(run_path) if c.complete]
    return complete[-1] if complete else None


def plan_resume(run_path: str, keep: int) -> ResumePlan:
    """Decide, before `fit()`, which folder the run continues from, and tidy the run folder.

    See the module docstring. Ray Train's record is moved aside (not deleted) when it disagrees with
    the disk, so Ray starts its own bookkeeping afresh and the workers load `resume_from`.
    """
    import pyarrow.fs

    filesystem, run = _fs(run_path)
    if filesystem.get_file_info(run).type != pyarrow.fs.FileType.Directory:
        return ResumePlan(None, False, (), "a new run")
    found = scan(run_path)
    complete = [c for c in found if c.complete]
    newest = complete[-1] if complete else None
    record, problem = _ray_record(filesystem, run)
    latest, listed = _recorded_names(record)
    gone = sorted(name for name in listed if name not in {c.name for c in found})
    if record is not None:
        import ray

        if record.get("ray_version") not in (None, ray.__version__):
            problem = f"Ray Train's record was written by Ray {record.get('ray_version')}"
        elif gone:
            problem = f"Ray Train's record lists folders that are gone ({', '.join(gone[:3])})"
        elif newest is not None and latest != newest.name:
            problem = f"Ray Train's record ends at {latest or 'no checkpoint'}, not at the newest complete folder"
    keep_record = record is not None and not problem and (newest is None or latest == newest.name)
    record_file = _join(run, RAY_RECORD)
    if not keep_record and filesystem.get_file_info(record_file).type == pyarrow.fs.FileType.File:
        filesystem.move(record_file, record_file + ".superseded")
    removed = tuple(prune(run_path, keep, protect={newest.name} if newest else set()))
    if newest is None:
        reason = "no complete checkpoint on disk: starting from step 0"
    elif keep_record:
        reason = f"Ray Train's record and the disk agree: continuing from {newest.name} (step {newest.step})"
    else:
        reason = f"{problem}: continuing from {newest.name} (step {newest.step}), the newest complete checkpoint"
    return ResumePlan(None if (keep_record or newest is None) else newest.path, keep_record, removed, reason)


def prune(run_path: str, keep: int, protect: set[str] | None = None) -> list[str]:
    """Delete incomplete folders and complete ones beyond the newest `keep`; never one Ray Train's record
    lists or one in `protect`. Returns the names deleted."""
    filesystem, run = _fs(run_path)
    record, _ = _ray_record(filesystem, run)
    _, listed = _recorded_names(record)
    spared = listed | set(protect or ())
    found = scan(run_path)
    complete = [c for c in found if c.complete]
    kept = {c.name for c in complete[-keep:]} if keep > 0 else set()
    removed = []
    for checkpoint in found:
        if checkpoint.name in kept or checkpoint.name in spared:
            continue
        filesystem.delete_dir(_join(run, checkpoint.name))
        removed.append(checkpoint.name)
        log.info("checkpoint %s deleted (%s)", checkpoint.name,
                 "incomplete: " + checkpoint.why if not checkpoint.complete else f"beyond keep_checkpoints={keep}")
    return removed
