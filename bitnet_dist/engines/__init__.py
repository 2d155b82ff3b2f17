"""Training engines behind one interface (bitnet_dist.engines.base.Engine).

``make_engine(cfg)`` picks the engine from ``engine.name``: ``auto`` is megatron on CUDA and DeepSpeed
otherwise (megatron-core's schedules and optimizer need CUDA). Each engine is imported only when
chosen, so a CPU run never imports megatron's GPU-only paths and vice versa.
"""
from __future__ import annotations

import torch

from bitnet_dist.engines.base import Engine, StepStats
from bitnet_dist.errors import ConfigError

ENGINE_NAMES = ("auto", "megatron", "deepspeed")


def resolve_engine_name(name: str) -> str:
    """``engine.name`` -> "megatron" or "deepspeed" (auto: megatron on CUDA, deepspeed otherwise)."""
    if name not in ENGINE_NAMES:
        raise ConfigError("engine", name, f"one of {list(ENGINE_NAMES)}")
    if name == "auto":
        return "megatron" if torch.cuda.is_available() else "deepspeed"
    return name


def make_engine(cfg) -> Engine:
    """Construct (without side effects) the engine ``cfg.engine.name`` selects."""
    name = resolve_engine_name(cfg.engine.name)
    # Deferred: each engine module imports its framework (megatron-core's GPU paths or DeepSpeed), which
    # only the chosen engine needs.
    if name == "megatron":
        from bitnet_dist.engines.megatron_engine import MegatronEngine

        return MegatronEngine(cfg)
    from bitnet_dist.engines.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(cfg)


__all__ = ["Engine", "StepStats", "make_engine", "resolve_engine_name", "ENGINE_NAMES"]
