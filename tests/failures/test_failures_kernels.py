"""A NaN or inf in an activation reaches that token's output, on the torch path and on the Triton path.

Triton's max / maximum drop NaN (PTX max.f32), so a fused kernel that floors the scale with ``maximum`` and
takes max |u| with ``tl.max`` turned a non-finite token into a finite output (the loss hid it, the gradients
were NaN). CPU: the kernels under the Triton interpreter; GPU: the same checks in test_nonfinite_gpu below.
"""
import importlib
import os
import sys

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    # The interpreter is chosen when a kernel is decorated: on before the kernel modules load (as test_kernels.py)
    os.environ["TRITON_INTERPRET"] = "1"
    for _m in ["_common", "swiglu", "norm_hadamard_quant", "ternary", "gemm", "hbit_autograd"]:
        if f"bitnet_dist.kernels.{_m}" in sys.modules:
            importlib.reload(sys.modules[f"bitnet_dist.kernels.{_m}"])

from bitnet_dist import hadamard, quant  # noqa: E402
from bitnet_dist.kernels import hbit_linear  # noqa: E402
from bitnet_dist.kernels.norm_hadamard_quant import norm_hadamard_quant  # noqa: E402
from bitnet_dist.norm import rms_norm  # noqa: E402

BAD = [float("nan"), float("inf"), float("-inf")]


def _torch_path(x, w, g, bits, hb):
    n = rms_norm(x, g, 1e-5)
    u = hadamard.fwht(n, hb) if hb else n
    return torch.nn.functional.linear(quant.act_quant(u, bits), quant.weight_quant(w))


def _check_rows(y, bad_row, strict=True):
    rows_finite = torch.isfinite(y.float()).reshape(-1, y.shape[-1]).all(dim=1)
    assert not rows_finite[bad_row], "the non-finite token's output is finite"
    if strict:
        others = torch.cat([rows_finite[:bad_row], rows_finite[bad_row + 1:]])
        assert others.all(), "a finite token's output became non-finite"


def _inputs(device, dtype, D=64, T=6, bad_row=2, bad=float("nan"), col=5):
    torch.manual_seed(0)
    x = torch.randn(T, D, device=device).to(dtype)
    x[bad_row, col] = bad
    w = (0.02 * torch.randn(32, D, device=device)).to(dtype)
    g = (1 + 0.1 * torch.randn(D, device=device)).to(dtype)
    return x, w, g


def _run_all(device, dtype):
    for bad in BAD:
        for bits, hb in [(8, 16), (4, 16), (8, 0), (4, 0), (8, 64)]:
            x, w, g = _inputs(device, dtype, bad=bad)
            _check_rows(_torch_path(x, w, g, bits, hb), 2)
            # Blocks of 32..128 features: the flat kernel's second Hadamard stage is a block-diagonal 16 x 16
            # product over 256 elements, which spans several tokens; its zeros times the NaN make those tokens
            # non-finite too. What never happens: a finite token with a different finite output.
            strict = hb <= 16 or hb >= 256
            y = hbit_linear(x, w, g, act_bits=bits, hadamard_block=hb, eps=1e-5)
            _check_rows(y, 2, strict)
            xc = x.clone()
            xc[2] = 1.0
            yc = hbit_linear(xc, w, g, act_bits=bits, hadamard_block=hb, eps=1e-5)
            keep = [0, 1, 3, 4, 5]
            for i in keep:  # per-token scales: the other tokens are the ones of a clean input, or non-finite
                assert torch.equal(y[i], yc[i]) or (not strict and not torch.isfinite(y[i]).all())
            q, s, _ = norm_hadamard_quant(x, g, act_bits=bits, hadamard_block=max(hb, 1), eps=1e-5)
            assert not torch.isfinite(s[2])
            if strict:
                assert torch.isfinite(s[keep]).all()


@pytest.mark.skipif(_CUDA, reason="interpreter test for CPU machines; test_nonfinite_gpu covers CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_token_propagates_interpreter(dtype):
    _run_all("cpu", dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs a CUDA device: the compiled Triton kernels (the interpreter test above "
                    "runs the same checks on CPU)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nonfinite_gpu(dtype):
    _run_all("cuda", dtype)
    # the default CUDA forward is the warp-shuffle kernel: a longer row and a GLU layer too
    for bad in BAD:
        x, w, g = _inputs("cuda", dtype, D=2048, T=40, bad_row=7, bad=bad, col=1000)
        _check_rows(hbit_linear(x, w, g, act_bits=8, hadamard_block=256, eps=1e-5), 7)
        _check_rows(_torch_path(x, w, g, 8, 256), 7)
        h = torch.randn(40, 2 * 2048, device="cuda").to(dtype)
        h[7, 3] = bad
        _check_rows(hbit_linear(h, w, g, act_bits=4, hadamard_block=256, eps=1e-5, glu=True), 7)


def test_rms_norm_fp64_input_is_computed_in_fp64():
    torch.manual_seed(0)
    x = torch.randn(8, 64, dtype=torch.float64) * 1e3 + 1e-9 * torch.randn(8, 64, dtype=torch.float64)
    g = torch.rand(64, dtype=torch.float64) + 0.5
    ref = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * g  # the formula, fp64
    y = rms_norm(x, g, 1e-5)
    assert y.dtype == torch.float64
    err = (y - ref).abs().max().item()
    assert err < 1e-12, err  # fp32 statistics give ~1e-7 relative error
    # fp32 and bf16 inputs keep fp32 statistics
    assert rms_norm(x.float(), g.float(), 1e-5).dtype == torch.float32
