"""Training checkpoints: what one holds (written and read back by the workers), and the run's checkpoint
folders on disk (names, completion markers, the folder to resume from).

What a checkpoint holds (`save_checkpoint`, on every rank; `restore_checkpoint` reads it back):
- ``adapter/`` (peft ``save_pretrained``: the LoRA weights only, gathered under ZeRO-3) or ``model/``
  (a full Hugging Face folder with the processor), the stage's weights (`stage_output_dir`);
- ``trainer_state.pt``: step, data position (epoch, micro-batch), world size, the engine and LoRA shape
  it can be resumed with, the metrics reported with it, and for DDP the optimizer and schedule;
- ``rng/rank<k>.pt``: each rank's Python, NumPy, torch (and CUDA) random state;
- for DeepSpeed, ``deepspeed/`` (``engine.save_checkpoint``: optimizer, schedule and the trainable
  weights of every rank; frozen weights are left out).
A checkpoint resumes only the same setup: another stage, LoRA on/off, LoRA shape, engine / ZeRO stage
or number of workers is refused with a message that says what to change. After loading, the live LoRA
weights are compared with the saved adapter, so a silently wrong resume cannot happen.

The folders on disk. Ray Train V2 keeps its own record of a run's checkpoints
(``checkpoint_manager_snapshot.json`` in the run folder) and hands the latest one it recorded to the
workers. That record is written *after* the checkpoint folder: a run killed in between re-ran from step 0
and left the folder behind, beyond `keep_checkpoints`. So this module keeps a record of its own, in each
folder, and trusts the disk:

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

The folders may be on a local disk or a cloud URI (pyarrow.fs), like Ray Train's own storage.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a checkpoint is written or read: the driver and `hadpo` start without it
    import torch

    from orchestrator.config import TrainConfig
    from orchestrator.model.families import LoadedModel
    from orchestrator.train.engine import Engine
    from orchestrator.train.schedule import Schedule, StagePlan

log = logging.getLogger("hadpo.train")

MARKER = "hadpo_complete.json"
STATE_FILE = "trainer_state.pt"  # what every checkpoint of the recipe holds (step, schedule, ...)
DS_TAG = "state"  # DeepSpeed's tag (sub-folder) of the engine state in ``deepspeed/``
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
# Writing a checkpoint (on the workers)


def save_checkpoint(engine: Engine, loaded: LoadedModel, plan: StagePlan, step: int, schedule: Schedule,
                    train: TrainConfig, rank: int, metrics: dict[str, Any], run_path: str | None = None) -> None:
    """Write this rank's part of a checkpoint into a temp folder and report it (all ranks).

    The folder is named by its step (`checkpoint_dir_name`); once every rank has reported it, rank 0
    marks it complete in the run folder `run_path` (`mark_complete`).
    """
    import ray.train
    import torch

    with tempfile.TemporaryDirectory(prefix="hadpo-ckpt-") as tmp:
        folder = Path(tmp)
        weights = trainable_state(engine)
        if engine.ds is not None:
            engine.ds.save_checkpoint(str(folder / "deepspeed"), tag=DS_TAG, exclude_frozen_parameters=True)
        (folder / "rng").mkdir()
        torch.save(_rng_state(), folder / "rng" / f"rank{rank}.pt")
        if rank == 0:
            if plan.lora:
                engine.module.save_pretrained(str(folder / "adapter"), state_dict=weights)
            else:
                engine.module.save_pretrained(str(folder / "model"), state_dict=weights)
                loaded.save_processing(folder / "model")
            epoch, micro = schedule.position(step, train.gradient_accumulation)
            state = {"step": step, "stage": plan.stage, "lora": plan.lora, "shape": _shape(train, plan, engine),
                     "total_steps": schedule.total_steps, "epoch": epoch, "micro_batch_in_epoch": micro,
                     "world_size": _world_size(), "metrics": dict(metrics)}
            if engine.ds is None:
                state.update(optimizer=engine.optimizer.state_dict(), scheduler=engine.scheduler.state_dict())
            torch.save(state, folder / STATE_FILE)
        name = checkpoint_dir_name(step)
        ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
    if run_path:
        mark_complete(run_path, name, step, rank, _world_size())


def trainable_state(engine: Engine) -> dict[str, torch.Tensor] | None:
    """The trainable parameters (LoRA weights, or the whole trained model) as full tensors on rank 0.

    Must be called on every rank: under ZeRO-3 the partitions are gathered first. Returns None on
    ranks other than 0.
    """
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    module = engine.module
    if engine.zero_stage == 3:
        import deepspeed

        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not _is_peft(module):
            return engine.ds._zero3_consolidated_16bit_state_dict()
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in named} if rank == 0 else None
    if rank != 0:
        return None
    if _is_peft(module):
        return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _shape(train: TrainConfig, plan: StagePlan, engine: Engine) -> dict[str, Any]:
    """What a checkpoint can only be resumed with: the engine and the LoRA shape."""
    lora = train.lora
    return {"engine": engine.describe(),
            "lora": [lora.rank, lora.alpha, sorted(lora.target_modules)] if plan.lora else None}


def _is_peft(module) -> bool:
    return hasattr(module, "peft_config")


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


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
# Reading a checkpoint back (on the workers)


def restore_checkpoint(folder: Path, engine: Engine, plan: StagePlan, train: TrainConfig, rank: int
                       ) -> tuple[int, dict[str, Any]]:
    """Load weights, optimizer, schedule and RNG from a checkpoint folder.

    Returns the step it holds and the metrics reported with it.
    """
    import torch

    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    if state["stage"] != plan.stage or state["lora"] != plan.lora:
        raise ValueError(f"{folder}: checkpoint of stage {state['stage']!r} (lora={state['lora']}) cannot resume "
                         f"stage {plan.stage!r} (lora={plan.lora}); use another run name")
    shape = _shape(train, plan, engine)
    if state.get("shape", shape) != shape:
        raise ValueError(f"{folder}: checkpoint trained {state['shape']}, this run asks for {shape}; a run name "
                         "resumes only the same setup: use another experiment name or resume=False")
    world = _world_size()
    if state.get("world_size", world) != world:
        raise ValueError(f"{folder}: checkpoint written by {state['world_size']} workers cannot resume on {world}; "
                         "resume with the same scaling.num_workers or use another run name")
    if engine.ds is not None:
        path, _ = engine.ds.load_checkpoint(str(folder / "deepspeed"), tag=DS_TAG, load_module_strict=False)
        if path is None:
            raise RuntimeError(f"{folder}: DeepSpeed could not load its checkpoint")
    else:
        _load_weights(folder, engine.module, plan)
        engine.optimizer.load_state_dict(state["optimizer"])
        engine.scheduler.load_state_dict(state["scheduler"])
    rng_file = folder / "rng" / f"rank{rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    if plan.lora:
        _check_restored_adapter(folder / "adapter", engine)
    return int(state["step"]), dict(state.get("metrics", {}))


def _load_weights(folder: Path, module, plan: StagePlan) -> None:
    from safetensors.torch import load_file

    if plan.lora:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(module, load_file(str(folder / "adapter" / "adapter_model.safetensors")))
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"{folder}: unexpected adapter keys {result.unexpected_keys[:5]}")
        return
    # transformers may rename keys on save (checkpoint conversion), so read the folder back the way it
    # was written and copy its weights in, rather than loading the raw safetensors.
    saved = type(module).from_pretrained(str(folder / "model"), dtype=next(module.parameters()).dtype,
                                         local_files_only=True)
    module.load_state_dict(saved.state_dict())


def _check_restored_adapter(adapter_dir: Path, engine: Engine) -> None:
    """Guard against a silently wrong resume: the live LoRA weights must equal the saved adapter."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    current = trainable_state(engine)
    if current is None:
        return
    live = get_peft_model_state_dict(engine.module, state_dict=current)
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    worst = max((live[k].float() - saved[k].float()).abs().max().item() for k in saved)
    if worst > 1e-3 * max(1.0, max(v.float().abs().max().item() for v in saved.values())):
        raise RuntimeError(f"{adapter_dir}: restored LoRA weights differ from the checkpoint (max |diff| {worst})")


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def stage_output_dir(checkpoint_dir: str, lora: bool) -> str:
    """The folder inside a checkpoint that holds the stage's weights (`adapter` or `model`)."""
    return os.path.join(checkpoint_dir, "adapter" if lora else "model")


# ----------------------------------------------------------------------------------------------
# Finding the folder to resume from (on the driver)


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
