"""The end-to-end benchmark (bitnet_dist.bench_e2e) and its peers (bitnet_dist.bench_peers) at tiny shapes on CPU:
the peer model against float64 formulas, its shapes against the project's FLOP count, the harness's overrides
against the train app's config schema, its summaries and ratios, and one whole benchmark run through the train app.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from bitnet_dist import bench_e2e
from bitnet_dist.bench_peers import (
    Block,
    PeerLM,
    PeerShape,
    apply_rope,
    apply_torchao_bitnet,
    rope_tables,
    torchao_filter,
    train_peer,
)
from bitnet_dist.presets import model_preset
from bitnet_dist.telemetry import flops_per_token

TINY = PeerShape(hidden=64, ffn=128, heads=8, groups=4, layers=2, vocab=256, seq=32)


def test_peer_shapes_match_the_project_flop_count():
    """The peer's matmul weights are exactly the N of telemetry.flops_per_token (6 N + 12 L h s) for the preset."""
    for name in ("tiny", "400M", "1.3B"):
        m = model_preset(name)
        s = PeerShape.from_model(m, vocab=32000, seq=2048)
        with torch.device("meta"):
            model = PeerLM(s)
        n = sum(p.numel() for n_, p in model.named_parameters() if p.dim() == 2 and not n_.startswith("embed"))
        assert 6 * n + 12 * m.num_layers * m.hidden_size * 2048 == flops_per_token(m, 2048, 32000), name


def test_rope_is_the_complex_rotation():
    """Rotate-half RoPE == multiplying (x_i + i x_{i+d/2}) by exp(i m theta_i), in float64."""
    seq, d = 16, 8
    cos, sin = rope_tables(seq, d, 10000.0)
    x = torch.randn(2, 3, seq, d, dtype=torch.float64)
    got = apply_rope(x, cos.double(), sin.double())
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.complex(x[..., : d // 2], x[..., d // 2:]) * torch.exp(1j * torch.outer(torch.arange(seq).double(), theta))
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], dim=-1), rtol=1e-6, atol=1e-6)


def _block_reference(blk: Block, x, cos, sin):
    """The block in float64 from its formula: explicit GQA head repetition and a masked softmax."""
    s, d = blk.s, blk.head_dim
    b, t, h = x.shape

    def rms(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + s.norm_eps) * w

    W = {k: v.double() for k, v in blk.state_dict().items()}
    qkv = rms(x, W["attn_norm.weight"]) @ W["qkv.weight"].t()
    q, k, v = qkv.split([s.heads * d, s.groups * d, s.groups * d], -1)
    q = apply_rope(q.view(b, t, s.heads, d).transpose(1, 2), cos, sin)
    k = apply_rope(k.view(b, t, s.groups, d).transpose(1, 2), cos, sin).repeat_interleave(s.heads // s.groups, 1)
    v = v.view(b, t, s.groups, d).transpose(1, 2).repeat_interleave(s.heads // s.groups, 1)
    att = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    o = (att @ v).transpose(1, 2).reshape(b, t, h)
    x = x + o @ W["wo.weight"].t()
    gate, up = (rms(x, W["mlp_norm.weight"]) @ W["fc1.weight"].t()).chunk(2, -1)
    return x + (F.silu(gate) * up) @ W["fc2.weight"].t()


def test_peer_block_equals_its_formula():
    torch.manual_seed(0)
    model = PeerLM(TINY).double()
    blk = model.blocks[0]
    for p in blk.parameters():  # norm weights off 1 so that they are exercised
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    x = torch.randn(2, TINY.seq, TINY.hidden, dtype=torch.float64)
    cos, sin = model.cos.double(), model.sin.double()
    torch.testing.assert_close(blk(x, cos, sin), _block_reference(blk, x, cos, sin), rtol=1e-9, atol=1e-9)


def test_peer_is_causal_and_starts_at_uniform_loss():
    torch.manual_seed(0)
    model = PeerLM(TINY)
    tok = torch.randint(0, TINY.vocab, (2, TINY.seq))
    lab = torch.randint(0, TINY.vocab, (2, TINY.seq))

    def per_position(tokens):
        model.head_loss = lambda x, labels: F.cross_entropy(model.head(model.norm(x)).transpose(1, 2), labels,
                                                            reduction="none")
        return model(tokens, lab)

    base = per_position(tok)
    tok2 = tok.clone()
    tok2[:, -1] = (tok2[:, -1] + 1) % TINY.vocab
    changed = per_position(tok2)
    torch.testing.assert_close(changed[:, :-1], base[:, :-1], rtol=0, atol=0)
    assert not torch.equal(changed[:, -1], base[:, -1])
    assert abs(base.mean().item() - math.log(TINY.vocab)) < 0.05  # init_std 0.02: near-uniform predictions


def test_torchao_peer_swaps_the_block_linears_only():
    pytest.importorskip("torchao.prototype.quantized_training", reason="torchao not installed (extra 'bench')")
    model = PeerLM(TINY, subln=True)
    assert apply_torchao_bitnet(model) == 4 * TINY.layers
    assert "BitNet" not in type(model.head.weight).__name__
    assert torchao_filter(model.blocks[0].fc2, "blocks.0.fc2") and not torchao_filter(model.head, "head")
    # an RMSNorm before each quantized linear: the pre-norms (QKV, fc1) and the SubLN norms (Wo, Wdown)
    assert all(hasattr(b, n) and b.get_submodule(n).__class__.__name__ == "RMSNorm"
               for b in model.blocks for n in ("attn_norm", "wo_norm", "mlp_norm", "fc2_norm"))
    r = train_peer("torchao", TINY, micro_batch=2, global_batch=4, steps=2, warmup=1, device="cpu", compile=False)
    assert len(r["loss"]) == 2 and all(math.isfinite(v) for v in r["loss"]) and r["tokens_per_s"] > 0


@pytest.mark.slow
def test_compiled_peer_equals_eager():
    eager = train_peer("plain", TINY, micro_batch=2, global_batch=4, steps=2, warmup=1, device="cpu", compile=False)
    comp = train_peer("plain", TINY, micro_batch=2, global_batch=4, steps=2, warmup=1, device="cpu", compile=True)
    assert comp["loss"] == pytest.approx(eager["loss"], rel=1e-5)


def test_overrides_compose_into_the_train_schema(tmp_path):
    from hydra import compose, initialize_config_module

    from bitnet_dist.config import cfg_from_omegaconf, register_configs
    from bitnet_dist.validate import check_train

    register_configs()
    ov = bench_e2e.train_overrides("1.3B", "v2_a4_fp8bwd", seq=2048, mbs=4, gbs=16, vocab=32000, steps=12,
                                   run_dir=tmp_path / "r")
    with initialize_config_module(config_module="bitnet_dist.conf", version_base="1.3"):
        cfg = cfg_from_omegaconf(compose(config_name="train", overrides=ov))
    check_train(cfg, world_size=1)
    assert (cfg.model.name, cfg.precision.name, cfg.precision.act_bits, cfg.precision.fp8_backward) == \
        ("1.3B", "v2_a4", 4, True)
    assert (cfg.trainer.seq_length, cfg.trainer.micro_batch_size, cfg.trainer.global_batch_size) == (2048, 4, 16)
    assert (cfg.data.name, cfg.data.vocab_size, cfg.engine.name) == ("synthetic", 32000, "megatron")
    assert cfg.trainer.log_interval == 1 and not cfg.trainer.checkpoints and cfg.precision.kernels == "auto"
    with pytest.raises(ValueError):
        bench_e2e.train_overrides("1.3B", "v3", seq=1, mbs=1, gbs=1, vocab=1, steps=1, run_dir=tmp_path)


def test_summaries_ratios_and_targets():
    recs = [{"step": 0, "event": "start", "kernels": "triton", "kernels_reason": "", "fused": ["rope", "adamw"]}]
    recs += [{"step": s, "loss": 1.0, "tokens_per_s": v, "mem/max_allocated_gib": m}
             for s, v, m in [(1, 10.0, 5.0), (2, 100.0, 7.0), (3, 90.0, 7.0), (4, 110.0, 6.0), (5, 80.0, 7.0)]]
    recs.append({"step": 5, "val_loss": 1.0})
    s = bench_e2e.summarize_metrics(recs, warmup=1)
    assert s["tokens_per_s"] == 95.0 and s["peak_mem_gib"] == 7.0 and s["timed_steps"] == 4
    assert s["kernels"] == "triton" and s["fused"] == ["rope", "adamw"]
    with pytest.raises(ValueError, match="no step records"):
        bench_e2e.summarize_metrics(recs, warmup=5)
    rows = [{"kind": "peer", "model": "tiny", "config": "plain", "tokens_per_s": 100.0, "peak_mem_gib": 10.0},
            {"kind": "peer", "model": "tiny", "config": "torchao", "tokens_per_s": 80.0, "peak_mem_gib": 9.0},
            {"kind": "cli", "model": "tiny", "config": "bf16", "tokens_per_s": 100.0, "peak_mem_gib": 11.0,
             "kernels": "triton", "fused": ["rope", "cross_entropy"]},
            {"kind": "cli", "model": "tiny", "config": "v2_a8", "tokens_per_s": 88.0, "peak_mem_gib": 10.0},
            {"kind": "cli", "model": "tiny", "config": "v2_a4", "error": "boom"}]
    bench_e2e.add_derived(rows, seq=64, vocab=256, peak_flops=1e12)
    assert rows[2]["vs"] == {"plain": 1.0, "torchao": 1.25} and rows[2]["mem_vs_plain"] == pytest.approx(1.1)
    assert rows[0]["mfu"] == pytest.approx(100.0 * rows[0]["flops_per_token"] / 1e12)
    t = {(x["row"], x["peer"]): x for x in bench_e2e.target_table(rows)}
    assert t[("bf16", "plain")]["met"] is True and t[("bf16", "plain")]["mem_met"] is False
    assert t[("v2_a8", "torchao")]["ratio"] == pytest.approx(1.1) and t[("v2_a8", "torchao")]["met"] is True
    assert t[("v2_a4", "plain")]["met"] is None
    md = bench_e2e.to_markdown({"meta": {"device": "d", "date": "x", "command": "c", "torch": "t", "seq": 64,
                                         "mbs": 1, "gbs": 2, "vocab": 256, "steps": 3, "warmup": 1,
                                         "engine": "megatron", "peak_tflops": 1.0},
                                "rows": rows, "targets": bench_e2e.target_table(rows)})
    assert "| tiny | bf16 | cli | triton + rope, cross_entropy | 100 |" in md
    assert "| tiny | v2_a4 | cli | | failed: boom |" in md and "| tiny | bf16 | plain | 1.00x | 1.000x | yes | 1.10 | no |" in md


def test_variants_parse_and_compare_with_their_base_row():
    assert bench_e2e.parse_variant("graph=engine.cuda_graph=true") == ("graph", ["engine.cuda_graph=true"])
    assert bench_e2e.parse_variant("nofuse=trainer.fused_rope=false,optim.fused=false,") == \
        ("nofuse", ["trainer.fused_rope=false", "optim.fused=false"])
    for bad in ("graph", "graph=", "g-h=a=b", "x=engine.cuda_graph", "=a=b"):
        with pytest.raises(ValueError, match="NAME=KEY=VALUE"):
            bench_e2e.parse_variant(bad)
    rows = [{"kind": "peer", "model": "tiny", "config": "plain", "tokens_per_s": 100.0, "peak_mem_gib": 10.0},
            {"kind": "cli", "model": "tiny", "config": "v2_a4", "tokens_per_s": 80.0, "peak_mem_gib": 10.0},
            {"kind": "cli", "model": "tiny", "config": "v2_a4+graph", "base": "v2_a4", "variant": "graph",
             "variant_overrides": ["engine.cuda_graph=true"], "tokens_per_s": 96.0, "peak_mem_gib": 11.0},
            {"kind": "cli", "model": "tiny", "config": "bf16+graph", "base": "bf16", "variant": "graph",
             "variant_overrides": ["engine.cuda_graph=true"], "error": "boom"}]
    bench_e2e.add_derived(rows, seq=64, vocab=256, peak_flops=None)
    assert rows[2]["vs_base"] == pytest.approx(1.2) and rows[2]["vs"]["plain"] == pytest.approx(0.96)
    assert "vs_base" not in rows[1]
    assert [t["row"] for t in bench_e2e.target_table(rows)] == ["bf16", "v2_a8", "v2_a4", "v2_a4_fp8bwd"]
    md = "\n".join(bench_e2e.variant_markdown(rows))
    assert "| tiny | v2_a4+graph | `engine.cuda_graph=true` | 96 | 1.200x | 11.0 |" in md
    assert "| tiny | bf16+graph | `engine.cuda_graph=true` | failed: boom |" in md
    assert bench_e2e.variant_markdown(rows[:2]) == []
    assert bench_e2e.main(["--variants", "a=x=1", "a=y=2"]) == 2  # a repeated name, refused before any row


@pytest.mark.slow
def test_whole_benchmark_through_the_train_app_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rc = bench_e2e.main(["--models", "tiny", "--configs", "bf16", "v2_a4", "--seq", "64", "--mbs", "2", "--gbs", "4",
                         "--vocab", "512", "--steps", "3", "--warmup", "1", "--engine", "deepspeed", "--no-compile",
                         "--train-args", "trainer.dtype=fp32", "--peer-device", "cpu", "--out", str(tmp_path),
                         "--variants", "torchk=precision.kernels=torch", "--variant-configs", "v2_a4"])
    assert rc == 0
    (js,) = tmp_path.glob("e2e_cpu_*.json")
    res = json.loads(js.read_text())
    rows = {r["config"]: r for r in res["rows"]}
    assert set(rows) == {"plain", "torchao", "bf16", "v2_a4", "v2_a4+torchk"}
    v = rows["v2_a4+torchk"]
    assert "precision.kernels=torch" in v["command"] and v["kernels"] == "torch" and v["tokens_per_s"] > 0
    assert v["vs_base"] == pytest.approx(v["tokens_per_s"] / rows["v2_a4"]["tokens_per_s"])
    assert "Variants against their base row" in js.with_suffix(".md").read_text()
    for name in ("plain", "bf16", "v2_a4"):
        assert rows[name].get("tokens_per_s", 0) > 0, rows[name]
    assert rows["bf16"]["kernels"] == "torch" and rows["bf16"]["timed_steps"] == 2
    assert rows["bf16"]["vs"]["plain"] == pytest.approx(rows["bf16"]["tokens_per_s"] / rows["plain"]["tokens_per_s"])
    assert js.with_suffix(".md").is_file() and not list(tmp_path.glob("bench_e2e_*"))  # run dirs cleaned up


def test_profile_categories_and_breakdown(tmp_path):
    from bitnet_dist.profile import breakdown, categorize, profile_step

    cases = {"sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n": "gemm", "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT": "gemm",
             "flash_fwd_kernel": "attention", "pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel": "attention",
             "_norm_hadamard_quant_fwd_shuffle": "bitnet kernels", "_swiglu_bwd_kernel": "bitnet kernels",
             "triton_red_fused__log_softmax_0": "compiled (inductor)", "ncclDevKernel_AllReduce_Sum_f32": "communication",
             "multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor>": "optimizer",
             "Memcpy DtoD (Device -> Device)": "copy", "at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add>":
             "elementwise / reduction", "cunn_SoftMaxForward": "cross-entropy / softmax",
             "vectorized_layer_norm_kernel": "norm", "something_new": "other"}
    for name, cat in cases.items():
        assert categorize(name) == cat, name
    b = breakdown([("flash_fwd_kernel", 2.0, 3), ("ampere_gemm", 5.0, 10), ("cutlass_gemm", 1.0, 1)], wall_ms=10.0)
    assert b["by_category_ms"] == {"gemm": 6.0, "attention": 2.0} and b["idle_ms"] == 2.0 and b["kernel_ms"] == 8.0
    assert b["top"][0]["name"] == "ampere_gemm"
    with profile_step(tmp_path / "p.json", "cpu", meta={"step": 1}):
        torch.randn(64, 64) @ torch.randn(64, 64)
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["step"] == 1 and p["device"] == "cpu" and p["kernel_ms"] > 0 and p["wall_ms"] > 0


@pytest.mark.slow
def test_benchmark_profiles_a_step_of_each_row(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rc = bench_e2e.main(["--models", "tiny", "--configs", "bf16", "--peers", "plain", "--seq", "64", "--mbs", "2",
                         "--gbs", "4", "--vocab", "512", "--steps", "3", "--warmup", "1", "--engine", "deepspeed",
                         "--no-compile", "--profile", "--train-args", "trainer.dtype=fp32", "--peer-device", "cpu",
                         "--out", str(tmp_path)])
    assert rc == 0
    (js,) = tmp_path.glob("e2e_cpu_*.json")
    rows = {r["config"]: r for r in json.loads(js.read_text())["rows"]}
    for name in ("plain", "bf16"):
        prof = rows[name]["profile"]
        assert prof["kernel_ms"] > 0 and "gemm" in prof["by_category_ms"], (name, prof["by_category_ms"])
    assert rows["bf16"]["timed_steps"] == 2 and rows["bf16"]["profile"]["step"] == 4  # after the 3 timed steps
    assert "Where one profiled step goes" in js.with_suffix(".md").read_text()
