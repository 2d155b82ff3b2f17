"""Resuming with another computation is refused before anything in the run directory changes (issue item 2).

A smoke run stops after 4 of 8 steps (a checkpoint at step 4); each relaunch below changes one setting the
way a user would on the command line. Refused: one line per differing key (checkpoint value, new value), how
to start a new run, exit 2, no traceback, config.yaml and metrics.jsonl untouched. Allowed changes resume.
"""
from __future__ import annotations

import json
import shutil

import pytest
from test_failures import records, train_cli

# every test resumes a run of the train app (subprocesses)
pytestmark = pytest.mark.slow

BASE = ["trainer.max_steps=8", "trainer.save_interval=4", "trainer.log_interval=1", "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("resume") / "run"
    r = train_cli(run, *BASE, "trainer.exit_after_steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "checkpoints" / "step_00000004" / "settings.json").is_file()
    return run


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    # the copy's recorded run_dir differs; nothing compares it (run_dir is not a computation setting)
    return dst


def _snapshot(run):
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*")
            if p.is_file() and "hydra" not in p.parts}


@pytest.mark.parametrize("override,keys", [
    ("precision=b158", ["precision.hadamard", "precision.name"]),
    ("precision=v2_a4_no_hadamard", ["precision.act_bits", "precision.hadamard", "precision.name"]),
    ("precision=bf16", ["precision.name", "precision.quantize"]),
    ("model=small", ["model.hidden_size", "model.name", "model.num_layers"]),
    ("model.hidden_size=128", ["model.hidden_size"]),
    ("data.vocab_size=1024", ["data.vocab_size"]),
    ("trainer.dtype=bf16", ["trainer.dtype"]),
    ("trainer.seed=7", ["trainer.seed"]),
    ("trainer.max_steps=16", ["trainer.max_steps"]),
    ("parallel.zero_stage=1", ["parallel.zero_stage"]),
])
def test_resume_with_another_computation_is_refused(stopped_run, tmp_path, override, keys):
    run = _copy(stopped_run, tmp_path)
    before = _snapshot(run)
    r = train_cli(run, *[b for b in BASE if not b.startswith(override.split("=")[0] + "=")], override)
    assert r.returncode == 2, (r.stdout, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln.strip() for ln in r.stderr.splitlines() if ": checkpoint " in ln and ", now " in ln]
    got = [ln.split(":")[0] for ln in lines]
    for k in keys:
        assert k in got, (k, r.stderr)
    assert len(got) == len(set(got)), "one line per key"
    assert "start a new run in another directory" in r.stderr
    assert _snapshot(run) == before, "the refused launch changed the run directory"


def test_allowed_changes_resume_and_optim_changes_are_reported(stopped_run, tmp_path):
    run = _copy(stopped_run, tmp_path)
    r = train_cli(run, "trainer.max_steps=8", "optim.warmup_steps=2", "trainer.save_interval=2", "trainer.log_interval=2",
                  "trainer.keep_checkpoints=2", "trainer.micro_batch_size=2", "optim.lr=0.001",
                  "precision.kernels=torch", "trainer.max_skipped_steps=9")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "note: optim.lr changed since step_00000004 (0.0018 -> 0.001)" in r.stderr, r.stderr[-3000:]
    assert "note: precision.kernels changed" in r.stderr
    assert "resumed from" in r.stdout
    assert [rec["step"] for rec in records(run, "lr")][-1] == 8


def test_settings_json_records_the_computation(stopped_run):
    s = json.loads((stopped_run / "checkpoints" / "step_00000004" / "settings.json").read_text())
    assert s["model.hidden_size"] == 64 and s["precision.name"] == "v2_a8_to_a4" and s["trainer.dtype"] == "fp32"
    assert s["data.vocab_size"] == 512 and s["engine"] == "deepspeed" and s["number of processes"] == 1


def test_a_newer_checkpoint_without_settings_does_not_hide_the_record(stopped_run, tmp_path):
    """A step_* with a manifest but no settings.json (the empty manifest of two concurrent launches) is not the
    record compared against: the newest checkpoint that records settings is."""
    from bitnet_dist.checkpoint import write_manifest

    run = _copy(stopped_run, tmp_path)
    bad = run / "checkpoints" / "step_00000006"
    bad.mkdir()
    write_manifest(bad, 6)
    r = train_cli(run, *BASE, "precision=b158")
    assert r.returncode == 2 and "precision.name: checkpoint 'v2_a8_to_a4', now 'b158'" in r.stderr, r.stderr[-2000:]
