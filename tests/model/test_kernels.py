"""train.fused_kernels: liger on a GPU where installed, never on the CPU, a clear error when asked for and absent."""

import pytest

from orchestrator.config import TrainConfig
from orchestrator.model import kernels
from orchestrator.model.kernels import FusedKernelsUnavailable, apply_fused_kernels, resolve_fused_kernels


def test_auto_uses_liger_only_on_a_gpu_with_the_package(monkeypatch):
    assert TrainConfig().fused_kernels == "auto"
    monkeypatch.setattr(kernels, "liger_installed", lambda: True)
    assert resolve_fused_kernels("auto", on_gpu=True) == "liger"
    assert resolve_fused_kernels("auto", on_gpu=False) == "none"
    assert resolve_fused_kernels("none", on_gpu=True) == "none"
    monkeypatch.setattr(kernels, "liger_installed", lambda: False)
    assert resolve_fused_kernels("auto", on_gpu=True) == "none"


def test_liger_asked_for_where_it_cannot_run_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(kernels, "liger_installed", lambda: False)
    with pytest.raises(FusedKernelsUnavailable, match=r"pip install 'hadpo-orchestrator\[gpu\]'"):
        resolve_fused_kernels("liger", on_gpu=True)
    with pytest.raises(FusedKernelsUnavailable, match="needs a GPU"):
        resolve_fused_kernels("liger", on_gpu=False)


def test_nothing_is_patched_without_liger():
    sentinel = object()
    assert apply_fused_kernels(sentinel, "none") == "none"


@pytest.mark.parametrize("rows", [1, 2, 8, 16, 32])
@pytest.mark.parametrize("sm_count", [108, 132])
def test_warmup_widths_meet_both_sides_of_tritons_divide_by_16_specialisation(rows, sm_count):
    # liger's RMSNorm backward gets ceil(rows * width / SMs) rows per program; Triton compiles a kernel
    # for "divides by 16" and one for "does not", and real batches of varying width meet both
    widths = kernels.warmup_widths(rows, 64, sm_count)
    per_program = [-(-rows * width // sm_count) for width in widths]
    assert all(width % 64 == 0 for width in widths)
    assert sorted(p % 16 == 0 for p in per_program) == [False, True]
    assert min(per_program) > 1  # one row per program is a specialisation no real batch meets


def start_warmup(folder):
    return kernels.KernelWarmup(folder, rows=8, width_multiple=64, device="cpu", dtype=None, trainable_norms=False)


def test_a_failed_warm_up_is_reported_and_never_raised(tmp_path):
    # no model folder: the thread fails; the run goes on and the log says why
    warmup = start_warmup(tmp_path / "no-model")
    line = warmup.wait()
    assert line.startswith("fused-kernel warm-up failed (")
    assert "they compile in the first steps" in line
    assert not warmup.thread.is_alive()


def test_warm_up_is_skipped_for_text_models_whose_kernels_it_does_not_know(tmp_path):
    from transformers import LlavaConfig, Qwen2_5_VLConfig

    Qwen2_5_VLConfig().save_pretrained(tmp_path / "qwen")
    assert start_warmup(tmp_path / "qwen").wait() == "fused-kernel warm-up skipped: no warm-up for qwen2_5_vl_text text models"
    LlavaConfig().save_pretrained(tmp_path / "llava")   # llama: warmed where liger and a GPU are
    line = start_warmup(tmp_path / "llava").wait()
    assert "skipped" not in line
    if not kernels.liger_installed():
        assert line.startswith("fused-kernel warm-up failed (ModuleNotFoundError")
