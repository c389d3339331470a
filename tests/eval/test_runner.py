"""`run_eval` end to end on the synthetic world with the tiny model: tables, resume, interruption, actor kill."""

import gc
import json

import pyarrow.parquet as pq
import pytest

from orchestrator.config import config_from_dict
from orchestrator.eval.results import KEY, answer_files, read_answers
from orchestrator.eval.runner import EvalRequest, format_milebench_table, format_pope_table, run_eval, run_evals
from scripts.local_cluster import wait_for


def eval_config(world, tmp_path, **eval_section):
    section = {"mode": "score", "batch_size": 16, "max_new_tokens": 3, "milebench_max_new_tokens": 3, "cpus_per_actor": 1}
    section.update(eval_section)
    return config_from_dict({"name": "evaltest", "output_root": str(tmp_path / "runs"),
                             "data": {"synthetic_dir": str(world)}, "eval": section})


def expected_keys(world):
    from orchestrator.data import formats

    keys = set()
    for split in ("random", "popular", "adversarial"):
        for row in formats.read_pope_questions(world / f"pope/coco_pope_{split}.json", split=split):
            keys.add(("pope", split, str(row["question_id"])))
    for task_dir in sorted((world / "milebench").iterdir()):
        for row in formats.read_milebench_task(task_dir):
            keys.add(("milebench", row["task"], row["sample_id"]))
    return keys


def ray_data_executors() -> list:
    """The Ray Data pass executors alive in this process."""
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    return [o for o in gc.get_objects() if isinstance(o, StreamingExecutor)]


def keys_of(frame):
    return [tuple(str(v) for v in row) for row in frame[list(KEY)].itertuples(index=False)]


def assert_complete_once(answers_dir, keys):
    """Every item answered exactly once on disk (no loss, no duplicate), without errors."""
    raw = read_answers(answers_dir, dedupe=False)
    assert sorted(keys_of(raw)) == sorted(keys)
    assert (raw["error"] == "").all()


@pytest.fixture(scope="module")
def first_run(ray_session, synth_world, tiny_model_dir, tmp_path_factory):
    world, _ = synth_world
    cfg = eval_config(world, tmp_path_factory.mktemp("e2e"))
    return cfg, run_eval(cfg, model_path=str(tiny_model_dir), tag="e2e")


def test_run_eval_end_to_end_on_the_synthetic_world(first_run, synth_world):
    world, _ = synth_world
    cfg, result = first_run
    keys = expected_keys(world)
    assert result.counts["items"] == result.counts["computed"] == result.counts["answered"] == len(keys)
    assert result.counts["errors"] == result.counts["rejected"] == 0
    assert result.answers_dir == cfg.run_dir / "eval" / result.run_id / "answers"
    assert result.run_id.startswith("e2e-")
    assert_complete_once(result.answers_dir, keys)

    answers = read_answers(result.answers_dir)
    pope = answers[answers["benchmark"] == "pope"]
    assert set(pope["mode"]) == {"score"} and pope["p_yes"].between(0, 1).all()
    assert set(pope["answer"]) <= {"yes", "no"}
    assert pope["version"].str.startswith("sha256:").all()
    assert (answers["run_id"] == result.run_id).all() and (answers["decoding"].str.contains('"max_new_tokens": 3')).all()

    table = result.pope_table
    assert list(table["split"]) == ["random", "popular", "adversarial", "mean"]
    assert table["n"].iloc[:3].tolist() == [len(pope) // 3] * 3
    printed = format_pope_table(table)
    assert "adversarial" in printed and "mean F1" in printed and "yes-ratio" in printed

    mile = result.milebench_table
    assert set(mile[mile["scope"] == "task"]["name"]) == {k[1] for k in keys if k[0] == "milebench"}
    assert "overall" in format_milebench_table(mile)

    metrics = pq.read_table(result.metrics_path).to_pandas()
    f1 = metrics[(metrics.benchmark == "pope") & (metrics.name == "mean") & (metrics.metric == "f1")]
    assert f1["value"].iloc[0] == pytest.approx(table["f1"].iloc[-1])
    assert {"split", "overall", "task", "level", "group", "counts"} <= set(metrics["scope"])
    assert (result.answers_dir.parent / "run.json").is_file()


def test_second_run_computes_nothing_new(first_run, tiny_model_dir):
    cfg, result = first_run
    files = answer_files(result.answers_dir)
    again = run_eval(cfg, model_path=str(tiny_model_dir), tag="e2e")
    assert again.run_id == result.run_id
    assert again.counts["computed"] == 0 and again.counts["skipped"] == result.counts["items"]
    assert answer_files(result.answers_dir) == files
    assert again.pope_table.equals(result.pope_table)


def test_run_evals_answers_several_models_with_one_actor_pool(first_run, synth_world, tiny_model_dir, tmp_path):
    """The base model and an adapter, evaluated together (what `hadpo run` does after training): one actor answers
    both, each run gets the answers and metrics it would get alone, and a finished run computes nothing."""
    import pandas as pd

    from tests.eval.test_predictor import saved_lora_adapter

    cfg, alone = first_run
    world, _ = synth_world
    keys = expected_keys(world)
    adapter = saved_lora_adapter(tiny_model_dir, tmp_path / "adapter")
    done, base, tuned = run_evals([EvalRequest(cfg, str(tiny_model_dir), tag="e2e"),
                                   EvalRequest(cfg, str(tiny_model_dir), tag="together"),
                                   EvalRequest(cfg, str(tiny_model_dir), str(adapter), tag="together")])
    assert done.run_id == alone.run_id and done.counts["computed"] == 0
    assert base.run_id != tuned.run_id and base.counts["computed"] == tuned.counts["computed"] == len(keys)
    for result in (base, tuned):
        assert_complete_once(result.answers_dir, keys)
    assert base.pope_table.equals(alone.pope_table)   # fp32, the same blocks: the same answers as alone
    p_yes = [read_answers(r.answers_dir).set_index(list(KEY))["p_yes"].sort_index() for r in (base, tuned)]
    assert (p_yes[0] - p_yes[1]).abs().max() > 1e-4   # the adapter was used for its run only
    timings = [pd.read_json(path, typ="series") for r in (base, tuned)
               for path in sorted((r.eval_dir / "timings").glob("*.json"))]
    assert len(timings) == 2 and timings[0]["pid"] == timings[1]["pid"]   # one actor, imported once
    assert timings[1]["reused_from_run"] == base.run_id


def test_interrupted_run_completes_only_the_missing_items(ray_session, synth_world, tiny_model_dir, tmp_path):
    world, _ = synth_world
    keys = expected_keys(world)
    cfg = eval_config(world, tmp_path, prefix_images=2)  # POPE in blocks of 2 images: the fault comes mid-run
    fault = {"raise_on_call": 3, "marker": str(tmp_path / "raised")}
    free_cpus = ray_session.available_resources().get("CPU", 0)
    executors_before = {id(executor) for executor in ray_data_executors()}
    with pytest.raises(Exception, match="injected fault") as failed:
        run_eval(cfg, model_path=str(tiny_model_dir), tag="interrupted", fault=fault)
    assert (tmp_path / "raised").exists()
    # nothing of the failed pass lives on in the frames its error went through: a dataset keeps its pass's
    # executor, which can hold the pool's last tasks and with them an actor (this test's next line then waited
    # in vain, and the next test for ever: seen once in a whole-suite run)
    gc.collect()
    assert not [executor for executor in ray_data_executors() if id(executor) not in executors_before]
    # the failed pass gave its actors' CPUs back while its error is still held (as a notebook holds the last
    # one): the resumed evaluation below gets an actor instead of waiting for them forever
    wait_for(lambda: ray_session.available_resources().get("CPU", 0) >= free_cpus, 20,
             f"the failed pass's actors still hold CPUs: {free_cpus} were free before it", poll_s=0.2)
    assert "injected fault" in str(failed.value)  # the actor's traceback text is kept
    answers_dir = next((cfg.run_dir / "eval").glob("interrupted-*/answers"))
    partial = len(read_answers(answers_dir))
    assert 0 < partial < len(keys)                          # blocks finished before the fault are kept

    resumed = run_eval(cfg, model_path=str(tiny_model_dir), tag="interrupted")
    assert resumed.answers_dir == answers_dir
    assert resumed.counts["skipped"] == partial
    assert resumed.counts["computed"] == len(keys) - partial
    assert_complete_once(answers_dir, keys)


def test_killed_actor_loses_and_duplicates_nothing(ray_session, synth_world, tiny_model_dir, tmp_path):
    world, _ = synth_world
    keys = expected_keys(world)
    cfg = eval_config(world, tmp_path, mode="generate")
    marker = tmp_path / "killed"
    result = run_eval(cfg, model_path=str(tiny_model_dir), tag="kill",
                      fault={"exit_after_call": 2, "marker": str(marker)})
    # an actor really died mid-run, after writing its second block and before returning it:
    # Ray restarted it and retried the block, whose file was replaced, not duplicated
    assert marker.exists()
    assert result.counts["computed"] == len(keys) and result.counts["errors"] == 0
    assert_complete_once(result.answers_dir, keys)
    answers = read_answers(result.answers_dir)
    assert set(answers["mode"]) == {"generate"} and answers["p_yes"].isna().all()


def test_two_pope_datasets_are_evaluated_and_reported_apart(ray_session, synth_world, tiny_model_dir, tmp_path):
    """COCO (JSON lines) and a GQA-style set (JSON arrays, own image root): per dataset and split, with versions."""
    from orchestrator.data import formats
    from orchestrator.eval import pope
    from tests.pope_datasets import write_gqa_like_pope, write_pope_copy

    world, _ = synth_world
    coco = write_pope_copy(world, tmp_path, "coco", images=2)
    gqa = write_gqa_like_pope(world, tmp_path, images=2)
    cfg = config_from_dict({"name": "two", "output_root": str(tmp_path / "runs"),
                            "data": {"pope": {"datasets": {"coco": coco, "gqa": gqa}}},
                            "eval": {"mode": "score", "batch_size": 16, "cpus_per_actor": 1}})
    result = run_eval(cfg, model_path=str(tiny_model_dir), benchmarks=("pope",), tag="two")
    expected = {}
    for name, entry in (("coco", coco), ("gqa", gqa)):
        for split, path in entry["questions"].items():
            expected[pope.qualified_split(name, split)] = formats.read_pope_questions(path, split, entry["image_root"])
    answers = read_answers(result.answers_dir)
    assert sorted(keys_of(answers)) == sorted(("pope", name, str(row["question_id"]))
                                              for name, rows in expected.items() for row in rows)
    assert set(answers["split"]) == {"random", "popular", "adversarial", "gqa/random", "gqa/adversarial"}
    assert (answers["error"] == "").all()
    gqa_images = answers[answers["split"].str.startswith("gqa/")]["images"].map(lambda images: images[0])
    assert gqa_images.str.startswith(gqa["image_root"]).all()

    table = result.pope_table
    assert list(zip(table["dataset"], table["split"])) == [
        ("coco", "random"), ("coco", "popular"), ("coco", "adversarial"), ("coco", "mean"),
        ("gqa", "random"), ("gqa", "adversarial"), ("gqa", "mean")]
    for record in table[table["split"] != "mean"].to_dict("records"):
        rows = expected[pope.qualified_split(record["dataset"], record["split"])]
        assert record["n"] == len(rows) and record["version"] == rows[0]["version"]
    assert table.set_index(["dataset", "split"]).loc[("gqa", "mean"), "f1"] == pytest.approx(
        pope.mean_f1(table, "gqa"))

    run = json.loads((result.answers_dir.parent / "run.json").read_text())
    assert run["versions"] == {f"pope/{name}": rows[0]["version"] for name, rows in sorted(expected.items())}
    metrics = pq.read_table(result.metrics_path).to_pandas()
    names = set(metrics[metrics["benchmark"] == "pope"]["name"])
    assert names == {"random", "popular", "adversarial", "mean", "gqa/random", "gqa/adversarial", "gqa/mean"}
    printed = format_pope_table(table)
    assert "POPE coco" in printed and "POPE gqa" in printed and expected["gqa/random"][0]["version"] in printed
    objectives = pope.objective_values(table)
    assert objectives["pope/adversarial/f1"] == table.set_index(["dataset", "split"]).loc[("coco", "adversarial"), "f1"]
    assert "pope/gqa/adversarial/f1" in objectives and "pope/gqa/mean_f1" in objectives
    assert set(objectives) == set(pope.objective_names({"coco": ["random", "popular", "adversarial"],
                                                        "gqa": ["random", "adversarial"]}))
