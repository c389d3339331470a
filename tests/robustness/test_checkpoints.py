"""Resume never goes back past a complete checkpoint on disk, and keep_checkpoints holds on disk.

Pure tests lay out run folders as the workers and Ray Train V2 leave them (checkpoint folders, our
completion markers, Ray's ``checkpoint_manager_snapshot.json``); the slow test trains for real and
breaks Ray's record the way a kill between the checkpoint folder and the record does.
"""

from __future__ import annotations

import json
import shutil

import pytest
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


@pytest.mark.slow
def test_a_rerun_continues_from_the_newest_complete_checkpoint_whatever_rays_record_says(
        ray_session, synth_world, tiny_model_dir, tmp_path):
    import pyarrow.parquet as pq

    from orchestrator.train.trainer import run_training, storage_path
    from tests.train import sample_preference_rows, tiny_config

    rows = ray.data.from_items(sample_preference_rows(tmp_path, synth_world[0], 4))

    def train(max_steps):
        config = tiny_config(tmp_path, synth_world[0], "name=resume", f"train.max_steps={max_steps}",
                             "train.checkpoint_every_steps=2", "train.keep_checkpoints=2", "train.log_every_steps=2",
                             "train.reference_cache=false", "train.deepspeed.enabled=false", "scaling.num_workers=1",
                             "train.batch_size_per_worker=2", "wandb.mode=disabled")
        return run_training(config, "dpo", base_model=str(tiny_model_dir), dataset=rows)

    first = train(4)
    run = tmp_path / "resume" / "train" / "resume-dpo"
    assert str(run) == f"{storage_path(tiny_config(tmp_path, synth_world[0], 'name=resume'))}/resume-dpo"
    assert [c.step for c in checkpoints.scan(str(run)) if c.complete] == [2, 4]
    assert all((run / c.name / MARKER).is_file() for c in checkpoints.scan(str(run)))

    # Ray's record falls behind (it still says step 2) and a half-written folder of a later step lies there
    record = json.loads((run / RAY_RECORD).read_text())
    step2 = [c.name for c in checkpoints.scan(str(run)) if c.step == 2][0]
    record["latest_checkpoint_result"]["checkpoint_dir_name"] = step2
    record["checkpoint_results"] = [r for r in record["checkpoint_results"] if r["checkpoint_dir_name"] == step2]
    (run / RAY_RECORD).write_text(json.dumps(record))
    half = run / checkpoint_dir_name(6)
    shutil.copytree(run / first.checkpoint_path.split("/")[-2], half)
    (half / MARKER).unlink()

    second = train(6)
    assert second.metrics["resumed_from_step"] == 4 and second.metrics["step"] == 6
    assert not half.exists()
    kept = checkpoints.scan(str(run))
    assert [c.step for c in kept] == [4, 6] and all(c.complete for c in kept)  # keep_checkpoints=2 on disk
    curves = pq.read_table(second.curves_path).to_pylist()
    assert [row["step"] for row in curves] == [2, 4, 6]  # one history, nothing trained twice
