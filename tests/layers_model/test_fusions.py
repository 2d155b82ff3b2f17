"""The fused element-wise paths (bitnet_dist.fusions): the settings, and the fused RoPE (bitnet_dist.model.fused_rope,
megatron's apply_rope_fusion hook) against a float64 formula of its own, megatron's unfused RoPE, and in the model."""
import math

import numpy as np
import pytest
import torch
from dist_utils import run_ranks
from megatron.core.models.common.embeddings import rope_utils
from throughput_workers import rope_paths

from bitnet_dist import model as bm
from bitnet_dist.errors import ConfigError
from bitnet_dist.fusions import check_fusions, fusion_enabled, megatron_fusions


def _freqs(s, rot, base=10000.0):
    """megatron's RotaryEmbedding layout: [s, 1, 1, rot] = cat(pos * inv_freq, pos * inv_freq), fp32."""
    inv = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    ang = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    return torch.cat((ang, ang), dim=-1)[:, None, None, :]


def _rotate_f64(t, freqs):
    """The rotation as complex numbers: the pair (x_i, x_{i + r/2}) times exp(i * angle_i), float64."""
    r = freqs.shape[-1]
    x = t[..., :r].double()
    z = torch.complex(x[..., : r // 2], x[..., r // 2:])
    z = z * torch.exp(1j * freqs[..., : r // 2].double())
    return torch.cat((z.real, z.imag, t[..., r:].double()), dim=-1)


@pytest.mark.parametrize("rot", [16, 12])  # all dims rotated; 4 dims passed through
def test_rope_equals_the_complex_rotation_in_float64(rot):
    torch.manual_seed(0)
    t = torch.randn(10, 2, 3, 16, dtype=torch.float64, requires_grad=True)
    f = _freqs(10, rot)
    y = bm._rope(t, f)
    assert y.dtype == torch.float64
    ref = _rotate_f64(t.detach(), f)
    assert (y.detach() - ref).abs().max().item() < 1e-12
    # backward: the transpose of the rotation (rotation by -angle)
    g = torch.randn_like(y)
    (gt,) = torch.autograd.grad(y, t, g)
    back = _rotate_f64(g, -f)
    assert (gt - back).abs().max().item() < 1e-12


def test_rope_fp32_equals_megatrons_unfused_bitwise_and_bf16_is_closer_to_float64():
    torch.manual_seed(1)
    t = 3 * torch.randn(64, 2, 4, 32)
    f = _freqs(64, 32)
    meg = rope_utils._apply_rotary_pos_emb_bshd(t, f)
    assert torch.equal(bm._rope(t, f), meg)
    # bf16: one rounding (fp32 inside) against megatron's rounding of cos, sin and each product
    tb = t.bfloat16()
    ref = _rotate_f64(tb.double(), f)
    ours = (bm._rope(tb, f).double() - ref).abs()
    theirs = (rope_utils._apply_rotary_pos_emb_bshd(tb, f).double() - ref).abs()
    assert bm._rope(tb, f).dtype == torch.bfloat16
    assert ours.max() <= ref.abs().max() * 2 ** -8  # half a bf16 ulp of the largest value
    assert ours.mean() < theirs.mean()


def test_fused_rope_is_megatrons_hook_and_keeps_transformer_engines():
    saved = rope_utils.fused_apply_rotary_pos_emb
    try:
        rope_utils.fused_apply_rotary_pos_emb = None
        assert bm.install_fused_rope() == "bitnet_dist"
        assert rope_utils.fused_apply_rotary_pos_emb is bm.fused_rope
        assert bm.install_fused_rope() == "bitnet_dist"  # idempotent

        def te_rope(t, freqs, interleaved=False):
            return t

        rope_utils.fused_apply_rotary_pos_emb = te_rope
        assert bm.install_fused_rope() == "transformer_engine"
        assert rope_utils.fused_apply_rotary_pos_emb is te_rope
    finally:
        rope_utils.fused_apply_rotary_pos_emb = saved
    with pytest.raises(ConfigError, match="rotary_interleaved"):
        bm.fused_rope(torch.zeros(2, 1, 1, 4), _freqs(2, 4), interleaved=True)


def test_fusion_settings():
    class T:
        fused_rope = "auto"
        fused_cross_entropy = "auto"

    t = T()
    assert megatron_fusions(t, cuda=True) == {"apply_rope_fusion": True, "fused_cross_entropy": True}
    assert megatron_fusions(t, cuda=False) == {"apply_rope_fusion": False, "fused_cross_entropy": False}
    t.fused_rope, t.fused_cross_entropy = "True", "false"  # OmegaConf's str of a boolean override
    assert megatron_fusions(t, cuda=False) == {"apply_rope_fusion": True, "fused_cross_entropy": False}
    assert fusion_enabled(t, "fused_cross_entropy", cuda=True) is False
    t.fused_rope = "sometimes"
    with pytest.raises(ConfigError, match=r"trainer\.fused_rope.*auto"):
        check_fusions(t)


@pytest.mark.slow
def test_compiled_rope_equals_eager():
    """The torch.compile'd form the CUDA path runs, here compiled for the CPU: same values and gradient."""
    torch.manual_seed(3)
    t = torch.randn(32, 2, 4, 16).bfloat16().requires_grad_(True)
    f = _freqs(32, 16)
    g = torch.randn(32, 2, 4, 16).bfloat16()
    eager = bm._rope(t, f)
    (ge,) = torch.autograd.grad(eager, t, g)
    comp = torch.compile(bm._rope, dynamic=False)(t, f)
    (gc,) = torch.autograd.grad(comp, t, g)
    torch.testing.assert_close(comp.float(), eager.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gc.float(), ge.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_model_with_the_fused_rope_equals_megatrons_unfused_rope(tp):
    """In the model (CPU, fp32, the hook's eager formula): loss and gradients bit for bit those of megatron's RoPE."""
    res = run_ranks(rope_paths, tp)[0]
    (l0, g0, c0, _), (l1, g1, c1, n_layers) = res[False], res[True]
    assert c0 == 0 and c1 == 2 * n_layers  # the fused path ran: q and k of every layer
    assert l0 == l1 and math.isfinite(l0)
    for n in g0:
        assert np.array_equal(g0[n], g1[n]), n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled RoPE runs on CUDA only (the CPU runs the "
                    "same formula eagerly, tested above)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_rope_on_gpu_equals_the_formula(dtype):
    torch.manual_seed(2)
    t = (2 * torch.randn(256, 2, 8, 64, device="cuda")).to(dtype).requires_grad_(True)
    f = _freqs(256, 64).cuda()
    y = bm.fused_rope(t, f)
    g = torch.randn_like(y)
    (gt,) = torch.autograd.grad(y, t, g)
    ref = _rotate_f64(t.detach(), f)
    back = _rotate_f64(g, -f)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
    assert ((y.double() - ref).abs() <= tol * (1 + ref.abs())).all()
    assert ((gt.double() - back).abs() <= tol * (1 + back.abs())).all()


def test_compiled_on_cuda_compiles_once_for_cuda_inputs_only(monkeypatch):
    """The dispatch of the fused paths: CPU inputs run the formula eagerly; CUDA inputs compile it once (here a
    stand-in for torch.compile and for a CUDA tensor) and reuse the compiled form."""
    compiled = []

    def fake_compile(fn, dynamic):
        assert dynamic is False
        compiled.append(fn)
        return lambda *a: ("compiled", fn(*a))

    monkeypatch.setattr(torch, "compile", fake_compile)

    class Cuda:
        is_cuda = True

    f = bm._CompiledOnCuda(lambda x, y: y)
    assert f(torch.zeros(1), 3) == 3 and not compiled
    assert f(Cuda(), 4) == ("compiled", 4) and f(Cuda(), 5) == ("compiled", 5) and len(compiled) == 1
