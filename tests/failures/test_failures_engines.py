"""Non-finite steps in the engines (bitnet_dist.engines.guard; docs/failures.md).

DeepSpeed on CPU: a step whose gradients are NaN (a hook poisons one parameter's gradient) is skipped: the
weights and the Adam state stay bitwise as they were, so the run after it is bitwise the run without it. The
megatron engine's decision (guard.megatron_step) is tested on CPU against an optimizer with megatron-core's
interface; the engine path itself on a GPU (test_megatron_skips_nonfinite_step_gpu).
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from dist_utils import free_port, run_ranks

VOCAB, SEQ, MBS, GBS = 96, 16, 2, 4


def _cfg(zero: int, dtype: str = "fp32"):
    from bitnet_dist.config import TrainConfig
    from bitnet_dist.presets import model_preset, precision_preset

    cfg = TrainConfig(model=model_preset("tiny"), precision=precision_preset("v2_a8"))
    cfg.engine.name = "deepspeed"
    cfg.parallel.zero_stage = zero
    t = cfg.trainer
    t.seq_length, t.micro_batch_size, t.global_batch_size, t.dtype = SEQ, MBS, GBS, dtype
    return cfg


def _batches(step: int, dp_rank: int, dp: int):
    g = torch.Generator().manual_seed(1000 + step)
    toks = torch.randint(0, VOCAB, (GBS, SEQ + 1), generator=g)
    per = GBS // dp
    t = toks[dp_rank * per:(dp_rank + 1) * per]
    return [dict(tokens=t[i:i + MBS, :-1], labels=t[i:i + MBS, 1:], loss_mask=torch.ones(MBS, SEQ))
            for i in range(0, per, MBS)]


def _snapshot(eng):
    return [t.detach().clone() for t in eng.state_tensors() if isinstance(t, torch.Tensor)] + [
        v.detach().clone() for st in eng._ds.basic_optimizer.state.values() for v in st.values()
        if isinstance(v, torch.Tensor)]


def _job(rank, world, zero, dtype):
    from bitnet_dist.engines import make_engine
    from bitnet_dist.engines.guard import state_finite

    def build():
        eng = make_engine(_cfg(zero, dtype))
        eng.init_parallel()
        eng.build(VOCAB)
        return eng

    out = {}
    a = build()
    losses_a = [a.train_step(_batches(s, a.dp_rank, a.dp_size), 1e-3, 0.1).loss for s in range(2)]
    before = _snapshot(a)
    param = next(p for n, p in a._ds.module.named_parameters() if "word_embeddings" in n)
    hook = param.register_hook(lambda g: g * float("nan"))
    bad = a.train_step(_batches(99, a.dp_rank, a.dp_size), 1e-3, 0.1)
    hook.remove()
    after = _snapshot(a)
    out["bad"] = (bad.loss, bad.grad_norm, bad.skipped)
    out["unchanged"] = len(before) == len(after) and all(torch.equal(x, y) for x, y in zip(before, after))
    out["finite"] = state_finite(a.state_tensors())
    stats = [a.train_step(_batches(s, a.dp_rank, a.dp_size), 1e-3, 0.1) for s in (2, 3)]
    out["a"] = losses_a + [s.loss for s in stats]
    out["a_skipped"] = [s.skipped for s in stats]
    b = build()  # the same run without the poisoned step
    out["b"] = [b.train_step(_batches(s, b.dp_rank, b.dp_size), 1e-3, 0.1).loss for s in range(4)]
    return out


@pytest.mark.parametrize("zero,dtype", [(0, "fp32"), (1, "fp32"), (1, "bf16"), (2, "fp32"), (3, "fp32")],
                         ids=["fp32", "zero1", "zero1-bf16", "zero2", "zero3"])
def test_deepspeed_skips_a_nonfinite_step_bitwise(zero, dtype):
    res = run_ranks(_job, 1, zero, dtype, timeout=300)[0]
    loss, grad_norm, skipped = res["bad"]
    assert skipped and math.isfinite(loss) and not math.isfinite(grad_norm), res["bad"]  # NaN, not DeepSpeed's -1
    assert res["unchanged"], "a skipped step changed weights or optimizer state"
    assert res["finite"]
    assert res["a_skipped"] == [False, False]
    assert res["a"] == res["b"], "the run with a skipped step differs from the run without it"


@pytest.mark.slow
def test_deepspeed_skip_is_agreed_by_every_rank():
    res = run_ranks(_job, 2, 1, "fp32", timeout=300)
    for r in res:
        assert r["bad"][2] and r["unchanged"] and r["a"] == r["b"]
    assert res[0]["a"] == res[1]["a"]


# -- megatron: the decision between megatron-core's norm and its update ---------------------------------------------
class _Config:
    clip_grad = 1.0
    use_precision_aware_optimizer_no_fp8_or_ds_fp8 = False


class FakeMegatronOptimizer:
    """megatron-core's MegatronOptimizer interface (prepare_grads, get_grad_norm, get_parameters,
    step_with_ready_grads, config) over a torch AdamW on CPU, grads in ``.grad``."""

    def __init__(self, params, found_inf=False):
        self.params = list(params)
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-2)
        self.config = _Config()
        self.found_inf = found_inf
        self.calls = []

    def prepare_grads(self):
        self.calls.append("prepare_grads")
        return self.found_inf

    def get_grad_norm(self):
        self.calls.append("get_grad_norm")
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params])).item()

    def get_parameters(self):
        return self.params

    def step_with_ready_grads(self):
        self.calls.append("step_with_ready_grads")
        self.optimizer.step()
        return True


def _params(grad_scale=1.0):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    for p in ps:
        p.grad = torch.randn_like(p) * grad_scale
    return ps


def test_megatron_step_applies_finite_steps_with_clipping(monkeypatch):
    import megatron.core.optimizer.clip_grads as cg

    from bitnet_dist.engines.guard import megatron_step

    clips = []

    def clip_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
        # megatron-core's clip_grad_by_total_norm_fp32 (clip_grads.py) asserts CUDA tensors; its formula on CPU
        clips.append((max_norm, total_norm, use_decoupled_grad))
        coeff = max_norm / (total_norm + 1.0e-6)
        if coeff < 1.0:
            for p in parameters:
                p.grad.mul_(coeff)

    monkeypatch.setattr(cg, "clip_grad_by_total_norm_fp32", clip_cpu)

    ps = _params(grad_scale=10.0)
    ref = [p.detach().clone().requires_grad_() for p in ps]
    for r, p in zip(ref, ps):
        r.grad = p.grad.clone()
    norm_ref = torch.nn.utils.clip_grad_norm_(ref, 1.0).item()
    torch.optim.AdamW(ref, lr=1e-2).step()
    opt = FakeMegatronOptimizer(ps)
    applied, norm = megatron_step(opt, loss=3.0)
    assert applied and norm == pytest.approx(norm_ref, rel=1e-6)
    assert opt.calls == ["prepare_grads", "get_grad_norm", "step_with_ready_grads"]
    assert clips == [(1.0, norm, False)]
    for r, p in zip(ref, ps):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", ["nan_grad", "inf_loss", "nan_loss", "found_inf"])
def test_megatron_step_skips_nonfinite(case):
    from bitnet_dist.engines.guard import megatron_step

    ps = _params()
    if case == "nan_grad":
        ps[1].grad[2] = float("nan")
    before = [p.detach().clone() for p in ps]
    opt = FakeMegatronOptimizer(ps, found_inf=case == "found_inf")
    loss = {"inf_loss": float("inf"), "nan_loss": float("nan")}.get(case, 2.0)
    applied, norm = megatron_step(opt, loss=loss)
    assert not applied
    assert "step_with_ready_grads" not in opt.calls
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, ps))
    assert not opt.optimizer.state, "the skipped step created Adam state"
    if case in ("nan_grad", "found_inf"):
        assert not math.isfinite(norm)


def test_skip_counter_stops_after_max_consecutive():
    from bitnet_dist.engines.guard import DivergenceError, SkipCounter, clean_norm, skip_step

    assert skip_step(1.0, clean_norm(-1.0)) and clean_norm(-1.0) != clean_norm(-1.0)  # DeepSpeed's -1 is NaN
    assert not skip_step(1.0, 0.5) and skip_step(float("inf"), 0.5) and skip_step(1.0, None)
    c = SkipCounter(3)
    assert c.record(1, False, 1.0, 1.0) is None
    assert "1 in a row" in c.record(2, True, float("nan"), 1.0)
    c.record(3, True, float("nan"), 1.0)
    c.record(4, False, 1.0, 1.0)  # a good step resets the run of skips
    c.record(5, True, 1.0, float("inf"))
    c.record(6, True, 1.0, float("inf"))
    with pytest.raises(DivergenceError, match=r"3 consecutive steps \(5-7\).*step_00000004"):
        c.record(7, True, 1.0, float("inf"), last_checkpoint="run/checkpoints/step_00000004")
    assert c.total == 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: megatron-core's optimizers and schedules "
                    "are CUDA-only (the decision is tested on CPU above)")
def test_megatron_skips_nonfinite_step_gpu():
    skipped, unchanged, good_skipped, loss_skipped = run_ranks(_megatron_job, 1, timeout=60, result_timeout=240)[0]
    assert skipped and unchanged and not good_skipped and loss_skipped


def _megatron_job(rank, world):
    import torch.distributed as dist

    from bitnet_dist.engines.megatron_engine import MegatronEngine

    # the engine starts its own NCCL group from the rank's environment, as under torchrun (the harness's gloo
    # group would carry megatron's CUDA collectives, which the GPU tests of the engine do not use)
    dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(free_port())  # the gloo group's store may still hold its port
    cfg = _cfg(0, "bf16")
    cfg.engine.name = "megatron"
    eng = MegatronEngine(cfg)
    eng.init_parallel()
    eng.build(VOCAB)
    eng.train_step(_batches(0, eng.dp_rank, eng.dp_size), 1e-3, 0.1)

    def state():
        return [t.detach().clone() for t in eng.state_tensors() if isinstance(t, torch.Tensor)]

    before = state()
    p = next(p for n, p in eng.model_chunks()[0].named_parameters() if "word_embeddings" in n)
    h = p.register_hook(lambda g: g * float("nan"))
    bad = eng.train_step(_batches(99, eng.dp_rank, eng.dp_size), 1e-3, 0.1)
    h.remove()
    unchanged = all(torch.equal(x, y) for x, y in zip(before, state()))
    good = eng.train_step(_batches(1, eng.dp_rank, eng.dp_size), 1e-3, 0.1)
    # a non-finite loss with finite gradients: the loss the schedule reports is replaced by inf
    orig = eng._run_schedule
    eng._run_schedule = lambda *a, **k: (float("inf"), orig(*a, **k)[1])
    before = state()
    inf_loss = eng.train_step(_batches(2, eng.dp_rank, eng.dp_size), 1e-3, 0.1)
    loss_skipped = inf_loss.skipped and all(torch.equal(x, y) for x, y in zip(before, state()))
    return bad.skipped, unchanged, good.skipped, loss_skipped


# -- megatron engine on CPU (model_only): its checkpoint files, the finiteness check, an incomplete manifest ----------
def _megatron_ckpt_job(rank, world, root):
    from pathlib import Path

    from bitnet_dist.checkpoint import CheckpointManager, write_manifest
    from bitnet_dist.engines.guard import state_finite
    from bitnet_dist.engines.megatron_engine import MegatronEngine

    cfg = _cfg(0, "fp32")
    cfg.engine.name = "megatron"
    eng = MegatronEngine(cfg, model_only=True)
    eng.init_parallel()
    eng.build(VOCAB)
    m = CheckpointManager(root, keep=2, required=[*eng.checkpoint_files(), "trainer_rank00000.pt"])

    def write(d):
        eng.save(d, {"step": 1})
        torch.save({"rank": 0}, d / "trainer_rank00000.pt")

    finite = state_finite(eng.state_tensors())
    m.save(1, write, extra={"finite": finite})
    complete_before = [p.name for p in m.complete()]
    with torch.no_grad():
        next(eng.model_chunks()[0].parameters()).view(-1)[0] = float("nan")
    finite_after_nan = state_finite(eng.state_tensors())
    for shard in (Path(root) / "checkpoints" / "step_00000001" / "megatron").glob("*.distcp"):
        shard.unlink()  # what a manifest of a save cut short by a concurrent writer can list
    write_manifest(Path(root) / "checkpoints" / "step_00000001", 1)
    return finite, complete_before, finite_after_nan, [p.name for p in m.complete()], eng.checkpoint_files()


def test_megatron_checkpoint_files_and_finiteness_on_cpu(tmp_path):
    finite, before, after_nan, after, files = run_ranks(_megatron_ckpt_job, 1, str(tmp_path), timeout=300)[0]
    assert finite and before == ["step_00000001"], (before, files)  # the megatron patterns match its real files
    assert not after_nan
    assert after == []  # a manifest without the shards is incomplete


# -- megatron engine on CPU: a checkpoint that does not fit ---------------------------------------------------------
def _megatron_full_disk_job(rank, world, root, mounted):
    """Save 1 fits; save 2 runs out of space inside megatron's dist-checkpoint writer (a real small tmpfs, or where
    this process may not mount one, the same failure raised as megatron raises it: torch's CheckpointException
    around the writer's ENOSPC, with the disk reported full)."""
    from pathlib import Path

    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    import bitnet_dist.checkpoint as ck
    from bitnet_dist.engines.megatron_engine import MegatronEngine

    cfg = _cfg(0, "fp32")
    cfg.engine.name = "megatron"
    eng = MegatronEngine(cfg, model_only=True)
    eng.init_parallel()
    eng.build(VOCAB)
    m = ck.CheckpointManager(root, keep=3, required=[*eng.checkpoint_files(), "trainer_rank00000.pt"],
                             space_margin=0.0)  # no pre-check: the write itself has to fail

    def write(d, step):
        eng.save(d, {"step": step})
        torch.save({"rank": 0}, d / "trainer_rank00000.pt")
        if not mounted and step == 2:
            try:
                raise OSError(28, "No space left on device")
            except OSError as e:
                ck.free_bytes = lambda path: 1000
                raise CheckpointException("save", {0: _wrap_exception(RuntimeError(f"Worker failure: {e}"))}) from e

    m.save(1, lambda d: write(d, 1))
    ballast = Path(root) / "ballast"
    if mounted:  # leave less room than one checkpoint
        free = ck.free_bytes(Path(root)) - ck.checkpoint_bytes(m.path(1)) // 2
        ballast.write_bytes(b"x" * max(free, 0))
    try:
        m.save(2, lambda d: write(d, 2))
        err = None
    except BaseException as e:  # what the manager raises is the point
        err = f"{type(e).__name__}: {e}"
    left = sorted(p.name for p in (Path(root) / "checkpoints").iterdir())
    return err, left, [p.name for p in m.complete()]


def test_megatron_save_that_does_not_fit_is_a_disk_error(tmp_path):
    """On a full disk megatron's dist checkpoint raises torch's CheckpointException (a BaseException) around the
    writer's error; the manager reports it as the disk error (directory, what failed), removes the partial save
    and keeps the last good checkpoint (before: the raw CheckpointException and its rank tracebacks)."""
    import subprocess

    from test_failures import _tmpfs

    disk = tmp_path / "disk"
    mounted = _tmpfs(disk, "3m")
    try:
        err, left, complete = run_ranks(_megatron_full_disk_job, 1, str(disk / "run"), mounted, timeout=300)[0]
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)
    assert err is not None and err.startswith("DiskSpaceError: the checkpoint of step 2 did not fit in "), err
    assert str(disk / "run" / "checkpoints") in err and "partial files were removed" in err, err
    # what failed, from the rank's traceback (ENOSPC, or torch.save's "unexpected pos" on a full disk), not the
    # wrapper's first line
    assert ("No space left on device" in err or "unexpected pos" in err) and "ranks:" not in err, err
    assert left == ["step_00000001"] and complete == ["step_00000001"], (left, complete)
