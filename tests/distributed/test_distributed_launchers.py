"""Launchers: sbatch templates, slurm/submit.sh, launch/local.sh and the Hydra submitit launcher configs.

The jobs themselves run on a real Slurm cluster in slurm/ci/cluster_tests.sh; these tests check what
can be checked without one (syntax, the options each script passes, the composed launcher configs).
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ["slurm/train_tasks.sbatch", "slurm/train_torchrun.sbatch"]
SCRIPTS = SBATCH + ["slurm/common.sh", "slurm/submit.sh", "slurm/ci/cluster_tests.sh", "launch/local.sh",
                    "launch/env.sh", "launch/test.sh", "launch/quickstart.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_syntax(script):
    out = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _directives(script):
    return re.findall(r"^#SBATCH\s+(\S+)", (ROOT / script).read_text(), flags=re.M)


@pytest.mark.parametrize("script", SBATCH)
def test_sbatch_preemption_directives(script):
    d = _directives(script)
    assert {"--requeue", "--open-mode=append", "--signal=B:USR2@300"} <= set(d)
    # directives after the first command are ignored by sbatch
    text = (ROOT / script).read_text().splitlines()
    first_cmd = next(i for i, ln in enumerate(text) if ln.strip() and not ln.startswith("#"))
    assert all(not ln.startswith("#SBATCH") for ln in text[first_cmd:])


def test_templates_forward_or_flag_the_warning():
    tasks = (ROOT / "slurm/train_tasks.sbatch").read_text()
    torchrun = (ROOT / "slurm/train_torchrun.sbatch").read_text()
    assert re.search(r"trap .*kill -USR2 \"\$step\".* USR2", tasks)
    assert re.search(r"trap .*touch \"\$BITNET_STOP_FILE\".* USR2", torchrun)
    assert "--rdzv_backend=c10d" in torchrun
    common = (ROOT / "slurm/common.sh").read_text()
    for var in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        assert var in common


def _submit(*args):
    return subprocess.run(["bash", str(ROOT / "slurm/submit.sh"), "--dry-run", *args], capture_output=True,
                          text=True, timeout=30)


def test_submit_tasks_style_gpu():
    out = _submit("--nodes", "4", "--gpus-per-node", "8", "--cpus-per-gpu", "12", "--time", "24:00:00",
                  "--partition", "gpu", "--account", "proj", "--", "model=1.3B", "precision=v2_a8")
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    for opt in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12",
                "--time=24:00:00", "--partition=gpu", "--account=proj"):
        assert opt in words
    assert words[-3].endswith("slurm/train_tasks.sbatch") and words[-2:] == ["model=1.3B", "precision=v2_a8"]


def test_submit_torchrun_style_one_task_per_node():
    out = _submit("--style", "torchrun", "--nodes", "2", "--gpus-per-node", "8", "--", "model=tiny")
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    assert "--ntasks-per-node=1" in words and "--cpus-per-task=64" in words and "--gpus-per-node=8" in words
    assert words[-2].endswith("slurm/train_torchrun.sbatch")


def test_submit_cpu_job_has_no_gpu_request():
    out = _submit("--procs-per-node", "2", "--", "experiment=smoke")
    assert out.returncode == 0, out.stderr
    assert "--ntasks-per-node=2" in out.stdout.split() and "gpus" not in out.stdout


@pytest.mark.parametrize("args, words", [
    (["--style", "mpi"], ["--style", "tasks or torchrun"]),
    (["--nodes", "two"], ["--nodes", "integer"]),
    (["model=tiny"], ["unknown option", "after --"]),
])
def test_submit_bad_input(args, words):
    out = _submit(*args)
    assert out.returncode == 2
    for w in words:
        assert w in out.stderr


def test_local_launcher_rejects_bad_nproc():
    out = subprocess.run(["bash", str(ROOT / "launch/local.sh"), "--nproc", "0"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "VIRTUAL_ENV": os.environ.get("VIRTUAL_ENV", "x")})
    assert out.returncode == 2 and "--nproc" in out.stderr


def test_env_setup_stops_early_on_a_full_disk(tmp_path):
    """launch/env.sh checks the free space before pip starts (CI once died half-way with ENOSPC)."""
    import shutil
    import sys

    (tmp_path / "launch").mkdir()
    shutil.copy(ROOT / "launch/env.sh", tmp_path / "launch/env.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(BITNET_MIN_FREE_GIB="100000000", BITNET_PYTHON=sys.executable)
    out = subprocess.run(["bash", "-c", ". launch/env.sh"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode != 0
    assert "MiB free" in out.stderr and "BITNET_MIN_FREE_GIB" in out.stderr, out.stderr
    assert not (tmp_path / ".venv/.bitnet-installed").exists()  # nothing was installed


@pytest.mark.parametrize("name, target", [("slurm", "SlurmLauncher"), ("slurm_cpu", "SlurmLauncher"),
                                          ("local", "LocalLauncher")])
def test_submitit_launcher_configs_compose(name, target):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import bitnet_dist.train  # noqa: F401  registers train_schema and the run-name resolver

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={name}", "experiment=smoke"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith(target)
    if target == "SlurmLauncher":
        # resubmission on time-out, and time to save before the kill
        assert launcher.max_num_timeout > 0 and launcher.signal_delay_s >= 60
        assert launcher.tasks_per_node >= 1
    if name == "slurm":
        setup = " ".join(OmegaConf.to_container(launcher.setup, resolve=True))
        for var in ("NCCL_NVLS_ENABLE=0", "TORCH_SYMM_MEM_DISABLE_MULTICAST=1", "NVSHMEM_DISABLE_NVLS=1"):
            assert var in setup
        assert launcher.gpus_per_node == launcher.tasks_per_node  # one task per GPU
