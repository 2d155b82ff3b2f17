"""Model and precision presets.

Model sizes 400M-7B are the paper's table (BitNet v2, arXiv 2504.18415, Table 1; docs/method.md). ``tiny`` is for unit tests, ``small`` for the CPU quick
start. ``hadamard_block`` is part of the *model* (not derived from the TP degree) so the model
computes the same function at every TP degree; it must divide hidden/TP and ffn/TP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

from bitnet_dist.errors import ConfigError

VOCAB_MULTIPLE = 128  # megatron's default make_vocab_size_divisible_by


def padded_vocab_size(vocab_size: int, tensor_parallel: int = 1) -> int:
    """Embedding rows: the tokenizer's size rounded up to a multiple of lcm(128, TP).

    The same at every TP degree that divides 128 (so TP layouts compute the same function), and
    divisible by TP as megatron's VocabParallelEmbedding requires. Padded ids never occur in the data.
    """
    tp = max(1, int(tensor_parallel))
    multiple = VOCAB_MULTIPLE * tp // math.gcd(VOCAB_MULTIPLE, tp)
    return -(-int(vocab_size) // multiple) * multiple


@dataclass
class ModelConfig:
    name: str = "tiny"
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA; None = multi-head (as many groups as heads)
    num_layers: int = 2
    max_sequence_length: int = 2048
    hadamard_block: int = 32  # power of two dividing hidden/TP and ffn/TP; 0 = whole input dim (TP=1 only)
    rope_base: int = 10000
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    init_std: float = 0.02
    vocab_size: Optional[int] = None  # None: taken from the tokenizer at run time


@dataclass
class PrecisionConfig:
    """How the linear layers compute. See docs/bitnet-v2.md for the method."""

    name: str = "v2_a8"
    quantize: bool = True  # False: plain (bf16/fp32) megatron linear layers, LLaMA baseline
    hadamard: bool = True  # H-BitLinear on Wo / Wdown (only meaningful with quantize)
    act_bits: int = 8  # activation bits at the start of training (4 or 8)
    final_act_bits: Optional[int] = None  # bits after the switch; None = no switch
    switch_fraction: float = 0.95  # fraction of the run's tokens trained at act_bits before the switch
    kernels: str = "auto"  # auto: Triton kernels on CUDA when they apply, torch reference elsewhere; triton | torch
    # Triton path only: both backward GEMMs of the quantized layers in FP8 e4m3 (fp32 accumulation) instead of
    # bf16. Loss impact measured in docs/kernels.md; off by default.
    fp8_backward: bool = False
    # Quantized presets: the MLP hands [gate | up] to fc2 (Wdown), which applies the SwiGLU itself and keeps
    # [gate | up] + its codes instead of silu(gate) * up (recomputed in backward; same values). docs/kernels.md.
    fused_swiglu: bool = True


MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(name="tiny", hidden_size=64, ffn_hidden_size=128, num_attention_heads=8,
                        num_query_groups=4, num_layers=2, max_sequence_length=256, hadamard_block=16),
    "small": ModelConfig(name="small", hidden_size=256, ffn_hidden_size=768, num_attention_heads=4,
                         num_query_groups=4, num_layers=4, max_sequence_length=1024, hadamard_block=64),
    # The reproduction study's model (docs/results.md): power-of-two dims so that hadamard_block=0
    # (one transform over the whole input, the paper's setting) is defined for Wo and Wdown.
    "25M": ModelConfig(name="25M", hidden_size=512, ffn_hidden_size=2048, num_attention_heads=8,
                       num_query_groups=8, num_layers=6, max_sequence_length=1024, hadamard_block=128),
    "400M": ModelConfig(name="400M", hidden_size=1024, ffn_hidden_size=4096, num_attention_heads=16,
                        num_layers=24, hadamard_block=128),
    "1.3B": ModelConfig(name="1.3B", hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
                        num_layers=18, hadamard_block=256),
    "3B": ModelConfig(name="3B", hidden_size=4096, ffn_hidden_size=8192, num_attention_heads=32,
                      num_layers=20, hadamard_block=256),
    "7B": ModelConfig(name="7B", hidden_size=4096, ffn_hidden_size=16384, num_attention_heads=32,
                      num_layers=24, hadamard_block=256),
}

PRECISION_PRESETS: dict[str, PrecisionConfig] = {
    "bf16": PrecisionConfig(name="bf16", quantize=False, hadamard=False, act_bits=8),
    "b158": PrecisionConfig(name="b158", quantize=True, hadamard=False, act_bits=8),
    "v2_a8": PrecisionConfig(name="v2_a8", quantize=True, hadamard=True, act_bits=8),
    "v2_a4": PrecisionConfig(name="v2_a4", quantize=True, hadamard=True, act_bits=4),
    "v2_a8_to_a4": PrecisionConfig(name="v2_a8_to_a4", quantize=True, hadamard=True, act_bits=8,
                                   final_act_bits=4, switch_fraction=0.95),
    "v2_a4_no_hadamard": PrecisionConfig(name="v2_a4_no_hadamard", quantize=True, hadamard=False, act_bits=4),
}


def model_preset(name: str, **overrides) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ConfigError("model", name, f"one of {sorted(MODEL_PRESETS)}")
    return replace(MODEL_PRESETS[name], **overrides)


def precision_preset(name: str, **overrides) -> PrecisionConfig:
    if name not in PRECISION_PRESETS:
        raise ConfigError("precision", name, f"one of {sorted(PRECISION_PRESETS)}")
    return replace(PRECISION_PRESETS[name], **overrides)


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None  # interleaved 1F1B: model chunks per pipeline rank
    sequence: bool = False
    zero_stage: int = 0  # DeepSpeed only; megatron uses its distributed optimizer (ZeRO-1-like)
    distributed_optimizer: bool = True  # megatron engine
    offload_optimizer: bool = False  # DeepSpeed ZeRO offload (cpu)
    offload_params: bool = False  # DeepSpeed ZeRO-3 param offload (cpu)
    extra: dict = field(default_factory=dict)


# -- model / precision / parallel-layout checks (used by the model builder, the engines and validate) --------
def _is_pow2(n: int) -> bool:
    return isinstance(n, int) and n > 0 and (n & (n - 1)) == 0


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_model(model: ModelConfig, precision: PrecisionConfig, parallel: ParallelConfig) -> None:
    """Model / precision / tensor- and pipeline-parallel layout checks ."""
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
    if not isinstance(precision.fp8_backward, bool):
        raise ConfigError("precision.fp8_backward", precision.fp8_backward, "true or false")
    if precision.quantize and precision.hadamard and model.hadamard_block == 0:
        # 0 = one transform over each layer's whole input (the paper's setting): only defined at TP=1,
        # because a full-dimension transform mixes TP shards.
        if tp != 1:
            raise ConfigError("model.hadamard_block", 0,
                              "a power of two dividing hidden/TP and ffn/TP when parallel.tensor > 1 "
                              "(0 = full dimension needs parallel.tensor=1)")
        for name, dim in (("model.hidden_size", h), ("model.ffn_hidden_size", f)):
            if not _is_pow2(dim):
                raise ConfigError("model.hadamard_block", 0,
                                  f"a power of two dividing {name}={dim} (0 = full dimension needs power-of-two dims)")
    elif precision.quantize and precision.hadamard:
        b = model.hadamard_block
        valid = [2 ** k for k in range(1, 16) if (h // tp) % 2 ** k == 0 and (f // tp) % 2 ** k == 0]
        if not _is_pow2(b):
            raise ConfigError("model.hadamard_block", b, f"a power of two dividing hidden/TP and ffn/TP: one of {valid}")
        for name, dim in (("model.hidden_size", h), ("model.ffn_hidden_size", f)):
            if (dim // tp) % b:
                raise ConfigError("model.hadamard_block", b,
                                  f"a power of two dividing the per-rank slice {name}/parallel.tensor = {dim}/{tp} "
                                  f"= {dim // tp}: one of {valid} (or a smaller parallel.tensor)")
