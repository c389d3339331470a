"""The report: its tables equal the parquet files, its PNGs are real and embedded, runs compare side by side.

The run directories are written here without training or inference: answers and metrics through
`orchestrator.eval.results` and the runner's own metric-row functions, curves through the trainer's
`CurveLog`, stage records shaped by `orchestrator.pipeline.evaluation_outputs`, as `run_pipeline` lays them
out (seeded DPO runs in sibling folders ``<name>-seed<N>``).
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.config import config_from_dict
from orchestrator.eval import milebench as mb
from orchestrator.eval import pope
from orchestrator.eval.results import (compute_run_id, milebench_metric_rows, pope_metric_rows, read_metrics,
                                       write_answers, write_metrics)
from orchestrator.eval.runner import EvalResult
from orchestrator.files import write_json_atomic
from orchestrator.layout import eval_dir, metrics_path
from orchestrator.pipeline import evaluation_outputs
from orchestrator.report import PUBLISHED_LABEL, build_report, load_run
from orchestrator.train.tracking import CurveLog

SPLITS = ("random", "popular", "adversarial")
N_PER_SPLIT = 24   # 12 yes-labelled, 12 no-labelled questions per split


# ----------------------------------------------------------------------------------------------
# A run directory as the pipeline leaves it


def _answer_row(run_id, adapter, benchmark, split, item_id, label, raw, **extra):
    row = {"run_id": run_id, "model": "/models/tiny", "adapter": adapter, "benchmark": benchmark, "split": split,
           "item_id": str(item_id), "images": [f"COCO_val2014_{item_id:012d}.jpg"], "question": "Is there a cat?",
           "label": label, "raw_answer": raw, "answer": pope.parse_yes_no(raw) if benchmark == "pope" else raw,
           "p_yes": 0.5, "error": "", "mode": "score", "decoding": "{}", "batch_size": 16, "version": "v1",
           "question_type": "yes-no", "choice_list": [], "image_quantity_level": "", "prompt_tokens": 10}
    if benchmark == "pope" and raw:
        row["p_yes"] = (0.55 + 0.4 * ((item_id * 7) % 10) / 10) if row["answer"] == "yes" else \
            (0.05 + 0.4 * ((item_id * 3) % 10) / 10)
    row.update(extra)
    return row


def _pope_answers(run_id, adapter, false_yes, false_no):
    """Answers whose errors are set per split: `false_yes[split]` no-questions answered yes, etc."""
    rows = []
    for s, split in enumerate(SPLITS):
        yes_seen = no_seen = 0
        for i in range(N_PER_SPLIT):
            item = 1000 * s + i
            if i % 2 == 0:
                raw = "No, there is not." if yes_seen < false_no[split] else "Yes, there is."
                yes_seen += 1
                rows.append(_answer_row(run_id, adapter, "pope", split, item, "yes", raw))
            else:
                raw = "Yes" if no_seen < false_yes[split] else "No"
                no_seen += 1
                rows.append(_answer_row(run_id, adapter, "pope", split, item, "no", raw))
    rows.append(_answer_row(run_id, adapter, "pope", "adversarial", 9999, "no", "", error="image could not be loaded"))
    return rows


GQA_SPLITS = ("random", "adversarial")


def _gqa_answers(run_id, adapter, false_yes):
    """A second POPE dataset's answers (split names "gqa/<split>"): `false_yes[split]` no-questions answered yes."""
    rows = []
    for s, split in enumerate(GQA_SPLITS):
        for i in range(12):
            label = "yes" if i % 2 == 0 else "no"
            raw = "Yes" if label == "yes" or i // 2 < false_yes[split] else "No"
            rows.append(_answer_row(run_id, adapter, "pope", f"gqa/{split}", 5000 + 100 * s + i, label, raw,
                                    version=f"sha256:gqa-{split}/n12"))
    return rows


def _milebench_answers(run_id, adapter, good):
    rows = []
    for k in range(6):
        level = "few" if k < 4 else "medium"
        rows.append(_answer_row(run_id, adapter, "milebench", "SynthObjectCount", 50 + k, "two",
                                "two" if k < good else "three", question_type="open-ended",
                                image_quantity_level=level))
        rows.append(_answer_row(run_id, adapter, "milebench", "SynthImageChoice", 60 + k, "Image 2",
                                "B" if k < good + 1 else "A", question_type="multi-choice",
                                choice_list=["Image 1", "Image 2", "Image 3"], image_quantity_level=level))
    return rows


def write_evaluation(run_dir: Path, tag: str, adapter: str, false_yes, false_no, mile_good: int,
                     mode: str = "score", gqa_false_yes: dict | None = None) -> EvalResult:
    """What `run_eval` leaves: run.json, answers, metrics.parquet; returns its EvalResult.
    `gqa_false_yes`: also answers of a second POPE dataset, "gqa"."""
    versions = {"pope/random": "v1"}
    if gqa_false_yes:
        versions.update({f"pope/gqa/{split}": f"sha256:gqa-{split}/n12" for split in GQA_SPLITS})
    run_id = compute_run_id("/models/tiny", adapter, mode, {"batch_size": 16}, versions, tag)
    answers = _pope_answers(run_id, adapter, false_yes, false_no) + _milebench_answers(run_id, adapter, mile_good)
    if gqa_false_yes:
        answers += _gqa_answers(run_id, adapter, gqa_false_yes)
    out = eval_dir(run_dir, run_id)
    write_json_atomic(out / "run.json", {"run_id": run_id, "model": "/models/tiny", "adapter": adapter,
                                         "mode": mode, "decoding": {"batch_size": 16, "mode": mode},
                                         "versions": versions, "tag": tag})
    write_answers(answers[:40], out / "answers", name="a")
    write_answers(answers[40:], out / "answers", name="b")
    frame = pd.DataFrame(answers)
    pope_table = pope.summarise(frame[frame["benchmark"] == "pope"])
    mile_table = mb.summarise(mb.score_answers(frame[frame["benchmark"] == "milebench"]))
    counts = {"items": len(answers), "answered": len(answers), "computed": len(answers), "skipped": 0,
              "rejected": 1, "errors": 1,
              "unparsable": int(pope_table.loc[pope_table["split"] == "mean", "n_unparsable"].sum())}
    rows = pope_metric_rows(run_id, pope_table) + milebench_metric_rows(run_id, mile_table)
    rows += [{"run_id": run_id, "benchmark": "all", "scope": "counts", "name": k, "metric": k, "value": float(v),
              "n": int(v)} for k, v in counts.items()]
    write_metrics(rows, metrics_path(run_dir, run_id))
    return EvalResult(run_id=run_id, eval_dir=out, answers_dir=out / "answers",
                      metrics_path=metrics_path(run_dir, run_id), pope_table=pope_table, milebench_table=mile_table,
                      counts=counts)


def write_stage(run_dir: Path, name: str, outputs: dict, seconds: float = 1.5) -> None:
    path = run_dir / "stages" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"inputs": f"hash-{name}", "outputs": outputs, "seconds": seconds}, indent=2,
                               default=str))


def write_curves(path: Path, kind: str, steps: int, shift: float) -> None:
    log = CurveLog(path)
    for step in range(1, steps + 1):
        row = {"step": step, "loss": 0.69 * math.exp(-step / (8 + shift)), "lr": 1e-4, "epoch": step / steps,
               "samples_per_s": 3.0, "time": 1000.0 + step}
        if kind == "dpo":
            margin = 0.05 * step * (1 + shift / 10)
            row.update({"rewards/chosen": margin / 2, "rewards/rejected": -margin / 2, "rewards/margins": margin,
                        "rewards/accuracies": min(1.0, 0.4 + 0.06 * step), "logps/chosen": -20.0,
                        "logps/rejected": -22.0, "grad_norm": 0.5})
        log.append(row)


def make_run(root: Path, name: str = "demo", seeds: tuple[int, ...] = (1, 2), beta: float = 0.1,
             improvement: int = 2, trials: bool = True, gqa: bool = False) -> Path:
    """A run directory (`root/name`) as `run_pipeline(config, dpo_seeds=seeds)` writes it, with curves and a sweep
    (`gqa`: evaluated on a second POPE dataset too)."""
    cfg = config_from_dict({"name": name, "output_root": str(root), "train": {"beta": beta},
                            "tune": {"search_space": {"train.beta": {"kind": "grid", "values": [0.1, 0.5]}}}})
    run_dir = cfg.run_dir
    base_fy = {"random": 3, "popular": 5, "adversarial": 8}
    base_fn = {"random": 1, "popular": 1, "adversarial": 2}
    gqa_fy = {"random": 4, "adversarial": 6}
    baseline = write_evaluation(run_dir, "baseline", "", base_fy, base_fn, mile_good=2,
                                gqa_false_yes=gqa_fy if gqa else None)
    write_stage(run_dir, "data", {"pope": {"total": 72, "usable": 72, "rejected": 0}})
    write_curves(run_dir / "train" / "sft_curves.parquet", "sft", 12, 0.0)
    write_stage(run_dir, "warmup", {"model": str(run_dir / "train" / "sft" / "final"),
                                    "curves": str(run_dir / "train" / "sft_curves.parquet")})
    write_stage(run_dir, "eval_baseline", evaluation_outputs(baseline))
    stages = {"eval_baseline": evaluation_outputs(baseline)}
    for k, seed in enumerate(seeds or (None,)):
        seed_dir = run_dir if seed is None else root / f"{name}-seed{seed}"
        suffix = "" if seed is None else f"_seed{seed}"
        curves = seed_dir / "train" / "dpo_curves.parquet"
        write_curves(curves, "dpo", 10 + k, float(k))
        adapter = str(seed_dir / "train" / f"{seed_dir.name}-dpo" / "final")
        write_stage(run_dir, f"dpo{suffix}", {"adapter": adapter, "curves": str(curves), "metrics": {"loss": 0.4}})
        fy = {split: max(0, v - improvement - k) for split, v in base_fy.items()}
        fn = {split: v + (k % 2) for split, v in base_fn.items()}
        after = write_evaluation(seed_dir, "hadpo", adapter, fy, fn, mile_good=3 + k,
                                 gqa_false_yes={split: v - 2 - k for split, v in gqa_fy.items()} if gqa else None)
        write_stage(run_dir, f"eval_hadpo{suffix}", evaluation_outputs(after))
        stages[f"eval_hadpo{suffix}"] = evaluation_outputs(after)
    if trials:
        table = pd.DataFrame({
            "trial": [f"t{i}" for i in range(5)], "error": [""] * 5,
            "param/train.beta": [0.05, 0.1, 0.2, 0.5, 1.0],
            "param/train.learning_rate": [1e-6, 2e-6, 5e-5, 1e-5, 2e-4],
            "pope/adversarial/f1": [0.70, 0.74, 0.79, 0.72, math.nan],
            "pope/mean_f1": [0.75, 0.77, 0.81, 0.76, math.nan],
            "loss": [0.5, 0.45, 0.40, 0.48, 0.69], "stopped_early": [False, False, False, False, True]})
        (run_dir / "tune").mkdir(parents=True, exist_ok=True)
        table.to_parquet(run_dir / "tune" / "trials.parquet", index=False)
    record = {"name": name, "created": "2026-01-01T00:00:00+0000", "config": cfg.model_dump(mode="json"),
              "config_hash": cfg.content_hash(), "packages": {"torch": "2.13.0", "ray": "2.60.0"},
              "git_sha": "0123456789abcdef0123456789abcdef01234567",
              "data_files": {"pope_random": "ab" * 32, "hadpo_desc": "cd" * 32},
              "decoding": {"mode": "score", "max_new_tokens": 128, "batch_size": 16, "answer_suffix": "",
                           "template": "llava_v1", "greedy": True},
              "hardware": {"platform": "Linux", "python": "3.11.7", "cpus": 2, "cuda": False},
              "base_model": str(run_dir / "train" / "sft" / "final"), "stages": stages}
    (run_dir / "run_record.json").write_text(json.dumps(record, indent=2, default=str))
    return run_dir


def hadpo_metric_paths(run_dir: Path) -> dict[str, Path]:
    """stage name -> metrics parquet, as the stage records say."""
    out = {}
    for path in sorted((run_dir / "stages").glob("eval_*.json")):
        out[path.stem] = Path(json.loads(path.read_text())["outputs"]["metrics_path"])
    return out


def pope_values(path: Path) -> pd.DataFrame:
    """split x metric from a metrics parquet, read with plain pandas (the test's own reading)."""
    frame = read_metrics(path)
    frame = frame[frame["benchmark"] == "pope"]
    return frame.pivot(index="name", columns="metric", values="value")


def md_rows(markdown: str) -> list[list[str]]:
    rows = []
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip()[2:-2].split(" | ")])
    return rows


def find_row(rows, *prefix):
    found = [row for row in rows if row[:len(prefix)] == list(prefix)]
    assert found, f"no table row starting with {prefix}"
    return found[0]


METRIC_ORDER = ("accuracy", "precision", "recall", "f1", "yes_ratio")


# ----------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def seeded_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    run_dir = make_run(root, "demo", seeds=(1, 2))
    result = build_report([run_dir], root / "report")
    return run_dir, result


def test_pope_table_before_rows_equal_the_baseline_parquet(seeded_report):
    run_dir, result = seeded_report
    rows = md_rows(result.markdown.read_text())
    baseline = pope_values(hadpo_metric_paths(run_dir)["eval_baseline"])
    for split in SPLITS + ("mean",):
        row = find_row(rows, "tiny LLaVA (built-in)", split, "✗")
        expected = [f"{100 * baseline.loc[split, m]:.2f}" for m in METRIC_ORDER]
        assert row[3:8] == expected
        assert row[8] == f"{100 * baseline.loc['mean', 'f1']:.2f}"
    # the tidy table behind it holds the parquet's values exactly
    tidy = result.tables["pope"]
    before = tidy[tidy["role"] == "before"].set_index("split")
    for split in SPLITS:
        for metric in METRIC_ORDER:
            assert before.loc[split, metric] == baseline.loc[split, metric]


def test_pope_table_after_rows_are_mean_and_std_over_seeds_with_spread(seeded_report):
    run_dir, result = seeded_report
    rows = md_rows(result.markdown.read_text())
    paths = hadpo_metric_paths(run_dir)
    assert set(paths) == {"eval_baseline", "eval_hadpo_seed1", "eval_hadpo_seed2"}
    seeds = [pope_values(paths["eval_hadpo_seed1"]), pope_values(paths["eval_hadpo_seed2"])]
    baseline = pope_values(paths["eval_baseline"])
    for split in SPLITS:
        row = find_row(rows, "tiny LLaVA (built-in) (mean ± std, 2 seeds)", split, "✓")
        for cell, metric in zip(row[3:8], METRIC_ORDER):
            values = pd.Series([s.loc[split, metric] for s in seeds])
            assert cell == f"{100 * values.mean():.2f} ± {100 * values.std():.2f}"
        delta = find_row(rows, "tiny LLaVA (built-in)", split, "Δ (✓ − ✗)")
        for cell, metric in zip(delta[3:8], METRIC_ORDER):
            mean_after = (seeds[0].loc[split, metric] + seeds[1].loc[split, metric]) / 2
            assert cell == f"{100 * (mean_after - baseline.loc[split, metric]):+.2f}"
        spread = find_row(rows, "tiny LLaVA (built-in)", split, "✓ spread (max − min), 2 seeds")
        f1s = [s.loc[split, "f1"] for s in seeds]
        assert spread[6] == f"{100 * (max(f1s) - min(f1s)):.2f}"
    # the per-seed table lists each seed's F1
    md = result.markdown.read_text()
    for name, values in (("eval_hadpo_seed1", seeds[0]), ("eval_hadpo_seed2", seeds[1])):
        row = find_row(rows, name)
        assert row[2:5] == [f"{100 * values.loc[s, 'f1']:.2f}" for s in SPLITS]
    assert "Spread over DPO seeds" in md


def test_single_seed_run_shows_plain_after_values(tmp_path):
    run_dir = make_run(tmp_path, "single", seeds=(), trials=False)
    result = build_report([run_dir], tmp_path / "out", include_published=False)
    rows = md_rows(result.markdown.read_text())
    after = pope_values(hadpo_metric_paths(run_dir)["eval_hadpo"])
    for split in SPLITS:
        row = find_row(rows, "tiny LLaVA (built-in)", split, "✓")
        assert row[3:8] == [f"{100 * after.loc[split, m]:.2f}" for m in METRIC_ORDER]
    assert not any("spread" in " ".join(row) for row in rows)
    assert PUBLISHED_LABEL not in result.markdown.read_text()
    assert PUBLISHED_LABEL not in result.html.read_text()


def md_section(markdown: str, heading: str) -> str:
    """The markdown from `heading` to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    start = markdown.index(heading + "\n")
    rest = markdown[start + len(heading):]
    ends = [m.start() for m in re.finditer(r"^#{1,%d} " % len(level), rest, flags=re.MULTILINE)]
    return markdown[start:start + len(heading) + (ends[0] if ends else len(rest))]


def test_each_pope_dataset_gets_its_own_table_figure_and_versions(tmp_path):
    run_dir = make_run(tmp_path, "two", seeds=(1, 2), trials=False, gqa=True)
    result = build_report([run_dir], tmp_path / "out")
    markdown = result.markdown.read_text()
    coco = md_section(markdown, "### POPE coco before / after HA-DPO")
    gqa = md_section(markdown, "### POPE gqa before / after HA-DPO")
    paths = hadpo_metric_paths(run_dir)
    baseline = pope_values(paths["eval_baseline"])
    seeds = [pope_values(paths["eval_hadpo_seed1"]), pope_values(paths["eval_hadpo_seed2"])]
    gqa_rows = md_rows(gqa)
    for split in GQA_SPLITS + ("mean",):
        name = f"gqa/{split}"
        before = find_row(gqa_rows, "tiny LLaVA (built-in)", split, "✗")
        assert before[3:8] == [f"{100 * baseline.loc[name, m]:.2f}" for m in METRIC_ORDER]
        after = find_row(gqa_rows, "tiny LLaVA (built-in) (mean ± std, 2 seeds)", split, "✓")
        values = pd.Series([s.loc[name, "f1"] for s in seeds])
        assert after[6] == f"{100 * values.mean():.2f} ± {100 * values.std():.2f}"
    assert not any(row[1] == "popular" for row in gqa_rows)          # GQA has only its own splits
    assert find_row(md_rows(coco), "tiny LLaVA (built-in)", "popular", "✗")[3:8] == \
        [f"{100 * baseline.loc['popular', m]:.2f}" for m in METRIC_ORDER]
    # published HA-DPO numbers are COCO's: beside COCO only
    assert PUBLISHED_LABEL in coco and PUBLISHED_LABEL not in gqa
    assert "random sha256:gqa-random/n12" in gqa and "adversarial sha256:gqa-adversarial/n12" in gqa
    assert "random v1" in coco
    assert "#### Spread over DPO seeds (POPE coco)" in coco and "#### Spread over DPO seeds (POPE gqa)" in gqa
    assert {"pope_bars.png", "pope_bars_gqa.png"} <= {p.name for p in result.images}
    tidy = result.tables["pope"]
    assert set(zip(tidy["dataset"], tidy["split"])) == {
        ("coco", s) for s in SPLITS + ("mean",)} | {("gqa", s) for s in GQA_SPLITS + ("mean",)}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_pngs_exist_are_valid_and_embedded_in_the_html(seeded_report):
    run_dir, result = seeded_report
    names = {p.name for p in result.images}
    assert {"pope_bars.png", "curves_dpo.png", "curves_warmup.png", "sweep.png", "sweep_parallel.png",
            "milebench.png"} <= names
    html = result.html.read_text()
    assert 'src="data:image/png;base64,' in html
    for path in result.images:
        assert path.is_file() and path.parent == result.html.parent
        width, height = png_size(path)
        assert 500 <= width <= 3000 and 250 <= height <= 2000, (path.name, width, height)
        assert 10_000 < path.stat().st_size < 2_000_000
        assert base64.b64encode(path.read_bytes()).decode() in html, f"{path.name} not embedded"
        assert f"]({path.name})" in result.markdown.read_text()
    assert "src=\"http" not in html and "<link" not in html     # nothing to fetch: one self-contained file


def test_published_rows_are_labelled_not_ours(seeded_report):
    _, result = seeded_report
    rows = md_rows(result.markdown.read_text())
    label = f"LLaVA-1.5-7B, {PUBLISHED_LABEL}"
    assert PUBLISHED_LABEL == "published (HA-DPO README), not ours"
    assert find_row(rows, label, "random", "✗")[3:8] == ["89.60", "88.77", "90.66", "89.70", "51.06"]
    assert find_row(rows, label, "random", "✓")[3:8] == ["90.53", "92.99", "87.66", "90.25", "47.13"]
    popular = find_row(rows, label, "popular", "✓")
    assert popular[3:8] == ["87.90", "", "", "87.81", "49.76"]        # the README gives no precision / recall
    assert find_row(rows, label, "adversarial", "✗")[3:8] == ["79.76", "", "", "81.75", "60.90"]
    assert find_row(rows, label, "adversarial", "Δ (✓ − ✗)")[6] == "+0.79"
    html = result.html.read_text()
    assert html.count(f"<td>LLaVA-1.5-7B, {PUBLISHED_LABEL}</td>") == 9
    assert 'class="published"' in html


def test_curves_sweep_milebench_and_run_record_are_reported(seeded_report):
    run_dir, result = seeded_report
    md = result.markdown.read_text()
    rows = md_rows(md)
    # the last logged step of each curves file
    for stage, path in (("dpo_seed1", run_dir.parent / "demo-seed1" / "train" / "dpo_curves.parquet"),
                        ("warmup", run_dir / "train" / "sft_curves.parquet")):
        last = pd.read_parquet(path).iloc[-1]
        row = find_row(rows, stage)
        assert row[1] == ("1" if stage == "dpo_seed1" else "") and row[2] == str(path)
        assert row[4] == str(int(last["step"]))
        assert row[5] == f"{last['loss']:.4f}"
        if stage.startswith("dpo"):
            assert row[6] == f"{last['rewards/margins']:.4f}" and row[7] == f"{last['rewards/accuracies']:.4f}"
    # sweep: best trial first, objective in %
    trials = pd.read_parquet(run_dir / "tune" / "trials.parquet")
    best = trials.loc[trials["pope/adversarial/f1"].idxmax()]
    sweep_rows = [row for row in rows if re.fullmatch(r"t\d", row[0])]
    assert sweep_rows[0][0] == best["trial"] and sweep_rows[0][3] == f"{100 * best['pope/adversarial/f1']:.2f}"
    assert sweep_rows[-1][-2] == "yes"       # the stopped-early trial comes last
    # MileBench: per task, before from the baseline parquet
    baseline = read_metrics(hadpo_metric_paths(run_dir)["eval_baseline"])
    task = baseline[(baseline["benchmark"] == "milebench") & (baseline["scope"] == "task")
                    & (baseline["metric"] != "n_errors")].iloc[0]
    assert find_row(rows, "task", task["name"], task["metric"])[3] == f"{100 * task['value']:.2f}"
    assert find_row(rows, "level", "few", "score")
    # run record
    for text in ("0123456789abcdef0123456789abcdef01234567", "ab" * 32, "2.60.0", "llava_v1", "config (YAML)",
                 "beta: 0.1"):
        assert text in md
    assert find_row(rows, "cuda") == ["cuda", "False"]


def test_two_runs_side_by_side_one_column_group_per_run(tmp_path):
    low = make_run(tmp_path / "a", "beta0.1", seeds=(), beta=0.1, improvement=1, trials=False)
    high = make_run(tmp_path / "b", "beta0.5", seeds=(1, 2), beta=0.5, improvement=3, trials=False)
    result = build_report([low, high], tmp_path / "compare", labels=["beta 0.1", "beta 0.5"])
    md = result.markdown.read_text()
    rows = md_rows(md)
    header = find_row(rows, "split", "metric")
    assert header == ["split", "metric", "beta 0.1 ✗", "beta 0.1 ✓", "beta 0.1 Δ", "beta 0.5 ✗", "beta 0.5 ✓",
                      "beta 0.5 Δ"]
    low_after = pope_values(hadpo_metric_paths(low)["eval_hadpo"])
    high_paths = hadpo_metric_paths(high)
    high_after = [pope_values(high_paths[k]) for k in ("eval_hadpo_seed1", "eval_hadpo_seed2")]
    high_before = pope_values(high_paths["eval_baseline"])
    for split in SPLITS + ("mean",):
        row = find_row(rows, split, "F1")
        assert row[3] == f"{100 * low_after.loc[split, 'f1']:.2f}"
        values = pd.Series([h.loc[split, "f1"] for h in high_after])
        assert row[6] == f"{100 * values.mean():.2f} ± {100 * values.std():.2f}"
        assert row[7] == f"{100 * (values.mean() - high_before.loc[split, 'f1']):+.2f}"
    diff = find_row(rows, "train.beta")
    assert diff == ["train.beta", "0.1000", "0.5000"]
    compare = result.tables["comparison"]
    assert compare.set_index(["split", "metric"]).loc[("adversarial", "f1"), "beta 0.1/after"] == \
        low_after.loc["adversarial", "f1"]
    names = {p.name for p in result.images}
    assert {"beta-0.1_pope_bars.png", "beta-0.5_pope_bars.png", "compare_pope_f1.png"} <= names
    assert "Run beta 0.1" in md and "Run beta 0.5" in md


def test_evaluations_without_stage_records_are_found_by_their_adapter(tmp_path):
    run_dir = tmp_path / "adhoc"
    base = write_evaluation(run_dir, "", "", {"random": 4, "popular": 4, "adversarial": 4},
                            {"random": 0, "popular": 0, "adversarial": 0}, 2)
    after = write_evaluation(run_dir, "", "/adapters/x", {"random": 1, "popular": 1, "adversarial": 2},
                             {"random": 1, "popular": 1, "adversarial": 1}, 3)
    run = load_run(run_dir)
    assert [(e.role, e.run_id) for e in run.evaluations] == [("before", base.run_id), ("after", after.run_id)]
    result = build_report([run_dir], tmp_path / "out")
    rows = md_rows(result.markdown.read_text())
    expected = pope_values(after.metrics_path)
    assert find_row(rows, "tiny", "random", "✓")[3:8] == [f"{100 * expected.loc['random', m]:.2f}"
                                                           for m in METRIC_ORDER]


def test_metrics_are_scored_from_answers_when_the_parquet_is_missing(tmp_path):
    run_dir = make_run(tmp_path, "nometrics", seeds=(), trials=False)
    path = hadpo_metric_paths(run_dir)["eval_hadpo"]
    expected = pope_values(path)
    path.unlink()
    run = load_run(run_dir)
    assert any("scored from the answers" in note for note in run.notes)
    result = build_report([run_dir], tmp_path / "out")
    rows = md_rows(result.markdown.read_text())
    assert find_row(rows, "tiny LLaVA (built-in)", "adversarial", "✓")[3:8] == \
        [f"{100 * expected.loc['adversarial', m]:.2f}" for m in METRIC_ORDER]


def test_bad_arguments_are_refused_with_the_reason(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        build_report([tmp_path / "missing"], tmp_path / "out")
    run_dir = make_run(tmp_path, "x", seeds=(), trials=False)
    with pytest.raises(ValueError, match="1 labels for 2 run directories"):
        build_report([run_dir, run_dir], tmp_path / "out", labels=["a"])
    with pytest.raises(ValueError, match="at least one"):
        build_report([], tmp_path / "out")


def test_score_and_generate_evaluations_of_one_model_show_their_disagreement(tmp_path):
    from orchestrator.report import score_generate_disagreement

    run_dir = tmp_path / "modes"
    none = {"random": 0, "popular": 0, "adversarial": 0}
    scored = write_evaluation(run_dir, "s", "", {"random": 2, "popular": 3, "adversarial": 4}, none, 2)
    generated = write_evaluation(run_dir, "g", "", {"random": 1, "popular": 3, "adversarial": 6},
                                 {"random": 2, "popular": 0, "adversarial": 0}, 2, mode="generate")
    write_evaluation(run_dir, "a", "/adapters/x", none, none, 2)      # another model: score mode only
    frame = score_generate_disagreement(load_run(run_dir))
    # differing answers: random 1 no-question + 2 yes-questions, popular 0, adversarial 2; the error row of
    # each evaluation is left out: 3 x 24 questions in common
    assert frame[["score_run_id", "generate_run_id", "n", "n_different"]].values.tolist() == \
        [[scored.run_id, generated.run_id, 72, 5]]
    assert frame["share_different"].iloc[0] == pytest.approx(5 / 72)
    result = build_report([run_dir], tmp_path / "out")
    assert "Score mode vs generate mode" in result.markdown.read_text()
    assert find_row(md_rows(result.markdown.read_text()), "tiny", "", scored.run_id)[4:] == ["72", "5", "6.94"]
    assert len(result.tables["score_vs_generate"]) == 1


def test_the_report_says_how_to_open_each_trackers_files(tmp_path):
    from orchestrator.train.tracking import Tracker

    run_dir = make_run(tmp_path, "tracked", seeds=(), trials=False)
    cfg = config_from_dict({"name": "tracked", "output_root": str(tmp_path), "tracking": ["tensorboard", "mlflow"]})
    tracker = Tracker(cfg, "dpo")
    tracker.log(1, {"loss": 0.5})
    tracker.close()
    result = build_report([run_dir], tmp_path / "report")
    md = result.markdown.read_text()
    assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in md
    assert f"MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {run_dir / 'mlruns'}" in md
    assert "wandb sync" not in md  # no wandb folder, no line
