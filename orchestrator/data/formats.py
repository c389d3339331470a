"""Readers for the real file formats of HA-DPO, Visual Genome, COCO, POPE and MileBench.

Each reader turns one file format into a list of plain dicts with exactly the columns of
`orchestrator.data.schema` (PREFERENCE_COLUMNS, SFT_COLUMNS, POPE_COLUMNS, MILEBENCH_COLUMNS), so
nothing downstream looks at the original formats. Every record is validated; bad input raises
`DataFormatError` naming the file, the record (line number from 1 for JSON lines, list index for
arrays, object key for objects) and the field. A file that is not valid JSON raises it too, with
expected "valid JSON" and the parser's message.

Image references are resolved against an image root into absolute paths (or URIs when the root is
one) but are not checked for existence here: a missing image is counted later, when images load.

Pure Python and json only (no Ray, torch or PIL), so the readers run anywhere, including the driver.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from orchestrator.data.schema import POPE_DEFAULT_DATASET, DataFormatError

# The four description prompts of the HA-DPO LLaVA-1.5 recipe, exactly as its train_dpo.py has them
# (without the "<image>\n" prefix, which the conversation template adds).
DESC_PROMPTS: tuple[str, ...] = (
    "Describe this image in detail.",
    "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.",
    "Could you describe the contents of this image for me?",
)

POPE_LABELS = ("yes", "no")
MILEBENCH_QUESTION_TYPES = ("open-ended", "multi-choice")
_COCO_NAME = re.compile(r"^COCO_([A-Za-z]+\d*)_(\d{12})\.jpg$")

_MISSING = object()


# ----------------------------------------------------------------------------------------------
# Validation helpers


class _Shown(str):
    """A description of a bad value; repr() returns it unquoted so messages read `got null`."""

    def __repr__(self) -> str:
        return str(self)


def _describe(value: Any) -> _Shown:
    """A short JSON-flavoured description of a value for error messages."""
    if value is _MISSING:
        return _Shown("nothing (field missing)")
    if isinstance(value, dict):
        return _Shown(f"an object with {len(value)} keys")
    if isinstance(value, list):
        return _Shown(f"a list of {len(value)} items")
    try:
        return _Shown(json.dumps(value, ensure_ascii=False))
    except (TypeError, ValueError):
        return _Shown(repr(value))


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python but never a valid id or index in these formats.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id(value: Any) -> bool:
    return _is_int(value) or _is_text(value)


def _is_texts(value: Any) -> bool:
    """A non-empty string, or a non-empty list of non-empty strings."""
    if isinstance(value, list):
        return bool(value) and all(_is_text(v) for v in value)
    return _is_text(value)


def _as_object(path: Any, record: Any, value: Any) -> dict:
    if not isinstance(value, dict):
        raise DataFormatError(path, record, None, "a JSON object", _describe(value))
    return value


def _field(path: Any, record: Any, obj: dict, name: str, ok: Callable[[Any], bool],
           expected: str, label: str | None = None) -> Any:
    """obj[name] if `ok` accepts it, else DataFormatError (label: the field name to report)."""
    value = obj.get(name, _MISSING)
    if value is _MISSING or not ok(value):
        raise DataFormatError(path, record, label or name, expected, _describe(value))
    return value


def _text(path: Any, record: Any, obj: dict, name: str, label: str | None = None) -> str:
    return _field(path, record, obj, name, _is_text, "a non-empty string", label)


def _load_json(path: Any) -> Any:
    """Parse a whole file as JSON; a parse failure is a DataFormatError, not a JSONDecodeError."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise DataFormatError(path, None, None, "valid JSON", _Shown(f"not UTF-8: {err}")) from err
    except json.JSONDecodeError as err:
        raise DataFormatError(path, None, None, "valid JSON", _Shown(_json_message(err))) from err


def _json_message(err: json.JSONDecodeError) -> str:
    return f"{err.msg} (line {err.lineno}, column {err.colno})"


def _as_list(path: Any, data: Any, expected: str) -> list:
    if not isinstance(data, list):
        raise DataFormatError(path, None, None, expected, _describe(data))
    return data


def _resolve(root: str | os.PathLike, name: str) -> str:
    """Join an image name onto its root: absolute for local roots, kept as a URI for URI roots.

    An empty root keeps the name as it is (the caller resolves it later).
    """
    root = os.fspath(root)
    if not root:
        return name
    if "://" in root:
        # os.path functions would collapse "s3://" to "s3:/", so join URIs by hand.
        return name if "://" in name else root.rstrip("/") + "/" + name.lstrip("/")
    return os.path.abspath(os.path.join(os.path.expanduser(root), name))


def _image_for(path: Any, record: Any, obj: dict, image_paths: dict[str, str]) -> tuple[str, str]:
    """The record's image id (as str) and its path looked up in `image_paths`."""
    image_id = str(_field(path, record, obj, "image_id", _is_id, "an integer or string image id"))
    if image_id not in image_paths:
        raise DataFormatError(path, record, "image_id", "an image listed in image_data.json",
                              _Shown(image_id))
    return image_id, image_paths[image_id]


# ----------------------------------------------------------------------------------------------
# Visual Genome and COCO image names


def vg_image_paths(image_data_path: str | os.PathLike, vg_root: str | os.PathLike) -> dict[str, str]:
    """Map Visual Genome image ids to image paths, from VG's `image_data.json`.

    Format: a JSON list of objects with `image_id` (int) and `url`, e.g.
    ``{"image_id": 1, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg", ...}``.
    The path is ``<vg_root>/<second-to-last url part>/<last url part>``, i.e.
    ``VG/VG_100K/<id>.jpg`` or ``VG/VG_100K_2/<id>.jpg`` (vg_root is the VG folder).
    Returns {str(image_id): absolute path}.
    """
    data = _as_list(image_data_path, _load_json(image_data_path), "a JSON list of images")
    paths: dict[str, str] = {}
    for index, item in enumerate(data):
        obj = _as_object(image_data_path, index, item)
        image_id = str(_field(image_data_path, index, obj, "image_id", _is_int, "an integer"))
        url = _text(image_data_path, index, obj, "url")
        parts = url.rstrip("/").split("/")
        if len(parts) < 2 or not parts[-2] or not parts[-1]:
            raise DataFormatError(image_data_path, index, "url", "a URL ending in <folder>/<file>",
                                  _describe(url))
        if image_id in paths:
            raise DataFormatError(image_data_path, index, "image_id", "an image id listed once",
                                  _Shown(image_id))
        paths[image_id] = _resolve(vg_root, f"{parts[-2]}/{parts[-1]}")
    return paths


def coco_image_name(image_id: int, split: str = "val2014") -> str:
    """COCO 2014 file name of an image id: 310196 -> "COCO_val2014_000000310196.jpg"."""
    if not _is_int(image_id) or image_id < 0:
        raise ValueError(f"COCO image id must be a non-negative integer, got {image_id!r}")
    return f"COCO_{split}_{image_id:012d}.jpg"


def coco_image_id(name: str) -> int:
    """Inverse of coco_image_name: "COCO_val2014_000000310196.jpg" (or a path to it) -> 310196."""
    match = _COCO_NAME.match(os.path.basename(str(name)))
    if match is None:
        raise ValueError(
            f"not a COCO 2014 image name: {name!r} (expected COCO_<split>_<12 digits>.jpg, "
            "e.g. COCO_val2014_000000310196.jpg)")
    return int(match.group(2))


# ----------------------------------------------------------------------------------------------
# HA-DPO training data
#
# Upstream: opendatalab/HA-DPO, ha_dpo/models/llava-v1_5/train_dpo.py, `LazySupervisedDataset.__init__`
# (random.seed(seed), desc_process, pope_process, ``pope_data_dict + desc_data_dict*2``), `desc_process`
# (sample_strategy "offline") and `pope_process`. What we compute the same, by default:
#
# - the training list is the usable pope pairs in file order, THEN the description pairs, twice
#   (`preference_rows` in datasets.py builds it in that order and numbers it in ``list_index``; the
#   recipe applies its seeded permutation to rows in that order, so for a fixed seed the order decides
#   which pairs share a batch; the sampler itself is the recipe's, DistributedSampler-like, not
#   necessarily the one transformers' Trainer built for upstream);
# - a pope record is skipped when ``correct`` is truthy (Python truth, as ``if pope_data[idx]['correct']``:
#   true, 1, a non-empty string, "false" included, are skipped; false, 0, null, "" are kept);
# - per description image, in file order, one generator seeded with `seed` (42) draws the chosen, then
#   the rejected, then the prompt with ``random.choice`` on the value as stored: on a list it draws an
#   item; on a plain string it draws ONE CHARACTER (upstream's behaviour; `desc_string_answers="whole"`
#   keeps the whole string instead, and the draw is still made so that every other record's draws stay
#   the same).
#
# Deviations (none touches well-formed LLaVA-1.5 files with the default settings): a pope record may spell
# its rejected answer ``rejected`` (upstream reads ``reject`` only: KeyError); desc_data.json may be a list
# of ``{image_id, chosen, rejected}`` (the layout of HA-DPO's other model variants; upstream's LLaVA-1.5
# code reads only the object keyed by image id); a record with a missing or malformed field (an empty or
# non-string question/answer, a list image id, an image id listed twice or not in image_data.json) fails
# with file, record and field, where upstream raises a KeyError or trains on what it got; images that do
# not open are set aside and counted (datasets.py) where upstream stops; `data.desc_repeats` (default 2,
# upstream's ``*2``) and `data.desc_string_answers` (default "character", upstream's) are configurable.


def _desc_records(path: Any, data: Any) -> list[tuple[Any, dict]]:
    """(record label, record) in file order for both desc_data.json layouts."""
    if isinstance(data, dict):
        return [(key, _as_object(path, key, value)) for key, value in data.items()]
    if isinstance(data, list):
        return [(index, _as_object(path, index, item)) for index, item in enumerate(data)]
    raise DataFormatError(path, None, None, "a JSON object keyed by image id or a JSON list",
                          _describe(data))


DESC_STRING_ANSWERS = ("character", "whole")


def draw_answer(rng: random.Random, value: str | list[str], string_answers: str = "character") -> str:
    """One answer drawn from a desc_data.json chosen/rejected value, as HA-DPO's ``random.choice(value)``.

    A list gives one of its items. A plain string gives one of its characters ("character", upstream's
    behaviour), or the whole string ("whole"); both consume the generator the same way.
    """
    if string_answers not in DESC_STRING_ANSWERS:
        raise ValueError(f"string_answers must be one of {DESC_STRING_ANSWERS}, got {string_answers!r}")
    drawn = rng.choice(value)
    return value if isinstance(value, str) and string_answers == "whole" else drawn


def read_hadpo_desc(path: str | os.PathLike, image_paths: dict[str, str], seed: int = 42,
                    prompts: Sequence[str] = DESC_PROMPTS, repeats: int = 2, string_answers: str = "character",
                    stats: dict | None = None) -> list[dict]:
    """Description preference pairs from HA-DPO's `desc_data.json` (upstream `desc_process`).

    Two layouts: an object keyed by image id, ``{"<id>": {"chosen": [...], "rejected": [...]}}``
    (LLaVA-1.5), or a list ``[{"image_id": ..., "chosen": [...], "rejected": [...]}]`` (other
    variants); chosen/rejected is a list of strings or a single string.

    Like the recipe, one `random.Random(seed)` draws, per image in file order, one chosen, then one
    rejected, then one prompt (`draw_answer`: from a single string upstream draws one character; see
    `string_answers`); so the seed-42 draw matches HA-DPO's own. Each pair is emitted `repeats` times
    (the recipe uses it twice), all images once per pass, with sample ids ``desc-<image_id>-<k>`` and
    ``list_index`` their position in this list. If `stats` is given, it gets ``stats["desc_string_answers"]``:
    how many chosen/rejected values were a single string.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if not prompts:
        raise ValueError("prompts must not be empty")
    rng = random.Random(seed)
    drawn: list[dict] = []
    seen: set[str] = set()
    strings = 0
    for record, obj in _desc_records(path, _load_json(path)):
        if isinstance(record, str):
            obj = {**obj, "image_id": record}
        image_id, image = _image_for(path, record, obj, image_paths)
        if image_id in seen:
            raise DataFormatError(path, record, "image_id", "an image id listed once", _Shown(image_id))
        seen.add(image_id)
        chosen, rejected = (
            _field(path, record, obj, name, _is_texts,
                   "a non-empty string or a non-empty list of non-empty strings")
            for name in ("chosen", "rejected"))
        strings += isinstance(chosen, str) + isinstance(rejected, str)
        chosen = draw_answer(rng, chosen, string_answers)
        rejected = draw_answer(rng, rejected, string_answers)
        prompt = rng.choice(list(prompts))
        drawn.append({"image_id": image_id, "image": image, "prompt": prompt,
                      "chosen": chosen, "rejected": rejected})
    if stats is not None:
        stats["desc_string_answers"] = strings
    return [
        {"sample_id": f"desc-{d['image_id']}-{k}", "source": "desc", "image_id": d["image_id"],
         "image": d["image"], "prompt": d["prompt"], "chosen": d["chosen"],
         "rejected": d["rejected"], "list_index": k * len(drawn) + position}
        for k in range(repeats) for position, d in enumerate(drawn)
    ]


def _pope_rejected(path: Any, index: int, obj: dict) -> str:
    """The rejected answer, spelled `reject` (LLaVA-1.5 data) or `rejected` (other variants)."""
    if "reject" not in obj and "rejected" not in obj:
        raise DataFormatError(path, index, "reject", "a non-empty string (field 'reject' or "
                              "'rejected')", _describe(_MISSING))
    if "reject" in obj and "rejected" in obj and obj["reject"] != obj["rejected"]:
        raise DataFormatError(path, index, "reject", "'reject' and 'rejected' to agree",
                              _describe(obj["rejected"]))
    name = "reject" if "reject" in obj else "rejected"
    return _text(path, index, obj, name)


def read_hadpo_pope(path: str | os.PathLike, image_paths: dict[str, str],
                    stats: dict | None = None) -> list[dict]:
    """Question-answer preference pairs from HA-DPO's `pope_data.json` (upstream `pope_process`).

    Format: a JSON list of ``{"image_id", "question", "answer", "chosen", "reject" | "rejected",
    "correct"}``. A record whose ``correct`` is truthy (the model already answered right; Python truth,
    as upstream tests it: 1 and "false" too) is skipped, and only its `correct` is checked, since it
    carries no usable pair; a missing ``correct`` is an error. The prompt is the question; sample ids are
    ``pope-<list index>``, ``list_index`` the pair's position in this list. If `stats` is given, it gets
    ``stats["records"]`` (all records), ``stats["skipped_correct"]`` and ``stats["correct_not_boolean"]``
    (records whose ``correct`` is not true/false, read by truthiness).
    """
    data = _as_list(path, _load_json(path), "a JSON list of records")
    rows: list[dict] = []
    skipped = not_boolean = 0
    for index, item in enumerate(data):
        obj = _as_object(path, index, item)
        correct = _field(path, index, obj, "correct", lambda v: True, "a value (tested for truth, as HA-DPO does)")
        not_boolean += not isinstance(correct, bool)
        if correct:
            skipped += 1
            continue
        image_id, image = _image_for(path, index, obj, image_paths)
        rows.append({
            "sample_id": f"pope-{index}", "source": "pope", "image_id": image_id, "image": image,
            "prompt": _text(path, index, obj, "question"),
            "chosen": _text(path, index, obj, "chosen"),
            "rejected": _pope_rejected(path, index, obj), "list_index": len(rows),
        })
    if stats is not None:
        stats["records"] = len(data)
        stats["skipped_correct"] = skipped
        stats["correct_not_boolean"] = not_boolean
    return rows


def read_sft(path: str | os.PathLike, image_paths: dict[str, str]) -> list[dict]:
    """Supervised warm-up examples from our own format.

    Format: a JSON list of ``{"image_id", "prompt", "response"}``; image ids are looked up in
    `image_paths` (e.g. from vg_image_paths). Sample ids are ``sft-<list index>``.
    """
    data = _as_list(path, _load_json(path), "a JSON list of records")
    rows = []
    for index, item in enumerate(data):
        obj = _as_object(path, index, item)
        image_id, image = _image_for(path, index, obj, image_paths)
        rows.append({
            "sample_id": f"sft-{index}", "image_id": image_id, "image": image,
            "prompt": _text(path, index, obj, "prompt"),
            "response": _text(path, index, obj, "response"),
        })
    return rows


# ----------------------------------------------------------------------------------------------
# POPE questions


def _pope_records(path: Any, text: str) -> list[tuple[int, Any]]:
    """(record label, parsed record) for a JSON array (list index) or JSON lines (line number)."""
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(path, None, None, "valid JSON", _Shown(_json_message(err))) from err
        return list(enumerate(_as_list(path, data, "a JSON list of questions")))
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataFormatError(path, number, None, "valid JSON", _Shown(err.msg)) from err
    return records


def read_pope_questions(path: str | os.PathLike, split: str | None = None,
                        image_root: str | os.PathLike = "", dataset: str = POPE_DEFAULT_DATASET) -> list[dict]:
    """POPE questions, from JSON lines (COCO sets) or a pretty-printed JSON array (A-OKVQA, GQA).

    The POPE repository (AoiDragon/POPE) ships ``output/coco/coco_pope_{split}.json`` as JSON lines and
    ``output/seem/{aokvqa,gqa}/{aokvqa,gqa}_pope_seem_{split}.json`` as arrays; GQA's image names are
    GQA ids (``2405722.jpg``), so each dataset has its own `image_root`. Rows carry `dataset`.

    Each record: ``{"question_id": int, "image": "COCO_val2014_....jpg", "text": str,
    "label": "yes" | "no"}``; the layout is told by content (first non-space character ``[`` means
    array). `split` defaults to the last ``_`` part of the file stem (coco_pope_adversarial.json ->
    "adversarial"). `version` is ``sha256:<first 12 hex of the file's sha256>/n<questions>``, so a
    result records which question file it used (an older random split had 2910 questions).
    Images are joined onto `image_root` (an empty root keeps the bare file name).
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataFormatError(path, None, None, "valid JSON", _Shown(f"not UTF-8: {err}")) from err
    split = split if split is not None else Path(path).stem.rsplit("_", 1)[-1]
    rows: list[dict] = []
    first_seen: dict[int, Any] = {}
    for record, item in _pope_records(path, text):
        obj = _as_object(path, record, item)
        question_id = _field(path, record, obj, "question_id", _is_int, "an integer")
        if question_id in first_seen:
            raise DataFormatError(path, record, "question_id",
                                  f"a question id used once (first at record {first_seen[question_id]})",
                                  _describe(question_id))
        first_seen[question_id] = record
        label = _field(path, record, obj, "label",
                       lambda v: isinstance(v, str) and v.strip().lower() in POPE_LABELS,
                       '"yes" or "no"')
        rows.append({
            "dataset": dataset, "question_id": question_id, "split": split,
            "image": _resolve(image_root, _text(path, record, obj, "image")),
            "question": _text(path, record, obj, "text"),
            "label": label.strip().lower(), "version": "",
        })
    version = f"sha256:{hashlib.sha256(raw).hexdigest()[:12]}/n{len(rows)}"
    for row in rows:
        row["version"] = version
    return rows


# ----------------------------------------------------------------------------------------------
# MileBench


def image_quantity_level(n_images: int) -> str:
    """MileBench's image-count level: "few" (<6), "medium" (6-31) or "many" (>31)."""
    if not _is_int(n_images) or n_images < 0:
        raise ValueError(f"number of images must be a non-negative integer, got {n_images!r}")
    if n_images < 6:
        return "few"
    return "medium" if n_images <= 31 else "many"


def _milebench_meta(path: Any, data: Any) -> tuple[list[str], str, list]:
    """(task instructions, question type, samples) from a MileBench task file's top level."""
    top = _as_object(path, None, data)
    meta = _field(path, None, top, "meta_data", lambda v: isinstance(v, dict), "a JSON object")
    instructions = _field(path, None, meta, "task_instruction",
                          lambda v: isinstance(v, list) and bool(v) and all(isinstance(s, str) for s in v),
                          "a non-empty list of strings", "meta_data.task_instruction")
    question_type = _field(path, None, meta, "question_type", lambda v: v in MILEBENCH_QUESTION_TYPES,
                           " or ".join(f'"{t}"' for t in MILEBENCH_QUESTION_TYPES),
                           "meta_data.question_type")
    samples = _field(path, None, top, "data", lambda v: isinstance(v, list), "a JSON list of samples")
    return instructions, question_type, samples


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _milebench_row(path: Any, index: int, obj: dict, task: str, question_type: str,
                   instructions: list[str], image_root: str) -> dict:
    sample_id = _field(path, index, obj, "sample_id", _is_id, "an integer or string id")
    instruction_id = _field(path, index, obj, "task_instruction_id",
                            lambda v: _is_int(v) and 0 <= v < len(instructions),
                            f"an index into meta_data.task_instruction (0..{len(instructions) - 1})")
    instance = _field(path, index, obj, "task_instance", lambda v: isinstance(v, dict), "a JSON object")
    context = _field(path, index, instance, "context", lambda v: isinstance(v, str), "a string",
                     "task_instance.context")
    images = _field(path, index, instance, "images_path",
                    lambda v: isinstance(v, list) and all(_is_text(p) for p in v),
                    "a list of non-empty strings", "task_instance.images_path")
    choices = instance.get("choice_list", [])
    if not isinstance(choices, list) or not all(_is_scalar(c) for c in choices):
        raise DataFormatError(path, index, "task_instance.choice_list", "a list of strings",
                              _describe(choices))
    # The reference harness compares str(response), and some tasks store numbers.
    response = _field(path, index, obj, "response", _is_scalar, "a string or number")
    return {
        "sample_id": str(sample_id), "task": task, "question_type": question_type,
        "instruction": instructions[instruction_id], "context": context,
        "images": [_resolve(image_root, p) for p in images],
        # MileBench appends the choice-list suffix whenever the key exists, even for an empty list.
        "choice_list": [str(c) for c in choices], "has_choice_list": "choice_list" in instance,
        "response": str(response),
        # evaluate.py (get_image_quantity_level) counts images_path; the file's own field is not used.
        "image_quantity_level": image_quantity_level(len(images)),
    }


def read_milebench_task(task_dir: str | os.PathLike,
                        image_root: str | os.PathLike | None = None) -> list[dict]:
    """MileBench samples of one task, from ``{task_dir}/{Task}.json`` (Task = the folder's name).

    Format: ``{"meta_data": {"task_instruction": [str, ...], "question_type": "open-ended" |
    "multi-choice", ...}, "data": [{"sample_id", "task_instruction_id", "task_instance":
    {"context", "images_path": [...], "choice_list"?}, "response", "image_quantity_level"}]}``.
    The instruction is ``task_instruction[task_instruction_id]``; image paths are joined onto
    `image_root` (default ``task_dir/images``). As in MileBench's own code, the file's
    ``image_quantity_level`` is not used (the level comes from the number of images), and
    ``{image#k}`` placeholders are not checked against ``images_path`` here: MileBench keeps an
    out-of-range one as text and fails only when the prompt it builds has more placeholders than
    images, which `orchestrator.eval.milebench.build_milebench_question` reports per sample.
    """
    task_dir = Path(task_dir)
    task = task_dir.resolve().name
    path = task_dir / f"{task}.json"
    root = os.fspath(image_root) if image_root is not None else os.fspath(task_dir / "images")
    instructions, question_type, samples = _milebench_meta(path, _load_json(path))
    rows: list[dict] = []
    first_seen: dict[str, int] = {}
    for index, item in enumerate(samples):
        row = _milebench_row(path, index, _as_object(path, index, item), task, question_type,
                             instructions, root)
        if row["sample_id"] in first_seen:
            raise DataFormatError(path, index, "sample_id",
                                  f"a sample id used once (first at record {first_seen[row['sample_id']]})",
                                  _Shown(row["sample_id"]))
        first_seen[row["sample_id"]] = index
        rows.append(row)
    return rows
