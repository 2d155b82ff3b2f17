"""Non-finite steps and state: the decisions every engine makes the same way (docs/failures.md).

* ``skip_step(loss, grad_norm)``: an optimizer step is skipped when the step's loss or its global gradient
  norm (before clipping) is not finite. Both numbers are global (reduced over every rank), so every rank
  takes the same decision without another collective. DeepSpeed and megatron-core report an invalid norm
  as -1 in some paths; a negative norm counts as non-finite.
* ``megatron_step(optimizer, loss)``: megatron-core's own ``optimizer.step()`` split at the point where
  the decision goes (prepare_grads with its found-inf check, get_grad_norm, clipping by that norm,
  step_with_ready_grads), so a non-finite loss skips the update as a non-finite gradient does.
* ``skip_inner_steps(optimizer, decide)``: the DeepSpeed engine's hook: the torch optimizer inside
  DeepSpeed's wrappers (fp32, bf16, ZeRO-1/2/3, offload) steps only when ``decide()`` says so.
* ``SkipCounter``: consecutive and total skips; ``trainer.max_skipped_steps`` consecutive ones stop the
  run with DivergenceError.
* ``state_finite(tensors)``: whether model and optimizer state are finite (a checkpoint is published only
  then).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch


class DivergenceError(RuntimeError):
    """The run cannot go on: too many consecutive non-finite steps, or non-finite model / optimizer state.
    The message names the steps, the last complete checkpoint and what to change."""


def finite(x: Optional[float]) -> bool:
    return x is not None and math.isfinite(float(x))


def clean_norm(grad_norm: Optional[float]) -> float:
    """A reported gradient norm as a float: None and the -1 sentinel of DeepSpeed / megatron-core
    (their word for inf or NaN) become NaN, so logs say non-finite instead of -1."""
    if grad_norm is None:
        return float("nan")
    g = float(grad_norm.item() if isinstance(grad_norm, torch.Tensor) else grad_norm)
    return float("nan") if g < 0 else g


def nonfinite_fields(loss: Optional[float], grad_norm: Optional[float]) -> list[str]:
    """Which of the step's two global numbers are non-finite (a negative norm is the -1 sentinel)."""
    out = [] if finite(loss) else ["loss"]
    if not finite(grad_norm) or float(grad_norm) < 0:
        out.append("grad_norm")
    return out


def skip_step(loss: Optional[float], grad_norm: Optional[float]) -> bool:
    """True when the optimizer must not apply this step (module docstring)."""
    return bool(nonfinite_fields(loss, grad_norm))


# -- megatron-core -----------------------------------------------------------------------------------------
def megatron_step(optimizer, loss: float) -> tuple[bool, float]:
    """One optimizer step of a megatron-core optimizer (single or ChainedOptimizer) unless ``skip_step``:
    returns (applied, grad_norm before clipping).

    The same calls as megatron-core's ``MegatronOptimizer.step`` / ``ChainedOptimizer.step`` (0.16, 0.17):
    ``prepare_grads()`` (copies model grads to main grads; with a grad scaler also megatron's found-inf
    check, all-reduced over the model-parallel group), ``get_grad_norm()`` (the global norm, its collective),
    clipping with megatron's ``clip_grad_by_total_norm_fp32`` by that norm, ``step_with_ready_grads()``.
    Only the decision between norm and update is ours: the loss joins megatron's found-inf flag.
    The skipped gradients are discarded by the next step's ``zero_grad``.
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    found_inf = bool(optimizer.prepare_grads())
    grad_norm = clean_norm(optimizer.get_grad_norm())
    if found_inf or skip_step(loss, grad_norm):
        return False, (grad_norm if not found_inf or not finite(grad_norm) else float("inf"))
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(opt, "is_stub_optimizer", False):
            continue
        params = opt.get_parameters()
        if params and opt.config.clip_grad > 0.0:
            decoupled = getattr(opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False)
            clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                                         use_decoupled_grad=decoupled)
    return bool(optimizer.step_with_ready_grads()), grad_norm


# -- DeepSpeed ---------------------------------------------------------------------------------------------
def skip_inner_steps(optimizer: torch.optim.Optimizer, decide: Callable[[], bool]) -> Callable[[], int]:
    """Make ``optimizer.step`` (the torch optimizer that DeepSpeed's wrappers call) a no-op whenever
    ``decide()`` is True; returns a function giving how many calls were skipped so far. DeepSpeed clips and
    copies weights around the inner step; with the step skipped the fp32 weights and Adam moments stay as
    they were, so the copies write back the same weights."""
    orig = optimizer.step
    skipped = [0]

    def step(*args: Any, **kwargs: Any):
        if decide():
            skipped[0] += 1
            return None
        return orig(*args, **kwargs)

    optimizer.step = step
    return lambda: skipped[0]


# -- the run-level counter ----------------------------------------------------------------------------------
class SkipCounter:
    """Consecutive and total skipped steps; ``record`` raises DivergenceError at ``limit`` in a row."""

    def __init__(self, limit: int, consecutive: int = 0, total: int = 0):
        self.limit, self.consecutive, self.total = limit, consecutive, total
        self.first_of_run: Optional[int] = None

    def record(self, step: int, skipped: bool, loss: Optional[float], grad_norm: Optional[float],
               last_checkpoint: Optional[str] = None) -> Optional[str]:
        """``step``: the optimizer step just run (1-based, as logged). Returns a one-line warning for a skipped
        step (None otherwise)."""
        if not skipped:
            self.consecutive, self.first_of_run = 0, None
            return None
        self.consecutive += 1
        self.total += 1
        if self.first_of_run is None:
            self.first_of_run = step - self.consecutive + 1
        what = ", ".join(f"{k}={v}" for k, v in (("loss", fmt_value(loss)), ("grad_norm", fmt_value(grad_norm))))
        line = (f"step {step}: non-finite loss or gradient norm ({what}): optimizer step skipped "
                f"({self.consecutive} in a row, trainer.max_skipped_steps={self.limit})")
        if self.consecutive >= self.limit:
            ckpt = (f"the last complete checkpoint is {last_checkpoint}; a relaunch resumes from it" if last_checkpoint
                    else "no checkpoint was written; a relaunch starts over")
            raise DivergenceError(
                f"training diverged: {self.consecutive} consecutive steps ({self.first_of_run}-{step}) had a non-finite "
                f"loss or gradient norm and were skipped (trainer.max_skipped_steps={self.limit}); {ckpt}. Lower "
                "optim.lr (and optim.lr_stage2) or check the data first (or raise trainer.max_skipped_steps to ride "
                "it out)")
        return line

    def state(self) -> dict:
        return {"skipped_consecutive": self.consecutive, "skipped_total": self.total}


def fmt_value(v: Optional[float]) -> str:
    if v is None:
        return "none"
    v = float(v)
    return repr(v) if math.isfinite(v) else ("nan" if v != v else ("inf" if v > 0 else "-inf"))


# -- state ------------------------------------------------------------------------------------------------------
def tensors_finite(tensors: Iterable[Any]) -> bool:
    """All floating-point tensors in ``tensors`` (nested dicts / lists / tuples allowed) are finite (local)."""
    stack = [tensors]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            if x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
                return False
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)) or (hasattr(x, "__iter__") and not isinstance(x, (str, bytes))):
            stack.extend(list(x))
    return True


def optimizer_tensors(optimizer) -> list:
    """Parameters and state tensors of a torch optimizer (or of the ``optimizer`` inside a wrapper)."""
    out = []
    for opt in [optimizer, getattr(optimizer, "optimizer", None)]:
        if opt is None or not hasattr(opt, "param_groups"):
            continue
        for g in opt.param_groups:
            out.extend(g["params"])
        out.extend(getattr(opt, "state", {}).values())
    return out


def state_finite(tensors: Iterable[Any], device: Optional[torch.device] = None) -> bool:
    """``tensors_finite`` on this rank, AND-reduced over every rank (collective when distributed)."""
    import torch.distributed as dist

    ok = tensors_finite(tensors)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dev = device if device is not None and dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor([0 if ok else 1], dtype=torch.int32, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        ok = int(t.item()) == 0
    return ok
