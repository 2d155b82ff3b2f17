"""Forward GEMMs of BitLinear: ternary weight codes times quantized activation codes.

A8: ``int8_gemm`` (Triton): int8 [M, K] x int8 [N, K]^T -> int32 accumulators on the tensor cores
    (wgmma on Hopper), and the dequantization y = acc * s_act[m] * s_w[n] in the epilogue, written once
    in bf16 (or the activation dtype). Integer products are exact, so the only rounding is the output's.
A4: ``fp8_gemm``: the INT4 codes {-8..7} and the ternary codes {-1,0,1} are exact in FP8 e4m3, so an FP8
    GEMM with fp32 accumulation is an exact W1.58A4 product. It goes through ``torch._scaled_mm`` (cuBLASLt)
    with row-wise scales (s_act per row of A, s_w per column of B) and ``use_fast_accum=False``: Hopper's
    fast-accumulation mode keeps fewer accumulator bits; the precise mode keeps fp32 accumulation.
    Where ``_scaled_mm`` is missing (CPU, pre-Hopper), the caller uses ``int8_gemm`` (same integers).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FastLaunch, device_capability, interpreting, num_sms


def _configs():
    if interpreting():
        return [triton.Config({"BM": 32, "BN": 32, "BK": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    cfg = []
    # Hopper: 128x256 / 256x128 tiles with 128-deep int8 K slices keep the wgmma pipeline full.
    for bm, bn, bk, st, w in [(128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 4, 8),
                              (128, 256, 64, 4, 8), (128, 128, 64, 5, 4), (64, 128, 128, 4, 4)]:
        cfg.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=st))
    return cfg


@triton.autotune(configs=_configs(), key=["M", "N", "K"])
@triton.jit
def _int8_gemm_kernel(A, B, C, SA, SB, M, N, K, stride_am, stride_bn, stride_cm,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    # Grouped order: GROUP_M row tiles share each B column tile while it is in L2.
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    gm = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % gm
    pid_n = (pid % group) // gm
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptr = A + rm[:, None] * stride_am + rk[None, :]
    b_ptr = B + rn[None, :] * stride_bn + rk[:, None]
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BK)):
        kk = k * BK + rk
        a = tl.load(a_ptr, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)
        b = tl.load(b_ptr, mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptr += BK
        b_ptr += BK
    sa = tl.load(SA + rm, mask=rm < M, other=0.0)
    sb = tl.load(SB + rn, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    m = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(C + rm[:, None] * stride_cm + rn[None, :], y.to(C.dtype.element_ty), mask=m)


def _set_block_shapes(nargs):
    nargs["a_desc"].block_shape = [nargs["BM"], nargs["BK"]]
    nargs["b_desc"].block_shape = [nargs["BN"], nargs["BK"]]


def _tma_configs():
    cfg = []
    for bm, bn, bk, st, w in [(128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 4, 8),
                              (128, 128, 256, 3, 8), (128, 256, 64, 4, 8), (64, 256, 128, 4, 4)]:
        cfg.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=st,
                                 pre_hook=_set_block_shapes))
    return cfg


@triton.autotune(configs=_tma_configs(), key=["M", "N", "K", "PERSISTENT"])
@triton.jit
def _int8_gemm_tma_kernel(a_desc, b_desc, C, SA, SB, M, N, K, stride_cm, PERSISTENT: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """Hopper path: operands through TMA descriptors (bulk async copies into shared memory feeding wgmma);
    with PERSISTENT the grid is one program per SM walking the tiles in grouped order."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    group = GROUP_M * num_n
    for tile in range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
        first_m = (tile // group) * GROUP_M
        gm = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % group) % gm
        pid_n = (tile % group) // gm
        acc = tl.zeros([BM, BN], dtype=tl.int32)
        for k in range(k_tiles):
            a = a_desc.load([pid_m * BM, k * BK])
            b = b_desc.load([pid_n * BN, k * BK])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        sa = tl.load(SA + rm, mask=rm < M, other=0.0)
        sb = tl.load(SB + rn, mask=rn < N, other=0.0)
        y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
        m = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(C + rm[:, None] * stride_cm + rn[None, :], y.to(C.dtype.element_ty), mask=m)


def _tma_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    if interpreting() or a.device.type != "cuda" or device_capability(a.device) < (9, 0):
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    # TMA: 16-byte aligned bases and row strides.
    return all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 for t in (a, b))


def int8_gemm(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor,
              out_dtype=torch.bfloat16, impl: str = "auto") -> torch.Tensor:
    """a int8 [M, K], b int8 [N, K] (both K-contiguous), sa fp32 [M], sb fp32 [N] ->
    (a @ b.T) * sa[:, None] * sb[None, :] as ``out_dtype`` [M, N].

    ``impl``: "auto" (TMA persistent kernel on Hopper when the operands allow it, else the pointer kernel),
    "ptr", "tma", "tma_persistent" (the benchmark compares them)."""
    M, K = a.shape
    N = b.shape[0]
    assert a.dtype == torch.int8 and b.dtype == torch.int8 and b.shape[1] == K
    assert a.stride(1) == 1 and b.stride(1) == 1
    c = torch.empty((M, N), device=a.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    if impl == "auto":
        impl = GEMM_DEFAULT_IMPL
    if impl != "ptr" and not _tma_ok(a, b):  # TMA needs Hopper and 16-byte aligned rows
        impl = "ptr"
    if impl == "ptr":
        grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
        _int8_gemm_kernel[grid](a, b, c, sa, sb, M, N, K, a.stride(0), b.stride(0), c.stride(0))
        return c
    from triton.tools.tensor_descriptor import TensorDescriptor

    persistent = impl == "tma_persistent"
    sms = num_sms(a.device)
    key = (M, N, K, persistent, out_dtype, a.device.index)
    cfg = _TUNED.get(key)
    if cfg is None:
        # First call for this shape: the autotuner picks the config (its pre-hook sets the block shapes).
        a_desc = TensorDescriptor.from_tensor(a, [128, 128])
        b_desc = TensorDescriptor.from_tensor(b, [128, 128])

        def grid(meta):
            tiles = triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"])
            return (min(tiles, sms) if persistent else tiles,)

        _int8_gemm_tma_kernel[grid](a_desc, b_desc, c, sa, sb, M, N, K, c.stride(0), PERSISTENT=persistent)
        _TUNED[key] = _int8_gemm_tma_kernel.best_config.all_kwargs()
        return c
    # Later calls launch the tuned kernel directly: no autotuner bookkeeping on the host per call.
    a_desc = TensorDescriptor.from_tensor(a, [cfg["BM"], cfg["BK"]])
    b_desc = TensorDescriptor.from_tensor(b, [cfg["BN"], cfg["BK"]])
    tiles = triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"])
    # launch key: the tuned key (shapes, dtype, device) and what else the arguments specialize on (TMA bases are
    # 16-byte aligned, checked above; c is a fresh allocation)
    _TMA_LAUNCH.launch_keyed((key, a.stride(0), b.stride(0), sa.dtype, sb.dtype, sa.data_ptr() % 16 == 0,
                              sb.data_ptr() % 16 == 0), (min(tiles, sms) if persistent else tiles, 1, 1),
                             (a_desc, b_desc, c, sa, sb, M, N, K, c.stride(0)), {"PERSISTENT": persistent, **cfg})
    return c


_TUNED: dict = {}
_TMA_LAUNCH = FastLaunch(_int8_gemm_tma_kernel.fn)


# Chosen from the H100 comparison of the GEMM implementations (docs/kernels.md): the persistent TMA kernel was
# best or within 3% of best on all 8 layer shapes, 1.44-1.80x cuBLAS bf16 in GPU time.
GEMM_DEFAULT_IMPL = "tma_persistent"


_FP8_OK: dict = {}


def fp8_available(device: torch.device) -> bool:
    """FP8 tensor cores (sm_89+) and torch._scaled_mm with row-wise scales (cached per device: every layer call
    asks)."""
    if device.type != "cuda":
        return False
    ok = _FP8_OK.get(device.index)
    if ok is None:
        ok = _FP8_OK[device.index] = (hasattr(torch, "_scaled_mm") and not interpreting()
                                      and device_capability(device) >= (8, 9))
    return ok


def fp8_gemm(a8: torch.Tensor, b8: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor,
             out_dtype=torch.bfloat16) -> torch.Tensor:
    """a8 float8_e4m3fn [M, K] row-major, b8 float8_e4m3fn [N, K] row-major (used as the column-major
    B = b8.T), sa fp32 [M], sb fp32 [N] -> (a8 @ b8.T) * sa * sb with fp32 accumulation."""
    return fp8_gemm_t(a8, b8.t(), sa, sb.reshape(1, -1).float(), out_dtype)


def fp8_gemm_t(a8: torch.Tensor, b8_t: torch.Tensor, sa: torch.Tensor, sb_row: torch.Tensor,
               out_dtype=torch.bfloat16) -> torch.Tensor:
    """``fp8_gemm`` with B already as the column-major view ``b8.t()`` [K, N] and its scale as fp32 [1, N] (a
    layer's weight operands, made once per step: ``TernaryWeight.fp8_operands``)."""
    return torch._scaled_mm(a8, b8_t, scale_a=sa.reshape(-1, 1).float(), scale_b=sb_row, out_dtype=out_dtype,
                            use_fast_accum=False)


def scaled_gemm_reference(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor,
                          out_dtype=torch.bfloat16) -> torch.Tensor:
    """Exact torch twin: integer product in fp64 (exact for these sizes), scaled, rounded once."""
    acc = a.double() @ b.double().t()
    return (acc.float() * sa.float()[:, None] * sb.float()[None, :]).to(out_dtype)


# ------------------------------------------------------------------- FP8 operands for the backward GEMMs
@triton.jit
def _rowwise_fp8_kernel(X, COLSCALE, Q, S, T, N, stride_x, BM: tl.constexpr, BN: tl.constexpr,
                        NUM_CHUNKS: tl.constexpr):
    """Q[t, :] = e4m3(X[t, :] * colscale / S[t]) with S[t] = max_n |X[t, n] * colscale[n]| / 448."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < T
    amax = tl.zeros([BM], tl.float32)
    for c in range(NUM_CHUNKS):
        cols = c * BN + tl.arange(0, BN)
        m = rmask[:, None] & (cols < N)[None, :]
        v = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
        v = v * tl.load(COLSCALE + cols, mask=cols < N, other=0.0)[None, :]
        amax = tl.maximum(amax, tl.max(tl.abs(v), axis=1))
    s = tl.math.div_rn(tl.maximum(amax, 1e-30), 448.0)
    for c in range(NUM_CHUNKS):
        cols = c * BN + tl.arange(0, BN)
        m = rmask[:, None] & (cols < N)[None, :]
        v = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
        v = v * tl.load(COLSCALE + cols, mask=cols < N, other=0.0)[None, :]
        tl.store(Q + rows[:, None] * N + cols[None, :], (v / s[:, None]).to(tl.float8e4nv), mask=m)
    tl.store(S + rows, s, mask=rmask)


@triton.jit
def _colmax_kernel(X, ROWSCALE, AMAX, T, N, stride_x, BT: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    m = (rows < T)[:, None] & (cols < N)[None, :]
    v = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    v = v * tl.load(ROWSCALE + rows, mask=rows < T, other=0.0)[:, None]
    tl.atomic_max(AMAX + cols, tl.max(tl.abs(v), axis=0), mask=cols < N, sem="relaxed")


@triton.jit
def _colwise_fp8_t_kernel(X, ROWSCALE, AMAX, Q, S, T, N, stride_x, BT: tl.constexpr, BN: tl.constexpr):
    """Q[n, t] = e4m3(X[t, n] * rowscale[t] / S[n]), S[n] = AMAX[n] / 448 (transposed output)."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    m = (rows < T)[:, None] & (cols < N)[None, :]
    v = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    v = v * tl.load(ROWSCALE + rows, mask=rows < T, other=0.0)[:, None]
    s = tl.math.div_rn(tl.maximum(tl.load(AMAX + cols, mask=cols < N, other=1.0), 1e-30), 448.0)
    q = (v / s[None, :]).to(tl.float8e4nv)
    tl.store(Q + cols[None, :] * T + rows[:, None], q, mask=m)
    if tl.program_id(0) == 0:
        tl.store(S + cols, s, mask=cols < N)


@triton.jit
def _fp8_t_kernel(X, Q, T, K, BT: tl.constexpr, BK: tl.constexpr):
    """Q[k, t] = e4m3(X[t, k]) (codes, int8 or FP8, transposed)."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    m = (rows < T)[:, None] & (cols < K)[None, :]
    v = tl.load(X + rows[:, None] * K + cols[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(Q + cols[None, :] * T + rows[:, None], v.to(tl.float8e4nv), mask=m)


@triton.jit
def _dy_amax_kernel(X, COLSCALE, ROWSCALE, RAMAX, CAMAX, T, N, stride_x, BT: tl.constexpr, BN: tl.constexpr,
                    R: tl.constexpr):
    """One read of dy for both backward GEMMs' scales, R row tiles of [BT, BN] per program:
    RAMAX[t] = max |X[t, n] * colscale[n]| (grad_x's per-token scale) and CAMAX[n] = max |X[t, n] * rowscale[t]|
    (grad_W's per-channel scale); the column maxima gathered over the R tiles before one atomic. The atomics
    are relaxed: only the values after the kernel matter, and Triton's default (acq_rel) fences each one, which
    made this read-only pass 57-63% of copy bandwidth against 73-91% relaxed (H100, measured with the
    block-FP8 preparation alone)."""
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    cm = cols < N
    cs = tl.load(COLSCALE + cols, mask=cm, other=0.0)
    cacc = tl.zeros([BT, BN], tl.float32)  # element-wise maxima over the R tiles: one cross-row reduction
    for r in range(R):
        rows = (tl.program_id(0) * R + r) * BT + tl.arange(0, BT)
        rm = rows < T
        v = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
        v = tl.abs(v.to(tl.float32))
        rs = tl.load(ROWSCALE + rows, mask=rm, other=0.0)
        tl.atomic_max(RAMAX + rows, tl.max(v * cs[None, :], axis=1), mask=rm, sem="relaxed")
        cacc = tl.maximum(cacc, v * rs[:, None])
    tl.atomic_max(CAMAX + cols, tl.max(cacc, axis=0), mask=cm, sem="relaxed")


@triton.jit
def _dy_fp8_kernel(X, COLSCALE, ROWSCALE, AMAX, S, QR, QC, T, N, stride_x, BT: tl.constexpr, BN: tl.constexpr):
    """The second read of the tile: QR[t, n] = e4m3(X * colscale / SR[t]) and the transposed
    QC[n, t] = e4m3(X * rowscale / SC[n]), with S = max(AMAX, 1e-30) / 448 rounded to nearest (AMAX / S hold
    [T] row then [N] column values); the first column / row of programs writes S, the scales the codes used."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    rm, cm = rows < T, cols < N
    m = rm[:, None] & cm[None, :]
    v = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    cs = tl.load(COLSCALE + cols, mask=cm, other=0.0)
    rs = tl.load(ROWSCALE + rows, mask=rm, other=0.0)
    sr = tl.math.div_rn(tl.maximum(tl.load(AMAX + rows, mask=rm, other=1.0), 1e-30), 448.0)
    sc = tl.math.div_rn(tl.maximum(tl.load(AMAX + T + cols, mask=cm, other=1.0), 1e-30), 448.0)
    tl.store(QR + rows[:, None] * N + cols[None, :], (v * cs[None, :] / sr[:, None]).to(tl.float8e4nv), mask=m)
    tl.store(QC + cols[None, :] * T + rows[:, None], (v * rs[:, None] / sc[None, :]).to(tl.float8e4nv), mask=m)
    if tl.program_id(1) == 0:
        tl.store(S + rows, sr, mask=rm)
    if tl.program_id(0) == 0:
        tl.store(S + T + cols, sc, mask=cm)


_DY_AMAX, _DY_FP8 = FastLaunch(_dy_amax_kernel), FastLaunch(_dy_fp8_kernel)
_ROWWISE, _COLMAX, _COLWISE, _FP8_T = (FastLaunch(k) for k in (_rowwise_fp8_kernel, _colmax_kernel,
                                                                _colwise_fp8_t_kernel, _fp8_t_kernel))
# (BT, BN, num_warps, row tiles per program of the amax pass), from the H100 sweep tools/kernels/dy_lab.py
DY_TILE = (64, 128, 4, 8)


def dy_fp8_both(dy: torch.Tensor, col_scale: torch.Tensor, row_scale: torch.Tensor, tile=None):
    """``rowwise_fp8(dy, col_scale)`` and ``colwise_fp8_t(dy, row_scale)`` together, from two reads of dy
    instead of four (one for both amaxes, one writing both e4m3 copies):
    -> (e4m3 [T, N], fp32 [T], e4m3 [N, T], fp32 [N])."""
    T, N = dy.shape
    assert dy.stride(1) == 1
    bt, bn, warps, r = (*(tile or DY_TILE), 1)[:4]
    amax = torch.zeros(T + N, device=dy.device, dtype=torch.float32)
    s = torch.empty(T + N, device=dy.device, dtype=torch.float32)
    qr = torch.empty((T, N), device=dy.device, dtype=torch.float8_e4m3fn)
    qc = torch.empty((N, T), device=dy.device, dtype=torch.float8_e4m3fn)
    if T and N:
        _DY_AMAX[(triton.cdiv(T, bt * r), triton.cdiv(N, bn))](
            dy, col_scale, row_scale, amax, amax[T:], T, N, dy.stride(0), BT=bt, BN=bn, R=r, num_warps=warps)
        _DY_FP8[(triton.cdiv(T, bt), triton.cdiv(N, bn))](
            dy, col_scale, row_scale, amax, s, qr, qc, T, N, dy.stride(0), BT=bt, BN=bn, num_warps=warps)
    return qr, s[:T], qc, s[T:]


def rowwise_fp8(x: torch.Tensor, col_scale: torch.Tensor):
    """x [T, N] (any float, last dim contiguous) * col_scale [N] -> (e4m3 [T, N], fp32 row scale [T])."""
    T, N = x.shape
    q = torch.empty((T, N), device=x.device, dtype=torch.float8_e4m3fn)
    s = torch.empty(T, device=x.device, dtype=torch.float32)
    BN = min(2048, triton.next_power_of_2(N))
    BM = max(1, 4096 // BN)
    _ROWWISE[(triton.cdiv(T, BM),)](x, col_scale, q, s, T, N, x.stride(0), BM=BM, BN=BN,
                                    NUM_CHUNKS=triton.cdiv(N, BN), num_warps=8)
    return q, s


def colwise_fp8_t(x: torch.Tensor, row_scale: torch.Tensor):
    """x [T, N] * row_scale [T] -> (e4m3 [N, T] = transposed, scaled per column of x; fp32 scale [N])."""
    T, N = x.shape
    amax = torch.zeros(N, device=x.device, dtype=torch.float32)
    BT, BN = 64, 64
    grid = (triton.cdiv(T, BT), triton.cdiv(N, BN))
    _COLMAX[grid](x, row_scale, amax, T, N, x.stride(0), BT=BT, BN=BN)
    q = torch.empty((N, T), device=x.device, dtype=torch.float8_e4m3fn)
    # the scales come back from the kernel: the ones its codes used (torch's CUDA division by a scalar
    # multiplies by the reciprocal, which can differ in the last bit)
    s = torch.empty(N, device=x.device, dtype=torch.float32)
    _COLWISE[grid](x, row_scale, amax, q, s, T, N, x.stride(0), BT=BT, BN=BN)
    return q, s


def fp8_transpose(codes: torch.Tensor) -> torch.Tensor:
    """codes [T, K] (int8 or e4m3, contiguous) -> e4m3 [K, T] contiguous."""
    codes = codes.contiguous()
    T, K = codes.shape
    q = torch.empty((K, T), device=codes.device, dtype=torch.float8_e4m3fn)
    BT, BK = 64, 64
    _FP8_T[(triton.cdiv(T, BT), triton.cdiv(K, BK))](codes, q, T, K, BT=BT, BK=BK)
    return q
