"""Learning-rate, weight-decay and activation-bit schedules: pure functions of the optimizer step.

``step`` is the 0-based index of the optimizer step about to run (``step`` steps are already done);
a run has ``max_steps`` steps, 0 .. max_steps-1. Learning rates are in the optimizer's units.

* Warm-up (every schedule): ``lr = P1 * (step + 1) / warmup_steps`` for ``step < warmup_steps``, so
  the first step already moves and step ``warmup_steps - 1`` reaches P1.
* ``two_stage`` (BitNet b1.58 / v2: "decays linearly from peak P1; at the midpoint it drops onto a
  second linear-to-zero line with lower peak P2"). With W = warmup_steps, T = max_steps and
  M = T // 2 (the midpoint), both lines run from their peak at W to min at T:
  stage 1 (W <= step < M): ``min + (P1 - min) * (T - step) / (T - W)``;
  stage 2 (step >= M):     ``min + (P2 - min) * (T - step) / (T - W)``,
  so at M the rate drops by the factor (P2 - min) / (P1 - min) and then decays to min at T.
  Weight decay: ``weight_decay`` for step < M, ``weight_decay_stage2`` after.
* ``cosine``: ``min + (P1 - min) * (1 + cos(pi * (step - W) / (T - W))) / 2``; constant weight decay.
* ``constant``: P1 after warm-up; constant weight decay.
* Activation bits: ``act_bits`` for the first ``switch_step`` steps, where switch_step =
  floor(switch_fraction * T) (every step has the same tokens, so that is the fraction of the run's
  tokens), then ``final_act_bits``; no switch when final_act_bits is None.
"""
from __future__ import annotations

import math


def midpoint(max_steps: int) -> int:
    """First step of stage 2 of the two-stage schedule."""
    return max_steps // 2


def lr_at(step: int, optim, max_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (``optim``: bitnet_dist.config.OptimConfig)."""
    p1, lo, w, t = float(optim.lr), float(optim.min_lr), int(optim.warmup_steps), int(max_steps)
    if step < w:
        return p1 * (step + 1) / w
    if optim.schedule == "constant":
        return p1
    if optim.schedule == "cosine":
        frac = min(1.0, (step - w) / max(1, t - w))
        return lo + (p1 - lo) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if optim.schedule == "two_stage":
        m = midpoint(t)
        if step < m:
            return lo + (p1 - lo) * (t - step) / (t - w)
        return lo + (float(optim.lr_stage2) - lo) * max(0, t - step) / (t - w)
    raise ValueError(f"unknown optim.schedule {optim.schedule!r}")


def weight_decay_at(step: int, optim, max_steps: int) -> float:
    """Weight decay of optimizer step ``step``: the two-stage recipe turns it off at the midpoint."""
    if optim.schedule == "two_stage" and step >= midpoint(max_steps):
        return float(optim.weight_decay_stage2)
    return float(optim.weight_decay)


def switch_step(precision, max_steps: int) -> int | None:
    """First step trained at ``final_act_bits``; None when the precision has no switch (or never reaches it)."""
    if precision.final_act_bits is None or precision.final_act_bits == precision.act_bits:
        return None
    # round() first so 0.29 * 100 = 28.999999999999996 still counts as 29 steps
    s = math.floor(round(precision.switch_fraction * max_steps, 6))
    return s if s < max_steps else None


def act_bits_at(step: int, precision, max_steps: int) -> int:
    """Activation bits of every BitLinear during optimizer step ``step``."""
    s = switch_step(precision, max_steps)
    return precision.act_bits if s is None or step < s else precision.final_act_bits
