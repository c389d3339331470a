"""Every dataset a config names, as Ray Data datasets of uniform rows, with rejects counted.

Reading happens in two steps. The readers in `formats.py` turn the files into rows and fail loudly on
a malformed record (file, record, field). Then `checked_dataset` puts the rows on Ray Data and opens
every image in parallel: rows whose image is missing or unreadable are split off as *rejects*, counted,
written to ``<run_dir>/data/rejects-<name>.parquet`` and summarised in one log line. Rows whose image
path leaves its root (``../``, or an absolute path without ``data.allow_absolute_image_paths``) are
rejects of the same kind, set aside by the readers before any image is opened. Nothing is dropped
silently, and no worker ever meets a bad image deep inside training or evaluation.

With no data paths in the config, the embedded synthetic world is generated (once) under
`config.world_dir` and read through exactly the same readers as real HA-DPO / POPE / MileBench files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator import console, layout
from orchestrator.config import ExperimentConfig, PreferenceSource, source_name
from orchestrator.data import formats
from orchestrator.data.schema import POPE_DEFAULT_DATASET, POPE_SPLITS
from orchestrator.data.synthetic import SynthConfig, generate_world
from orchestrator.files import atomic_write
from orchestrator.images import image_error

log = logging.getLogger(__name__)


@dataclass
class PopeFiles:
    """One POPE dataset's question files (split -> file) and the folder its image names are joined onto."""

    questions: dict[str, str]
    image_root: str = ""


@dataclass
class DataPaths:
    """The concrete files a run reads, whether real or synthetic."""

    hadpo_desc: str | None = None
    hadpo_pope: str | None = None
    vg_image_data: str | None = None
    vg_root: str | None = None
    sft: str | None = None
    pope: dict[str, PopeFiles] = field(default_factory=dict)  # dataset name -> its question files and image root
    milebench_root: str | None = None
    milebench_tasks: list[str] = field(default_factory=list)
    synthetic: bool = False


def ensure_synthetic_world(config: ExperimentConfig) -> Path:
    """Generate the synthetic world under `config.world_dir` unless it is already there.

    The world at the default place (``<output_root>/world``) follows `data.synthetic`: one made with other
    settings (an earlier demo's, say) is generated again. A world at an explicit `data.synthetic_dir` is
    used as it is.
    """
    world = config.world_dir
    marker = world / "world.json"
    s = config.data.synthetic
    wanted = SynthConfig(
        seed=s.seed, num_images=s.num_images, num_pope_images=s.num_pope_images, image_size=s.image_size,
        milebench_tasks=s.milebench_tasks, milebench_samples=s.milebench_samples,
        theme_purity=s.theme_purity, pair_cooccurrence=s.pair_cooccurrence,
        sft_cooccurrence_noise=s.sft_cooccurrence_noise, objects_per_image=s.objects_per_image,
    )
    if marker.is_file():
        if config.data.synthetic_dir or _world_settings(marker) == wanted.to_dict():
            return world
        log.info("the synthetic world at %s was made with other settings than data.synthetic: generating it again",
                 world, extra=console.LINE)
    generate_world(world, wanted)
    log.info("generated the synthetic world at %s", world, extra=console.LINE)
    return world


def _world_settings(marker: Path) -> dict[str, Any] | None:
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("config")
    except (OSError, ValueError, AttributeError):  # unreadable: generate it again
        return None


def resolve_data_paths(config: ExperimentConfig) -> DataPaths:
    data = config.data
    if data.uses_synthetic_world:
        world = ensure_synthetic_world(config)
        milebench = world / "milebench"
        return DataPaths(
            hadpo_desc=str(world / "hadpo" / "desc_data.json"),
            hadpo_pope=str(world / "hadpo" / "pope_data.json"),
            vg_image_data=str(world / "VG" / "image_data.json"),
            vg_root=str(world / "VG"),
            sft=str(world / "sft" / "sft_data.json"),
            pope={POPE_DEFAULT_DATASET: PopeFiles(
                {split: str(world / "pope" / f"coco_pope_{split}.json") for split in POPE_SPLITS},
                str(world / "coco" / "val2014"))},
            milebench_root=str(milebench) if milebench.is_dir() else None,
            milebench_tasks=list(data.milebench_tasks),
            synthetic=True,
        )
    return DataPaths(
        hadpo_desc=data.hadpo_desc, hadpo_pope=data.hadpo_pope, vg_image_data=data.vg_image_data,
        vg_root=data.vg_root, sft=data.sft,
        pope={name: PopeFiles(dict(files.questions), files.image_root) for name, files in data.pope.by_name().items()},
        milebench_root=data.milebench_root,
        milebench_tasks=list(data.milebench_tasks),
    )


def _vg_paths(paths: DataPaths, what: str) -> dict[str, str]:
    if not (paths.vg_image_data and paths.vg_root):
        raise ValueError(f"reading {what} needs data.vg_image_data and data.vg_root in the config")
    return formats.vg_image_paths(paths.vg_image_data, paths.vg_root)


# Row builders: plain lists of dicts, cheap to test without Ray.

def preference_rows(config: ExperimentConfig, stats: dict | None = None,
                    rejects: list[dict] | None = None) -> list[dict]:
    """The recipe's training list, in HA-DPO's order: the usable pope records, then each description pair
    `desc_repeats` times (``pope_data_dict + desc_data_dict*2`` in upstream's `LazySupervisedDataset`);
    ``list_index`` numbers the rows in that order. Or the mixed `data.preference` sources (see
    `mixed_preference_rows`). `rejects` (here and in the other row builders) receives the rows whose image
    path left its root; without it such a row raises `ImagePathRejected`."""
    if config.data.preference:
        return mixed_preference_rows(config, stats)
    paths = resolve_data_paths(config)
    if not (paths.hadpo_desc or paths.hadpo_pope):
        raise ValueError("no preference data: set data.hadpo_desc and/or data.hadpo_pope")
    images = _vg_paths(paths, "HA-DPO preference data")
    rows: list[dict] = []
    if paths.hadpo_pope:
        rows += formats.read_hadpo_pope(paths.hadpo_pope, images, stats=stats, rejects=rejects)
    if paths.hadpo_desc:
        desc = formats.read_hadpo_desc(paths.hadpo_desc, images, seed=config.data.seed,
                                       repeats=config.data.desc_repeats,
                                       string_answers=config.data.desc_string_answers, stats=stats, rejects=rejects)
        rows += [{**row, "list_index": len(rows) + row["list_index"]} for row in desc]
    return rows


def embedded_images_dir(config: ExperimentConfig) -> Path:
    """Where images embedded in data files (parquet bytes) are written once, under their content hash."""
    return layout.embedded_images_dir(config.output_dir)


def source_rows(config: ExperimentConfig, source: PreferenceSource, name: str, stats: dict | None = None) -> list[dict]:
    """One `data.preference` source's rows (before weighting), every row with `images` and `source` = its name
    (HA-DPO rows: ``<name>/desc`` or ``<name>/pope``) and sample ids ``<name>:...`` (`mixed_preference_rows`
    appends ``@<row_digest>``)."""
    if source.format == "trl":
        return formats.read_trl_preference(source.path, source.image_root, name, embedded_images_dir(config))
    if source.format == "rlaif_v":
        return formats.read_rlaif_v(source.path, source.image_root, name, embedded_images_dir(config))
    folder, root = Path(source.path).expanduser(), Path(source.image_root).expanduser()
    files = {key: folder / f"{key.removeprefix('hadpo_')}_data.json" for key in ("hadpo_desc", "hadpo_pope")}
    if not any(path.is_file() for path in files.values()):
        raise FileNotFoundError(f"{folder}: neither desc_data.json nor pope_data.json (hadpo source {name!r})")
    data = config.data.model_copy(update={
        "preference": [], "vg_image_data": str(root / "image_data.json"), "vg_root": str(root),
        **{key: str(path) if path.is_file() else None for key, path in files.items()}})
    rows = preference_rows(config.model_copy(update={"data": data}), stats)  # the HA-DPO recipe's list
    return [{**row, "sample_id": f"{name}:{row['sample_id']}", "source": f"{name}/{row['source']}",
             "images": [row["image"]]} for row in rows]


def row_digest(row: dict) -> str:
    """A short hash of what a pair says (prompt, answers, image references): part of its sample id, so numbers
    cached by sample id (the reference log-probs) never serve a changed row."""
    import hashlib

    blob = json.dumps([row["prompt"], row["chosen"], row["rejected"], list(row.get("images") or [row["image"]])])
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def weighted_rows(rows: list[dict], weight: float, seed: int) -> list[dict]:
    """Each row `weight` times: the whole part as repeats (sample ids ``<id>#<k>`` from the second), the
    fractional part as a share of the rows drawn with `random.Random(seed)` (0.5 -> half of them, once)."""
    import random

    whole = int(weight)
    picked = round((weight - whole) * len(rows))
    out = [row if k == 0 else {**row, "sample_id": f"{row['sample_id']}#{k}"} for k in range(whole) for row in rows]
    for index in sorted(random.Random(seed).sample(range(len(rows)), picked)):
        row = rows[index]
        out.append(row if whole == 0 else {**row, "sample_id": f"{row['sample_id']}#{whole}"})
    return out


def mixed_preference_rows(config: ExperimentConfig, stats: dict | None = None) -> list[dict]:
    """The `data.preference` sources, each weighted, in source order (the recipe shuffles them per epoch with
    its seed; `list_index` numbers them in this order), sample ids ``<source>:<record>@<row_digest>[#<repeat>]``. `stats["sources"]` gets, per source:
    format, path, rows read, weight, rows used."""
    rows: list[dict] = []
    summary = []
    for index, source in enumerate(config.data.preference):
        name = source_name(source, index)
        read = [{**row, "sample_id": f"{row['sample_id']}@{row_digest(row)}"}
                for row in source_rows(config, source, name, stats)]
        used = weighted_rows(read, source.weight, seed=config.data.seed + index)
        summary.append({"name": name, "format": source.format, "path": source.path, "read": len(read),
                        "weight": source.weight, "used": len(used)})
        rows += used
    if stats is not None:
        stats["sources"] = summary
    # list_index: the order the recipe's seeded permutation applies to (the sources in order, as mixed)
    return [{**row, "list_index": index} for index, row in enumerate(rows)]


def source_of(row: dict) -> str:
    """The `data.preference` source a row came from (its sample id's prefix)."""
    return str(row.get("sample_id", "")).split(":", 1)[0]


def sft_rows(config: ExperimentConfig, rejects: list[dict] | None = None) -> list[dict]:
    paths = resolve_data_paths(config)
    if not paths.sft:
        raise ValueError("no supervised warm-up data: set data.sft (the synthetic world provides one)")
    return formats.read_sft(paths.sft, _vg_paths(paths, "the warm-up set"), rejects=rejects)


def pope_rows(config: ExperimentConfig, rejects: list[dict] | None = None) -> list[dict]:
    """The questions of every POPE dataset and split, each row tagged with its dataset's name. Without an
    image root, images are looked for next to each question file (never relative to whatever directory
    a worker runs in)."""
    rows: list[dict] = []
    for name, files in resolve_data_paths(config).pope.items():
        for split, question_file in files.questions.items():
            rows += formats.read_pope_questions(
                question_file, split=split, image_root=files.image_root or str(Path(question_file).parent),
                dataset=name, allow_absolute=config.data.allow_absolute_image_paths, rejects=rejects)
    return rows


def milebench_task_dirs(paths: DataPaths) -> list[Path]:
    if not paths.milebench_root:
        return []
    root = Path(paths.milebench_root)
    names = paths.milebench_tasks or sorted(p.name for p in root.iterdir() if (p / f"{p.name}.json").is_file())
    missing = [name for name in names if not (root / name / f"{name}.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: MileBench task file(s) not found: {', '.join(missing)}")
    return [root / name for name in names]


def milebench_rows(config: ExperimentConfig, rejects: list[dict] | None = None) -> list[dict]:
    rows: list[dict] = []
    for task_dir in milebench_task_dirs(resolve_data_paths(config)):
        rows += formats.read_milebench_task(task_dir, allow_absolute=config.data.allow_absolute_image_paths,
                                            rejects=rejects)
    return rows


# Ray Data with image checks.

@dataclass
class CheckedDataset:
    """Rows whose images all open (`dataset`), and the rows that were set aside with a reason."""

    name: str
    dataset: Any  # ray.data.Dataset
    rejects: list[dict]
    total: int
    rejects_path: str | None = None
    sources: list[str] = field(default_factory=list)  # one summary line per data.preference source

    @property
    def accepted(self) -> int:
        return self.total - len(self.rejects)

    def summary(self) -> str:
        line = f"{self.name}: {self.total} rows, {self.accepted} usable, {len(self.rejects)} rejected"
        if self.rejects:
            reasons: dict[str, int] = {}
            for row in self.rejects:
                kind = row["error"].split(" (")[0]
                reasons[kind] = reasons.get(kind, 0) + 1
            line += " (" + ", ".join(f"{n} {kind}" for kind, n in sorted(reasons.items())) + ")"
            if self.rejects_path:
                line += f"; see {self.rejects_path}"
        return line


def _check_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data batch fn: an `error` column, '' where every image of the row opens."""
    column = batch["images"] if "images" in batch else batch["image"]
    errors = []
    for value in column:
        paths = [value] if isinstance(value, str) else list(value)
        reasons = [f"{reason} ({p})" for p in paths if (reason := image_error(p))]
        errors.append("; ".join(reasons) if paths else "no image")
    batch["error"] = np.array(errors, dtype=object)
    return batch


def _jsonable(rows: list[dict]) -> list[dict]:
    return [{k: (json.dumps(list(v)) if isinstance(v, (list, tuple, np.ndarray)) else v) for k, v in row.items()}
            for row in rows]


def write_rejects(rows: list[dict], path: Path) -> None:
    table = pa.Table.from_pylist(_jsonable(rows)) if rows else pa.table({"error": pa.array([], pa.string())})
    atomic_write(path, lambda temp: pq.write_table(table, temp))


def checked_dataset(rows: list[dict], name: str, config: ExperimentConfig,
                    set_aside: list[dict] | None = None) -> CheckedDataset:
    """Put rows on Ray Data, open every image in parallel, split off and record the rejects.

    `set_aside`: rows the readers already rejected (image path outside its root, with their `error`);
    they are counted and written with the rows whose image does not open.
    """
    import ray

    set_aside = list(set_aside or [])
    if not rows:
        if set_aside:
            write_rejects(set_aside, layout.rejects_path(config.run_dir, name))
        raise ValueError(f"{name}: the config's files hold no usable rows"
                         + (f" ({len(set_aside)} rejected, e.g. {set_aside[0]['error']})" if set_aside else ""))
    total = len(rows) + len(set_aside)
    blocks = max(1, min(64, total // 64))
    checked = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        _check_batch, batch_format="numpy", num_cpus=0.5, batch_size=64,
    ).materialize()
    rejects = set_aside + [dict(row) for row in checked.filter(lambda row: row["error"] != "").take_all()]
    good = checked.filter(lambda row: row["error"] == "").drop_columns(["error"]).materialize()
    rejects_path = layout.rejects_path(config.run_dir, name)
    write_rejects(rejects, rejects_path)
    result = CheckedDataset(name, good, rejects, total, str(rejects_path))
    log.info(result.summary())
    return result


def preference_dataset(config: ExperimentConfig) -> CheckedDataset:
    stats: dict = {}
    set_aside: list[dict] = []
    result = checked_dataset(preference_rows(config, stats, set_aside), "preference", config, set_aside)
    if stats.get("skipped_correct"):
        log.info("preference: %d pope records skipped because `correct` is true", stats["skipped_correct"])
    if stats.get("correct_not_boolean"):
        log.warning("preference: %d pope records have a `correct` that is not true/false; read by truth as "
                    "HA-DPO does (1 and any non-empty string, \"false\" too, count as true: the record is skipped)",
                    stats["correct_not_boolean"])
    if stats.get("desc_string_answers"):
        what = ("one CHARACTER was drawn from each, as HA-DPO's random.choice(str) does; "
                "data.desc_string_answers=whole keeps the whole string" if config.data.desc_string_answers ==
                "character" else "the whole string is used (data.desc_string_answers=whole, a deviation from HA-DPO)")
        log.warning("preference: %d chosen/rejected values of %s are a single string, not a list: %s",
                    stats["desc_string_answers"], resolve_data_paths(config).hadpo_desc, what)
    result.sources = source_summaries(stats.get("sources", []), result.rejects)
    for line in result.sources:
        log.info(line)
    return result


def source_summaries(sources: list[dict], rejects: list[dict]) -> list[str]:
    """One line per `data.preference` source: what was read, how it was weighted, how many rows were rejected."""
    lines = []
    for source in sources:
        rejected = sum(1 for row in rejects if source_of(row) == source["name"])
        lines.append(f"  source {source['name']} ({source['format']}, {source['path']}): {source['read']} rows, "
                     f"weight {source['weight']:g} -> {source['used']} used, {rejected} rejected")
    return lines


def sft_dataset(config: ExperimentConfig) -> CheckedDataset:
    set_aside: list[dict] = []
    return checked_dataset(sft_rows(config, set_aside), "sft", config, set_aside)


def pope_dataset(config: ExperimentConfig) -> CheckedDataset:
    set_aside: list[dict] = []
    return checked_dataset(pope_rows(config, set_aside), "pope", config, set_aside)


def milebench_dataset(config: ExperimentConfig) -> CheckedDataset:
    set_aside: list[dict] = []
    return checked_dataset(milebench_rows(config, set_aside), "milebench", config, set_aside)
