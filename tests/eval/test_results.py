"""The answer store: deterministic run ids, atomic block files, dedupe and anti-join for resume."""

import math

from orchestrator.eval.results import (answer_files, answered_keys, anti_join, compute_run_id, read_answers,
                                       read_metrics, write_answers, write_metrics)


def row(item_id, split="random", error="", answer="yes"):
    return {"run_id": "r", "model": "m", "adapter": "", "benchmark": "pope", "split": split,
            "item_id": str(item_id), "images": ["/x.jpg"], "question": "q", "label": "yes",
            "raw_answer": answer, "answer": answer, "p_yes": math.nan, "error": error, "mode": "score",
            "decoding": "{}", "batch_size": 1, "version": "v", "question_type": "yes-no", "choice_list": [],
            "image_quantity_level": "few", "prompt_tokens": 3}


def test_run_id_is_deterministic_and_changes_with_its_inputs():
    args = ("/m", "/a", "score", {"max_new_tokens": 3, "template": "llava_v1"}, {"pope/random": "sha:1"})
    assert compute_run_id(*args) == compute_run_id(*args)
    assert compute_run_id(*args) == compute_run_id("/m", "/a", "score", {"template": "llava_v1", "max_new_tokens": 3},
                                                   {"pope/random": "sha:1"})  # key order does not matter
    assert compute_run_id(*args) != compute_run_id("/m", None, *args[2:])
    assert compute_run_id(*args) != compute_run_id("/m", "/a", "generate", *args[3:])
    assert compute_run_id(*args) != compute_run_id(*args[:4], {"pope/random": "sha:2"})
    assert compute_run_id(*args, tag="base").startswith("base-")


def test_blocks_are_written_atomically_and_temp_files_ignored(tmp_path):
    write_answers([row(1), row(2)], tmp_path)
    (tmp_path / ".part-dead.parquet.1234.tmp").write_bytes(b"half a file")   # an interrupted write
    assert write_answers([], tmp_path) is None
    assert len(answer_files(tmp_path)) == 1
    assert sorted(read_answers(tmp_path)["item_id"]) == ["1", "2"]


def test_reading_dedupes_on_the_key_preferring_answers_over_errors(tmp_path):
    write_answers([row(1, error="model failed"), row(2)], tmp_path)
    write_answers([row(1, answer="no"), row(2, answer="no"), row(2, split="popular")], tmp_path)
    answers = read_answers(tmp_path)
    assert len(answers) == 3
    by_key = {(r.split, r.item_id): r for r in answers.itertuples()}
    assert by_key[("random", "1")].error == "" and by_key[("random", "1")].answer == "no"
    assert by_key[("random", "2")].answer == "yes"      # the first written wins among good rows
    assert len(read_answers(tmp_path, dedupe=False)) == 5


def test_anti_join_skips_answered_keys(tmp_path):
    write_answers([row(1), row(2, error="image could not be loaded")], tmp_path)
    items = [{"benchmark": "pope", "split": "random", "item_id": str(i)} for i in (1, 2, 3)]
    assert [i["item_id"] for i in anti_join(items, answered_keys(tmp_path))] == ["3"]
    assert [i["item_id"] for i in anti_join(items, answered_keys(tmp_path, include_errors=False))] == ["2", "3"]
    assert answered_keys(tmp_path / "missing") == set()


def test_metrics_round_trip(tmp_path):
    path = write_metrics([{"run_id": "r", "benchmark": "pope", "scope": "split", "name": "random",
                           "metric": "f1", "value": 0.5, "n": 10}], tmp_path / "metrics.parquet")
    frame = read_metrics(path)
    assert frame.to_dict("records") == [{"run_id": "r", "benchmark": "pope", "scope": "split", "name": "random",
                                         "metric": "f1", "value": 0.5, "n": 10}]
