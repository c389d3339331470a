"""Image paths read from data stay inside their root: escaping or absolute names are named, counted rejects.

Every test asserts the message names the file, the record and the field, and that the good records of
the same file are all still read (nothing finished is lost).
"""

from __future__ import annotations

import json
import os

import pytest

from orchestrator.config import config_from_dict
from orchestrator.data import datasets, formats
from orchestrator.data.schema import DataFormatError, ImagePathRejected
from orchestrator.paths import PathOutsideRoot, absolute_path, contained_path

QUESTION = {"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a dog?", "label": "yes"}


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# The rule


@pytest.mark.parametrize("name, expected", [
    ("a.jpg", "/data/coco/a.jpg"),
    ("sub/../a.jpg", "/data/coco/a.jpg"),      # climbs, but stays inside
    ("./sub/./b.jpg", "/data/coco/sub/b.jpg"),
])
def test_a_name_inside_the_root_is_joined_and_normalised(name, expected):
    assert contained_path("/data/coco", name) == expected


@pytest.mark.parametrize("name, words", [
    ("../secret.jpg", "leaves its root /data/coco"),
    ("a/../../x.jpg", "leaves its root"),
    ("/etc/passwd", "is an absolute path"),
    ("~/x.jpg", "is an absolute path"),
    ("s3://other-bucket/x.jpg", "is an absolute path"),
    ("..\\..\\windows.jpg", "leaves its root"),
])
def test_an_escaping_or_absolute_name_is_refused(name, words):
    with pytest.raises(PathOutsideRoot) as excinfo:
        contained_path("/data/coco", name)
    assert words in str(excinfo.value) and repr(name) in str(excinfo.value)


def test_absolute_names_pass_only_when_allowed_and_relative_ones_still_may_not_escape():
    assert contained_path("/data/coco", "/mnt/images/a.jpg", allow_absolute=True) == "/mnt/images/a.jpg"
    with pytest.raises(PathOutsideRoot):
        contained_path("/data/coco", "../a.jpg", allow_absolute=True)


def test_uri_roots_contain_too():
    assert contained_path("s3://bucket/coco/", "x/a.jpg") == "s3://bucket/coco/x/a.jpg"
    with pytest.raises(PathOutsideRoot):
        contained_path("s3://bucket/coco", "../../other/a.jpg")


def test_config_paths_become_absolute_once_and_uris_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_path("runs") == str(tmp_path / "runs")
    assert absolute_path("s3://b/x") == "s3://b/x"
    config = config_from_dict({"output_root": "runs", "model": {"path": "models/m"},
                               "data": {"pope": {"questions": {"random": "pope/r.json"}, "image_root": "coco"}},
                               "train": {"storage_path": "gs://bucket/ckpt"}})
    assert config.output_root == str(tmp_path / "runs") and config.model.path == str(tmp_path / "models/m")
    assert config.data.pope.questions == {"random": str(tmp_path / "pope/r.json")}
    assert config.data.pope.image_root == str(tmp_path / "coco")
    assert config.train.storage_path == "gs://bucket/ckpt"
    several = config_from_dict({"data": {"pope": {"datasets": {"gqa": {"questions": {"random": "g/r.json"},
                                                                         "image_root": "gqa/images"}}}}})
    sources = config_from_dict({"data": {"preference": [{"format": "trl", "path": "d/train-*.parquet",
                                                         "image_root": "images"}]}, "mlflow": {"store": "mlruns"}})
    assert sources.data.preference[0].path == str(tmp_path / "d/train-*.parquet")
    assert sources.data.preference[0].image_root == str(tmp_path / "images")
    assert sources.mlflow.store == str(tmp_path / "mlruns")  # rank 0 writes it, from another directory
    gqa = several.data.pope.datasets["gqa"]
    assert gqa.questions == {"random": str(tmp_path / "g/r.json")} and gqa.image_root == str(tmp_path / "gqa/images")
    # what a Ray worker re-validates from the driver's dump does not depend on the worker's directory
    monkeypatch.chdir("/")
    again = type(config).model_validate(config.model_dump(mode="json"))
    assert again.output_root == str(tmp_path / "runs") and again.run_dir == tmp_path / "runs" / again.name


# ----------------------------------------------------------------------------------------------
# The readers


def test_pope_question_with_an_escaping_image_is_a_named_reject_and_the_rest_is_read(tmp_path):
    path = write_lines(tmp_path / "coco_pope_random.json", [
        QUESTION, {**QUESTION, "question_id": 2, "image": "../../../etc/passwd"},
        {**QUESTION, "question_id": 3, "image": "/etc/passwd"}, {**QUESTION, "question_id": 4}])
    rejects: list[dict] = []
    rows = formats.read_pope_questions(path, image_root=tmp_path / "coco", rejects=rejects)
    assert [row["question_id"] for row in rows] == [1, 4]
    assert all(row["image"] == str(tmp_path / "coco" / QUESTION["image"]) for row in rows)
    assert [r["question_id"] for r in rejects] == [2, 3]
    for reject, record in zip(rejects, (2, 3)):
        assert reject["error"].startswith(formats.REJECTED_PATH)
        assert "coco_pope_random.json" in reject["error"] and f"record {record}" in reject["error"]
        assert "field 'image'" in reject["error"]
    # the version counts every question of the file, rejects included (it is the file's identity)
    assert rows[0]["version"].endswith("/n4") and rejects[0]["version"] == rows[0]["version"]
    # without a list for rejects, the reader raises instead of dropping anything
    with pytest.raises(ImagePathRejected) as excinfo:
        formats.read_pope_questions(path, image_root=tmp_path / "coco")
    assert excinfo.value.record == 2 and excinfo.value.field == "image"


def test_absolute_pope_images_are_read_when_the_config_allows_them(tmp_path):
    path = write_lines(tmp_path / "coco_pope_random.json", [{**QUESTION, "image": "/mnt/coco/a.jpg"}])
    (row,) = formats.read_pope_questions(path, image_root=tmp_path, allow_absolute=True, rejects=[])
    assert row["image"] == "/mnt/coco/a.jpg"


def test_an_empty_pope_split_file_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "coco_pope_popular.json"
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataFormatError) as excinfo:
        formats.read_pope_questions(path)
    assert str(path) in str(excinfo.value) and "at least one question" in str(excinfo.value)
    (tmp_path / "array.json").write_text("[]")
    with pytest.raises(DataFormatError, match="array.json.*at least one question"):
        formats.read_pope_questions(tmp_path / "array.json")


def milebench_task(root, samples):
    task = root / "Task"
    task.mkdir()
    (task / "Task.json").write_text(json.dumps({
        "meta_data": {"task_instruction": ["Look."], "question_type": "open-ended"}, "data": samples}))
    return task


def sample(sample_id, images):
    return {"sample_id": sample_id, "task_instruction_id": 0, "response": "r",
            "task_instance": {"context": "{image#1}", "images_path": images}}


def test_milebench_sample_with_an_escaping_image_is_a_named_reject(tmp_path):
    task = milebench_task(tmp_path, [sample("a", ["1.jpg"]), sample("b", ["2.jpg", "../../../x.jpg"]),
                                     sample("c", ["3.jpg"])])
    rejects: list[dict] = []
    rows = formats.read_milebench_task(task, rejects=rejects)
    assert [row["sample_id"] for row in rows] == ["a", "c"]
    (reject,) = rejects
    assert reject["sample_id"] == "b" and "Task.json" in reject["error"] and "record 1" in reject["error"]
    assert "task_instance.images_path[1]" in reject["error"]


def test_an_empty_milebench_task_is_an_error_naming_its_file(tmp_path):
    task = milebench_task(tmp_path, [])
    with pytest.raises(DataFormatError) as excinfo:
        formats.read_milebench_task(task)
    assert "Task.json" in str(excinfo.value) and excinfo.value.field == "data"


def test_a_vg_url_that_climbs_out_makes_every_record_using_it_a_reject(tmp_path):
    image_data = tmp_path / "image_data.json"
    image_data.write_text(json.dumps([{"image_id": 1, "url": "http://x/VG_100K/1.jpg"},
                                      {"image_id": 2, "url": "http://x/../2.jpg"}]))
    images = formats.vg_image_paths(image_data, tmp_path / "VG")
    assert images["1"] == str(tmp_path / "VG/VG_100K/1.jpg") and isinstance(images["2"], ImagePathRejected)
    desc = tmp_path / "desc_data.json"
    desc.write_text(json.dumps({"1": {"chosen": ["c"], "rejected": ["r"]}, "2": {"chosen": ["c"], "rejected": ["r"]}}))
    rejects: list[dict] = []
    rows = formats.read_hadpo_desc(desc, images, rejects=rejects, repeats=2)
    assert sorted(row["sample_id"] for row in rows) == ["desc-1-0", "desc-1-1"]
    assert sorted(r["sample_id"] for r in rejects) == ["desc-2-0", "desc-2-1"]
    assert all("image_data.json" in r["error"] and "field 'url'" in r["error"] for r in rejects)
    # the surviving record draws exactly what it drew when nothing was refused
    clean = {k: v for k, v in images.items() if k == "1"}
    desc_one = tmp_path / "one.json"
    desc_one.write_text(json.dumps({"1": {"chosen": ["c"], "rejected": ["r"]}}))
    assert formats.read_hadpo_desc(desc_one, clean, repeats=2)[0]["prompt"] == rows[0]["prompt"]
    pope_data = tmp_path / "pope_data.json"
    pope_data.write_text(json.dumps([
        {"image_id": 2, "question": "q", "answer": "a", "chosen": "c", "reject": "r", "correct": False},
        {"image_id": 1, "question": "q", "answer": "a", "chosen": "c", "reject": "r", "correct": False}]))
    rejects = []
    assert [row["sample_id"] for row in formats.read_hadpo_pope(pope_data, images, rejects=rejects)] == ["pope-1"]
    assert [r["sample_id"] for r in rejects] == ["pope-0"]
    sft = tmp_path / "sft.json"
    sft.write_text(json.dumps([{"image_id": 2, "prompt": "p", "response": "r"}]))
    rejects = []
    assert formats.read_sft(sft, images, rejects=rejects) == [] and len(rejects) == 1


def test_pope_rows_without_an_image_root_look_next_to_the_question_file(tmp_path, monkeypatch):
    folder = tmp_path / "pope"
    folder.mkdir()
    write_lines(folder / "coco_pope_random.json", [QUESTION, {**QUESTION, "question_id": 2, "image": "/etc/passwd"}])
    monkeypatch.chdir("/")  # a worker's directory: must not matter
    config = config_from_dict({"output_root": str(tmp_path / "runs"),
                               "data": {"pope": {"questions": {"random": str(folder / "coco_pope_random.json")}}}})
    rejects: list[dict] = []
    (row,) = datasets.pope_rows(config, rejects)
    assert row["image"] == os.path.join(folder, QUESTION["image"])
    assert len(rejects) == 1 and "/etc/passwd" in rejects[0]["error"]


def _path_like_keys(model_type, prefix=""):
    """Config keys that name files or folders, by name or description (a heuristic that errs on the side of
    listing too much; the test below fails for a new path key nobody added to PATH_KEYS)."""
    import re
    import typing

    from pydantic import BaseModel

    keys = []
    for name, info in model_type.model_fields.items():
        dotted = f"{prefix}{name}"
        annotation = info.annotation
        nested = [a for a in typing.get_args(annotation) or (annotation,) if isinstance(a, type)
                  and issubclass(a, BaseModel)]
        if nested:  # a section, or a mapping / list of sections ("*" stands for each name or item)
            mapping = typing.get_origin(annotation) in (dict, list)
            keys += _path_like_keys(nested[0], dotted + (".*." if mapping else "."))
            continue
        text = f"{name} {info.description or ''}"
        holds_text = (typing.get_origin(annotation) is not list and str in (typing.get_args(annotation) or (annotation,))
                      or annotation == dict[str, str])
        if holds_text and re.search(r"(path|root|_dir|home)\b|\.json|folder|file", text):
            keys.append(dotted + (".*" if typing.get_origin(annotation) is dict else ""))
    return keys


def test_every_path_like_config_key_is_made_absolute():
    from orchestrator.config import PATH_KEYS, ExperimentConfig

    keys = _path_like_keys(ExperimentConfig)
    assert {"output_root", "data.hadpo_desc", "data.pope.questions.*", "data.pope.datasets.*.image_root",
            "data.preference.*.path", "model.path", "mlflow.store"} <= set(keys)
    assert set(keys) <= set(PATH_KEYS), sorted(set(keys) - set(PATH_KEYS))
