"""`hadpo`: the command line, a thin door into the same functions the jobs and tests call.

Every command runs inside one error boundary (`orchestrator.boundary`): a known failure prints one
line and exits 1 (a config error 2); SIGTERM / SIGINT stop the Ray work, say what was kept, exit 143 / 130.

Each command imports the modules of its stage when it runs, so that `hadpo --help`, a wrong flag or a bad
config answers without loading pandas, Ray or torch.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from pathlib import Path
from typing import NoReturn

from orchestrator import console
from orchestrator.boundary import run_command, watch_run_dir
from orchestrator.config import ConfigError, ExperimentConfig, apply_override, config_from_dict, load_config
from orchestrator.data.schema import POPE_DEFAULT_DATASET, POPE_SPLITS
from orchestrator.plan import main_plan, with_gpu_memory

log = logging.getLogger("hadpo")


def _config(args, log_file: bool = True) -> ExperimentConfig:
    """The command's config; its run folder gets the command's log file (`log_file`: a command that does
    work there; `plan` and `export` only read the config)."""
    if getattr(args, "config", None):
        config = load_config(args.config, args.set)
    else:
        raw: dict = {}
        for override in args.set:
            apply_override(raw, override)
        config = config_from_dict(raw, "<defaults>")
    watch_run_dir(config.run_dir)
    if log_file:
        console.log_to_run_dir(config.run_dir)
    return config


def cmd_data_synth(args) -> int:
    from orchestrator.data.synthetic import SynthConfig, generate_world

    cfg = SynthConfig(seed=args.seed, num_images=args.num_images, num_pope_images=args.num_pope_images,
                      image_size=args.image_size)
    manifest = generate_world(Path(args.out), cfg)
    print(f"synthetic world written to {Path(args.out).resolve()}")
    counts = getattr(manifest, "counts", None) or (manifest.get("counts") if isinstance(manifest, dict) else None)
    if counts:
        for key, value in counts.items():
            print(f"  {key}: {value}")
    return 0


def cmd_data_check(args) -> int:
    from orchestrator.data import datasets
    from orchestrator.ray_session import init_ray

    config = _config(args)
    init_ray(config)
    paths = datasets.resolve_data_paths(config)
    print(f"data: {'synthetic world at ' + str(config.world_dir) if paths.synthetic else 'files from the config'}")
    builders = [("preference", datasets.preference_dataset,
                 config.data.preference or paths.hadpo_desc or paths.hadpo_pope),
                ("sft", datasets.sft_dataset, paths.sft),
                ("pope", datasets.pope_dataset, paths.pope),
                ("milebench", datasets.milebench_dataset, paths.milebench_root)]
    failed = 0
    for name, build, present in builders:
        if not present:
            print(f"{name}: not configured")
            continue
        try:
            checked = build(config)
        except (ValueError, OSError) as error:  # DataFormatError is a ValueError: say it, carry on
            print(f"{name}: ERROR {error}")
            failed += 1
            continue
        print(checked.summary())
        for line in checked.sources:
            print(line)
        sample = checked.dataset.take(1)
        if sample:
            shown = {k: (v if not isinstance(v, str) or len(v) < 100 else v[:97] + "...") for k, v in sample[0].items()}
            print(f"  sample row: {shown}")
        for reject in checked.rejects[:3]:
            print(f"  reject: {reject.get('sample_id', reject.get('question_id'))}: {reject['error']}")
    return 1 if failed else 0


def cmd_train(args) -> int:
    from orchestrator.train.trainer import run_training

    config = _config(args)
    result = run_training(config, stage=args.stage, base_model=args.base_model)
    print(f"{args.stage} finished: checkpoint {result.checkpoint_path}")
    return 0


def cmd_eval(args) -> int:
    from orchestrator.eval.runner import format_pope_table, run_eval

    from orchestrator.eval.completeness import describe

    config = _config(args)
    result = run_eval(config, model_path=args.model, adapter=args.adapter, retry_errors=args.retry_errors,
                      allow_partial=args.allow_partial)
    if result.pope_table is not None:
        print(format_pope_table(result.pope_table))
    if not result.complete:
        print(f"INCOMPLETE: {describe(result.coverage)}")
    print(f"answers: {result.answers_dir}\nmetrics: {result.metrics_path}")
    return 0


def cmd_run(args) -> int:
    from orchestrator.pipeline import run_pipeline

    config = _config(args)
    result = run_pipeline(config, dpo_seeds=args.seeds)
    print(f"stages run: {', '.join(result.ran) or 'none'}; up to date: {', '.join(result.skipped) or 'none'}")
    print(f"run record: {result.run_record}")
    return 0


def cmd_tune(args) -> int:
    from orchestrator.tune import format_trials, run_tune

    config = _config(args)
    result = run_tune(config, base_model=args.base_model)
    print(format_trials(result, config.tune.metric))
    print(f"trials: {result.results_path}")
    return 0


def cmd_report(args) -> int:
    from orchestrator.report import build_report

    result = build_report([Path(run) for run in args.runs], Path(args.out), include_published=not args.no_published,
                          labels=args.label or None, allow_partial=args.allow_partial)
    print(result.summary())
    return 0


def cmd_export(args) -> int:
    from orchestrator.export import export_model, is_run_dir

    if args.private and not args.push_to_hub:
        raise ConfigError("export: --private needs --push-to-hub")
    source = Path(args.source).expanduser()
    if not args.config and is_run_dir(source) and (source / "config.yaml").is_file():
        args.config = str(source / "config.yaml")  # the run's own config (env, export sections)
    result = export_model(args.source, args.out, _config(args, log_file=False), merge=args.merge,
                          push_to_hub=args.push_to_hub, private=args.private, stage=args.stage,
                          base_model=args.base_model, base_model_id=args.base_model_id)
    print(result.summary())
    return 0


def cmd_convert(args) -> int:
    from orchestrator.model.convert import convert_llava_adapter, convert_llava_checkpoint

    if args.convert_command == "llava":
        out = convert_llava_checkpoint(args.checkpoint, args.out, vision_tower=args.vision_tower, dtype=args.dtype,
                                       max_shard_size=args.max_shard_size, tokenizer=args.tokenizer)
    else:
        out = convert_llava_adapter(args.adapter, args.out, base_model=args.base)
    print(f"converted: {out}")
    return 0


def local_gpu_memory_gib() -> float | None:
    """GiB of this machine's first GPU, or None without one (the planner then uses the config's figure)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / 2**30
    except Exception:  # no usable CUDA here: plan without it
        pass
    return None


def cmd_plan(args) -> int:
    return main_plan(with_gpu_memory(_config(args, log_file=False), local_gpu_memory_gib()), seq_len=args.seq_len)


DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


DEMO_SEEDS = [1, 2, 3]
DEMO_EFFECT_OVER_SPREAD = 2.0  # the verdict's bar: HA-DPO's effect at least this many seed spreads


def times_spread(effect: float, spread: float) -> str:
    """An effect in seed spreads, as the verdict says it: "4.3x the seed spread 1.20"."""
    ratio = f"{effect / spread:.1f}x" if spread > 0 else "any multiple of"
    return f"{ratio} the seed spread {spread:.2f}"


def demo_table(run_dir: Path) -> tuple[str, bool]:
    """The seed's POPE table (HA-DPO x = baseline, v = mean over DPO seeds +- std) and the verdict.

    HA-DPO passes when it lowers the adversarial yes-ratio and raises adversarial F1, each by at least
    `DEMO_EFFECT_OVER_SPREAD` times the spread (max - min) of the DPO seeds, on every POPE dataset
    evaluated (another dataset than COCO shows its splits as <dataset>/<split>).
    """
    from orchestrator.eval.pope import METRIC_COLUMNS, qualified_split
    from orchestrator.report import load_run, pope_datasets, pope_results, pope_summary

    results = pope_results([load_run(run_dir)])
    summary = pope_summary(results).set_index(["role", "dataset", "split"])
    datasets = pope_datasets(results)
    width = max([12] + [len(qualified_split(dataset, split)) for dataset in datasets for split in POPE_SPLITS])
    lines = [f"{'model':<12} {'split':<{width}} {'HA-DPO':<6} {'accuracy':>14} {'precision':>14} {'recall':>14} "
             f"{'F1':>14} {'yes-ratio':>14}"]
    lines.append("-" * len(lines[0]))
    for dataset in datasets:
        for split in [*POPE_SPLITS, "mean"]:
            for role, mark in (("before", "x"), ("after", "v")):
                if (role, dataset, split) not in summary.index:
                    continue
                row = summary.loc[(role, dataset, split)]
                cells = []
                for metric in METRIC_COLUMNS:
                    spread = f" ±{100 * row[f'{metric}_std']:.2f}" if row["evaluations"] > 1 else ""
                    cells.append(f"{100 * row[f'{metric}_mean']:.2f}{spread}".rjust(14))
                lines.append(f"{'tiny LLaVA':<12} {qualified_split(dataset, split):<{width}} {mark:<6} "
                             + " ".join(cells))
    verdicts = []
    for dataset in datasets:
        adversarial = results[(results["dataset"] == dataset) & (results["split"] == "adversarial")]
        before = adversarial[adversarial["role"] == "before"]
        after = adversarial[adversarial["role"] == "after"]
        if before.empty or after.empty:
            continue
        f1_gain = 100 * (after["f1"].mean() - before["f1"].mean())
        yes_drop = 100 * (before["yes_ratio"].mean() - after["yes_ratio"].mean())
        f1_spread = 100 * (after["f1"].max() - after["f1"].min())
        yes_spread = 100 * (after["yes_ratio"].max() - after["yes_ratio"].min())
        bar = DEMO_EFFECT_OVER_SPREAD
        passed = f1_gain > 0 and yes_drop > 0 and f1_gain >= bar * f1_spread and yes_drop >= bar * yes_spread
        where = "Adversarial" if datasets == [POPE_DEFAULT_DATASET] else f"{dataset} adversarial"
        verdicts.append((f"v = mean ± std over {after['stage'].nunique()} DPO seeds. {where}: F1 {f1_gain:+.2f} pp "
                         f"({times_spread(f1_gain, f1_spread)}), yes-ratio {-yes_drop:+.2f} pp "
                         f"({times_spread(yes_drop, yes_spread)}): "
                         + (f"HA-DPO's effect is at least {bar:g}x the seed spread." if passed else
                            f"NOT {bar:g}x beyond the seed spread."), passed))
    if not verdicts:
        return "\n".join(lines), False
    lines.append("")
    lines += [line for line, _ in verdicts]
    return "\n".join(lines), all(passed for _, passed in verdicts)


def cmd_demo(args) -> int:
    """The whole pipeline on the synthetic world and the tiny model, ending with the seed's table."""
    from orchestrator.pipeline import run_pipeline
    from orchestrator.report import build_report

    args.config = args.config or str(DEMO_CONFIG)
    config = _config(args)
    started = time.time()
    result = run_pipeline(config, dpo_seeds=DEMO_SEEDS)
    report = build_report([config.run_dir], config.run_dir / "report")
    table, passed = demo_table(config.run_dir)
    print("\n" + table)
    print(f"\nreport: {report.html}\nrun record: {result.run_record}\n"
          f"demo finished in {time.time() - started:.0f} s (stages run: {', '.join(result.ran) or 'none'})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hadpo", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show on the terminal everything the run's log file (<run_dir>/logs/hadpo.log) gets: "
                        "Ray's and the libraries' logs, warnings, worker output, DEBUG records; tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(sub, required=True):
        sub.add_argument("config", nargs=None if required else "?", help="experiment config (YAML)")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config key, e.g. --set train.beta=0.5")
        return sub

    data = commands.add_parser("data", help="the synthetic world and data checks")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    synth = data_commands.add_parser("synth", help="write the embedded synthetic world")
    synth.add_argument("--out", required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--num-images", type=int, default=120)
    synth.add_argument("--num-pope-images", type=int, default=40)
    synth.add_argument("--image-size", type=int, default=64)
    synth.set_defaults(func=cmd_data_synth)
    check = with_config(data_commands.add_parser("check", help="load every dataset a config names"), False)
    check.set_defaults(func=cmd_data_check)

    train = with_config(commands.add_parser("train", help="DPO (or warm-up) training on Ray Train"))
    train.add_argument("--stage", choices=["dpo", "sft"], default="dpo")
    train.add_argument("--base-model", help="model folder to start from (default: the config's)")
    train.set_defaults(func=cmd_train)

    evaluate = with_config(commands.add_parser("eval", help="POPE / MileBench evaluation on Ray actors"))
    evaluate.add_argument("--adapter", help="LoRA adapter checkpoint to evaluate")
    evaluate.add_argument("--model", help="base model folder (default: the config's)")
    evaluate.add_argument("--retry-errors", action="store_true",
                          help="recompute items whose earlier answer is an error (e.g. an image fixed since)")
    evaluate.add_argument("--allow-partial", action="store_true",
                          help="show means over splits even when a split has fewer answers than questions")
    evaluate.set_defaults(func=cmd_eval)
    run = with_config(commands.add_parser("run", help="the whole pipeline: data, warm-up, eval, DPO, eval"))
    run.add_argument("--seeds", type=int, nargs="+", help="train one DPO adapter per seed (shows the spread)")
    run.set_defaults(func=cmd_run)

    tune_parser = with_config(commands.add_parser("tune", help="Ray Tune sweep: train + POPE eval per trial"))
    tune_parser.add_argument("--base-model", help="model folder the trials start from (default: the config's)")
    tune_parser.set_defaults(func=cmd_tune)

    report = commands.add_parser("report", help="HTML + Markdown report (tables, plots) of one or more runs")
    report.add_argument("runs", nargs="+", help="run folders (<output_root>/<name>)")
    report.add_argument("--out", required=True, help="folder for report.html, report.md and the PNGs")
    report.add_argument("--label", action="append", help="a label per run, in order")
    report.add_argument("--no-published", action="store_true", help="leave out the published HA-DPO rows")
    report.add_argument("--allow-partial", action="store_true",
                        help="show means over the splits of an evaluation that is short of answers")
    report.set_defaults(func=cmd_report)

    plan = with_config(commands.add_parser("plan", help="estimate per-GPU memory and whether the run fits"))
    plan.add_argument("--seq-len", type=int, help="tokens per row (default: train.max_length, the worst case)")
    plan.set_defaults(func=cmd_plan)

    export = commands.add_parser("export", help="a run's adapter as a peft adapter or merged model, "
                                 "with a model card; optionally uploaded to the hub")
    export.add_argument("source", help="run folder (<output_root>/<name>) or LoRA adapter / checkpoint folder")
    export.add_argument("--out", required=True, help="new folder to write")
    export.add_argument("--merge", action="store_true", help="merge the adapter into the base: a complete model")
    export.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder (needs env.offline: false and "
                        "the token in the variable export.hub_token_env names)")
    export.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")
    export.add_argument("--stage", help="the training stage whose adapter to export when the run has several "
                        "(e.g. dpo_seed2)")
    export.add_argument("--base-model", help="model folder the adapter was trained on (default: the run record's)")
    export.add_argument("--base-model-id", help="the base model's hub id, written into the card and adapter_config")
    export.add_argument("--config", help="experiment config (default: the run's config.yaml, else the defaults)")
    export.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set env.offline=false")
    export.set_defaults(func=cmd_export)

    convert = commands.add_parser("convert", help="original LLaVA-1.5 checkpoints / adapters to llava-hf / peft")
    convert_commands = convert.add_subparsers(dest="convert_command", required=True)
    llava = convert_commands.add_parser("llava", help="an original LLaVA-1.5 checkpoint (+ CLIP folder) -> llava-hf")
    llava.add_argument("checkpoint", help="folder of liuhaotian/llava-v1.5-7b (LlavaLlamaForCausalLM)")
    llava.add_argument("--vision-tower", help="CLIP folder (openai/clip-vit-large-patch14-336); default: the "
                       "checkpoint's mm_vision_tower when it is a local folder")
    llava.add_argument("--out", required=True)
    llava.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                       help="auto: the checkpoint's torch_dtype")
    llava.add_argument("--max-shard-size", default="5GB")
    llava.add_argument("--tokenizer", help="folder to read the tokenizer from (default: the checkpoint)")
    adapter = convert_commands.add_parser("adapter", help="a LoRA adapter on the original layout (HA-DPO's) -> "
                                          "a peft adapter on the converted llava-hf model")
    adapter.add_argument("adapter", help="folder with adapter_config.json, adapter_model.bin, non_lora_trainables.bin")
    adapter.add_argument("--base", help="the converted llava-hf folder (shapes checked, recorded as the base)")
    adapter.add_argument("--out", required=True)
    convert.set_defaults(func=cmd_convert)

    demo = with_config(commands.add_parser("demo", help="the whole pipeline on the synthetic world"), False)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None, resume: list[str] | None = None) -> int:
    """Run one command. `resume`: the command line that continues it after an interruption (default:
    ``hadpo`` + `argv`; the job entrypoints pass their own)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # the terminal gets the stages, their progress, warnings and results; the run's log file everything
    terminal = console.Console(args.verbose).start(argv)
    try:
        return run_command(args.func, args, resume or ["hadpo", *argv], verbose=args.verbose)
    finally:
        terminal.close()


def exit_with(code: int) -> NoReturn:
    """End this process with `code` once its command is over (the `hadpo` executable, the job entrypoints).
    Everything the command wrote is closed by then and its Ray stopped; freezing the heap spares the
    interpreter's exit a garbage collection over every object torch, transformers and Ray made (~0.9 s of a
    command's end, benchmarks/command_exit.py), which would only find cycles the process is dropping anyway."""
    gc.freeze()
    sys.exit(code)


def console_main() -> NoReturn:
    """The `hadpo` executable."""
    exit_with(main())


if __name__ == "__main__":
    console_main()
