"""Resume never goes back past a complete checkpoint on disk, and keep_checkpoints holds on disk.

These tests lay out run folders as the workers and Ray Train V2 leave them (checkpoint folders, our
completion markers, Ray's ``checkpoint_manager_snapshot.json``). The same behaviour on a real run (its
record broken the way a kill between the checkpoint folder and the record breaks it, then a rerun) is
tests/train/test_training.py's rerun test, which continues a run those tests train anyway.
"""

from __future__ import annotations

import json
import shutil

import ray

from orchestrator.train import checkpoints
from orchestrator.train.checkpoints import MARKER, RAY_RECORD, checkpoint_dir_name, mark_complete, plan_resume, prune


def write_checkpoint(run, step, complete=True, name=None):
    name = name or checkpoint_dir_name(step)
    folder = run / name
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"w" * (100 + step))
    (folder / "trainer_state.pt").write_bytes(b"s" * 10)
    if complete:
        mark_complete(str(run), name, step, rank=0, world_size=1)
    return name


def write_ray_record(run, latest, listed):
    entry = lambda name: {"checkpoint_dir_name": name, "metrics": {}}  # noqa: E731
    (run / RAY_RECORD).write_text(json.dumps({
        "ray_version": ray.__version__, "checkpoint_results": [entry(n) for n in listed],
        "checkpoint_report_indices": list(range(len(listed))), "latest_checkpoint_result": entry(latest),
        "pending_training_results": [], "pending_validation_specs": [], "current_report_index": len(listed),
        "validated_checkpoint_dir_names": [], "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": []}))


def test_names_sort_by_step_and_say_their_step():
    names = [checkpoint_dir_name(step) for step in (10, 2, 100)]
    assert [checkpoints.step_of(n) for n in sorted(names)] == [2, 10, 100]
    assert checkpoints.step_of("checkpoint_2025-01-01_00-00-00.000000") is None  # Ray's default name


def test_the_marker_lists_every_file_and_a_damaged_folder_is_not_complete(tmp_path):
    name = write_checkpoint(tmp_path, 4)
    marker = json.loads((tmp_path / name / MARKER).read_text())
    assert marker["step"] == 4 and set(marker["files"]) == {"adapter/adapter_model.safetensors", "trainer_state.pt"}
    assert [c.complete for c in checkpoints.scan(str(tmp_path))] == [True]
    shutil.rmtree(tmp_path / name / "adapter")  # e.g. a user deleted the adapter folder
    (found,) = checkpoints.scan(str(tmp_path))
    assert not found.complete and "1 file(s) missing" in found.why and "adapter_model" in found.why


def test_killed_after_the_folder_but_before_rays_record_resumes_from_the_folder(tmp_path):
    first, second = write_checkpoint(tmp_path, 2), write_checkpoint(tmp_path, 4)
    write_ray_record(tmp_path, first, [first])  # Ray recorded step 2; the kill came before step 4's record
    plan = plan_resume(str(tmp_path), keep=2)
    assert plan.resume_from == str(tmp_path / second) and not plan.ray_record_kept
    assert f"record ends at {first}, not at the newest complete folder" in plan.reason and "step 4" in plan.reason
    assert not (tmp_path / RAY_RECORD).exists() and (tmp_path / (RAY_RECORD + ".superseded")).exists()
    assert {c.name for c in checkpoints.scan(str(tmp_path))} == {first, second}  # nothing complete was lost


def test_no_ray_record_at_all_still_resumes_from_the_newest_complete_folder(tmp_path):
    write_checkpoint(tmp_path, 2)
    newest = write_checkpoint(tmp_path, 6)
    orphan = write_checkpoint(tmp_path, 8, complete=False)  # killed while the ranks were still uploading
    plan = plan_resume(str(tmp_path), keep=2)
    assert plan.resume_from == str(tmp_path / newest) and "missing" in plan.reason
    assert plan.removed == (orphan,) and not (tmp_path / orphan).exists()


def test_a_record_that_agrees_with_the_disk_is_left_to_ray(tmp_path):
    first, second = write_checkpoint(tmp_path, 2), write_checkpoint(tmp_path, 4)
    write_ray_record(tmp_path, second, [first, second])
    plan = plan_resume(str(tmp_path), keep=2)
    assert plan.resume_from is None and plan.ray_record_kept and (tmp_path / RAY_RECORD).exists()


def test_a_folder_ray_recorded_before_our_marker_was_written_counts_as_complete(tmp_path):
    first = write_checkpoint(tmp_path, 2)
    second = write_checkpoint(tmp_path, 4, complete=False)  # killed between Ray's record and our marker
    write_ray_record(tmp_path, second, [first, second])
    plan = plan_resume(str(tmp_path), keep=2)
    assert plan.ray_record_kept and plan.resume_from is None and (tmp_path / second).exists()


def test_a_record_naming_a_damaged_newest_folder_falls_back_to_the_one_before(tmp_path):
    first, second = write_checkpoint(tmp_path, 2), write_checkpoint(tmp_path, 4)
    write_ray_record(tmp_path, second, [first, second])
    (tmp_path / second / MARKER).write_text("{not json")
    shutil.rmtree(tmp_path / second / "adapter")
    plan = plan_resume(str(tmp_path), keep=2)
    assert plan.resume_from == str(tmp_path / first) and not plan.ray_record_kept
    assert plan.removed == (second,)  # unusable: Ray would hand it over and the restore would fail


def test_keep_checkpoints_holds_on_disk_but_never_deletes_what_rays_record_lists(tmp_path):
    names = [write_checkpoint(tmp_path, step) for step in (2, 4, 6, 8)]
    write_ray_record(tmp_path, names[3], [names[0], names[3]])
    removed = prune(str(tmp_path), keep=2)
    assert removed == [names[1]]  # names[0] is Ray's; names[2], names[3] are the newest two
    (tmp_path / RAY_RECORD).unlink()
    assert prune(str(tmp_path), keep=2) == [names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == names[2:]
