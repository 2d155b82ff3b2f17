"""Launch configurations of the norm -> Hadamard -> quantize kernels: the tuned tables that pick, per row
length, the tokens per program, warps and Hadamard mode of each kernel family (nhq_chunked, nhq_flat,
nhq_shuffle). The defaults come from H100 sweeps (GPU time from CUDA-graph replays; docs/kernels.md). The
host side (norm_hadamard_quant) chooses the family and launches."""
from __future__ import annotations

from typing import Optional

import triton

from ._common import next_pow2


def launch_config(D: int, hadamard_block: int, *, max_chunk: int = 16384, elems: int = 4096):
    """(BM tokens, CHUNK features, num_warps) for a row length D; CHUNK is a power of two >= the block.

    From the H100 sweep (docs/benchmarks/kernels_h100_2026-11-25.json, "fused" rows with variants): one chunk per row is
    best up to 16384 features; about 4096 elements per program with 4 warps for short rows, one token
    per program with 8 warps for long ones."""
    C = max(16, min(next_pow2(D), max_chunk), hadamard_block)
    bm = max(1, elems // C, 256 // C)
    return bm, C, 4 if bm * C <= 4096 else 8


FLAT_MAX_FEATURES = 16384


def flat_config(D: int, hadamard_block: int, *, elems: int = 4096, hmode: Optional[int] = None,
                warps: Optional[int] = None, programs_per_sm: int = 2, prefetch: bool = True):
    """("flat", BM tokens, num_warps, HMODE, programs per SM, prefetch) for the flat kernels: about ``elems``
    features per tile and at least 16 tile rows (the tensor-core minimum)."""
    hbd = max(16, hadamard_block)
    nb = next_pow2(triton.cdiv(D, hbd))
    bm = max(1, elems // (nb * hbd), next_pow2(triton.cdiv(16, nb)))
    if warps is None:
        warps = 4 if bm * nb * hbd <= 8192 else 8
    if hmode is None:
        hmode = 3
    return ("flat", bm, warps, hmode, programs_per_sm, prefetch)


# Defaults from the H100 launch-config sweeps (GPU time from CUDA-graph replays; docs/kernels.md):
# forward: flat kernel with the batched two-stage Hadamard (HMODE 3), ~4096 features per tile, 2 programs
# per SM: 35-43% of copy bandwidth against 23-35% for the chunked kernel. Backward: the chunked kernel up to
# 2048 features (62% vs 52%), the flat kernel with HMODE 1, 8 warps, no prefetch above (48-63% vs 41-59%).
BWD_FLAT_MIN_FEATURES = 2048


def _valid(config, hb: int):
    bm, C, warps = config
    if C < max(hb, 16) or C & (C - 1) or bm & (bm - 1) or bm * C < 256:
        raise ValueError(f"launch config (BM={bm}, CHUNK={C}): CHUNK must be a power of two >= max(16, "
                         f"hadamard_block={hb}) and BM * CHUNK >= 256")
    return bm, C, warps


def shuffle_config(D: int, *, elems: Optional[int] = None, warps: Optional[int] = None):
    """("shfl", BM tokens, num_warps) for the warp-shuffle forward kernel: whole rows. Default from the H100
    sweep of the packed-register kernel (docs/kernels.md): one token per
    program and 64 features per thread from 2048 features (2 warps at 2048 and 4096, 4 at 8192, 8 at 16384);
    ~4096 features per tile with 4 warps below."""
    C = max(16, next_pow2(D))
    if elems is None:
        elems = C if C >= 2048 else 4096
    bm = max(1, elems // C)
    if warps is None:
        warps = max(2, min(8, C // 2048)) if bm == 1 and C >= 2048 else 4
    return ("shfl", bm, warps)


def shuffle_vec(bm: int, C: int, warps: int) -> int:
    """Consecutive features per thread in the layout Triton builds for the warp-shuffle kernel: the 1-byte
    code store's 16-byte vector, fewer where the tile has fewer elements per thread (seen in the TTGIR of
    Triton 3.6 / 3.9; checked at run time by ``_shuffle_verified``)."""
    return min(16, bm * C // (32 * warps))


def shuffle_bwd_config(D: int, *, elems: int = 4096, warps: Optional[int] = None,
                       programs_per_sm: Optional[int] = None, g_tile: Optional[bool] = None):
    """("shfl", BM tokens, num_warps, programs per SM, VEC (None: Triton's), G_TILE) for the warp-shuffle
    backward (persistent). Defaults from the H100 sweep at 16384 tokens (% of copy): ~4096 features per tile, 8 warps, 2 programs per SM up to 4096 features (79% / 82%); one
    token per tile with the norm weight re-read per tile (G_TILE) from 8192 features: 8 warps at 8192 (84%,
    was 68% with 4 warps holding g in registers, which spilled), 32 warps and one program per SM at 16384
    (88%, was 67%)."""
    C = max(16, next_pow2(D))
    big = C >= 8192
    if warps is None:
        warps = 32 if C >= 16384 else 8
    if programs_per_sm is None:
        programs_per_sm = 1 if C >= 16384 else 2
    return ("shfl", max(1, elems // C), warps, programs_per_sm, None, big if g_tile is None else g_tile)


def glu_shuffle_config(D: int):
    """Forward launch config with the SwiGLU folded in: the plain kernel's (``shuffle_config``) with at most 32
    features per thread (two halves are loaded, and exp / IEEE division added). H100, 8192 tokens, A4
    (GPU time): 8192 features on 8 warps 0.178 ms
    (4 warps, the plain kernel's: 0.225; the SwiGLU kernel + plain kernel: 0.225), 16384 on 16 warps 0.390 ms
    (8 warps: 0.456; composed 0.454)."""
    _, bm, warps = shuffle_config(D)
    C = max(16, next_pow2(D))
    return ("shfl", bm, min(16, max(warps, bm * C // 1024)))


def glu_shuffle_bwd_config(D: int):
    """Backward launch config with the SwiGLU folded in, or None (composed kernels): at most 16 features per
    thread on at most 16 warps, one program per SM from 16 warps. H100, 8192 tokens (glu_lab.py): 8192 features
    on 16 warps 0.345 ms (8 warps, 255 registers: 0.436-0.441; composed: 0.542). At 16384 every tried config
    spilled (32 warps are capped at 64 registers: 2.05 ms; 16 warps / 8 warps: 1.82-1.93 ms) against 1.06 ms
    composed: None there."""
    _, bm, warps, per_sm, vec, g_tile = shuffle_bwd_config(D)
    C = max(16, next_pow2(D))
    w = max(warps, bm * C // 512)
    if w > 16:
        return None
    return ("shfl", bm, w, 1 if w >= 16 else per_sm, vec, g_tile)
