"""The run layout names stages and files one way and reads them back the same way."""

from __future__ import annotations

import pytest

from orchestrator import layout


@pytest.mark.parametrize("stage, seed, name", [("dpo", None, "dpo"), ("dpo", 2, "dpo_seed2"),
                                               ("eval_hadpo", -1, "eval_hadpo_seed-1"),
                                               ("eval_baseline", None, "eval_baseline")])
def test_a_seeded_stage_name_reads_back_as_its_stage_and_seed(stage, seed, name):
    assert layout.seeded_stage(stage, seed) == name
    assert layout.parse_stage(name) == (stage, seed)


def test_names_that_only_look_seeded_are_stages_of_their_own():
    assert layout.parse_stage("eval_hadpo_seed") == ("eval_hadpo_seed", None)
    assert layout.parse_stage("dpo_seedx") == ("dpo_seedx", None)


def test_each_pipeline_stage_names_the_training_it_ran_and_the_evaluation_of_its_adapter():
    assert [layout.training_stage_of(s) for s in ("warmup", "dpo", "dpo_seed3", "eval_hadpo_seed3", "data")] == \
        ["sft", "dpo", "dpo", None, None]
    assert layout.evaluation_of("dpo") == "eval_hadpo"
    assert layout.evaluation_of("dpo_seed3") == "eval_hadpo_seed3"


def test_a_seeded_run_lies_in_a_sibling_folder_named_after_its_seed(tmp_path):
    assert layout.seeded_run_dir(tmp_path / "demo", 2) == tmp_path / "demo-seed2"
    assert layout.seeded_run_name("demo", 2) == "demo-seed2"


def test_stage_records_curves_and_evaluations_are_found_under_the_names_they_were_written_with(tmp_path):
    run_dir = tmp_path / "run"
    written = [layout.stage_record_path(run_dir, s) for s in ("dpo_seed1", "data", "eval_baseline")]
    written += [layout.curves_path(run_dir, "sft"), layout.curves_path(run_dir, "dpo"),
                layout.eval_info_path(run_dir, "b-1"), layout.eval_info_path(run_dir, "a-2")]
    for path in written:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    (layout.train_dir(run_dir) / "notes.txt").write_text("not a curves file")
    assert layout.stage_records(run_dir) == {name: layout.stage_record_path(run_dir, name)
                                             for name in ("data", "dpo_seed1", "eval_baseline")}
    assert layout.curves_files(run_dir) == {"dpo": layout.curves_path(run_dir, "dpo"),
                                            "sft": layout.curves_path(run_dir, "sft")}
    assert layout.eval_dirs(run_dir) == [layout.eval_dir(run_dir, "a-2"), layout.eval_dir(run_dir, "b-1")]
    assert layout.stage_records(tmp_path / "empty") == {} and layout.eval_dirs(tmp_path / "empty") == []


def test_a_trial_name_is_a_usable_folder_name():
    assert layout.trial_run_name("sweep", "beta=0.5_path=a/b") == "sweep-beta0.5_patha-b"
