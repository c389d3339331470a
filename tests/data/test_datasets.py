"""Datasets through Ray Data: uniform rows, recipe semantics, rejects counted and written."""

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest

from orchestrator.config import config_from_dict
from orchestrator.data import datasets
from orchestrator.data.schema import DataFormatError, MILEBENCH_COLUMNS, POPE_COLUMNS, PREFERENCE_COLUMNS


@pytest.fixture()
def world_copy(synth_world, tmp_path):
    """A private copy of the synthetic world that a test may break."""
    world, _ = synth_world
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    return copy


def synthetic_config(world, tmp_path, **data):
    return config_from_dict({"name": "t", "output_root": str(tmp_path / "runs"),
                             "data": {"synthetic_dir": str(world), **data}})


def real_config(world, tmp_path):
    """The same files named explicitly, as a user with real data would."""
    return config_from_dict({"name": "t", "output_root": str(tmp_path / "runs"), "data": {
        "hadpo_desc": str(world / "hadpo/desc_data.json"), "hadpo_pope": str(world / "hadpo/pope_data.json"),
        "vg_image_data": str(world / "VG/image_data.json"), "vg_root": str(world / "VG"),
        "pope": {"questions": {s: str(world / f"pope/coco_pope_{s}.json") for s in datasets.POPE_SPLITS},
                 "image_root": str(world / "coco/val2014")},
        "milebench_root": str(world / "milebench")}})


def test_preference_rows_follow_the_recipe(synth_world, tmp_path):
    world, _ = synth_world
    config = synthetic_config(world, tmp_path)
    stats = {}
    rows = datasets.preference_rows(config, stats)
    desc_images = json.loads((world / "hadpo/desc_data.json").read_text())
    pope_records = json.loads((world / "hadpo/pope_data.json").read_text())
    usable_pope = [r for r in pope_records if not r["correct"]]
    assert stats["skipped_correct"] == len(pope_records) - len(usable_pope) > 0
    assert len(rows) == len(usable_pope) + 2 * len(desc_images)
    assert all(tuple(row) == PREFERENCE_COLUMNS for row in rows)
    assert len({row["sample_id"] for row in rows}) == len(rows)
    assert rows == datasets.preference_rows(config)  # the draw is seeded


def test_preference_rows_are_in_ha_dpo_list_order(synth_world, tmp_path):
    """Upstream `LazySupervisedDataset.__init__` (ha_dpo/models/llava-v1_5/train_dpo.py):
    ``list_data_dict = pope_data_dict + desc_data_dict*2``: pope pairs first, then all descriptions, twice."""
    world, _ = synth_world
    rows = datasets.preference_rows(synthetic_config(world, tmp_path))
    pope_records = json.loads((world / "hadpo/pope_data.json").read_text())
    desc_ids = list(json.loads((world / "hadpo/desc_data.json").read_text()))
    usable = [f"pope-{i}" for i, r in enumerate(pope_records) if not r["correct"]]
    expected = usable + [f"desc-{i}-0" for i in desc_ids] + [f"desc-{i}-1" for i in desc_ids]
    assert [row["sample_id"] for row in rows] == expected
    assert [row["list_index"] for row in rows] == list(range(len(rows)))


def test_several_pope_datasets_each_read_with_their_own_image_root(synth_world, tmp_path):
    from tests.pope_datasets import coco_entry, write_gqa_like_pope

    world, _ = synth_world
    gqa = write_gqa_like_pope(world, tmp_path)
    config = config_from_dict({"name": "t", "output_root": str(tmp_path / "runs"),
                               "data": {"pope": {"datasets": {"coco": coco_entry(world), "gqa": gqa}}}})
    paths = datasets.resolve_data_paths(config)
    assert not paths.synthetic and set(paths.pope) == {"coco", "gqa"}
    rows = datasets.pope_rows(config)
    assert all(tuple(row) == POPE_COLUMNS for row in rows)
    by_dataset = {name: [r for r in rows if r["dataset"] == name] for name in ("coco", "gqa")}
    assert {r["split"] for r in by_dataset["coco"]} == set(datasets.POPE_SPLITS)
    assert {r["split"] for r in by_dataset["gqa"]} == {"random", "adversarial"}
    assert all(r["image"].startswith(gqa["image_root"]) and os.path.isfile(r["image"]) for r in by_dataset["gqa"])
    assert not any(r["image"].startswith(gqa["image_root"]) for r in by_dataset["coco"])
    # each file has its own version; the single form reads the same COCO rows as the dataset named coco
    versions = {(r["dataset"], r["split"]): r["version"] for r in rows}
    assert len(set(versions.values())) == len(versions) == 5
    single = config_from_dict({"name": "t", "output_root": str(tmp_path / "runs"), "data": {"pope": coco_entry(world)}})
    assert datasets.pope_rows(single) == by_dataset["coco"]


def test_real_paths_and_synthetic_default_read_the_same_rows(synth_world, tmp_path):
    world, _ = synth_world
    assert datasets.preference_rows(real_config(world, tmp_path)) == \
        datasets.preference_rows(synthetic_config(world, tmp_path))
    assert datasets.pope_rows(real_config(world, tmp_path)) == datasets.pope_rows(synthetic_config(world, tmp_path))


def test_synthetic_world_is_generated_on_first_use(tmp_path):
    config = config_from_dict({"output_root": str(tmp_path), "data": {"synthetic": {
        "num_images": 12, "num_pope_images": 6, "milebench_samples": 2}}})
    assert not (tmp_path / "world").exists()
    paths = datasets.resolve_data_paths(config)
    assert paths.synthetic and (tmp_path / "world" / "world.json").is_file()
    assert set(paths.pope) == {"coco"} and set(paths.pope["coco"].questions) == {"random", "popular", "adversarial"}


def test_the_default_world_follows_data_synthetic_and_an_explicit_one_is_used_as_it_is(tmp_path):
    def world_config(num_pope_images: int, **data):
        return config_from_dict({"output_root": str(tmp_path), "data": {**data, "synthetic": {
            "num_images": 12, "num_pope_images": num_pope_images, "milebench_samples": 2}}})

    def pope_images(world):
        return json.loads((world / "world.json").read_text())["config"]["num_pope_images"]

    world = datasets.ensure_synthetic_world(world_config(6))
    made = (world / "world.json").stat().st_mtime_ns
    assert datasets.ensure_synthetic_world(world_config(6)) == world and (world / "world.json").stat().st_mtime_ns == made
    datasets.ensure_synthetic_world(world_config(8))  # an earlier demo's world, say: made again with these settings
    assert pope_images(world) == 8 and len(list((world / "coco" / "val2014").iterdir())) == 8
    assert datasets.ensure_synthetic_world(world_config(6, synthetic_dir=str(world))) == world and pope_images(world) == 8


def test_checked_dataset_counts_and_writes_rejects(ray_session, world_copy, tmp_path):
    config = synthetic_config(world_copy, tmp_path)
    rows = datasets.preference_rows(config)
    missing, corrupt = rows[0]["image"], next(r["image"] for r in rows if r["image"] != rows[0]["image"])
    os.unlink(missing)
    with open(corrupt, "wb") as handle:
        handle.write(b"not a jpeg at all")
    checked = datasets.preference_dataset(config)
    bad = [r for r in rows if r["image"] in (missing, corrupt)]
    assert checked.total == len(rows)
    assert len(checked.rejects) == len(bad) and checked.accepted == len(rows) - len(bad)
    assert checked.dataset.count() == checked.accepted
    assert set(checked.dataset.columns()) == set(PREFERENCE_COLUMNS)
    reasons = {r["sample_id"]: r["error"] for r in checked.rejects}
    assert any(reason.startswith("file not found") for reason in reasons.values())
    assert any(reason.startswith("unreadable image") for reason in reasons.values())
    table = pq.read_table(checked.rejects_path).to_pylist()
    assert sorted(r["sample_id"] for r in table) == sorted(reasons)
    summary = checked.summary()
    assert f"{len(bad)} rejected" in summary and "file not found" in summary and "unreadable image" in summary


def test_pope_and_milebench_datasets_have_uniform_rows(ray_session, synth_world, tmp_path):
    world, _ = synth_world
    config = synthetic_config(world, tmp_path)
    pope = datasets.pope_dataset(config)
    assert pope.rejects == [] and set(pope.dataset.columns()) == set(POPE_COLUMNS)
    rows = pope.dataset.take_all()
    by_split = {split: [r for r in rows if r["split"] == split] for split in datasets.POPE_SPLITS}
    assert all(len(v) == len(by_split["random"]) > 0 for v in by_split.values())
    milebench = datasets.milebench_dataset(config)
    assert milebench.total > 0 and set(milebench.dataset.columns()) == set(MILEBENCH_COLUMNS)
    assert all(len(r["images"]) >= 1 for r in milebench.dataset.take_all())


def test_malformed_record_names_file_record_and_field(world_copy, tmp_path):
    pope_file = world_copy / "hadpo/pope_data.json"
    records = json.loads(pope_file.read_text())
    del records[3]["question"]
    pope_file.write_text(json.dumps(records))
    with pytest.raises(DataFormatError, match=r"pope_data.json: record 3: field 'question'"):
        datasets.preference_rows(synthetic_config(world_copy, tmp_path))


def test_missing_milebench_task_is_named(synth_world, tmp_path):
    world, _ = synth_world
    config = synthetic_config(world, tmp_path, milebench_tasks=["NoSuchTask"])
    with pytest.raises(FileNotFoundError, match="NoSuchTask"):
        datasets.milebench_rows(config)
