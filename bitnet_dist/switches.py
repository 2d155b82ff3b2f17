"""The ``BITNET_*`` environment switches of the kernels, parsed in one place by one rule.

Each switch is on or off: ``1``, ``true``, ``on``, ``yes`` turn it on; ``0``, ``false``, ``off``, ``no`` turn it
off (any case); unset or empty keeps the default. Any other value raises ConfigError naming the variable.
The values are read when a kernel module is imported (once per process). docs/switches.md lists them; a test
keeps that page and :data:`SWITCHES` equal. This module imports nothing of bitnet_dist but errors, so the
kernels may use it.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

from bitnet_dist.errors import ConfigError

ON = ("1", "true", "on", "yes")
OFF = ("0", "false", "off", "no")

# name -> (default, what it controls)
SWITCHES: dict[str, tuple[bool, str]] = {
    "BITNET_TRITON_FAST_LAUNCH": (True, "Launch the Triton kernels through cached launchers (kernels/_common.py "
                                  "FastLaunch); off: every launch goes through Triton's JIT dispatch."),
    "BITNET_CHECK_LAUNCH_KEYS": (False, "Debugging: every cached launch also builds Triton's full specialization key "
                                 "and asserts it matches the cached one."),
    "BITNET_LAUNCH_PLANS": (True, "Cache a launch plan per shape for the fused norm/Hadamard/quantize kernels "
                            "(host time of small layers)."),
    "BITNET_SHUFFLE_HADAMARD": (True, "Use the warp-shuffle Hadamard kernels (nhq_shuffle) where the shape allows; "
                                "off: the tensor-core kernels (nhq_flat, nhq_chunked)."),
    "BITNET_PACKED_PTX": (True, "Packed bf16-pair / int8x4 inline PTX in the warp-shuffle forward on sm_90+."),
    "BITNET_SHFL_MAXNREG": (True, "Register cap for the widest warp-shuffle kernels where measured faster."),
    "BITNET_GLU_FOLD": (True, "Fold the SwiGLU into the fc2 (Wdown) norm/Hadamard/quantize kernels."),
    "BITNET_FUSED_WEIGHT_QUANT": (True, "Per-step ternary weight quantization with the statistic in a Triton kernel; "
                                  "off: the statistic in torch ops."),
    "BITNET_BATCHED_WEIGHT_QUANT": (True, "Quantize all ternary weights of a step in one batch of launches."),
    "BITNET_KERNEL_SELF_CHECK": (False, "On first use of each warp-shuffle (and SwiGLU-folded) kernel configuration, "
                                 "compare it with the tensor-core kernels on random rows and raise RuntimeError on a "
                                 "mismatch (a Triton build with another register layout)."),
}


def flag(name: str, env: Optional[Mapping[str, str]] = None) -> bool:
    """The value of switch ``name`` (one of :data:`SWITCHES`) in ``env`` (default: the process environment)."""
    if name not in SWITCHES:
        raise KeyError(f"{name} is not a BITNET_* switch (known: {sorted(SWITCHES)})")
    raw = (os.environ if env is None else env).get(name)
    if raw is None or raw.strip() == "":
        return SWITCHES[name][0]
    value = raw.strip().lower()
    if value in ON:
        return True
    if value in OFF:
        return False
    raise ConfigError(name, raw, f"one of {'/'.join(ON)} (on) or {'/'.join(OFF)} (off); empty or unset keeps the "
                      f"default ({'on' if SWITCHES[name][0] else 'off'})")


def markdown_table() -> str:
    """The switches as the table of docs/switches.md."""
    rows = ["| Variable | Default | Effect |", "|---|---|---|"]
    rows += [f"| `{name}` | {'on' if default else 'off'} | {text} |" for name, (default, text) in SWITCHES.items()]
    return "\n".join(rows) + "\n"
