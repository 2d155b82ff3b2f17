"""Telemetry: metrics.jsonl records, truncate_after, wandb modes, the stats probe against hand-computed
values (1 rank and a TP-sharded layer on 2 gloo ranks), FLOPs and peaks."""
from __future__ import annotations

import json
import math

import pytest
import torch
from dist_utils import run_ranks

import bitnet_dist.telemetry as telemetry_module
from bitnet_dist.config import TrainConfig
from bitnet_dist.presets import model_preset
from bitnet_dist.telemetry import (
    KINDS,
    Telemetry,
    device_peak_flops,
    flops_per_token,
    memory_stats,
    throughput_metrics,
)


def _cfg(wandb="disabled"):
    cfg = TrainConfig()
    cfg.logging.wandb = wandb
    cfg.trainer.progress_bar = False
    return cfg


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_jsonl_records_are_flushed_per_line(tmp_path):
    tel = Telemetry(_cfg(), tmp_path, enabled=True)
    tel.log(1, {"loss": torch.tensor(2.5), "act_bits": 8, "lr": 1e-3})
    tel.event(1, "act_bits_switch", before=8, after=4)
    tel.log(2, {"loss": float("nan"), "grad_norm": float("inf")})
    # Readable before close: every record is flushed.
    assert _records(tmp_path) == [
        {"step": 1, "loss": 2.5, "act_bits": 8, "lr": 1e-3},
        {"step": 1, "event": "act_bits_switch", "before": 8, "after": 4},
        {"step": 2, "loss": None, "grad_norm": None},  # JSON has no NaN / inf
    ]
    tel.close()
    assert not (tmp_path / "wandb").exists()


def test_disabled_rank_writes_nothing(tmp_path):
    tel = Telemetry(_cfg("offline"), tmp_path / "run", enabled=False)
    tel.log(1, {"loss": 1.0})
    tel.event(1, "x")
    tel.truncate_after(0)
    tel.progress(1, 10, loss=1.0)
    tel.close()
    assert not (tmp_path / "run").exists()


def test_truncate_after_keeps_steps_contiguous(tmp_path):
    tel = Telemetry(_cfg(), tmp_path, enabled=True)
    for s in range(1, 11):
        tel.log(s, {"loss": float(s)})
    tel.event(7, "eval", valid_loss=3.0)
    tel.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "loss"')  # torn line from a killed job
    tel = Telemetry(_cfg(), tmp_path, enabled=True)
    tel.truncate_after(5)
    tel.log(6, {"loss": 6.5})
    tel.close()
    recs = _records(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[-1]["loss"] == 6.5


def test_bad_wandb_mode_is_a_config_error(tmp_path):
    from bitnet_dist.errors import ConfigError

    with pytest.raises(ConfigError, match="logging.wandb"):
        Telemetry(_cfg("maybe"), tmp_path, enabled=False)


def test_wandb_offline_resumes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # conftest disables wandb globally
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    run_dir = tmp_path / "run"
    tel = Telemetry(_cfg("offline"), run_dir, enabled=True)
    run_id = tel.wandb_run.id
    tel.log(1, {"loss": 3.0})
    tel.event(1, "start", act_bits=8)
    tel.close()
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    assert list((tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}")), "offline run files under WANDB_DIR"
    tel = Telemetry(_cfg("offline"), run_dir, enabled=True)  # a requeued job
    assert tel.wandb_run.id == run_id
    tel.log(2, {"loss": 2.0})
    tel.close()
    assert [r["step"] for r in _records(run_dir)] == [1, 1, 2]


# -- the stats probe -----------------------------------------------------------------------------------------------
D = 64
C = 8.0
P = 1.0 / D
SPIKE_KURT = (1 - 3 * P + 3 * P * P) / (P * (1 - P))  # one nonzero value among D: m4/m2^2 in closed form


def _pre_post():
    """Two tokens [2, 1, 64] whose normalized Hadamard transforms are known in closed form.

    pre:  t0 = C e_63 (a spike)            t1 = (+1, -1, +1, ...) (flat)
    post: t0 = C/8 (-1)^popcount(i)        t1 = 8 e_1
    """
    idx = torch.arange(D)
    pre = torch.zeros(2, 1, D)
    pre[0, 0, D - 1] = C
    pre[1, 0] = 1.0 - 2.0 * (idx % 2)
    parity = torch.tensor([bin(i).count("1") % 2 for i in range(D)], dtype=torch.float32)
    post = torch.zeros(2, 1, D)
    post[0, 0] = C / 8 * (1 - 2 * parity)
    post[1, 0, 1] = 8.0
    return pre, post


class FakeBitLayer(torch.nn.Module):
    """What the probe needs from a BitLinear: layer_kind, stats_hook, quantized_weight_codes, input_size."""

    def __init__(self, kind, codes, input_size=D, tp_group=None):
        super().__init__()
        self.layer_kind, self.stats_hook, self.input_size, self.tp_group = kind, None, input_size, tp_group
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self._codes = codes

    def quantized_weight_codes(self):
        return self._codes

    def forward(self, pre, post):
        if self.stats_hook is not None:
            self.stats_hook(self, pre, post)


def _expected():
    q4_scale0 = (C / 8) / math.sqrt(7)  # absmean of t0_post is C/8; |x|/scale = sqrt 7 -> rounds to 3
    err4_sq = D * (3 * q4_scale0 - C / 8) ** 2
    q4_scale1 = (8.0 / D) / math.sqrt(7)  # 8 / scale = 64 sqrt 7 clips to 7
    err4_sq += (8.0 - 7 * q4_scale1) ** 2
    return {
        "absmax_pre": C, "absmax_post": 8.0,
        "kurtosis_pre": (SPIKE_KURT + 1.0) / 2, "kurtosis_post": (1.0 + SPIKE_KURT) / 2,
        "outlier_ratio_pre": 1 / (2 * D), "outlier_ratio_post": 1 / (2 * D),
        "qerr_int8": 0.0,  # both post tokens are exactly representable at absmax / 127
        "qerr_int4": math.sqrt(err4_sq / (C * C + 64.0)),
        "wfrac_neg": 1 / 6, "wfrac_zero": 2 / 6, "wfrac_pos": 3 / 6,
    }


def _expected_hist():
    """x / RMS(token) for _pre_post (RMS 1 for every token, before and after): one value at +8 (last bin),
    63 zeros (bin 32 of 64 over [-8, 8]), 32 at +1 (bin 36), 32 at -1 (bin 28); the same after the
    transform, whose tokens swap roles."""
    h = [0.0] * 64
    h[63], h[32], h[36], h[28] = 1, 63, 32, 32
    return [c / 128 for c in h]


def _check(result, kind):
    exp = _expected()
    got = {k.split("/")[-1]: v for k, v in result.items() if k.startswith(f"stats/{kind}/")}
    hist = {k: got.pop(k) for k in ("hist_pre", "hist_post", "hist_edges") if k in got}
    assert set(got) == set(exp)
    for k, v in exp.items():
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert set(hist) == {"hist_pre", "hist_post", "hist_edges"}  # wo and wdown are H-BitLinear inputs
    assert hist["hist_pre"] == pytest.approx(_expected_hist(), abs=1e-12)
    assert hist["hist_post"] == pytest.approx(_expected_hist(), abs=1e-12)
    assert hist["hist_edges"][0] == -8.0 and hist["hist_edges"][-1] == 8.0 and len(hist["hist_edges"]) == 65


def test_stats_probe_hand_computed(tmp_path):
    codes = torch.tensor([-1, 0, 0, 1, 1, 1], dtype=torch.int8)
    wo = FakeBitLayer("wo", codes)
    model = torch.nn.ModuleDict({"wo": wo, "qkv": FakeBitLayer("qkv", codes)})
    pre, post = _pre_post()
    tel = Telemetry(_cfg(), tmp_path, enabled=False)  # the probe works on every rank
    wo(pre, post)  # outside the probe: no hook, nothing recorded
    with tel.stats_probe([model]):
        assert wo.stats_hook is not None
        wo(pre, post)
        wo(pre, post)  # a second micro-batch: means unchanged, weights counted once
    assert wo.stats_hook is None
    _check(tel.stats_probe_result, "wo")
    assert not any(k.startswith("stats/qkv/") for k in tel.stats_probe_result)  # never ran: no keys


def _sharded_probe(rank, world):
    import torch.distributed as dist

    pre, post = _pre_post()
    half = D // world
    codes = torch.tensor([[-1, 0, 0, 1, 1, 1]], dtype=torch.int8)[:, rank * 3:(rank + 1) * 3]
    layer = FakeBitLayer("wdown", codes, input_size=D, tp_group=dist.group.WORLD)
    tel = Telemetry(_cfg(), "/nonexistent", enabled=False)
    sl = slice(rank * half, (rank + 1) * half)
    with tel.stats_probe([layer]):
        layer(pre[..., sl], post[..., sl])
    return tel.stats_probe_result


@pytest.mark.slow
def test_stats_probe_gathers_tensor_parallel_shards():
    results = run_ranks(_sharded_probe, 2, timeout=120)
    assert results[0] == results[1]
    _check(results[0], "wdown")


def test_flops_per_token_formula():
    m = model_preset("tiny")  # h 64, ffn 128, 4 heads, 2 query groups, 2 layers
    h, f, L, kv, V, s = 64, 128, 2, 2 * 16, 128, 256
    n = L * (h * (h + 2 * kv) + h * h + 3 * h * f) + h * V
    assert flops_per_token(m, s, V) == 6 * n + 12 * L * h * s
    # 400M preset: 6N dominates and N is within a few percent of the name.
    big = model_preset("400M")
    assert 0.3e9 < (flops_per_token(big, 2048, 32000) - 12 * 24 * 1024 * 2048) / 6 < 0.45e9


def test_peaks_and_memory_on_cpu(monkeypatch):
    assert device_peak_flops("cpu", torch.bfloat16) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    assert device_peak_flops("cuda:0", torch.bfloat16) == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-40GB")
    assert device_peak_flops("cuda:0", torch.bfloat16) == 312e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Some GPU")
    assert device_peak_flops("cuda:0", torch.bfloat16) is None
    t = throughput_metrics(tokens=1000, seconds=2.0, flops_token=1e9, num_devices=2, peak=None)
    assert t == {"tokens_per_s": 500.0, "tflops": 500.0 * 1e9 / 2 / 1e12}
    assert throughput_metrics(1000, 2.0, 1e9, 2, peak=1e12)["mfu"] == pytest.approx(0.25)
    mem = memory_stats("cpu")
    assert mem["mem/max_rss_gib"] > 0.01


def test_progress_bar_renders(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(telemetry_module, "_is_terminal", lambda stream: True)  # the bar is for terminals
    cfg = _cfg()
    cfg.trainer.progress_bar = True
    tel = Telemetry(cfg, tmp_path, enabled=True)
    tel.progress(5, 20, loss=3.14159, tokens_per_s=12345.6)
    tel.progress(6, 20, loss=3.0, tokens_per_s=12000.0)
    tel.close()
    err = capsys.readouterr().err
    assert "6/20" in err and "loss=3" in err and "12,000" in err


def test_kinds_are_the_layer_kinds():
    assert KINDS == ("qkv", "fc1", "wo", "wdown")
