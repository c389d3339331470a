"""Shared fixtures: one Ray session for the whole suite, one synthetic world, one tiny LLaVA.

Building these once per session keeps `make test` inside its time budget on 2 cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def pytest_collection_modifyitems(items):
    """A test that uses the shared Ray session is slow, marked or not (`make test-fast` leaves it out)."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """A local Ray with 2 CPUs shared by every test that needs one."""
    import ray

    if os.environ.get("HADPO_FORBID_RAY"):  # a test that reaches Ray through a fixture it asks for by name
        pytest.fail("HADPO_FORBID_RAY is set (make test-fast): this test starts Ray; mark it slow")
    if not ray.is_initialized():
        temp_dir = tmp_path_factory.mktemp("ray")
        ray.init(num_cpus=2, num_gpus=0, _temp_dir=str(temp_dir), include_dashboard=False,
                 log_to_driver=True, runtime_env={"env_vars": {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
                                                               "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


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
