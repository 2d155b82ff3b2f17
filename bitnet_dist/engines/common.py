"""Helpers shared by the DeepSpeed and megatron engines.

One place for what both engines must do the same way, so they report the same numbers for the same
global batch: the compute dtype, which parameters decay, moving a batch to the device, position ids,
the token-weighted loss, the mpu adapter DeepSpeed needs on top of megatron's parallel_state, and
the trainer_state file inside a checkpoint directory.

Weight decay policy (``no_weight_decay``): decay applies to the 2-D projection matrices (the ternary
BitLinear / H-BitLinear latent weights and the output head when it is untied). It does not apply to
every parameter with fewer than two dimensions (RMSNorm / SubLN gains, biases when a model has any)
nor to the token embedding table (also when it is tied to the output head: one tensor, one policy).
Norm gains are scale parameters whose decay toward 0 fights the normalization; the embedding rows of
rare tokens get few gradient updates, so decay would shrink them toward zero between updates.
"""
from __future__ import annotations

import os
import socket
import types
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from bitnet_dist.errors import ConfigError

# megatron-core's parallel_state is imported where used: the DeepSpeed engine and the CPU helpers here run
# without loading megatron-core.

Batch = dict[str, torch.Tensor]

TRAINER_STATE_FILE = "trainer_state.pt"
DECAY_KEY = "bitnet_decay"  # marks a parameter group that takes the step's weight decay


# -- dtype and device ------------------------------------------------------------------------------------
def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``trainer.dtype`` -> torch dtype. auto: bf16 on CUDA, fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "bf16":
        return torch.bfloat16
    if dtype == "fp32":
        return torch.float32
    raise ConfigError("trainer.dtype", dtype, "auto, bf16 or fp32")


def local_device() -> torch.device:
    """This process's device: cuda:LOCAL_RANK when CUDA is available (and made current), else cpu.

    Also exports LOCAL_RANK (from Slurm's SLURM_LOCALID when a launcher did not set it): DeepSpeed
    asserts it is in the environment."""
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if torch.cuda.is_available():
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def ensure_process_group(device: torch.device) -> None:
    """Start a one-process group when nothing started torch.distributed (a plain ``python`` run).

    Launched jobs get their group from bitnet_dist.distributed before the engine; this only covers the
    single-process case so megatron's parallel_state and DeepSpeed have a group to build on.
    """
    if dist.is_initialized():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise RuntimeError("WORLD_SIZE>1 but torch.distributed is not initialized: call "
                           "bitnet_dist.distributed.init_distributed() before the engine")
    backend = "nccl" if device.type == "cuda" else "gloo"
    with socket.socket() as s:  # a free local port for the one-member TCP store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


# -- process groups -------------------------------------------------------------------------------------
# megatron's process groups created by our last initialize_model_parallel call in this process
_MODEL_PARALLEL_GROUPS: list = []


def init_model_parallel(**layout: Any) -> None:
    """megatron-core's ``initialize_model_parallel(**layout)``, after tearing down the groups of an earlier
    call in this process (an engine built before: tests, tools, in-process sweeps).

    megatron-core's ``destroy_model_parallel`` forgets its groups but destroys only the gloo ones, so each
    re-initialization used to leave its NCCL communicators alive (17 groups per engine at TP=2 on 2 ranks;
    GPU memory and NCCL resources: a GPU test building many engines once failed to create one). The groups
    that appeared in c10d's registry during our call are recorded and destroyed here, in creation order, on
    every rank alike (each rank re-initializes at the same point of the program). Other groups stay.
    """
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    for group in _MODEL_PARALLEL_GROUPS:
        if group in c10d._world.pg_map:  # (megatron already destroyed its gloo groups)
            dist.destroy_process_group(group)
    _MODEL_PARALLEL_GROUPS.clear()
    before = set(c10d._world.pg_map)
    ps.initialize_model_parallel(**layout)
    _MODEL_PARALLEL_GROUPS.extend(g for g in c10d._world.pg_map if g not in before)


# -- parameter groups -------------------------------------------------------------------------------------
def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """True for parameters that never decay (module docstring); same signature as megatron's
    ``no_weight_decay_cond(name, param)``."""
    return param.ndim < 2 or "word_embeddings" in name or "position_embeddings" in name


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups [decay, no_decay] (empty groups dropped), each tagged with DECAY_KEY."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, DECAY_KEY: True},
              {"params": no_decay, "weight_decay": 0.0, DECAY_KEY: False}]
    return [g for g in groups if g["params"]]


def apply_lr_wd(groups: Iterable[dict], lr: float, weight_decay: float) -> None:
    """Set this step's lr on every group and weight decay on the decay groups only."""
    for g in groups:
        if DECAY_KEY not in g:
            raise RuntimeError(f"parameter group without {DECAY_KEY!r}: the optimizer wrapper dropped it")
        g["lr"] = lr
        g["weight_decay"] = weight_decay if g[DECAY_KEY] else 0.0


# -- batches and loss --------------------------------------------------------------------------------------
def batch_to_device(batch: Batch, device: torch.device) -> Batch:
    """Move tokens/labels/loss_mask to ``device`` (non-blocking from pinned memory); loss_mask to fp32."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    out["loss_mask"] = out["loss_mask"].float()
    return out


def position_ids(tokens: torch.Tensor) -> torch.Tensor:
    """int64 [b, s]: 0..s-1 on every row (documents are not reset inside a sequence)."""
    b, s = tokens.shape
    return torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)


def masked_loss_sum(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of fp32 per-token losses [b, s] where loss_mask is 1 (scalar, keeps the graph)."""
    return (per_token_loss.float() * loss_mask).sum()


def global_token_count(batches: Iterable[Batch], group, device: torch.device) -> int:
    """Loss tokens in these micro-batches summed over ``group`` (the data-parallel group)."""
    n = torch.zeros((), dtype=torch.float64, device=device)
    for b in batches:
        n += b["loss_mask"].sum(dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(n, group=group)
    return int(round(n.item()))


def reduce_loss(loss_sum: torch.Tensor, num_tokens: int, group) -> float:
    """Token-weighted mean: ``loss_sum`` (this rank's) summed over ``group``, divided by the global count."""
    t = loss_sum.detach().to(torch.float64).reshape(())
    if dist.is_initialized():
        dist.all_reduce(t, group=group)
    return t.item() / num_tokens if num_tokens else float("nan")


# -- DeepSpeed's view of megatron's process groups ----------------------------------------------------------
def megatron_mpu() -> Any:
    """An ``mpu`` object for ``deepspeed.initialize``: megatron.core.parallel_state lacks
    ``get_model_parallel_{rank,world_size,group}`` that DeepSpeed calls (zero/stage_1_and_2.py,
    runtime/engine.py, runtime/utils.py); with pipeline size 1, model parallel = tensor parallel."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() != 1:
        raise RuntimeError("megatron_mpu maps model parallel onto tensor parallel: pipeline size must be 1")
    m = types.SimpleNamespace()
    m.get_model_parallel_rank = ps.get_tensor_model_parallel_rank
    m.get_model_parallel_world_size = ps.get_tensor_model_parallel_world_size
    m.get_model_parallel_group = ps.get_tensor_model_parallel_group
    for what in ("tensor_model_parallel", "data_parallel", "pipeline_model_parallel"):
        for fn in ("rank", "world_size", "group"):
            setattr(m, f"get_{what}_{fn}", getattr(ps, f"get_{what}_{fn}"))
    return m


# -- trainer_state inside a checkpoint directory --------------------------------------------------------------
def save_trainer_state(ckpt_dir: Path, trainer_state: dict[str, Any]) -> None:
    """Write ``trainer_state`` (any picklable dict: data position, RNG states, schedule) with torch.save."""
    torch.save(trainer_state, Path(ckpt_dir) / TRAINER_STATE_FILE)


def load_trainer_state(ckpt_dir: Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / TRAINER_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {ckpt_dir} is not a complete checkpoint of this engine")
    # Our own file, written by save_trainer_state; it holds RNG states and plain Python objects.
    return torch.load(path, map_location="cpu", weights_only=False)


def optional_float(x: Optional[Any]) -> Optional[float]:
    if x is None:
        return None
    return float(x.item() if isinstance(x, torch.Tensor) else x)


class MegatronDataParallelTopology:
    """dp_rank / dp_size from megatron's parallel_state, which both engines initialize (DeepSpeed too: its
    tensor parallelism goes through megatron's layers)."""

    @property
    def dp_rank(self) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_world_size()


def fused_paths_of(config, fused_adam: bool = False) -> list[str]:
    """The fused paths a built model's megatron TransformerConfig (BitNetTransformerConfig) takes: the RoPE fusion,
    the fused cross-entropy (tensor parallel 1 only), and the fused AdamW where the engine switched to it."""
    out = []
    if getattr(config, "apply_rope_fusion", False):
        out.append("rope")
    if getattr(config, "fused_cross_entropy", False) and config.tensor_model_parallel_size == 1:
        out.append("cross_entropy")
    if fused_adam:
        out.append("adamw")
    return out
