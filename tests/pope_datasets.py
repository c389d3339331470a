"""Small POPE datasets for tests, laid out as the POPE repository ships them.

AoiDragon/POPE ships ``output/coco/coco_pope_{split}.json`` as JSON lines over COCO val2014 names, and
``output/seem/gqa/gqa_pope_seem_{split}.json`` as pretty-printed JSON arrays whose image names are GQA
ids (``2405722.jpg``), read against GQA's own image folder. These copy part of the synthetic world's
COCO questions into either layout, with the images copied into a folder of the dataset's own, so each
dataset can only be read with its own image root.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from orchestrator.data.formats import coco_image_id

SPLITS = ("random", "popular", "adversarial")


def write_pope_copy(world: Path, out: Path, name: str, splits=SPLITS, images: int = 3, gqa_layout: bool = False
                    ) -> dict:
    """The questions of the first `images` images of each split, under ``out/name``; returns the dataset's
    `data.pope.datasets` entry. `gqa_layout`: JSON arrays and ``<id>.jpg`` names, else JSON lines, COCO names."""
    image_root = out / name / "images"
    image_root.mkdir(parents=True, exist_ok=True)
    questions = {}
    for split in splits:
        records = [json.loads(line) for line in (world / "pope" / f"coco_pope_{split}.json").read_text().splitlines()
                   if line.strip()]
        kept_images = list(dict.fromkeys(r["image"] for r in records))[:images]
        copied = []
        for record in records:
            if record["image"] not in kept_images:
                continue
            image = f"{coco_image_id(record['image'])}.jpg" if gqa_layout else record["image"]
            if not (image_root / image).is_file():
                shutil.copy(world / "coco" / "val2014" / record["image"], image_root / image)
            copied.append({**record, "image": image})
        if gqa_layout:
            path = out / name / f"{name}_pope_seem_{split}.json"
            path.write_text(json.dumps(copied, indent=4))
        else:
            path = out / name / f"{name}_pope_{split}.json"
            path.write_text("".join(json.dumps(record) + "\n" for record in copied))
        questions[split] = str(path)
    return {"questions": questions, "image_root": str(image_root)}


def write_gqa_like_pope(world: Path, out: Path, splits=("random", "adversarial"), images: int = 3) -> dict:
    """A dataset laid out as POPE's GQA set (two splits by default, so its splits differ from COCO's)."""
    return write_pope_copy(world, out, "gqa", splits, images, gqa_layout=True)


def coco_entry(world: Path) -> dict:
    """The synthetic world's own POPE files as a `data.pope.datasets` entry."""
    return {"questions": {s: str(world / "pope" / f"coco_pope_{s}.json") for s in SPLITS},
            "image_root": str(world / "coco" / "val2014")}
