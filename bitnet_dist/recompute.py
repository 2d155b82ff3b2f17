"""Activation recomputation (``trainer.recompute``), mapped onto megatron-core's own.

    none       keep every activation (the default)
    selective  recompute the submodules in ``trainer.recompute_modules`` in backward: "mlp" (the whole MLP: fc1,
               the SwiGLU, fc2 and their quantization; most of a layer's activation memory) and / or "core_attn"
               (the attention product; little to gain with SDPA's flash kernels, which keep no s x s matrix)
    full       recompute whole transformer layers from their inputs, ``trainer.recompute_num_layers`` layers
               per checkpointed unit (megatron's "uniform" method): a layer keeps only its input

Both engines build megatron's GPTModel, so both use megatron's TransformerConfig fields (recompute_granularity,
recompute_method, recompute_num_layers, recompute_modules) and megatron's checkpoint function, which restores the
RNG states (``megatron.core.tensor_parallel.random``). This module imports nothing of the package but ``errors``.
"""
from __future__ import annotations

from bitnet_dist.errors import ConfigError

RECOMPUTE = ("none", "selective", "full")
SELECTIVE_MODULES = ("mlp", "core_attn")


def check_recompute(trainer, model=None, pipeline: int = 1) -> None:
    """ConfigError for an impossible ``trainer.recompute*`` setting (before any process-group work)."""
    r = getattr(trainer, "recompute", "none")
    if r not in RECOMPUTE:
        raise ConfigError("trainer.recompute", r, f"one of {list(RECOMPUTE)}")
    mods = list(getattr(trainer, "recompute_modules", None) or [])
    if r == "selective":
        bad = [m for m in mods if m not in SELECTIVE_MODULES]
        if not mods or bad:
            raise ConfigError("trainer.recompute_modules", mods,
                              f"a non-empty list of {list(SELECTIVE_MODULES)} with trainer.recompute=selective")
    n = getattr(trainer, "recompute_num_layers", 1)
    if r == "full":
        if not isinstance(n, int) or n < 1:
            raise ConfigError("trainer.recompute_num_layers", n, "a positive number of layers per recomputed unit")
        if model is not None:
            local = model.num_layers // max(1, pipeline)
            if n > local:
                raise ConfigError("trainer.recompute_num_layers", n,
                                  f"at most the layers of a pipeline stage ({local} = model.num_layers "
                                  f"{model.num_layers} / parallel.pipeline {pipeline})")


def megatron_recompute(trainer) -> dict:
    """The TransformerConfig fields of ``trainer.recompute`` (empty for none)."""
    r = getattr(trainer, "recompute", "none")
    if r == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": list(trainer.recompute_modules)}
    if r == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform",
                "recompute_num_layers": int(trainer.recompute_num_layers)}
    return {}
