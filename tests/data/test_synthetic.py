import json
import re
from itertools import combinations
from pathlib import Path

import pytest
from PIL import Image

from orchestrator.data.pope_builder import coco_style_annotations, cooccurrence_counts, read_pope_file
from orchestrator.data.synthetic import (
    APPEARANCE,
    DESCRIPTION_PROMPTS,
    OBJECTS,
    PARTNER,
    THEME_OF,
    SynthConfig,
    generate_world,
    load_scene_annotations,
    mentioned_objects,
    split_words,
    strip_placeholders,
    world_vocabulary,
)

CFG = SynthConfig()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return generate_world(root, CFG)


def _load(path):
    return json.loads(Path(path).read_text())


def _json_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*.json"))}


def test_deterministic(world, tmp_path):
    again = generate_world(tmp_path / "again", CFG)
    a, b = _json_files(world.root), _json_files(again.root)
    assert a.keys() == b.keys() and len(a) >= 10
    assert a == b
    assert (Path(world.root) / "VG/image_data.json").read_bytes() == (Path(again.root) / "VG/image_data.json").read_bytes()
    other = generate_world(tmp_path / "other", SynthConfig(seed=1))
    c = _json_files(other.root)
    for name in ("hadpo/desc_data.json", "hadpo/pope_data.json", "sft/sft_data.json",
                 "pope/coco_pope_random.json", "world.json"):
        assert a[name] != c[name], name


def test_layout_and_counts(world):
    root = Path(world.root)
    image_data = _load(world.vg_image_data)
    assert len(image_data) == CFG.num_images
    folders = set()
    for entry in image_data:
        assert set(entry) >= {"image_id", "url", "width", "height"}
        assert isinstance(entry["image_id"], int)
        folder, name = entry["url"].split("/")[-2:]
        assert re.fullmatch(r"https://synthetic\.local/VG_100K(_2)?/\d+\.jpg", entry["url"])
        assert name == f"{entry['image_id']}.jpg" and (root / "VG" / folder / name).is_file()
        folders.add(folder)
    assert folders == {"VG_100K", "VG_100K_2"}
    vg_ids = {str(e["image_id"]) for e in image_data}

    desc = _load(world.desc_data)
    assert set(desc) == vg_ids
    for v in desc.values():
        assert set(v) == {"chosen", "rejected"} and 2 <= len(v["chosen"]) <= 3 and len(v["rejected"]) == len(v["chosen"])

    pope_data = _load(world.pope_data)
    assert len(pope_data) == CFG.num_images * CFG.pope_data_per_image
    assert {r["correct"] for r in pope_data} == {True, False}
    for r in pope_data:
        assert list(r) == ["image_id", "question", "answer", "chosen", "reject", "correct"]
        assert str(r["image_id"]) in vg_ids and r["chosen"] != r["reject"]
        assert r["answer"] == (r["chosen"] if r["correct"] else r["reject"])

    sft = _load(world.sft_data)
    assert len(sft) == CFG.num_images * (1 + CFG.sft_questions_per_image)
    assert all(list(r) == ["image_id", "prompt", "response"] for r in sft)
    assert {str(r["image_id"]) for r in sft} == vg_ids

    coco_dir = Path(world.coco_images)
    coco_files = sorted(p.name for p in coco_dir.glob("*.jpg"))
    assert len(coco_files) == CFG.num_pope_images
    assert all(re.fullmatch(r"COCO_val2014_\d{12}\.jpg", n) for n in coco_files)
    instances = _load(world.coco_instances)
    assert sorted(im["file_name"] for im in instances["images"]) == coco_files
    assert coco_style_annotations(instances) == {
        k: sorted(v) for k, v in load_scene_annotations(world.root, "coco").items()}
    assert not set(load_scene_annotations(world.root, "vg")) & set(coco_files)

    for split in ("random", "popular", "adversarial"):
        path = root / "pope" / f"coco_pope_{split}.json"
        assert world.pope_files[split] == str(path)
        assert len(path.read_text().splitlines()) == CFG.num_pope_images * 2 * CFG.pope_per_image

    assert len(world.milebench_tasks) == CFG.milebench_tasks
    for task in world.milebench_tasks:
        data = _load(root / "milebench" / task / f"{task}.json")
        assert data["meta_data"]["question_type"] in {"open-ended", "multi-choice"}
        assert len(data["data"]) == CFG.milebench_samples == data["meta_data"]["num_sample"]
    assert {_load(root / "milebench" / t / f"{t}.json")["meta_data"]["question_type"]
            for t in world.milebench_tasks} == {"open-ended", "multi-choice"}

    w = _load(world.world_json)
    assert w["config"]["num_images"] == CFG.num_images and w["vocabulary"] == world_vocabulary(CFG)
    assert world.counts["pope_questions_per_split"] == CFG.num_pope_images * 6


def test_descriptions_faithful_and_hallucinated(world):
    scenes = load_scene_annotations(world.root, "vg")
    for image_id, v in _load(world.desc_data).items():
        present = set(scenes[image_id])
        for text in v["chosen"]:
            assert mentioned_objects(text) == present, text
        for text in v["rejected"]:
            assert mentioned_objects(text) - present, text


def test_pope_data_answers_match_scenes(world):
    scenes = load_scene_annotations(world.root, "vg")
    for r in _load(world.pope_data):
        obj = r["question"][len("Is there a "):-len(" in the image?")]
        truth = obj in scenes[str(r["image_id"])]
        assert r["chosen"].startswith("Yes" if truth else "No")
        assert r["reject"].startswith("No" if truth else "Yes")


def test_pope_files_labels_and_shared_yes(world):
    scenes = load_scene_annotations(world.root, "coco")
    splits = {s: read_pope_file(p) for s, p in world.pope_files.items()}
    yes = [[r for r in recs if r["label"] == "yes"] for recs in splits.values()]
    assert yes[0] == yes[1] == yes[2]
    for recs in splits.values():
        for r in recs:
            obj = r["text"][len("Is there a "):-len(" in the image?")]
            assert (obj in scenes[r["image"]]) == (r["label"] == "yes")
    # Adversarial negatives are harder: more of them are theme-mates of present objects.
    def themed(recs):
        return sum(r["label"] == "no" and THEME_OF[r["text"].split()[3]] in
                   {THEME_OF[o] for o in scenes[r["image"]]} for r in recs)
    assert themed(splits["adversarial"]) > themed(splits["random"])


def test_cooccurrence_bias(world):
    co = cooccurrence_counts(load_scene_annotations(world.root, "vg"))
    within, across = [], []
    for a, b in combinations(OBJECTS, 2):
        (within if THEME_OF[a] == THEME_OF[b] else across).append(co.get(a, {}).get(b, 0))
    mean_within, mean_across = sum(within) / len(within), sum(across) / len(across)
    assert mean_within > 5 * mean_across, (mean_within, mean_across)


def test_sft_bias_noise(world):
    scenes = load_scene_annotations(world.root, "vg")
    co = cooccurrence_counts(scenes)
    sft = _load(world.sft_data)
    descs = [r for r in sft if r["prompt"] in DESCRIPTION_PROMPTS]
    assert len(descs) == CFG.num_images
    wrong_yes = 0
    for r in sft:
        if r["prompt"].startswith("Is there"):
            obj = r["prompt"].split()[3]
            present = scenes[str(r["image_id"])]
            if r["response"].startswith("Yes") and obj not in present:
                wrong_yes += 1
                assert sum(co[p].get(obj, 0) for p in present) > 0
            if obj in present:
                assert r["response"].startswith("Yes")
    assert wrong_yes == world.counts["sft_noisy_yes"] > 0
    share = wrong_yes / world.counts["sft_cooccurring_negatives"]
    assert 0.15 < share < 0.45


def test_with_pair_cooccurrence_partners_co_occur_most_and_the_warm_up_is_taught_to_hallucinate_the_partner(tmp_path):
    cfg = SynthConfig(num_images=150, num_pope_images=12, milebench_tasks=0, pair_cooccurrence=0.8,
                      sft_cooccurrence_noise=0.7)
    world = generate_world(tmp_path / "pairs", cfg)
    scenes = load_scene_annotations(world.root, "vg")
    co = cooccurrence_counts(scenes)
    for obj in OBJECTS:  # each object's most frequent companion is its partner
        assert max(co[obj], key=lambda other: co[obj][other]) == PARTNER[obj], (obj, co[obj])
    answers = {"partner": [], "other in-theme": []}
    for r in _load(world.sft_data):
        if not r["prompt"].startswith("Is there"):
            continue
        obj, present = r["prompt"].split()[3], scenes[str(r["image_id"])]
        if obj in present:
            assert r["response"].startswith("Yes")
        elif PARTNER[obj] in present:
            answers["partner"].append(r["response"].startswith("Yes"))
        elif any(THEME_OF[p] == THEME_OF[obj] for p in present):
            answers["other in-theme"].append(r["response"].startswith("Yes"))
        else:
            assert r["response"].startswith("No")
    # the wrong Yes is about the absent partner only; the theme's other absent objects get the right No
    assert sum(answers["partner"]) == world.counts["sft_noisy_yes"] and \
        0.55 < sum(answers["partner"]) / len(answers["partner"]) < 0.85
    assert len(answers["other in-theme"]) > 20 and not any(answers["other in-theme"])
    # HA-DPO keeps the model's mistakes: a pope_data record about an absent partner is never marked correct
    about_partner = [r for r in _load(world.pope_data) if r["question"].split()[3] not in scenes[str(r["image_id"])]
                     and PARTNER[r["question"].split()[3]] in scenes[str(r["image_id"])]]
    assert about_partner and not any(r["correct"] for r in about_partner)


def _all_texts(world):
    root = Path(world.root)
    texts = []
    for v in _load(world.desc_data).values():
        texts += v["chosen"] + v["rejected"]
    for r in _load(world.pope_data):
        texts += [r["question"], r["answer"], r["chosen"], r["reject"]]
    for r in _load(world.sft_data):
        texts += [r["prompt"], r["response"]]
    for p in world.pope_files.values():
        texts += [r["text"] for r in read_pope_file(p)]
    for task in world.milebench_tasks:
        data = _load(root / "milebench" / task / f"{task}.json")
        texts += data["meta_data"]["task_instruction"]
        for s in data["data"]:
            texts += [strip_placeholders(s["task_instance"]["context"]), s["response"],
                      *s["task_instance"].get("choice_list", [])]
    return texts


def test_vocabulary_closed(world):
    vocab = set(world_vocabulary(CFG))
    assert set(OBJECTS) <= vocab and {"Yes", "No", ".", ",", "?", ":"} <= vocab
    assert 12 <= len(OBJECTS) <= 16 and all(o.isalpha() and o.islower() for o in OBJECTS)
    texts = _all_texts(world)
    assert len(texts) > 1000
    missing = {w for t in texts for w in split_words(t)} - vocab
    assert not missing
    assert split_words("Yes, there is a cup.") == ["Yes", ",", "there", "is", "a", "cup", "."]


def test_milebench_format(world):
    root = Path(world.root)
    scenes = load_scene_annotations(world.root, "milebench")
    for task in world.milebench_tasks:
        data = _load(root / "milebench" / task / f"{task}.json")
        meta = data["meta_data"]
        assert isinstance(meta["task_instruction"], list) and meta["task_instruction"]
        for s in data["data"]:
            inst = s["task_instance"]
            n = len(inst["images_path"])
            assert 2 <= n <= 4 and s["image_quantity_level"] == "Few"
            assert re.findall(r"\{image#(\d+)\}", inst["context"]) == [str(k) for k in range(1, n + 1)]
            assert 0 <= s["task_instruction_id"] < len(meta["task_instruction"])
            for p in inst["images_path"]:
                assert (root / "milebench" / task / "images" / p).is_file()
            if meta["question_type"] == "multi-choice":
                assert s["response"] in inst["choice_list"]
                obj = inst["context"].split()[-1].rstrip("?")
                holders = [k + 1 for k, p in enumerate(inst["images_path"]) if obj in scenes[f"{task}/images/{p}"]]
                assert holders == [int(s["response"].split()[1])]
            else:
                assert "choice_list" not in inst and s["response"]


def test_images_decode_with_colours(world):
    w = _load(world.world_json)
    root = Path(world.root)
    checked = 0
    for name, objects in list(w["scenes"]["coco"].items())[:10]:
        with Image.open(root / "coco" / "val2014" / name) as im:
            assert im.format == "JPEG" and im.size == (CFG.image_size, CFG.image_size)
            im = im.convert("RGB")
            for obj in objects:
                if obj["shape"] in {"circle", "square", "diamond", "cross"}:
                    x, y, bw, bh = obj["bbox"]
                    pixel = im.getpixel((x + bw // 2, y + bh // 2))
                    target = APPEARANCE[obj["name"]]["rgb"]
                    assert max(abs(a - b) for a, b in zip(pixel, target)) < 40, (obj, pixel)
                    checked += 1
    assert checked > 5
    image_data = _load(world.vg_image_data)[0]
    folder, file = image_data["url"].split("/")[-2:]
    with Image.open(root / "VG" / folder / file) as im:
        assert im.size == (CFG.image_size, CFG.image_size)


def test_small_config_and_overwrite_rules(tmp_path):
    cfg = SynthConfig(seed=7, num_images=10, num_pope_images=5, image_size=32, milebench_tasks=3,
                      milebench_samples=2)
    m = generate_world(tmp_path / "w", cfg)
    assert len(_load(m.vg_image_data)) == 10 and len(m.milebench_tasks) == 3
    with Image.open(next(Path(m.coco_images).glob("*.jpg"))) as im:
        assert im.size == (32, 32)
    m2 = generate_world(tmp_path / "w", SynthConfig(seed=7, num_images=4, num_pope_images=3, milebench_tasks=1))
    assert len(list(Path(m2.vg_dir).rglob("*.jpg"))) == 4  # the old world was replaced
    foreign = tmp_path / "real"
    (foreign / "coco").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        generate_world(foreign, cfg)
    with pytest.raises(ValueError):
        SynthConfig(objects_per_image=(3, 2))
