import json

import pytest

from orchestrator.data.pope_builder import (
    STRATEGIES,
    adversarial_ranking,
    build_pope_questions,
    build_pope_splits,
    coco_style_annotations,
    cooccurrence_counts,
    eligible_images,
    object_frequencies,
    popular_ranking,
    read_pope_file,
    select_images,
    write_pope_file,
)

# Two clusters: pets and traffic. Frequencies: cat 4, car 3, dog 2, leash 2, bus 2, road 2,
# ball 1, bowl 1, sign 1, light 1. g.jpg has one object only (never eligible).
ANN = {
    "a.jpg": ["dog", "cat", "ball", "cat"],  # duplicates and order do not matter
    "b.jpg": ["cat", "dog", "leash"],
    "c.jpg": ["cat", "leash", "bowl"],
    "d.jpg": ["car", "bus", "road"],
    "e.jpg": ["car", "bus", "sign"],
    "f.jpg": ["car", "road", "light"],
    "g.jpg": ["cat"],
}
VOCAB = {"cat", "dog", "ball", "leash", "bowl", "car", "bus", "road", "sign", "light"}


def _obj(text):
    assert text.startswith("Is there a ") and text.endswith(" in the image?")
    return text[len("Is there a "):-len(" in the image?")]


def _negatives(records, image):
    return [_obj(r["text"]) for r in records if r["image"] == image and r["label"] == "no"]


def _positives(records, image):
    return [_obj(r["text"]) for r in records if r["image"] == image and r["label"] == "yes"]


def test_frequencies_and_cooccurrence():
    freq = object_frequencies(ANN)
    assert freq == {"ball": 1, "bowl": 1, "bus": 2, "car": 3, "cat": 4, "dog": 2, "leash": 2,
                    "light": 1, "road": 2, "sign": 1}
    co = cooccurrence_counts(ANN)
    assert co["cat"]["dog"] == 2 and co["dog"]["cat"] == 2
    assert co["cat"]["leash"] == 2 and co["dog"]["leash"] == 1
    assert co["car"]["bus"] == 2 and co["car"]["road"] == 2 and co["bus"]["road"] == 1
    assert "cat" not in co["cat"] and "car" not in co["cat"]
    assert co["cat"].get("ball") == 1
    # Rankings with deterministic ties.
    assert popular_ranking(freq, ["bus", "leash", "road", "car", "sign"]) == ["car", "bus", "leash", "road", "sign"]
    assert adversarial_ranking(co, ["cat", "dog", "ball"], ["leash", "bowl", "car", "bus"]) == ["leash", "bowl", "bus", "car"]


def test_eligible_and_selection():
    assert eligible_images(ANN, 3) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"]
    picked = select_images(ANN, num_images=3, per_image=3, seed=1)
    assert len(picked) == 3 and picked == sorted(picked)
    assert picked == select_images(ANN, num_images=3, per_image=3, seed=1)
    with pytest.raises(ValueError):
        select_images(ANN, num_images=7)


def test_popular_negatives_exact():
    recs = build_pope_questions(ANN, "popular")
    # a.jpg: absent leash 2, bowl 1, car 3, bus 2, road 2, sign 1, light 1 -> car, then bus/leash/road by name.
    assert _negatives(recs, "a.jpg") == ["car", "bus", "leash"]
    # d.jpg: absent cat 4, dog 2, leash 2, ...
    assert _negatives(recs, "d.jpg") == ["cat", "dog", "leash"]


def test_adversarial_negatives_exact():
    recs = build_pope_questions(ANN, "adversarial")
    # a.jpg (cat, dog, ball): leash co-occurs 2 (cat) + 1 (dog) = 3, bowl 1 (cat), others 0 -> bus by name.
    assert _negatives(recs, "a.jpg") == ["leash", "bowl", "bus"]
    # d.jpg (car, bus, road): light 1 + 1 = 2, sign 1 + 1 = 2 (name order), then 0-score by name: ball.
    assert _negatives(recs, "d.jpg") == ["light", "sign", "ball"]
    co = cooccurrence_counts(ANN)
    for image in eligible_images(ANN):
        present = set(ANN[image])
        negs = _negatives(recs, image)
        score = lambda o: sum(co[p].get(o, 0) for p in present)  # noqa: E731
        worst_chosen = min(score(o) for o in negs)
        assert all(score(o) <= worst_chosen for o in VOCAB - present - set(negs))


def test_random_negatives_absent_and_seeded():
    recs = build_pope_questions(ANN, "random", seed=3)
    for image in eligible_images(ANN):
        negs = _negatives(recs, image)
        assert len(set(negs)) == 3 and not set(negs) & set(ANN[image]) and set(negs) <= VOCAB
    assert recs == build_pope_questions(ANN, "random", seed=3)


def test_structure_alternation_and_ids():
    recs = build_pope_questions(ANN, "adversarial", start_question_id=10)
    assert [r["question_id"] for r in recs] == list(range(10, 10 + len(recs)))
    assert len(recs) == 6 * 6
    assert [r["label"] for r in recs] == ["yes", "no"] * 18
    assert all(list(r) == ["question_id", "image", "text", "label"] for r in recs)
    for image in eligible_images(ANN):
        pos = _positives(recs, image)
        assert len(pos) == 3 and len(set(pos)) == 3 and set(pos) <= set(ANN[image])
        assert len(_negatives(recs, image)) == 3
    assert "g.jpg" not in {r["image"] for r in recs}


def test_splits_share_images_and_yes_questions():
    splits = build_pope_splits(ANN, num_images=4, per_image=3, seed=5)
    assert set(splits) == set(STRATEGIES)
    yes = {s: [r for r in recs if r["label"] == "yes"] for s, recs in splits.items()}
    assert yes["random"] == yes["popular"] == yes["adversarial"]
    images = {s: [r["image"] for r in recs] for s, recs in splits.items()}
    assert images["random"] == images["popular"] == images["adversarial"]
    assert len(set(images["random"])) == 4
    for recs in splits.values():
        assert sum(r["label"] == "yes" for r in recs) == sum(r["label"] == "no" for r in recs) == 12


def test_template_and_bad_strategy():
    recs = build_pope_questions(ANN, "random", template="Do you see a {}?")
    assert recs[0]["text"].startswith("Do you see a ")
    with pytest.raises(ValueError):
        build_pope_questions(ANN, "weird")


@pytest.mark.parametrize("layout", ["jsonl", "array"])
def test_file_round_trip(tmp_path, layout):
    recs = build_pope_questions(ANN, "popular")
    path = write_pope_file(recs, tmp_path / f"pope_{layout}.json", layout=layout)
    text = path.read_text()
    if layout == "jsonl":
        lines = text.splitlines()
        assert len(lines) == len(recs)
        assert lines[0].startswith('{"question_id": 1, "image": "a.jpg", "text": ')
        assert all(json.loads(line) == r for line, r in zip(lines, recs))
    else:
        assert text.startswith("[\n") and json.loads(text) == recs
    assert read_pope_file(path) == recs
    with pytest.raises(ValueError):
        write_pope_file(recs, tmp_path / "x.json", layout="csv")


def test_coco_style_annotations(tmp_path):
    instances = {
        "images": [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg"},
                   {"id": 2, "file_name": "COCO_val2014_000000000002.jpg"},
                   {"id": 3, "file_name": "COCO_val2014_000000000003.jpg"}],
        "categories": [{"id": 5, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 9, "name": "car"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7}, {"id": 2, "image_id": 1, "category_id": 5},
                        {"id": 3, "image_id": 1, "category_id": 5}, {"id": 4, "image_id": 2, "category_id": 9}],
    }
    expected = {"COCO_val2014_000000000001.jpg": ["cat", "dog"], "COCO_val2014_000000000002.jpg": ["car"],
                "COCO_val2014_000000000003.jpg": []}
    assert coco_style_annotations(instances) == expected
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(instances))
    assert coco_style_annotations(path) == expected
    instances["annotations"].append({"id": 5, "image_id": 99, "category_id": 5})
    with pytest.raises(ValueError):
        coco_style_annotations(instances)
