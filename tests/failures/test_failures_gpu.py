"""The failure behaviour of the train app on the megatron engine (CUDA): the CPU tests run the DeepSpeed engine
through the same train loop, checkpoint manager and guard; these run the megatron engine's path end to end.
Skipped without CUDA (megatron-core's schedules and optimizers are CUDA-only)."""
from __future__ import annotations

import pytest
import torch
from test_failures import _SMALL_DISK, _wrapper, records, train_cli

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the megatron engine's training "
                                 "path (its CPU logic is in test_failures_engines.py)")]

MEGATRON = ["engine=megatron", "trainer.log_interval=1"]


def test_megatron_divergence_skips_and_stops(tmp_path):
    run = tmp_path / "run"
    r = train_cli(run, *MEGATRON, "optim.lr=1e6", "optim.lr_stage2=1e6", "trainer.save_interval=1",
                  "trainer.max_skipped_steps=3")
    assert r.returncode == 3, r.stderr[-3000:]
    assert "training diverged: 3 consecutive steps" in r.stderr
    recs = records(run, "lr")
    assert recs[-1]["skipped"] >= 2 and all(x["grad_norm"] is None or x["grad_norm"] >= 0 for x in recs)


def test_megatron_resume_guard_lock_and_resume(tmp_path):
    run = tmp_path / "run"
    r = train_cli(run, *MEGATRON, "trainer.save_interval=5", "trainer.exit_after_steps=10")
    assert r.returncode == 0, r.stderr[-3000:]
    r = train_cli(run, *MEGATRON, "precision=b158")
    assert r.returncode == 2 and "precision.name: checkpoint" in r.stderr, r.stderr[-3000:]
    r = train_cli(run, *MEGATRON, "trainer.save_interval=5")
    assert r.returncode == 0 and "step_00000010" in r.stdout, r.stderr[-3000:]
    assert records(run, "lr")[-1]["step"] == 20
    assert not (run / ".lock").exists()


def test_megatron_full_disk_skips_periodic_saves_and_fails_the_final_one(tmp_path):
    """test_failures.py's full-disk test on the megatron engine (free space simulated below the previous
    checkpoint's size): the periodic save is skipped with a warning, the final one fails with exit 2 and one
    line, the checkpoint from before survives and training went on."""
    run = tmp_path / "run"
    r = train_cli(run, *MEGATRON, "trainer.save_interval=10", "trainer.exit_after_steps=10")
    assert r.returncode == 0, r.stderr[-3000:]
    r = train_cli(run, *MEGATRON, "trainer.save_interval=5", wrapper=_wrapper(_SMALL_DISK))
    assert r.returncode == 2, r.stderr[-3000:]
    assert any("checkpoint of step 15 skipped" in ln for ln in r.stderr.splitlines()), r.stderr[-3000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("bitnet-train:")]
    assert len(err) == 1 and "checkpoint error: not enough space" in err[0], r.stderr[-3000:]
    from bitnet_dist.checkpoint import CheckpointManager

    assert [p.name for p in CheckpointManager(run).complete()] == ["step_00000010"]
    assert [rec["step"] for rec in records(run, "lr")][-1] == 20
