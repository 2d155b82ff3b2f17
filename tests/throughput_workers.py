"""Workers of the throughput tests (run on gloo ranks by dist_utils.run_ranks): activation recomputation and the
fused path under sequence parallelism, at tiny shapes on CPU."""
from __future__ import annotations

import os

import torch
from mp_workers import fixed_batch, gather_full, setup

RECOMPUTE_MODES = {
    "none": {},
    "selective_mlp": {"recompute_granularity": "selective", "recompute_modules": ["mlp"]},
    "selective_attn_mlp": {"recompute_granularity": "selective", "recompute_modules": ["core_attn", "mlp"]},
    "full_1": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    "full_2": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 2},
}


def _build(precision: str, world: int, seed: int = 1234, vocab: int = 96, sequence: bool = False, **overrides):
    from bitnet_dist.model import build_model, transformer_config
    from bitnet_dist.presets import ParallelConfig, model_preset, precision_preset

    m = model_preset("tiny")
    cfg = transformer_config(m, ParallelConfig(tensor=world, sequence=sequence), **overrides)
    return build_model(m, precision_preset(precision), cfg, vocab_size=vocab, seed=seed)


def recompute_grads(rank, world, presets=("bf16", "v2_a4"), modes=tuple(RECOMPUTE_MODES)):
    """{preset: {mode: (loss, {name: grad}, mlp forward calls, layer forward calls, bytes saved for backward)}}."""
    setup(world)
    out = {}
    for preset in presets:
        out[preset] = {}
        for mode in modes:
            gpt = _build(preset, world, **RECOMPUTE_MODES[mode])
            gpt.train()
            calls = {"mlp": 0, "layer": 0}
            for layer in gpt.decoder.layers:
                layer.mlp.register_forward_hook(lambda *a, c=calls: c.__setitem__("mlp", c["mlp"] + 1))
                layer.register_forward_hook(lambda *a, c=calls: c.__setitem__("layer", c["layer"] + 1))
            saved = {}

            def pack(t, saved=saved):
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            tokens, labels, pos = fixed_batch()
            params = {p.untyped_storage().data_ptr() for p in gpt.parameters()}
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = gpt(input_ids=tokens, position_ids=pos, attention_mask=None, labels=labels).float().mean()
            nbytes = sum(v for k, v in saved.items() if k not in params)
            loss.backward()
            grads = {n: gather_full(p, p.grad, world).numpy().copy() for n, p in gpt.named_parameters()}
            out[preset][mode] = (loss.item(), grads if rank == 0 else None, calls["mlp"], calls["layer"], nbytes)
    return out


def column_fused_vs_torch(rank, world, preset="v2_a8", sequence=True):
    """The tiny model at TP=world (with sequence parallelism by default), column layers forced through the Triton path (run by the
    interpreter, TRITON_INTERPRET=1) vs the torch path: (loss, grads) per path, gathered to the TP=1 layout."""
    os.environ["TRITON_INTERPRET"] = "1"
    setup(world)
    if sequence:  # megatron forks its CUDA RNG tracker around the embedding and the block under SP (dropout is 0
        # here): no CUDA generator on CPU, so the fork is a no-op
        import contextlib

        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    import bitnet_dist.layers as layers
    from bitnet_dist import step_cache
    from bitnet_dist.layers import BitColumnParallelLinear

    out = {}
    for path in ("torch", "triton"):
        gpt = _build(preset, world, sequence=sequence)
        cols = [m for m in gpt.modules() if isinstance(m, BitColumnParallelLinear)]
        taken = {"fused": 0}
        if path == "triton":
            import bitnet_dist.kernels as kern

            orig = kern.hbit_linear

            def counting(*a, _taken=taken, _orig=orig, **k):
                _taken["fused"] += 1
                return _orig(*a, **k)

            # the layers' "Triton path available" check pretended on CPU (the kernels run interpreted); only the
            # column-parallel layers take it here, the row-parallel ones keep the torch path they had
            for m in cols:
                m._use_kernels = lambda x: True
            layers._kernels = lambda: type("K", (), {"hbit_linear": staticmethod(counting)})
        step_cache.advance()
        tokens, labels, pos = fixed_batch()
        loss = gpt(input_ids=tokens, position_ids=pos, attention_mask=None, labels=labels).float().mean()
        loss.backward()
        if sequence:  # megatron's finalize_model_grads sums the sequence-parallel parameters' gradients over TP
            import torch.distributed as dist
            from megatron.core import parallel_state as ps

            for p in gpt.parameters():
                if getattr(p, "sequence_parallel", False):
                    dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
        grads = {n: gather_full(p, p.grad, world).numpy().copy() for n, p in gpt.named_parameters()}
        out[path] = (loss.item(), grads if rank == 0 else None, taken["fused"], len(cols))
        layers._kernels = layers.__dict__["_kernels"]
    step_cache.reset()
    return out


def cross_entropy_paths(rank, world, preset="v2_a8"):
    """The tiny model with trainer.fused_cross_entropy on and off (TP=world): (loss, grads) each."""
    setup(world)
    out = {}
    for fused in (False, True):
        gpt = _build(preset, world, fused_cross_entropy=fused)
        tokens, labels, pos = fixed_batch()
        loss = gpt(input_ids=tokens, position_ids=pos, attention_mask=None, labels=labels).float().mean()
        loss.backward()
        grads = {n: gather_full(p, p.grad, world).numpy().copy() for n, p in gpt.named_parameters()}
        out[fused] = (loss.item(), grads if rank == 0 else None)
    return out


def rope_paths(rank, world, preset="bf16"):
    """The tiny model with trainer.fused_rope on and off (TP=world): (loss, grads) each."""
    setup(world)
    out = {}
    from megatron.core.models.common.embeddings import rope_utils

    for fused in (False, True):
        gpt = _build(preset, world, apply_rope_fusion=fused)
        hook, calls = rope_utils.fused_apply_rotary_pos_emb, []
        if fused:  # count the hook's calls: q and k in every layer
            rope_utils.fused_apply_rotary_pos_emb = lambda *a, _c=calls, _h=hook, **k: _c.append(1) or _h(*a, **k)
        tokens, labels, pos = fixed_batch()
        loss = gpt(input_ids=tokens, position_ids=pos, attention_mask=None, labels=labels).float().mean()
        rope_utils.fused_apply_rotary_pos_emb = hook
        loss.backward()
        grads = {n: gather_full(p, p.grad, world).numpy().copy() for n, p in gpt.named_parameters()}
        out[fused] = (loss.item(), grads if rank == 0 else None, len(calls), len(gpt.decoder.layers))
    return out
