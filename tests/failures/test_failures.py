"""Failure behaviour (docs/failures.md): each test feeds the input a user would and checks what happens.

End-to-end cases run the train app the way a user does (``python -m bitnet_dist.train experiment=smoke ...``
in a subprocess, a temporary run_dir, a few steps) on the DeepSpeed engine on CPU.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMOKE = ["experiment=smoke", "logging.wandb=disabled", "trainer.progress_bar=false", "trainer.report=false",
         "trainer.stats_interval=0"]


def train_cli(run_dir: Path, *overrides: str, timeout: int = 300, env: dict | None = None,
              wrapper: str | None = None) -> subprocess.CompletedProcess:
    """``python -m bitnet_dist.train experiment=smoke run_dir=RUN_DIR OVERRIDES`` (or a wrapper script
    that patches something first and then runs the app's main)."""
    e = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    e.pop("BITNET_STOP_FILE", None)
    cmd = ([sys.executable, "-c", wrapper] if wrapper else [sys.executable, "-m", "bitnet_dist.train"])
    cmd += [*SMOKE, f"run_dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)


def records(run_dir: Path, key: str = "loss") -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


# -- item 6: overrides outside the schema ----------------------------------------------------------------------
@pytest.mark.slow  # runs the train app in subprocesses
@pytest.mark.parametrize("override", ["+trainer.max_step=30", "trainer.max_step=30", "+foo=1",
                                      "+model.hiden_size=64"])
def test_unknown_key_is_an_error_with_or_without_plus(tmp_path, override):
    r = train_cli(tmp_path / "run", override)
    assert r.returncode != 0, r.stdout
    key = override.lstrip("+").split("=")[0]
    assert key in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_unknown_key_names_the_nearest_setting():
    from hydra import compose, initialize_config_module

    from bitnet_dist.config import check_known_keys, register_configs
    from bitnet_dist.errors import ConfigError

    register_configs()
    with initialize_config_module(config_module="bitnet_dist.conf", version_base="1.3"):
        ok = compose("train", overrides=["experiment=smoke", "+engine.ds_config_overrides.zero_optimization.stage=0"])
        check_known_keys(ok)  # free-form dicts are not checked
        bad = compose("train", overrides=["experiment=smoke", "+trainer.max_step=30"])
    with pytest.raises(ConfigError) as e:
        check_known_keys(bad)
    assert e.value.key == "trainer.max_step" and e.value.value == 30
    assert "trainer.max_steps" in str(e.value)


def _wrapper(patch: str) -> str:
    """A ``python -c`` program: run ``patch`` (test-only monkeypatching), then the train app's main."""
    return "import sys\n" + patch + "\nfrom bitnet_dist.train import main\nsys.argv[0] = 'bitnet-train'\nmain()\n"


# -- item 1: divergence ----------------------------------------------------------------------------------------------
@pytest.mark.slow  # runs the train app in subprocesses
@pytest.mark.parametrize("override", ["optim.lr=inf", "optim.lr_stage2=inf", "optim.eps=nan", "optim.clip_grad=-inf",
                                      "trainer.wall_clock_minutes=inf"])
def test_nonfinite_settings_are_rejected(tmp_path, override):
    r = train_cli(tmp_path / "run", override)
    assert r.returncode == 2, (r.stdout, r.stderr)
    key = override.split("=")[0]
    assert f"invalid {key}=" in r.stderr and "a finite number" in r.stderr, r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # runs the train app in subprocesses
def test_diverging_run_skips_counts_and_stops(tmp_path):
    """A diverging run (lr 1e6): non-finite steps are skipped and counted, logged as non-finite (never -1),
    max_skipped_steps in a row stop it with one error and exit 3; every published checkpoint is finite."""
    run = tmp_path / "run"
    r = train_cli(run, "optim.lr=1e6", "optim.lr_stage2=1e6", "trainer.log_interval=1", "trainer.save_interval=1",
                  "trainer.keep_checkpoints=1", "trainer.max_skipped_steps=4")
    assert r.returncode == 3, (r.stdout, r.stderr[-3000:])
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("bitnet-train:")]
    assert len(err) == 1 and "training diverged: 4 consecutive steps" in err[0], r.stderr[-3000:]
    assert "trainer.max_skipped_steps=4" in err[0]
    assert "Traceback" not in r.stderr
    recs = records(run, "lr")  # the periodic metric records
    assert recs and all(rec["grad_norm"] is None or rec["grad_norm"] >= 0 for rec in recs)
    skipped = [rec for rec in recs if "nonfinite" in rec]
    assert skipped and skipped[-1]["skipped"] == 3, recs  # the 4th skip ends the run before its record
    assert [rec["skipped"] for rec in recs] == [0, 1, 2, 3], recs
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "skipped_step"] == [2, 3, 4]
    assert events[-1]["event"] == "diverged"
    # the skipped steps left the weights finite (they are step 1's), so their checkpoints are published; the
    # error names the newest, which is complete and records finite state
    from bitnet_dist.checkpoint import CheckpointManager, read_manifest

    ck = CheckpointManager(run)
    newest = ck.complete()[0]
    assert newest.name in err[0] and read_manifest(newest)["finite"] is True
    assert not (run / ".lock").exists()


@pytest.mark.slow  # runs the train app in subprocesses
def test_nonfinite_state_is_never_checkpointed(tmp_path):
    """Weights that turn NaN (injected after step 3) are refused at the next save: exit 3, the last good
    checkpoint stays the newest complete one, no step_4 is published."""
    run = tmp_path / "run"
    patch = (
        "import torch\n"
        "from bitnet_dist.engines.deepspeed_engine import DeepSpeedEngine\n"
        "orig = DeepSpeedEngine.train_step\n"
        "n = [0]\n"
        "def step(self, *a, **k):\n"
        "    out = orig(self, *a, **k)\n"
        "    n[0] += 1\n"
        "    if n[0] == 3:\n"
        "        with torch.no_grad():\n"
        "            next(self._ds.module.parameters()).view(-1)[0] = float('nan')\n"
        "    return out\n"
        "DeepSpeedEngine.train_step = step\n")
    r = train_cli(run, "trainer.save_interval=2", "trainer.keep_checkpoints=1", wrapper=_wrapper(patch))
    assert r.returncode == 3, r.stderr[-3000:]
    assert "step 4: the model or optimizer state holds NaN or inf; no checkpoint written" in r.stderr
    assert "step_00000002" in r.stderr
    from bitnet_dist.checkpoint import CheckpointManager

    assert [p.name for p in CheckpointManager(run).complete()] == ["step_00000002"]


def test_retention_keeps_the_newest_finite_checkpoint(tmp_path):
    from bitnet_dist.checkpoint import CheckpointManager

    m = CheckpointManager(tmp_path, keep=1)
    m.save(1, lambda d: (d / "w").write_bytes(b"1"), extra={"finite": True})
    m.save(2, lambda d: (d / "w").write_bytes(b"2"))  # a manifest that records no finiteness (older writer)
    m.save(3, lambda d: (d / "w").write_bytes(b"3"))
    assert [p.name for _, p in m.steps()] == ["step_00000001", "step_00000003"]
    m.save(4, lambda d: (d / "w").write_bytes(b"4"), extra={"finite": True})
    assert [p.name for _, p in m.steps()] == ["step_00000004"]


# -- item 3: one writer per run directory; incomplete manifests; falling back ----------------------------------------
def _losses(run):
    return [(rec["step"], rec["loss"]) for rec in records(run, "lr")]


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
    """An uninterrupted smoke run (save_interval=2, log_interval=1): its losses, step by step."""
    run = tmp_path_factory.mktemp("ref") / "run"
    r = train_cli(run, "trainer.save_interval=2", "trainer.log_interval=1")
    assert r.returncode == 0, r.stderr[-3000:]
    return _losses(run)


@pytest.mark.slow  # runs the train app in subprocesses
def test_second_launch_in_a_run_directory_refuses(tmp_path, reference_losses):
    import time

    run = tmp_path / "run"
    e = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bitnet_dist.train", *SMOKE, f"run_dir={run}", "trainer.save_interval=2",
           "trainer.log_interval=1"]
    first = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / ".lock").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    # the holder is paused while the second launch starts, so that launch meets a live holder whatever the
    # machine's speed (a paused process is alive: its lock is not stale)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    assert "is in use by another training process" in second.stderr and f"pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    assert _losses(run) == reference_losses  # the first run's metrics and checkpoints are its own
    assert not (run / ".lock").exists()


def test_stale_lock_rules(tmp_path):
    import socket

    from bitnet_dist.checkpoint import RunDirLock, RunDirLocked

    lock = tmp_path / ".lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "slurm_job_id": None}))
    RunDirLock(tmp_path, env={}).acquire()  # same host, process gone
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps({"host": "node17", "pid": 1, "slurm_job_id": "4242"}))
    with pytest.raises(RunDirLocked, match=r"host node17, pid 1, SLURM_JOB_ID 4242"):
        RunDirLock(tmp_path, env={}).acquire()  # another host, no matching job: never broken
    with pytest.raises(RunDirLocked):
        RunDirLock(tmp_path, env={"SLURM_JOB_ID": "4243"}).acquire()
    RunDirLock(tmp_path, env={"SLURM_JOB_ID": "4242"}).acquire()  # the requeued job takes its own lock over
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "slurm_job_id": None}))
    with pytest.raises(RunDirLocked):  # same host, a live process
        RunDirLock(tmp_path, env={}).acquire()


def test_lock_rules_for_reused_pids_reboots_and_slurm_incarnations(tmp_path):
    """A live pid that started at another time than the lock records is a reused pid (stale); a lock from another
    boot of this host is stale; within one Slurm job only an earlier incarnation (SLURM_RESTART_COUNT) takes the
    lock over, a second launch in the same incarnation on the same host is refused."""
    import socket

    from bitnet_dist.checkpoint import RunDirLock, RunDirLocked, _boot_id, _pid_start

    lock, host, parent = tmp_path / ".lock", socket.gethostname(), os.getppid()
    start = _pid_start(parent)
    if start is None or _boot_id() is None:
        pytest.skip("needs Linux /proc (process start times and the boot id)")

    def holder(**kw):
        lock.write_text(json.dumps({"host": host, "pid": parent, "slurm_job_id": None, "boot_id": _boot_id(),
                                    "pid_start": start, **kw}))

    def taken(env):
        RunDirLock(tmp_path, env=env).acquire()
        return json.loads(lock.read_text())["pid"] == os.getpid()

    holder()
    with pytest.raises(RunDirLocked, match="in use by another training process"):  # the live holder itself
        RunDirLock(tmp_path, env={}).acquire()
    holder(pid_start=start - 1)  # the pid runs, but it is another process than the one that took the lock
    assert taken({})
    holder(boot_id="00000000-0000-0000-0000-000000000000")  # taken before this host restarted
    assert taken({})
    job = {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}
    holder(slurm_job_id="77", slurm_restart_count="1")  # a second srun of the same incarnation, holder alive
    with pytest.raises(RunDirLocked, match="SLURM_JOB_ID 77"):
        RunDirLock(tmp_path, env=job).acquire()
    holder(slurm_job_id="77", slurm_restart_count="0")  # the incarnation before the requeue
    assert taken(job)
    holder(slurm_job_id="77", slurm_restart_count="1", pid_start=start - 1)  # same incarnation, holder gone
    assert taken(job)


def _rewrite_manifest(ckpt):
    from bitnet_dist.checkpoint import write_manifest

    write_manifest(ckpt, int(ckpt.name.split("_")[1]), {"finite": True})


@pytest.mark.slow  # runs the train app in subprocesses
def test_manifest_without_a_needed_file_is_incomplete_and_load_failures_fall_back(tmp_path, reference_losses):
    """step_8's manifest lacks deepspeed_layout.json (as two concurrent launches without a lock could publish it);
    step_6's model states are cut short with a matching manifest (verification passes, loading fails). The
    relaunch reports step_8 incomplete, warns that step_6 does not load, resumes from step_4 and ends with the
    uninterrupted run's losses."""
    run = tmp_path / "run"
    r = train_cli(run, "trainer.save_interval=2", "trainer.log_interval=1", "trainer.exit_after_steps=8",
                  "trainer.keep_checkpoints=5")
    assert r.returncode == 0, r.stderr[-3000:]
    ck = run / "checkpoints"
    (ck / "step_00000008" / "deepspeed_layout.json").unlink()
    _rewrite_manifest(ck / "step_00000008")
    states = ck / "step_00000006" / "state" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    _rewrite_manifest(ck / "step_00000006")
    r = train_cli(run, "trainer.save_interval=2", "trainer.log_interval=1", "trainer.keep_checkpoints=5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipping checkpoint" in r.stderr and "step_00000008: the manifest lists no deepspeed_layout.json" in r.stderr
    assert "could not load" in r.stderr and "step_00000006" in r.stderr and "falling back" in r.stderr
    assert "resumed from" in r.stdout and "step_00000004" in r.stdout
    assert _losses(run) == reference_losses


# -- item 4: full disk --------------------------------------------------------------------------------------------
@pytest.mark.slow  # runs the train app in subprocesses
def test_leftovers_of_interrupted_saves_are_removed(tmp_path):
    run = tmp_path / "run"
    ck = run / "checkpoints"
    for name in (".tmp_step_00000002", "step_00000002.partial-20260101-000000", "step_00000004.replaced-20260101-0"):
        (ck / name).mkdir(parents=True)
        (ck / name / "junk").write_bytes(b"x" * 1000)
    r = train_cli(run, "trainer.save_interval=10")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000010", "step_00000020"]


_SMALL_DISK = (
    "import bitnet_dist.checkpoint as c\n"
    "c.free_bytes = lambda path: 1000\n")


@pytest.mark.slow  # runs the train app in subprocesses
def test_full_disk_skips_periodic_saves_and_fails_the_final_one(tmp_path):
    """Free space below the previous checkpoint's size (simulated: free_bytes reports 1000 bytes): the periodic
    save is skipped with a warning naming the directory and the space needed, training goes on; the final save
    fails with exit 2 and the same message. The checkpoint written before the disk filled survives."""
    run = tmp_path / "run"
    r = train_cli(run, "trainer.save_interval=10", "trainer.exit_after_steps=10")
    assert r.returncode == 0
    r = train_cli(run, "trainer.save_interval=5", wrapper=_wrapper(_SMALL_DISK))
    assert r.returncode == 2, r.stderr[-3000:]
    warn = [ln for ln in r.stderr.splitlines() if "checkpoint of step 15 skipped" in ln]
    assert warn and f"not enough space for a checkpoint in {run / 'checkpoints'}" in warn[0] and "needed" in warn[0]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("bitnet-train:")]
    assert len(err) == 1 and "checkpoint error: not enough space" in err[0] and "MiB needed" in err[0], r.stderr
    assert "Traceback" not in r.stderr
    from bitnet_dist.checkpoint import CheckpointManager

    assert [p.name for p in CheckpointManager(run).complete()] == ["step_00000010"]
    assert [rec["step"] for rec in records(run, "lr")][-1] == 20  # trained on after the skipped save


def _tmpfs(path, size):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.mark.slow  # runs the train app in subprocesses
@pytest.mark.parametrize("size,kept", [("2600k", ["step_00000010"]), ("1200k", [])], ids=["second-save", "first-save"])
def test_a_save_that_runs_out_of_space_is_cleaned_up(tmp_path, size, kept):
    """A real small file system (tmpfs, when this process may mount) or a simulated ENOSPC from the writer:
    the write fails half-way, its partial files are removed, the error says no space left and names the
    directory; the relaunch (with room) resumes from the last good checkpoint."""
    disk = tmp_path / "disk"
    # 2600k: room for one checkpoint (~1.7 MB) and the run's small files, not two (the free-space check refuses
    # the second); 1200k: not even one (the first write fails half-way: torch's "unexpected pos")
    mounted = _tmpfs(disk, size)
    run = disk / "run"
    try:
        if mounted:
            r = train_cli(run, "trainer.save_interval=10", "trainer.keep_checkpoints=5")
        else:  # a writer that fails with ENOSPC at the second save
            patch = ("import errno, torch\nimport bitnet_dist.checkpoint as c\nn = [0]\norig = torch.save\n"
                     "def save(obj, f, *a, **k):\n"
                     f"    if {'step_00000020' if kept else 'step_'!r} in str(f):\n"
                     "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
                     "    return orig(obj, f, *a, **k)\ntorch.save = save\n")
            r = train_cli(run, "trainer.save_interval=10", "trainer.keep_checkpoints=5", wrapper=_wrapper(patch))
        assert r.returncode == 2, r.stderr[-3000:]
        err = [ln for ln in r.stderr.splitlines() if ln.startswith("bitnet-train:")]
        assert len(err) == 1 and str(run / "checkpoints") in err[0], r.stderr[-3000:]
        assert ("not enough space" in err[0]) or ("did not fit" in err[0]), err
        names = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert names == kept, names  # no partial save left behind
        shutil_copy = tmp_path / "roomy"
        import shutil

        shutil.copytree(run, shutil_copy)
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)
    r = train_cli(shutil_copy, "trainer.save_interval=10", "trainer.keep_checkpoints=5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("resumed from" in r.stdout and "step_00000010" in r.stdout) == bool(kept)


# -- item 8: Ctrl-C ---------------------------------------------------------------------------------------------
def _start_long(run):
    e = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bitnet_dist.train", *SMOKE, f"run_dir={run}", "trainer.max_steps=5000",
           "trainer.save_interval=1000", "trainer.log_interval=1", "trainer.eval_interval=1000"]
    return subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(run, proc, n=3):
    import time

    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len(records(run, "lr")) >= n:
            return
        time.sleep(0.05)
    raise AssertionError("the run did not start training")


def test_first_ctrl_c_stops_with_a_checkpoint(tmp_path):
    import signal

    run = tmp_path / "run"
    p = _start_long(run)
    _wait_for_steps(run, p)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "Ctrl-C: stopping at the next step boundary" in err
    from bitnet_dist.checkpoint import CheckpointManager

    latest = CheckpointManager(run).complete()[0]
    step = int(latest.name.split("_")[1])
    assert f"stopped at step {step} (signal SIGINT)" in out
    assert records(run, "lr")[-1]["step"] == step  # nothing trained after the checkpoint
    assert not (run / ".lock").exists()


def test_second_ctrl_c_aborts_at_once(tmp_path):
    import signal
    import time

    run = tmp_path / "run"
    p = _start_long(run)
    _wait_for_steps(run, p)
    p.send_signal(signal.SIGINT)
    time.sleep(0.005)
    p.send_signal(signal.SIGINT)
    t0 = time.time()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-3000:]
    assert time.time() - t0 < 20
    assert "aborted by a second Ctrl-C" in err and "Traceback" not in err, err[-3000:]
    assert not (run / ".lock").exists()


def test_an_empty_manifest_is_incomplete(tmp_path):
    """Concurrent launches without a lock could publish a checkpoint whose manifest listed no files, and verification
    accepted it. With the engine's required files it is incomplete; resume skips it."""
    from bitnet_dist.checkpoint import CheckpointManager, verify

    m = CheckpointManager(tmp_path, required=["deepspeed_layout.json", "trainer_state.pt"])
    m.save(1, lambda d: [(d / f).write_text("x") for f in ("deepspeed_layout.json", "trainer_state.pt")])
    m.save(2, lambda d: None)
    assert verify(m.path(2)) is None  # complete by its own (empty) manifest...
    assert "lists no deepspeed_layout.json" in verify(m.path(2), m.required)  # ...not by the engine's needs
    assert m.latest() == m.path(1)
