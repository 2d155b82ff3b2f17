"""Fault injection: kill -9 at random points of checkpoint saves, a full disk, and two
concurrent launches of one run directory. After each, a relaunch completes and its losses equal an
uninterrupted run's bitwise (CPU fp32, DeepSpeed engine); the newest complete checkpoint never goes back.

The kills come from inside the process: a wrapper counts the calls of the file-system operations a save makes
(torch.save, os.replace, os.rename, shutil.rmtree, the checkpoint module's fsync, hashing and manifest writing)
and sends itself SIGKILL at the N-th one, N drawn from a seeded generator, so every kill lands somewhere in the
middle of a save (or of the start-up that precedes one) and the test is reproducible.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time

import pytest
from test_failures import REPO, SMOKE, records, train_cli

pytestmark = pytest.mark.slow

RUN = ["trainer.max_steps=30", "trainer.save_interval=1", "trainer.log_interval=1", "trainer.keep_checkpoints=2",
       "trainer.eval_interval=10"]

KILLER = r"""
import os, signal, sys, shutil
import torch
import bitnet_dist.checkpoint as c
limit = int(os.environ["BITNET_TEST_KILL_AT"])
n = [0]
def counted(fn):
    def inner(*a, **k):
        n[0] += 1
        if n[0] == limit:
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return inner
torch.save = counted(torch.save)
os.replace = counted(os.replace)
os.rename = counted(os.rename)
shutil.rmtree = counted(shutil.rmtree)
c._fsync_path = counted(c._fsync_path)
c.sha256_file = counted(c.sha256_file)
c.write_manifest = counted(c.write_manifest)
from bitnet_dist.train import main
sys.argv[0] = "bitnet-train"
main()
"""


def _losses(run):
    return [(r["step"], r["loss"]) for r in records(run, "lr")]


def _newest_complete(run):
    from bitnet_dist.checkpoint import CheckpointManager

    done = CheckpointManager(run, required=["deepspeed_layout.json", "trainer_state.pt", "state/*model_states.pt",
                                            "trainer_rank00000.pt"]).complete()
    return int(done[0].name.split("_")[1]) if done else 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    r = train_cli(run, *RUN)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = _losses(run)
    assert [s for s, _ in losses] == list(range(1, 31))
    return losses


def test_twenty_kills_during_saves(tmp_path, reference):
    run = tmp_path / "run"
    rng = random.Random(28)
    kills, newest = 0, 0
    while kills < 20:
        at = rng.randint(1, 70)  # a save makes ~12 of these calls: kills land in the first saves of each launch
        r = train_cli(run, *RUN, env={"BITNET_TEST_KILL_AT": str(at)}, wrapper=KILLER)
        if r.returncode == 0:  # ran to the end before the N-th call: start the run over, keep counting
            assert _losses(run) == reference
            shutil.rmtree(run)
            newest = 0
            continue
        assert r.returncode == -9, (at, r.returncode, r.stderr[-3000:])
        kills += 1
        now = _newest_complete(run)
        assert now >= newest, f"kill {kills} (call {at}): the newest complete checkpoint went from {newest} to {now}"
        newest = now
    r = train_cli(run, *RUN)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(run) == reference
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000029", "step_00000030"], names  # leftovers of the killed saves are gone
    assert not (run / ".lock").exists()


def test_full_disk_then_relaunch(tmp_path, reference):
    """A small file system: the free-space check refuses the second checkpoint (periodic saves skipped with a
    warning, the final one an error). The run directory copied to a roomy disk resumes and ends bitwise."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2600k", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
    run = disk / "run"
    try:
        if mounted:
            r = train_cli(run, *RUN)
        else:  # a simulated full disk: free_bytes reports 1000 bytes from the second save on
            patch = ("import sys\nimport bitnet_dist.checkpoint as c\nimport shutil\n"
                     "c.free_bytes = lambda p: 1000\n"
                     "from bitnet_dist.train import main\nsys.argv[0] = 'bitnet-train'\nmain()\n")
            r = train_cli(run, *RUN, wrapper=patch)
        assert r.returncode == 2, r.stderr[-3000:]
        assert "skipped" in r.stderr and "not enough space for a checkpoint" in r.stderr
        assert _newest_complete(run) == 1
        roomy = tmp_path / "roomy"
        shutil.copytree(run, roomy)
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)
    r = train_cli(roomy, *RUN)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step_00000001" in r.stdout
    assert _losses(roomy) == reference


def test_two_concurrent_launches(tmp_path, reference):
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bitnet_dist.train", *SMOKE, f"run_dir={run}", *RUN]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes in ([0, 0], [0, 2]), [o[1][-2000:] for o in outs]
    for p, (_out, err) in zip(procs, outs):
        if p.returncode == 2:
            assert "is in use by another training process" in err
    time.sleep(0.1)
    r = train_cli(run, *RUN)  # the relaunch finds the run complete
    assert r.returncode == 0 and "is complete" in r.stdout, r.stderr[-3000:]
    assert _losses(run) == reference
