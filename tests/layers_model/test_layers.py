"""BitLinear layers: fused QKV / gate|up scales, run-time act-bit switching, the CPU path."""
import pytest
import torch
from dist_utils import run_ranks
from mp_workers import fused_vs_separate, swiglu_variants


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_fused_qkv_and_gate_up_equal_separate_projections(tp):
    r = run_ranks(fused_vs_separate, tp)
    for res in r:
        assert res["qkv"] < 1e-5, res
        assert res["fc1"] < 1e-5, res
        assert res["fc1_single_scale"] > 1e-3, "one scale over the fused matrix should differ"


@pytest.mark.slow
@pytest.mark.parametrize("tp,preset", [(1, "v2_a8"), (2, "v2_a8"), (1, "bf16")])
def test_swiglu_variants_are_the_same_model(tp, preset):
    """SwiGLUMLP (with precision.fused_swiglu: the SwiGLU inside fc2) against fused_swiglu off and against
    megatron's MLP.forward: the same loss and gradients, bit for bit, at TP 1 and 2 (CPU path; the kernels'
    memory and values: tests/kernels/test_kernels.py and the GPU tests)."""
    for rank_out in run_ranks(swiglu_variants, tp, preset):
        ref_loss, ref_grads = rank_out["megatron"]
        for variant in ("default", "unfused"):
            loss, grads = rank_out[variant]
            assert loss == ref_loss, variant
            assert grads.keys() == ref_grads.keys()
            for n in grads:
                assert (grads[n] == ref_grads[n]).all(), (variant, n)


def test_cpu_path_inactive_when_cuda_available(monkeypatch):
    import bitnet_dist.compat as compat

    before = torch.cuda.current_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(compat, "_installed", False)
    assert compat.install_cpu_path() is False
    assert torch.cuda.current_device is before and not compat.cpu_path_active()


def test_standalone_rmsnorm_is_the_formula_in_float64():
    """The stand-alone norms (bf16 model's pre-norms, final norm) use torch's fused RMSNorm: output within one
    bf16 rounding of the float64 formula, input and weight gradients against float64 autograd."""
    from types import SimpleNamespace

    from bitnet_dist.norm import RMSNorm

    torch.manual_seed(3)
    m = RMSNorm(SimpleNamespace(params_dtype=torch.bfloat16, sequence_parallel=True), 96, eps=1e-5)
    assert m.weight.sequence_parallel is True  # the SP tag megatron's grad all-reduce keys on
    with torch.no_grad():
        m.weight.copy_(1 + 0.2 * torch.randn(96))
    x = (torch.randn(7, 96) * torch.rand(7, 1) * 3).bfloat16().requires_grad_()
    y = m(x)
    xd = x.detach().double().requires_grad_()
    wd = m.weight.detach().double().requires_grad_()
    ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * wd
    assert y.dtype == torch.bfloat16
    assert float(((y.double() - ref).abs() / ref.abs().clamp_min(1e-3)).max()) <= 2 ** -8  # one bf16 rounding
    g = torch.randn(7, 96).bfloat16()
    y.backward(g)
    ref.backward(g.double())
    for a, b in ((x.grad, xd.grad), (m.weight.grad, wd.grad)):
        assert float((a.double() - b).norm() / b.norm()) < 1e-2
