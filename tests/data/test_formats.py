"""Tests for orchestrator.data.formats: every reader on valid files (both layouts) and broken ones."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter

import pytest

from orchestrator.data import formats
from orchestrator.data.formats import (
    DESC_PROMPTS,
    coco_image_id,
    coco_image_name,
    image_quantity_level,
    read_hadpo_desc,
    read_hadpo_pope,
    read_milebench_task,
    read_pope_questions,
    read_sft,
    vg_image_paths,
)
from orchestrator.data.schema import (
    MILEBENCH_COLUMNS,
    POPE_COLUMNS,
    PREFERENCE_COLUMNS,
    SFT_COLUMNS,
    DataFormatError,
)

IMAGES = {"1": "/vg/VG_100K_2/1.jpg", "2": "/vg/VG_100K/2.jpg", "3": "/vg/VG_100K/3.jpg"}


def write_json(path, obj, **kwargs):
    path.write_text(json.dumps(obj, **kwargs), encoding="utf-8")
    return path


def assert_error(excinfo, path, record, field):
    """The error names the file, the record and the field, in its message and its attributes."""
    err = excinfo.value
    message = str(err)
    assert os.path.basename(str(path)) in message
    assert err.record == record
    assert err.field == field
    if record is not None:
        assert f"record {record}" in message
    if field is not None:
        assert f"field {field!r}" in message


# ----------------------------------------------------------------------------------------------
# Visual Genome and COCO


def test_vg_image_paths_both_folders(tmp_path):
    data = write_json(tmp_path / "image_data.json", [
        {"image_id": 1, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg", "width": 800},
        {"image_id": 10, "url": "https://cs.stanford.edu/people/rak248/VG_100K/10.jpg"},
    ])
    vg = tmp_path / "VG"
    assert vg_image_paths(data, vg) == {
        "1": str(vg / "VG_100K_2" / "1.jpg"),
        "10": str(vg / "VG_100K" / "10.jpg"),
    }


def test_vg_image_paths_relative_root_becomes_absolute(tmp_path, monkeypatch):
    data = write_json(tmp_path / "image_data.json",
                      [{"image_id": 5, "url": "http://x/VG_100K/5.jpg"}])
    monkeypatch.chdir(tmp_path)
    assert vg_image_paths(data, "data/VG") == {"5": str(tmp_path / "data/VG/VG_100K/5.jpg")}


@pytest.mark.parametrize("records, record, field", [
    ([{"image_id": 1}], 0, "url"),
    ([{"image_id": 1, "url": "http://x/VG_100K/1.jpg"}, {"image_id": "2", "url": "http://x/a/2.jpg"}],
     1, "image_id"),
    ([{"image_id": 1, "url": "1.jpg"}], 0, "url"),
    ([{"image_id": 1, "url": "http://x/a/1.jpg"}, {"image_id": 1, "url": "http://x/b/1.jpg"}],
     1, "image_id"),
    ([["not", "an", "object"]], 0, None),
])
def test_vg_image_paths_bad_records(tmp_path, records, record, field):
    data = write_json(tmp_path / "image_data.json", records)
    with pytest.raises(DataFormatError) as excinfo:
        vg_image_paths(data, tmp_path)
    assert_error(excinfo, data, record, field)


def test_vg_image_paths_invalid_json(tmp_path):
    data = tmp_path / "image_data.json"
    data.write_text('[{"image_id": 1,', encoding="utf-8")
    with pytest.raises(DataFormatError) as excinfo:
        vg_image_paths(data, tmp_path)
    assert_error(excinfo, data, None, None)
    assert "valid JSON" in str(excinfo.value)


def test_coco_names():
    assert coco_image_name(310196) == "COCO_val2014_000000310196.jpg"
    assert coco_image_name(9, "train2014") == "COCO_train2014_000000000009.jpg"
    assert coco_image_id("COCO_val2014_000000310196.jpg") == 310196
    assert coco_image_id("/data/coco2014/val2014/COCO_val2014_000000000042.jpg") == 42
    for image_id in (0, 1, 581929):
        assert coco_image_id(coco_image_name(image_id)) == image_id


@pytest.mark.parametrize("name", ["310196.jpg", "COCO_val2014_310196.jpg", "COCO_val2014_000000310196.png"])
def test_coco_image_id_bad_name(name):
    with pytest.raises(ValueError, match="not a COCO 2014 image name"):
        coco_image_id(name)


def test_coco_image_name_bad_id():
    with pytest.raises(ValueError):
        coco_image_name(-1)


# ----------------------------------------------------------------------------------------------
# HA-DPO description pairs


DESC = {
    "1": {"chosen": ["c1a", "c1b", "c1c"], "rejected": ["r1a", "r1b"]},
    "3": {"chosen": ["c3a", "c3b"], "rejected": ["r3a", "r3b", "r3c"]},
    "2": {"chosen": "c2", "rejected": ["r2a", "r2b"]},
}


def expected_desc_rows(seed=42):
    """The draw the recipe makes: per image in file order, chosen, rejected, then prompt, each with
    random.choice on the value as stored (a string gives one character)."""
    rng = random.Random(seed)
    drawn = []
    for image_id, pair in DESC.items():
        c, r = rng.choice(pair["chosen"]), rng.choice(pair["rejected"])
        drawn.append((image_id, c, r, rng.choice(DESC_PROMPTS)))
    return [
        {"sample_id": f"desc-{i}-{k}", "source": "desc", "image_id": i, "image": IMAGES[i],
         "prompt": p, "chosen": c, "rejected": r, "list_index": k * len(drawn) + position}
        for k in range(2) for position, (i, c, r, p) in enumerate(drawn)
    ]


def test_desc_prompts_are_the_recipe_strings():
    assert DESC_PROMPTS == (
        "Describe this image in detail.",
        "Take a look at this image and describe what you notice.",
        "Please provide a detailed description of the picture.",
        "Could you describe the contents of this image for me?",
    )


def test_read_hadpo_desc_object_layout(tmp_path):
    path = write_json(tmp_path / "desc_data.json", DESC)
    rows = read_hadpo_desc(path, IMAGES)
    assert rows == expected_desc_rows()
    assert all(tuple(row) == PREFERENCE_COLUMNS for row in rows)


def test_read_hadpo_desc_list_layout_draws_the_same(tmp_path):
    records = [{"image_id": int(i), **pair} for i, pair in DESC.items()]
    path = write_json(tmp_path / "desc_data.json", records)
    assert read_hadpo_desc(path, IMAGES) == expected_desc_rows()


def upstream_desc_process(desc_data, seed=42):
    """HA-DPO's ha_dpo/models/llava-v1_5/train_dpo.py, `LazySupervisedDataset.__init__` (random.seed(seed))
    and `desc_process` with sample_strategy "offline", as upstream writes it: (image id, chosen, rejected,
    question) in list order."""
    desc_data = json.loads(json.dumps(desc_data))
    random.seed(seed)
    out = []
    for image_id in desc_data.keys():
        desc_data[image_id]["chosen"] = [random.choice(desc_data[image_id]["chosen"])]
        desc_data[image_id]["rejected"] = [random.choice(desc_data[image_id]["rejected"])]
        for chosen in desc_data[image_id]["chosen"]:
            for rejected in desc_data[image_id]["rejected"]:
                question = random.choice(list(DESC_PROMPTS))
                out.append((image_id, chosen, rejected, question))
    return out


def test_read_hadpo_desc_matches_ha_dpo_desc_process(tmp_path):
    """Upstream `desc_process`: random.seed(42), then random.choice on chosen, rejected, question per image."""
    path = write_json(tmp_path / "desc_data.json", DESC)
    rows = read_hadpo_desc(path, IMAGES)[:3]
    reference = upstream_desc_process(DESC)
    assert [(r["image_id"], r["chosen"], r["rejected"], r["prompt"]) for r in rows] == reference
    # image "2" stores its chosen as the string "c2": upstream's random.choice draws one character of it
    assert reference[2][1] in ("c", "2")


def test_string_answers_whole_keeps_the_string_and_every_other_draw(tmp_path):
    """The deviation `data.desc_string_answers: whole`: the whole string, the generator consumed alike."""
    many = {str(i): {"chosen": f"chosen sentence {i}." if i % 3 == 0 else [f"c{i}-{j}" for j in range(4)],
                     "rejected": [f"r{i}-{j}" for j in range(3)]} for i in range(12)}
    images = {str(i): f"/vg/{i}.jpg" for i in range(12)}
    path = write_json(tmp_path / "desc_data.json", many)
    stats = {}
    upstream = read_hadpo_desc(path, images, stats=stats)
    whole = read_hadpo_desc(path, images, string_answers="whole")
    assert stats == {"desc_string_answers": 4}
    reference = upstream_desc_process(many)
    assert [(r["chosen"], r["rejected"], r["prompt"]) for r in upstream[:12]] == [t[1:] for t in reference]
    for a, b in zip(upstream, whole):
        if isinstance(many[a["image_id"]]["chosen"], str):
            assert len(a["chosen"]) == 1 and a["chosen"] in many[a["image_id"]]["chosen"]
            assert b["chosen"] == many[a["image_id"]]["chosen"]
        else:
            assert b["chosen"] == a["chosen"]
        assert (b["rejected"], b["prompt"]) == (a["rejected"], a["prompt"])
    with pytest.raises(ValueError, match="string_answers"):
        read_hadpo_desc(path, images, string_answers="first")


def test_read_hadpo_desc_seed_determinism_and_two_copies(tmp_path):
    many = {str(i): {"chosen": [f"c{i}-{j}" for j in range(5)], "rejected": [f"r{i}-{j}" for j in range(5)]}
            for i in range(30)}
    images = {str(i): f"/vg/{i}.jpg" for i in range(30)}
    path = write_json(tmp_path / "desc_data.json", many)
    first, again = read_hadpo_desc(path, images, seed=42), read_hadpo_desc(path, images, seed=42)
    assert first == again
    other = read_hadpo_desc(path, images, seed=7)
    assert [r["chosen"] for r in first] != [r["chosen"] for r in other]
    # Every (image, prompt, chosen, rejected) pair appears exactly twice, with distinct ids.
    pairs = Counter((r["image_id"], r["prompt"], r["chosen"], r["rejected"]) for r in first)
    assert len(pairs) == 30 and set(pairs.values()) == {2}
    assert len({r["sample_id"] for r in first}) == 60
    assert {r["prompt"] for r in first} <= set(DESC_PROMPTS)


def test_read_hadpo_desc_repeats_and_prompts(tmp_path):
    path = write_json(tmp_path / "desc_data.json", {"2": {"chosen": "c", "rejected": "r"}})
    rows = read_hadpo_desc(path, IMAGES, prompts=["Only prompt."], repeats=3)
    assert [r["sample_id"] for r in rows] == ["desc-2-0", "desc-2-1", "desc-2-2"]
    assert {(r["prompt"], r["chosen"], r["rejected"]) for r in rows} == {("Only prompt.", "c", "r")}


@pytest.mark.parametrize("data, record, field", [
    ({"9": {"chosen": ["c"], "rejected": ["r"]}}, "9", "image_id"),
    ({"1": {"chosen": [], "rejected": ["r"]}}, "1", "chosen"),
    ({"1": {"chosen": ["c"], "rejected": []}}, "1", "rejected"),
    ({"1": {"chosen": ["c"]}}, "1", "rejected"),
    ({"1": {"chosen": 5, "rejected": ["r"]}}, "1", "chosen"),
    ({"1": {"chosen": ["c", None], "rejected": ["r"]}}, "1", "chosen"),
    ({"1": ["c", "r"]}, "1", None),
    ([{"chosen": ["c"], "rejected": ["r"]}], 0, "image_id"),
    ([{"image_id": 1, "chosen": ["c"], "rejected": ["r"]}, {"image_id": 77, "chosen": "c", "rejected": "r"}],
     1, "image_id"),
    ([{"image_id": 1, "chosen": "c", "rejected": "r"}, {"image_id": "1", "chosen": "c", "rejected": "r"}],
     1, "image_id"),
    ([{"image_id": [1], "chosen": "c", "rejected": "r"}], 0, "image_id"),
])
def test_read_hadpo_desc_bad_records(tmp_path, data, record, field):
    path = write_json(tmp_path / "desc_data.json", data)
    with pytest.raises(DataFormatError) as excinfo:
        read_hadpo_desc(path, IMAGES)
    assert_error(excinfo, path, record, field)


def test_read_hadpo_desc_unknown_image_message(tmp_path):
    path = write_json(tmp_path / "desc_data.json", {"9": {"chosen": ["c"], "rejected": ["r"]}})
    with pytest.raises(DataFormatError, match="expected an image listed in image_data.json, got 9"):
        read_hadpo_desc(path, IMAGES)


def test_read_hadpo_desc_invalid_json_and_top_level(tmp_path):
    path = tmp_path / "desc_data.json"
    path.write_text('{"1": {"chosen": [', encoding="utf-8")
    with pytest.raises(DataFormatError, match="valid JSON") as excinfo:
        read_hadpo_desc(path, IMAGES)
    assert_error(excinfo, path, None, None)
    write_json(path, "a string")
    with pytest.raises(DataFormatError) as excinfo:
        read_hadpo_desc(path, IMAGES)
    assert_error(excinfo, path, None, None)


# ----------------------------------------------------------------------------------------------
# HA-DPO POPE pairs


POPE_DATA = [
    {"image_id": 1, "question": "Is there a dog?", "answer": "no", "chosen": "No.", "reject": "Yes.",
     "correct": False},
    {"image_id": 2, "question": "Is there a cat?", "answer": "yes", "chosen": "Yes.", "reject": None,
     "correct": True},
    {"image_id": "3", "question": "Is there a car?", "answer": "yes", "chosen": "Yes, a car.",
     "rejected": "No.", "correct": False},
]


def test_read_hadpo_pope_rows_skipping_and_stats(tmp_path):
    path = write_json(tmp_path / "pope_data.json", POPE_DATA)
    stats = {}
    rows = read_hadpo_pope(path, IMAGES, stats)
    assert rows == [
        {"sample_id": "pope-0", "source": "pope", "image_id": "1", "image": IMAGES["1"],
         "prompt": "Is there a dog?", "chosen": "No.", "rejected": "Yes.", "list_index": 0},
        {"sample_id": "pope-2", "source": "pope", "image_id": "3", "image": IMAGES["3"],
         "prompt": "Is there a car?", "chosen": "Yes, a car.", "rejected": "No.", "list_index": 1},
    ]
    assert all(tuple(row) == PREFERENCE_COLUMNS for row in rows)
    assert stats == {"records": 3, "skipped_correct": 1, "correct_not_boolean": 0}
    assert read_hadpo_pope(path, IMAGES) == rows  # stats is optional


def test_read_hadpo_pope_reject_and_rejected_spellings(tmp_path):
    base = {"image_id": 1, "question": "Q?", "answer": "no", "chosen": "No.", "correct": False}
    for extra in ({"reject": "Yes."}, {"rejected": "Yes."}, {"reject": "Yes.", "rejected": "Yes."}):
        path = write_json(tmp_path / "pope_data.json", [{**base, **extra}])
        assert read_hadpo_pope(path, IMAGES)[0]["rejected"] == "Yes."


@pytest.mark.parametrize("correct, skipped", [
    (True, True), (False, False), (1, True), (0, False), (None, False), ("", False),
    ("false", True),  # a non-empty string is true in Python: upstream skips it, and so do we
    ([], False), ([0], True), (0.5, True),
])
def test_read_hadpo_pope_tests_correct_by_truth_as_upstream(tmp_path, correct, skipped):
    """Upstream `pope_process` (ha_dpo/models/llava-v1_5/train_dpo.py): ``if pope_data[idx]['correct']: continue``."""
    record = {**POPE_DATA[0], "correct": correct}
    path = write_json(tmp_path / "pope_data.json", [record, POPE_DATA[0]])
    stats = {}
    rows = read_hadpo_pope(path, IMAGES, stats)
    assert [row["sample_id"] for row in rows] == (["pope-1"] if skipped else ["pope-0", "pope-1"])
    assert [row["list_index"] for row in rows] == list(range(len(rows)))
    assert stats["skipped_correct"] == int(skipped)
    assert stats["correct_not_boolean"] == int(not isinstance(correct, bool))


@pytest.mark.parametrize("change, field", [
    ({"reject": None}, "reject"),
    ({"reject": "A", "rejected": "B"}, "reject"),
    ({"question": ""}, "question"),
    ({"chosen": 3}, "chosen"),
    ({"image_id": 99}, "image_id"),
])
def test_read_hadpo_pope_bad_records(tmp_path, change, field):
    record = {"image_id": 1, "question": "Q?", "answer": "no", "chosen": "No.", "reject": "Yes.",
              "correct": False, **change}
    path = write_json(tmp_path / "pope_data.json", [POPE_DATA[0], record])
    with pytest.raises(DataFormatError) as excinfo:
        read_hadpo_pope(path, IMAGES)
    assert_error(excinfo, path, 1, field)


@pytest.mark.parametrize("missing", ["question", "chosen", "correct", "image_id"])
def test_read_hadpo_pope_missing_field(tmp_path, missing):
    record = {k: v for k, v in POPE_DATA[0].items() if k != missing}
    path = write_json(tmp_path / "pope_data.json", [record])
    with pytest.raises(DataFormatError, match="field missing") as excinfo:
        read_hadpo_pope(path, IMAGES)
    assert_error(excinfo, path, 0, missing)


def test_read_hadpo_pope_missing_both_reject_spellings(tmp_path):
    record = {k: v for k, v in POPE_DATA[0].items() if k != "reject"}
    path = write_json(tmp_path / "pope_data.json", [record])
    with pytest.raises(DataFormatError) as excinfo:
        read_hadpo_pope(path, IMAGES)
    assert_error(excinfo, path, 0, "reject")


def test_read_hadpo_pope_invalid_json_and_not_a_list(tmp_path):
    path = tmp_path / "pope_data.json"
    path.write_text("[{]", encoding="utf-8")
    with pytest.raises(DataFormatError, match="valid JSON") as excinfo:
        read_hadpo_pope(path, IMAGES)
    assert_error(excinfo, path, None, None)
    write_json(path, {"0": POPE_DATA[0]})
    with pytest.raises(DataFormatError, match="a JSON list"):
        read_hadpo_pope(path, IMAGES)


# ----------------------------------------------------------------------------------------------
# SFT


def test_read_sft(tmp_path):
    path = write_json(tmp_path / "sft.json", [
        {"image_id": 2, "prompt": "Describe.", "response": "A dog."},
        {"image_id": "1", "prompt": "What?", "response": "A cat."},
    ])
    rows = read_sft(path, IMAGES)
    assert rows == [
        {"sample_id": "sft-0", "image_id": "2", "image": IMAGES["2"], "prompt": "Describe.",
         "response": "A dog."},
        {"sample_id": "sft-1", "image_id": "1", "image": IMAGES["1"], "prompt": "What?",
         "response": "A cat."},
    ]
    assert all(tuple(row) == SFT_COLUMNS for row in rows)


@pytest.mark.parametrize("record, field", [
    ({"image_id": 2, "prompt": "P"}, "response"),
    ({"image_id": 2, "prompt": 1, "response": "R"}, "prompt"),
    ({"image_id": 42, "prompt": "P", "response": "R"}, "image_id"),
])
def test_read_sft_bad_records(tmp_path, record, field):
    path = write_json(tmp_path / "sft.json", [{"image_id": 1, "prompt": "P", "response": "R"}, record])
    with pytest.raises(DataFormatError) as excinfo:
        read_sft(path, IMAGES)
    assert_error(excinfo, path, 1, field)


# ----------------------------------------------------------------------------------------------
# POPE questions


QUESTIONS = [
    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
     "label": "yes"},
    {"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dog in the image?",
     "label": "No"},
]


def expected_questions(split, version, root="", dataset="coco"):
    images = [os.path.join(root, q["image"]) if root else q["image"] for q in QUESTIONS]
    return [
        {"dataset": dataset, "question_id": 1, "split": split, "image": images[0],
         "question": "Is there a snowboard in the image?", "label": "yes", "version": version},
        {"dataset": dataset, "question_id": 2, "split": split, "image": images[1],
         "question": "Is there a dog in the image?", "label": "no", "version": version},
    ]


def sha_version(path, n):
    return f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}/n{n}"


def test_read_pope_questions_json_lines(tmp_path):
    path = tmp_path / "coco_pope_adversarial.json"
    path.write_text("\n".join(json.dumps(q) for q in QUESTIONS[:1]) + "\n\n  \n"
                    + json.dumps(QUESTIONS[1]) + "\n", encoding="utf-8")
    rows = read_pope_questions(path)
    assert rows == expected_questions("adversarial", sha_version(path, 2))
    assert all(tuple(row) == POPE_COLUMNS for row in rows)
    assert rows[0]["version"].startswith("sha256:") and len(rows[0]["version"].split("/")[0]) == 19


def test_read_pope_questions_json_array(tmp_path):
    path = write_json(tmp_path / "aokvqa_pope_seem_popular.json", QUESTIONS, indent=4)
    root = tmp_path / "coco" / "val2014"
    rows = read_pope_questions(path, image_root=root, dataset="aokvqa")
    assert rows == expected_questions("popular", sha_version(path, 2), str(root), dataset="aokvqa")
    assert read_pope_questions(path, split="custom")[0]["split"] == "custom"


def test_read_pope_questions_version_tells_files_apart(tmp_path):
    a = tmp_path / "coco_pope_random.json"
    a.write_text("\n".join(json.dumps(q) for q in QUESTIONS), encoding="utf-8")
    b = tmp_path / "old" / "coco_pope_random.json"
    b.parent.mkdir()
    b.write_text(json.dumps(QUESTIONS[0]), encoding="utf-8")
    version_a, version_b = read_pope_questions(a)[0]["version"], read_pope_questions(b)[0]["version"]
    assert version_a.endswith("/n2") and version_b.endswith("/n1") and version_a != version_b


def test_read_pope_questions_invalid_json_line(tmp_path):
    path = tmp_path / "coco_pope_random.json"
    path.write_text(json.dumps(QUESTIONS[0]) + "\n\n{\"question_id\": 2,\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="valid JSON") as excinfo:
        read_pope_questions(path)
    assert_error(excinfo, path, 3, None)


def test_read_pope_questions_invalid_json_array(tmp_path):
    path = tmp_path / "gqa_pope_random.json"
    path.write_text('[\n  {"question_id": 1,\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match="valid JSON") as excinfo:
        read_pope_questions(path)
    assert_error(excinfo, path, None, None)


@pytest.mark.parametrize("change, field", [
    ({"label": "maybe"}, "label"),
    ({"label": None}, "label"),
    ({"question_id": 1}, "question_id"),
    ({"question_id": "3"}, "question_id"),
    ({"text": ""}, "text"),
    ({"image": 7}, "image"),
])
@pytest.mark.parametrize("layout", ["lines", "array"])
def test_read_pope_questions_bad_records(tmp_path, change, field, layout):
    records = [QUESTIONS[0], {**QUESTIONS[1], **change}]
    path = tmp_path / "coco_pope_random.json"
    if layout == "lines":
        path.write_text("\n".join(json.dumps(q) for q in records), encoding="utf-8")
        record = 2  # line number, from 1
    else:
        write_json(path, records, indent=2)
        record = 1  # list index
    with pytest.raises(DataFormatError) as excinfo:
        read_pope_questions(path)
    assert_error(excinfo, path, record, field)


def test_read_pope_questions_duplicate_id_message(tmp_path):
    path = tmp_path / "coco_pope_random.json"
    path.write_text("\n".join(json.dumps(q) for q in [QUESTIONS[0], QUESTIONS[0]]), encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"used once \(first at record 1\)"):
        read_pope_questions(path)


def test_read_pope_questions_missing_field(tmp_path):
    path = tmp_path / "coco_pope_random.json"
    path.write_text(json.dumps({k: v for k, v in QUESTIONS[0].items() if k != "label"}), encoding="utf-8")
    with pytest.raises(DataFormatError, match="field missing") as excinfo:
        read_pope_questions(path)
    assert_error(excinfo, path, 1, "label")


# ----------------------------------------------------------------------------------------------
# MileBench


def milebench_task(tmp_path, data=None, meta=None, name="ALFRED"):
    task_dir = tmp_path / name
    task_dir.mkdir(exist_ok=True)
    meta = meta if meta is not None else {
        "task": name, "task_instruction": ["Instruction zero.", "Instruction one."],
        "question_type": "open-ended"}
    data = data if data is not None else [
        {"sample_id": 1, "task_instruction_id": 1,
         "task_instance": {"context": "Goal: {image#1} then {image#2} Current step:",
                           "images_path": ["a.jpg", "sub/b.jpg"]},
         "response": "Go left.", "image_quantity_level": "Few"},
        {"sample_id": 2, "task_instruction_id": 0,
         "task_instance": {"context": "Which? {image#1}", "images_path": ["c.jpg"],
                           "choice_list": ["A cat", "A dog", 3]},
         "response": 3, "image_quantity_level": "Medium"},
    ]
    write_json(task_dir / f"{name}.json", {"meta_data": meta, "data": data}, indent=2)
    return task_dir


def test_read_milebench_task(tmp_path):
    task_dir = milebench_task(tmp_path)
    images = task_dir / "images"
    rows = read_milebench_task(task_dir)
    assert rows == [
        {"sample_id": "1", "task": "ALFRED", "question_type": "open-ended",
         "instruction": "Instruction one.", "context": "Goal: {image#1} then {image#2} Current step:",
         "images": [str(images / "a.jpg"), str(images / "sub" / "b.jpg")], "choice_list": [],
         "has_choice_list": False, "response": "Go left.", "image_quantity_level": "few"},
        # the file says "Medium" but has one image: MileBench's evaluate.py counts images_path
        {"sample_id": "2", "task": "ALFRED", "question_type": "open-ended",
         "instruction": "Instruction zero.", "context": "Which? {image#1}",
         "images": [str(images / "c.jpg")], "choice_list": ["A cat", "A dog", "3"],
         "has_choice_list": True, "response": "3", "image_quantity_level": "few"},
    ]
    assert all(tuple(row) == MILEBENCH_COLUMNS for row in rows)


def test_read_milebench_task_image_root_and_missing_level(tmp_path):
    task_dir = milebench_task(tmp_path, data=[
        {"sample_id": "s7", "task_instruction_id": 0,
         "task_instance": {"context": "{image#1}", "images_path": [f"{i}.jpg" for i in range(40)]},
         "response": "x"}],
        meta={"task_instruction": ["I."], "question_type": "multi-choice"})
    (row,) = read_milebench_task(task_dir, image_root=tmp_path / "imgs")
    assert row["images"][0] == str(tmp_path / "imgs" / "0.jpg")
    assert row["image_quantity_level"] == "many" and row["question_type"] == "multi-choice"
    assert row["sample_id"] == "s7"
    # A URI root is kept as a URI.
    (row,) = read_milebench_task(task_dir, image_root="s3://bucket/MileBench/ALFRED/images/")
    assert row["images"][1] == "s3://bucket/MileBench/ALFRED/images/1.jpg"


def sample(**change):
    base = {"sample_id": 5, "task_instruction_id": 0,
            "task_instance": {"context": "{image#1} and {image#2}", "images_path": ["a.jpg", "b.jpg"]},
            "response": "r", "image_quantity_level": "Few"}
    return {**base, **change}


@pytest.mark.parametrize("record, field", [
    (sample(task_instruction_id=2), "task_instruction_id"),
    (sample(task_instruction_id=-1), "task_instruction_id"),
    (sample(task_instance={"context": "x", "images_path": "a.jpg"}), "task_instance.images_path"),
    (sample(task_instance={"images_path": ["a"]}), "task_instance.context"),
    (sample(task_instance={"context": "x", "images_path": ["a"], "choice_list": "A"}),
     "task_instance.choice_list"),
    (sample(task_instance="x"), "task_instance"),
    (sample(response=None), "response"),
    (sample(sample_id=1), "sample_id"),
])
def test_read_milebench_task_bad_samples(tmp_path, record, field):
    good = sample(sample_id=1)
    task_dir = milebench_task(tmp_path, data=[good, record],
                              meta={"task_instruction": ["I0", "I1"], "question_type": "open-ended"})
    with pytest.raises(DataFormatError) as excinfo:
        read_milebench_task(task_dir)
    assert_error(excinfo, task_dir / "ALFRED.json", 1, field)


def test_read_milebench_keeps_what_milebench_accepts(tmp_path):
    """MileBench's utils.py (MileBenchDataset.__getitem__) replaces {image#k} only for k in
    1..len(images_path), leaving others as text, and evaluate.py (get_image_quantity_level) ignores
    the file's image_quantity_level: such samples are read, not rejected."""
    odd = [sample(sample_id=1, task_instance={"context": "{image#3} and {image#1}{image#1}", "images_path": ["a"],
                                              "choice_list": []}, image_quantity_level="Lots"),
           sample(sample_id=2, image_quantity_level=None)]
    first, second = read_milebench_task(milebench_task(tmp_path, data=odd))
    assert first["context"] == "{image#3} and {image#1}{image#1}"
    assert (first["choice_list"], first["has_choice_list"], first["image_quantity_level"]) == ([], True, "few")
    assert (second["has_choice_list"], second["image_quantity_level"]) == (False, "few")


def test_read_milebench_instruction_out_of_range_message(tmp_path):
    task_dir = milebench_task(tmp_path, data=[sample(task_instruction_id=5)])
    with pytest.raises(DataFormatError, match=r"ALFRED\.json: record 0: field 'task_instruction_id': "
                                              r"expected an index into meta_data.task_instruction \(0..1\), got 5"):
        read_milebench_task(task_dir)


@pytest.mark.parametrize("top, field", [
    ({"data": []}, "meta_data"),
    ({"meta_data": {"question_type": "open-ended"}, "data": []}, "meta_data.task_instruction"),
    ({"meta_data": {"task_instruction": ["I"], "question_type": "essay"}, "data": []},
     "meta_data.question_type"),
    ({"meta_data": {"task_instruction": ["I"], "question_type": "open-ended"}, "data": {}}, "data"),
])
def test_read_milebench_task_bad_top_level(tmp_path, top, field):
    task_dir = tmp_path / "TQA"
    task_dir.mkdir()
    path = write_json(task_dir / "TQA.json", top)
    with pytest.raises(DataFormatError) as excinfo:
        read_milebench_task(task_dir)
    assert_error(excinfo, path, None, field)


def test_read_milebench_task_invalid_json(tmp_path):
    task_dir = tmp_path / "TQA"
    task_dir.mkdir()
    (task_dir / "TQA.json").write_text('{"meta_data": ', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"TQA\.json: expected valid JSON, got Expecting value"):
        read_milebench_task(task_dir)


@pytest.mark.parametrize("n, level", [(0, "few"), (1, "few"), (5, "few"), (6, "medium"), (31, "medium"),
                                      (32, "many"), (109, "many")])
def test_image_quantity_level(n, level):
    assert image_quantity_level(n) == level


def test_image_quantity_level_rejects_negative():
    with pytest.raises(ValueError):
        image_quantity_level(-1)


def test_module_is_pure_python():
    """The readers must stay importable without Ray, torch or PIL."""
    source = open(formats.__file__, encoding="utf-8").read()
    for name in ("ray", "torch", "PIL"):
        assert f"import {name}" not in source and f"from {name}" not in source
