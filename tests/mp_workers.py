"""Worker functions for the multi-process core tests (run through dist_utils.run_ranks)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup(tp: int, pp: int = 1):
    from bitnet_dist.compat import install_cpu_path

    install_cpu_path()
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return ps


def build_tiny(precision: str, tp: int, seed: int = 1234, vocab: int = 96, model: str = "tiny", **prec_overrides):
    from bitnet_dist.model import build_model, transformer_config
    from bitnet_dist.presets import ParallelConfig, model_preset, precision_preset

    m = model_preset(model)
    cfg = transformer_config(m, ParallelConfig(tensor=tp))
    return build_model(m, precision_preset(precision, **prec_overrides), cfg, vocab_size=vocab, seed=seed)


def fixed_batch(vocab=96, b=2, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, vocab, (b, s + 1), generator=g)
    return toks[:, :-1], toks[:, 1:], torch.arange(s).expand(b, s)


def gather_full(p: torch.Tensor, grad: torch.Tensor, tp: int) -> torch.Tensor:
    """Reassemble a TP-sharded tensor in the TP=1 layout (megatron's stride-aware split, inverted)."""
    if tp == 1 or not getattr(p, "tensor_model_parallel", False):
        return grad
    dim, stride = p.partition_dim, getattr(p, "partition_stride", 1)
    parts = [torch.empty_like(grad) for _ in range(tp)]
    dist.all_gather(parts, grad.contiguous())
    chunks = [torch.chunk(t, stride, dim=dim) for t in parts]
    return torch.cat([chunks[r][j] for j in range(stride) for r in range(tp)], dim=dim)


def loss_and_grads(rank, world, presets, broken_norm_backward=False):
    """Loss and full (gathered) gradients of the tiny model at TP=world for each preset."""
    ps = setup(world)
    if broken_norm_backward:
        # The bug the test suite must catch: megatron's reduce region all-reduces in forward only.
        from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

        import bitnet_dist.layers as layers

        layers.all_reduce_sum = lambda x, group: reduce_from_tensor_model_parallel_region(x, group=group)
    out = {}
    for name in presets:
        gpt = build_tiny(name, world)
        tokens, labels, pos = fixed_batch()
        loss = gpt(input_ids=tokens, position_ids=pos, attention_mask=None, labels=labels).float().mean()
        loss.backward()
        # numpy, not tensors: tensors sent through the queue can be reset once the child exits.
        grads = {n: gather_full(p, p.grad, world).numpy().copy() for n, p in gpt.named_parameters()}
        # Replicated parameters must have identical gradients on every rank.
        for n, p in gpt.named_parameters():
            if not getattr(p, "tensor_model_parallel", False) and world > 1:
                ref = p.grad.clone()
                dist.broadcast(ref, src=0, group=ps.get_tensor_model_parallel_group())
                assert torch.equal(ref, p.grad), f"replicated grad differs across ranks: {n}"
        out[name] = (loss.item(), grads if rank == 0 else None)
    return out


def swiglu_variants(rank, world, preset="v2_a8"):
    """The tiny model (TP=world, CPU path) with its SwiGLU three ways: SwiGLUMLP's default (for quantized
    presets inside fc2), fused_swiglu off, and megatron's own MLP.forward. -> {variant: (loss, grads)}."""
    setup(world)
    from bitnet_dist.layers import SwiGLUMLP

    out = {}
    for variant in ("default", "unfused", "megatron"):
        gpt = build_tiny(preset, world, fused_swiglu=(variant == "default"))
        mlps = [m for m in gpt.modules() if isinstance(m, SwiGLUMLP)]
        assert mlps and all(m.plain_swiglu for m in mlps)
        assert all(m.fused_swiglu is (variant == "default" and preset != "bf16") for m in mlps)
        if variant == "megatron":
            for m in mlps:
                m.plain_swiglu = False
        tokens, labels, pos = fixed_batch()
        loss = gpt(input_ids=tokens, position_ids=pos, attention_mask=None, labels=labels).float().mean()
        loss.backward()
        assert not any(getattr(m.linear_fc2, "glu_input", False) for m in mlps)  # reset after each call
        out[variant] = (loss.item(), {n: p.grad.numpy().copy() for n, p in gpt.named_parameters()})
    return out


def fused_vs_separate(rank, world):
    """Fused QKV and gate|up BitLinears vs separate projections with their own scales (TP=world)."""
    setup(world)
    from megatron.core.utils import init_method_normal

    from bitnet_dist import quant
    from bitnet_dist.layers import BitColumnParallelLinear
    from bitnet_dist.model import transformer_config
    from bitnet_dist.norm import rms_norm
    from bitnet_dist.presets import ParallelConfig, model_preset

    m = model_preset("tiny")
    cfg = transformer_config(m, ParallelConfig(tensor=world))
    torch.manual_seed(0)
    nh, ng, d, h = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels, cfg.hidden_size
    qkv = BitColumnParallelLinear(h, (nh + 2 * ng) * d, config=cfg, init_method=init_method_normal(0.02),
                                  bias=False, gather_output=False, tp_comm_buffer_name="qkv")
    fc1 = BitColumnParallelLinear(h, 2 * cfg.ffn_hidden_size, config=cfg, init_method=init_method_normal(0.02),
                                  bias=False, gather_output=False, tp_comm_buffer_name="fc1", stride=2)
    with torch.no_grad():
        qkv.norm_weight.uniform_(0.5, 1.5)
    x = torch.randn(5, 2, h)
    results = {}
    # --- QKV: rows per local group [q (nh/ng * d), k (d), v (d)] ---
    y, _ = qkv(x)
    w = qkv.weight.detach()
    per = w.shape[0] // (ng // world)
    wg = w.view(ng // world, per, h)
    q_rows, k_rows, v_rows = wg[:, : per - 2 * d], wg[:, per - 2 * d: per - d], wg[:, per - d:]
    xq = quant.act_quant(rms_norm(x, qkv.norm_weight.detach(), cfg.layernorm_epsilon), 8)
    group = qkv.tp_group
    outs = []
    for rows in (q_rows, k_rows, v_rows):
        flat = rows.reshape(-1, h)
        wq = quant.weight_quant(flat, group=group)  # one projection, its own scale (over all TP ranks)
        outs.append((xq @ wq.T).view(5, 2, ng // world, -1))
    ref = torch.cat(outs, dim=-1).reshape(5, 2, -1)
    results["qkv"] = (y - ref).abs().max().item()
    # --- fc1: [gate shard; up shard] ---
    y, _ = fc1(x)
    w = fc1.weight.detach()
    half = w.shape[0] // 2
    xq = quant.act_quant(rms_norm(x, fc1.norm_weight.detach(), cfg.layernorm_epsilon), 8)
    ref = torch.cat([xq @ quant.weight_quant(w[:half], group=group).T, xq @ quant.weight_quant(w[half:], group=group).T], -1)
    results["fc1"] = (y - ref).abs().max().item()
    # A single scale over the fused matrix would differ (the test can fail).
    ref_one = xq @ quant.weight_quant(w, group=group).T
    results["fc1_single_scale"] = (y - ref_one).abs().max().item()
    return results


def train_presets(rank, world, presets, steps=50):
    """Train the tiny model on one fixed batch; return the loss curve per preset."""
    setup(1)
    from bitnet_dist.layers import set_act_bits
    from bitnet_dist.presets import precision_preset

    curves = {}
    for name in presets:
        gpt = build_tiny(name, 1)
        prec = precision_preset(name)
        opt = torch.optim.AdamW(gpt.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
        tokens, labels, pos = fixed_batch(b=4, s=32)
        curve = []
        for step in range(steps):
            if prec.final_act_bits and step == int(prec.switch_fraction * steps):
                assert set_act_bits(gpt, prec.final_act_bits) > 0
            loss = gpt(input_ids=tokens, position_ids=pos, attention_mask=None, labels=labels).float().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves[name] = curve
    return curves


def weight_batch_tp(rank, world, sequence=False):
    """The tiny v2 model at TP=world (CPU, kernels interpreted): its batchable layers' weights quantized by one
    WeightBatch (one all-reduce of every statistic) against quantize_weight per weight (one all-reduce each) and
    the torch path's absmean. -> (layers batched, batch runs, bit mismatches, max |scale - torch path| / scale)."""
    os.environ["TRITON_INTERPRET"] = "1"
    setup(world)
    from bitnet_dist import quant, step_cache
    from bitnet_dist.kernels.ternary import WeightBatch, WeightMember, cached_ternary, quantize_weight
    from bitnet_dist.layers import batchable_layers, bit_layers
    from bitnet_dist.model import build_model, transformer_config
    from bitnet_dist.presets import ParallelConfig, model_preset, precision_preset

    m = model_preset("tiny")
    cfg = transformer_config(m, ParallelConfig(tensor=world, sequence=sequence))
    gpt = build_model(m, precision_preset("v2_a4"), cfg, vocab_size=96, seed=1234)
    layers = batchable_layers([gpt])
    members = [WeightMember(x.weight, x.segments, x.tp_group, (lambda: True)) for x in layers]
    batch = WeightBatch.attach(members)
    step_cache.advance()
    mismatches, rel = 0, 0.0
    try:
        for x in reversed(layers):
            tw = cached_ternary(x.weight, x.segments, x.tp_group, fp8=True)
            ref = quantize_weight(x.weight, x.segments, None, x.tp_group, fp8=True)
            mismatches += int(not (torch.equal(tw.scale, ref.scale) and torch.equal(tw.codes, ref.codes)
                                   and torch.equal(tw.fp8.float(), ref.fp8.float())))
            alpha = quant.weight_absmean(x.weight.detach(), x.segments, x._num_segments, x.tp_group)[:, 0]
            rel = max(rel, ((tw.scale - alpha).abs() / alpha).max().item())
    finally:
        step_cache.reset()
    return len(layers), len(bit_layers(gpt)), batch.runs, mismatches, rel


def weight_batch_releases_the_model(rank, world):
    """layers.batch_weight_quant on the tiny v2 model (CPU, kernels interpreted, the Triton path pretended
    available), the parameters' AccumulateGrad nodes kept with hooks, as megatron DDP keeps them, one batched
    quantization run; then the model deleted. -> (weights batched, batch runs, model freed, weight freed)."""
    import gc
    import weakref

    os.environ["TRITON_INTERPRET"] = "1"
    setup(world)
    import bitnet_dist.layers as layers
    from bitnet_dist import step_cache
    from bitnet_dist.kernels.ternary import cached_ternary

    layers._kernels = lambda: object()  # the layers' "Triton path available" check (CUDA) pretended on CPU

    def hooked(gpt):  # (in a function of its own: no loop variable left holding a parameter or node)
        gpt.grad_accs = []
        for p in gpt.parameters():
            acc = p.expand_as(p).grad_fn.next_functions[0][0]
            acc.register_hook(lambda *grads, p=p, owner=gpt: None)
            gpt.grad_accs.append(acc)
        return gpt

    gpt = hooked(build_tiny("v2_a4", world))
    n = layers.batch_weight_quant([gpt])
    first = layers.batchable_layers([gpt])[0]
    step_cache.advance()
    cached_ternary(first.weight, first.segments, first.tp_group)
    runs = first.weight._bitnet_quant_batch.runs
    ref_model, ref_w = weakref.ref(gpt), weakref.ref(first.weight)
    del gpt, first
    gc.collect()
    step_cache.reset()
    return n, runs, ref_model() is None, ref_w() is None
