"""POPE and MileBench on the other model families (tiny LLaVA-NeXT, then tiny Qwen2.5-VL; fp32): a left-padded batch
answers and scores as each question alone, generation stops at the model's EOS, MileBench's multi-image questions
go through the model's chat template, LLaVA-NeXT reuses each image's prefix (at that image's token count) and
Qwen2.5-VL takes the plain path (one log line). One slow end-to-end `run_eval` on the tiny Qwen2.5-VL."""

import json
import logging

import pyarrow.parquet as pq
import pytest
from PIL import Image

from orchestrator.config import config_from_dict
from orchestrator.eval.model_adapter import VisionLanguageModel
from orchestrator.eval.items import items_table, milebench_items, pope_items
from orchestrator.eval.predictor import Predictor, PredictorSettings
from orchestrator.eval.results import read_answers
from orchestrator.eval.runner import run_eval

# three aspect ratios: LLaVA-NeXT picks another anyres grid and Qwen2.5-VL another patch grid for each
IMAGES = [Image.new("RGB", (48, 48), (200, 10, 10)), Image.new("RGB", (64, 40), (10, 120, 30)),
          Image.new("RGB", (30, 70), (0, 0, 200))]
QUESTIONS = ["Is there a dog in the image?", "Is there a dog?", "Is there a dog in the image in the image?"]
FORCED = {"max_new_tokens": 4, "min_new_tokens": 4}   # every answer decodes 4 tokens past its prompt


@pytest.fixture(scope="module")
def model(tiny_family_dir):
    return VisionLanguageModel({"model_path": str(tiny_family_dir), "dtype": "float32", "device": "cpu",
                                "template": "chat"})


def answer(predictor, items):
    return predictor(items_table(items).to_pandas()).to_pylist()


def test_a_left_padded_batch_generates_and_scores_as_each_question_alone(model):
    images = [[image] for image in IMAGES]
    inputs = model._inputs(QUESTIONS, [[], [], []], images)
    assert (inputs["attention_mask"] == 0).any(dim=1).sum() >= 2               # two rows are padded
    # 1-D positions for LLaVA-NeXT; Qwen2.5-VL computes its multimodal ones from the mask and image grid
    assert ("position_ids" in inputs) == model.family.one_d_positions
    assert ("image_sizes" if model.family.name == "llava_next" else "image_grid_thw") in inputs

    alone = [model.answer("pope", [q], [[]], dict(FORCED), images=[i])[0] for q, i in zip(QUESTIONS, images)]
    assert model.answer("pope", QUESTIONS, [[], [], []], dict(FORCED), images=images) == alone
    assert all(len(text.split()) >= 2 for text in alone)
    single = [model.score_yes_no([q], [[]], images=[i])[0] for q, i in zip(QUESTIONS, images)]
    batched = model.score_yes_no(QUESTIONS, [[], [], []], images=images)
    assert batched == pytest.approx(single, abs=1e-5) and all(0 < p < 1 for p in single)
    assert len(set(round(p, 4) for p in single)) == 3                          # the image and question matter


def test_generation_stops_at_the_models_eos_ids(model):
    assert model.eos_ids == [model.model.generation_config.eos_token_id]
    question, image = QUESTIONS[:1], [IMAGES[:1]]
    first = model.answer("pope", question, [[]], {"max_new_tokens": 1}, images=image)[0]
    longer = model.answer("pope", question, [[]], {"max_new_tokens": 4}, images=image)[0]
    eos_ids = model.eos_ids
    try:  # make the first greedy token an end of sequence: the answer ends there
        model.eos_ids = [model.tokenizer.convert_tokens_to_ids(first)]
        stopped = model.answer("pope", question, [[]], {"max_new_tokens": 4}, images=image)[0]
    finally:
        model.eos_ids = eos_ids
    assert stopped == first != longer


def test_milebench_questions_go_through_the_chat_template_with_each_image_where_the_context_has_it(
        tiny_family_dir, mile_rows):
    items = milebench_items(mile_rows[:4])
    assert max(len(item["images"]) for item in items) > 1
    predictor = Predictor(PredictorSettings(run_id="t", model_path=str(tiny_family_dir), mode="generate",
                                            milebench_template="auto", milebench_max_new_tokens=3, batch_size=4))
    loaded = predictor.model.loaded
    calls = []
    generate = predictor.model.model.generate

    def record(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    predictor.model.model.generate = record
    rows = answer(predictor, items)
    assert all(row["error"] == "" for row in rows) and all(isinstance(row["raw_answer"], str) for row in rows)
    assert json.loads(rows[0]["decoding"])["milebench_template"] == "chat"
    (call,) = calls                                                            # one left-padded batch
    # each image expanded to its own token count
    expected = [sum(loaded.vision_inputs(predictor.model.load_images(row["images"])).tokens) for row in rows]
    assert sorted(ids.count(loaded.image_token_id) for ids in call["input_ids"].tolist()) == sorted(expected)
    assert all(row["question"].count("<image>") == len(row["images"]) for row in rows)
    if loaded.family.name == "qwen2_5_vl":  # Qwen's template keeps each image between the context's words
        for ids in call["input_ids"].tolist():
            text = loaded.tokenizer.decode(ids, skip_special_tokens=False)
            spans = text.split("<|vision_start|>")[1:]
            assert len(spans) > 1 and all("Image" in span.split("<|vision_end|>")[1] for span in spans[:-1])


@pytest.mark.parametrize("tiny_family_dir", ["llava_next"], indirect=True)
def test_llava_next_reuses_each_images_prefix_at_its_own_token_count_with_the_plain_answers(model):
    from orchestrator.eval.prefix_cache import PrefixReuse

    assert len(set(model.loaded.vision_inputs(IMAGES).tokens)) == 2       # two prefix lengths (two anyres grids)
    groups = [(f"image-{k}", image, QUESTIONS) for k, image in enumerate(IMAGES)]
    prefix = PrefixReuse(model)
    scores = prefix.score(groups)
    assert prefix.stats["prefix_computed"] == 3 and prefix.stats["forwards"] == 2   # one batch per prefix length
    generated = PrefixReuse(model).generate(groups, **FORCED)
    for (_, image, questions), p_yes, new_tokens in zip(groups, scores, generated):
        assert p_yes == pytest.approx(model.score_yes_no(questions, [[]] * 3, images=[[image]] * 3), abs=1e-5)
        assert model.decode_answers(new_tokens) == model.answer("pope", questions, [[]] * 3, dict(FORCED),
                                                                 images=[[image]] * 3)


@pytest.mark.parametrize("tiny_family_dir", ["llava_next"], indirect=True)
def test_a_llava_next_predictor_with_prefix_reuse_warms_up_and_answers_as_the_plain_one(tiny_family_dir, pope_rows):
    items = pope_items(pope_rows[:12])
    common = dict(run_id="t", model_path=str(tiny_family_dir), mode="score", template="chat", batch_size=4)
    settings = PredictorSettings(prefix_reuse=True, warm_up=True, **common)
    assert settings.reuses_prefix and settings.decoding()["prefix_reuse"] is True
    predictor = Predictor(settings)
    reused = answer(predictor, items)
    assert predictor.timings["warm_up_s"] > 0 and predictor.prefix.stats["prefix_computed"] == 2   # 6 questions each
    plain = answer(Predictor(PredictorSettings(**common)), items)
    assert [row["answer"] for row in reused] == [row["answer"] for row in plain]
    assert [row["p_yes"] for row in reused] == pytest.approx([row["p_yes"] for row in plain], abs=1e-5)


@pytest.mark.parametrize("tiny_family_dir", ["qwen2_5_vl"], indirect=True)
def test_qwen_takes_the_plain_batched_path_with_one_log_line_saying_why_the_prefix_is_not_reused(
        tiny_family_dir, pope_rows, caplog):
    items = pope_items(pope_rows[:12])
    common = dict(run_id="t", model_path=str(tiny_family_dir), mode="score", template="chat", prefix_reuse=True)
    settings = PredictorSettings(batch_size=12, **common)
    assert not settings.reuses_prefix and "prefix_reuse" not in settings.decoding()   # and no add_pixels stage
    with caplog.at_level(logging.INFO, logger="orchestrator.eval.predictor"):
        predictor = Predictor(settings)
    lines = [record.getMessage() for record in caplog.records if "prefix reuse" in record.getMessage()]
    assert len(lines) == 1 and "multimodal rotary positions" in lines[0]
    assert predictor.prefix is None
    many = answer(predictor, items)
    one = answer(Predictor(PredictorSettings(batch_size=1, **common)), items)
    assert max(row["batch_size"] for row in many) == 12
    for a, b in zip(one, many):
        assert a["error"] == b["error"] == "" and a["answer"] in ("yes", "no")
        assert a["p_yes"] == pytest.approx(b["p_yes"], abs=1e-5)


@pytest.mark.slow
def test_run_eval_answers_pope_on_a_tiny_qwen2_5_vl_end_to_end(ray_session, synth_world, tmp_path):
    world, _ = synth_world
    section = {"name": "qwen-eval", "output_root": str(tmp_path / "runs"), "data": {"synthetic_dir": str(world)},
               "model": {"family": "qwen2_5_vl", "eval_template": "chat"},
               "eval": {"mode": "score", "batch_size": 16, "cpus_per_actor": 1}}
    worker_template = config_from_dict({**section, "eval": {**section["eval"], "milebench_template": "llava_llama_2"}})
    with pytest.raises(ValueError, match="LLaVA-1.5 worker template, not a qwen2_5_vl model's; use 'chat'"):
        run_eval(worker_template, benchmarks=("pope",), tag="refused")             # before any actor starts
    cfg = config_from_dict(section)
    result = run_eval(cfg, benchmarks=("pope",), tag="qwen")
    assert result.counts["errors"] == 0 and result.counts["answered"] == result.counts["items"] > 0
    answers = read_answers(result.answers_dir)
    assert set(answers["answer"]) <= {"yes", "no"} and answers["p_yes"].between(0, 1).all()
    decoding = json.loads(answers["decoding"].iloc[0])
    assert decoding["template"] == "chat" and decoding["milebench_template"] == "chat"
    assert "prefix_reuse" not in decoding                                      # Qwen2.5-VL: the plain path
    run = json.loads((result.answers_dir.parent / "run.json").read_text())
    assert "tiny-qwen2_5_vl" in run["model"]
    metrics = pq.read_table(result.metrics_path).to_pandas()
    f1 = metrics[(metrics.benchmark == "pope") & (metrics.name == "mean") & (metrics.metric == "f1")]
    assert f1["value"].iloc[0] == pytest.approx(result.pope_table["f1"].iloc[-1])


@pytest.mark.parametrize("tiny_family_dir", ["qwen2_5_vl"], indirect=True)
def test_model_max_image_pixels_reaches_the_evaluation_actor_and_its_decoding_record(tiny_family_dir, pope_rows):
    settings = PredictorSettings(run_id="t", model_path=str(tiny_family_dir), template="chat", max_image_pixels=28 * 28)
    predictor = Predictor(settings)
    assert predictor.model.tokens_per_image == 1 and predictor.model.loaded.vision_inputs(IMAGES).tokens == [1, 1, 1]
    rows = answer(predictor, pope_items(pope_rows[:2]))
    assert all(row["error"] == "" for row in rows) and json.loads(rows[0]["decoding"])["max_image_pixels"] == 784
    assert "max_image_pixels" not in PredictorSettings(run_id="t", model_path=str(tiny_family_dir)).decoding()
