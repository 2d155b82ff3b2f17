"""Process-group start-up from torchrun's or Slurm's environment.

Three ways a rank learns who it is, checked in this order:

* torchrun (or any launcher that sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
  ``MASTER_PORT``): used as given. This wins inside Slurm too, because ``srun torchrun`` leaves
  Slurm's variables describing the *agent*, not the worker.
* Slurm, one task per rank (``srun`` steps, hydra-submitit-launcher): ``SLURM_PROCID`` -> rank,
  ``SLURM_STEP_NUM_TASKS`` (else ``SLURM_NTASKS``) -> world size, ``SLURM_LOCALID`` -> local rank,
  ``MASTER_ADDR`` = first host of ``SLURM_JOB_NODELIST`` (or ``SLURM_STEP_NODELIST``), and
  ``MASTER_PORT`` seeded from the job id so concurrent jobs (array elements) on one host differ while a
  requeued job, which keeps its id, reuses its own.
* neither: one process (rank 0 of 1) on a free local port.

The process group is always started, also for one process: megatron's parallel_state and DeepSpeed
both need torch.distributed even at world size 1. NCCL on CUDA, gloo on CPU, with NVLink multicast
switched off through the environment before NCCL reads it (our GPU hosts require that).
"""
from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

# NVLink SHARP / multicast stays off on our GPU hosts (docs/slurm.md); setdefault so an operator
# can still override one explicitly.
NVLS_OFF_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

# Ports seeded from the Slurm job id land in [PORT_BASE, PORT_BASE + PORT_SPAN): above the usual
# service ports, below Linux's default ephemeral range (32768-60999) so a client socket rarely holds one.
PORT_BASE = 12000
PORT_SPAN = 20000

_INFO: Optional["DistInfo"] = None  # what init_distributed() started in this process


class LaunchEnvError(RuntimeError):
    """The launcher's environment variables contradict each other; the message names them and the fix."""


@dataclass(frozen=True)
class LaunchEnv:
    """What the environment says about this process, before any process-group work."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job, after init_distributed()."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str = "gloo"
    launcher: str = "single"

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], name: str, fix: str) -> int:
    raw = env.get(name)
    try:
        return int(str(raw).strip())
    except (TypeError, ValueError):
        raise LaunchEnvError(f"environment variable {name}={raw!r} is not an integer: {fix}") from None


def expand_hostlist(expr: str) -> list[str]:
    """Slurm hostlist expression -> host names, e.g. ``"gpu[01-03,7],cpu1"`` -> gpu01 gpu02 gpu03 gpu7 cpu1.

    Same result as ``scontrol show hostnames`` for the forms Slurm writes (ranges keep their zero
    padding; several bracket groups in one name expand as a product), without needing scontrol.
    """
    hosts: list[str] = []
    for item in _split_top_level(expr.strip()):
        if item:
            hosts.extend(_expand_one(item))
    if not hosts:
        raise LaunchEnvError(f"empty Slurm host list {expr!r}")
    return hosts


def _split_top_level(expr: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in expr:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchEnvError(f"unbalanced ']' in Slurm host list {expr!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise LaunchEnvError(f"unbalanced '[' in Slurm host list {expr!r}")
    parts.append("".join(cur))
    return parts


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if not m:
        return [item]
    head, tail = item[: m.start()], item[m.end():]
    tails = _expand_one(tail) if tail else [""]
    out = []
    for rng in m.group(1).split(","):
        if "-" in rng:
            lo, hi = rng.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise LaunchEnvError(f"bad range [{rng}] in Slurm host list {item!r}")
            names = [f"{head}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
        else:
            names = [f"{head}{rng}"]
        out.extend(n + t for n in names for t in tails)
    return out


def slurm_master_port(job_id: int) -> int:
    """Rendezvous port for a Slurm job: a fixed function of the job id (the same on every node)."""
    return PORT_BASE + job_id % PORT_SPAN


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_slurm_step(env: Optional[Mapping[str, str]] = None) -> bool:
    """True inside a Slurm job *step* (srun / submitit task), where SLURM_PROCID names the rank.

    The batch shell of an sbatch job also has SLURM_PROCID=0 and SLURM_NTASKS=N, but it is one
    process: only srun steps carry SLURM_STEP_ID (the batch shell's step is not numbered).
    """
    env = os.environ if env is None else env
    return "SLURM_PROCID" in env and "SLURM_STEP_ID" in env


def parse_launch_env(env: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Read rank, world size, local rank and rendezvous address from ``env`` (default os.environ).

    Pure: no process-group or GPU work, so bad launches fail here with a clear message.
    """
    env = dict(os.environ if env is None else env)
    torchrun_keys = ("RANK", "WORLD_SIZE")
    present = [k for k in torchrun_keys if k in env]
    if present:
        if len(present) != len(torchrun_keys):
            missing = [k for k in torchrun_keys if k not in env]
            raise LaunchEnvError(
                f"{present[0]} is set but {missing[0]} is not: launch with torchrun (which sets RANK, "
                f"WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or unset {present[0]}")
        fix = "torchrun sets it; do not export it by hand"
        rank, world = _int(env, "RANK", fix), _int(env, "WORLD_SIZE", fix)
        local = _int(env, "LOCAL_RANK", fix) if "LOCAL_RANK" in env else 0
        if world > 1 and not ("MASTER_ADDR" in env and "MASTER_PORT" in env):
            raise LaunchEnvError(
                f"WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are not both set: launch with torchrun "
                "(--rdzv_endpoint HOST:PORT) or export both")
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT", fix) if "MASTER_PORT" in env else _free_port()
        launcher = "torchrun"
        if "LOCAL_WORLD_SIZE" in env:
            lws = _int(env, "LOCAL_WORLD_SIZE", fix)
            if not 0 <= local < lws:
                raise LaunchEnvError(f"LOCAL_RANK={local} outside [0, LOCAL_WORLD_SIZE={lws}): {fix}")
    elif under_slurm_step(env):
        fix = "srun sets it; run the program under `srun` inside the allocation"
        rank = _int(env, "SLURM_PROCID", fix)
        ntasks_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        if ntasks_key not in env:
            raise LaunchEnvError(
                "SLURM_PROCID is set but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS is: start the "
                "ranks with `srun --ntasks=N` (or sbatch --ntasks / --ntasks-per-node)")
        world = _int(env, ntasks_key, fix)
        local = _int(env, "SLURM_LOCALID", fix) if "SLURM_LOCALID" in env else 0
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        else:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                if world > 1:
                    raise LaunchEnvError(
                        f"{ntasks_key}={world} but SLURM_JOB_NODELIST is unset and MASTER_ADDR is not "
                        "exported: export MASTER_ADDR=<first host of the job> in the sbatch script")
                nodelist = "127.0.0.1"
            addr = expand_hostlist(nodelist)[0]
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT", "a TCP port number")
        elif "SLURM_JOB_ID" in env:
            port = slurm_master_port(_int(env, "SLURM_JOB_ID", fix))
        elif world > 1:
            raise LaunchEnvError(f"{ntasks_key}={world} but neither MASTER_PORT nor SLURM_JOB_ID is set: "
                                 "export MASTER_PORT in the sbatch script")
        else:
            port = _free_port()
        launcher = "slurm"
    else:
        return LaunchEnv(0, 1, 0, "127.0.0.1", _free_port(), "single")
    if world < 1:
        raise LaunchEnvError(f"world size {world} < 1 ({launcher}): request at least one task / process")
    if not 0 <= rank < world:
        raise LaunchEnvError(f"rank {rank} outside [0, {world}) ({launcher}): the launcher's RANK/SLURM_PROCID "
                             "and WORLD_SIZE/SLURM_NTASKS disagree; do not export them by hand")
    if not 0 <= local < world:
        raise LaunchEnvError(f"local rank {local} outside [0, {world}) ({launcher}): LOCAL_RANK / "
                             "SLURM_LOCALID is inconsistent with the world size")
    if not 0 < port < 65536:
        raise LaunchEnvError(f"MASTER_PORT={port} is not a TCP port: use 1024..65535")
    return LaunchEnv(rank, world, local, addr, port, launcher)


def set_nccl_env() -> None:
    """NVLink multicast off (set-if-unset): must happen before NCCL / symmetric memory initialize."""
    for k, v in NVLS_OFF_ENV.items():
        os.environ.setdefault(k, v)


def init_distributed(backend: Optional[str] = None, *, timeout_s: float = 1800.0,
                     env: Optional[Mapping[str, str]] = None) -> DistInfo:
    """Start torch.distributed for this process and pick its device.

    backend: None -> "nccl" when CUDA is available, else "gloo"; "nccl" without CUDA is an error.
    timeout_s: collective / rendezvous timeout in seconds (long: the other ranks wait in a barrier
        while rank 0 prepares the data).
    Returns DistInfo(rank, world_size, local_rank, device). Idempotent: a second call returns the
    same info without touching the existing group.
    """
    global _INFO
    if _INFO is not None and dist.is_initialized():
        return _INFO
    le = parse_launch_env(env)
    cuda = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    if backend not in ("nccl", "gloo"):
        raise LaunchEnvError(f"backend={backend!r}: use 'nccl' (CUDA) or 'gloo' (CPU), or None to choose")
    if backend == "nccl" and not cuda:
        raise LaunchEnvError("backend='nccl' needs a CUDA device but none is visible: use backend='gloo' "
                             "or None on CPU machines")
    if cuda:
        n = torch.cuda.device_count()
        # --gpus-per-task=1 binds one GPU to each task: every task sees its own GPU as cuda:0
        index = 0 if n == 1 and le.launcher == "slurm" else le.local_rank
        if index >= n:
            raise LaunchEnvError(
                f"local rank {le.local_rank} but only {n} GPU(s) visible (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}): start at most {n} processes per node "
                "(--ntasks-per-node / --nproc_per_node) or request more GPUs (--gpus-per-node)")
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    if cuda:
        set_nccl_env()
    # Libraries that read the environment themselves (DeepSpeed, megatron utilities) see the same ranks
    # and the device index actually used.
    local_env = str(device.index) if cuda else str(le.local_rank)
    os.environ.update(RANK=str(le.rank), WORLD_SIZE=str(le.world_size), LOCAL_RANK=local_env,
                      MASTER_ADDR=le.master_addr, MASTER_PORT=str(le.master_port))
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        kwargs = {}
        if backend == "nccl":
            kwargs["device_id"] = device  # eager NCCL init: a bad fabric fails here, not at the first step
        dist.init_process_group(backend=backend, init_method=f"tcp://{le.master_addr}:{le.master_port}",
                                rank=le.rank, world_size=le.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    else:
        backend = dist.get_backend()
    _INFO = DistInfo(le.rank, le.world_size, le.local_rank, device, backend, le.launcher)
    return _INFO


def destroy_distributed() -> None:
    """Tear the process group down (safe when none exists)."""
    global _INFO
    _INFO = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
