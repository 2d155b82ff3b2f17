"""The failure behaviour of the train app on the megatron engine (CUDA): the CPU tests run the DeepSpeed engine
through the same train loop, checkpoint manager and guard; these run the megatron engine's path end to end.
Skipped without CUDA (megatron-core's schedules and optimizers are CUDA-only)."""
from __future__ import annotations

import pytest
import torch
from test_failures import records, train_cli

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
