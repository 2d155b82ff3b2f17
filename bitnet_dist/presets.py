"""Model and precision presets.

Model sizes 400M-7B are the paper's table (BitNet v2, arXiv 2504.18415, Table 1 / our
docs: ../shared/docs/bitnet-v2.md section 3). ``tiny`` is for unit tests, ``small`` for the CPU quick
start. ``hadamard_block`` is part of the *model* (not derived from the TP degree) so the model
computes the same function at every TP degree; it must divide hidden/TP and ffn/TP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

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
    from bitnet_dist.errors import ConfigError

    if name not in MODEL_PRESETS:
        raise ConfigError("model", name, f"one of {sorted(MODEL_PRESETS)}")
    return replace(MODEL_PRESETS[name], **overrides)


def precision_preset(name: str, **overrides) -> PrecisionConfig:
    from bitnet_dist.errors import ConfigError

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
