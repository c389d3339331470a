"""The `hadpo` command line, run as a user would (a subprocess joining the suite's Ray where Ray is involved)."""

import json

import pytest

from orchestrator.cli import main
from tests.commands import hadpo


def test_data_synth_writes_the_world(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "w"), "--num-images", "10",
                 "--num-pope-images", "6"]) == 0
    assert "synthetic world written to" in capsys.readouterr().out
    for name in ["VG/image_data.json", "hadpo/desc_data.json", "hadpo/pope_data.json", "sft/sft_data.json",
                 "pope/coco_pope_random.json", "pope/coco_pope_popular.json", "pope/coco_pope_adversarial.json"]:
        assert (tmp_path / "w" / name).is_file(), name


def test_invalid_config_exits_2_with_the_key_path(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  beta: -1\n")
    assert main(["data", "check", str(path)]) == 2
    assert "train.beta: Input should be greater than 0" in capsys.readouterr().err


@pytest.mark.slow
def test_data_check_prints_counts_rejects_and_a_sample(ray_session, tmp_path):
    world = tmp_path / "world"
    assert main(["data", "synth", "--out", str(world), "--num-images", "12", "--num-pope-images", "6"]) == 0
    image_data = json.loads((world / "VG/image_data.json").read_text())
    victim = image_data[0]["url"].split("/")
    (world / "VG" / victim[-2] / victim[-1]).unlink()
    config = tmp_path / "c.yaml"
    config.write_text(f"name: check\noutput_root: {tmp_path / 'runs'}\ndata:\n  synthetic_dir: {world}\n")
    result = hadpo("data", "check", str(config), ray_address=ray_session.get_runtime_context().gcs_address)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "preference:" in out and "rejected (" in out and "file not found" in out
    assert "pope:" in out and "sample row:" in out and "milebench:" in out
    assert (tmp_path / "runs/check/data/rejects-preference.parquet").is_file()


@pytest.mark.slow
def test_data_check_reports_a_malformed_file_and_fails(ray_session, tmp_path):
    world = tmp_path / "world"
    assert main(["data", "synth", "--out", str(world), "--num-images", "12", "--num-pope-images", "6"]) == 0
    (world / "hadpo/desc_data.json").write_text("{not json")
    config = tmp_path / "c.yaml"
    config.write_text(f"name: check\noutput_root: {tmp_path / 'runs'}\ndata:\n  synthetic_dir: {world}\n")
    result = hadpo("data", "check", str(config), ray_address=ray_session.get_runtime_context().gcs_address)
    assert result.returncode == 1
    assert "preference: ERROR" in result.stdout and "desc_data.json" in result.stdout
    assert "pope:" in result.stdout  # the other datasets are still checked


def test_demo_table_shows_each_pope_dataset_and_judges_each_adversarial_split(tmp_path):
    from orchestrator.cli import demo_table
    from orchestrator.report import load_run, pope_results
    from tests.test_report import make_run

    single, passed_single = demo_table(make_run(tmp_path, "one", seeds=(1, 2), trials=False, improvement=5))
    assert "gqa" not in single and single.count("Adversarial: F1") == 1 and passed_single
    weak, passed_weak = demo_table(make_run(tmp_path, "weak", seeds=(1, 2), trials=False, improvement=2))
    assert not passed_weak and "(1.7x the seed spread 2.20)" in weak and "NOT 2x beyond the seed spread." in weak
    run_dir = make_run(tmp_path, "two", seeds=(1, 2), trials=False, gqa=True)
    table, passed = demo_table(run_dir)
    lines = table.splitlines()
    assert any(line.split()[2:4] == ["gqa/adversarial", "x"] for line in lines)
    assert any(line.split()[2:4] == ["adversarial", "v"] for line in lines)
    results = pope_results([load_run(run_dir)])
    gqa = results[(results["dataset"] == "gqa") & (results["split"] == "adversarial")]
    gain = 100 * (gqa[gqa["role"] == "after"]["f1"].mean() - gqa[gqa["role"] == "before"]["f1"].mean())
    assert f"gqa adversarial: F1 {gain:+.2f} pp" in table and "coco adversarial: F1" in table
    assert passed == all("HA-DPO's effect is at least 2x the seed spread." in line
                         for line in lines if "adversarial: F1" in line)


def test_the_demo_verdict_says_the_effect_in_seed_spreads_and_asks_for_twice_the_spread():
    from orchestrator.cli import times_spread

    assert times_spread(5.1, 1.2) == "4.2x the seed spread 1.20"
    assert times_spread(-1.0, 2.0) == "-0.5x the seed spread 2.00"
    assert times_spread(3.0, 0.0) == "any multiple of the seed spread 0.00"
