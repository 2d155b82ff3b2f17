"""Helpers shared by the engines: weight-decay groups, per-step lr/wd, dtype, batches, token-weighted loss."""
from __future__ import annotations

import pytest
import torch

from bitnet_dist.engines import common


class _Named(torch.nn.Module):
    """Parameter names and shapes as in our GPTModel (see bitnet_dist.model)."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Module()
        self.embedding.word_embeddings = torch.nn.Embedding(10, 4)
        self.qkv = torch.nn.Linear(4, 12, bias=False)
        self.qkv.norm_weight = torch.nn.Parameter(torch.ones(4))  # BitLinear's own RMSNorm gain
        self.proj = torch.nn.Linear(4, 4, bias=True)
        self.final_layernorm = torch.nn.Module()
        self.final_layernorm.weight = torch.nn.Parameter(torch.ones(4))
        self.output_layer = torch.nn.Linear(4, 10, bias=False)


def test_decay_groups_exclude_norms_biases_and_embeddings():
    m = _Named()
    groups = common.param_groups(m, weight_decay=0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    decay = sorted(names[id(p)] for p in groups[0]["params"])
    no_decay = sorted(names[id(p)] for p in groups[1]["params"])
    assert decay == ["output_layer.weight", "proj.weight", "qkv.weight"]
    assert no_decay == ["embedding.word_embeddings.weight", "final_layernorm.weight", "proj.bias", "qkv.norm_weight"]
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (0.1, 0.0)


def test_apply_lr_wd_sets_decay_only_on_the_decay_group():
    m = _Named()
    opt = torch.optim.AdamW(common.param_groups(m, 0.1), lr=1.0)
    common.apply_lr_wd(opt.param_groups, lr=3e-4, weight_decay=0.05)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(3e-4, 0.05), (3e-4, 0.0)]
    with pytest.raises(RuntimeError, match="dropped"):
        common.apply_lr_wd([{"params": [], "lr": 1.0}], 1.0, 0.1)


def test_dtype_resolution():
    from bitnet_dist.errors import ConfigError

    assert common.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert common.resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert common.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ConfigError, match="trainer.dtype"):
        common.resolve_dtype("fp8", torch.device("cpu"))


def test_token_weighted_loss_helpers():
    tokens = torch.zeros(2, 5, dtype=torch.long)
    pos = common.position_ids(tokens)
    assert pos.tolist() == [[0, 1, 2, 3, 4]] * 2
    b = common.batch_to_device({"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(2, 5, dtype=torch.int64)},
                               torch.device("cpu"))
    assert b["loss_mask"].dtype == torch.float32
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    s = common.masked_loss_sum(per_token, mask)
    n = common.global_token_count([{"loss_mask": mask}], None, torch.device("cpu"))
    assert (s.item(), n) == (10.0, 3)
    assert common.reduce_loss(s, n, None) == pytest.approx(10.0 / 3)
    assert common.reduce_loss(s, 0, None) != common.reduce_loss(s, 0, None)  # nan without tokens


def test_trainer_state_round_trip(tmp_path):
    state = {"step": 7, "rng": torch.get_rng_state(), "data": {"pos": [1, 2]}}
    common.save_trainer_state(tmp_path, state)
    back = common.load_trainer_state(tmp_path)
    assert back["step"] == 7 and torch.equal(back["rng"], state["rng"]) and back["data"] == {"pos": [1, 2]}
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        common.load_trainer_state(tmp_path / "missing")


def test_foreach_multi_tensor_ops_replace_megatrons_local_fallbacks(monkeypatch):
    """bitnet_dist.compat: the L2 norm over a list of tensors (fp32 and bf16, fp32 result [1]) equals the float64
    formula; the scale is dst = src * scale, in place when the lists hold the same tensors; the install swaps
    megatron's local (no TE / apex) fallbacks, and only those, wherever a megatron module holds them."""
    import importlib

    from bitnet_dist import compat

    torch.manual_seed(0)
    ts = [torch.randn(7, 5), torch.randn(300).to(torch.bfloat16), torch.zeros(3), torch.randn(2, 2, 2) * 1e3]
    flag = torch.zeros(1, dtype=torch.int)
    norm, per = compat.foreach_l2_norm(2048 * 32, flag, [ts], False)
    want = torch.sqrt(sum((t.double() ** 2).sum() for t in ts))
    assert norm.shape == (1,) and norm.dtype == torch.float32 and per is None
    torch.testing.assert_close(norm.double(), want.reshape(1), rtol=1e-6, atol=0)
    empty, _ = compat.foreach_l2_norm(2048 * 32, flag, [[]], False)
    assert torch.equal(empty, torch.zeros(1))

    g = [torch.randn(4, 3), torch.randn(6)]
    before = [t.clone() for t in g]
    compat.foreach_scale(2048 * 32, flag, [g, g], 0.25)  # in place, as the gradient clipping calls it
    assert all(torch.equal(a, b * 0.25) for a, b in zip(g, before))
    dst = [torch.empty(4, 3), torch.empty(6)]
    compat.foreach_scale(2048 * 32, flag, [before, dst], 3.0)
    assert all(torch.equal(d, s * 3.0) for d, s in zip(dst, before))

    mu = importlib.import_module("megatron.core.utils")
    mods = [importlib.import_module(m) for m in ("megatron.core.optimizer.clip_grads",
                                                 "megatron.core.optimizer.optimizer")]
    for m in mods:  # restored after the test
        for attr in ("l2_norm_impl", "multi_tensor_scale_impl"):
            if hasattr(m, attr):
                monkeypatch.setattr(m, attr, getattr(m, attr))
    clip = mods[0]
    monkeypatch.setattr(clip, "l2_norm_impl", mu.local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip, "multi_tensor_scale_impl", mu.local_multi_tensor_scale)
    monkeypatch.setattr(mods[1], "multi_tensor_scale_impl", "amp_C stand-in")  # not a local fallback: kept
    done = compat.install_foreach_multi_tensor()
    assert sorted(done) == ["megatron.core.optimizer.clip_grads.l2_norm_impl",
                            "megatron.core.optimizer.clip_grads.multi_tensor_scale_impl"]
    assert clip.l2_norm_impl is compat.foreach_l2_norm and clip.multi_tensor_scale_impl is compat.foreach_scale
    assert mods[1].multi_tensor_scale_impl == "amp_C stand-in"
    assert compat.install_foreach_multi_tensor() == []  # nothing left to swap
