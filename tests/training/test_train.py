"""The train app end to end (tiny model, synthetic tokens, DeepSpeed engine, 1 CPU process, fp32).

* resume exactness: a run stopped at step k (trainer.exit_after_steps, the same code path as a
  preemption; k = the 8 -> 4 switch step, the delicate case) and relaunched with the same overrides finds its checkpoint through the derived
  run_dir and produces bitwise the losses of an uninterrupted run; with its newest checkpoint
  corrupted, a relaunch reports it, resumes from the one before and again reproduces the losses;
* statistics probes leave the loss curve bitwise as a run without them has it;
* a 2-configuration Hydra multirun (-m) sweep in one process.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

COMMON = ["experiment=smoke", "engine=deepspeed", "trainer.dtype=fp32", "logging.wandb=disabled",
          "trainer.max_steps=12", "optim.warmup_steps=2", "precision.switch_fraction=0.5",
          "trainer.log_interval=1", "trainer.eval_interval=4", "trainer.save_interval=4",
          "trainer.stats_interval=5", "trainer.progress_bar=false", "trainer.report=false"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")


def launch(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "bitnet_dist.train", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(*procs, timeout=600):
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rc, out, err in outs:
        assert rc == 0, f"exit {rc}\n{out[-3000:]}\n{err[-6000:]}"
    return outs


def records(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def by_step(recs, key, within="loss"):
    """{step: value of key} over the records that carry ``within`` (train records by default)."""
    out = {}
    for r in recs:
        if key in r and within in r and "event" not in r:
            assert r["step"] not in out, f"step {r['step']} logged twice for {key}"
            out[r["step"]] = r[key]
    return out


def test_resume_is_bitwise_exact_and_skips_a_corrupt_checkpoint(tmp_path):
    ref_dir = tmp_path / "reference"
    a = launch(COMMON + [f"run_dir={ref_dir}"], tmp_path)
    # stops at the switch step; run_dir derived from the overrides
    b = launch(COMMON + ["trainer.exit_after_steps=6"], tmp_path)
    finish(a, b)
    derived = list((tmp_path / "runs" / "smoke").iterdir())
    assert len(derived) == 1, derived  # exit_after_steps is run-invariant: not part of the name
    run_dir = derived[0]
    assert "trainer.exit_after_steps" not in run_dir.name and "trainer.max_steps=12" in run_dir.name
    assert max(by_step(records(run_dir), "loss")) == 6
    stop = [r for r in records(run_dir) if r.get("event") == "stop"]
    assert stop and stop[0]["step"] == 6

    # the relaunch: same overrides, same run_dir; beside it a run without statistics probes
    unprobed_dir = tmp_path / "unprobed"
    (_, out, _), _ = finish(launch(COMMON, tmp_path),
                            launch(COMMON + ["trainer.stats_interval=0", f"run_dir={unprobed_dir}"], tmp_path))
    assert "resumed from" in out and "step_00000006" in out
    # the probes (steps 5, 6, 10: a forward-only pass of their own) leave the training curve as it is
    probes = [r for r in records(ref_dir) if any(k.startswith("stats/wo/") for k in r)]
    assert sorted(r["step"] for r in probes) == [5, 6, 7, 10]  # every 5 steps; 6, 7: the steps around the switch
    assert all(r["stats_probe_s"] > 0 for r in probes)
    assert not any(k.startswith("stats/") for r in records(unprobed_dir) for k in r)
    for key in ("loss", "grad_norm"):
        assert by_step(records(unprobed_dir), key) == by_step(records(ref_dir), key), key

    ref, got = records(ref_dir), records(run_dir)
    for key in ("loss", "grad_norm", "lr", "wd", "act_bits", "val_loss"):
        within = "val_loss" if key == "val_loss" else "loss"
        want, have = by_step(ref, key, within), by_step(got, key, within)
        assert have == want, (key, want, have)  # bitwise: floats compare exactly
        assert len(want) >= 3
    assert sorted(by_step(got, "loss")) == list(range(1, 13))  # contiguous, none repeated
    assert by_step(got, "act_bits")[6] == 8 and by_step(got, "act_bits")[7] == 4  # switch at step 6
    switch = [r for r in got if r.get("event") == "act_bits_switch"]
    assert [(r["step"], r["from_bits"], r["to_bits"]) for r in switch] == [(6, 8, 4)]
    k = "val_loss_before_switch"
    assert by_step(got, k, within=k) == by_step(ref, k, within=k) and len(by_step(ref, k, within=k)) == 1

    # Corrupt the newest checkpoint: the relaunch reports it, resumes from step 8 and recomputes 9..12.
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_00000006", "step_00000008", "step_00000012"]  # keep 3
    victim = max((p for p in ckpts[-1].rglob("*") if p.is_file() and p.name != "manifest.json"),
                 key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    (_, out, err), = finish(launch(COMMON, tmp_path))
    warn = [line for line in err.splitlines() if "skipping checkpoint" in line]
    assert len(warn) == 1 and "step_00000012" in warn[0] and "SHA-256" in warn[0], err[-3000:]
    assert "step_00000008" in out
    # the corrupt one is never deleted: the new save of step 12 moved it aside
    assert any(p.name.startswith("step_00000012.replaced-") for p in (run_dir / "checkpoints").iterdir())
    got = records(run_dir)
    assert by_step(got, "loss") == by_step(ref, "loss")
    assert by_step(got, "val_loss", within="val_loss") == by_step(ref, "val_loss", within="val_loss")


def test_multirun_sweep_of_two_configs(tmp_path):
    args = ["-m", "experiment=smoke", "precision=v2_a8,bf16", "trainer.max_steps=4", "trainer.eval_interval=2",
            "trainer.save_interval=2", "trainer.log_interval=1", "trainer.stats_interval=2", "optim.warmup_steps=1",
            "logging.wandb=disabled", "trainer.progress_bar=false"]
    (_, out, err), = finish(launch(args, tmp_path))
    runs = sorted(p.name for p in (tmp_path / "runs" / "smoke").iterdir() if p.name != "multirun")
    assert runs == ["optim.warmup_steps=1,precision=bf16,trainer.max_steps=4",
                    "optim.warmup_steps=1,precision=v2_a8,trainer.max_steps=4"], (runs, err[-3000:])
    for name in runs:
        d = tmp_path / "runs" / "smoke" / name
        assert (d / "report.md").is_file() and (d / "report.png").stat().st_size > 1000
        recs = records(d)
        assert sorted(by_step(recs, "loss")) == [1, 2, 3, 4]
        assert sorted(by_step(recs, "val_loss", within="val_loss")) == [2, 4]
        assert (d / "checkpoints" / "step_00000004" / "manifest.json").is_file()
    # the two precisions differ (bf16 = plain linear layers, v2_a8 = ternary weights, 8-bit activations)
    l1, l2 = (by_step(records(tmp_path / "runs" / "smoke" / n), "loss")[4] for n in runs)
    assert l1 != l2


def test_report_marks_the_switch_and_compares_with_unigram(tmp_path):
    from bitnet_dist.report import write_report

    recs = [{"step": 0, "event": "start", "unigram_ppl": 900.0}]
    for s in range(1, 11):
        recs.append({"step": s, "loss": 7.0 - 0.2 * s, "act_bits": 8 if s <= 8 else 4, "tokens": 100 * s,
                     "tokens_per_s": 1000.0 + s})
    recs += [{"step": 5, "val_loss": 6.0, "val_ppl": 403.4, "act_bits": 8},
             {"step": 8, "val_loss_before_switch": 5.5, "val_ppl_before_switch": 244.7, "act_bits": 8},
             {"step": 8, "event": "act_bits_switch", "from_bits": 8, "to_bits": 4},
             {"step": 8, "val_loss_after_switch": 5.6, "val_ppl_after_switch": 270.4, "act_bits": 4},
             {"step": 10, "val_loss": 5.0, "val_ppl": 148.4, "act_bits": 4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 11, "lo')
    md = write_report(tmp_path).read_text()  # the torn last line (a crash mid-write) is ignored
    assert "| final validation perplexity | 148.41 |" in md  # exp(5.0), from val_loss
    assert "| unigram perplexity of the validation text | 900.00 |" in md
    assert "| perplexity / unigram perplexity | 0.165 |" in md
    assert "act_bits switch 8 -> 4 | step 8, val ppl 244.70 -> 270.40" in md
    assert "| tokens trained | 1000 |" in md
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_wall_clock_guard_saves_and_exits_zero(tmp_path):
    """trainer.wall_clock_minutes: at the first step boundary past the limit every rank saves and exits 0."""
    run_dir = tmp_path / "r"
    (_, out, _), = finish(launch(COMMON + ["trainer.wall_clock_minutes=0.0001", f"run_dir={run_dir}"], tmp_path))
    recs = records(run_dir)
    stop = [r for r in recs if r.get("event") == "stop"]
    assert [(r["step"], r["reason"]) for r in stop] == [(1, "wall-clock limit")]
    assert not [r for r in recs if r.get("event") == "finished"]
    assert (run_dir / "checkpoints" / "step_00000001" / "manifest.json").is_file()
    assert "stopped at step 1" in out
