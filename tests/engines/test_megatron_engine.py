"""The megatron engine on CPU (gloo): what megatron-core runs without CUDA.

* configuration errors before any process-group work;
* tensor-parallel invariance of the model built through the engine's construction path
  (MegatronEngine(model_only=True)): TP=2 gives the TP=1 loss and gradient norm;
* dist_checkpointing through engine.save/load: written at TP=2, re-read and re-written at a pipeline
  x virtual-pipeline layout (PP=2, VP=2), read back at TP=1 with the same loss as at TP=2.

The schedules, megatron optimizers and the training step are CUDA-only (megatron-core has no CPU path
there); test_megatron_gpu.py covers them and is skipped on CPU.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from bitnet_dist.config import TrainConfig
from bitnet_dist.engines.megatron_engine import MegatronEngine, check_megatron_config
from bitnet_dist.errors import ConfigError
from bitnet_dist.presets import model_preset, precision_preset

VOCAB = 200
SEQ = 32


def tiny_cfg(tp=1, pp=1, vp=None, precision="v2_a8", layers=2, seq=SEQ, **trainer):
    cfg = TrainConfig()
    cfg.model = model_preset("tiny", num_layers=layers)
    cfg.precision = precision_preset(precision)
    cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.virtual_pipeline = tp, pp, vp
    cfg.engine.name = "megatron"
    cfg.trainer.seq_length = seq
    cfg.trainer.micro_batch_size = 2
    cfg.trainer.global_batch_size = 4
    cfg.trainer.dtype = "fp32"
    cfg.trainer.seed = 1234
    for k, v in trainer.items():
        setattr(cfg.trainer, k, v)
    return cfg


def fixed_batch(seed=0, b=2, s=SEQ):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, s + 1), generator=g)
    mask = torch.ones(b, s)
    mask[0, : s // 4] = 0.0  # token weighting must follow the mask, not the shape
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), "loss_mask": mask}


# -- configuration errors ---------------------------------------------------------------------------------
def test_engine_refuses_cpu_training_with_the_fix():
    with pytest.raises(ConfigError, match=r"engine.*deepspeed"):
        check_megatron_config(tiny_cfg(), cuda=False)


@pytest.mark.parametrize("mutate, key", [
    (lambda c: setattr(c.parallel, "zero_stage", 2), "parallel.zero_stage"),
    (lambda c: (setattr(c.parallel, "distributed_optimizer", False), setattr(c.engine, "overlap_param_gather", True)),
     "engine.overlap_param_gather"),
    (lambda c: (setattr(c.parallel, "tensor", 2), setattr(c.parallel, "sequence", True),
                setattr(c.trainer, "seq_length", 33)), "trainer.seq_length"),
    (lambda c: setattr(c.parallel, "sequence", True), "parallel.sequence"),  # SP needs TP > 1
    (lambda c: setattr(c.trainer, "seq_length", 4096), "trainer.seq_length"),
    (lambda c: setattr(c.parallel, "tensor", 3), "parallel.tensor"),
    (lambda c: (setattr(c.engine, "cuda_graph", True), setattr(c.engine, "overlap_param_gather", True)),
     "engine.cuda_graph"),
    (lambda c: (setattr(c.engine, "cuda_graph", True), setattr(c.engine, "cuda_graph_warmup", 0)),
     "engine.cuda_graph_warmup"),
])
def test_config_errors_name_the_key(mutate, key):
    cfg = tiny_cfg()
    mutate(cfg)
    with pytest.raises(ConfigError) as e:
        check_megatron_config(cfg, cuda=True)
    assert e.value.key == key


def test_layout_errors_need_the_world_size():
    cfg = tiny_cfg(tp=2)
    with pytest.raises(ConfigError, match="number of processes"):
        check_megatron_config(cfg, world_size=3, cuda=True)
    cfg = tiny_cfg(pp=2, vp=1, layers=4, global_batch_size=6)  # 3 micro-batches, not a multiple of PP
    with pytest.raises(ConfigError) as e:
        check_megatron_config(cfg, world_size=2, cuda=True)
    assert e.value.key == "trainer.global_batch_size" and "interleaved" in e.value.fix
    cfg = tiny_cfg(global_batch_size=6)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        check_megatron_config(cfg, world_size=2, cuda=True)
    check_megatron_config(tiny_cfg(pp=2, vp=1, layers=4, global_batch_size=8), world_size=2, cuda=True)


# -- multi-process workers (top level: spawned ranks import them) ---------------------------------------------
def _grad_sq_norm(model) -> float:
    """Global squared L2 norm of the gradients: TP-sharded tensors summed over TP, replicated ones once."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is None:
            continue
        sq = p.grad.double().pow(2).sum()
        if getattr(p, "tensor_model_parallel", False):
            sharded += sq
        else:
            replicated += sq
    dist.all_reduce(sharded, group=ps.get_tensor_model_parallel_group())
    return (sharded + replicated).item()


def _tp_loss(cfg):
    from bitnet_dist.engines.common import position_ids

    eng = MegatronEngine(cfg, model_only=True)
    eng.init_parallel()
    eng.build(VOCAB)
    (model,) = eng.model_chunks()
    b = fixed_batch()
    per_tok = model(input_ids=b["tokens"], position_ids=position_ids(b["tokens"]), attention_mask=None,
                    labels=b["labels"])
    loss = (per_tok * b["loss_mask"]).sum() / b["loss_mask"].sum()
    loss.backward()
    eval_loss, ntok = eng.eval_loss([b])
    return {"loss": loss.item(), "eval": eval_loss, "ntok": ntok, "gsq": _grad_sq_norm(model)}


def _tp_worker(rank, world, cfgs):
    return [_tp_loss(c) for c in cfgs]


def _save_resave_worker(rank, world, cfg_a, cfg_b, path_a, path_b, state):
    """Save at layout A; then, in the same processes, re-initialize megatron at layout B with other
    initial weights, load A and save again as B: the checkpoint must pass through layout B intact."""
    eng = MegatronEngine(cfg_a, model_only=True)
    eng.init_parallel()
    eng.build(VOCAB)
    loss_a = eng.eval_loss([fixed_batch(1)])[0]
    Path(path_a).mkdir(parents=True, exist_ok=True)
    eng.save(Path(path_a), state)

    cfg_b = copy.deepcopy(cfg_b)
    cfg_b.trainer.seed = 999  # different initial weights: only the load can restore them
    eng = MegatronEngine(cfg_b, model_only=True)
    eng.init_parallel()  # destroys layout A's groups first
    eng.build(VOCAB)
    loaded = eng.load(Path(path_a))
    Path(path_b).mkdir(parents=True, exist_ok=True)
    eng.save(Path(path_b), loaded)
    return loss_a, len(eng.model_chunks())


def _load_worker(rank, world, cfg, path):
    """(loss of a fresh model from cfg's seed, loss of another seed, loss after loading ``path``, state)."""
    eng = MegatronEngine(cfg, model_only=True)
    eng.init_parallel()
    eng.build(VOCAB)
    ref = eng.eval_loss([fixed_batch(1)])[0]
    cfg = copy.deepcopy(cfg)
    cfg.trainer.seed = 4321
    eng = MegatronEngine(cfg, model_only=True)
    eng.init_parallel()
    eng.build(VOCAB)
    before = eng.eval_loss([fixed_batch(1)])[0]
    state = eng.load(Path(path))
    return ref, before, eng.eval_loss([fixed_batch(1)])[0], state


def _rebuild_worker(rank, world, cfg, n):
    """Build ``n`` engines one after another in the same processes: the registered process groups after each
    init_parallel, and each engine's loss on one batch."""
    from torch.distributed import distributed_c10d as c10d

    groups, losses = [], []
    for _ in range(n):
        eng = MegatronEngine(cfg, model_only=True)
        eng.init_parallel()
        groups.append(len(c10d._world.pg_map))
        eng.build(VOCAB)
        losses.append(eng.eval_loss([fixed_batch(1)])[0])
    return groups, losses


# -- tests -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tensor_parallel_invariance_through_engine():
    from dist_utils import run_ranks

    ref, other = run_ranks(_tp_worker, 1, [tiny_cfg(tp=1), tiny_cfg(tp=1, seed=7)])[0]
    tp2 = [r[0] for r in run_ranks(_tp_worker, 2, [tiny_cfg(tp=2)])]
    assert math.isfinite(ref["loss"]) and ref["ntok"] == 2 * SEQ - SEQ // 4
    assert ref["eval"] == pytest.approx(ref["loss"], abs=1e-6)  # token-weighted eval = masked mean
    for r in tp2:
        assert r["loss"] == pytest.approx(ref["loss"], abs=1e-5)
        assert r["eval"] == pytest.approx(ref["loss"], abs=1e-5)
        assert r["gsq"] == pytest.approx(ref["gsq"], rel=1e-4)
    # the weights differ per seed, so the agreement above is not vacuous
    assert abs(other["loss"] - ref["loss"]) > 1e-4


@pytest.mark.slow
def test_dist_checkpoint_reshards_tp2_to_pp2_vp2_to_tp1(tmp_path):
    from dist_utils import run_ranks

    layers = 4  # PP=2 x VP=2 needs a multiple of 4 layers
    state = {"step": 17, "data": {"consumed_samples": 68}}
    res = run_ranks(_save_resave_worker, 2, tiny_cfg(tp=2, layers=layers),
                    tiny_cfg(pp=2, vp=2, layers=layers, global_batch_size=8),
                    str(tmp_path / "a"), str(tmp_path / "b"), state)
    assert [r[1] for r in res] == [2, 2]  # two virtual-stage chunks per pipeline rank
    assert (tmp_path / "b" / "megatron" / "metadata.json").is_file()
    ref, before, after, loaded_state = run_ranks(_load_worker, 1, tiny_cfg(tp=1, layers=layers),
                                                 str(tmp_path / "b"))[0]
    assert loaded_state == state
    # the weights saved at TP=2 (seed 1234), carried through PP2xVP2, equal a TP=1 model of seed 1234
    assert after == ref
    assert after == pytest.approx(res[0][0], abs=1e-3)  # and compute the TP=2 loss up to TP rounding
    assert abs(before - after) > 1e-4  # the load changed the freshly initialized model


def test_distributed_optimizer_load_keeps_adam_step():
    """megatron-core 0.16.1 + torch AdamW: loading fully_reshardable state copies every live state key,
    but the loaded tensors lack "step" (KeyError on the H100); the engine's wrapper hands the live step back."""
    import types

    calls = []
    main = torch.zeros(3)
    opt = types.SimpleNamespace(
        model_param_group_index_map={"p": (0, 0)},
        optimizer=types.SimpleNamespace(param_groups=[{"params": [main]}],
                                        state={main: {"step": torch.tensor(7.0), "exp_avg": torch.zeros(3)}}),
    )

    def orig(model_param, tensors):
        calls.append(dict(tensors))
        live = opt.optimizer.state[main]
        for k in ("param", *live):
            (main if k == "param" else live[k]).copy_(tensors[k])  # what megatron does: KeyError without "step"

    opt._set_main_param_and_optimizer_states = orig
    eng = MegatronEngine.__new__(MegatronEngine)
    eng.optimizer = opt
    eng._keep_adam_step_on_load()
    eng._keep_adam_step_on_load()  # idempotent: wraps once
    opt._set_main_param_and_optimizer_states("p", {"param": torch.ones(3), "exp_avg": torch.full((3,), 2.0)})
    assert len(calls) == 1 and float(calls[0]["step"]) == 7.0
    assert torch.equal(main, torch.ones(3)) and torch.equal(opt.optimizer.state[main]["exp_avg"], torch.full((3,), 2.0))
    with pytest.raises(KeyError):  # the unwrapped megatron behaviour, for contrast
        orig("p", {"param": torch.ones(3), "exp_avg": torch.zeros(3)})


def _eval_generation_worker(rank, world, cfg):
    from bitnet_dist import step_cache

    eng = MegatronEngine(cfg, model_only=True)
    eng.init_parallel()
    eng.build(VOCAB)
    seen = []
    for _ in range(2):
        eng.eval_loss([fixed_batch(1)])
        seen.append(step_cache.current())
    return seen


@pytest.mark.slow
def test_eval_opens_a_new_weight_generation():
    """Derived-weight caches (the Triton path's ternary codes) are keyed on a generation the engine opens per
    call: megatron's optimizers write weights through .data, which parameter versions do not see."""
    from dist_utils import run_ranks

    (seen,) = run_ranks(_eval_generation_worker, 1, tiny_cfg())
    assert seen[0] is not None and seen[1] > seen[0]


def _pipelined_forward_worker(rank, world, cfg):
    """Loss of one batch through this layout's chunks, walked stage by stage with send/recv (what the
    schedules do, without them: megatron's schedules are CUDA-only), and the global layer numbers held."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from bitnet_dist.engines.common import position_ids

    eng = MegatronEngine(cfg, model_only=True)
    eng.init_parallel()
    eng.build(VOCAB)
    chunks = eng.model_chunks()
    b = fixed_batch(1)
    pp, r = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    h, loss = None, None
    for v in range(len(chunks)):
        for s in range(pp):
            first, last = v == 0 and s == 0, v == len(chunks) - 1 and s == pp - 1
            if s == r:
                if not first:
                    chunks[v].set_input_tensor(h)
                out = chunks[v](input_ids=b["tokens"], position_ids=position_ids(b["tokens"]), attention_mask=None,
                                labels=b["labels"] if last else None)
                if last:
                    loss = ((out * b["loss_mask"]).sum() / b["loss_mask"].sum()).item()
                else:
                    h = out.detach().contiguous()
                    dist.send(h, dst=(s + 1) % pp)
            elif not last and r == (s + 1) % pp:
                h = torch.empty(SEQ, 2, cfg.model.hidden_size)
                dist.recv(h, src=s)
    return [[layer.layer_number for layer in m.decoder.layers] for m in chunks], loss


@pytest.mark.slow
def test_pipeline_and_virtual_pipeline_chunks_compute_the_tp1_model():
    """PP=2 and PP=2 x VP=2 hold the right global layers in the right order and, walked stage by stage,
    give the TP=1 loss exactly (CPU, fp32): the model side of pipeline parallelism, independent of the
    schedules (their p2p is covered by test_pipeline_p2p.py and the GPU runs in docs/megatron.md)."""
    from dist_utils import run_ranks

    ((layers1, ref),) = run_ranks(_pipelined_forward_worker, 1, tiny_cfg(layers=4))
    assert layers1 == [[1, 2, 3, 4]] and math.isfinite(ref)
    pp2 = run_ranks(_pipelined_forward_worker, 2, tiny_cfg(pp=2, layers=4, global_batch_size=8))
    assert [x[0] for x in pp2] == [[[1, 2]], [[3, 4]]] and pp2[1][1] == ref
    vp2 = run_ranks(_pipelined_forward_worker, 2, tiny_cfg(pp=2, vp=2, layers=4, global_batch_size=8))
    assert [x[0] for x in vp2] == [[[1], [3]], [[2], [4]]] and vp2[1][1] == ref


def test_adam_steps_unshared_after_a_megatron_style_load():
    """megatron-core 0.16.1 (no Apex/TE) loads one ``step`` tensor into every torch Adam state; torch keeps it
    shared, so each optimizer step advanced it once per parameter. ``unshare_adam_steps`` restores one counter
    per parameter (CPU: torch AdamW, the load done the way distrib_optimizer.py:817-825 does it)."""
    from types import SimpleNamespace

    from bitnet_dist.engines.megatron_engine import unshare_adam_steps

    def loaded_optimizer():
        params = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
        opt = torch.optim.AdamW(params, lr=1e-2)
        sum(p.sum() for p in params).backward()
        opt.step()
        sd = opt.state_dict()
        step = torch.tensor(3.0)
        for s in sd["state"].values():
            s["step"] = step  # the same object for every parameter, as megatron assigns it
        opt.load_state_dict(sd)
        return params, opt

    params, opt = loaded_optimizer()
    opt.step()
    assert [float(opt.state[p]["step"]) for p in params] == [6.0] * 3  # the bug: +1 per parameter

    params, opt = loaded_optimizer()
    assert unshare_adam_steps(SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=opt)])) == 2
    opt.step()
    assert [float(opt.state[p]["step"]) for p in params] == [4.0] * 3
    assert unshare_adam_steps(opt) == 0  # already one counter per parameter


def _graph_logic_worker(rank, world, cfg):
    """What decides between the captured step and an eager one, on CPU (the capture itself needs CUDA)."""
    from megatron.core.full_cuda_graph import FullCudaGraphWrapper
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from bitnet_dist.telemetry import _StatsProbe

    eng = MegatronEngine(cfg, model_only=True)
    eng.init_parallel()
    eng.build(VOCAB)
    out = {"plain_eval": eng._forward_backward_func(True) is get_forward_backward_func(),
           "hooks0": eng._hooks_installed()}
    probe = _StatsProbe(eng.model_chunks())
    probe.install()
    out["probe"] = eng._hooks_installed()
    out["probe_plain"] = eng._forward_backward_func(False) is get_forward_backward_func()
    probe.remove()
    h = eng.model_chunks()[0].decoder.layers[0].register_forward_hook(lambda *a: None)
    out["hook"] = eng._hooks_installed()
    h.remove()
    out["hooks1"] = eng._hooks_installed()
    # a captured step is dropped when the activation bits change, kept when they do not
    sentinel = object()
    eng._graph = sentinel
    FullCudaGraphWrapper.curr_iteration["training"] = 7
    eng.set_act_bits(8)
    out["kept"] = eng._graph is sentinel and FullCudaGraphWrapper.curr_iteration["training"] == 7
    eng.set_act_bits(4)
    out["dropped"] = eng._graph is None and FullCudaGraphWrapper.curr_iteration["training"] == 0
    return out


def test_cuda_graph_decisions_on_cpu():
    """engine.cuda_graph: evaluation and steps with statistics probes or forward hooks run eagerly (a replay
    would skip their Python); an act-bits change drops the captured step. The capture and replay
    themselves run in test_megatron_gpu.py."""
    from dist_utils import run_ranks

    cfg = tiny_cfg()
    cfg.engine.cuda_graph = True
    (out,) = run_ranks(_graph_logic_worker, 1, cfg)
    assert out == {"plain_eval": True, "hooks0": False, "probe": True, "probe_plain": True, "hook": True,
                   "hooks1": False, "kept": True, "dropped": True}, out


def test_deepspeed_refuses_cuda_graph():
    from bitnet_dist.engines.deepspeed_engine import check_config
    from bitnet_dist.validate import check_train

    cfg = tiny_cfg()
    cfg.engine.name = "deepspeed"
    cfg.engine.cuda_graph = True
    cfg.optim.warmup_steps = 10
    for check in (lambda: check_config(cfg), lambda: check_train(cfg, 1, "deepspeed")):
        with pytest.raises(ConfigError) as e:
            check()
        assert e.value.key == "engine.cuda_graph" and "engine=megatron" in str(e.value)


def test_statistics_probe_micro_batches_fit_the_schedule():
    """The probe's forward pass reads trainer.stats_micro_batches micro-batches (0 = all of the step's), rounded up
    to what megatron's interleaved schedule accepts (multiples of parallel.pipeline), never more than the step has."""
    from bitnet_dist.train import probe_micro_batches

    assert MegatronEngine(tiny_cfg(), model_only=True).micro_batch_multiple == 1
    assert MegatronEngine(tiny_cfg(pp=2, layers=4), model_only=True).micro_batch_multiple == 1  # 1F1B takes any count
    assert MegatronEngine(tiny_cfg(pp=2, vp=2, layers=4), model_only=True).micro_batch_multiple == 2
    assert [probe_micro_batches(r, 8, 1) for r in (1, 3, 0, 20)] == [1, 3, 8, 8]
    assert [probe_micro_batches(r, 8, 4) for r in (1, 4, 5, 0)] == [4, 4, 8, 8]


@pytest.mark.slow
def test_rebuilding_engines_does_not_accumulate_process_groups():
    """megatron's destroy_model_parallel drops its (NCCL) groups without destroying them: a process building
    several engines used to gain 17 groups per engine here. init_parallel now destroys the previous ones."""
    from dist_utils import run_ranks

    for groups, losses in run_ranks(_rebuild_worker, 2, tiny_cfg(tp=2), 3):
        assert groups[0] > 1 and groups == [groups[0]] * 3, groups  # (before the fix: 21, 38, 55)
        assert math.isfinite(losses[0]) and losses == [losses[0]] * 3, losses  # the new groups work


def test_fused_adam_switch_gives_the_same_update_as_a_fused_adamw():
    """optim.fused: megatron's torch AdamW (multi-tensor) switched to torch's fused form in place (CPU has the fused
    kernel too): every later step equals a fused AdamW built as such, counters loaded before the switch included;
    the foreach form agrees to rounding. Non-torch-Adam optimizers (Transformer Engine's, Apex's) are left alone."""
    from types import SimpleNamespace

    from bitnet_dist.engines.megatron_engine import use_fused_adam

    def make(**kw):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
        return params, torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), **kw)

    def steps(params, opt, n=3):
        for i in range(n):
            opt.zero_grad()
            sum(((i + 1) * p * p).sum() for p in params).backward()
            opt.step()
        return [p.detach().clone() for p in params]

    pm, meg = make()  # as megatron builds it: no fused / foreach argument
    steps(pm, meg, 1)
    chained = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=meg), SimpleNamespace(optimizer=object())])
    assert use_fused_adam(chained) == 1
    assert all(g["fused"] and not g["foreach"] for g in meg.param_groups)
    got = steps(pm, meg, 2)
    pf, ref = make(fused=True)
    steps(pf, ref, 1)
    want = steps(pf, ref, 2)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    pe, eager = make(foreach=True)
    steps(pe, eager, 1)
    for a, b in zip(steps(pe, eager, 2), want):
        assert not torch.equal(a, pe[0].new_zeros(a.shape))
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert use_fused_adam(SimpleNamespace(optimizer=torch.optim.SGD([torch.nn.Parameter(torch.ones(2))]))) == 0
    # a checkpoint written with the foreach form: torch's load takes its param groups (fused off again) and keeps
    # its step counters as loaded; switching again after the load restores the fused form (what load() does)
    pl, old = make()
    steps(pl, old, 1)
    sd = old.state_dict()
    for g in sd["param_groups"]:
        g.pop("fused", None)
    meg.load_state_dict(sd)
    assert not any(g["fused"] for g in meg.param_groups)
    assert use_fused_adam(SimpleNamespace(optimizer=meg)) == 1
    assert all(g["fused"] for g in meg.param_groups)
    assert all(st["step"].dtype == torch.float32 for st in meg.state.values())


def test_optim_fused_setting():
    from types import SimpleNamespace

    from bitnet_dist.fusions import check_fusions, fused_adam_enabled

    assert fused_adam_enabled(SimpleNamespace(fused="auto"), cuda=True)
    assert not fused_adam_enabled(SimpleNamespace(fused="auto"), cuda=False)
    assert fused_adam_enabled(SimpleNamespace(fused="True"), cuda=False)
    with pytest.raises(ConfigError, match=r"optim\.fused"):
        check_fusions(SimpleNamespace(fused_rope="auto", fused_cross_entropy="auto"), SimpleNamespace(fused="yes"))
