"""The predictor on the tiny LLaVA: batch-size invariance, error rows, LoRA merge, plug-in models,
MileBench prompts and generation as MileBench's own code (utils.py, its LLaVA worker) makes them."""

import json
import math

import pytest

from orchestrator.eval.model_adapter import MileBenchModel
from orchestrator.eval.items import items_table, milebench_items, pope_items
from orchestrator.eval.predictor import Predictor, PredictorSettings


def varied_pope_items(pope_rows, n=16):
    """n POPE items on different images with questions of different lengths (so batches need padding)."""
    items = pope_items(pope_rows[::6][:n])
    for k, item in enumerate(items):
        words = item["question"].split()
        item["question"] = " ".join(words[: 3 + k % (len(words) - 2)])
    return items


def settings(model_dir, **kwargs):
    base = dict(run_id="t", model_path=str(model_dir), mode="score", max_new_tokens=5, milebench_max_new_tokens=5,
                batch_size=16)
    base.update(kwargs)
    return PredictorSettings(**base)


def answer(predictor, items):
    rows = predictor(items_table(items).to_pandas()).to_pylist()
    assert [r["item_id"] for r in rows] == [i["item_id"] for i in items]   # input order kept
    return rows


def test_score_mode_is_batch_size_invariant(tiny_model_dir, pope_rows):
    items = varied_pope_items(pope_rows)
    one = answer(Predictor(settings(tiny_model_dir, batch_size=1)), items)
    many = answer(Predictor(settings(tiny_model_dir, batch_size=16)), items)
    assert len({r["prompt_tokens"] for r in many}) > 1                     # there was padding to get right
    assert {r["batch_size"] for r in one} == {1} and max(r["batch_size"] for r in many) == 16
    for a, b in zip(one, many):
        assert a["error"] == b["error"] == ""
        assert a["raw_answer"] == b["raw_answer"] and a["raw_answer"] in ("Yes", "No")
        assert a["answer"] == a["raw_answer"].lower()
        assert abs(a["p_yes"] - b["p_yes"]) < 1e-4
        assert (a["p_yes"] >= 0.5) == (a["raw_answer"] == "Yes")


def test_generate_mode_is_batch_size_invariant(tiny_model_dir, pope_rows, mile_rows):
    items = varied_pope_items(pope_rows) + milebench_items(mile_rows[:6])
    one = answer(Predictor(settings(tiny_model_dir, mode="generate", batch_size=1)), items)
    many = answer(Predictor(settings(tiny_model_dir, mode="generate", batch_size=16, image_budget=24)), items)
    for a, b in zip(one, many):
        assert a["error"] == b["error"] == ""
        assert a["raw_answer"] == b["raw_answer"]
        assert "</s>" not in a["raw_answer"] and "<unk>" not in a["raw_answer"]
        assert a["mode"] == "generate" and math.isnan(a["p_yes"])
    mile = [r for r in many if r["benchmark"] == "milebench"]
    assert max(r["batch_size"] for r in mile) > 1                          # batched by the image budget
    assert all(r["question"].count("<image>") == len(r["images"]) >= 2 for r in mile)
    assert all(r["answer"] == r["raw_answer"] for r in mile)
    pope = [r for r in many if r["benchmark"] == "pope"]
    assert all(r["answer"] in ("yes", "no") for r in pope)


def test_bad_items_become_error_rows(tiny_model_dir, pope_rows, mile_rows, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not a jpeg at all")
    good, missing, broken, empty, blank = pope_items(pope_rows[:5])
    missing["images"] = [str(tmp_path / "nowhere.jpg")]
    broken["images"] = [str(corrupt)]
    empty["question"] = ""
    blank["question"] = "   "
    mile_good, mile_missing, mile_empty = milebench_items(mile_rows[:3])
    mile_missing["images"] = mile_missing["images"][:1] + [str(tmp_path / "gone.jpg")] + mile_missing["images"][2:]
    mile_empty["instruction"] = mile_empty["context"] = ""
    items = [good, missing, broken, empty, blank, mile_good, mile_missing, mile_empty]
    rows = {r["item_id"] + r["benchmark"]: r for r in
            answer(Predictor(settings(tiny_model_dir, mode="generate", max_new_tokens=2)), items)}
    error = {key: row["error"] for key, row in rows.items()}
    assert error[good["item_id"] + "pope"] == "" and rows[good["item_id"] + "pope"]["answer"] in ("yes", "no")
    assert "nowhere.jpg" in error[missing["item_id"] + "pope"] and "not found" in error[missing["item_id"] + "pope"]
    assert "corrupt.jpg" in error[broken["item_id"] + "pope"]
    assert error[empty["item_id"] + "pope"] == error[blank["item_id"] + "pope"] == "empty question"
    assert error[mile_good["item_id"] + "milebench"] == ""
    assert "gone.jpg" in error[mile_missing["item_id"] + "milebench"]
    assert error[mile_empty["item_id"] + "milebench"].startswith("empty question")
    assert all(row["raw_answer"] == "" for row in rows.values() if row["error"])


def test_error_rows_through_ray_data_do_not_stop_the_run(ray_session, tiny_model_dir, pope_rows, tmp_path):
    import ray

    from orchestrator.eval.predictor import predict

    items = pope_items(pope_rows[:8])
    items[3]["images"] = [str(tmp_path / "missing.jpg")]
    items[5]["question"] = ""
    ds = ray.data.from_arrow([items_table(items[:4]), items_table(items[4:])])
    rows = predict(ds, settings(tiny_model_dir), cpus_per_actor=1).take_all()
    assert sorted(r["item_id"] for r in rows) == sorted(i["item_id"] for i in items)
    errors = {r["item_id"]: r["error"] for r in rows}
    assert "missing.jpg" in errors[items[3]["item_id"]] and errors[items[5]["item_id"]] == "empty question"
    assert sum(1 for e in errors.values() if e) == 2


def test_lora_adapter_is_loaded_and_merged(tiny_model_dir, pope_rows, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from orchestrator.model.families import load_model

    loaded = load_model(tiny_model_dir)
    torch.manual_seed(0)
    peft_model = get_peft_model(loaded.model, LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)", init_lora_weights=False))
    checkpoint = tmp_path / "checkpoint"
    peft_model.save_pretrained(checkpoint / "adapter")        # found one level below the checkpoint folder
    items = varied_pope_items(pope_rows, n=6)
    base = answer(Predictor(settings(tiny_model_dir)), items)
    tuned_predictor = Predictor(settings(tiny_model_dir, adapter_path=str(checkpoint)))
    assert not any("lora" in name for name, _ in tuned_predictor.model.model.named_parameters())  # merged
    tuned = answer(tuned_predictor, items)
    assert all(r["adapter"] == str(checkpoint) for r in tuned)
    assert max(abs(a["p_yes"] - b["p_yes"]) for a, b in zip(base, tuned)) > 1e-4
    # the merged model answers as the unmerged adapter does
    unmerged = Predictor(settings(tiny_model_dir))
    unmerged.model.model = peft_model.eval()
    reference = answer(unmerged, items)
    assert max(abs(a["p_yes"] - b["p_yes"]) for a, b in zip(reference, tuned)) < 1e-4


def saved_lora_adapter(model_dir, folder):
    """A LoRA adapter with non-zero weights for the tiny model, saved to `folder`."""
    import torch
    from peft import LoraConfig, get_peft_model

    from orchestrator.model.families import load_model

    torch.manual_seed(0)
    peft_model = get_peft_model(load_model(model_dir).model, LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)", init_lora_weights=False))
    peft_model.save_pretrained(folder)
    return folder


def test_one_actor_answers_several_runs_as_separate_actors_would(tiny_model_dir, pope_rows, mile_rows, tmp_path):
    """`settings.runs` (run_evals' shared pool): rows say their run; the actor answers each run's rows with that
    run's model (base, then the adapter, then the base again) and writes them to that run's folder."""
    from orchestrator.eval.results import read_answers

    adapter = str(saved_lora_adapter(tiny_model_dir, tmp_path / "adapter"))
    runs = ({"run_id": "base", "adapter_path": "", "answers_dir": str(tmp_path / "base"), "timings_dir": ""},
            {"run_id": "tuned", "adapter_path": adapter, "answers_dir": str(tmp_path / "tuned"), "timings_dir": ""})
    common = dict(mode="generate", max_new_tokens=4)
    items = varied_pope_items(pope_rows, n=6) + milebench_items(mile_rows[:2])
    shared = Predictor(settings(tiny_model_dir, runs=runs, **common))
    mixed = [{**item, "run_id": "base"} for item in items[:4]] + [{**item, "run_id": "tuned"} for item in items] + \
            [{**item, "run_id": "base"} for item in items[4:]]
    together = answer(shared, mixed)
    alone = {"base": answer(Predictor(settings(tiny_model_dir, **common)), items),
             "tuned": answer(Predictor(settings(tiny_model_dir, adapter_path=adapter, **common)), items)}
    for run_id, expected in alone.items():
        got = {(r["benchmark"], r["item_id"]): r for r in together if r["run_id"] == run_id}
        assert len(got) == len(items)
        for row in expected:
            mine = got[(row["benchmark"], row["item_id"])]
            assert (mine["raw_answer"], mine["adapter"]) == (row["raw_answer"], row["adapter"]), (run_id, row["item_id"])
        written = read_answers(tmp_path / run_id)
        assert len(written) == len(items) and set(written["run_id"]) == {run_id}
    assert [r["raw_answer"] for r in alone["base"]] != [r["raw_answer"] for r in alone["tuned"]]  # the adapter matters
    with pytest.raises(ValueError, match="not given"):
        shared(items_table([{**items[0], "run_id": "elsewhere"}]).to_pandas())


class EchoModel(MileBenchModel):
    """A plug-in model: answers "No" to POPE and the image count to MileBench."""

    name = "echo"

    def init_components(self, config):
        self.seen = config

    def forward(self, questions, image_paths, device=None, gen_kwargs=None, images=None):
        return [("No</s>" if len(paths) == 1 else f"{len(paths)} images") for paths in image_paths]


def test_another_model_plugs_in_through_the_adapter_interface(pope_rows, mile_rows):
    predictor = Predictor(settings("/unused", mode="generate", model_adapter=EchoModel))
    rows = answer(predictor, pope_items(pope_rows[:3]) + milebench_items(mile_rows[:2]))
    assert [r["answer"] for r in rows[:3]] == ["no"] * 3 and rows[0]["raw_answer"] == "No"
    assert rows[3]["raw_answer"] == f"{len(rows[3]['images'])} images"
    with pytest.raises(NotImplementedError):
        predictor.model.score_yes_no(["q"], [["x"]])
    # score mode with a model that cannot score: each item reports it instead of crashing the run
    scored = answer(Predictor(settings("/unused", mode="score", model_adapter=EchoModel)), pope_items(pope_rows[:2]))
    assert all("cannot score" in r["error"] for r in scored)


class FailsOnOneQuestion(EchoModel):
    """EchoModel that raises on any batch holding the question `config["bad"]`."""

    def forward(self, questions, image_paths, device=None, gen_kwargs=None, images=None):
        if any(self.seen["bad"] in question for question in questions):
            raise RuntimeError("cannot take this question")
        return super().forward(questions, image_paths, device, gen_kwargs, images)


def test_a_failed_batch_is_answered_item_by_item_and_only_the_failing_item_is_an_error_row(pope_rows):
    items = pope_items(pope_rows[:4])
    bad = items[2]["question"]
    predictor = Predictor(settings("/unused", mode="generate", model_adapter=FailsOnOneQuestion))
    predictor.model.seen["bad"] = bad
    rows = answer(predictor, items)
    assert [r["error"] for r in rows] == ["", "", "model failed: RuntimeError: cannot take this question", ""]
    assert [r["answer"] for r in rows if not r["error"]] == ["no"] * 3
    assert all(r["batch_size"] == 1 for r in rows if not r["error"])   # answered alone, after the retry


def test_one_actor_answers_pope_by_image_and_milebench_in_length_sorted_batches(tiny_model_dir, pope_rows, mile_rows):
    """Generate mode with prefix reuse: POPE through the shared image prefix, MileBench through batched
    `generate` (sorted by prompt length, left-padded); both as each item answered alone."""
    items = milebench_items(mile_rows[:8]) + varied_pope_items(pope_rows, n=6)
    items = items[::2] + items[1::2]                                       # interleaved, as blocks may be
    alone = answer(Predictor(settings(tiny_model_dir, mode="generate", batch_size=1)), items)
    predictor = Predictor(settings(tiny_model_dir, mode="generate", batch_size=16, image_budget=12,
                                   prefix_reuse=True))
    calls = []                                                             # prompt lengths of each model batch
    answer_batch = predictor.model.answer

    def recording_answer(benchmark, questions, image_paths, **kwargs):
        calls.append([predictor.model.prompt_length(q, len(p), benchmark) for q, p in zip(questions, image_paths)])
        return answer_batch(benchmark, questions, image_paths, **kwargs)

    predictor.model.answer = recording_answer
    together = answer(predictor, items)
    for a, b in zip(alone, together):
        assert a["error"] == b["error"] == "" and a["raw_answer"] == b["raw_answer"]
    assert predictor.prefix.stats["questions"] == 6                         # POPE by image, not through forward
    assert sum(len(call) for call in calls) == 8 and len(calls) > 1 and max(len(call) for call in calls) > 1
    assert len({n for call in calls for n in call}) > 1                     # prompts of different lengths
    # batches of similar length: each batch's prompts are no longer than the next batch's
    assert all(max(a) <= min(b) for a, b in zip(calls, calls[1:]))


def test_warm_up_at_start_leaves_answers_and_statistics_as_without_it(tiny_model_dir, pope_rows):
    items = varied_pope_items(pope_rows, n=4)
    common = dict(mode="generate", max_new_tokens=3, prefix_reuse=True)
    cold = Predictor(settings(tiny_model_dir, warm_up=False, **common))
    assert cold._warming is None                                          # default on a CPU: no warm-up
    warm = Predictor(settings(tiny_model_dir, warm_up=True, **common))
    assert warm._warming is not None
    rows = answer(warm, items)
    assert warm._warming is None and warm.timings["warm_up_s"] > 0 and "warm_up_joined" in warm.timings
    assert [r["raw_answer"] for r in rows] == [r["raw_answer"] for r in answer(cold, items)]
    assert warm.prefix.stats == cold.prefix.stats                          # the warm-up is not counted
    assert not any(key[0] == "<warm-up>" for key in warm.prefix._lru)


def test_weight_files_are_found_and_prefetched(tiny_model_dir, tmp_path):
    from orchestrator.eval.predictor import prefetch_files, weight_files

    adapter = tmp_path / "checkpoint" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    files = weight_files(str(tiny_model_dir), str(tmp_path / "checkpoint"), "", None, str(tmp_path / "missing"))
    assert [f.name for f in files] == ["model.safetensors", "adapter_model.safetensors"]
    expected = sum(f.stat().st_size for f in files)
    assert prefetch_files(files + [tmp_path / "missing.safetensors"]) == expected


# -- MileBench end to end: what the adapter is sent, as MileBench's utils.py and LLaVA worker make it ----------


def recording_generate(predictor):
    """Wrap the HF model's generate: each call's decoded input and its keyword arguments."""
    calls = []
    generate = predictor.model.model.generate
    tokenizer = predictor.model.tokenizer

    def record(**kwargs):
        prompts = tokenizer.batch_decode(kwargs["input_ids"], skip_special_tokens=False)
        calls.append({"prompts": [p.replace("<unk> ", "") for p in prompts],   # left padding (pad = unk)
                      "kwargs": {k: v for k, v in kwargs.items() if not hasattr(v, "shape")}})
        return generate(**kwargs)

    predictor.model.model.generate = record
    return calls


def test_a_milebench_item_is_sent_in_the_llava_workers_template_with_its_generation_settings(
        tiny_model_dir, pope_rows, mile_rows):
    """utils.py __getitem__: a choice_list key, even empty, adds the suffix; model_workers.py LLaVA: llava_llama_2
    template; configs/model_configs.yaml gen_kwargs. POPE keeps eval_template (llava_v1) and eval.max_new_tokens."""
    listed, unlisted = milebench_items(mile_rows[:2])
    for item in (listed, unlisted):
        item["choice_list"], item["question_type"] = [], "open-ended"
    listed["has_choice_list"], unlisted["has_choice_list"] = True, False
    pope = pope_items(pope_rows[:1])
    predictor = Predictor(settings(tiny_model_dir, mode="generate", max_new_tokens=3, milebench_max_new_tokens=4))
    calls = recording_generate(predictor)
    rows = answer(predictor, [listed, unlisted] + pope)
    assert all(row["error"] == "" for row in rows)

    # the suffix for the empty list (after the tokenizer round trip: the word tokenizer drops the newlines)
    assert rows[0]["question"].endswith("Choice list : Your answer is :") and "A ." not in rows[0]["question"]
    assert "Choice list" not in rows[1]["question"]
    (mile_call,) = [call for call in calls if len(call["prompts"]) == 2]
    (pope_call,) = [call for call in calls if len(call["prompts"]) == 1]
    system = "You are a helpful language and vision assistant. You are able to understand the visual content"
    for prompt in mile_call["prompts"]:
        assert prompt.startswith("<s> [ INST ] < < SYS > > " + system) and prompt.endswith("[ / INST ]")
        assert "<unk>" not in prompt                                        # the tiny vocabulary knows the template
    assert any(prompt.endswith("Your answer is : [ / INST ]") for prompt in mile_call["prompts"])
    assert pope_call["prompts"][0].startswith("<s> A chat between a curious human")
    assert pope_call["prompts"][0].endswith("ASSISTANT :")
    # generate() arguments: MileBench's (temperature dropped: greedy never reads it), POPE's own
    assert {k: mile_call["kwargs"][k] for k in ("max_new_tokens", "min_new_tokens", "do_sample")} == \
        {"max_new_tokens": 4, "min_new_tokens": 1, "do_sample": False}
    assert "temperature" not in mile_call["kwargs"]
    assert pope_call["kwargs"]["max_new_tokens"] == 3 and "min_new_tokens" not in pope_call["kwargs"]
    # and recorded with every row (hashed into the run id)
    decoding = json.loads(rows[0]["decoding"])
    assert decoding["milebench_template"] == "llava_llama_2" and decoding["template"] == "llava_v1"
    assert decoding["milebench_gen_kwargs"] == {"max_new_tokens": 4, "min_new_tokens": 1, "do_sample": False,
                                                "temperature": 0.0}
    assert (decoding["milebench_token_budget"], decoding["milebench_fit_context"]) == (4096, False)


def test_keep_last_tokens_decodes_a_fragment_that_fits(tiny_model_dir):
    """utils.py __getitem__ decodes every kept chunk of ids, also one that was not cut."""
    model = Predictor(settings(tiny_model_dir)).model
    text = "Image 1: a tree, Image 2: the user's."
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded = model.tokenizer.decode(ids)
    assert decoded != text and "<unk>" not in decoded                     # the round trip changes the spaces
    assert model.keep_last_tokens(text, len(ids)) == model.keep_last_tokens(text, 100) == decoded
    assert model.keep_last_tokens(text, 2) == model.tokenizer.decode(ids[-2:]) and model.keep_last_tokens(text, 0) == ""


def test_milebench_generates_past_the_models_positions_as_upstream_unless_told_to_fit(tiny_model_dir, mile_rows):
    """MileBench's budget (max_context_len) counts instruction + context only and its worker generates whatever
    the total; `milebench_fit_context` (not upstream's) cuts the context so that prompt + new tokens fit."""
    item = milebench_items(mile_rows[:1])
    forced = dict(mode="generate", milebench_max_new_tokens=160, milebench_min_new_tokens=160)
    upstream = answer(Predictor(settings(tiny_model_dir, **forced)), item)[0]
    assert upstream["error"] == "" and upstream["prompt_tokens"] + 160 > 256   # the tiny model has 256 positions
    fitted = answer(Predictor(settings(tiny_model_dir, milebench_fit_context=True, **forced)), item)[0]
    assert fitted["error"] == "" and fitted["prompt_tokens"] + 160 <= 256
    assert len(fitted["question"]) < len(upstream["question"])
    assert json.loads(fitted["decoding"])["milebench_fit_context"] is True


def test_cudnn_attention_is_what_the_settings_ask_for_and_recorded_only_when_on():
    import torch

    from orchestrator.eval.results import compute_run_id

    try:
        for wanted in (True, False, True):
            Predictor(settings("/unused", mode="generate", model_adapter=EchoModel, cudnn_attention=wanted))
            assert torch.backends.cuda.cudnn_sdp_enabled() is wanted
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)   # torch's default, for the tests after this one
    off, on = settings("/m", mode="generate"), settings("/m", mode="generate", cudnn_attention=True)
    assert "cudnn_attention" not in off.decoding() and on.decoding()["cudnn_attention"] is True
    assert compute_run_id("/m", "", "generate", off.decoding(), {}, "") != \
        compute_run_id("/m", "", "generate", on.decoding(), {}, "")
