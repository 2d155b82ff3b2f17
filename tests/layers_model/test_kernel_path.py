"""The kernel path is visible: ``precision.kernels=auto`` without working kernels on CUDA warns once with the
reason, ``triton`` there is a config error, and the run's start record, log and report name the path that ran.

CUDA is simulated on CPU (``torch.cuda.is_available`` patched True) together with an import failure of the
kernels or of Triton; the end-to-end part runs the train app on CPU (tiny model, a few steps)."""
import json
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

from bitnet_dist import layers
from bitnet_dist.errors import ConfigError


@pytest.fixture
def fresh_status(monkeypatch):
    """A process where the kernel status was never probed and no fallback warning was given yet."""
    layers.kernel_status.cache_clear()
    monkeypatch.setattr(layers, "_fallback_warned", False)
    yield
    layers.kernel_status.cache_clear()


def _fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def _break_module(monkeypatch, name):
    """Make ``import name`` raise ImportError (sys.modules entry None)."""
    monkeypatch.setitem(sys.modules, name, None)


def test_cpu_takes_the_torch_path_without_warning(fresh_status):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = layers.kernel_path("auto", "cpu")
    assert (p.name, p.reason) == ("torch", "cpu device")
    assert str(layers.kernel_path("torch", "cpu")) == "torch (precision.kernels=torch)"
    with pytest.raises(ConfigError, match="precision.kernels"):
        layers.kernel_path("triton", "cpu")
    with pytest.raises(ConfigError, match="auto, triton or torch"):
        layers.kernel_path("fast", "cpu")


@pytest.mark.parametrize("broken", ["triton", "bitnet_dist.kernels.hbit_autograd"])
def test_auto_on_cuda_without_kernels_warns_once_with_the_reason(fresh_status, monkeypatch, broken):
    _fake_cuda(monkeypatch)
    if broken != "triton":  # Triton importable (a stub), the kernel module not
        monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    _break_module(monkeypatch, broken)
    module, reason = layers.kernel_status()
    assert module is None and reason.startswith(f"import {broken} failed")
    with pytest.warns(RuntimeWarning, match=r"precision.kernels=auto: the Triton kernels cannot run \(import"):
        p = layers.kernel_path("auto", "cuda")
    assert p.name == "torch" and p.reason == reason
    with warnings.catch_warnings():  # once per process: the layers' per-forward check stays quiet now
        warnings.simplefilter("error")
        assert layers.kernel_path("auto", "cuda").name == "torch"
        layers.warn_kernel_fallback(reason)
    with pytest.raises(ConfigError, match="precision.kernels.*triton.*cannot run"):
        layers.kernel_path("triton", "cuda")


def test_broken_kernel_module_is_named(fresh_status, monkeypatch):
    """With Triton importable (a stub here) the kernel modules themselves are imported by the check."""
    _fake_cuda(monkeypatch)
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    _break_module(monkeypatch, "bitnet_dist.kernels.hbit_autograd")
    module, reason = layers.kernel_status()
    assert module is None and reason.startswith("import bitnet_dist.kernels.hbit_autograd failed")


def test_layer_forward_check_warns_on_cuda_fallback(fresh_status, monkeypatch):
    """The layers' own dispatch (``_use_kernels``) on a CUDA tensor with the kernels missing: torch path, warned."""
    _fake_cuda(monkeypatch)
    _break_module(monkeypatch, "triton")
    x = types.SimpleNamespace(is_cuda=True)
    auto = types.SimpleNamespace(kernels="auto")
    with pytest.warns(RuntimeWarning, match="cannot run"):
        assert layers._BitMixin._use_kernels(auto, x) is False
    with pytest.raises(RuntimeError, match="precision.kernels=triton.*import triton failed"):
        layers._BitMixin._use_kernels(types.SimpleNamespace(kernels="triton"), x)


def test_report_names_the_kernel_path_and_a_change_on_resume(tmp_path):
    from bitnet_dist.report import write_report

    recs = [{"step": 0, "event": "start", "kernels": "triton", "kernels_reason": ""},
            {"step": 1, "loss": 5.0, "tokens": 10, "tokens_per_s": 100.0},
            {"step": 1, "event": "resume", "kernels": "triton", "kernels_reason": ""},
            {"step": 2, "event": "resume", "kernels": "torch", "kernels_reason": "import triton failed: X"},
            {"step": 3, "loss": 4.0, "tokens": 30, "tokens_per_s": 100.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    md = write_report(tmp_path).read_text()
    assert "| kernel path | triton; from step 2: torch (import triton failed: X) |" in md
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    assert "| kernel path | not recorded |" in write_report(tmp_path).read_text()


@pytest.mark.slow
def test_train_run_records_logs_and_reports_the_kernel_path(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    args = ["experiment=smoke", "engine=deepspeed", "trainer.dtype=fp32", "logging.wandb=disabled",
            "trainer.max_steps=2", "optim.warmup_steps=0", "trainer.log_interval=1", "trainer.eval_interval=2", "trainer.save_interval=100",
            "trainer.stats_interval=0", "trainer.progress_bar=false", f"run_dir={run_dir}"]
    p = subprocess.run([sys.executable, "-m", "bitnet_dist.train", *args], env=env, capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "[bitnet-train] kernels: torch (cpu device) (precision.kernels=auto, device cpu); fused: none" in p.stdout
    start = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"event": "start"' in line]
    assert len(start) == 1 and start[0]["kernels"] == "torch" and start[0]["kernels_reason"] == "cpu device"
    assert start[0]["fused"] == []  # trainer.fused_* = auto: off on CPU
    assert "| kernel path | torch (cpu device) |" in (run_dir / "report.md").read_text()
    assert "fp8_backward" not in p.stderr
    # a setting the torch path cannot honour is named, not dropped silently
    p = subprocess.run([sys.executable, "-m", "bitnet_dist.train", *args, "precision.fp8_backward=true",
                        "trainer.fused_rope=true", "trainer.fused_cross_entropy=true", f"run_dir={tmp_path / 'fp8'}"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "; fused: rope, cross_entropy" in p.stdout  # forced on: the hooks' CPU formulas (optim.fused: megatron)
    start = [json.loads(line) for line in (tmp_path / "fp8" / "metrics.jsonl").read_text().splitlines()
             if '"event": "start"' in line]
    assert start[0]["fused"] == ["rope", "cross_entropy"]
    assert ("note: precision.fp8_backward=true has no effect on the torch path (cpu device): the backward GEMMs run "
            "in float32") in p.stderr
