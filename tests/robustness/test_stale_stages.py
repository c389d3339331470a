"""A stage is done only while what it made is on disk; an evaluation retries its failed items when their
images change (pipeline), or when asked (`hadpo eval --retry-errors`)."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from PIL import Image

from orchestrator.config import config_from_dict
from orchestrator.pipeline import WATCHED, PipelineResult, Stage, failed_images, file_state, run_stage


def counting_stage(tmp_path, calls, name="dpo"):
    def run(resume):
        calls.append(resume)
        folder = tmp_path / f"adapter-{len(calls)}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"w")
        return {"adapter": str(folder), WATCHED: {str(tmp_path / "img.jpg"): file_state(tmp_path / "img.jpg")}}
    return Stage(name, "inputs-1", run, products=("adapter",))


def test_a_stage_whose_recorded_output_is_gone_runs_again(tmp_path):
    config = config_from_dict({"name": "p", "output_root": str(tmp_path / "runs")})
    calls: list[bool] = []
    first = run_stage(config, counting_stage(tmp_path, calls), PipelineResult())
    skipped = PipelineResult()
    assert run_stage(config, counting_stage(tmp_path, calls), skipped) == first and skipped.skipped == ["dpo"]
    shutil.rmtree(first["adapter"])  # the DPO adapter folder deleted
    again = PipelineResult()
    second = run_stage(config, counting_stage(tmp_path, calls), again)
    assert again.ran == ["dpo"] and len(calls) == 2 and second["adapter"] != first["adapter"]
    assert calls[1] is True  # same inputs: it resumes (training continues from its checkpoints)


def test_a_stage_runs_again_when_a_file_it_watched_changes(tmp_path):
    config = config_from_dict({"name": "p", "output_root": str(tmp_path / "runs")})
    calls: list[bool] = []
    run_stage(config, counting_stage(tmp_path, calls, "eval_baseline"), PipelineResult())  # img.jpg missing
    run_stage(config, counting_stage(tmp_path, calls, "eval_baseline"), PipelineResult())
    assert len(calls) == 1
    Image.new("RGB", (4, 4)).save(tmp_path / "img.jpg")  # the missing image is put in place
    result = PipelineResult()
    run_stage(config, counting_stage(tmp_path, calls, "eval_baseline"), result)
    assert result.ran == ["eval_baseline"] and len(calls) == 2


def test_a_damaged_stage_record_means_not_done(tmp_path):
    config = config_from_dict({"name": "p", "output_root": str(tmp_path / "runs")})
    calls: list[bool] = []
    run_stage(config, counting_stage(tmp_path, calls), PipelineResult())
    (config.run_dir / "stages" / "dpo.json").write_text("{half a rec")
    result = PipelineResult()
    run_stage(config, counting_stage(tmp_path, calls), result)
    assert result.ran == ["dpo"]


def test_failed_images_watches_images_that_did_not_open_but_never_refused_paths(tmp_path):
    answers = pd.DataFrame([
        {"images": [str(tmp_path / "ok.jpg")], "error": ""},
        {"images": [str(tmp_path / "gone.jpg")], "error": "image could not be loaded: file not found"},
        {"images": ["/etc/passwd"], "error": "image could not be loaded: path outside the image root (...)"},
    ])
    assert failed_images(answers) == {str(tmp_path / "gone.jpg"): "missing"}


@pytest.mark.slow
def test_retry_errors_recomputes_an_item_whose_image_was_fixed(ray_session, synth_world, tiny_model_dir, tmp_path):
    from orchestrator.eval.runner import run_eval

    world = tmp_path / "world"
    shutil.copytree(synth_world[0], world)
    config = config_from_dict({"name": "retry", "output_root": str(tmp_path / "runs"),
                               "data": {"synthetic_dir": str(world), "synthetic": {"num_pope_images": 16}},
                               "eval": {"batch_size": 32, "cpus_per_actor": 0.5}})
    victim = sorted((world / "coco" / "val2014").glob("*.jpg"))[0]
    original = victim.read_bytes()
    victim.write_bytes(b"not an image")
    first = run_eval(config, model_path=str(tiny_model_dir), benchmarks=("pope",))
    broken = first.answers()
    failed = broken[broken["error"] != ""]
    assert len(failed) and all(str(victim) in list(images) for images in failed["images"])
    assert first.complete and first.counts["errors"] == len(failed)  # counted, not dropped

    victim.write_bytes(original)
    unchanged = run_eval(config, model_path=str(tiny_model_dir), benchmarks=("pope",))
    assert unchanged.counts["computed"] == 0 and unchanged.counts["errors"] == len(failed)  # resume keeps errors
    retried = run_eval(config, model_path=str(tiny_model_dir), benchmarks=("pope",), retry_errors=True)
    assert retried.run_id == first.run_id and retried.counts["computed"] == len(failed)
    assert retried.counts["errors"] == 0 and len(retried.answers()) == len(broken)
    assert retried.pope_table["split"].iloc[-1] == "mean"


def test_stages_run_together_are_each_skipped_or_recorded_on_their_own(tmp_path):
    """The evaluations' way (`run_stages_together`): one call does the work of the stages that are not up to
    date; each gets its own record, and the one already done is neither passed nor run again."""
    import json

    from orchestrator.pipeline import run_stages_together

    config = config_from_dict({"name": "p", "output_root": str(tmp_path / "runs")})
    calls: list[bool] = []
    run_stage(config, counting_stage(tmp_path, calls, "eval_baseline"), PipelineResult())
    passed: list[list[str]] = []

    def evaluate(stages):
        passed.append([stage.name for stage in stages])
        return [{"made_by": "one pass", "for": stage.name} for stage in stages]

    stages = [Stage(name, "inputs-1", None) for name in ("eval_baseline", "eval_hadpo_seed1", "eval_hadpo_seed2")]
    result = PipelineResult()
    outputs = run_stages_together(config, stages, result, evaluate)
    assert passed == [["eval_hadpo_seed1", "eval_hadpo_seed2"]] and len(calls) == 1
    assert outputs[0]["adapter"] and [o["for"] for o in outputs[1:]] == ["eval_hadpo_seed1", "eval_hadpo_seed2"]
    assert result.skipped == ["eval_baseline"] and result.ran == ["eval_hadpo_seed1", "eval_hadpo_seed2"]
    records = [json.loads((config.run_dir / "stages" / f"eval_hadpo_seed{n}.json").read_text()) for n in (1, 2)]
    assert records[0]["together_with"] == ["eval_hadpo_seed2"] and records[0]["started"] == records[1]["started"]
    again = PipelineResult()
    run_stages_together(config, stages, again, evaluate)
    assert len(passed) == 1 and again.ran == [] and len(again.skipped) == 3
