"""Quantizers against their formulas, computed independently in float64 (docs: bitnet-v2.md section 1)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bitnet_dist import quant
from bitnet_dist.errors import ConfigError

EPS = 1e-5


def ref_roundclip(v: np.ndarray, lo, hi):
    return np.clip(np.round(v), lo, hi)  # numpy rounds half to even, like torch.round


def ref_act(x: np.ndarray, bits: int):
    """float64 formula: INT8 xq = RoundClip(127 x / gamma), INT4 xq = RoundClip(sqrt7 x / beta)."""
    x = x.astype(np.float64)
    if bits == 8:
        gamma = np.maximum(np.abs(x).max(-1, keepdims=True), EPS)
        v = 127.0 * x / gamma
        return ref_roundclip(v, -128, 127), v, gamma / 127.0
    beta = np.maximum(np.abs(x).mean(-1, keepdims=True), EPS)
    v = math.sqrt(7) * x / beta
    return ref_roundclip(v, -8, 7), v, beta / math.sqrt(7)


def ref_ternary(w: np.ndarray):
    w = w.astype(np.float64)
    alpha = max(np.abs(w).mean(), EPS)
    v = w / alpha
    return ref_roundclip(v, -1, 1), v, alpha


def assert_codes_match(codes, ref_codes, v):
    """Codes equal the float64 formula except where v sits within float32 rounding of a .5 tie."""
    codes = codes.astype(np.float64)
    near_tie = np.abs(np.abs(v - np.floor(v)) - 0.5) < 1e-5 * np.maximum(1.0, np.abs(v))
    mismatch = (codes != ref_codes) & ~near_tie
    assert not mismatch.any(), f"{mismatch.sum()} codes differ from the formula"
    assert (np.abs(codes - ref_codes) <= 1).all()


finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(x=arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 70)), elements=finite),
       bits=st.sampled_from([4, 8]))
def test_act_codes_equal_formula(x, bits):
    codes, scale = quant.act_codes(torch.from_numpy(x), bits)
    ref_codes, v, ref_scale = ref_act(x, bits)
    assert_codes_match(codes.numpy(), ref_codes, v)
    np.testing.assert_allclose(scale.numpy(), ref_scale, rtol=1e-6)
    lo, hi = (-128, 127) if bits == 8 else (-8, 7)
    assert codes.min() >= lo and codes.max() <= hi


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant_random_and_outliers(bits, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 256, generator=g)
    x[3, 7] = 1e4  # a huge outlier dominates its token's absmax
    x[5] *= 1e-3
    x = x.to(dtype)
    fq = quant.act_quant(x, bits)
    assert fq.dtype == dtype
    ref_codes, v, ref_scale = ref_act(x.float().numpy(), bits)
    codes, scale = quant.act_codes(x, bits)
    assert_codes_match(codes.numpy(), ref_codes, v)
    deq = (ref_codes * ref_scale).astype(np.float32)
    torch.testing.assert_close(fq.float(), torch.from_numpy(deq).to(dtype).float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-6,
                               atol=1e-6)


def test_int8_ties_round_half_to_even():
    # gamma = 127 makes the scale exactly 1, so x/scale is exact and .5 ties are real ties.
    x = torch.tensor([[127.0, 2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 1.5]])
    codes, scale = quant.act_codes(x, 8)
    assert scale.item() == 1.0
    assert codes.tolist() == [[127, 2, 4, -2, -4, 0, 0, 2]]


def test_int4_codes_follow_returned_scale_half_to_even():
    # INT4 scales are irrational (beta / sqrt 7), so exact ties cannot be built; instead the codes must be
    # the half-to-even rounding of x / scale for the scale returned, and equal the float64 formula.
    x = torch.randn(8, 64, dtype=torch.float64)
    codes, scale = quant.act_codes(x, 4)
    expect = np.clip(np.round(x.numpy() / scale.numpy()), -8, 7)
    np.testing.assert_array_equal(codes.numpy(), expect)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_zero_token_gives_zeros_not_nan(bits, dtype):
    x = torch.zeros(3, 32, dtype=dtype)
    x[1] = torch.randn(32).to(dtype)
    x.requires_grad_(True)
    y = quant.act_quant(x, bits)
    assert torch.isfinite(y).all()
    assert (y[0] == 0).all() and (y[2] == 0).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_act_ste_gradient_is_identity(bits):
    x = torch.randn(4, 64, requires_grad=True)
    up = torch.randn(4, 64)
    (quant.act_quant(x, bits) * up).sum().backward()
    torch.testing.assert_close(x.grad, up, rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(w=arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 40)), elements=finite))
def test_ternary_equal_formula(w):
    wt = torch.from_numpy(w)
    scale = quant.weight_absmean(wt)
    codes = quant.ternary_codes(wt, scale)
    ref_codes, v, alpha = ref_ternary(w)
    np.testing.assert_allclose(scale.numpy(), np.full((w.shape[0], 1), alpha), rtol=1e-5)
    assert_codes_match(codes.numpy(), ref_codes, v)
    assert set(np.unique(codes.numpy())) <= {-1, 0, 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_quant_ste_and_dtype(dtype):
    w = torch.randn(32, 16).to(dtype).requires_grad_(True)
    q = quant.weight_quant(w)
    assert q.dtype == dtype
    alpha = w.detach().float().abs().mean()
    vals = torch.unique(q.detach().float())
    assert len(vals) <= 3
    torch.testing.assert_close(vals.abs().max(), alpha, rtol=1e-2, atol=0)
    up = torch.randn(32, 16).to(dtype)
    (q * up).sum().backward()
    torch.testing.assert_close(w.grad, up, rtol=0, atol=0)


def test_zero_weight_matrix():
    w = torch.zeros(4, 4)
    assert (quant.weight_quant(w) == 0).all()


def test_segment_scales_equal_separate_matrices():
    g = torch.Generator().manual_seed(1)
    a, b, c = torch.randn(6, 8, generator=g), 3 * torch.randn(2, 8, generator=g), 0.1 * torch.randn(2, 8, generator=g)
    fused = torch.cat([a, b, c])
    seg = torch.tensor([0] * 6 + [1] * 2 + [2] * 2)
    qf = quant.weight_quant(fused, seg)
    qs = torch.cat([quant.weight_quant(a), quant.weight_quant(b), quant.weight_quant(c)])
    torch.testing.assert_close(qf, qs, rtol=1e-6, atol=0)  # scales summed in another order: ulps
    cf = quant.ternary_codes(fused, quant.weight_absmean(fused, seg))
    cs = torch.cat([quant.ternary_codes(t, quant.weight_absmean(t)) for t in (a, b, c)])
    assert torch.equal(cf, cs)


def test_bad_bits():
    with pytest.raises(ConfigError, match="precision.act_bits"):
        quant.act_quant(torch.randn(2, 4), 3)


def test_quant_error_int4_larger_than_int8():
    x = torch.randn(64, 256)
    e8, e4 = quant.quant_error(x, 8).item(), quant.quant_error(x, 4).item()
    assert 0 < e8 < e4 < 1


def test_segment_sums_against_float64():
    """Per-segment sums (the weight scales of fused QKV / gate|up) in a fixed order: against float64 sums,
    interleaved ids as in megatron's QKV rows, an empty segment gives 0."""
    g = torch.Generator().manual_seed(0)
    v = torch.rand(1000, generator=g) * 3
    seg = torch.tensor([0, 0, 1, 2] * 250)
    got = quant.segment_sums(v, seg, 4)
    ref = [v.double()[seg == s].sum().item() for s in range(4)]
    assert got.dtype == v.dtype and got.shape == (4,)
    assert np.allclose(got.double().numpy(), ref, rtol=1e-6, atol=0) and got[3] == 0
    assert torch.equal(got, quant.segment_sums(v, seg, 4))
