"""MileBench prompts and scores against values worked by hand from MileBench's own code.

Upstream: github MileBench/MileBench at 9583e1f (utils.py, evaluate.py, score.py,
workers/model_workers.py) and the rouge==1.0.1 package it pins (rouge/rouge.py,
rouge/rouge_score.py). Each test names the upstream function it pins down. Pure: no Ray, no model.
"""

import importlib.metadata
import math

import pandas as pd
import pytest

from orchestrator.eval.milebench import (LLAVA_WORKER_GEN_KWARGS, TASK_GROUPS, build_milebench_question,
                                         choice_text, extract_choice, image_budget_batches, judge_multi_choice,
                                         llava_worker_prompt, normalize_answer, option_letter, rouge_l, rouge_l_score,
                                         score_answers, score_sample, separate_adjacent_images, summarise, task_group)

# -- prompts: utils.py MileBenchDataset.__getitem__ (+ the LLaVA worker's fix-up) ----------------
# A character tokenizer (one token per character, exact round trip) keeps the budgets countable by hand.


def chars(text):
    return len(text)


def last_chars(text, n):
    return text[len(text) - n:] if n > 0 else ""


def build(context, images, budget=1000, choices=(), instruction="Q", task="", tpi=2, **kwargs):
    return build_milebench_question(instruction, context, images, choices, count_tokens=chars,
                                    keep_last_tokens=last_chars, tokens_per_image=tpi, token_budget=budget,
                                    task=task, **kwargs)


def test_placeholders_become_the_image_token_after_the_instruction_and_a_newline():
    """utils.py __getitem__: {image#k} and {table#k} -> <ImageHere>; task_instruction + '\\n' + context;
    model_workers.py LLaVA.forward: <ImageHere> -> <image>."""
    prompt = build("abc{image#1}de{table#2}f", ["x", "y"])
    assert prompt.question == "Q\nabc<image>de<image>f"
    assert prompt.images == ["x", "y"] and prompt.dropped_images == 0 and not prompt.truncated
    assert prompt.context_tokens == 1 + 6 + 2 * 2
    assert build("a", [], instruction="").question == "\na"          # the "\n" comes even without instruction


def test_the_placeholder_number_does_not_pick_the_image():
    """utils.py __getitem__ pops raw_img_list from its end once per fragment: images go to placeholders in
    images_path order, whatever k says."""
    assert build("{image#2} and {image#1}", ["a", "b"]).images == ["a", "b"]


def test_a_context_without_placeholders_gets_its_last_image_in_front():
    """utils.py __getitem__: one fragment, then one image popped (image_start) -> '<ImageHere>' + context."""
    prompt = build("What is shown?", ["a", "b", "c"])
    assert prompt.question == "Q\n<image>What is shown?" and prompt.images == ["c"] and prompt.dropped_images == 2


def test_surplus_images_are_dropped_from_the_front():
    """utils.py __getitem__: 'B' takes c, 'A' takes b (image_start), a is never reached."""
    prompt = build("A{image#1}B", ["a", "b", "c"])
    assert prompt.question == "Q\n<image>A<image>B" and prompt.images == ["b", "c"]


def test_a_placeholder_numbered_past_the_images_stays_text():
    """utils.py __getitem__ replaces {image#k} only for k in 1..len(images_path)."""
    prompt = build("see {image#3}", ["a", "b"])
    assert prompt.question == "Q\n<image>see {image#3}" and prompt.images == ["b"]


@pytest.mark.parametrize("n, expected", [
    (2, "<image>\n<image>\n"), (3, "<image>\n<image>\n<image>"), (4, "<image>\n<image>\n<image>\n<image>\n")])
def test_adjacent_images_are_separated_pairwise_as_the_llava_worker_does(n, expected):
    """model_workers.py LLaVA.forward: question.replace('<ImageHere><ImageHere>', '<ImageHere>\\n<ImageHere>\\n')."""
    context = "".join(f"{{image#{k}}}" for k in range(1, n + 1))
    assert build(context, [str(k) for k in range(n)]).question == "Q\n" + expected
    assert separate_adjacent_images("x<ImageHere><ImageHere>y") == "x<ImageHere>\n<ImageHere>\ny"


# "abc{image#1}defgh{image#2}ij" with images x, y and 2 tokens per image, walked from "ij" (utils.py __getitem__);
# the budget is instruction "Q" (1) + room.
@pytest.mark.parametrize("room, question, images", [
    (20, "Q\nabc<image>defgh<image>ij", ["x", "y"]),   # everything fits (14 tokens)
    (10, "Q\ndefgh<image>ij", ["y"]),                   # ij 2 + y 2 + defgh 5 = 9; image x would make 11
    (8, "Q\n<image>ij", ["y"]),                         # defgh (5 + 4 > 8) is dropped whole, not cut
    (1, "Q\nj", []),                                    # the last fragment alone is cut to its last tokens
    (0, "Q\nij", []),                                   # cur_ids[-0:] keeps every token
    (-1, "Q\nj", []),                                   # cur_ids[1:]: Python's slice with a negative budget
])
def test_left_truncation_walks_fragments_and_images_from_the_end(room, question, images):
    prompt = build("abc{image#1}defgh{image#2}ij", ["x", "y"], budget=1 + room)
    assert (prompt.question, prompt.images) == (question, images)
    assert prompt.truncated == (room < 20)


def test_an_image_that_does_not_fit_ends_the_walk():
    """utils.py __getitem__: after 'What?' (5 tokens) an image (2) does not fit in 6: no image at all."""
    prompt = build("What?", ["a"], budget=1 + 6)
    assert prompt.question == "Q\nWhat?" and prompt.images == [] and not prompt.truncated


def test_every_kept_fragment_goes_through_the_tokenizer_and_back():
    """utils.py __getitem__ decodes each kept chunk of ids: the text is the tokenizer's, not the file's."""
    calls = []

    def shouting_decode(text, n):
        calls.append((text, n))
        return text[len(text) - n:].upper() if n > 0 else ""

    prompt = build_milebench_question("Q", "ab{image#1}cd", ["x"], count_tokens=chars,
                                      keep_last_tokens=shouting_decode, tokens_per_image=1, token_budget=100)
    assert prompt.question == "Q\nAB<image>CD" and calls == [("cd", 2), ("ab", 2)]


def test_the_choice_list_is_appended_before_placeholders_are_read():
    """utils.py __getitem__: choice_str = '\\nChoice list: \\n' + lettered options + '\\nYour answer is: '."""
    prompt = build("{image#1} Which?", ["a"], choices=["red", "blue"])
    assert prompt.question == "Q\n<image> Which?\nChoice list: \nA. red\nB. blue\nYour answer is: "


def test_an_empty_choice_list_still_gets_the_suffix():
    """utils.py __getitem__ tests `'choice_list' in task_instance`, not whether the list has options."""
    assert build("Go", [], has_choice_list=True).question == "Q\nGo\nChoice list: \n\nYour answer is: "
    assert build("Go", [], has_choice_list=False).question == build("Go", []).question == "Q\nGo"


def test_only_the_task_named_gpr1200_lists_options_without_letters():
    """utils.py __getitem__: (f'{chr(65+idx)}. ' if 'GPR1200' != self.dataset_name else '')."""
    assert choice_text(["x", "y"], task="GPR1200") == "\nChoice list: \nx\ny\nYour answer is: "
    assert choice_text(["x", "y"], task="gpr1200") == "\nChoice list: \nA. x\nB. y\nYour answer is: "


def test_more_placeholders_than_images_is_an_error_unless_cut_away():
    """With images exhausted, utils.py __getitem__ still joins every chunk with <ImageHere>; LLaVA then fails."""
    with pytest.raises(ValueError, match="2 image placeholders but 1 of the 1 images"):
        build("{image#1}{image#1}", ["a"])
    prompt = build("x{image#1}yy{image#1}z", ["a"], budget=1 + 3)   # z 1 + a 2; yy does not fit
    assert prompt.question == "Q\n<image>z" and prompt.images == ["a"]


def test_llava_worker_template_and_generation_settings():
    """model_workers.py LLaVA: conv_templates['llava_llama_2'] (LLaVA conversation.py, SeparatorStyle.LLAMA_2,
    '<s>' stripped by ret.lstrip(sep)); configs/model_configs.yaml llava-v1.5-7b gen_kwargs."""
    assert llava_worker_prompt("<image>\nWhat?") == (
        "[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to understand the visual "
        "content that the user provides, and assist the user with a variety of tasks using natural language.\n"
        "<</SYS>>\n\n<image>\nWhat? [/INST]")
    assert LLAVA_WORKER_GEN_KWARGS == {"max_new_tokens": 512, "min_new_tokens": 1, "do_sample": False,
                                       "temperature": 0.0}
    with pytest.raises(ValueError):
        llava_worker_prompt("")


def test_image_budget_batches():
    assert image_budget_batches([5, 10, 10, 30, 2, 2], 24, 16) == [[0, 1], [2], [3], [4, 5]]
    assert image_budget_batches([1] * 5, 24, 2) == [[0, 1], [2, 3], [4]]
    assert image_budget_batches([], 24, 2) == []


@pytest.mark.parametrize("n_images", [1, 2, 5, 7, 12, 13, 24, 25, 60])
def test_image_budget_batches_are_milebench_batches_for_samples_of_one_image_count(n_images):
    """generate.py: samples grouped by len(images_path), DataLoader batch_size=max(int(batch_image / n_img), 1),
    eval.sh --batch-image 24 (its worker then answers the batch one sample at a time)."""
    groups = image_budget_batches([n_images] * 30, 24, max_items=1000)
    assert [len(group) for group in groups[:-1]] == [max(24 // n_images, 1)] * (len(groups) - 1)
    assert sum(len(group) for group in groups) == 30


def test_the_default_settings_are_milebench_llava_workers():
    """configs/model_configs.yaml (llava-v1.5-7b gen_kwargs), model_workers.py LLaVA (llava_llama_2: what the
    default ``auto`` is for LLaVA-1.5), eval.sh (--batch-image 24); max_context_len 4096: LLaVA-1.5's context (not
    in MileBench's repository)."""
    from orchestrator.config import EvalConfig
    from orchestrator.eval.milebench import LLAVA_WORKER_TEMPLATE
    from orchestrator.eval.model_adapter import milebench_template_for
    from orchestrator.eval.predictor import PredictorSettings

    cfg = EvalConfig()
    assert (milebench_template_for(cfg.milebench_template, "llava"), cfg.milebench_max_new_tokens,
            cfg.milebench_min_new_tokens, cfg.milebench_token_budget, cfg.milebench_image_budget,
            cfg.milebench_fit_context) == (LLAVA_WORKER_TEMPLATE, 512, 1, 4096, 24, False)
    settings = PredictorSettings(run_id="t", model_path="m")
    assert settings.milebench_gen_kwargs() == LLAVA_WORKER_GEN_KWARGS
    assert (settings.milebench_template, settings.token_budget, settings.image_budget) == ("auto", 4096, 24)


# -- normalisation: evaluate.py Eval.process / processPunctuation -----------------------------------

@pytest.mark.parametrize("text, expected", [
    ("  Hello, World!", "hello world"),     # ", " touches a space: removed; "!" does not: a space, stripped
    ("a-b", "a b"), ("a - b", "a  b"),      # replaced by a space / removed (two spaces stay)
    ("1,000 (approx)", "1000 approx"),      # a 1,000-style number: every mark removed
    ("3.5 apples.", "3.5 apples"),          # a period before a digit stays
    ("Yes</s>", "yes  s"),                  # special tokens are not stripped: / < > are punctuation
    ("'Quoted'", "quoted"),
])
def test_normalize_answer_is_evaluate_process(text, expected):
    assert normalize_answer(text) == expected


def test_only_the_first_32_periods_are_removed():
    """processPunctuation calls periodStrip.sub('', text, re.UNICODE): re.UNICODE (32) is sub's count."""
    assert normalize_answer("x." * 40) == "x" * 32 + "x." * 8


# -- ROUGE-L: rouge 1.0.1 Rouge.get_scores -> rouge_score.rouge_l_summary_level ----------------------

F_ONE = 2.0 * 1.0 / (2.0 + 1e-8)     # F of P = R = 1 with the package's 1e-8


@pytest.mark.parametrize("hypothesis, reference, p, r", [
    # distinct words: hyp {the cat sat on mat} 5, ref {the cat is on mat} 5, LCS words {the cat on mat} 4
    ("the cat sat on the mat", "the cat is on the mat", 4 / 5, 4 / 5),
    ("the the the", "the", 1.0, 1.0),                 # repeats count once
    ("a b c d", "a c", 2 / 4, 2 / 2),
    ("a b. c d", "c d. a b", 1.0, 1.0),               # sentences split at "."; LCS unioned over sentence pairs
    ("b a. a", "a b", 1.0, 1.0),                      # _recon_lcs picks "b" for ("a b", "b a"); "a" comes from "a"
    ("a. . b", "a b", 2 / 3, 1.0),                    # the blank sentence " " is one empty word
])
def test_rouge_l_is_the_pinned_packages_unique_word_lcs(hypothesis, reference, p, r):
    scores = rouge_l(hypothesis, reference)
    assert scores["p"] == pytest.approx(p, abs=0) and scores["r"] == pytest.approx(r, abs=0)
    assert scores["f"] == 2.0 * ((p * r) / (p + r + 1e-8))


def test_rouge_l_raises_without_a_sentence():
    """rouge_score.rouge_n raises 'Hypothesis is empty.' for a text of only periods."""
    with pytest.raises(ValueError):
        rouge_l("...", "a")


def test_rouge_l_score_normalises_and_gives_empty_answers_zero():
    """evaluate.py evaluate_rouge: process both, assert gt != '', score 0 when pred == ''."""
    assert rouge_l_score("The cat.", "the cat") == F_ONE
    assert rouge_l_score("", "x") == rouge_l_score("!!", "x") == 0.0
    with pytest.raises(ValueError, match="empty after MileBench's normalisation"):
        rouge_l_score("x", "!!")


def test_rouge_l_matches_the_real_package_when_installed():
    """Only where rouge==1.0.1 is importable (not a dependency of this project)."""
    rouge = pytest.importorskip("rouge")
    if importlib.metadata.version("rouge") != "1.0.1":
        pytest.skip("another rouge version is installed")
    pairs = [("the cat sat on the mat", "the cat is on the mat"), ("b a. a", "a b"), ("a. . b", "a b"),
             ("police killed the gunman 2.5 times", "the gunman police killed. 5"), ("x y z", "q")]
    for hypothesis, reference in pairs:
        assert rouge_l(hypothesis, reference) == rouge.Rouge().get_scores(hypothesis, reference)[0]["rouge-l"]


# -- multiple choice: evaluate.py Eval.match_choice / judge_multi_choice --------------------------------

COLOURS = ["red", "blue", "green"]


@pytest.mark.parametrize("prediction, extracted", [
    ("B", "B"), ("b", "B"), ("B.", "B"), ("(C)", "C"),        # a whole answer of 1-2 characters
    ("I think it is b blue", "B"),                            # "<letter> <option>" anywhere
    ("A. blue", "B"),                                         # a letter with another option's text: the text wins
    ("blue, or a red", "A"),                                  # "<letter> <option>" beats an earlier bare option
    ("green", "C"),
    ("", "C"),                                                # an empty answer is read as C
    ("option c", "C"),                                        # the fall-back keeps every letter that is a key
    ("The answer is C", "AC"),                                # ... so "answer" adds an A
    ("BC", "BC"), ("purple", ""),
])
def test_extract_choice_follows_match_choice(prediction, extracted):
    score, selected = judge_multi_choice(prediction, "green", COLOURS)
    assert selected == extracted and score == int(extracted == "C")


def test_options_are_tried_in_order_not_by_length():
    """match_choice step 2: regex alternation takes the first option that matches at the leftmost position."""
    assert judge_multi_choice("red car", "red car", ["red", "red car"]) == (0, "A")


def test_an_option_with_a_regex_special_never_matches_by_text():
    """match_choice step 2 compares the matched text with the ESCAPED option ('3\\.5'), which differs."""
    assert judge_multi_choice("3.5", "3.5", ["3.5", "4"]) == (0, "")


def test_letters_past_z_and_their_matching():
    """Eval.char: A..Z, AA..AZ, BA..; match_choice returns only the first character of a step-1 match."""
    assert [option_letter(i) for i in (0, 25, 26, 51, 52)] == ["A", "Z", "AA", "AZ", "BA"]
    options = [f"o{i}" for i in range(30)]
    assert judge_multi_choice("aa", "o26", options) == (1, "AA")
    assert extract_choice("aa o26", {option_letter(i): o for i, o in enumerate(options)}) == "A"


def test_a_reference_outside_the_options_cannot_be_scored():
    """judge_multi_choice asserts gt_ans in choice_list (both normalised)."""
    assert judge_multi_choice("b", "Blue!", COLOURS) == (1, "B")
    with pytest.raises(ValueError, match="not one of the options"):
        judge_multi_choice("b", "purple", COLOURS)


# -- dispatch and needles: evaluate.py main() and Eval.evaluate_needle --------------------------------

def test_score_sample_rules_per_task_kind():
    assert score_sample("TextNeedleInAHaystack", "open-ended", "The needle is 7xq2.", "7xq2") == ("exact_match", 1.0)
    assert score_sample("ImageNeedleInAHaystack", "open-ended", "7xq2z", "7xq2") == ("exact_match", 0.0)
    assert score_sample("MMCoQA", "open-ended", "It was in 1999 I think", "1999") == ("exact_match", 1.0)
    assert score_sample("mmcoqa", "open-ended", "in 1999", "1999")[0] == "rouge_l_f"   # the name test is exact
    assert score_sample("SynthImageChoice", "multi-choice", "B", "Image 2", ["Image 1", "Image 2"]) == ("accuracy", 1.0)
    metric, value = score_sample("ALFRED", "open-ended", "a b c d", "a c")
    assert metric == "rouge_l_f" and value == 2.0 * ((0.5 * 1.0) / (1.5 + 1e-8))


# -- task groups and aggregation: score.py dataset_list, evaluate.py per-task results -------------------

def test_task_groups_cover_milebench_29_tasks():
    assert sum(len(tasks) for tasks in TASK_GROUPS.values()) == 29
    assert [len(TASK_GROUPS[g]) for g in ("Realistic Temporal", "Realistic Semantic", "Diagnostic")] == [13, 13, 3]
    assert task_group("ActionLocalization") == task_group("action_localization") == "Realistic Temporal"
    assert task_group("CLEVR-Change") == task_group("clevr_change") == "Realistic Semantic"
    assert task_group("TextNeedleInAHaystack") == "Diagnostic"
    assert task_group("SynthObjectCount") == "Other"


def test_summarise_per_task_level_group_and_overall():
    rows = [
        # ALFRED (Realistic Semantic, open-ended): 0.8 (few), 2/3 (medium), one error row (excluded)
        ("ALFRED", "open-ended", "the cat sat on the mat", "the cat is on the mat", [], "few", ""),
        ("ALFRED", "open-ended", "a b c d", "a c", [], "medium", ""),
        ("ALFRED", "open-ended", "", "x", [], "few", "image missing"),
        # GPR1200 (Diagnostic, multi-choice): 1 and 0 (many); a reference outside its options cannot be scored
        ("GPR1200", "multi-choice", "y", "y", ["x", "y"], "many", ""),
        ("GPR1200", "multi-choice", "x", "y", ["x", "y"], "many", ""),
        ("GPR1200", "multi-choice", "x", "z", ["x", "y"], "many", ""),
    ]
    df = pd.DataFrame(rows, columns=["split", "question_type", "raw_answer", "label", "choice_list",
                                     "image_quantity_level", "error"])
    scored = score_answers(df)
    assert math.isnan(scored["score"].iloc[2]) and math.isnan(scored["score"].iloc[5])
    assert scored["error"].iloc[5].startswith("scoring: reference answer 'z' is not one of the options")
    alfred_few, alfred_medium = 2.0 * 0.64 / (1.6 + 1e-8), 2.0 * 0.5 / (1.5 + 1e-8)
    table = summarise(scored)
    value = {(r.scope, r.name): r.value for r in table.itertuples()}
    assert value[("task", "ALFRED")] == pytest.approx((alfred_few + alfred_medium) / 2)
    assert value[("task", "GPR1200")] == pytest.approx(0.5)
    assert value[("task_level", "ALFRED/few")] == pytest.approx(alfred_few)
    assert value[("level", "few")] == pytest.approx(alfred_few)
    assert value[("level", "medium")] == pytest.approx(alfred_medium)
    assert value[("level", "many")] == pytest.approx(0.5)
    assert value[("group", "Realistic Semantic")] == pytest.approx((alfred_few + alfred_medium) / 2)
    assert value[("group", "Diagnostic")] == pytest.approx(0.5)
    assert value[("overall", "all tasks")] == pytest.approx(((alfred_few + alfred_medium) / 2 + 0.5) / 2)
    counts = {r.name: (r.metric, r.n, r.n_errors) for r in table.itertuples() if r.scope == "task"}
    assert counts == {"ALFRED": ("rouge_l_f", 2, 1), "GPR1200": ("accuracy", 2, 1)}
