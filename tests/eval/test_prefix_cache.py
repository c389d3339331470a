"""POPE score mode with the image prefix computed once per image: same answers as whole prompts."""

import math

import pytest

from orchestrator.data import formats
from orchestrator.eval.items import items_table, pope_items
from orchestrator.eval.predictor import Predictor, PredictorSettings

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
        full = predictor.model.prompt_ids(item["question"], [predictor.model.tokens_per_image])
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
    # blocks of eval.batch_size (10) whole images of 18 questions each: 16 images make batches of 10 and 6
    assert sorted({r["batch_size"] for r in reused}) == [6 * 18, 10 * 18]
    assert all('"prefix_reuse": true' in r["decoding"] for r in reused)
    assert not any("prefix_reuse" in r["decoding"] for r in plain)
    assert all(not math.isnan(r["p_yes"]) for r in reused)


def test_pixels_from_the_decode_stage_give_the_same_answers(tiny_model_dir, all_pope_items, plain_answers, tmp_path):
    from orchestrator.eval.pixels import PIXELS_COLUMN, add_pixels

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


# -- greedy generation with the prefix reused ----------------------------------------------------


def test_suffix_layout_masks_and_positions_worked_by_hand():
    import torch

    from orchestrator.eval.prefix_cache import additive_mask, suffix_layout

    # prefix of 2 tokens; row 0 holds suffixes (5, 6) and (7,), row 1 holds (8, 9, 10) and an empty slot
    layout = suffix_layout([[(5, 6), (7,)], [(8, 9, 10)]], prefix=2, pad_id=0)
    assert layout.input_ids.tolist() == [[5, 6, 7], [8, 9, 10]]
    assert layout.position_ids.tolist() == [[2, 3, 2], [2, 3, 4]]       # restart at the prefix length
    assert layout.lengths.tolist() == [[2, 1], [3, 0]] and layout.last.tolist() == [[1, 2], [2, 0]]
    assert layout.allowed.int().tolist() == [
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 1]],                 # (7,) does not see (5, 6)
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]]
    # two decode steps: keys = prefix 2 + packed width 3 + 2 slots x 2 steps
    decode = layout.decode_allowed(prefix=2, steps=2, pad_to=1)
    assert decode.int().tolist() == [
        [[1, 1, 1, 1, 0, 1, 0, 1, 0], [1, 1, 0, 0, 1, 0, 1, 0, 1]],
        [[1, 1, 1, 1, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0, 1, 0, 1]]]        # the empty slot: prefix + itself
    padded = layout.decode_allowed(prefix=2, steps=2)
    assert padded.shape == (2, 2, 16) and torch.equal(padded[..., :9], decode) and not padded[..., 9:].any()
    mask = additive_mask(decode, torch.float32)
    assert mask.shape == (2, 1, 2, 9) and set(mask.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
    assert torch.equal(mask[:, 0] == 0, decode)


@pytest.fixture(scope="module")
def llava(tiny_model_dir):
    from orchestrator.eval.model_adapter import VisionLanguageModel

    return VisionLanguageModel({"model_path": str(tiny_model_dir), "dtype": "float32", "device": "cpu"})


@pytest.fixture(scope="module")
def groups(all_pope_items):
    """Three images with 7, 3 and all their distinct questions (10-12; one asked twice: it shares its
    slot), PIL images."""
    from orchestrator.images import load_image

    images = sorted({item["images"][0] for item in all_pope_items})[:3]
    questions = [[item["question"] for item in all_pope_items if item["images"][0] == image] for image in images]
    counts = (7, 3, None)
    chosen = [list(dict.fromkeys(q))[:count] for q, count in zip(questions, counts)]
    chosen[2].append(chosen[2][0])
    return [(image, load_image(image), qs) for image, qs in zip(images, chosen)]


def plain_new_tokens(model, question, image, max_new_tokens, eos, min_new_tokens=0):
    """transformers' greedy `generate` on one whole prompt (batch 1), cut after the first EOS."""
    import torch

    from orchestrator.model.llava import pixel_values

    ids = model.prompt_ids(question, [model.tokens_per_image])
    input_ids = torch.tensor([ids])
    with torch.inference_mode():
        out = model.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                   pixel_values=pixel_values(model.loaded, [image]).to(model.model.dtype),
                                   max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
                                   pad_token_id=model.pad_id, eos_token_id=eos)
    new = out[0, len(ids):].tolist()
    return new[:new.index(eos) + 1] if eos in new else new


def plain_generate_answers(model, groups, max_new_tokens, eos, min_new_tokens=0):
    return [[plain_new_tokens(model, q, image, max_new_tokens, eos, min_new_tokens) for q in qs]
            for _, image, qs in groups]


@pytest.fixture(scope="module")
def stopping_eos(llava, groups):
    """A token that, taken as EOS, stops the tiny model's answers at different lengths, one image's
    answers all before the others' (so rows finish at different steps and one leaves the batch)."""
    free = plain_generate_answers(llava, groups, 8, llava.tokenizer.eos_token_id)
    assert all(len(a) == 8 for answers in free for a in answers)          # the random model never says </s>
    for token in sorted({t for answers in free for a in answers for t in a}):
        stops = [[a.index(token) + 1 if token in a else 8 for a in answers] for answers in free]
        lengths = {n for row in stops for n in row}
        if len(lengths) >= 3 and min(max(row) for row in stops) < max(max(row) for row in stops):
            return token
    pytest.fail("no token of the tiny model's answers stops them at varied lengths")


@pytest.mark.parametrize("max_new_tokens, min_new_tokens", [(8, 0), (6, 3), (1, 0)])
def test_prefix_generate_gives_the_token_ids_of_plain_generate_question_by_question(
        llava, groups, stopping_eos, max_new_tokens, min_new_tokens):
    from orchestrator.eval.prefix_cache import PrefixReuse

    prefix = PrefixReuse(llava)
    ours = prefix.generate(groups, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                           eos_token_id=stopping_eos)
    assert ours == plain_generate_answers(llava, groups, max_new_tokens, stopping_eos, min_new_tokens)
    assert [len(answers) for answers in ours] == [len(qs) for _, _, qs in groups] and ours[2][0] == ours[2][-1]
    lengths = [len(a) for answers in ours for a in answers]
    assert min(lengths) >= max(min_new_tokens, 1) and max(lengths) <= max_new_tokens
    stats = prefix.stats
    slots = len(groups[2][2]) - 1                       # the most distinct questions of an image
    assert stats["prefix_computed"] == 3 and stats["forwards"] == 1 and stats["suffixes"] == 7 + 3 + slots
    if (max_new_tokens, min_new_tokens) == (8, 0):
        assert len(set(lengths)) >= 3 and any(stopping_eos in a for answers in ours for a in answers)
        # one row (image) finished early and left the batch: fewer slots than steps x 3 rows x slots
        assert stats["decode_slots"] < stats["decode_steps"] * 3 * slots
    if max_new_tokens == 1:
        assert stats["decode_steps"] == 0


def test_prefix_generate_in_bfloat16_runs_and_mostly_agrees(tiny_model_dir, groups):
    import torch

    from orchestrator.eval.model_adapter import VisionLanguageModel
    from orchestrator.eval.prefix_cache import PrefixReuse

    model = VisionLanguageModel({"model_path": str(tiny_model_dir), "dtype": "bfloat16", "device": "cpu"})
    prefix = PrefixReuse(model)
    assert prefix.dtype == torch.bfloat16
    ours = prefix.generate(groups, max_new_tokens=4)
    plain = plain_generate_answers(model, groups, 4, model.tokenizer.eos_token_id)
    pairs = [(a, b) for x, y in zip(ours, plain) for a, b in zip(x, y)]
    assert all(len(a) == 4 for a, _ in pairs)
    # bf16 rounds differently on the two paths (other kernels, other summation order): not bit-equal,
    # but the first new token agrees everywhere on this model and most answers agree whole
    assert all(a[0] == b[0] for a, b in pairs) and sum(a == b for a, b in pairs) >= 0.75 * len(pairs)


def test_prefix_generate_with_a_lora_adapter_merged_or_not(tiny_model_dir, llava, groups, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from orchestrator.eval.model_adapter import VisionLanguageModel
    from orchestrator.eval.prefix_cache import PrefixReuse
    from orchestrator.model.families import load_model

    torch.manual_seed(0)
    peft_model = get_peft_model(load_model(tiny_model_dir).model, LoraConfig(
        r=4, lora_alpha=16, target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)", init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    tuned = VisionLanguageModel({"model_path": str(tiny_model_dir), "adapter_path": str(tmp_path / "adapter"),
                        "dtype": "float32", "device": "cpu"})
    eos = tuned.tokenizer.eos_token_id
    merged = PrefixReuse(tuned).generate(groups, max_new_tokens=5)
    assert merged == plain_generate_answers(tuned, groups, 5, eos)
    assert merged != PrefixReuse(llava).generate(groups, max_new_tokens=5)        # the adapter changes answers
    unmerged = VisionLanguageModel({"model_path": str(tiny_model_dir), "dtype": "float32", "device": "cpu"})
    unmerged.model = peft_model.eval()
    assert PrefixReuse.supports(unmerged, "generate")
    assert PrefixReuse(unmerged).generate(groups, max_new_tokens=5) == merged


def test_predictor_generate_mode_with_prefix_reuse_gives_the_plain_answers(tiny_model_dir, all_pope_items):
    suffix = "\nAnswer the question using a single word or phrase."
    common = dict(mode="generate", max_new_tokens=4, answer_suffix=suffix, dtype="float32")
    plain = answer(Predictor(settings(tiny_model_dir, **common)), all_pope_items)
    predictor = Predictor(settings(tiny_model_dir, prefix_reuse=True, prefix_images=4, **common))
    reused = answer(predictor, all_pope_items)
    for a, b in zip(reused, plain):
        assert a["error"] == b["error"] == "" and a["mode"] == "generate"
        assert a["raw_answer"] == b["raw_answer"] and a["answer"] == b["answer"] in ("yes", "no")
        assert "</s>" not in a["raw_answer"] and math.isnan(a["p_yes"])
    stats = predictor.prefix.stats
    n_images = len({item["images"][0] for item in all_pope_items})
    assert stats["prefix_computed"] == n_images and stats["forwards"] == n_images // 4
    assert {r["batch_size"] for r in reused} == {4 * 18}
    decoding = reused[0]["decoding"]
    assert '"prefix_reuse": true' in decoding and '"mode": "generate"' in decoding
    assert "prefix_reuse" not in plain[0]["decoding"]


@pytest.mark.slow
def test_generate_mode_with_prefix_reuse_through_ray_decodes_the_images_ahead(ray_session, tiny_model_dir,
                                                                              all_pope_items, tmp_path):
    import json

    import ray

    from orchestrator.eval.predictor import predict

    ordered = sorted(all_pope_items, key=lambda i: (i["images"][0], i["split"], i["item_id"]))[:72]
    plain = {(r["split"], r["item_id"]): r
             for r in answer(Predictor(settings(tiny_model_dir, mode="generate", max_new_tokens=3)), ordered)}
    blocks = [items_table(ordered[k:k + 36]) for k in range(0, len(ordered), 36)]
    timings_dir = tmp_path / "timings"
    answered = predict(ray.data.from_arrow(blocks), settings(tiny_model_dir, mode="generate", max_new_tokens=3,
                                                             prefix_reuse=True, prefix_images=2,
                                                             timings_dir=str(timings_dir)), cpus_per_actor=0.5)
    rows = answered.take_all()
    assert len(rows) == len(ordered)
    for row in rows:
        expected = plain[(row["split"], row["item_id"])]
        assert row["error"] == "" and row["raw_answer"] == expected["raw_answer"]
    (path,) = timings_dir.glob("timings-*.json")
    stats = json.loads(path.read_text())["prefix_stats"]
    assert stats["pixels_given"] == stats["prefix_computed"] == 4        # decoded by the CPU stage


@pytest.mark.slow
def test_run_eval_in_generate_mode_reuses_the_prefix_and_gives_the_plain_answers(ray_session, synth_world,
                                                                                  tiny_model_dir, all_pope_items,
                                                                                  tmp_path):
    from orchestrator.config import config_from_dict
    from orchestrator.eval.results import read_answers
    from orchestrator.eval.runner import run_eval

    world, _ = synth_world
    cfg = config_from_dict({"name": "prefix-generate", "output_root": str(tmp_path / "runs"),
                            "data": {"synthetic_dir": str(world)}, "model": {"dtype": "float32"},
                            "eval": {"mode": "generate", "max_new_tokens": 3, "batch_size": 8, "cpus_per_actor": 1,
                                     "prefix_images": 2}})
    assert cfg.eval.prefix_reuse                                   # the default, in generate mode too
    result = run_eval(cfg, model_path=str(tiny_model_dir), benchmarks=("pope",), tag="generate")
    assert result.counts["errors"] == 0 and result.counts["answered"] == len(all_pope_items)
    rows = read_answers(result.answers_dir).to_dict("records")
    plain = {(r["split"], r["item_id"]): r for r in
             answer(Predictor(settings(tiny_model_dir, mode="generate", max_new_tokens=3)), all_pope_items)}
    assert all(r["raw_answer"] == plain[(r["split"], r["item_id"])]["raw_answer"] for r in rows)
    assert {r["batch_size"] for r in rows} == {36}                 # blocks and model batches of 2 whole images
    assert all('"prefix_reuse": true' in r["decoding"] and '"mode": "generate"' in r["decoding"] for r in rows)
