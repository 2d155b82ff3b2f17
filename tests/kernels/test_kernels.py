"""CPU tests of the Triton kernels through the Triton interpreter (TRITON_INTERPRET=1), at small sizes.

The truth is ``bitnet_dist.quant`` / ``bitnet_dist.hadamard`` / ``bitnet_dist.norm`` (the layers' torch
path). Integer codes must equal it exactly; outputs and gradients within float tolerance. GPU runs of the
same kernels are in test_kernels_gpu.py (this module is for machines without CUDA: there the kernels
only run interpreted).
"""
import importlib
import os
import sys

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("interpreter tests are for CPU-only machines; on CUDA test_kernels_gpu.py runs the kernels",
                allow_module_level=True)

# The interpreter is chosen when a kernel is decorated, so it must be on before the kernel modules load;
# reload them if something imported them earlier in this process.
os.environ["TRITON_INTERPRET"] = "1"
_MODS = ["_common", "swiglu", "norm_hadamard_quant", "ternary", "gemm", "hbit_autograd"]
for _m in _MODS:
    if f"bitnet_dist.kernels.{_m}" in sys.modules:
        importlib.reload(sys.modules[f"bitnet_dist.kernels.{_m}"])

from dist_utils import free_port  # noqa: E402

from bitnet_dist import hadamard, quant  # noqa: E402
from bitnet_dist.kernels import hbit_linear  # noqa: E402
from bitnet_dist.kernels.gemm import int8_gemm, scaled_gemm_reference  # noqa: E402
from bitnet_dist.kernels.hbit_autograd import hbit_linear_reference  # noqa: E402
from bitnet_dist.kernels.norm_hadamard_quant import (  # noqa: E402
    launch_config,
    norm_hadamard_backward,
    norm_hadamard_quant,
    norm_hadamard_quant_reference,
)
from bitnet_dist.kernels.ternary import (  # noqa: E402
    cached_ternary,
    pack2bit,
    pack2bit_reference,
    quantize_weight,
    quantize_weight_reference,
    unpack2bit,
)
from bitnet_dist.norm import rms_norm  # noqa: E402


def reference_codes(x, g, bits, hb, eps=1e-5):
    """The layers' torch path: rms_norm -> fwht -> act_codes (returns codes, scale [T], u fp32)."""
    n = rms_norm(x, g, eps) if g is not None else x
    u = hadamard.fwht(n, hb) if hb > 1 else n
    codes, scale = quant.act_codes(u, bits)
    return codes, scale[:, 0], u.float()


def backward_matches_autograd(T, D, hb, cfg):
    """Random fp32 x, g, grad_u: the kernel backward with ``cfg`` against autograd through the torch path;
    returns (x, g, grad_u, rstd) for further checks."""
    x, g, gu = torch.randn(T, D), 1 + 0.1 * torch.randn(D), torch.randn(T, D)
    _, _, rstd = norm_hadamard_quant(x, g, act_bits=8, hadamard_block=hb, eps=1e-5)
    gx, gg = norm_hadamard_backward(gu, x, g, rstd, hadamard_block=hb, config=cfg)
    xr, gr = x.clone().requires_grad_(), g.clone().requires_grad_()
    hadamard.fwht(rms_norm(xr, gr, 1e-5), hb).backward(gu)
    torch.testing.assert_close(gx, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gg, gr.grad, rtol=1e-5, atol=1e-5)
    return x, g, gu, rstd


def assert_codes_equal(q, ref_codes, u, scale):
    """Exact equality, except where u / scale is within float rounding of a .5 tie (then off by one)."""
    diff = (q.to(torch.int32) - ref_codes.to(torch.int32)).abs()
    if diff.any():
        r = u / scale[:, None]
        near_tie = ((r - r.floor()) - 0.5).abs() < 1e-4
        assert bool((diff <= 1).all()) and bool(near_tie[diff > 0].all()), \
            f"{int((diff > 0).sum())} codes differ away from ties"


CASES = [  # tokens (odd: masking), features, hadamard block, bits
    (37, 64, 16, 8), (19, 96, 32, 4), (5, 512, 256, 8), (33, 320, 64, 4), (9, 48, 0, 8), (16, 64, 8, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,D,hb,bits", CASES)
def test_fused_codes_equal_reference(dtype, T, D, hb, bits):
    torch.manual_seed(T * D + bits)
    x = (torch.randn(T, D) * torch.rand(T, 1) * 4).to(dtype)
    x[0] = 0.0  # an all-zero token: scale clamps at 1e-5, codes 0
    g = (1 + 0.2 * torch.randn(D)).to(dtype)
    q, scale, rstd = norm_hadamard_quant(x, g, act_bits=bits, hadamard_block=hb, eps=1e-5)
    rc, rs, u = reference_codes(x, g, bits, hb)
    assert q.dtype == torch.int8 and q.shape == (T, D)
    torch.testing.assert_close(scale, rs, rtol=2e-6, atol=0)
    assert_codes_equal(q, rc, u, rs)
    assert bool((q[0] == 0).all())
    # the kernel file's own twin agrees too
    tc, ts, tr, tu = norm_hadamard_quant_reference(x, g, act_bits=bits, hadamard_block=hb, eps=1e-5)
    assert_codes_equal(tc, rc, u, rs)
    torch.testing.assert_close(rstd, tr, rtol=2e-6, atol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_fused_chunked_and_no_norm(bits):
    """Rows longer than one chunk (three passes over chunks) and the no-RMSNorm variant."""
    torch.manual_seed(1)
    T, D, hb = 13, 192, 64  # D = 3 chunks of 64; the last block of a pow2 chunk is masked
    x = torch.randn(T, D).bfloat16()
    g = torch.rand(D).bfloat16() + 0.5
    rc, rs, u = reference_codes(x, g, bits, hb)
    q, scale, _ = norm_hadamard_quant(x, g, act_bits=bits, hadamard_block=hb, eps=1e-5, config=(4, 64, 4))
    assert_codes_equal(q, rc, u, rs)
    rc, rs, u = reference_codes(x, None, bits, hb)
    q, scale, rstd = norm_hadamard_quant(x, None, act_bits=bits, hadamard_block=hb, eps=1e-5, config=(4, 128, 4))
    assert_codes_equal(q, rc, u, rs)
    assert bool((rstd == 1).all())


@pytest.mark.parametrize("hb,config", [(32, None), (64, (4, 64, 4)), (0, None)])
def test_norm_hadamard_backward(hb, config):
    torch.manual_seed(2)
    T, D = 21, 192
    x = torch.randn(T, D)
    g = 1 + 0.1 * torch.randn(D)
    gu = torch.randn(T, D)
    _, _, rstd = norm_hadamard_quant(x, g, act_bits=8, hadamard_block=hb, eps=1e-5)
    gx, gg = norm_hadamard_backward(gu, x, g, rstd, hadamard_block=hb, config=config)
    xr, gr = x.clone().requires_grad_(), g.clone().requires_grad_()
    u = rms_norm(xr, gr, 1e-5)
    u = hadamard.fwht(u, hb) if hb else u
    u.backward(gu)
    torch.testing.assert_close(gx, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gg, gr.grad, rtol=1e-5, atol=1e-5)


def test_ternary_codes_scales_and_packing():
    torch.manual_seed(3)
    w = torch.randn(70, 45) * 0.02
    seg = torch.tensor([0] * 30 + [1] * 20 + [2] * 20)
    for s in (None, seg):
        tw = quantize_weight(w, s)
        ref_scale = quant.weight_absmean(w, s)[:, 0]
        torch.testing.assert_close(tw.scale, ref_scale, rtol=1e-6, atol=0)
        assert torch.equal(tw.codes, quant.ternary_codes(w, ref_scale[:, None]))
        rc, ra = quantize_weight_reference(w, s)  # float64 formula, independent of both
        torch.testing.assert_close(tw.scale, ra, rtol=1e-6, atol=0)  # fp32 sums over the segment: a few ulps
        tie = ((w.abs() / ra[:, None]) - 0.5).abs() < 1e-6  # where the scale's last bit may decide the code
        assert torch.equal(tw.codes[~tie], rc[~tie]) and int(tie.sum()) <= 2
    for K in (45, 4, 1, 64):
        c = torch.randint(-1, 2, (7, K), dtype=torch.int8)
        p = pack2bit(c)
        assert p.dtype == torch.uint8 and p.shape == (7, (K + 3) // 4)
        assert torch.equal(p, pack2bit_reference(c))
        assert torch.equal(unpack2bit(p, K), c)
    with pytest.raises(ValueError, match="packed width"):
        unpack2bit(p, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_weight_quant_equals_the_composed_path(monkeypatch, dtype):
    """The three-kernel weight quantization (abs-sums, the per-segment statistic in one program, scale + codes)
    against the composition with the statistic in torch ops (BITNET_FUSED_WEIGHT_QUANT=0) and the float64
    formula: scales within an ulp (another fp32 summation order), codes equal away from the rounding ties,
    the FP8 codes equal to the int8 ones, and the same bits on a second call. Segments contiguous, interleaved,
    more than four (a wider statistic tile), absent; no rows; a strided (non-contiguous rows) weight."""
    from bitnet_dist.kernels import ternary

    torch.manual_seed(11)
    w = (torch.randn(70, 45) * 0.02).to(dtype)
    cases = [(w, None), (w, torch.tensor([0] * 30 + [1] * 20 + [2] * 20)),
             (w, torch.arange(70) % 3), (w, torch.arange(70) // 10),  # 7 segments: NS = 8
             (torch.randn(40, 100).to(dtype)[:, 10:74], torch.arange(40) // 20),  # row stride 100
             (w[:0], None), (w[:0], torch.zeros(0, dtype=torch.long))]
    for wt, seg in cases:
        fused = quantize_weight(wt, seg, fp8=True)
        again = quantize_weight(wt, seg, fp8=True)
        assert torch.equal(fused.scale, again.scale) and torch.equal(fused.codes, again.codes)
        monkeypatch.setattr(ternary, "FUSED_WEIGHT_QUANT", False)
        composed = quantize_weight(wt, seg, fp8=True)
        monkeypatch.setattr(ternary, "FUSED_WEIGHT_QUANT", True)
        assert fused.scale.shape == composed.scale.shape == (wt.shape[0],) and fused.scale.dtype == torch.float32
        assert fused.codes.shape == wt.shape and fused.codes.dtype == torch.int8
        if not wt.shape[0]:
            continue
        torch.testing.assert_close(fused.scale, composed.scale, rtol=2.5e-7, atol=0)
        rc, ra = quantize_weight_reference(wt, seg)
        torch.testing.assert_close(fused.scale, ra, rtol=1e-6, atol=0)
        tie = ((wt.float().abs() / ra[:, None]) - 0.5).abs() < 1e-6
        assert torch.equal(fused.codes[~tie], rc[~tie]) and torch.equal(fused.codes[~tie], composed.codes[~tie])
        assert torch.equal(fused.fp8.float(), fused.codes.float())
        # its codes are those of its own scale, exactly
        assert torch.equal(fused.codes, quant.ternary_codes(wt.float(), fused.scale[:, None]))


def test_segment_count_follows_the_tensor_not_its_address():
    """The segment count kept per segments tensor: a new tensor at a freed one's address gets its own count (a
    cache keyed on the address served the old one, and the fused kernel then read past its statistic), and an
    in-place change of the ids is seen through the version counter."""
    from bitnet_dist.kernels.ternary import _num_segments

    hits = 0
    for _ in range(20):
        a = torch.tensor([0] * 30 + [1] * 20 + [2] * 20)
        assert _num_segments(a) == 3
        ptr = a.data_ptr()
        del a
        b = torch.arange(70) // 10
        hits += b.data_ptr() == ptr
        assert _num_segments(b) == 7
    ids = torch.zeros(70, dtype=torch.long)
    assert _num_segments(ids) == 1
    ids.copy_(torch.arange(70) % 5)
    assert _num_segments(ids) == 5
    assert _num_segments(torch.zeros(0, dtype=torch.long)) == 1


def test_weight_cache_follows_step_generation_and_version():
    from bitnet_dist import step_cache

    w = torch.nn.Parameter(torch.randn(32, 16))
    try:
        step_cache.reset()
        a = cached_ternary(w)
        assert cached_ternary(w) is not a  # no step open: nothing is reused
        step_cache.advance()
        a = cached_ternary(w)
        assert cached_ternary(w) is a  # micro-batches of one step reuse it
        with torch.no_grad():
            w.mul_(-1.0)  # an in-place update through the parameter: new version
        b = cached_ternary(w)
        assert b is not a and torch.equal(b.codes, -a.codes)
        # megatron's optimizers write through .data, which the version counter does not see ...
        w.data.copy_(-w.data)
        assert cached_ternary(w) is b  # (stale within the generation: weights must not change inside a step)
        step_cache.advance()  # ... so the engines open a new generation per step
        c = cached_ternary(w)
        assert c is not b and torch.equal(c.codes, a.codes)
    finally:
        step_cache.reset()


def test_int8_gemm_exact():
    torch.manual_seed(4)
    for M, N, K in [(37, 45, 70), (64, 32, 128), (1, 17, 9)]:
        a = torch.randint(-128, 128, (M, K), dtype=torch.int8)
        b = torch.randint(-1, 2, (N, K), dtype=torch.int8)
        sa, sb = torch.rand(M) + 0.1, torch.rand(N) + 0.1
        assert torch.equal(int8_gemm(a, b, sa, sb, out_dtype=torch.float32),
                           scaled_gemm_reference(a, b, sa, sb, out_dtype=torch.float32))


def _frac_close(a, b):
    return float(((a - b).abs() <= 0.07 * b.abs() + 2 ** -9).float().mean())


def test_fp8_backward_operands():
    """Row-wise / column-wise e4m3 quantization (with the other side's scale folded in) and the transpose."""
    from bitnet_dist.kernels.gemm import colwise_fp8_t, fp8_transpose, rowwise_fp8

    torch.manual_seed(6)
    T, N = 37, 48
    dy = torch.randn(T, N).bfloat16()
    alpha, s_a = torch.rand(N) + 0.5, torch.rand(T) + 0.5
    q, s = rowwise_fp8(dy, alpha)
    v = dy.float() * alpha
    torch.testing.assert_close(s, v.abs().amax(1) / 448.0)
    # The interpreter's fp32 -> e4m3 cast mis-rounds where rounding carries into the next binade
    # (127.8 -> 64), so values are checked loosely here and bit-exactly in test_kernels_gpu.py.
    assert _frac_close(q.float(), v / s[:, None]) > 0.9
    qt, st = colwise_fp8_t(dy, s_a)
    v = dy.float() * s_a[:, None]
    torch.testing.assert_close(st, v.abs().amax(0) / 448.0)
    assert qt.shape == (N, T)
    assert _frac_close(qt.float(), (v / st).t()) > 0.9
    c = torch.randint(-8, 8, (T, N), dtype=torch.int8)
    assert torch.equal(fp8_transpose(c).float(), c.t().float())


@pytest.mark.parametrize("T,N", [(37, 48), (130, 200)])
def test_dy_fp8_both_equals_the_two_passes(T, N):
    """The fused backward operand prep (two reads of dy) gives exactly the codes and scales of rowwise_fp8 and
    colwise_fp8_t (four reads), on shapes with partial tiles in both directions."""
    from bitnet_dist.kernels.gemm import colwise_fp8_t, dy_fp8_both, rowwise_fp8

    torch.manual_seed(7)
    dy = (torch.randn(T, N) * torch.rand(T, 1) * 4).bfloat16()
    dy[3] = 0  # an all-zero token: the 1e-30 floor
    alpha, s_a = torch.rand(N) + 0.5, torch.rand(T) + 0.5
    qr, sr, qc, sc = dy_fp8_both(dy, alpha, s_a, tile=(32, 32, 4, 2))
    q0, s0 = rowwise_fp8(dy, alpha)
    qt0, st0 = colwise_fp8_t(dy, s_a)
    assert qr.shape == (T, N) and qc.shape == (N, T)
    assert torch.equal(sr, s0) and torch.equal(sc, st0)
    assert torch.equal(qr.view(torch.int8), q0.view(torch.int8))
    assert torch.equal(qc.view(torch.int8), qt0.view(torch.int8))
    torch.testing.assert_close(sr, (dy.float() * alpha).abs().amax(1).clamp_min(1e-30) / 448.0)


def _layer_reference(x, w, g, bits, hb, segments=None):
    n = rms_norm(x, g, 1e-5)
    u = hadamard.fwht(n, hb) if hb else n
    return torch.nn.functional.linear(quant.act_quant(u, bits), quant.weight_quant(w, segments))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("bits,hb", [(8, 16), (4, 32), (8, 0)])
def test_hbit_linear_matches_reference(dtype, tol, bits, hb):
    torch.manual_seed(5)
    x = torch.randn(3, 13, 64).to(dtype).requires_grad_()
    w = (0.02 * torch.randn(48, 64)).to(dtype).requires_grad_()
    g = (1 + 0.1 * torch.randn(64)).to(dtype).requires_grad_()
    seg = torch.tensor([0] * 16 + [1] * 32) if hb == 0 else None
    y = hbit_linear(x, w, g, act_bits=bits, hadamard_block=hb, eps=1e-5, weight_segments=seg)
    dy = torch.randn_like(y)
    y.backward(dy)
    xr, wr, gr = (t.detach().clone().requires_grad_() for t in (x, w, g))
    yr = _layer_reference(xr, wr, gr, bits, hb, seg)
    yr.backward(dy)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    assert y.shape == yr.shape and y.dtype == dtype
    for name, a, b in [("y", y, yr), ("grad_x", x.grad, xr.grad), ("grad_w", w.grad, wr.grad),
                       ("grad_norm", g.grad, gr.grad)]:
        assert rel(a, b) < tol, (name, rel(a, b))
    if dtype == torch.float32:  # the file's own twin is the same function
        yt = hbit_linear_reference(x.detach(), w.detach(), g.detach(), act_bits=bits, hadamard_block=hb, eps=1e-5,
                                   weight_segments=seg)
        torch.testing.assert_close(yt, yr.detach(), rtol=1e-5, atol=1e-6)


def test_bad_inputs_fail_clearly():
    x = torch.randn(4, 48)
    with pytest.raises(ValueError, match="hadamard_block=32"):
        norm_hadamard_quant(x, None, act_bits=8, hadamard_block=32, eps=1e-5)
    with pytest.raises(ValueError, match="act_bits=3"):
        hbit_linear(x, torch.randn(8, 48), None, act_bits=3, hadamard_block=0, eps=1e-5)


def _tp_case():
    torch.manual_seed(7)
    T, D, N, hb = 11, 128, 24, 32
    return hb, D, torch.randn(T, D), 0.02 * torch.randn(N, D), 1 + 0.1 * torch.randn(D), torch.randn(T, N)


def _tp_worker(rank, world):
    """Feature-sharded row-parallel H-BitLinear: each rank holds in/world features of x, W and g."""
    import torch.distributed as dist

    from bitnet_dist.kernels import hbit_linear as hl

    hb, D, x, w, g, dy = _tp_case()
    sl = slice(rank * D // world, (rank + 1) * D // world)
    out = []
    for bits in (8, 4):
        xs, ws, gs = (t[..., sl].clone().requires_grad_() for t in (x, w, g))
        y = hl(xs, ws, gs, act_bits=bits, hadamard_block=hb, eps=1e-5, tp_group=dist.group.WORLD, full_dim=D)
        y.backward(dy)
        y = y.detach()
        dist.all_reduce(y, group=dist.group.WORLD)
        # numpy pickles by value; tensors would go through shared memory that dies with this process
        out.append((bits, *(t.numpy() for t in (y, xs.grad, ws.grad, gs.grad)), sl))
    # Wdown with the SwiGLU inside (glu=True): each rank holds [gate shard | up shard]; under TP-reduced
    # statistics the SwiGLU kernels compose with the TP phases (the fold needs whole rows)
    h = _tp_glu_input(x)
    hs = torch.cat([h[:, :D][:, sl], h[:, D:][:, sl]], 1).requires_grad_()
    ws, gs = (t[..., sl].clone().requires_grad_() for t in (w, g))
    y = hl(hs, ws, gs, act_bits=4, hadamard_block=hb, eps=1e-5, tp_group=dist.group.WORLD, full_dim=D, glu=True)
    y.backward(dy)
    y = y.detach()
    dist.all_reduce(y, group=dist.group.WORLD)
    out.append(("glu", *(t.numpy() for t in (y, hs.grad, ws.grad, gs.grad)), sl))
    return out


def _tp_glu_input(x):
    gen = torch.Generator().manual_seed(8)
    return torch.cat([x * 2, torch.randn(x.shape, generator=gen)], 1)  # [gate | up]


def _spawn_entry(rank, world, port, queue):
    # A light harness (no megatron import, which alone takes ~20 s on the CI's two cores).
    import traceback

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        queue.put((rank, "ok", _tp_worker(rank, world)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, timeout: float = 300.0):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_spawn_entry, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world):
            rank, status, payload = queue.get()
            if status != "ok":
                errors.append(f"rank {rank}:\n{payload}")
                break
            results[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
                p.join()
    assert not errors, "\n".join(errors)
    return [results[r] for r in range(world)]


@pytest.mark.slow
def test_tensor_parallel_statistics():
    """Two gloo ranks (interpreted kernels) reproduce the single-device reference: the partial sums of
    squares, activation statistics, weight abs-sums and the backward dot are all-reduced; also with the SwiGLU
    input (glu=True, each rank holding its gate and up shards)."""
    from bitnet_dist.kernels.swiglu import swiglu_reference

    results = run_ranks(2)
    hb, D, x, w, g, dy = _tp_case()
    for rank_out in results:
        assert [o[0] for o in rank_out] == [8, 4, "glu"]
        for bits, *arrays, sl in rank_out:
            y, gx, gw, gg = (torch.from_numpy(a) for a in arrays)
            xr, wr, gr = (t.clone().requires_grad_() for t in (x, w, g))
            if bits == "glu":  # the reference on the full h, its gradient read back in the rank's layout
                hr = _tp_glu_input(x).requires_grad_()
                yr = _layer_reference(swiglu_reference(hr), wr, gr, 4, hb)
                yr.backward(dy)
                want = torch.cat([hr.grad[:, :D][:, sl], hr.grad[:, D:][:, sl]], 1)
            else:
                yr = _layer_reference(xr, wr, gr, bits, hb)
                yr.backward(dy)
                want = xr.grad[:, sl]
            torch.testing.assert_close(y, yr.detach(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(gx, want, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(gw, wr.grad[:, sl], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(gg, gr.grad[sl], rtol=1e-4, atol=1e-5)


def _stand_in_launcher(monkeypatch):
    """A FastLaunch over a stand-in JIT function (params X, n, B) that records its calls: ("jit", grid, args,
    kwargs) through the JIT, ("fast", grid, args) through the compiled launcher; ``Compiled.fail`` makes the
    launcher raise TypeError. Enabled as on a GPU, with the device query answered without CUDA."""
    from types import SimpleNamespace

    from bitnet_dist.kernels._common import FastLaunch

    calls = []

    class Compiled:
        fail = False

        def __getitem__(self, grid):
            def run(*a):
                if Compiled.fail:
                    raise TypeError("launcher signature")
                calls.append(("fast", grid, a))
            return run

    class Jit:
        params = [SimpleNamespace(name=n) for n in ("X", "n", "B")]

        def __getitem__(self, grid):
            def run(*a, **k):
                calls.append(("jit", grid, a, tuple(sorted(k.items()))))
                return Compiled()
            return run

    fl = FastLaunch(Jit())
    fl.enabled = True  # as on a GPU
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # the stand-in runs without CUDA
    return fl, calls, Compiled


def test_fast_launch_reuses_only_matching_specializations(monkeypatch):
    """FastLaunch (CPU logic test with a stand-in JIT function): the first launch of a specialization goes
    through the JIT, later ones call the compiled launcher with every parameter in signature order, and a
    change in anything Triton specializes on (alignment, 16-divisibility, constexprs) goes back to the JIT."""
    fl, calls, _ = _stand_in_launcher(monkeypatch)
    x = torch.zeros(64)
    fl[(2,)](x, 32, B=16, num_warps=4)
    fl[(3,)](x, 64, B=16, num_warps=4)  # same spec (32 and 64 both divisible by 16)
    fl[(3,)](x, 33, B=16, num_warps=4)  # 33: not divisible by 16 -> JIT
    fl[(3,)](x[1:], 64, B=16, num_warps=4)  # misaligned pointer -> JIT
    fl[(3,)](x, 64, B=32, num_warps=4)  # another constexpr -> JIT
    kinds = [c[0] for c in calls]
    assert kinds == ["jit", "fast", "jit", "jit", "jit"], kinds
    assert calls[1][1] == (3, 1, 1) and calls[1][2][1:] == (64, 16)  # grid padded, constexpr appended in order


def test_fast_launch_keyed_reuses_by_the_callers_key_and_checks_it(monkeypatch):
    """FastLaunch.launch_keyed (stand-in JIT function): the first call of a key goes through the full path
    (JIT, or a compiled kernel found by the full key), later calls of that key launch the compiled kernel with
    the constexprs in signature order and build no full key; with the check on (BITNET_CHECK_LAUNCH_KEYS), a key
    reused for another specialization raises; a launcher that rejects the arguments sends it back to the JIT."""
    import bitnet_dist.kernels._common as cm

    fl, calls, Compiled = _stand_in_launcher(monkeypatch)
    x = torch.zeros(64)
    keys = []
    monkeypatch.setattr(fl, "_key", lambda a, k, f=fl._key: keys.append(1) or f(a, k))
    fl.launch_keyed("k", (2, 1, 1), (x, 32), {"B": 16, "num_warps": 4})
    fl.launch_keyed("k", (5, 1, 1), (x, 48), {"B": 16, "num_warps": 4})
    assert [c[0] for c in calls] == ["jit", "fast"] and calls[1][1:] == ((5, 1, 1), (x, 48, 16))
    assert len(keys) == 1  # the keyed hit built no full key
    fl.launch_keyed("k2", (1, 1, 1), (x, 64), {"B": 16, "num_warps": 4})  # new key, known specialization
    assert [c[0] for c in calls][2:] == ["fast"] and "k2" in fl.keyed
    monkeypatch.setattr(cm, "_CHECK_KEYS", True)
    fl.launch_keyed("k", (1, 1, 1), (x, 64), {"B": 16, "num_warps": 4})  # same specialization: passes the check
    with pytest.raises(AssertionError, match="reused for another specialization"):
        fl.launch_keyed("k", (1, 1, 1), (x, 33), {"B": 16, "num_warps": 4})  # 33: not divisible by 16
    monkeypatch.setattr(cm, "_CHECK_KEYS", False)
    Compiled.fail = True
    fl.launch_keyed("k", (1, 1, 1), (x, 32), {"B": 16, "num_warps": 4})
    assert calls[-1][0] == "jit" and not fl.enabled


@pytest.mark.slow  # seven kernel variants, each compiled under the interpreter
@pytest.mark.parametrize("hmode,prefetch,hb", [(0, True, 64), (1, False, 64), (3, True, 64), (3, False, 64),
                                               (4, True, 64), (4, False, 256), (3, True, 256)])
def test_flat_kernels_all_hadamard_modes(hmode, prefetch, hb):
    """The flat kernels with each Hadamard product and with / without the prefetch, over more token blocks
    than programs (each persistent program loops), forward codes and backward gradients."""
    torch.manual_seed(5)
    T, D = 203, 256  # hb 64: 203 tokens in blocks of 4 -> 51 blocks over 4 programs (one per "SM" on CPU)
    cfg = ("flat", 4 if hb < 256 else 16, 4, hmode, 1, prefetch)  # >= 16 tile rows of one block each
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(T, D) * 3).to(dtype)
        g = (1 + 0.2 * torch.randn(D)).to(dtype)
        rc, rs, u = reference_codes(x, g, 8, hb)
        q, scale, _ = norm_hadamard_quant(x, g, act_bits=8, hadamard_block=hb, eps=1e-5, config=cfg)
        torch.testing.assert_close(scale, rs, rtol=2e-6, atol=0)
        assert_codes_equal(q, rc, u, rs)
    backward_matches_autograd(T, D, hb, cfg)


@pytest.mark.parametrize("T,D,hb,bits,cfg", [(37, 512, 256, 8, ("shfl", 1, 1)), (19, 384, 128, 4, ("shfl", 2, 1)),
                                             (33, 256, 64, 8, ("shfl", 4, 2)), (9, 64, 8, 4, ("shfl", 8, 1)),
                                             (16, 128, 16, 8, ("shfl", 2, 1)),
                                             # the packed-register form (sm_90 PTX on the GPU, element-wise here)
                                             (37, 512, 256, 8, ("shfl", 1, 1, None, 5)),
                                             (19, 384, 128, 4, ("shfl", 2, 1, None, 5)),
                                             (16, 128, 16, 4, ("shfl", 2, 1, None, 5)),
                                             # no Hadamard (BitLinear: QKV / fc1), the default there
                                             (29, 512, 0, 8, ("shfl", 1, 1)), (33, 256, 0, 4, ("shfl", 4, 2)),
                                             (19, 384, 1, 4, ("shfl", 2, 1, None, 5)),
                                             (37, 512, 0, 8, ("shfl", 1, 1, None, 5))])
def test_warp_shuffle_kernel_codes_equal_reference(T, D, hb, bits, cfg):
    """The warp-shuffle forward kernel (its lane exchange emulated by reshapes in the interpreter): codes
    and scales equal the torch path's, with a power-of-4 block (normalization folded into the scale), a
    block of 128 and 8 (explicit normalization), no block (0 or 1: no butterflies), masked columns (384
    features in a 512 tile), odd T."""
    torch.manual_seed(11)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(T, D) * torch.rand(T, 1) * 3).to(dtype)
        x[3] = 0  # an all-zero token: the 1e-5 scale floor
        g = (1 + 0.2 * torch.randn(D)).to(dtype)
        rc, rs, u = reference_codes(x, g, bits, hb)
        q, scale, rstd = norm_hadamard_quant(x, g, act_bits=bits, hadamard_block=hb, eps=1e-5, config=cfg)
        torch.testing.assert_close(scale, rs, rtol=2e-6, atol=0)
        assert_codes_equal(q, rc, u, rs)
        _, _, rstd0 = norm_hadamard_quant(x, g, act_bits=bits, hadamard_block=hb, eps=1e-5)
        torch.testing.assert_close(rstd, rstd0, rtol=1e-6, atol=0)  # sum of squares in another order
        q0, s0, _ = norm_hadamard_quant(x, None, act_bits=bits, hadamard_block=hb, eps=1e-5, config=cfg)
        rc0, rs0, u0 = reference_codes(x, None, bits, hb)
        torch.testing.assert_close(s0, rs0, rtol=2e-6, atol=0)
        assert_codes_equal(q0, rc0, u0, rs0)


def test_warp_shuffle_verifier_and_limits(monkeypatch):
    """BITNET_KERNEL_SELF_CHECK: the one-time check raises when the shuffle kernel's codes disagree with the
    tensor-core kernel's, as they would under another register layout; without the option no check runs (and
    nothing switches path); unusable layouts fail clearly."""
    import bitnet_dist.kernels.norm_hadamard_quant as nhq
    torch.manual_seed(2)
    x, g = torch.randn(8, 256), 1 + 0.1 * torch.randn(256)
    kw = dict(act_bits=8, hb=64, has_norm=True, eps=1e-5, fp8_codes=False)
    monkeypatch.setattr(nhq, "_SHFL_CHECKED", {})
    monkeypatch.setattr(nhq, "_SHFL_DEFAULT", {})
    monkeypatch.setattr(nhq, "SELF_CHECK", False)  # off (the default): the config is chosen without a check
    assert nhq._default_shuffle(x, g, **kw) == nhq.shuffle_config(256) and not nhq._SHFL_CHECKED
    monkeypatch.setattr(nhq, "_SHFL_DEFAULT", {})
    monkeypatch.setattr(nhq, "SELF_CHECK", True)
    monkeypatch.setattr(nhq, "_capturing", lambda: True)  # first use inside CUDA-graph capture: no check, no cache
    assert nhq._default_shuffle(x, g, **kw) is None and not nhq._SHFL_DEFAULT and not nhq._SHFL_CHECKED
    monkeypatch.setattr(nhq, "_capturing", lambda: False)
    assert nhq._shuffle_verified(x, g, ("shfl", 4, 2), **kw)
    assert nhq._default_shuffle(x, g, **kw) == nhq.shuffle_config(256) == ("shfl", 16, 4)
    assert len(nhq._SHFL_DEFAULT) == 1
    # without the Hadamard the check compares with the chunked kernel (the flat one needs a block > 1)
    assert nhq._default_shuffle(x, g, **{**kw, "hb": 1}) == ("shfl", 16, 4) and len(nhq._SHFL_DEFAULT) == 2
    real = nhq._nhq_shfl

    def wrong_pairs(x2, g, q, scale, rstd, config, **k):  # stands in for a kernel pairing the wrong lanes
        real(x2, g, q, scale, rstd, config, **k)
        q.copy_(q.roll(1, dims=1))
    monkeypatch.setattr(nhq, "_nhq_shfl", wrong_pairs)
    with pytest.raises(RuntimeError, match="disagrees.*BITNET_SHUFFLE_HADAMARD=0"):
        nhq._shuffle_verified(x, g, ("shfl", 2, 2), **kw)
    with pytest.raises(RuntimeError, match="disagrees"):  # cached: it fails again, never switches path silently
        nhq._shuffle_verified(x, g, ("shfl", 2, 2), **kw)
    with pytest.raises(RuntimeError, match="disagrees"):  # the default path fails loudly too
        nhq._default_shuffle(x, g, **{**kw, "act_bits": 4})
    assert nhq._SHFL_CHECKED[(None, torch.float32, torch.float32, 256, ("shfl", 2, 2), 8, 64, True, False)] is False
    assert "16-byte" in nhq.shuffle_layout_ok(torch.randn(4, 260)[:, :256], ("shfl", 1, 1), 64)
    assert "too small" in nhq.shuffle_layout_ok(x, ("shfl", 1, 8), 64)
    assert nhq.shuffle_layout_ok(torch.randn(4, 32768), ("shfl", 1, 8), 256).startswith("32768 features")
    with pytest.raises(ValueError, match="warp-shuffle kernel does not apply"):
        norm_hadamard_quant(torch.randn(4, 32768), None, act_bits=8, hadamard_block=256, eps=1e-5,
                            config=("shfl", 1, 8))


def test_warp_shuffle_packed_form_equals_plain_bf16():
    """The packed-register forward (sm_90 PTX on the GPU; the same kernel structure with element-wise helpers
    here) gives bit-identical codes and scales to the plain form for bf16 activations, INT8 and INT4; and the
    default configs take one token per program from 2048 features."""
    import bitnet_dist.kernels.norm_hadamard_quant as nhq
    torch.manual_seed(6)
    T, D, hb = 21, 512, 64
    x, g = (torch.randn(T, D) * 2).bfloat16(), (1 + 0.1 * torch.randn(D)).bfloat16()
    for bits in (8, 4):
        plain = norm_hadamard_quant(x, g, act_bits=bits, hadamard_block=hb, eps=1e-5, config=("shfl", 2, 1, None, 0))
        packed = norm_hadamard_quant(x, g, act_bits=bits, hadamard_block=hb, eps=1e-5, config=("shfl", 2, 1, None, 5))
        for a, b in zip(plain, packed):
            assert torch.equal(a, b)
    assert [nhq.shuffle_config(d) for d in (256, 1024, 2048, 4096, 8192, 16384)] == [
        ("shfl", 16, 4), ("shfl", 4, 4), ("shfl", 1, 2), ("shfl", 1, 2), ("shfl", 1, 4), ("shfl", 1, 8)]
    assert [nhq.shuffle_bwd_config(d) for d in (2048, 4096, 8192, 16384)] == [
        ("shfl", 2, 8, 2, None, False), ("shfl", 1, 8, 2, None, False), ("shfl", 1, 8, 2, None, True),
        ("shfl", 1, 32, 1, None, True)]


def test_shuffle_register_cap_only_for_the_widest_rows(monkeypatch):
    """The register cap (maxnreg) applies only on a compiled GPU kernel, only to the 16-bit launches it was measured
    on (2048 and 16384 features), and BITNET_SHFL_MAXNREG=0 (read at import) turns it off; under the interpreter it
    is never set."""
    import bitnet_dist.kernels.norm_hadamard_quant as nhq
    assert nhq.shuffle_maxnreg(1, 16384, 8) is None  # the interpreter: no launch options
    monkeypatch.setattr(nhq, "interpreting", lambda: False)
    monkeypatch.setattr(nhq, "_CUDA_OPTIONS", frozenset({"num_warps", "maxnreg"}))
    caps = {}
    for d in (1024, 2048, 4096, 8192, 16384):
        _, bm, warps = nhq.shuffle_config(d)
        caps[d] = nhq.shuffle_maxnreg(bm, max(16, d), warps)
    assert caps == {1024: None, 2048: 64, 4096: None, 8192: None, 16384: 80}
    assert nhq.shuffle_maxnreg(1, 16384, 16) is None
    assert nhq.shuffle_maxnreg(1, 16384, 8, elem_bytes=4) is None  # fp32 activations: no cap
    assert nhq.shuffle_maxnreg(1, 16384, 8, hadamard=False) is None  # no Hadamard: not measured under a cap
    monkeypatch.setattr(nhq, "_CUDA_OPTIONS", frozenset({"num_warps"}))  # a Triton without the option
    assert nhq.shuffle_maxnreg(1, 16384, 8) is None
    monkeypatch.setattr(nhq, "_CUDA_OPTIONS", frozenset({"maxnreg"}))
    monkeypatch.setattr(nhq, "_SHFL_MAXNREG", False)
    assert nhq.shuffle_maxnreg(1, 16384, 8) is None


def test_shuffle_register_cap_dropped_where_it_spills(monkeypatch):
    """A ptxas that spills under the register cap (another Triton than the measured one): the first launch's
    results stand, a warning names the shape, and later launches of that kernel go uncapped; one that does not
    spill keeps its cap. The launches are recorded by a stand-in for the kernel (the cap is a GPU launch option)."""
    import bitnet_dist.kernels.norm_hadamard_quant as nhq

    class Compiled:
        def __init__(self, spills):
            self.n_spills = spills

    launches = []

    class Kernel:
        def __init__(self, spills):
            self.spills = spills

        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append(kw.get("maxnreg"))
                return Compiled(self.spills)
            return launch

    monkeypatch.setattr(nhq, "interpreting", lambda: False)
    monkeypatch.setattr(nhq, "_CUDA_OPTIONS", frozenset({"maxnreg"}))
    monkeypatch.setattr(nhq, "_CAP_CHECKED", set())
    monkeypatch.setattr(nhq, "_CAP_SPILLED", set())
    x = torch.zeros(4, 16384, dtype=torch.bfloat16)
    g = torch.ones(16384, dtype=torch.bfloat16)
    q = torch.empty(4, 16384, dtype=torch.int8)
    s, r = torch.empty(4), torch.empty(4)
    kw = dict(act_bits=8, hb=256, has_norm=True, eps=1e-5, full=16384, reduce_tp=False, fp8_codes=False,
              checked=True)
    cfg = nhq.shuffle_config(16384)
    monkeypatch.setattr(nhq, "_FWD_SHFL", Kernel(spills=0))
    nhq._nhq_shfl(x, g, q, s, r, cfg, **kw)
    nhq._nhq_shfl(x, g, q, s, r, cfg, **kw)
    assert launches == [80, 80]
    launches.clear()
    monkeypatch.setattr(nhq, "_FWD_SHFL", Kernel(spills=8))
    with pytest.warns(RuntimeWarning, match="16384 features: 8 bytes spilled"):
        nhq._nhq_shfl(x, g, q, s, r, cfg, **dict(kw, act_bits=4))
    nhq._nhq_shfl(x, g, q, s, r, cfg, **dict(kw, act_bits=4))
    nhq._nhq_shfl(x, g, q, s, r, cfg, **kw)  # the INT8 kernel was checked and keeps its cap
    assert launches == [80, None, 80]


@pytest.mark.parametrize("T,D,hb,cfg", [(37, 512, 256, ("shfl", 1, 1, 1)), (19, 384, 128, ("shfl", 2, 1, 2)),
                                        (33, 256, 16, ("shfl", 4, 2, 1)),
                                        # G_TILE: the norm weight re-read per tile (default from 8192 features)
                                        (37, 512, 256, ("shfl", 1, 1, 1, None, True)),
                                        (19, 384, 128, ("shfl", 2, 1, 2, None, True)),
                                        (37, 512, 1, ("shfl", 1, 1, 1)),  # no Hadamard (QKV / fc1)
                                        (19, 384, 1, ("shfl", 2, 1, 2, None, True))])
def test_warp_shuffle_backward_matches_autograd(T, D, hb, cfg, monkeypatch):
    """The warp-shuffle backward (persistent: more token blocks than programs) against autograd through the
    torch path, with and without the norm weight; and its one-time check (BITNET_KERNEL_SELF_CHECK) passes a
    correct kernel."""
    import bitnet_dist.kernels.norm_hadamard_quant as nhq
    monkeypatch.setattr(nhq, "SELF_CHECK", True)
    monkeypatch.setattr(nhq, "_SHFL_BWD_DEFAULT", {})
    torch.manual_seed(4)
    x, g, gu, rstd = backward_matches_autograd(T, D, hb, cfg)
    gx0, none = norm_hadamard_backward(gu, x, None, rstd, hadamard_block=hb, config=cfg)
    assert none is None
    torch.testing.assert_close(gx0, hadamard.fwht(gu, hb), rtol=1e-5, atol=1e-5)
    xb, gub = x.bfloat16(), gu.bfloat16()
    assert nhq._default_shuffle_bwd(gub, xb, g.bfloat16(), rstd, hb=hb) == nhq.shuffle_bwd_config(D)
    with pytest.raises(ValueError, match="share a dtype"):
        norm_hadamard_backward(gu, xb, g, rstd, hadamard_block=hb, config=cfg)


def test_bench_breakdown_runs_every_part_on_the_kernels():
    """bitnet_dist.bench_breakdown at a tiny shape through the interpreter: every kernel of the bf16-backward
    step runs on real operands and lands in the bounds; the FP8 parts (CUDA only) are absent, not faked."""
    from types import SimpleNamespace

    from bitnet_dist.bench_breakdown import bench_breakdown

    ran = []

    def timer(fn):
        out = fn()
        ran.append(out)
        return 1.0

    rows = bench_breakdown(SimpleNamespace(tokens=[16]), 3.0, [], timer, device="cpu",
                           shapes=[("tiny", "wo", 256, 32, True, 16)])
    (row,) = rows
    assert set(row["parts_ms"]) == {"nhq_a8", "nhq_a4", "gemm_fwd_a8", "gemm_fwd_a4", "gemm_fwd_bf16", "w_dequant",
                                    "x_dequant", "dgrad_bf16", "wgrad_bf16", "nhb", "w_accum"}
    assert len(ran) == len(row["parts_ms"])
    b = row["bounds"]
    assert set(b) == {"linear_bf16", "hbit_a8_bf16bwd", "hbit_a4_bf16bwd"}
    assert b["linear_bf16"]["ms"] == 4.0 and b["hbit_a8_bf16bwd"]["sum_ms"] == 8.0


# ------------------------------------------------------------ fused SwiGLU input and what backward keeps
def _saved_storages(fn):
    """Run fn() under saved-tensor hooks: {(data_ptr, nbytes)} of the storages autograd keeps."""
    kept = set()

    def pack(t):
        kept.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, kept


def _ulps(a, b):
    """Largest difference in units of the last place of a's dtype (bf16: 7 mantissa bits, fp32: 23)."""
    bits = 7 if a.dtype == torch.bfloat16 else 23
    a, b = a.double(), b.double()
    ulp = torch.ldexp(torch.ones_like(a), (torch.frexp(torch.maximum(a.abs(), b.abs()))[1] - 1 - bits))
    return float(((a - b).abs() / ulp).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(9, 2 * 40), (3, 5, 2 * 1100)])  # odd rows, K not a multiple of the block
def test_swiglu_kernels_against_torch(dtype, shape):
    """The SwiGLU kernels against the torch twin (megatron's ops, autograd) in bf16 (one unit in the last place:
    the interpreter's exp is numpy's, torch's CPU silu another; on the GPU both call libdevice's, GPU test) and
    against the float64 formula in fp32 (a few units: one rounding per op);
    the twin's backward is autograd's bit for bit; SwiGLUFunction keeps h and nothing else."""
    from bitnet_dist.kernels.swiglu import (
        swiglu,
        swiglu_backward,
        swiglu_backward_reference,
        swiglu_op,
        swiglu_reference,
    )

    torch.manual_seed(11)
    h = (3 * torch.randn(*shape)).to(dtype)
    dx = torch.randn(*shape[:-1], shape[-1] // 2).to(dtype)
    hr = h.clone().requires_grad_()
    xr = swiglu_reference(hr)
    xr.backward(dx)
    assert torch.equal(swiglu_backward_reference(h, dx), hr.grad)  # the twin is autograd's ops
    x, dh = swiglu(h), swiglu_backward(h, dx)
    assert x.dtype == dtype and x.shape == xr.shape and dh.shape == h.shape
    if dtype == torch.bfloat16:  # against the torch twin
        assert _ulps(x, xr.detach()) <= 1.0 and _ulps(dh, hr.grad) <= 1.0
    else:  # fp32: against the float64 formula (torch's CPU silu is itself off by up to ~5 ulps)
        g64, u64 = torch.chunk(h.double(), 2, dim=-1)
        s64 = torch.sigmoid(g64)
        d64 = dx.double()
        ref_x = g64 * s64 * u64
        ref_dh = torch.cat([d64 * u64 * s64 * (1 + g64 * (1 - s64)), d64 * g64 * s64], dim=-1)
        assert _ulps(x, ref_x.float()) <= 3.0
        # silu' crosses zero (g near -1.28): relative to the gradient's scale there, not per element
        torch.testing.assert_close(dh.double(), ref_dh, rtol=1e-6, atol=1e-6 * float(ref_dh.abs().max()))
    hk = h.clone().requires_grad_()
    y, kept = _saved_storages(lambda: swiglu_op(hk))
    assert torch.equal(y, x)
    assert kept == {(hk.untyped_storage().data_ptr(), hk.untyped_storage().nbytes())}
    y.backward(dx)
    assert torch.equal(hk.grad, swiglu_backward(h, dx))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,hb", [(8, 16), (4, 32)])
def test_glu_input_equals_swiglu_then_layer_and_keeps_no_product(dtype, bits, hb):
    """glu=True: same output and gradients (bit for bit) as the SwiGLU kernel's product fed to the layer, and
    the product is not among the saved tensors (h is, shared with the caller's tensor)."""
    from bitnet_dist.kernels.swiglu import swiglu_op

    torch.manual_seed(12)
    K, N = 64, 40
    h = (2 * torch.randn(3, 7, 2 * K)).to(dtype)
    w = (0.02 * torch.randn(N, K)).to(dtype)
    g = (1 + 0.1 * torch.randn(K)).to(dtype)
    dy = torch.randn(3, 7, N).to(dtype)

    def run(glu):
        hh, ww, gg = (t.clone().requires_grad_() for t in (h, w, g))

        def fwd():
            inp = hh if glu else swiglu_op(hh)
            return hbit_linear(inp, ww, gg, act_bits=bits, hadamard_block=hb, eps=1e-5, glu=glu)

        y, kept = _saved_storages(fwd)
        y.backward(dy)
        return y.detach(), hh.grad, ww.grad, gg.grad, kept, hh

    fused, unfused = run(True), run(False)
    for a, b, name in zip(fused[:4], unfused[:4], ("y", "grad_h", "grad_w", "grad_norm")):
        assert torch.equal(a, b), name
    x_bytes = 3 * 7 * K * h.element_size()
    big = {nb for _, nb in fused[4] if nb >= x_bytes}
    assert big == {h.numel() * h.element_size()}, big  # only h: no x-sized product kept
    assert (fused[5].untyped_storage().data_ptr(), fused[5].untyped_storage().nbytes()) in fused[4]
    # unfused, the layer keeps the product (the test can fail): a storage of exactly x's size
    assert any(nb == x_bytes for _, nb in unfused[4])
    with pytest.raises(ValueError, match="glu=True"):
        hbit_linear(h, w, g, act_bits=bits, hadamard_block=hb, eps=1e-5, glu=False)
    with pytest.raises(ValueError, match="128 features and glu=True"):
        hbit_linear(h[..., :K], w, g, act_bits=bits, hadamard_block=hb, eps=1e-5, glu=True)


@pytest.mark.slow
@pytest.mark.parametrize("T,D,hb,bits,cfg", [(37, 512, 256, 8, ("shfl", 1, 1)), (19, 384, 128, 4, ("shfl", 2, 1)),
                                             (37, 512, 256, 8, ("shfl", 1, 1, None, 5)),  # packed, EVEN rows
                                             (19, 384, 128, 4, ("shfl", 2, 1, None, 5)),  # packed, masked columns
                                             (33, 256, 16, 4, ("shfl", 4, 2, None, 5))])
def test_swiglu_folded_into_fused_forward_equals_composition(T, D, hb, bits, cfg):
    """glu=True on the warp-shuffle forward (the product formed in registers): codes, scales and rstd equal, bit
    for bit, the SwiGLU kernel's product fed to the same kernel; INT8 / INT4, fp32 / bf16, an all-zero token;
    and the composed path (another config, or the default on CPU) gives the same."""
    from bitnet_dist.kernels.swiglu import swiglu

    torch.manual_seed(21)
    for dtype in (torch.float32, torch.bfloat16):
        h = (torch.randn(T, 2 * D) * torch.rand(T, 1) * 4).to(dtype)
        h[3] = 0
        g = (1 + 0.2 * torch.randn(D)).to(dtype)
        kw = dict(act_bits=bits, hadamard_block=hb, eps=1e-5)
        fused = norm_hadamard_quant(h, g, config=cfg, glu=True, **kw)
        composed = norm_hadamard_quant(swiglu(h), g, config=cfg, **kw)
        for a, b, name in zip(fused, composed, ("codes", "scale", "rstd")):
            assert a.shape == b.shape and torch.equal(a, b), name
        assert fused[0].shape == (T, D)
        for c in (None, launch_config(D, hb)):  # not the shuffle kernel: the SwiGLU kernel first
            for a, b in zip(norm_hadamard_quant(h, g, config=c, glu=True, **kw),
                            norm_hadamard_quant(swiglu(h), g, config=c, **kw)):
                assert torch.equal(a, b)
        rc, rs, u = reference_codes(swiglu(h), g, bits, hb)  # and the torch path's codes
        torch.testing.assert_close(fused[1], rs, rtol=2e-6, atol=0)
        assert_codes_equal(fused[0], rc, u, rs)
    with pytest.raises(ValueError, match="even count"):
        norm_hadamard_quant(h[:, :-1], g, config=cfg, glu=True, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("T,D,hb,cfg", [(37, 512, 256, ("shfl", 1, 1, 1)), (19, 384, 128, ("shfl", 2, 1, 2)),
                                        (37, 512, 256, ("shfl", 1, 1, 1, None, True)),
                                        (19, 384, 16, ("shfl", 2, 1, 2, None, True))])
def test_swiglu_folded_into_fused_backward_equals_composition(T, D, hb, cfg):
    """glu=True on the warp-shuffle backward (product recomputed in registers, the gradient w.r.t. h written
    directly): equal bit for bit to the plain backward on the SwiGLU kernel's product followed by the SwiGLU
    backward kernel, bf16 and fp32, with and without the norm weight; the composed path gives the same."""
    from bitnet_dist.kernels.swiglu import swiglu, swiglu_backward

    torch.manual_seed(22)
    for dtype in (torch.float32, torch.bfloat16):
        h = (2 * torch.randn(T, 2 * D)).to(dtype)
        gu = torch.randn(T, D).to(dtype)
        rstd = torch.rand(T) + 0.5
        for g in ((1 + 0.2 * torch.randn(D)).to(dtype), None):
            gh, gg = norm_hadamard_backward(gu, h, g, rstd, hadamard_block=hb, config=cfg, glu=True)
            gx, gg0 = norm_hadamard_backward(gu, swiglu(h), g, rstd, hadamard_block=hb, config=cfg)
            assert gh.shape == h.shape and gh.dtype == dtype
            assert torch.equal(gh, swiglu_backward(h, gx))
            assert (gg is None and gg0 is None) or torch.equal(gg, gg0)
            gh2, gg2 = norm_hadamard_backward(gu, h, g, rstd, hadamard_block=hb, glu=True)  # default: composed
            gx2, _ = norm_hadamard_backward(gu, swiglu(h), g, rstd, hadamard_block=hb)
            assert torch.equal(gh2, swiglu_backward(h, gx2))


def test_glu_fold_launch_configs():
    """The folded kernels' launch configs: at most 32 (forward) / 16 (backward) features per thread, 16 warps at
    most; no folded backward past that (16384 features: composed), which the default path then takes."""
    import bitnet_dist.kernels.norm_hadamard_quant as nhq

    assert [nhq.glu_shuffle_config(d) for d in (1024, 2048, 4096, 8192, 16384)] == [
        ("shfl", 4, 4), ("shfl", 1, 2), ("shfl", 1, 4), ("shfl", 1, 8), ("shfl", 1, 16)]
    assert [nhq.glu_shuffle_bwd_config(d) for d in (1024, 4096, 8192, 16384)] == [
        ("shfl", 4, 8, 2, None, False), ("shfl", 1, 8, 2, None, False), ("shfl", 1, 16, 1, None, True), None]
    for d in (256, 1024, 2048, 4096, 8192, 16384):
        _, bm, w = nhq.glu_shuffle_config(d)
        assert bm * max(16, d) // (32 * w) <= 32
    gu, x = torch.randn(4, 16384).bfloat16(), torch.randn(4, 16384).bfloat16()
    assert nhq._default_shuffle_bwd(gu, x, None, torch.ones(4), hb=256, glu=True) is None


def test_glu_fold_check_fails_loudly(monkeypatch):
    """The one-time GLU check (BITNET_KERNEL_SELF_CHECK): a disagreeing kernel raises, naming the switch that
    composes the two kernels (cached: it raises again); inside CUDA-graph capture an unchecked configuration is not
    checked (and not cached); without the option there is no check."""
    import bitnet_dist.kernels.norm_hadamard_quant as nhq

    monkeypatch.setattr(nhq, "_GLU_CHECKED", {})
    h, g, cfg = torch.randn(4, 64), torch.ones(32), ("shfl", 1, 1)
    monkeypatch.setattr(nhq, "SELF_CHECK", False)
    assert nhq._glu_verified("forward", h, g, cfg, lambda: False) and not nhq._GLU_CHECKED
    monkeypatch.setattr(nhq, "SELF_CHECK", True)
    monkeypatch.setattr(nhq, "_capturing", lambda: True)
    assert not nhq._glu_verified("forward", h, g, cfg, lambda: True) and not nhq._GLU_CHECKED
    monkeypatch.setattr(nhq, "_capturing", lambda: False)
    with pytest.raises(RuntimeError, match="SwiGLU folded in disagrees.*BITNET_GLU_FOLD=0"):
        nhq._glu_verified("forward", h, g, cfg, lambda: False)
    with pytest.raises(RuntimeError, match="disagrees"):  # cached
        nhq._glu_verified("forward", h, g, cfg, lambda: True)
    assert nhq._glu_verified("forward", h, g, cfg, lambda: True, (4, 256))  # another specialization: its own check
    assert nhq._glu_verified("backward", h, g, cfg, lambda: True)


def test_strided_input_is_kept_as_given_not_copied():
    """A [s, b, D] view of a [b, s, D] tensor (SDPA's output layout, as the attention hands it to Wo): the
    layer keeps that storage (shared with its producer), not the [s * b, D] copy it makes for the kernel;
    results equal the contiguous input's."""
    torch.manual_seed(13)
    base = torch.randn(2, 9, 64)  # [b, s, D]
    w, g, dy = 0.02 * torch.randn(24, 64), 1 + 0.1 * torch.randn(64), torch.randn(9, 2, 24)
    res = []
    for make in (lambda: base.clone().requires_grad_(), lambda: base.transpose(0, 1).contiguous().requires_grad_()):
        leaf = make()
        x = leaf.transpose(0, 1) if leaf.shape[0] == 2 else leaf  # [s, b, D]

        def fwd(x=x):
            return hbit_linear(x, w, g, act_bits=8, hadamard_block=16, eps=1e-5)

        y, kept = _saved_storages(fwd)
        y.backward(dy)
        g_leaf = leaf.grad.transpose(0, 1) if leaf.shape[0] == 2 else leaf.grad
        res.append((y.detach(), g_leaf, kept, leaf))
    (y1, gx1, kept1, leaf1), (y2, gx2, _, _) = res
    assert not res[0][3].transpose(0, 1).is_contiguous()
    assert torch.equal(y1, y2) and torch.equal(gx1, gx2)
    big = {nb for _, nb in kept1 if nb >= base.numel() * 4}
    assert big == {base.numel() * 4}
    assert (leaf1.untyped_storage().data_ptr(), leaf1.untyped_storage().nbytes()) in kept1


@pytest.mark.slow
@pytest.mark.parametrize("T,D,hb,bits,glu", [(37, 512, 256, 8, False), (19, 384, 128, 4, False), (1, 256, 64, 8, False),
                                             (37, 512, 256, 4, True), (6, 256, 16, 8, True)])
def test_launch_plans_equal_the_full_path(T, D, hb, bits, glu):
    """The launch plans (what a call signature's first default call worked out, reused by later calls: host time)
    give the codes, scales, rstd and gradients of the full path at the same config, bit for bit: plain and
    SwiGLU-folded, fp32 / bf16, with and without the norm weight, odd and tiny token counts, token counts that
    change between calls of one plan (the launch key's integer classes), and no tokens."""
    import bitnet_dist.kernels.norm_hadamard_quant as nhq

    torch.manual_seed(5)
    fcfg, bcfg = ("shfl", 1, 1), ("shfl", 1, 1, 2)
    for dtype in (torch.float32, torch.bfloat16):
        for g in ((1 + 0.2 * torch.randn(D)).to(dtype), None):
            xin = (2 * torch.randn(max(T, 16), 2 * D if glu else D)).to(dtype)
            kw = dict(act_bits=bits, hb=hb, has_norm=g is not None, eps=1e-5, full=D, fp8_codes=False, glu=glu)
            fplan = nhq._FwdPlan(xin, g if g is not None else xin, D, fcfg, **kw)
            bplan = nhq._BwdPlan(xin, D, bcfg, hb=hb, has_norm=g is not None, full=D, glu=glu)
            for t in (T, 16, 3, 0):
                x = xin[:t]
                want = norm_hadamard_quant(x, g, act_bits=bits, hadamard_block=hb, eps=1e-5, config=fcfg, glu=glu)
                got = fplan(x, g)
                for a, b in zip(got, want):
                    assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), (dtype, t)
                gu = torch.randn(x.shape[0], D).to(dtype)
                want = norm_hadamard_backward(gu, x, g, want[2], hadamard_block=hb, config=bcfg, glu=glu)
                got = bplan(gu, x, g, got[2])
                assert torch.equal(got[0], want[0]) and got[0].shape == x.shape
                assert (got[1] is None and want[1] is None) or torch.equal(got[1], want[1])


def test_launch_plan_keys_cover_what_the_default_path_reads(monkeypatch):
    """A plan is reused only for calls the default path would treat the same: the key changes with the row width,
    row stride, pointer alignment, dtypes, options and the module's switches, and when a one-time-check cache is
    swapped out (tests that reset the checks get them again); it does not change with the token count."""
    import bitnet_dist.kernels.norm_hadamard_quant as nhq

    x = torch.randn(64, 512).bfloat16()
    g = torch.ones(512).bfloat16()
    kw = dict(act_bits=4, hadamard_block=256, eps=1e-5, full_dim=None, tp_group=None, fp8_codes=True, glu=False)
    k0 = nhq._fwd_plan_key(x, g, **kw)
    assert nhq._fwd_plan_key(x[:13], g, **kw) == k0
    wide = torch.randn(64, 520).bfloat16()
    others = [nhq._fwd_plan_key(x[:, :256], g[:256], **kw), nhq._fwd_plan_key(wide[:, :512], g, **kw),
              nhq._fwd_plan_key(wide[:, 1:513], g, **kw), nhq._fwd_plan_key(x.float(), g, **kw),
              nhq._fwd_plan_key(x, None, **kw), nhq._fwd_plan_key(x, g.float(), **kw),
              nhq._fwd_plan_key(x, g, **{**kw, "act_bits": 8}), nhq._fwd_plan_key(x, g, **{**kw, "eps": 1e-6}),
              nhq._fwd_plan_key(x, g, **{**kw, "fp8_codes": False}), nhq._fwd_plan_key(x, g, **{**kw, "glu": True}),
              nhq._fwd_plan_key(x, g, **{**kw, "full_dim": 1024})]
    assert k0 not in others and len(set(others)) == len(others)
    for name, value in (("SHUFFLE_FWD", False), ("GLU_FOLD", False), ("SELF_CHECK", not nhq.SELF_CHECK),
                        ("_SHFL_DEFAULT", {}), ("_GLU_CHECKED", {}), ("_CAP_SPILLED", set()),
                        ("_SHFL_BWD_DEFAULT", {})):
        with monkeypatch.context() as m:
            m.setattr(nhq, name, value)
            assert nhq._fwd_plan_key(x, g, **kw) != k0, name
    gu = torch.randn(64, 512).bfloat16()
    b0 = nhq._bwd_plan_key(gu, x, g, 256, None, None, False)
    assert nhq._bwd_plan_key(gu[:7], x[:7], g, 256, None, None, False) == b0
    assert b0 != nhq._bwd_plan_key(gu.float(), x, g, 256, None, None, False)
    assert b0 != nhq._bwd_plan_key(torch.randn(64, 520).bfloat16()[:, 1:513], x, g, 256, None, None, False)
    # CPU tensors never take or register plans (the default path's warp-shuffle kernels are CUDA-only)
    n = len(nhq._PLANS)
    norm_hadamard_quant(x, g, act_bits=4, hadamard_block=256, eps=1e-5)
    assert len(nhq._PLANS) == n


def test_weight_batch_equals_the_per_weight_quantization():
    """WeightBatch (every weight of a model quantized in a few launches, per step generation) against
    quantize_weight on each weight alone: the same scales and codes bit for bit (the same kernel arithmetic),
    FP8 codes where a member wants them and only there; two dtypes (two sets), separate allocations, a strided
    weight, 1, 3 and 7 segments, two abs-sum block sizes. It runs once per generation, on the first member asked
    for; the next generation sees weights written through .data; a member whose FP8 need changes gets its
    tables rebuilt; a call whose key the batch did not fill (other segments) takes the per-weight path."""
    from bitnet_dist import step_cache
    from bitnet_dist.kernels import ternary

    torch.manual_seed(21)
    P = torch.nn.Parameter
    ws = [P(torch.randn(70, 45) * 0.02), P(torch.randn(40, 64)), P(torch.randn(33, 1030) * 3),
          P(torch.randn(40, 100)[:, 10:74]), P((torch.randn(70, 45) * 0.02).bfloat16()),
          P(torch.randn(24, 32).bfloat16())]
    segs = [torch.tensor([0] * 30 + [1] * 20 + [2] * 20), None, None, torch.arange(40) // 20,
            torch.arange(70) // 10, None]
    want8 = [True, False, True, False, True, True]
    flags = list(want8)
    members = [ternary.WeightMember(w, s, None, (lambda i=i: flags[i])) for i, (w, s) in enumerate(zip(ws, segs))]
    odd = ternary.WeightMember(P(torch.randn(8, 16)), torch.zeros(8, dtype=torch.int32))  # int32 ids: not taken
    try:
        step_cache.advance()
        batch = ternary.WeightBatch.attach(members + [odd])
        assert batch is not None and len(batch.members) == 6 and not hasattr(odd.weight, ternary._BATCH_ATTR)

        def check():
            for i in reversed(range(6)):  # the last member asked first: it runs the whole batch
                got = cached_ternary(ws[i], segs[i], fp8=flags[i])
                ref = quantize_weight(ws[i], segs[i], fp8=flags[i])
                assert torch.equal(got.scale, ref.scale) and torch.equal(got.codes, ref.codes), i
                assert (got.fp8 is not None) == flags[i], i
                if flags[i]:
                    assert torch.equal(got.fp8.float(), ref.fp8.float())
                assert cached_ternary(ws[i], segs[i], fp8=flags[i]) is got

        check()
        assert batch.runs == 1 and len(batch._plans) == 2
        plans = dict(batch._plans)
        with torch.no_grad():
            ws[2].data.mul_(-1.0)  # through .data: no version bump; the next generation must see it
        step_cache.advance()
        check()
        assert batch.runs == 2 and all(batch._plans[k] is plans[k] for k in plans)  # tables reused
        flags[1] = True  # the layer now wants FP8 codes (A8 -> A4)
        step_cache.advance()
        check()
        assert batch.runs == 3 and any(batch._plans[k] is not plans[k] for k in plans)
        other = torch.arange(70) % 3  # not the registered ids: the batch's entry does not match
        got = cached_ternary(ws[0], other)
        ref = quantize_weight(ws[0], other)
        assert torch.equal(got.scale, ref.scale) and torch.equal(got.codes, ref.codes) and batch.runs == 3
        step_cache.reset()
        assert cached_ternary(ws[0], segs[0]) is not cached_ternary(ws[0], segs[0])  # no generation: no batch
        assert batch.runs == 3
    finally:
        step_cache.reset()
        ternary.WeightBatch.detach(ws)


@pytest.mark.slow
@pytest.mark.parametrize("tp,sequence", [(2, False), (2, True)])
def test_weight_batch_under_tensor_parallelism(tp, sequence):
    """A model's weights batched at TP=2 (one all-reduce of the concatenated statistics) give the bits of the
    per-weight path (one all-reduce each) and the torch path's absmean, with and without sequence parallelism
    (the column-parallel layers take the fused path under it too)."""
    from dist_utils import run_ranks
    from mp_workers import weight_batch_tp

    for batched, total, runs, mismatches, rel in run_ranks(weight_batch_tp, tp, sequence):
        assert total == 8 and batched == 8, (batched, total)
        assert runs == 1 and mismatches == 0
        assert rel <= 1e-6


@pytest.mark.slow
def test_weight_batch_does_not_keep_the_model_alive():
    """A model whose weights are batched (layers.batch_weight_quant, one run) is freed once deleted, with its
    parameters' AccumulateGrad nodes held with hooks as megatron DDP holds them: the batch keeps no strong
    reference to its weights or layers. (The cycle the first version made, layer -> weight -> batch -> FP8
    callable -> layer, was freed on the CPU but not with megatron DDP on the GPU: the GPU test
    test_deleted_engine_is_freed_with_its_weight_batch has the control.)"""
    from dist_utils import run_ranks
    from mp_workers import weight_batch_releases_the_model

    n, runs, model_freed, weight_freed = run_ranks(weight_batch_releases_the_model, 1)[0]
    assert n == 8 and runs == 1
    assert model_freed and weight_freed
