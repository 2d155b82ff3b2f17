"""bitnet_dist.distributed: launcher environment parsing and process-group start-up."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from bitnet_dist.distributed import (
    PORT_BASE,
    PORT_SPAN,
    LaunchEnvError,
    expand_hostlist,
    init_distributed,
    parse_launch_env,
    slurm_master_port,
)

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "node-a", "MASTER_PORT": "29500"}
# What srun gives task 5 of 8 (4 per node) on the second node of a two-node job.
SLURM_STEP = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
              "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]",
              "SLURM_STEP_NODELIST": "gpu[07-08]"}


def test_torchrun_env():
    le = parse_launch_env(TORCHRUN)
    assert (le.rank, le.world_size, le.local_rank, le.master_addr, le.master_port, le.launcher) == \
        (3, 8, 3, "node-a", 29500, "torchrun")


def test_torchrun_wins_over_slurm():
    # `srun torchrun`: Slurm's variables describe the agent task, torchrun's the worker
    le = parse_launch_env({**SLURM_STEP, **TORCHRUN})
    assert (le.rank, le.world_size, le.launcher) == (3, 8, "torchrun")


def test_slurm_step_env():
    le = parse_launch_env(SLURM_STEP)
    assert (le.rank, le.world_size, le.local_rank, le.launcher) == (5, 8, 1, "slurm")
    assert le.master_addr == "gpu07"  # first host of the allocation
    assert le.master_port == PORT_BASE + 4242  # seeded from the job id: identical on every node


def test_slurm_port_differs_between_jobs_and_stays_in_range():
    ports = {slurm_master_port(j) for j in range(100000, 100050)}
    assert len(ports) == 50
    assert all(PORT_BASE <= p < PORT_BASE + PORT_SPAN for p in ports)


def test_slurm_explicit_master_overrides_nodelist():
    le = parse_launch_env({**SLURM_STEP, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456"})
    assert (le.master_addr, le.master_port) == ("10.0.0.1", 23456)


def test_slurm_step_world_size_prefers_step_tasks():
    # a step of 2 tasks inside an allocation of 8: the step is the world
    le = parse_launch_env({**SLURM_STEP, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1"})
    assert le.world_size == 2


def test_sbatch_batch_shell_is_single_process():
    # the batch shell has SLURM_PROCID=0 and SLURM_NTASKS=N but is one process (no SLURM_STEP_ID)
    env = {k: v for k, v in SLURM_STEP.items() if not k.startswith("SLURM_STEP")}
    env["SLURM_PROCID"] = "0"
    le = parse_launch_env(env)
    assert (le.rank, le.world_size, le.launcher) == (0, 1, "single")


def test_no_launcher_is_single_process():
    le = parse_launch_env({})
    assert (le.rank, le.world_size, le.local_rank, le.launcher) == (0, 1, 0, "single")
    assert 0 < le.master_port < 65536


@pytest.mark.parametrize("env, words", [
    ({"RANK": "0"}, ["RANK", "WORLD_SIZE", "torchrun"]),
    ({"WORLD_SIZE": "2"}, ["WORLD_SIZE", "RANK"]),
    ({**TORCHRUN, "RANK": "8"}, ["rank 8", "[0, 8)"]),
    ({**TORCHRUN, "RANK": "x"}, ["RANK='x'", "integer"]),
    ({**TORCHRUN, "LOCAL_RANK": "4"}, ["LOCAL_RANK=4", "LOCAL_WORLD_SIZE=4"]),
    ({"RANK": "1", "WORLD_SIZE": "2"}, ["MASTER_ADDR", "MASTER_PORT"]),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, ["MASTER_PORT=70000"]),
    ({**SLURM_STEP, "SLURM_PROCID": "8"}, ["rank 8", "[0, 8)"]),
    ({k: v for k, v in SLURM_STEP.items() if k not in ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS")},
     ["SLURM_NTASKS", "srun"]),
    ({k: v for k, v in SLURM_STEP.items() if "NODELIST" not in k}, ["SLURM_JOB_NODELIST", "MASTER_ADDR"]),
    ({**SLURM_STEP, "SLURM_JOB_NODELIST": "gpu[07-08", "SLURM_STEP_NODELIST": "gpu[07-08"}, ["unbalanced"]),
])
def test_inconsistent_env_is_one_clear_error(env, words):
    with pytest.raises(LaunchEnvError) as e:
        parse_launch_env(env)
    for w in words:
        assert w in str(e.value)


# Expected values written by hand from Slurm's hostlist rules (zero padding kept, several bracket
# groups expand as a product in order); checked against `scontrol show hostnames` below when present.
HOSTLISTS = {
    "vm": ["vm"],
    "gpu[01-03,7],cpu1": ["gpu01", "gpu02", "gpu03", "gpu7", "cpu1"],
    "n[8-11]": ["n8", "n9", "n10", "n11"],
    "n[098-101]": ["n098", "n099", "n100", "n101"],
    "a[1-2]b[1-2]": ["a1b1", "a1b2", "a2b1", "a2b2"],
    "rack1-[3,5],login": ["rack1-3", "rack1-5", "login"],
}


@pytest.mark.parametrize("expr", sorted(HOSTLISTS))
def test_expand_hostlist(expr):
    assert expand_hostlist(expr) == HOSTLISTS[expr]


@pytest.mark.skipif(not (shutil.which("scontrol") and os.environ.get("SLURM_CONF")),
                    reason="needs scontrol and a SLURM_CONF (slurm/ci/cluster_tests.sh runs with both)")
def test_expand_hostlist_matches_scontrol():
    for expr, want in HOSTLISTS.items():
        out = subprocess.run(["scontrol", "show", "hostnames", expr], capture_output=True, text=True, timeout=30)
        assert out.stdout.split() == want == expand_hostlist(expr)


def test_multicast_variables_set_if_unset(monkeypatch):
    from bitnet_dist.distributed import set_nccl_env

    for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NVSHMEM_DISABLE_NVLS", "1")
    set_nccl_env()
    assert [os.environ[k] for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                    "NVSHMEM_DISABLE_NVLS")] == ["0", "1", "1"]


def test_nccl_without_cuda_fails_before_any_group(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LaunchEnvError, match="nccl"):
        init_distributed("nccl", env={})
    assert not torch.distributed.is_initialized()


def test_local_rank_beyond_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(LaunchEnvError, match="--ntasks-per-node"):
        init_distributed(env={**TORCHRUN, "LOCAL_RANK": "2"})
    assert not torch.distributed.is_initialized()


def _free_port_in_slurm_range() -> int:
    for job in range(os.getpid() % PORT_SPAN, os.getpid() % PORT_SPAN + PORT_SPAN):
        port = slurm_master_port(job)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return job
    raise RuntimeError("no free port")


CHILD = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist
    from bitnet_dist.distributed import init_distributed, destroy_distributed
    info = init_distributed()
    t = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(t)
    print(json.dumps({"rank": info.rank, "world": info.world_size, "local": info.local_rank,
                      "device": str(info.device), "backend": info.backend, "launcher": info.launcher,
                      "sum": t.item(), "env_rank": os.environ["RANK"]}) + chr(10), end="", flush=True)  # one write: ranks share stdout
    destroy_distributed()
""")


def _child_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **extra)
    return env


@pytest.mark.slow
def test_two_ranks_from_slurm_variables():
    """Two processes that only see srun's variables form one gloo group with the seeded port."""
    import json

    job = _free_port_in_slurm_range()
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True,
                              env=_child_env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2",
                                             SLURM_LOCALID=str(r), SLURM_STEP_ID="0", SLURM_JOB_ID=str(job),
                                             SLURM_JOB_NODELIST="127.0.0.1"))
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    res = sorted((json.loads(o.strip().splitlines()[-1]) for o, _ in outs), key=lambda r: r["rank"])
    assert [r["rank"] for r in res] == [0, 1] and all(r["world"] == 2 for r in res)
    assert [r["local"] for r in res] == [0, 1]
    assert all(r["sum"] == 3.0 and r["backend"] == "gloo" and r["device"] == "cpu" for r in res)
    assert all(r["launcher"] == "slurm" for r in res)
    assert [r["env_rank"] for r in res] == ["0", "1"]  # exported for DeepSpeed / megatron


@pytest.mark.slow
def test_two_ranks_under_torchrun():
    import json

    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "--no-python", sys.executable, "-c", CHILD],
                         capture_output=True, text=True, timeout=180, env=_child_env())
    assert out.returncode == 0, out.stderr[-3000:]
    res = sorted((json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")),
                 key=lambda r: r["rank"])
    assert [(r["rank"], r["world"], r["launcher"], r["sum"]) for r in res] == \
        [(0, 2, "torchrun", 3.0), (1, 2, "torchrun", 3.0)]


def test_single_process_group_and_idempotence():
    """No launcher: a one-process gloo group (megatron / DeepSpeed need one); a second call reuses it."""
    code = textwrap.dedent("""
        import torch.distributed as dist
        from bitnet_dist.distributed import init_distributed, destroy_distributed
        a = init_distributed(); b = init_distributed()
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert (a.rank, a.world_size, a.launcher, a.device.type) == (0, 1, "single", "cpu") and a == b
        destroy_distributed(); assert not dist.is_initialized(); destroy_distributed()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_child_env())
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (NCCL path)")
def test_nccl_on_gpu_with_multicast_off():
    """CUDA: NCCL backend, cuda:LOCAL_RANK, NVLink multicast variables set before NCCL starts."""
    code = textwrap.dedent("""
        import json, os, signal, torch, torch.distributed as dist
        from bitnet_dist.distributed import init_distributed, destroy_distributed
        from bitnet_dist.preemption import PreemptionGuard
        info = init_distributed()
        t = torch.ones(4, device=info.device)
        dist.all_reduce(t)
        g = PreemptionGuard(stop_file="")
        before = g.should_stop()
        os.kill(os.getpid(), signal.SIGUSR2)
        print(json.dumps({"backend": info.backend, "device": str(info.device), "sum": t.sum().item(),
                          "stop": [before, g.should_stop()],
                          "env": [os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                              "NVSHMEM_DISABLE_NVLS")]}))
        g.close(); destroy_distributed()
    """)
    # the multicast variables stay as the parent has them: never run NCCL with multicast on here
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    import json

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"backend": "nccl", "device": "cuda:0", "sum": 4.0, "stop": [False, True], "env": ["0", "1", "1"]}
