"""A small, deterministic synthetic world in the exact real data formats.

The world is 16 objects, each a distinct shape in a distinct strong colour, grouped into four scene
themes (kitchen, street, park, office). A scene takes a theme and draws 2-4 objects, each from its
theme with probability ``theme_purity``, and places them in distinct cells of a grid on a plain
background, so a tiny ViT (8-16 px patches on 32-64 px images) can tell which objects are present.
Objects of one theme co-occur strongly, which is the bias LLaVA-style models turn into
hallucinations; the SFT set deliberately answers a share of questions about absent, strongly
co-occurring objects with "Yes" (``sft_cooccurrence_noise``) so that a model warmed up on it says
yes to them, and the HA-DPO preference data (faithful vs hallucinated descriptions, correct vs wrong
POPE-style answers) corrects it.

With ``pair_cooccurrence`` the bias is sharper, as LLaVA's is: each object has a partner in its theme
(`PARTNER`: cup and fork, bowl and knife) that a scene draws right after it with that probability, so
an object's most frequent companion is its partner; the warm-up's wrong "Yes" is then about the absent
partner of a present object only (the theme's other absent objects get the right "No", so the model has
to tell the theme's objects apart), and, HA-DPO's pope data being the model's own mistakes, a pope_data
record about an absent partner is never marked ``correct``.

``generate_world(out_dir, cfg)`` writes (paths relative to ``out_dir``)::

    world.json                                  scenes, themes, objects, config, vocabulary, counts
    VG/image_data.json                          [{image_id, url, width, height, coco_id, flickr_id}]
    VG/VG_100K/<id>.jpg, VG/VG_100K_2/<id>.jpg  training images (the url decides the folder)
    hadpo/desc_data.json                        {"<image_id>": {"chosen": [...], "rejected": [...]}}
    hadpo/pope_data.json                        [{image_id, question, answer, chosen, reject, correct}]
    trl/preference.jsonl                        the same pairs in TRL's conversational vision format
    sft/sft_data.json                           [{image_id, prompt, response}] over the VG images
    coco/val2014/COCO_val2014_<12 digits>.jpg   evaluation images (disjoint from the VG ones)
    coco/annotations/instances_val2014.json     COCO-style instances of the evaluation images
    pope/coco_pope_{random,popular,adversarial}.json   POPE JSON lines over the evaluation images
    milebench/<Task>/<Task>.json, milebench/<Task>/images/*.jpg   MileBench-format tasks

Every JSON file is a pure function of the config (no absolute paths, no timestamps), so the same
seed gives byte-identical files. All texts use a closed vocabulary (:func:`world_vocabulary`) and
tokenise with :func:`split_words` (whitespace, each punctuation mark its own token).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image, ImageDraw

from orchestrator.data.pope_builder import (
    DEFAULT_TEMPLATE,
    STRATEGIES,
    adversarial_ranking,
    build_pope_splits,
    cooccurrence_counts,
    write_pope_file,
)

GENERATOR = "orchestrator.data.synthetic"

# ---------------------------------------------------------------------------------------------
# The world: themes, objects, how each object looks.

THEMES: dict[str, tuple[str, ...]] = {
    "kitchen": ("cup", "fork", "bowl", "knife"),
    "street": ("car", "bus", "bike", "sign"),
    "park": ("tree", "ball", "dog", "bench"),
    "office": ("book", "lamp", "phone", "clock"),
}
OBJECTS: tuple[str, ...] = tuple(o for objs in THEMES.values() for o in objs)
THEME_OF: dict[str, str] = {o: t for t, objs in THEMES.items() for o in objs}
# Each theme's first and second, third and fourth objects are partners (cup and fork, bowl and knife): with
# `pair_cooccurrence` a scene draws an object's partner right after it, so partners co-occur most of all.
PARTNER: dict[str, str] = {objs[i + k]: objs[i + 1 - k] for objs in THEMES.values() for i in (0, 2) for k in (0, 1)}

# Object i gets SHAPES[i % 8]: the four objects of a theme all have different shapes, and the two
# objects that share a shape (i and i + 8) have very different colours.
SHAPES = ("circle", "cross", "ring", "hbar", "square", "diamond", "triangle", "vbar")
COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (230, 25, 25)), ("green", (20, 170, 20)), ("blue", (30, 60, 235)),
    ("yellow", (250, 230, 20)), ("magenta", (230, 30, 230)), ("cyan", (20, 225, 235)),
    ("orange", (255, 140, 0)), ("white", (255, 255, 255)),
    ("purple", (120, 30, 170)), ("black", (0, 0, 0)), ("pink", (255, 160, 200)),
    ("navy", (10, 20, 110)), ("brown", (125, 70, 20)), ("maroon", (120, 0, 0)),
    ("teal", (0, 125, 125)), ("lime", (170, 255, 60)),
)
APPEARANCE: dict[str, dict[str, Any]] = {
    name: {"shape": SHAPES[i % len(SHAPES)], "colour": COLOURS[i][0], "rgb": list(COLOURS[i][1])}
    for i, name in enumerate(OBJECTS)
}

# ---------------------------------------------------------------------------------------------
# The closed set of sentence patterns.

DESCRIPTION_PROMPTS = (
    "Describe this image in detail.",
    "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.",
    "Could you describe the contents of this image for me?",
)
DESCRIPTION_PATTERNS = (
    "The image shows {}.",
    "In this picture we can see {}.",
    "This image contains {}.",
    "There is {} in the image.",
)
QUESTION_TEMPLATE = DEFAULT_TEMPLATE  # "Is there a {} in the image?"
YES_ANSWER = "Yes, there is {} in the image."
NO_ANSWER = "No, there is no {} in the image."
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# MileBench tasks, in the order `milebench_tasks` takes them.
MILEBENCH_TASKS: dict[str, dict[str, Any]] = {
    "SynthObjectCount": {
        "question_type": "open-ended",
        "instruction": "Look at the images and count how many of them contain the object in the question.",
        "question": "How many images contain {}?",
    },
    "SynthImageChoice": {
        "question_type": "multi-choice",
        "instruction": "Look at the images and answer the question by choosing one of the images.",
        "question": "Which image contains {}?",
    },
    "SynthSceneRecall": {
        "question_type": "open-ended",
        "instruction": "Look at the images and describe the objects you see in the last image.",
        "question": "What objects are in the last image?",
    },
}
MILEBENCH_IMAGE_LABEL = "Image {}:"

# Texts that other parts of the pipeline wrap around ours: the LLaVA v1 / llava_v1 conversation
# templates, LLaVA's POPE answer-format suffix, MileBench's choice-list suffix and its LLaVA worker's
# llava_llama_2 template (orchestrator.eval.milebench.llava_worker_prompt). They are part of the
# vocabulary so a word-level tokenizer covers every prompt the pipeline builds.
TEMPLATE_TEXTS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions.",
    "USER: ASSISTANT: Human: Assistant:",
    "Answer the question using a single word or phrase.",
    "Choice list: A. B. C. D. E. F. Your answer is:",
    "[INST] <<SYS>> <</SYS>> [/INST]",
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language.",
)

_WORD_RE = re.compile(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]")
_PLACEHOLDER_RE = re.compile(r"\{(?:image|table)#\d+\}")


def split_words(text: str) -> list[str]:
    """Word-level tokenisation of world texts: runs of letters/digits, and every other non-space
    character as its own token ("Yes, there is a cup." -> Yes , there is a cup .)."""
    return _WORD_RE.findall(text)


def strip_placeholders(text: str) -> str:
    """Remove MileBench ``{image#k}`` / ``{table#k}`` placeholders."""
    return _PLACEHOLDER_RE.sub(" ", text)


def article(obj: str) -> str:
    return "an" if obj[:1] in "aeiou" else "a"


def with_article(obj: str) -> str:
    return f"{article(obj)} {obj}"


def object_list(objects: Sequence[str]) -> str:
    """"a cup", "a cup and a fork", "a cup, a fork and a bowl"."""
    items = [with_article(o) for o in objects]
    if not items:
        raise ValueError("an object list needs at least one object")
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe(objects: Sequence[str], pattern: int = 0) -> str:
    return DESCRIPTION_PATTERNS[pattern % len(DESCRIPTION_PATTERNS)].format(object_list(objects))


def question(obj: str) -> str:
    return QUESTION_TEMPLATE.format(obj)


def answer(obj: str, present: bool) -> str:
    return (YES_ANSWER if present else NO_ANSWER).format(with_article(obj) if present else obj)


def mentioned_objects(text: str) -> set[str]:
    """The world's object names that occur as words in ``text``."""
    return set(split_words(text)) & set(OBJECTS)


# ---------------------------------------------------------------------------------------------
# Configuration and manifest.

@dataclass
class SynthConfig:
    seed: int = 0
    num_images: int = 120                    # VG training images
    num_pope_images: int = 40                # COCO-named evaluation images (disjoint from VG ones)
    image_size: int = 64
    grid: int = 3                            # objects sit in distinct cells of a grid x grid
    object_scale: float = 0.8                # object size relative to its cell
    objects_per_image: tuple[int, int] = (2, 4)
    theme_purity: float = 0.9                # P(an object comes from the scene's theme)
    pair_cooccurrence: float = 0.0           # P(an object's partner is drawn right after it); see below
    background: tuple[int, int, int] = (128, 128, 128)
    jpeg_quality: int = 95
    vg_100k_2_share: float = 0.25            # share of VG images whose url is under VG_100K_2
    pope_per_image: int = 3                  # POPE: yes- and no-questions per evaluation image
    desc_per_image: tuple[int, int] = (2, 3)  # chosen (= rejected) descriptions per VG image
    pope_data_per_image: int = 4             # HA-DPO pope_data records per VG image
    pope_data_correct_share: float = 0.25    # records marked correct (readers skip them); see pair_cooccurrence
    sft_questions_per_image: int = 4         # yes/no questions per VG image in the SFT set
    # wrong "Yes" on questions about co-occurring absent objects; with pair_cooccurrence > 0 only about the
    # absent partner of a present object (the other absent objects of the theme get the right "No", so the
    # warm-up must tell the theme's objects apart, and the bias it learns is the partner's)
    sft_cooccurrence_noise: float = 0.3
    sft_description_noise: float = 0.15      # SFT descriptions with a co-occurring absent object added
    milebench_tasks: int = 2
    milebench_samples: int = 8
    milebench_images: tuple[int, int] = (2, 4)

    def __post_init__(self) -> None:
        self.objects_per_image = tuple(self.objects_per_image)
        self.desc_per_image = tuple(self.desc_per_image)
        self.milebench_images = tuple(self.milebench_images)
        self.background = tuple(self.background)
        lo, hi = self.objects_per_image
        if not 1 <= lo <= hi:
            raise ValueError(f"objects_per_image must be 1 <= lo <= hi, got {self.objects_per_image}")
        if max(hi, self.pope_per_image) > self.grid * self.grid:
            raise ValueError(f"a {self.grid}x{self.grid} grid holds at most {self.grid ** 2} objects")
        if max(hi, self.pope_per_image) + self.pope_per_image > len(OBJECTS):
            raise ValueError("too many objects per image for the 16-object vocabulary")
        if self.image_size < 4 * self.grid:
            raise ValueError(f"image_size {self.image_size} too small for a {self.grid}x{self.grid} grid")
        if not 0.0 <= self.theme_purity <= 1.0:
            raise ValueError(f"theme_purity must be in [0, 1], got {self.theme_purity}")
        if not 0.0 <= self.pair_cooccurrence <= 1.0:
            raise ValueError(f"pair_cooccurrence must be in [0, 1], got {self.pair_cooccurrence}")
        if not 1 <= self.desc_per_image[0] <= self.desc_per_image[1] <= len(DESCRIPTION_PATTERNS):
            raise ValueError(f"desc_per_image must lie in [1, {len(DESCRIPTION_PATTERNS)}]")
        if not 0 <= self.milebench_tasks <= len(MILEBENCH_TASKS):
            raise ValueError(f"milebench_tasks must be in [0, {len(MILEBENCH_TASKS)}]")
        if not 2 <= self.milebench_images[0] <= self.milebench_images[1] <= 5:
            raise ValueError("milebench_images must lie in [2, 5] (MileBench 'Few' level is < 6)")
        if self.num_images < 1 or self.num_pope_images < 1:
            raise ValueError("num_images and num_pope_images must be >= 1")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SynthConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class WorldManifest:
    root: str
    world_json: str
    vg_dir: str
    vg_image_data: str
    desc_data: str
    pope_data: str
    sft_data: str
    coco_images: str
    coco_instances: str
    pope_dir: str
    pope_files: dict[str, str]
    milebench_dir: str
    milebench_tasks: list[str]
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Vocabulary.

def _template_words(texts: Iterable[str]) -> set[str]:
    words: set[str] = set()
    for text in texts:
        words.update(split_words(strip_placeholders(text.replace("{}", " "))))
    return words


def world_vocabulary(cfg: SynthConfig | None = None) -> list[str]:
    """Every word any generated text can contain (as split by :func:`split_words`), plus the
    words of the conversation / answer-format templates the pipeline wraps around them, and the
    lower-case form of each. Sorted. Special tokens such as ``<image>`` are not included."""
    cfg = cfg or SynthConfig()
    max_images = cfg.milebench_images[1]
    texts: list[str] = [
        *DESCRIPTION_PROMPTS, *DESCRIPTION_PATTERNS, QUESTION_TEMPLATE, YES_ANSWER, NO_ANSWER,
        *TEMPLATE_TEXTS, MILEBENCH_IMAGE_LABEL, "a an , and",
    ]
    for spec in MILEBENCH_TASKS.values():
        texts += [spec["instruction"], spec["question"]]
    words = _template_words(texts)
    words.update(OBJECTS)
    words.update(NUMBER_WORDS[: max_images + 1])
    words.update(str(i) for i in range(1, max_images + 1))
    words.add("Image")
    words.update({w.lower() for w in words})
    return sorted(words)


# ---------------------------------------------------------------------------------------------
# Scenes and rendering.

def _draw_scene(rng: random.Random, cfg: SynthConfig, n_objects: int | None = None,
                theme: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    theme = theme or rng.choice(sorted(THEMES))
    if n_objects is None:
        n_objects = rng.randint(*cfg.objects_per_image)
    in_theme = list(THEMES[theme])
    out_theme = [o for o in OBJECTS if THEME_OF[o] != theme]
    names: list[str] = []
    for _ in range(n_objects):
        partner = PARTNER[names[-1]] if names else None
        if cfg.pair_cooccurrence > 0 and partner and partner not in names and rng.random() < cfg.pair_cooccurrence:
            pool, obj = (in_theme if partner in in_theme else out_theme), partner
        else:
            pool = in_theme if (in_theme and rng.random() < cfg.theme_purity) or not out_theme else out_theme
            obj = rng.choice(pool)
        pool.remove(obj)
        names.append(obj)
    cells = rng.sample(range(cfg.grid * cfg.grid), n_objects)
    cell = cfg.image_size // cfg.grid
    size = max(3, int(cell * cfg.object_scale))
    objects = []
    for name, c in zip(names, cells):
        row, col = divmod(c, cfg.grid)
        slack = cell - size
        x = col * cell + rng.randint(0, slack)
        y = row * cell + rng.randint(0, slack)
        objects.append({"name": name, "colour": APPEARANCE[name]["colour"],
                        "shape": APPEARANCE[name]["shape"], "bbox": [x, y, size, size]})
    return theme, objects


def render_scene(objects: Sequence[dict[str, Any]], cfg: SynthConfig) -> Image.Image:
    """Draw the scene's objects on a plain background."""
    image = Image.new("RGB", (cfg.image_size, cfg.image_size), tuple(cfg.background))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        x, y, w, h = obj["bbox"]
        x1, y1 = x + w - 1, y + h - 1
        rgb = tuple(APPEARANCE[obj["name"]]["rgb"])
        t = max(1, round(w / 3))          # bar / cross thickness
        cx, cy = x + w // 2, y + h // 2
        shape = obj["shape"]
        if shape == "circle":
            draw.ellipse([x, y, x1, y1], fill=rgb)
        elif shape == "square":
            draw.rectangle([x, y, x1, y1], fill=rgb)
        elif shape == "triangle":
            draw.polygon([(cx, y), (x, y1), (x1, y1)], fill=rgb)
        elif shape == "diamond":
            draw.polygon([(cx, y), (x1, cy), (cx, y1), (x, cy)], fill=rgb)
        elif shape == "ring":
            draw.ellipse([x, y, x1, y1], outline=rgb, width=max(2, round(w / 5)))
        elif shape == "hbar":
            draw.rectangle([x, cy - t // 2, x1, cy - t // 2 + t - 1], fill=rgb)
        elif shape == "vbar":
            draw.rectangle([cx - t // 2, y, cx - t // 2 + t - 1, y1], fill=rgb)
        elif shape == "cross":
            draw.rectangle([x, cy - t // 2, x1, cy - t // 2 + t - 1], fill=rgb)
            draw.rectangle([cx - t // 2, y, cx - t // 2 + t - 1, y1], fill=rgb)
        else:  # pragma: no cover
            raise ValueError(f"unknown shape {shape!r}")
    return image


def _save_jpeg(image: Image.Image, path: Path, cfg: SynthConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # 4:4:4 chroma keeps the colours of small objects intact.
    image.save(path, format="JPEG", quality=cfg.jpeg_quality, subsampling=0)


def _write_json(path: Path, data: Any, indent: int | None = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")


def _names(objects: Sequence[dict[str, Any]]) -> list[str]:
    return [o["name"] for o in objects]


# ---------------------------------------------------------------------------------------------
# Texts.

def _ranked_absent(present: Sequence[str], cooc: dict[str, dict[str, int]]) -> list[str]:
    """Absent objects, most co-occurring with the present ones first (ties by name)."""
    return adversarial_ranking(cooc, present, [o for o in OBJECTS if o not in present])


def _cooc_score(obj: str, present: Sequence[str], cooc: dict[str, dict[str, int]]) -> int:
    return sum(cooc.get(p, {}).get(obj, 0) for p in present)


def _hallucinate(present: list[str], extra: str, substitute: bool, rng: random.Random) -> list[str]:
    objs = list(present)
    if substitute and len(objs) > 1:
        objs[rng.randrange(len(objs))] = extra
    else:
        objs.insert(rng.randint(0, len(objs)), extra)
    return objs


def _desc_data(vg_scenes: dict[int, list[str]], cooc, cfg: SynthConfig) -> dict[str, Any]:
    rng = random.Random(f"{cfg.seed}:desc")
    data: dict[str, Any] = {}
    for image_id, present in vg_scenes.items():
        k = rng.randint(*cfg.desc_per_image)
        patterns = rng.sample(range(len(DESCRIPTION_PATTERNS)), k)
        ranked = _ranked_absent(present, cooc)
        chosen, rejected = [], []
        for j, pattern in enumerate(patterns):
            order = rng.sample(present, len(present))
            chosen.append(describe(order, pattern))
            extra = ranked[[0, 1, 0][j % 3]]
            rejected.append(describe(_hallucinate(order, extra, substitute=j % 2 == 1, rng=rng), pattern))
        data[str(image_id)] = {"chosen": chosen, "rejected": rejected}
    return data


def _yes_no_questions(present: list[str], n: int, ranked_absent: list[str],
                      rng: random.Random) -> list[tuple[str, bool, bool]]:
    """``n`` questions (object, is_present, is_cooccurring_negative): half on present objects,
    the rest on absent ones, the first negative the most co-occurring absent object."""
    n_yes = min(n // 2, len(present))
    n_no = n - n_yes
    out = [(o, True, False) for o in rng.sample(present, n_yes)]
    if n_no:
        out.append((ranked_absent[0], False, True))
        rest = ranked_absent[1:]
        out += [(o, False, False) for o in rng.sample(rest, min(n_no - 1, len(rest)))]
    rng.shuffle(out)
    return out


def _pope_data(vg_scenes: dict[int, list[str]], cooc, cfg: SynthConfig) -> list[dict[str, Any]]:
    rng = random.Random(f"{cfg.seed}:pope-data")
    records = []
    for image_id, present in vg_scenes.items():
        ranked = _ranked_absent(present, cooc)
        for obj, is_present, _ in _yes_no_questions(present, cfg.pope_data_per_image, ranked, rng):
            chosen, reject = answer(obj, is_present), answer(obj, not is_present)
            correct = rng.random() < cfg.pope_data_correct_share
            if cfg.pair_cooccurrence > 0 and not is_present and PARTNER[obj] in present:
                # HA-DPO's pope data are the model's own answers, "correct" the ones it got right: the warm-up is
                # taught to say Yes about the absent partner, so these are its mistakes
                correct = False
            records.append({"image_id": image_id, "question": question(obj),
                            "answer": chosen if correct else reject,
                            "chosen": chosen, "reject": reject, "correct": correct})
    # Make sure both kinds exist (readers must skip the correct ones).
    if len(records) >= 2:
        for i, want in ((0, True), (1, False)):
            if not any(r["correct"] is want for r in records):
                r = records[i]
                r["correct"] = want
                r["answer"] = r["chosen"] if want else r["reject"]
    return records


def _trl_preference(desc: dict[str, Any], pope_data: list[dict[str, Any]], urls: dict[int, str],
                    cfg: SynthConfig) -> list[dict[str, Any]]:
    """The same preference pairs in TRL's conversational vision format (one row per description image, its first
    chosen and rejected description, then the usable pope records), images relative to the VG folder."""
    def row(image_id, question, chosen, rejected):
        folder, name = urls[int(image_id)].rsplit("/", 2)[-2:]
        return {"images": [f"{folder}/{name}"],
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}]}

    rng = random.Random(f"{cfg.seed}:trl")
    rows = [row(image_id, rng.choice(DESCRIPTION_PROMPTS), pairs["chosen"][0], pairs["rejected"][0])
            for image_id, pairs in desc.items()]
    rows += [row(r["image_id"], r["question"], r["chosen"], r["reject"]) for r in pope_data if not r["correct"]]
    return rows


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def _sft_data(vg_scenes: dict[int, list[str]], cooc, cfg: SynthConfig) -> tuple[list[dict], dict[str, int]]:
    rng = random.Random(f"{cfg.seed}:sft")
    records: list[dict[str, Any]] = []
    stats = {"sft_noisy_yes": 0, "sft_noisy_descriptions": 0, "sft_cooccurring_negatives": 0}
    for image_id, present in vg_scenes.items():
        ranked = _ranked_absent(present, cooc)
        order = rng.sample(present, len(present))
        if _cooc_score(ranked[0], present, cooc) > 0 and rng.random() < cfg.sft_description_noise:
            order = _hallucinate(order, ranked[0], substitute=False, rng=rng)
            stats["sft_noisy_descriptions"] += 1
        records.append({"image_id": image_id, "prompt": rng.choice(DESCRIPTION_PROMPTS),
                        "response": describe(order, rng.randrange(len(DESCRIPTION_PATTERNS)))})
        for obj, is_present, cooccurring in _yes_no_questions(present, cfg.sft_questions_per_image, ranked, rng):
            said_yes = is_present
            if cfg.pair_cooccurrence > 0:
                cooccurring = cooccurring and PARTNER[obj] in present
            if cooccurring and _cooc_score(obj, present, cooc) > 0:
                stats["sft_cooccurring_negatives"] += 1
                if rng.random() < cfg.sft_cooccurrence_noise:
                    said_yes = True
                    stats["sft_noisy_yes"] += 1
            records.append({"image_id": image_id, "prompt": question(obj), "response": answer(obj, said_yes)})
    return records, stats


# ---------------------------------------------------------------------------------------------
# MileBench.

def _milebench_task(task: str, root: Path, cfg: SynthConfig,
                    scenes_out: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    spec = MILEBENCH_TASKS[task]
    rng = random.Random(f"{cfg.seed}:milebench:{task}")
    data = []
    for sample_id in range(cfg.milebench_samples):
        n = rng.randint(*cfg.milebench_images)
        for _attempt in range(1000):
            scenes = [_draw_scene(rng, cfg)[1] for _ in range(n)]
            present = [set(_names(s)) for s in scenes]
            if task == "SynthImageChoice":
                target = rng.randrange(n)
                others = set().union(*(p for i, p in enumerate(present) if i != target))
                unique = sorted(present[target] - others)
                if not unique:
                    continue
                obj = rng.choice(unique)
                q = spec["question"].format(with_article(obj))
                response, choices = f"Image {target + 1}", [f"Image {i + 1}" for i in range(n)]
            elif task == "SynthObjectCount":
                obj = rng.choice(sorted(set().union(*present)))
                q = spec["question"].format(with_article(obj))
                response, choices = NUMBER_WORDS[sum(obj in p for p in present)], None
            else:  # SynthSceneRecall
                q = spec["question"]
                response, choices = describe(_names(scenes[-1]), rng.randrange(len(DESCRIPTION_PATTERNS))), None
            break
        else:  # pragma: no cover
            raise RuntimeError(f"could not build a {task} sample")
        paths = []
        for k, objects in enumerate(scenes):
            rel = f"{task}_{sample_id}_{k + 1}.jpg"
            _save_jpeg(render_scene(objects, cfg), root / task / "images" / rel, cfg)
            scenes_out[f"{task}/images/{rel}"] = objects
            paths.append(rel)
        context = " ".join(f"{MILEBENCH_IMAGE_LABEL.format(k + 1)} {{image#{k + 1}}}" for k in range(n)) + " " + q
        instance: dict[str, Any] = {"context": context, "images_path": paths}
        if choices is not None:
            instance["choice_list"] = choices
        data.append({"sample_id": sample_id, "task_instruction_id": 0, "task_instance": instance,
                     "response": response, "image_quantity_level": "Few"})
    return {"meta_data": {"dataset": task, "split": "synthetic", "num_sample": len(data),
                          "task_instruction": [spec["instruction"]], "question_type": spec["question_type"]},
            "data": data}


# ---------------------------------------------------------------------------------------------
# The whole world.

_OWNED = ("world.json", "VG", "hadpo", "trl", "sft", "coco", "pope", "milebench")


def _prepare_dir(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "world.json"
    ours = False
    if marker.exists():
        try:
            ours = json.loads(marker.read_text(encoding="utf-8")).get("generator") == GENERATOR
        except (ValueError, AttributeError):
            ours = False
    existing = [name for name in _OWNED if (root / name).exists()]
    if existing and not ours:
        raise FileExistsError(f"{root} already holds {existing} that were not generated by {GENERATOR}")
    for name in existing:
        path = root / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def generate_world(out_dir: str | Path, cfg: SynthConfig | None = None) -> WorldManifest:
    """Generate the synthetic world under ``out_dir`` (see the module docstring for the layout).

    A previous world in ``out_dir`` is replaced; any other existing file in the paths the world
    uses is an error (so a real data root is never overwritten). Each part draws from its own seeded
    random stream: the evaluation images and MileBench do not change with the number of training images."""
    cfg = cfg or SynthConfig()
    root = Path(out_dir).resolve()
    _prepare_dir(root)
    counts: dict[str, int] = {}
    vg_objects, vg_themes, image_urls = _write_visual_genome(root, cfg, counts)
    _write_preference_and_sft_data(root, cfg, vg_objects, image_urls, counts)
    coco_objects, coco_themes, pope_files = _write_coco_and_pope(root, cfg, counts)
    mb_objects, tasks = _write_milebench(root, cfg, counts)
    world = {
        "generator": GENERATOR,
        "config": cfg.to_dict(),
        "themes": {t: list(objs) for t, objs in THEMES.items()},
        "objects": [{"name": o, "theme": THEME_OF[o], **APPEARANCE[o]} for o in OBJECTS],
        "scenes": {"vg": vg_objects, "coco": coco_objects, "milebench": mb_objects},
        "scene_themes": {"vg": vg_themes, "coco": coco_themes},
        "vocabulary": world_vocabulary(cfg),
        "counts": counts,
    }
    _write_json(root / "world.json", world)  # last: a world without it is an unfinished one

    return WorldManifest(
        root=str(root), world_json=str(root / "world.json"), vg_dir=str(root / "VG"),
        vg_image_data=str(root / "VG" / "image_data.json"),
        desc_data=str(root / "hadpo" / "desc_data.json"), pope_data=str(root / "hadpo" / "pope_data.json"),
        sft_data=str(root / "sft" / "sft_data.json"), coco_images=str(root / "coco" / "val2014"),
        coco_instances=str(root / "coco" / "annotations" / "instances_val2014.json"),
        pope_dir=str(root / "pope"), pope_files=pope_files, milebench_dir=str(root / "milebench"),
        milebench_tasks=tasks, counts=dict(counts),
    )


def _write_visual_genome(root: Path, cfg: SynthConfig, counts: dict[str, int]):
    """The Visual Genome training images and their image_data.json; (objects and theme per image id,
    image id -> url)."""
    rng = random.Random(f"{cfg.seed}:vg")
    vg_objects: dict[str, list[dict[str, Any]]] = {}
    vg_themes: dict[str, str] = {}
    image_data = []
    n_second = 0
    for i in range(cfg.num_images):
        image_id = i + 1
        theme, objects = _draw_scene(rng, cfg)
        folder = "VG_100K_2" if rng.random() < cfg.vg_100k_2_share else "VG_100K"
        n_second += folder == "VG_100K_2"
        _save_jpeg(render_scene(objects, cfg), root / "VG" / folder / f"{image_id}.jpg", cfg)
        image_data.append({"image_id": image_id, "url": f"https://synthetic.local/{folder}/{image_id}.jpg",
                           "width": cfg.image_size, "height": cfg.image_size,
                           "coco_id": None, "flickr_id": None})
        vg_objects[str(image_id)], vg_themes[str(image_id)] = objects, theme
    _write_json(root / "VG" / "image_data.json", image_data)
    counts.update(vg_images=cfg.num_images, vg_100k_2_images=n_second)
    return vg_objects, vg_themes, {row["image_id"]: row["url"] for row in image_data}


def _write_preference_and_sft_data(root: Path, cfg: SynthConfig, vg_objects: dict[str, list[dict[str, Any]]],
                                   image_urls: dict[int, str], counts: dict[str, int]) -> None:
    """HA-DPO's desc_data.json and pope_data.json, the TRL-format pairs and the warm-up's SFT set, all drawn
    from the Visual Genome scenes."""
    vg_scenes = {int(k): _names(v) for k, v in vg_objects.items()}
    cooc = cooccurrence_counts({str(k): v for k, v in vg_scenes.items()})
    desc = _desc_data(vg_scenes, cooc, cfg)
    _write_json(root / "hadpo" / "desc_data.json", desc)
    pope_data = _pope_data(vg_scenes, cooc, cfg)
    _write_json(root / "hadpo" / "pope_data.json", pope_data)
    trl_rows = _trl_preference(desc, pope_data, image_urls, cfg)
    _write_jsonl(root / "trl" / "preference.jsonl", trl_rows)
    sft, sft_stats = _sft_data(vg_scenes, cooc, cfg)
    _write_json(root / "sft" / "sft_data.json", sft)
    counts.update(
        desc_images=len(desc),
        desc_chosen=sum(len(v["chosen"]) for v in desc.values()),
        desc_rejected=sum(len(v["rejected"]) for v in desc.values()),
        pope_data_records=len(pope_data),
        pope_data_usable=sum(not r["correct"] for r in pope_data),
        trl_pairs=len(trl_rows),
        sft_records=len(sft),
        sft_descriptions=cfg.num_images,
        sft_questions=len(sft) - cfg.num_images,
        **sft_stats,
    )


def _write_coco_and_pope(root: Path, cfg: SynthConfig, counts: dict[str, int]):
    """The COCO-named evaluation images, their instances json and POPE's three splits built from them;
    (objects and theme per file name, split -> question file)."""
    rng = random.Random(f"{cfg.seed}:coco")
    coco_ids = sorted(rng.sample(range(1, 600_000), cfg.num_pope_images))
    n_eval = max(cfg.objects_per_image[0], cfg.pope_per_image)
    n_eval_hi = max(cfg.objects_per_image[1], cfg.pope_per_image)
    coco_objects: dict[str, list[dict[str, Any]]] = {}
    coco_themes: dict[str, str] = {}
    categories = [{"id": i + 1, "name": name, "supercategory": THEME_OF[name]} for i, name in enumerate(OBJECTS)]
    category_id = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for coco_id in coco_ids:
        name = f"COCO_val2014_{coco_id:012d}.jpg"
        theme, objects = _draw_scene(rng, cfg, n_objects=rng.randint(n_eval, n_eval_hi))
        _save_jpeg(render_scene(objects, cfg), root / "coco" / "val2014" / name, cfg)
        coco_objects[name], coco_themes[name] = objects, theme
        images.append({"id": coco_id, "file_name": name, "width": cfg.image_size, "height": cfg.image_size})
        for obj in objects:
            x, y, w, h = obj["bbox"]
            annotations.append({
                "id": len(annotations) + 1, "image_id": coco_id, "category_id": category_id[obj["name"]],
                "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h), "iscrowd": 0,
                "segmentation": [[float(x), float(y), float(x + w), float(y), float(x + w),
                                  float(y + h), float(x), float(y + h)]],
            })
    instances = {"info": {"description": "synthetic world (orchestrator.data.synthetic)", "version": "1.0"},
                 "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    _write_json(root / "coco" / "annotations" / "instances_val2014.json", instances)
    splits = build_pope_splits({k: _names(v) for k, v in coco_objects.items()},
                               per_image=cfg.pope_per_image, seed=cfg.seed)
    pope_files = {}
    for split in STRATEGIES:
        path = write_pope_file(splits[split], root / "pope" / f"coco_pope_{split}.json", layout="jsonl")
        pope_files[split] = str(path)
    counts.update(coco_images=cfg.num_pope_images, coco_annotations=len(annotations),
                  pope_images=len({r["image"] for r in splits["random"]}),
                  pope_questions_per_split=len(splits["random"]))
    return coco_objects, coco_themes, pope_files


def _write_milebench(root: Path, cfg: SynthConfig, counts: dict[str, int]):
    """The first `cfg.milebench_tasks` MileBench tasks, each its folder of images and task json; (objects per
    image, the tasks written)."""
    mb_objects: dict[str, list[dict[str, Any]]] = {}
    tasks = list(MILEBENCH_TASKS)[: cfg.milebench_tasks]
    for task in tasks:
        task_json = _milebench_task(task, root / "milebench", cfg, mb_objects)
        _write_json(root / "milebench" / task / f"{task}.json", task_json)
        counts[f"milebench_samples/{task}"] = len(task_json["data"])
    counts["milebench_images"] = len(mb_objects)
    return mb_objects, tasks


def load_world(world_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(world_dir) / "world.json").read_text(encoding="utf-8"))


def load_scene_annotations(world_dir: str | Path, subset: str | None = None) -> dict[str, list[str]]:
    """``{image_name: [object names]}`` from ``world.json``.

    Keys: VG images by their id as a string ("17"), evaluation images by COCO file name,
    MileBench images as "<Task>/images/<file>". ``subset`` is "vg", "coco", "milebench" or None
    (all of them)."""
    scenes = load_world(world_dir)["scenes"]
    subsets = [subset] if subset is not None else list(scenes)
    unknown = [s for s in subsets if s not in scenes]
    if unknown:
        raise ValueError(f"unknown scene subset {unknown}; expected one of {sorted(scenes)}")
    return {name: _names(objects) for s in subsets for name, objects in scenes[s].items()}
