"""Build POPE question sets from object annotations (pure Python).

POPE (Li et al. 2023, github.com/AoiDragon/POPE) asks, for every chosen image, ``per_image``
questions about objects that ARE in the image (label "yes") and ``per_image`` questions about
objects that are NOT (label "no"), alternating yes/no. The negatives are sampled three ways:

* ``random``      - absent objects drawn uniformly;
* ``popular``     - the most frequent objects of the whole annotation set (number of images that
  contain them) that are absent, most frequent first;
* ``adversarial`` - absent objects ranked by how often they co-occur with the image's present
  objects (number of images holding both, summed over the present objects), highest first.

The three splits share the same images and the same yes-questions; only the negatives differ
(``build_pope_splits`` guarantees it). All choices are deterministic: images are taken in sorted
order, every random draw comes from a ``random.Random`` seeded by ``seed`` and the image name (so
one image's draws do not depend on the others or on the strategy), and ties in the rankings are
broken by object name.

Files are written in POPE's own formats: JSON lines (``output/coco/coco_pope_*.json``) or a
pretty-printed JSON array (the A-OKVQA / GQA sets), records keyed in the order
``question_id, image, text, label``.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

from orchestrator.data.schema import POPE_SPLITS

STRATEGIES = POPE_SPLITS  # each POPE split is named after the strategy that sampled its negative questions
DEFAULT_TEMPLATE = "Is there a {} in the image?"
RECORD_KEYS = ("question_id", "image", "text", "label")

Annotations = Mapping[str, Iterable[str]]


def _object_sets(annotations: Annotations) -> dict[str, frozenset[str]]:
    return {str(image): frozenset(objects) for image, objects in annotations.items()}


def object_frequencies(annotations: Annotations) -> dict[str, int]:
    """Number of images containing each object (duplicates inside one image count once)."""
    counts: Counter[str] = Counter()
    for objects in _object_sets(annotations).values():
        counts.update(objects)
    return dict(sorted(counts.items()))


def cooccurrence_counts(annotations: Annotations) -> dict[str, dict[str, int]]:
    """``counts[a][b]``: number of images containing both ``a`` and ``b`` (a != b; symmetric).

    Every object of the annotation set has an entry (possibly empty)."""
    counts: dict[str, Counter[str]] = {}
    for objects in _object_sets(annotations).values():
        for a in objects:
            row = counts.setdefault(a, Counter())
            for b in objects:
                if a != b:
                    row[b] += 1
    return {a: dict(sorted(row.items())) for a, row in sorted(counts.items())}


def popular_ranking(frequencies: Mapping[str, int], candidates: Iterable[str]) -> list[str]:
    """Candidates by decreasing frequency, ties by name."""
    return sorted(set(candidates), key=lambda o: (-frequencies.get(o, 0), o))


def adversarial_ranking(
    cooccurrence: Mapping[str, Mapping[str, int]], present: Iterable[str], candidates: Iterable[str]
) -> list[str]:
    """Candidates by decreasing summed co-occurrence with ``present``, ties by name."""
    present = set(present)

    def score(obj: str) -> int:
        return sum(cooccurrence.get(p, {}).get(obj, 0) for p in present)

    return sorted(set(candidates), key=lambda o: (-score(o), o))


def _rng(seed: int, purpose: str, image: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random` itself: stable across processes and
    # independent of PYTHONHASHSEED.
    return random.Random(f"{seed}:{purpose}:{image}")


def eligible_images(annotations: Annotations, per_image: int = 3) -> list[str]:
    """Sorted image names with at least ``per_image`` distinct objects present and absent."""
    sets = _object_sets(annotations)
    vocabulary = set().union(*sets.values()) if sets else set()
    return sorted(
        image for image, objects in sets.items()
        if len(objects) >= per_image and len(vocabulary - objects) >= per_image
    )


def select_images(annotations: Annotations, num_images: int | None = None, per_image: int = 3,
                  seed: int = 0) -> list[str]:
    """The images a question set uses: the eligible ones (sorted), or a seeded sample of
    ``num_images`` of them (returned sorted). Asking for more than there are is an error."""
    images = eligible_images(annotations, per_image)
    if num_images is None:
        return images
    if num_images < 0 or num_images > len(images):
        raise ValueError(
            f"asked for {num_images} images but only {len(images)} have >= {per_image} distinct "
            f"objects present and absent")
    return sorted(random.Random(seed).sample(images, num_images))


def _negatives(strategy: str, image: str, present: frozenset[str], vocabulary: set[str],
               per_image: int, seed: int, frequencies: Mapping[str, int],
               cooccurrence: Mapping[str, Mapping[str, int]]) -> list[str]:
    absent = sorted(vocabulary - present)
    if strategy == "random":
        return _rng(seed, "random", image).sample(absent, per_image)
    if strategy == "popular":
        return popular_ranking(frequencies, absent)[:per_image]
    if strategy == "adversarial":
        return adversarial_ranking(cooccurrence, present, absent)[:per_image]
    raise ValueError(f"unknown POPE strategy {strategy!r}; expected one of {STRATEGIES}")


def build_pope_questions(
    annotations: Annotations,
    strategy: str,
    num_images: int | None = None,
    per_image: int = 3,
    seed: int = 0,
    template: str = DEFAULT_TEMPLATE,
    start_question_id: int = 1,
) -> list[dict[str, Any]]:
    """POPE records ``{"question_id", "image", "text", "label"}`` for one negative-sampling strategy.

    For each selected image (see :func:`select_images`): ``per_image`` yes-questions on a seeded
    random choice of its present objects and ``per_image`` no-questions on absent objects chosen
    by ``strategy``, alternating yes, no, yes, no, ...; question ids are consecutive from
    ``start_question_id``. The yes-questions do not depend on ``strategy``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown POPE strategy {strategy!r}; expected one of {STRATEGIES}")
    if per_image < 1:
        raise ValueError(f"per_image must be >= 1, got {per_image}")
    sets = _object_sets(annotations)
    vocabulary = set().union(*sets.values()) if sets else set()
    frequencies = object_frequencies(sets)
    cooccurrence = cooccurrence_counts(sets)
    records: list[dict[str, Any]] = []
    qid = start_question_id
    for image in select_images(sets, num_images, per_image, seed):
        present = sets[image]
        positives = _rng(seed, "yes", image).sample(sorted(present), per_image)
        negatives = _negatives(strategy, image, present, vocabulary, per_image, seed,
                               frequencies, cooccurrence)
        for yes_obj, no_obj in zip(positives, negatives):
            for obj, label in ((yes_obj, "yes"), (no_obj, "no")):
                records.append({"question_id": qid, "image": image,
                                "text": template.format(obj), "label": label})
                qid += 1
    return records


def build_pope_splits(
    annotations: Annotations,
    num_images: int | None = None,
    per_image: int = 3,
    seed: int = 0,
    template: str = DEFAULT_TEMPLATE,
    start_question_id: int = 1,
) -> dict[str, list[dict[str, Any]]]:
    """The three POPE splits over the same images with identical yes-questions (and ids)."""
    splits = {
        strategy: build_pope_questions(annotations, strategy, num_images, per_image, seed,
                                       template, start_question_id)
        for strategy in STRATEGIES
    }
    reference = [r for r in splits["random"] if r["label"] == "yes"]
    for strategy in STRATEGIES[1:]:
        if [r for r in splits[strategy] if r["label"] == "yes"] != reference:  # pragma: no cover
            raise AssertionError(f"POPE split {strategy!r} does not share the yes-questions")
    return splits


def _ordered(record: Mapping[str, Any]) -> dict[str, Any]:
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise ValueError(f"POPE record {record!r} lacks {missing}")
    out = {k: record[k] for k in RECORD_KEYS}
    out.update({k: v for k, v in record.items() if k not in out})
    return out


def write_pope_file(records: Iterable[Mapping[str, Any]], path: str | Path,
                    layout: str = "jsonl") -> Path:
    """Write POPE records as JSON lines (``layout="jsonl"``, POPE's COCO files) or as a
    pretty-printed JSON array (``layout="array"``, the A-OKVQA / GQA files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [_ordered(r) for r in records]
    if layout == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif layout == "array":
        text = json.dumps(rows, ensure_ascii=False, indent=4) + "\n"
    else:
        raise ValueError(f"unknown POPE file layout {layout!r}; expected 'jsonl' or 'array'")
    path.write_text(text, encoding="utf-8")
    return path


def read_pope_file(path: str | Path) -> list[dict[str, Any]]:
    """Read either layout back (a file starting with '[' is an array, else JSON lines)."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def coco_style_annotations(instances_json: Mapping[str, Any] | str | Path) -> dict[str, list[str]]:
    """``{file_name: sorted distinct category names}`` from a COCO instances dict (or its path).

    Images without any annotation are kept with an empty list (they are never eligible)."""
    if not isinstance(instances_json, Mapping):
        instances_json = json.loads(Path(instances_json).read_text(encoding="utf-8"))
    categories = {c["id"]: c["name"] for c in instances_json.get("categories", [])}
    file_names = {im["id"]: im["file_name"] for im in instances_json.get("images", [])}
    objects: dict[str, set[str]] = {name: set() for name in file_names.values()}
    for ann in instances_json.get("annotations", []):
        image_id, category_id = ann["image_id"], ann["category_id"]
        if image_id not in file_names:
            raise ValueError(f"COCO annotation {ann.get('id')!r} refers to unknown image {image_id!r}")
        if category_id not in categories:
            raise ValueError(f"COCO annotation {ann.get('id')!r} refers to unknown category {category_id!r}")
        objects[file_names[image_id]].add(categories[category_id])
    return {name: sorted(objs) for name, objs in sorted(objects.items())}
