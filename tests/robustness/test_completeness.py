"""An evaluation with fewer answers than questions says so, and gives no mean over its splits unless asked."""

from __future__ import annotations

import pandas as pd
import pytest

from orchestrator.cli import main
from orchestrator.eval import completeness, pope
from orchestrator.eval.results import write_answers
from orchestrator.layout import eval_dir
from orchestrator.files import write_json_atomic
from orchestrator.eval.runner import format_pope_table, with_expected
from orchestrator.report import build_report, load_run

SPLITS = ("random", "popular", "adversarial")
EXPECTED = {f"pope/{split}": 8 for split in SPLITS}


def answer(split, k, error=""):
    label = "yes" if k % 2 == 0 else "no"
    raw = "Yes" if k % 4 != 3 else "No"
    return {"run_id": "r", "model": "/m", "adapter": "", "benchmark": "pope", "split": split, "item_id": str(k),
            "images": [f"/img/{k}.jpg"], "question": "Is there a cat?", "label": label, "raw_answer": raw,
            "answer": pope.parse_yes_no(raw), "p_yes": 0.5, "error": error, "mode": "score", "decoding": "{}",
            "batch_size": 8, "version": "v", "question_type": "", "choice_list": [], "image_quantity_level": "",
            "prompt_tokens": 5}


def half_finished(run_dir, run_id="half"):
    """What `hadpo eval` killed after its first blocks leaves: run.json (with expected counts) and some answers."""
    folder = eval_dir(run_dir, run_id)
    write_json_atomic(folder / "run.json", {"run_id": run_id, "model": "/m", "adapter": "", "mode": "score",
                                            "expected": EXPECTED})
    rows = [answer("random", k) for k in range(8)] + [answer("popular", k) for k in range(3)]
    rows.append(answer("popular", 3, error="image could not be loaded: file not found (/img/3.jpg)"))
    write_answers(rows, folder / "answers", name="first-blocks")
    return rows


def test_coverage_counts_error_rows_as_present_and_names_the_short_splits():
    answers = pd.DataFrame([answer("random", k) for k in range(8)] + [answer("popular", 0, error="x")])
    table = completeness.coverage(answers, EXPECTED)
    assert table.set_index("split")["answered"].to_dict() == {"random": 8, "popular": 1, "adversarial": 0}
    assert completeness.describe(table) == ("answered 9 of 24 questions (pope/popular 1/8, pope/adversarial 0/8)")
    assert list(completeness.incomplete(table)["split"]) == ["popular", "adversarial"]


def test_the_runner_table_shows_answered_of_expected_and_refuses_the_mean_when_short():
    answers = pd.DataFrame([answer("random", k) for k in range(8)] + [answer("popular", k) for k in range(2)])
    coverage = completeness.coverage(answers, EXPECTED)
    table = with_expected(pope.summarise(answers), coverage, allow_partial=False)
    assert list(table["split"]) == ["random", "popular", "adversarial"]  # a split without answers still shows
    printed = format_pope_table(table)
    assert "8/8" in printed and "2/8" in printed and "0/8" in printed
    assert "coco: no mean F1, INCOMPLETE (popular, adversarial short of answers)" in printed
    partial = with_expected(pope.summarise(answers), coverage, allow_partial=True)
    assert partial["split"].iloc[-1] == "mean" and "mean F1" in format_pope_table(partial)
    full = pd.DataFrame([answer(s, k) for s in SPLITS for k in range(8)])
    complete = with_expected(pope.summarise(full), completeness.coverage(full, EXPECTED), allow_partial=False)
    assert complete["split"].iloc[-1] == "mean" and complete["expected"].iloc[-1] == 24


def test_only_the_dataset_short_of_answers_loses_its_mean():
    from orchestrator.eval.results import pope_metric_rows

    expected = {**EXPECTED, **{f"pope/gqa/{split}": 4 for split in SPLITS}}
    answers = pd.DataFrame([answer(s, k) for s in SPLITS for k in range(8)]
                           + [answer(f"gqa/{s}", k) for s in SPLITS for k in range(4 if s != "adversarial" else 1)])
    coverage = completeness.coverage(answers, expected)
    table = with_expected(pope.summarise(answers), coverage, allow_partial=False)
    means = table[table["split"] == "mean"]
    assert list(means["dataset"]) == ["coco"] and int(means["expected"].iloc[0]) == 24
    printed = format_pope_table(table)
    assert "coco mean F1" in printed and "gqa: no mean F1, INCOMPLETE (adversarial short of answers)" in printed
    rows = pd.DataFrame(pope_metric_rows("r", with_expected(pope.summarise(answers), coverage, allow_partial=True)))
    kept = completeness.drop_means(rows, coverage)
    assert set(rows[rows["scope"] == "overall"]["name"]) == {"mean", "gqa/mean"}
    assert set(kept[kept["scope"] == "overall"]["name"]) == {"mean"}


def test_a_report_of_a_half_finished_evaluation_says_incomplete_and_shows_no_mean(tmp_path):
    run_dir = tmp_path / "run"
    rows = half_finished(run_dir)
    run = load_run(run_dir)
    (evaluation,) = run.evaluations
    assert evaluation.complete is False
    assert any("INCOMPLETE, answered 12 of 24 questions" in note and "--allow-partial" in note for note in run.notes)
    pope_rows = evaluation.metrics[evaluation.metrics["benchmark"] == "pope"]
    assert "mean" not in set(pope_rows["name"]) and {"random", "popular"} <= set(pope_rows["name"])
    # nothing finished is lost: the answers are untouched and still all read
    assert len(pd.read_parquet(evaluation.answers_dir)) == len(rows)
    asked = load_run(run_dir, allow_partial=True).evaluations[0].metrics
    assert "mean" in set(asked[asked["benchmark"] == "pope"]["name"])
    report = build_report([run_dir], tmp_path / "report")
    markdown = report.markdown.read_text()
    assert "12 / 24 INCOMPLETE" in markdown and "INCOMPLETE, answered 12 of 24" in markdown


def test_hadpo_report_prints_the_incomplete_evaluation(tmp_path, capsys):
    half_finished(tmp_path / "run")
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "note: run: eval/half: INCOMPLETE, answered 12 of 24 questions" in out
    assert "(pope/adversarial 0/8, pope/popular 4/8)" in out
