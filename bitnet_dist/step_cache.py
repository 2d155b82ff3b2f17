"""One generation per optimizer step for caches of values derived from the weights.

The Triton path quantizes each ternary weight once per optimizer step and lets the step's micro-batches
reuse the codes (kernels/ternary.py ``cached_ternary``). A cache keyed on the parameter's version counter
alone is not enough: megatron-core's optimizers write the new weights through ``param.data``
(distrib_optimizer.py ``_copy_main_params_to_model_params``: ``shard_model_param.data.copy_``; optimizer.py
``_multi_tensor_copy_this_to_that`` on ``param.data``), and writes through ``.data`` do not bump the
version. Measured on the H100: the cache kept the first step's codes for the whole run, and an engine
resumed from a checkpoint computed another loss from bitwise-equal weights.

So the cache is also keyed on a generation that the training engines open at the start of every
``train_step`` and ``eval_loss`` (the weights do not change inside one). Outside an engine the generation
is None and nothing is cached: a hand-written loop gets fresh codes on every call. A loop of its own that
wants the reuse calls :func:`advance` after each optimizer step.
"""
from __future__ import annotations

from typing import Optional

_generation: Optional[int] = None


def advance() -> int:
    """Open a new generation (the weights may have changed); returns it."""
    global _generation
    _generation = 0 if _generation is None else _generation + 1
    return _generation


def current() -> Optional[int]:
    """The open generation, or None (caching off)."""
    return _generation


def reset() -> None:
    """Caching off again (tests; a process that leaves the training loop)."""
    global _generation
    _generation = None
