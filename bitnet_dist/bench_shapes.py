"""Shapes the kernel benchmark measures (``bitnet_dist.bench`` and ``bitnet_dist.bench_breakdown`` both read them;
this module imports neither)."""
from __future__ import annotations

# (hidden, ffn) of the presets whose layer shapes the kernel benchmark measures; MHA, SwiGLU fc1 = 2 * ffn.
MODELS = {"1.3B": (2048, 8192), "7B": (4096, 16384)}
HB = 256  # Hadamard block of the benchmarked Wo / Wdown inputs


def layer_shapes(hidden: int, ffn: int):
    """(layer kind, in_features, out_features, hadamard)."""
    return [("qkv", hidden, 3 * hidden, False), ("wo", hidden, hidden, True),
            ("fc1", hidden, 2 * ffn, False), ("wdown", ffn, hidden, True)]
