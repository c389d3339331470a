"""Shared fixtures: one Ray session for the whole suite, one synthetic world, one tiny LLaVA, one `hadpo run`
of the demo at its smallest.

Building these once per session keeps `make test` inside its time budget on 2 cores.
"""

from __future__ import annotations

import faulthandler
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.commands import hadpo

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


# The slowest test (the cluster scenario's fixture) takes 2-3 minutes on 2 idle cores, 6-8 on a loaded machine.
HUNG_TEST_S = 20 * 60
_terminal: dict = {}


def pytest_configure(config):
    # the terminal's stderr, kept before pytest captures file descriptor 2 for each test
    _terminal["stderr"] = os.fdopen(os.dup(2), "w")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test (its fixtures' set-up included) still running after HUNG_TEST_S prints every thread's stack to the
    terminal and ends the run (exit 1), instead of holding CI to its own limit: a test whose Ray work waits for
    resources that never come (an actor some earlier pass left holding the CPUs) waits for ever."""
    faulthandler.dump_traceback_later(HUNG_TEST_S, exit=True, file=_terminal["stderr"])
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def pytest_collection_modifyitems(items):
    """A test that uses the shared Ray session is slow, marked or not (`make test-fast` leaves it out)."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_temp(tmp_path_factory) -> Path:
    """The shared Ray's temp folder: its session folder, where Ray Train runs its workers, is under it."""
    return tmp_path_factory.mktemp("ray")


@pytest.fixture(scope="session")
def ray_session(ray_temp):
    """A local Ray with 2 CPUs shared by every test that needs one, started as a local `hadpo` command starts
    its own (`init_ray`): the runs' environment on every worker (Ray Train's 0.5 s report polling among it) and
    no placement-group cleaner actor per training run (a local Ray's groups go with it)."""
    import ray

    from orchestrator.config import ExperimentConfig
    from orchestrator.ray_session import init_ray, stop_ray

    if os.environ.get("HADPO_FORBID_RAY"):  # a test that reaches Ray through a fixture it asks for by name
        pytest.fail("HADPO_FORBID_RAY is set (make test-fast): this test starts Ray; mark it slow")
    if not ray.is_initialized():
        init_ray(ExperimentConfig(name="suite", output_root=str(ray_temp)), num_cpus=2, num_gpus=0)
    yield ray
    stop_ray()


@pytest.fixture(scope="session")
def synth_world(tmp_path_factory):
    """A small synthetic world written in the real file formats (shared, read-only for tests)."""
    from orchestrator.data.synthetic import SynthConfig, generate_world

    out = tmp_path_factory.mktemp("world")
    manifest = generate_world(out, SynthConfig(seed=0, num_images=48, num_pope_images=16))
    return out, manifest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny LLaVA built for the synthetic world's vocabulary (random weights)."""
    from orchestrator.config import TinyModelConfig
    from orchestrator.data.synthetic import SynthConfig, world_vocabulary
    from orchestrator.model.llava import build_tiny_llava

    out = tmp_path_factory.mktemp("tiny-llava")
    vocabulary = world_vocabulary(SynthConfig(seed=0))
    return build_tiny_llava(out, [" ".join(vocabulary)], TinyModelConfig(), seed=0)


@pytest.fixture(scope="session", params=["llava_next", "qwen2_5_vl"])
def tiny_family_dir(request, tmp_path_factory):
    """A tiny model of another family (LLaVA-NeXT, then Qwen2.5-VL) for the world's vocabulary: tests that
    take it run once per family. The family's name is the folder's `family` attribute's value."""
    from orchestrator.config import TinyModelConfig
    from orchestrator.data.synthetic import SynthConfig, world_vocabulary
    from orchestrator.model.tiny import build_tiny_model

    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    vocabulary = world_vocabulary(SynthConfig(seed=0))
    return build_tiny_model(out, [" ".join(vocabulary)], TinyModelConfig(), request.param, seed=0)


# configs/demo.yaml at the smallest sizes that still run every stage (MileBench included)
SMALLEST_DEMO = {
    "data": {"synthetic": {"num_images": 12, "num_pope_images": 4, "image_size": 48, "milebench_tasks": 1,
                           "milebench_samples": 2}},
    "model": {"tiny": {"text_layers": 1, "vision_layers": 1}},
    "train": {"max_steps": 2, "batch_size_per_worker": 4, "checkpoint_every_steps": 2, "log_every_steps": 1,
              "sft": {"max_steps": 2, "batch_size_per_worker": 4}},
    "scaling": {"cpus_per_worker": 0.5},
    "eval": {"batch_size": 16, "milebench_max_new_tokens": 4},
}


def merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(base.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def _ray_products(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.suffix == ".parquet" or "checkpoint_" in p.name}


@dataclass(frozen=True)
class DemoRun:
    """What `hadpo run` of the smallest demo, then `hadpo report` of it, left behind, read right after both
    commands (a test may run the pipeline again on the same folder afterwards)."""

    folder: Path                # both commands' working directory; the config is folder/demo.yaml
    run_dir: Path               # folder/runs/<name>: the config's output_root is the relative `runs`
    config: dict                # the config file's content
    run: subprocess.CompletedProcess
    report: subprocess.CompletedProcess
    paths: frozenset[Path]      # every file and folder under `folder`
    files: frozenset[Path]      # the files among them
    stages: dict[str, dict]     # stage name -> its record's outputs
    run_record: dict
    log: str                    # <run_dir>/logs/hadpo.log
    report_markdown: str
    ray_session_products: frozenset[Path]  # parquet files and checkpoints that appeared in the shared Ray's
    #                                        temp folder (Ray Train's workers run in it) during the run

    @property
    def terminal(self) -> str:
        return self.run.stdout + self.run.stderr


@pytest.fixture(scope="session")
def demo_run(ray_session, ray_temp, tmp_path_factory) -> DemoRun:
    """`hadpo run` of configs/demo.yaml at its smallest (every stage: data, warm-up, baseline POPE and
    MileBench, DPO, evaluation), as a user runs it: a subprocess, in a folder of its own, with the demo's
    relative output_root `runs`, joining the suite's Ray; then `hadpo report` of the run. One run shared by
    the tests of what the terminal shows (test_console), where the files go (test_relative_output_root) and
    what a second run skips or redoes (test_pipeline): each pipeline run costs two Ray Train stages and two
    evaluations."""
    import yaml

    folder = tmp_path_factory.mktemp("demo-run")
    config = merged(yaml.safe_load((ROOT / "configs/demo.yaml").read_text()), SMALLEST_DEMO)
    config["name"] = "tiny-demo"
    (folder / "demo.yaml").write_text(yaml.safe_dump(config))
    address = ray_session.get_runtime_context().gcs_address
    before = _ray_products(ray_temp)
    ran = hadpo("run", "demo.yaml", cwd=folder, ray_address=address)
    assert ran.returncode == 0, (ran.stdout + ran.stderr)[-4000:]
    appeared = _ray_products(ray_temp) - before
    run_dir = folder / config["output_root"] / config["name"]
    reported = hadpo("report", str(run_dir.relative_to(folder)), "--out", str((run_dir / "report").relative_to(folder)),
                     cwd=folder)
    assert reported.returncode == 0, (reported.stdout + reported.stderr)[-4000:]
    return DemoRun(
        folder=folder, run_dir=run_dir, config=config, run=ran, report=reported,
        paths=frozenset(folder.rglob("*")), files=frozenset(p for p in folder.rglob("*") if p.is_file()),
        stages={record.stem: json.loads(record.read_text())["outputs"]
                for record in (run_dir / "stages").glob("*.json")},
        run_record=json.loads((run_dir / "run_record.json").read_text()),
        log=(run_dir / "logs" / "hadpo.log").read_text(),
        report_markdown=(run_dir / "report" / "report.md").read_text(),
        ray_session_products=frozenset(appeared))
