"""MileBench prompts, truncation and scores against hand-computed values (pure, no Ray, no model)."""

import math

import pandas as pd
import pytest

from orchestrator.eval.milebench import (TASK_GROUPS, build_milebench_question, choice_text, gold_choice,
                                         image_budget_batches, lcs_length, left_pad, match_choice,
                                         normalize_answer, rouge_l, rouge_l_f, score_answers, score_sample,
                                         summarise, task_group)


# -- ROUGE-L ----------------------------------------------------------------------------------

def test_lcs_length_of_a_textbook_pair():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert lcs_length([], ["a"]) == 0


@pytest.mark.parametrize("prediction, reference, p, r, f", [
    ("the cat sat on the mat", "the cat is on the mat", 5 / 6, 5 / 6, 5 / 6),   # LCS "the cat on the mat"
    ("a b c d", "a c", 2 / 4, 1.0, 2 * 0.5 * 1.0 / 1.5),
    ("police killed the gunman", "the gunman police killed", 0.5, 0.5, 0.5),
    ("Two.", "two", 1.0, 1.0, 1.0),                                            # case and period ignored
    ("red, green; blue!", "red green blue", 1.0, 1.0, 1.0),                   # punctuation splits tokens
    ("", "two", 0.0, 0.0, 0.0),
    ("nothing shared", "two", 0.0, 0.0, 0.0),
])
def test_rouge_l_equals_hand_computed_values(prediction, reference, p, r, f):
    scores = rouge_l(prediction, reference)
    assert scores["p"] == pytest.approx(p)
    assert scores["r"] == pytest.approx(r)
    assert scores["f"] == pytest.approx(f) == rouge_l_f(prediction, reference)


def test_normalize_answer_follows_the_reference():
    assert normalize_answer("  Hello, World!</s>") == "hello world"
    assert normalize_answer("3.5 apples.") == "3.5 apples"
    assert normalize_answer('"Quoted"') == "quoted"


# -- multiple choice ---------------------------------------------------------------------------

COLOURS = ["red", "blue", "green"]


@pytest.mark.parametrize("prediction, expected", [
    ("B", 1), ("B.", 1), ("(C)", 2), ("C) green", 2), ("B. blue", 1),
    ("The answer is blue.", 1), ("I think it is green", 2),
    ("the answer is C", 2), ("Answer: A", 0),
    ("", None), ("purple", None), ("</s>", None),
])
def test_match_choice_by_letter_or_option_text(prediction, expected):
    assert match_choice(prediction, COLOURS) == expected


def test_match_choice_does_not_read_an_article_as_a_letter():
    assert match_choice("A cat", ["dog", "cat"]) == 1


def test_match_choice_prefers_the_earliest_then_longest_option():
    assert match_choice("the red car", ["red", "red car"]) == 1
    assert match_choice("green, not red", COLOURS) == 2


def test_gold_choice_from_option_text_or_letter():
    assert gold_choice("Image 2", ["Image 1", "Image 2"]) == 1
    assert gold_choice("B", ["x", "y"]) == 1
    assert gold_choice("zzz", ["x", "y"]) is None


def test_score_sample_rules_per_task_kind():
    assert score_sample("TextNeedleInAHaystack", "open-ended", "The needle is 7xq2.", "7xq2") == ("exact_match", 1.0)
    assert score_sample("ImageNeedleInAHaystack", "open-ended", "7xq2z", "7xq2") == ("exact_match", 0.0)
    assert score_sample("MMCoQA", "open-ended", "It was in 1999 I think", "1999") == ("exact_match", 1.0)
    assert score_sample("SynthImageChoice", "multi-choice", "B", "Image 2", ["Image 1", "Image 2"]) == ("accuracy", 1.0)
    assert score_sample("SynthImageChoice", "multi-choice", "Image 1", "Image 2", ["Image 1", "Image 2"]) == ("accuracy", 0.0)
    metric, value = score_sample("ALFRED", "open-ended", "a b c d", "a c")
    assert metric == "rouge_l_f" and value == pytest.approx(2 / 3)


# -- task groups and aggregation ---------------------------------------------------------------

def test_task_groups_cover_milebench_29_tasks():
    assert sum(len(tasks) for tasks in TASK_GROUPS.values()) == 29
    assert [len(TASK_GROUPS[g]) for g in ("Realistic Temporal", "Realistic Semantic", "Diagnostic")] == [13, 13, 3]
    assert task_group("ActionLocalization") == task_group("action_localization") == "Realistic Temporal"
    assert task_group("CLEVR-Change") == task_group("clevr_change") == "Realistic Semantic"
    assert task_group("TextNeedleInAHaystack") == "Diagnostic"
    assert task_group("SynthObjectCount") == "Other"


def test_summarise_per_task_level_group_and_overall():
    rows = [
        # ALFRED (Realistic Semantic, open-ended): 5/6 (few), 2/3 (medium), one error row (excluded)
        ("ALFRED", "open-ended", "the cat sat on the mat", "the cat is on the mat", [], "few", ""),
        ("ALFRED", "open-ended", "a b c d", "a c", [], "medium", ""),
        ("ALFRED", "open-ended", "", "x", [], "few", "image missing"),
        # GPR1200 (Diagnostic, multi-choice): 1 and 0 (many)
        ("GPR1200", "multi-choice", "y", "y", ["x", "y"], "many", ""),
        ("GPR1200", "multi-choice", "x", "y", ["x", "y"], "many", ""),
    ]
    df = pd.DataFrame(rows, columns=["split", "question_type", "raw_answer", "label", "choice_list",
                                     "image_quantity_level", "error"])
    scored = score_answers(df)
    assert math.isnan(scored["score"].iloc[2])
    table = summarise(scored)
    value = {(r.scope, r.name): r.value for r in table.itertuples()}
    assert value[("task", "ALFRED")] == pytest.approx(0.75)
    assert value[("task", "GPR1200")] == pytest.approx(0.5)
    assert value[("level", "few")] == pytest.approx(5 / 6)
    assert value[("level", "medium")] == pytest.approx(2 / 3)
    assert value[("level", "many")] == pytest.approx(0.5)
    assert value[("task_level", "ALFRED/few")] == pytest.approx(5 / 6)
    assert value[("group", "Realistic Semantic")] == pytest.approx(0.75)
    assert value[("group", "Diagnostic")] == pytest.approx(0.5)
    assert value[("overall", "all tasks")] == pytest.approx(0.625)
    alfred = table[(table.scope == "task") & (table.name == "ALFRED")].iloc[0]
    assert (alfred["metric"], alfred["n"], alfred["n_errors"]) == ("rouge_l_f", 2, 1)


# -- prompts -----------------------------------------------------------------------------------

def words(text):
    return len(text.split())


def last_words(text, n):
    return " ".join(text.split()[-n:]) if n > 0 else ""


def build(context, images, budget, choices=(), instruction="Answer it.", task="", tpi=3):
    return build_milebench_question(instruction, context, images, choices, count_tokens=words,
                                    keep_last_tokens=last_words, tokens_per_image=tpi, token_budget=budget,
                                    task=task)


def test_prompt_replaces_placeholders_with_the_image_token():
    prompt = build("First {image#1} then {image#2} what?", ["a.jpg", "b.jpg"], budget=100)
    assert prompt.question == "Answer it.\nFirst <image> then <image> what?"
    assert prompt.images == ["a.jpg", "b.jpg"]
    assert prompt.context_tokens == 2 + 3 + 2 * 3 and not prompt.truncated and prompt.dropped_images == 0


def test_prompt_is_left_truncated_counting_images_as_their_tokens():
    # budget 7 = instruction 2 + " what?" 1 + image#2 3 + " then " 1; image#1 (3 more) does not fit
    prompt = build("First {image#1} then {image#2} what?", ["a.jpg", "b.jpg"], budget=7)
    assert prompt.question == "Answer it.\n then <image> what?"
    assert prompt.images == ["b.jpg"] and prompt.dropped_images == 1 and prompt.truncated
    assert prompt.context_tokens == 7


def test_prompt_cuts_the_crossing_text_fragment_at_token_level():
    prompt = build("one two three four {image#1} five", ["a.jpg"], budget=8)
    assert prompt.question == "Answer it.\nthree four<image> five"
    assert prompt.images == ["a.jpg"] and prompt.context_tokens == 8


def test_prompt_follows_placeholder_order_and_puts_unnamed_images_first():
    assert build("{image#2} and {image#1}", ["a", "b"], budget=100).images == ["b", "a"]
    prompt = build("look {image#2}", ["a", "b"], budget=100)
    assert prompt.question == "Answer it.\n<image>look <image>" and prompt.images == ["a", "b"]


def test_prompt_appends_the_choice_list_for_multi_choice():
    prompt = build("Which? {image#1}", ["a"], budget=100, choices=["red", "blue"])
    assert prompt.question.endswith("<image>\nChoice list: \nA. red\nB. blue\nYour answer is: ")
    assert choice_text(["x", "y"], task="GPR1200") == "\nChoice list: \nx\ny\nYour answer is: "
    # the instruction is never cut; the choice list (at the end) is kept first
    tight = build("Which? {image#1}", ["a"], budget=2 + words(choice_text(["red", "blue"])), choices=["red", "blue"])
    assert tight.images == [] and tight.question.startswith("Answer it.\n") and "B. blue" in tight.question


def test_image_budget_batches():
    assert image_budget_batches([5, 10, 10, 30, 2, 2], 24, 16) == [[0, 1], [2], [3], [4, 5]]
    assert image_budget_batches([1] * 5, 24, 2) == [[0, 1], [2, 3], [4]]
    assert image_budget_batches([], 24, 2) == []


def test_left_pad_positions_count_real_tokens_only():
    ids, mask, pos = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
