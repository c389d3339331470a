"""Readers for the real file formats of HA-DPO, Visual Genome, COCO, POPE and MileBench.

Each reader turns one file format into a list of plain dicts with exactly the columns of
`orchestrator.data.schema` (PREFERENCE_COLUMNS, SFT_COLUMNS, POPE_COLUMNS, MILEBENCH_COLUMNS), so
nothing downstream looks at the original formats. Every record is validated; bad input raises
`DataFormatError` naming the file, the record (line number from 1 for JSON lines, list index for
arrays, object key for objects) and the field. A file that is not valid JSON raises it too, with
expected "valid JSON" and the parser's message.

Image references are resolved against an image root into absolute paths (or URIs when the root is
one) but are not checked for existence here: a missing image is counted later, when images load. A
reference that leaves its root (``../``) or is absolute is refused (`orchestrator.paths`): readers given
a `rejects` list set that record aside there, with an ``error`` naming file, record and field, so it is
counted like a missing image; without the list they raise `ImagePathRejected`.

Pure Python and json only (no Ray, torch or PIL), so the readers run anywhere, including the driver.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from orchestrator.data.schema import POPE_DEFAULT_DATASET, DataFormatError, ImagePathRejected
from orchestrator.files import atomic_write
from orchestrator.paths import PathOutsideRoot, contained_path

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


def _contained_image(path: Any, record: Any, field: str, root: str | os.PathLike, name: str,
                     allow_absolute: bool) -> str:
    """`name` joined onto its image root (absolute, or a URI for URI roots), kept inside the root.

    Raises ImagePathRejected (file, record, field) when the name leaves the root or is absolute.
    """
    try:
        return contained_path(root, name, allow_absolute)
    except PathOutsideRoot as err:
        raise ImagePathRejected(path, record, field, str(err)) from None


REJECTED_PATH = "path outside the image root"


def _set_aside(rejects: list[dict] | None, row: dict, error: ImagePathRejected) -> None:
    """Put a row whose image path was refused into `rejects` (raise when there is no such list)."""
    if rejects is None:
        raise error
    rejects.append({**row, "error": f"{REJECTED_PATH} ({error})"})


def _keep(rows: list[dict], rejects: list[dict] | None, row: dict, refused: ImagePathRejected | None) -> None:
    """Append `row` to `rows`, or set it aside when its image path was refused."""
    if refused is None:
        rows.append(row)
    else:
        _set_aside(rejects, row, refused)


def _image_or_refusal(path: Any, record: Any, obj: dict, image_paths: dict[str, Any]
                      ) -> tuple[str, str, ImagePathRejected | None]:
    """(image id, image path, None), or (image id, "", the refusal) for an image whose path was refused."""
    try:
        return (*_image_for(path, record, obj, image_paths), None)
    except ImagePathRejected as err:
        return str(obj.get("image_id")), "", err


def _image_for(path: Any, record: Any, obj: dict, image_paths: dict[str, Any]) -> tuple[str, str]:
    """The record's image id (as str) and its path looked up in `image_paths`.

    Raises the `ImagePathRejected` that `vg_image_paths` stored for an image whose URL left its root.
    """
    image_id = str(_field(path, record, obj, "image_id", _is_id, "an integer or string image id"))
    if image_id not in image_paths:
        raise DataFormatError(path, record, "image_id", "an image listed in image_data.json",
                              _Shown(image_id))
    image = image_paths[image_id]
    if isinstance(image, ImagePathRejected):
        raise image
    return image_id, image


# ----------------------------------------------------------------------------------------------
# Visual Genome and COCO image names


def vg_image_paths(image_data_path: str | os.PathLike, vg_root: str | os.PathLike) -> dict[str, Any]:
    """Map Visual Genome image ids to image paths, from VG's `image_data.json`.

    Format: a JSON list of objects with `image_id` (int) and `url`, e.g.
    ``{"image_id": 1, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg", ...}``.
    The path is ``<vg_root>/<second-to-last url part>/<last url part>``, i.e.
    ``VG/VG_100K/<id>.jpg`` or ``VG/VG_100K_2/<id>.jpg`` (vg_root is the VG folder).
    Returns {str(image_id): absolute path}; an image whose URL parts would leave `vg_root` (a ``..``
    folder) maps to the `ImagePathRejected` naming its record, which the readers of records that use
    the image raise or set aside.
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
        try:
            paths[image_id] = _contained_image(image_data_path, index, "url", vg_root, f"{parts[-2]}/{parts[-1]}",
                                          allow_absolute=False)
        except ImagePathRejected as err:
            paths[image_id] = err
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


def read_hadpo_desc(path: str | os.PathLike, image_paths: dict[str, Any], seed: int = 42,
                    prompts: Sequence[str] = DESC_PROMPTS, repeats: int = 2, string_answers: str = "character",
                    stats: dict | None = None, rejects: list[dict] | None = None) -> list[dict]:
    """Description preference pairs from HA-DPO's `desc_data.json` (upstream `desc_process`).

    Two layouts: an object keyed by image id, ``{"<id>": {"chosen": [...], "rejected": [...]}}``
    (LLaVA-1.5), or a list ``[{"image_id": ..., "chosen": [...], "rejected": [...]}]`` (other
    variants); chosen/rejected is a list of strings or a single string.

    Like the recipe, one `random.Random(seed)` draws, per image in file order, one chosen, then one
    rejected, then one prompt (`draw_answer`: from a single string upstream draws one character; see
    `string_answers`); so the seed-42 draw matches HA-DPO's own. Each pair is emitted `repeats` times
    (the recipe uses it twice), all images once per pass, with sample ids ``desc-<image_id>-<k>`` and
    ``list_index`` their position in this list. If `stats` is given, it gets ``stats["desc_string_answers"]``:
    how many chosen/rejected values were a single string. A record whose image path was refused (see
    `vg_image_paths`) still takes its random draws, so the other records keep the recipe's draw; its
    pairs go to `rejects` (and ``list_index`` numbers the pairs that are kept).
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
        image_id, image, refused = _image_or_refusal(path, record, obj, image_paths)
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
                      "chosen": chosen, "rejected": rejected, "refused": refused})
    if stats is not None:
        stats["desc_string_answers"] = strings
    rows: list[dict] = []
    for k in range(repeats):
        for d in drawn:
            _keep(rows, rejects, {"sample_id": f"desc-{d['image_id']}-{k}", "source": "desc", "image_id": d["image_id"],
                                  "image": d["image"], "prompt": d["prompt"], "chosen": d["chosen"],
                                  "rejected": d["rejected"], "list_index": len(rows)}, d["refused"])
    return rows


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


def read_hadpo_pope(path: str | os.PathLike, image_paths: dict[str, Any],
                    stats: dict | None = None, rejects: list[dict] | None = None) -> list[dict]:
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
        image_id, image, refused = _image_or_refusal(path, index, obj, image_paths)
        _keep(rows, rejects, {
            "sample_id": f"pope-{index}", "source": "pope", "image_id": image_id, "image": image,
            "prompt": _text(path, index, obj, "question"),
            "chosen": _text(path, index, obj, "chosen"),
            "rejected": _pope_rejected(path, index, obj), "list_index": len(rows),
        }, refused)
    if stats is not None:
        stats["records"] = len(data)
        stats["skipped_correct"] = skipped
        stats["correct_not_boolean"] = not_boolean
    return rows


def read_sft(path: str | os.PathLike, image_paths: dict[str, Any], rejects: list[dict] | None = None) -> list[dict]:
    """Supervised warm-up examples from our own format.

    Format: a JSON list of ``{"image_id", "prompt", "response"}``; image ids are looked up in
    `image_paths` (e.g. from vg_image_paths). Sample ids are ``sft-<list index>``.
    """
    data = _as_list(path, _load_json(path), "a JSON list of records")
    rows = []
    for index, item in enumerate(data):
        obj = _as_object(path, index, item)
        image_id, image, refused = _image_or_refusal(path, index, obj, image_paths)
        _keep(rows, rejects, {
            "sample_id": f"sft-{index}", "image_id": image_id, "image": image,
            "prompt": _text(path, index, obj, "prompt"),
            "response": _text(path, index, obj, "response"),
        }, refused)
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
                        image_root: str | os.PathLike = "", dataset: str = POPE_DEFAULT_DATASET,
                        allow_absolute: bool = False, rejects: list[dict] | None = None) -> list[dict]:
    """POPE questions, from JSON lines (COCO sets) or a pretty-printed JSON array (A-OKVQA, GQA).

    The POPE repository (AoiDragon/POPE) ships ``output/coco/coco_pope_{split}.json`` as JSON lines and
    ``output/seem/{aokvqa,gqa}/{aokvqa,gqa}_pope_seem_{split}.json`` as arrays; GQA's image names are
    GQA ids (``2405722.jpg``), so each dataset has its own `image_root`. Rows carry `dataset`.

    Each record: ``{"question_id": int, "image": "COCO_val2014_....jpg", "text": str,
    "label": "yes" | "no"}``; the layout is told by content (first non-space character ``[`` means
    array). `split` defaults to the last ``_`` part of the file stem (coco_pope_adversarial.json ->
    "adversarial"). `version` is ``sha256:<first 12 hex of the file's sha256>/n<questions>``, so a
    result records which question file it used (an older random split had 2910 questions).
    Images are joined onto `image_root` (an empty root keeps the bare file name) and must stay inside
    it (`allow_absolute` accepts absolute names); a question whose image path is refused goes to
    `rejects`. A file without any question is an error: a configured split never silently vanishes.
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataFormatError(path, None, None, "valid JSON", _Shown(f"not UTF-8: {err}")) from err
    split = split if split is not None else Path(path).stem.rsplit("_", 1)[-1]
    rows: list[dict] = []
    refused: list[tuple[dict, ImagePathRejected]] = []
    first_seen: dict[int, Any] = {}
    records = _pope_records(path, text)
    if not records:
        raise DataFormatError(path, None, None, "at least one question (a configured split may not be empty)",
                              _Shown("no records"))
    for record, item in records:
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
        image = _text(path, record, obj, "image")
        row = {"dataset": dataset, "question_id": question_id, "split": split, "image": image,
               "question": _text(path, record, obj, "text"), "label": label.strip().lower(), "version": ""}
        try:
            row["image"] = _contained_image(path, record, "image", image_root, image, allow_absolute)
            rows.append(row)
        except ImagePathRejected as err:
            refused.append((row, err))
    version = f"sha256:{hashlib.sha256(raw).hexdigest()[:12]}/n{len(rows) + len(refused)}"
    for row in rows:
        row["version"] = version
    for row, err in refused:
        _set_aside(rejects, {**row, "version": version}, err)
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
                   instructions: list[str], image_root: str, allow_absolute: bool = False,
                   rejects: list[dict] | None = None) -> dict | None:
    """The sample's row, or None when an image path was refused (the row then went to `rejects`)."""
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
    row = {
        "sample_id": str(sample_id), "task": task, "question_type": question_type,
        "instruction": instructions[instruction_id], "context": context, "images": list(images),
        # MileBench appends the choice-list suffix whenever the key exists, even for an empty list.
        "choice_list": [str(c) for c in choices], "has_choice_list": "choice_list" in instance,
        "response": str(response),
        # evaluate.py (get_image_quantity_level) counts images_path; the file's own field is not used.
        "image_quantity_level": image_quantity_level(len(images)),
    }
    try:
        row["images"] = [_contained_image(path, index, f"task_instance.images_path[{k}]", image_root, name,
                                     allow_absolute) for k, name in enumerate(images)]
    except ImagePathRejected as err:
        _set_aside(rejects, row, err)
        return None
    return row


def read_milebench_task(task_dir: str | os.PathLike,
                        image_root: str | os.PathLike | None = None, allow_absolute: bool = False,
                        rejects: list[dict] | None = None) -> list[dict]:
    """MileBench samples of one task, from ``{task_dir}/{Task}.json`` (Task = the folder's name).

    Format: ``{"meta_data": {"task_instruction": [str, ...], "question_type": "open-ended" |
    "multi-choice", ...}, "data": [{"sample_id", "task_instruction_id", "task_instance":
    {"context", "images_path": [...], "choice_list"?}, "response", "image_quantity_level"}]}``.
    The instruction is ``task_instruction[task_instruction_id]``; image paths are joined onto
    `image_root` (default ``task_dir/images``) and must stay inside it (a sample with one that does
    not goes to `rejects`); a task without samples is an error naming its file. As in MileBench's own
    code, the file's ``image_quantity_level`` is not used (the level comes from the number of images), and
    ``{image#k}`` placeholders are not checked against ``images_path`` here: MileBench keeps an
    out-of-range one as text and fails only when the prompt it builds has more placeholders than
    images, which `orchestrator.eval.milebench.build_milebench_question` reports per sample.
    """
    task_dir = Path(task_dir)
    task = task_dir.resolve().name
    path = task_dir / f"{task}.json"
    root = os.fspath(image_root) if image_root is not None else os.fspath(task_dir / "images")
    instructions, question_type, samples = _milebench_meta(path, _load_json(path))
    if not samples:
        raise DataFormatError(path, None, "data", "at least one sample (a configured task may not be empty)",
                              _Shown("an empty list"))
    rows: list[dict] = []
    first_seen: dict[str, int] = {}
    for index, item in enumerate(samples):
        obj = _as_object(path, index, item)
        row = _milebench_row(path, index, obj, task, question_type, instructions, root, allow_absolute, rejects)
        if row is None:
            continue
        if row["sample_id"] in first_seen:
            raise DataFormatError(path, index, "sample_id",
                                  f"a sample id used once (first at record {first_seen[row['sample_id']]})",
                                  _Shown(row["sample_id"]))
        first_seen[row["sample_id"]] = index
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Vision preference data in TRL's format and in RLAIF-V's
#
# Both become preference rows (PREFERENCE_COLUMNS plus `images`, the list of a row's image paths, in the
# order of the prompt's image placeholders; `image` is the first). Images come either as paths relative to
# the source's image root (a path that leaves the root is an error) or embedded as bytes (Hugging Face's
# image feature: {"bytes", "path"}), which are written once to `embedded_dir` under their content hash.


def preference_table_files(path: str | os.PathLike) -> list[Path]:
    """The data files a TRL / RLAIF-V source names: the file itself, the files a glob pattern matches
    (``data/train-*.parquet``: one split of a hub dataset folder), or a folder's parquet / JSON lines / JSON /
    arrow files in name order (a `datasets.save_to_disk` folder: the arrow files its state.json lists)."""
    if any(char in str(path) for char in "*?["):
        matched = sorted(Path(p) for p in glob.glob(os.path.expanduser(str(path)), recursive=True))
        matched = [p for p in matched if p.is_file()]
        if not matched:
            raise DataFormatError(path, None, None, "files matching the pattern", _Shown("none"))
        return matched
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataFormatError(path, None, None, "a data file or a folder of them", _Shown("nothing there"))
    state = path / "state.json"
    if state.is_file():
        listed = _field(state, None, _as_object(state, None, _load_json(state)), "_data_files",
                        lambda v: isinstance(v, list) and bool(v), "a non-empty list of arrow files")
        names = [_text(state, index, _as_object(state, index, item), "filename") for index, item in enumerate(listed)]
        return [_contained(path, name, state, index, "_data_files.filename") for index, name in enumerate(names)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".parquet", ".jsonl", ".json", ".arrow"))
    if not files:
        raise DataFormatError(path, None, None, "parquet, JSON lines, JSON or arrow files", _Shown("none in the folder"))
    return files


def _table_records(path: Path) -> list[tuple[Any, Any]]:
    """(record label, record) of one data file: row index for parquet / arrow / JSON arrays, line for JSON lines."""
    suffix = path.suffix
    if suffix in (".parquet", ".arrow"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            if suffix == ".parquet":
                table = pq.read_table(path)
            else:  # datasets writes arrow *stream* files
                with pa.memory_map(str(path)) as source:
                    table = pa.ipc.open_stream(source).read_all()
        except (pa.ArrowInvalid, OSError) as err:
            raise DataFormatError(path, None, None, f"a readable {suffix[1:]} file", _Shown(str(err))) from err
        return list(enumerate(table.to_pylist()))
    text = path.read_bytes().decode("utf-8-sig", errors="strict") if path.stat().st_size else ""
    if text.lstrip().startswith("["):
        return list(enumerate(_as_list(path, _load_json(path), "a JSON list of records")))
    return _pope_records(path, text) if text.strip() else []


def _contained(root: str | os.PathLike, name: str, path: Any, record: Any, field: str) -> Path:
    """`name` joined onto `root`; a name that is absolute or climbs out of the root is an error
    (`orchestrator.paths.contained_path`, the rule every reader follows)."""
    try:
        return Path(contained_path(root, name))
    except PathOutsideRoot as err:
        raise DataFormatError(path, record, field, f"a path inside {Path(root).expanduser().absolute()}",
                              _Shown(str(err))) from None


def _image_path(value: Any, path: Any, record: Any, field: str, image_root: str | None,
                embedded_dir: str | os.PathLike | None) -> str:
    """One image reference (a relative path, or {"bytes", "path"}) as a local file path."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data:
            if embedded_dir is None:
                raise ValueError("embedded image bytes need a folder to be written to (embedded_dir)")
            digest = hashlib.sha256(data).hexdigest()[:24]
            target = Path(embedded_dir) / digest[:2] / f"{digest}.img"
            if not target.is_file():
                atomic_write(target, lambda temp: temp.write_bytes(data))
            return str(target)
        value = value.get("path")
        field = f"{field}.path"
    if not _is_text(value):
        raise DataFormatError(path, record, field, "an image path or {\"bytes\", \"path\"} with one of them",
                              _describe(value))
    if image_root is None:
        raise DataFormatError(path, record, field, "embedded image bytes, or a source image_root for paths",
                              _describe(value))
    return str(_contained(image_root, value, path, record, field))


_IMAGE_ENTRY = {"type": "image"}


def _message_text(path: Any, record: Any, field: str, content: Any) -> tuple[str, int]:
    """A message's content as text with one ``<image>`` per image entry, and the number of image entries."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list) or not content:
        raise DataFormatError(path, record, field, "a string or a non-empty list of {type: text|image} entries",
                              _describe(content))
    parts, images = [], 0
    for index, entry in enumerate(content):
        where = f"{field}[{index}]"
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind == "image":
            parts.append("<image>")
            images += 1
        elif kind == "text":
            parts.append(_field(path, record, entry, "text", lambda v: isinstance(v, str), "a string",
                                f"{where}.text"))
        else:
            raise DataFormatError(path, record, f"{where}.type", '"text" or "image"', _describe(kind))
    return "\n".join(parts), images


def _turn(path: Any, record: Any, field: str, messages: Any, role: str) -> tuple[str, int]:
    """The text of the single `role` message a conversational column holds."""
    if not isinstance(messages, list) or len(messages) != 1:
        raise DataFormatError(path, record, field, f"one {role} message (the LLaVA templates hold a single turn)",
                              _describe(messages))
    message = _as_object(path, record, messages[0])
    if message.get("role") != role:
        raise DataFormatError(path, record, f"{field}[0].role", f'"{role}"', _describe(message.get("role", _MISSING)))
    return _message_text(path, record, f"{field}[0].content", message.get("content", _MISSING))


def _answer(path: Any, record: Any, obj: dict, name: str) -> str:
    value = obj.get(name, _MISSING)
    if not isinstance(value, (str, list)):
        raise DataFormatError(path, record, name, "a string or one assistant message", _describe(value))
    if isinstance(value, str):
        if not value.strip():
            raise DataFormatError(path, record, name, "a non-empty answer", _describe(value))
        return value
    text, images = _turn(path, record, name, value, "assistant")
    if images or not text.strip():
        raise DataFormatError(path, record, name, "an assistant answer of text only", _describe(value))
    return text


def _split_implicit_prompt(path: Any, record: Any, obj: dict) -> tuple[Any, Any, Any]:
    """TRL's implicit prompt (conversational only): chosen and rejected both [user turn, assistant turn]."""
    chosen, rejected = obj.get("chosen", _MISSING), obj.get("rejected", _MISSING)
    if not (isinstance(chosen, list) and isinstance(rejected, list) and len(chosen) == len(rejected) == 2):
        raise DataFormatError(path, record, "prompt", "a prompt, or conversational chosen/rejected that start with "
                              "the same user turn (implicit prompt)", _describe(_MISSING))
    if chosen[0] != rejected[0]:
        raise DataFormatError(path, record, "rejected[0]", "the same user turn as chosen[0] (implicit prompt)",
                              _describe(rejected[0]))
    return [chosen[0]], chosen[1:], rejected[1:]


def _prompt_with_images(path: Any, record: Any, text: str, placeholders: int, n_images: int) -> str:
    """The row's prompt: without placeholders when every image comes first (the template adds them, as for
    HA-DPO), else with one ``<image>`` where each image stands. `placeholders`: the conversational prompt's
    image entries (already written into `text` as ``<image>``)."""
    if placeholders and placeholders != n_images:
        raise DataFormatError(path, record, "prompt", f"one image entry per image ({n_images} images)",
                              _Shown(f"{placeholders} image entries"))
    found = text.count("<image>")
    if found and found != n_images:
        raise DataFormatError(path, record, "prompt", f"{n_images} <image> placeholders or none",
                              _Shown(f"{found} placeholders"))
    lead = "\n".join(["<image>"] * n_images)
    if found and text.lstrip().startswith(lead):
        rest = text.lstrip()[len(lead):]
        if "<image>" not in rest:
            return rest.strip()
    return text.strip()


def read_trl_preference(path: str | os.PathLike, image_root: str | None = None, source: str = "trl",
                        embedded_dir: str | os.PathLike | None = None) -> list[dict]:
    """Vision preference pairs in TRL's dataset format (its docs, "Dataset formats and types": preference type,
    vision datasets).

    Each record: `images` (a list) or `image` (one), and `prompt`, `chosen`, `rejected` either *standard*
    (strings) or *conversational* (``[{"role": "user", "content": [{"type": "image"}, {"type": "text",
    "text": ...}]}]`` for the prompt, one assistant message for each answer); an implicit prompt (no `prompt`,
    conversational chosen/rejected that start with the same user turn) is split off. Images: paths relative to
    `image_root`, or Hugging Face image dicts {"bytes", "path"} (embedded bytes are written to `embedded_dir`).
    The prompt's image entries, or ``<image>`` placeholders in a standard prompt, must match the images in
    number. Files: parquet, JSON lines, a JSON list, or a `datasets` save_to_disk folder. Sample ids:
    ``<source>:<file index>-<record>``.
    """
    rows: list[dict] = []
    for file_index, file in enumerate(preference_table_files(path)):
        for record, item in _table_records(file):
            obj = _as_object(file, record, item)
            if "images" in obj:
                references = _field(file, record, obj, "images", lambda v: isinstance(v, list) and bool(v),
                                    "a non-empty list of images")
                field = "images"
            else:
                references = [_field(file, record, obj, "image", lambda v: v is not None, "an image")]
                field = "image"
            images = [_image_path(value, file, record, f"{field}[{index}]" if field == "images" else field,
                                  image_root, embedded_dir) for index, value in enumerate(references)]
            prompt_value, chosen_value, rejected_value = obj.get("prompt", _MISSING), obj, obj
            if prompt_value is _MISSING:
                prompt_value, chosen_list, rejected_list = _split_implicit_prompt(file, record, obj)
                chosen_value, rejected_value = {"chosen": chosen_list}, {"rejected": rejected_list}
            if isinstance(prompt_value, str):
                text, placeholders = prompt_value, 0
            else:
                text, placeholders = _turn(file, record, "prompt", prompt_value, "user")
            prompt = _prompt_with_images(file, record, text, placeholders, len(images))
            if not prompt:
                raise DataFormatError(file, record, "prompt", "some text besides the images", _describe(prompt_value))
            rows.append({
                "sample_id": f"{source}:{file_index}-{record}", "source": source, "image_id": "",
                "image": images[0], "images": images, "prompt": prompt,
                "chosen": _answer(file, record, chosen_value, "chosen"),
                "rejected": _answer(file, record, rejected_value, "rejected"),
            })
    return rows


def read_rlaif_v(path: str | os.PathLike, image_root: str | None = None, source: str = "rlaif_v",
                 embedded_dir: str | os.PathLike | None = None) -> list[dict]:
    """Preference pairs in RLAIF-V-Dataset's layout (openbmb/RLAIF-V-Dataset's card: `ds_name`, `image`
    {"bytes", "path"}, `question`, `chosen`, `rejected`, `origin_dataset`, `origin_split`, `idx`,
    `image_path`), from its parquet shards (a file or a folder of them) or the same records as JSON lines.

    One image per record: the embedded `image` bytes, else `image_path` (or `image.path`) under `image_root`.
    Sample ids: ``<source>:<idx>`` (``<source>:<file index>-<record>`` without an idx); a repeated idx is an
    error. `image_id` keeps the record's `ds_name`/`origin_dataset` for reference.
    """
    rows: list[dict] = []
    seen: dict[str, Any] = {}
    for file_index, file in enumerate(preference_table_files(path)):
        for record, item in _table_records(file):
            obj = _as_object(file, record, item)
            image = obj.get("image")
            if isinstance(image, dict) and image.get("bytes"):
                image_file = _image_path(image, file, record, "image", image_root, embedded_dir)
            elif _is_text(obj.get("image_path")):
                image_file = _image_path(obj["image_path"], file, record, "image_path", image_root, embedded_dir)
            else:
                image_file = _image_path(image if image is not None else _MISSING, file, record, "image",
                                         image_root, embedded_dir)
            idx = obj.get("idx")
            sample = f"{source}:{idx}" if _is_id(idx) else f"{source}:{file_index}-{record}"
            if sample in seen:
                raise DataFormatError(file, record, "idx", f"an idx used once (first at record {seen[sample]})",
                                      _describe(idx))
            seen[sample] = record
            rows.append({
                "sample_id": sample, "source": source,
                "image_id": str(obj.get("origin_dataset") or obj.get("ds_name") or ""),
                "image": image_file, "images": [image_file], "prompt": _text(file, record, obj, "question").strip(),
                "chosen": _text(file, record, obj, "chosen"), "rejected": _text(file, record, obj, "rejected"),
            })
    return rows
