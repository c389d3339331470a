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
