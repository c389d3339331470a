"""POPE score mode with the image prefix computed once per image: same answers as whole prompts."""

import math

import pytest

from orchestrator.data import formats
from orchestrator.eval.predictor import Predictor, PredictorSettings, items_table, pope_items

SPLITS = ("random", "popular", "adversarial")


@pytest.fixture(scope="module")
def all_pope_items(synth_world):
    """Every POPE question of the synthetic world, all three splits (16 images x 6 x 3)."""
    world, _ = synth_world
    rows = []
    for split in SPLITS:
        rows += formats.read_pope_questions(world / f"pope/coco_pope_{split}.json", split=split,
                                            image_root=str(world / "coco/val2014"))
    return pope_items(rows)


def settings(model_dir, **kwargs):
    base = dict(run_id="t", model_path=str(model_dir), mode="score", batch_size=16, dtype="float32")
    base.update(kwargs)
    return PredictorSettings(**base)


def answer(predictor, items):
    rows = predictor(items_table(items).to_pandas()).to_pylist()
    assert [r["item_id"] for r in rows] == [i["item_id"] for i in items]
    return rows


def assert_same_answers(reused, plain, tolerance=1e-3):
    assert len(reused) == len(plain)
    for a, b in zip(reused, plain):
        assert (a["split"], a["item_id"]) == (b["split"], b["item_id"])
        assert a["error"] == b["error"] == ""
        assert a["raw_answer"] == b["raw_answer"] and a["answer"] == b["answer"]
        assert abs(a["p_yes"] - b["p_yes"]) < tolerance


@pytest.fixture(scope="module")
def plain_answers(tiny_model_dir, all_pope_items):
    return answer(Predictor(settings(tiny_model_dir)), all_pope_items)


def test_prompt_split_concatenates_to_the_full_prompt(tiny_model_dir, all_pope_items):
    from orchestrator.eval.prefix_cache import PrefixReuse

    predictor = Predictor(settings(tiny_model_dir, prefix_reuse=True))
    scorer = predictor.prefix
    assert isinstance(scorer, PrefixReuse)
    prefixes = set()
    for item in all_pope_items:
        full = predictor.model.prompt_ids(item["question"], 1)
        prefix, suffix = scorer.split(item["question"])
        assert list(prefix) + list(suffix) == full
        assert prefix[-1] == scorer.image_token_id and scorer.image_token_id not in suffix
        prefixes.add(prefix)
    assert len(prefixes) == 1                      # one prefix for every question: computed once per image
    tokens = predictor.model.tokenizer.convert_ids_to_tokens(list(suffix))
    assert tokens[-2:] == ["ASSISTANT", ":"]


def test_prefix_reuse_gives_the_plain_answers_on_all_splits(tiny_model_dir, all_pope_items, plain_answers):
    # rows in file order (not grouped): the actor groups them by image itself
    predictor = Predictor(settings(tiny_model_dir, prefix_reuse=True))
    reused = answer(predictor, all_pope_items)
    assert_same_answers(reused, plain_answers)
    n_images = len({item["images"][0] for item in all_pope_items})
    stats = predictor.prefix.stats
    assert stats["prefix_computed"] == n_images and stats["questions"] == len(all_pope_items)
    # the splits share their yes-questions: identical (image, question) pairs are computed once
    unique = len({(item["images"][0], item["question"]) for item in all_pope_items})
    assert stats["suffixes"] == unique < len(all_pope_items)
    if predictor.model.device.type == "cpu":  # fp32 on the CPU: equal to rounding
        assert max(abs(a["p_yes"] - b["p_yes"]) for a, b in zip(reused, plain_answers)) < 1e-5
    assert {r["mode"] for r in reused} == {"score"} and '"prefix_reuse": true' in reused[0]["decoding"]


def test_mixed_images_error_rows_and_images_split_across_blocks(tiny_model_dir, all_pope_items, plain_answers,
                                                                 tmp_path):
    plain = {(r["split"], r["item_id"]): r for r in plain_answers}
    images = sorted({item["images"][0] for item in all_pope_items})
    items = [dict(item) for item in all_pope_items if item["images"][0] in images[:3]]
    # a batch of several images, interleaved, with a missing image and an empty question
    items = items[::2] + items[1::2]
    missing, empty = dict(items[0]), dict(items[1])
    missing["item_id"], missing["images"] = "missing", [str(tmp_path / "nowhere.jpg")]
    empty["item_id"], empty["question"] = "empty", ""
    batch = items[:5] + [missing] + items[5:] + [empty]
    predictor = Predictor(settings(tiny_model_dir, prefix_reuse=True, prefix_images=2))
    rows = answer(predictor, batch)
    errors = {r["item_id"]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"missing", "empty"}
    assert "nowhere.jpg" in errors["missing"] and errors["empty"] == "empty question"
    ok = [r for r in rows if not r["error"]]
    assert_same_answers(ok, [plain[(r["split"], r["item_id"])] for r in ok])
    assert {r["batch_size"] for r in ok} == {36, 18}   # 2 images x 18 questions, then 1 image
    # an image whose questions come in two blocks: the second block reuses the cached prefix
    one_image = [dict(item) for item in all_pope_items if item["images"][0] == images[5]]
    first = answer(predictor, one_image[:7])
    computed = predictor.prefix.stats["prefix_computed"]
    second = answer(predictor, one_image[7:])
    assert predictor.prefix.stats["prefix_computed"] == computed and predictor.prefix.stats["prefix_reused"] >= 1
    assert_same_answers(first + second, [plain[(i["split"], i["item_id"])] for i in one_image])


def test_run_eval_with_and_without_prefix_reuse(ray_session, synth_world, tiny_model_dir, tmp_path):
    from orchestrator.config import config_from_dict
    from orchestrator.eval.results import read_answers
    from orchestrator.eval.runner import run_eval

    world, _ = synth_world
    results = {}
    for reuse in (True, False):
        cfg = config_from_dict({"name": "prefix", "output_root": str(tmp_path / f"runs-{reuse}"),
                                "data": {"synthetic_dir": str(world)}, "model": {"dtype": "float32"},
                                "eval": {"mode": "score", "batch_size": 10, "cpus_per_actor": 1,
                                         "prefix_reuse": reuse}})
        result = run_eval(cfg, model_path=str(tiny_model_dir), benchmarks=("pope",), tag=f"reuse-{reuse}")
        assert result.counts["errors"] == 0
        results[reuse] = read_answers(result.answers_dir).sort_values(["split", "item_id"]).to_dict("records")
    reused, plain = results[True], results[False]
    assert len(reused) == 288
    assert_same_answers(reused, plain)
    # blocks of whole images (18 questions each) within 4 x 10 rows: every model batch held 2 images
    assert {r["batch_size"] for r in reused} == {36}
    assert all('"prefix_reuse": true' in r["decoding"] for r in reused)
    assert not any("prefix_reuse" in r["decoding"] for r in plain)
    assert all(not math.isnan(r["p_yes"]) for r in reused)


def test_pixels_from_the_decode_stage_give_the_same_answers(tiny_model_dir, all_pope_items, plain_answers, tmp_path):
    from orchestrator.eval.predictor import PIXELS_COLUMN, add_pixels

    plain = {(r["split"], r["item_id"]): r for r in plain_answers}
    images = sorted({item["images"][0] for item in all_pope_items})
    items = [item for item in all_pope_items if item["images"][0] in images[:3]]
    missing = dict(items[0], item_id="missing", images=[str(tmp_path / "nowhere.jpg")])
    table = add_pixels(items_table(items + [missing]), model_path=str(tiny_model_dir))
    pixels = table.column(PIXELS_COLUMN).to_pylist()
    assert sum(value is not None for value in pixels) == 3          # once per image, none for the missing one
    predictor = Predictor(settings(tiny_model_dir, prefix_reuse=True, prefix_images=2))
    rows = predictor(table.to_pandas()).to_pylist()
    assert predictor.prefix.stats["pixels_given"] == 3              # no image decoded in the actor
    assert "nowhere.jpg" in rows[-1]["error"] and PIXELS_COLUMN not in rows[0]
    assert_same_answers(rows[:-1], [plain[(r["split"], r["item_id"])] for r in rows[:-1]])


def test_prefix_reuse_through_ray_decodes_ahead_and_records_its_timings(ray_session, tiny_model_dir, all_pope_items,
                                                                        plain_answers, tmp_path):
    import json

    import ray

    from orchestrator.eval.predictor import predict

    plain = {(r["split"], r["item_id"]): r for r in plain_answers}
    ordered = sorted(all_pope_items, key=lambda i: (i["images"][0], i["split"], i["item_id"]))
    blocks = [items_table(ordered[k:k + 36]) for k in range(0, len(ordered), 36)]   # 2 whole images each
    timings_dir = tmp_path / "timings"
    # the actor takes 0.5 of the 2 CPUs: the decode stage (add_pixels) runs as tasks on the rest
    answered = predict(ray.data.from_arrow(blocks), settings(tiny_model_dir, prefix_reuse=True, prefix_images=2,
                                                             timings_dir=str(timings_dir)), cpus_per_actor=0.5)
    rows = sorted(answered.take_all(), key=lambda r: (r["split"], r["item_id"]))
    assert len(rows) == len(ordered)
    assert_same_answers(rows, [plain[(r["split"], r["item_id"])] for r in rows])
    (path,) = timings_dir.glob("timings-*.json")
    timings = json.loads(path.read_text())
    order = ["module_imported", "init_started", "imports_done", "model_ready", "first_call_started",
             "first_call_done", "last_call_done"]
    assert [timings[k] for k in order] == sorted(timings[k] for k in order)
    assert timings["process_started"] <= timings["init_started"] and timings["rows"] == len(ordered)
    n_images = len({item["images"][0] for item in ordered})
    assert timings["prefix_stats"]["pixels_given"] == timings["prefix_stats"]["prefix_computed"] == n_images
