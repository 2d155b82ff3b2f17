"""One place for configuration checks. Every check runs before any process group or GPU work and
raises ConfigError naming the key, the value, and what would work."""
from __future__ import annotations

from typing import Any

from bitnet_dist.presets import ModelConfig, ParallelConfig, PrecisionConfig


class ConfigError(ValueError):
    """A setting that cannot work. ``key`` is the Hydra key, ``value`` what was given, ``fix`` what works."""

    def __init__(self, key: str, value: Any, fix: str):
        self.key, self.value, self.fix = key, value, fix
        super().__init__(f"invalid {key}={value!r}: {fix}")


def _is_pow2(n: int) -> bool:
    return isinstance(n, int) and n > 0 and (n & (n - 1)) == 0


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_model(model: ModelConfig, precision: PrecisionConfig, parallel: ParallelConfig) -> None:
    """Model / precision / tensor- and pipeline-parallel layout checks (issue: bad configurations)."""
    tp, pp = parallel.tensor, parallel.pipeline
    if not isinstance(tp, int) or tp < 1:
        raise ConfigError("parallel.tensor", tp, "a positive integer")
    if not isinstance(pp, int) or pp < 1:
        raise ConfigError("parallel.pipeline", pp, "a positive integer")
    h, f, nh = model.hidden_size, model.ffn_hidden_size, model.num_attention_heads
    ng = model.num_query_groups or nh
    if h % nh:
        raise ConfigError("model.num_attention_heads", nh,
                          f"a divisor of model.hidden_size={h}, e.g. {[d for d in _divisors(h) if d <= 64][-3:]}")
    if nh % ng:
        raise ConfigError("model.num_query_groups", ng, f"a divisor of model.num_attention_heads={nh}")
    if nh % tp:
        raise ConfigError("parallel.tensor", tp,
                          f"a divisor of model.num_attention_heads={nh}: one of {_divisors(nh)}")
    if ng % tp:
        raise ConfigError("parallel.tensor", tp,
                          f"a divisor of model.num_query_groups={ng}: one of {_divisors(ng)}")
    if f % tp:
        raise ConfigError("parallel.tensor", tp,
                          f"a divisor of model.ffn_hidden_size={f}: one of {[d for d in _divisors(f) if d <= 64]}")
    if model.num_layers % pp:
        raise ConfigError("parallel.pipeline", pp,
                          f"a divisor of model.num_layers={model.num_layers}: one of {_divisors(model.num_layers)}")
    vp = parallel.virtual_pipeline
    if vp is not None:
        if pp < 2:
            raise ConfigError("parallel.virtual_pipeline", vp, "null unless parallel.pipeline >= 2")
        if model.num_layers % (pp * vp):
            raise ConfigError("parallel.virtual_pipeline", vp,
                              f"a value with model.num_layers={model.num_layers} divisible by pipeline*virtual ({pp}*{vp})")
    if parallel.sequence and tp < 2:
        raise ConfigError("parallel.sequence", True, "false unless parallel.tensor >= 2 (megatron requires TP>1 for SP)")
    if precision.act_bits not in (4, 8):
        raise ConfigError("precision.act_bits", precision.act_bits, "4 or 8")
    if precision.final_act_bits not in (None, 4, 8):
        raise ConfigError("precision.final_act_bits", precision.final_act_bits, "4, 8 or null (no switch)")
    if not 0.0 < precision.switch_fraction <= 1.0:
        raise ConfigError("precision.switch_fraction", precision.switch_fraction, "a fraction in (0, 1]")
    if precision.kernels not in ("auto", "triton", "torch"):
        raise ConfigError("precision.kernels", precision.kernels, "auto, triton or torch")
    if precision.quantize and precision.hadamard:
        b = model.hadamard_block
        valid = [2 ** k for k in range(1, 16) if (h // tp) % 2 ** k == 0 and (f // tp) % 2 ** k == 0]
        if not _is_pow2(b):
            raise ConfigError("model.hadamard_block", b, f"a power of two dividing hidden/TP and ffn/TP: one of {valid}")
        for name, dim in (("model.hidden_size", h), ("model.ffn_hidden_size", f)):
            if (dim // tp) % b:
                raise ConfigError("model.hadamard_block", b,
                                  f"a power of two dividing the per-rank slice {name}/parallel.tensor = {dim}/{tp} "
                                  f"= {dim // tp}: one of {valid} (or a smaller parallel.tensor)")
