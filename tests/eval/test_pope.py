"""POPE answer parsing and metrics against hand-computed values (pure, no Ray, no model)."""

import math

import pandas as pd
import pytest

from orchestrator.eval.pope import (dataset_split, has_yes_no_word, join_labels, mean_f1, objective_names,
                                    objective_values, parse_yes_no, pope_metrics, qualified_split,
                                    strip_special_tokens, summarise)


@pytest.mark.parametrize("text, expected", [
    ("Yes.", "yes"),
    ("Yes", "yes"),
    ("No", "no"),
    ("No.", "no"),
    ("No, there is not.", "no"),
    ("No</s>", "no"),                       # special token stripped first
    ("<s> No</s><pad><pad>", "no"),
    ("<unk>Yes</s>", "yes"),
    ("There is no cat", "no"),
    ("not sure", "no"),
    ("Yes, no doubt.", "no"),               # POPE's rule: the word "no" before the first '.'
    ("Yes, there is a dog. It is not small.", "yes"),  # only the text before the first '.' counts
    ("NO", "yes"),                          # only the exact spellings No / not / no count
    ("Nope", "yes"),
    ("There is a cat in the image.", "yes"),  # neither word: counted as yes (and as unparsable)
    ("", "yes"),
    ("no,", "no"),                          # commas removed before splitting
    ("It is not.", "no"),
    ("cannot tell", "yes"),                 # "cannot" is not "not"
    ("No<|im_end|>", "no"),
])
def test_parse_yes_no_follows_popes_rule(text, expected):
    assert parse_yes_no(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Yes.", True), ("no", True), ("NO", True), ("It is not there", True),
    ("There is a cat in the image.", False), ("", False), ("</s>", False), ("Nope", False),
])
def test_has_yes_no_word_flags_answers_without_either_word(text, expected):
    assert has_yes_no_word(text) is expected


def test_strip_special_tokens():
    assert strip_special_tokens("<s> Yes, there is.</s><unk>") == "Yes, there is."
    assert strip_special_tokens(None) == ""


def test_pope_metrics_equal_hand_computed_values():
    labels = ["yes", "yes", "yes", "yes", "no", "no", "no", "no", "no", "no"]
    preds = ["yes", "yes", "yes", "no", "yes", "yes", "no", "no", "no", "no"]
    m = pope_metrics(labels, preds)
    # TP 3, FN 1, FP 2, TN 4
    assert (m["TP"], m["FP"], m["TN"], m["FN"], m["n"]) == (3, 2, 4, 1, 10)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)       # 0.666...
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["yes_ratio"] == pytest.approx(5 / 10)               # share of PREDICTED yes


def test_pope_metrics_guard_zero_divisions():
    m = pope_metrics(["no", "no"], ["no", "no"])
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"], m["yes_ratio"]) == (0.0, 0.0, 0.0, 1.0, 0.0)
    empty = pope_metrics([], [])
    assert empty["n"] == 0 and empty["accuracy"] == 0.0


def test_pope_metrics_reject_bad_values():
    with pytest.raises(ValueError, match="labels but"):
        pope_metrics(["yes"], [])
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope_metrics(["yes"], ["maybe"])


def test_join_labels_pairs_on_question_id_not_line_order():
    questions = pd.DataFrame({"question_id": [1, 2, 3, 4], "label": ["yes", "no", "yes", "no"]})
    answers = pd.DataFrame({"question_id": [4, 3, 2, 1], "answer": ["No.", "Yes", "Yes</s>", "No"]})
    joined = join_labels(answers, questions).sort_values("question_id")
    assert list(joined["label"]) == ["yes", "no", "yes", "no"]
    assert list(joined["prediction"]) == ["no", "yes", "yes", "no"]
    m = pope_metrics(joined["label"], joined["prediction"])
    assert (m["TP"], m["FP"], m["TN"], m["FN"]) == (1, 1, 1, 1)


def test_join_labels_rejects_orphans_and_duplicates():
    questions = pd.DataFrame({"question_id": [1, 2], "label": ["yes", "no"]})
    with pytest.raises(ValueError, match="no question"):
        join_labels(pd.DataFrame({"question_id": [7], "answer": ["yes"]}), questions)
    with pytest.raises(ValueError, match="duplicated"):
        join_labels(pd.DataFrame({"question_id": [1, 1], "answer": ["yes", "no"]}), questions)


def test_summarise_per_split_with_mean_row_and_error_counts():
    rows = []
    # random: TP 2, FP 0, TN 1, FN 1  -> P 1, R 2/3, F1 0.8
    for label, raw in [("yes", "Yes"), ("yes", "Yes"), ("yes", "No"), ("no", "No, there is not.")]:
        rows.append({"split": "random", "label": label, "raw_answer": raw})
    # adversarial: TP 1, FP 1, TN 0, FN 0 (+ one error row, one unparsable answer) -> P .5, R 1, F1 2/3
    for label, raw, error in [("yes", "A cat.", ""), ("no", "Yes", ""), ("no", "", "image missing")]:
        rows.append({"split": "adversarial", "label": label, "raw_answer": raw, "error": error})
    df = pd.DataFrame(rows)
    df["answer"] = [parse_yes_no(r) for r in df["raw_answer"]]
    table = summarise(df)
    assert list(table["split"]) == ["random", "adversarial", "mean"]
    random, adversarial, mean = (table.iloc[i] for i in range(3))
    assert random["f1"] == pytest.approx(0.8) and random["accuracy"] == pytest.approx(0.75)
    assert adversarial["n"] == 2 and adversarial["n_errors"] == 1 and adversarial["n_unparsable"] == 1
    assert adversarial["f1"] == pytest.approx(2 / 3) and adversarial["yes_ratio"] == pytest.approx(1.0)
    assert mean["f1"] == pytest.approx((0.8 + 2 / 3) / 2) == mean_f1(table)
    assert mean["n"] == 6 and mean["n_errors"] == 1


def test_summarise_of_nothing_is_empty():
    assert len(summarise(pd.DataFrame())) == 0
    assert math.isnan(mean_f1(summarise(pd.DataFrame())))


def test_answer_agreement_counts_the_shared_error_free_questions_worked_by_hand():
    from orchestrator.eval.pope import answer_agreement

    score = pd.DataFrame({"split": ["random", "random", "popular", "popular", "adversarial"],
                          "item_id": ["1", "2", "1", "2", "9"], "answer": ["yes", "no", "no", "yes", "yes"],
                          "raw_answer": ["Yes", "No", "No", "Yes", "Yes"], "error": ["", "", "", "", ""]})
    generate = pd.DataFrame({"split": ["random", "random", "popular", "popular", "random"],
                             "item_id": [1, 2, 1, 2, 3], "answer": ["yes", "yes", "no", "yes", "no"],
                             "raw_answer": ["Yes, there is.", "Yes", "No", "Yes", "No"],
                             "error": ["", "", "", "model failed", ""]})
    # in common and error-free: random/1 (same), random/2 (differs), popular/1 (same); popular/2 is an error
    found = answer_agreement(score, generate)
    assert found == {"n": 3, "same": 2, "share_same": 2 / 3, "share_different": 1 / 3}
    raw = answer_agreement(score, generate, column="raw_answer")
    assert (raw["n"], raw["same"]) == (3, 1)
    assert math.isnan(answer_agreement(score.iloc[:0], generate)["share_same"])
    with pytest.raises(ValueError, match="missing column"):
        answer_agreement(score.drop(columns="answer"), generate)


def test_split_names_carry_the_dataset_except_cocos():
    assert qualified_split("coco", "adversarial") == "adversarial"
    assert qualified_split("gqa", "adversarial") == "gqa/adversarial"
    for dataset, split in [("coco", "random"), ("gqa", "random"), ("aokvqa", "popular"), ("gqa", "mean")]:
        assert dataset_split(qualified_split(dataset, split)) == (dataset, split)


def test_summarise_scores_each_dataset_apart_with_its_own_mean_row():
    rows = []
    # coco random: TP 1, TN 1 -> F1 1; gqa random: TP 1, FP 1 -> P 0.5, R 1, F1 2/3; gqa adversarial: FN 1, TN 1 -> F1 0
    for split, label, raw in [("random", "yes", "Yes"), ("random", "no", "No"),
                              ("gqa/random", "yes", "Yes"), ("gqa/random", "no", "Yes"),
                              ("gqa/adversarial", "yes", "No"), ("gqa/adversarial", "no", "No")]:
        rows.append({"split": split, "label": label, "raw_answer": raw, "version": f"v-{split}"})
    table = summarise(pd.DataFrame(rows))
    assert list(zip(table["dataset"], table["split"])) == [
        ("coco", "random"), ("coco", "mean"), ("gqa", "random"), ("gqa", "adversarial"), ("gqa", "mean")]
    by = table.set_index(["dataset", "split"])
    assert by.loc[("coco", "mean"), "f1"] == pytest.approx(1.0) == mean_f1(table, "coco")
    assert by.loc[("gqa", "random"), "f1"] == pytest.approx(2 / 3) and by.loc[("gqa", "adversarial"), "f1"] == 0.0
    assert by.loc[("gqa", "mean"), "f1"] == pytest.approx(1 / 3) == mean_f1(table, "gqa")
    assert by.loc[("gqa", "mean"), "n"] == 4 and by.loc[("gqa", "random"), "version"] == "v-gqa/random"
    objectives = objective_values(table)
    assert objectives["pope/random/f1"] == 1.0 and objectives["pope/mean_f1"] == 1.0
    assert objectives["pope/gqa/random/f1"] == pytest.approx(2 / 3)
    assert objectives["pope/gqa/mean_f1"] == pytest.approx(1 / 3)
    assert sorted(objectives) == sorted(objective_names({"coco": ["random"], "gqa": ["random", "adversarial"]}))
