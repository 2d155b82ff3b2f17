"""DeepSpeed engine on one CUDA device (NCCL, bf16 by trainer.dtype=auto): ZeRO 0-3, optimizer offload,
the stats probe on the kernel path, save/load. Skipped without CUDA.

Runs the configurations in one child process (``python tests/engines/test_deepspeed_gpu.py``), which prints one
JSON line per configuration; the test checks them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

CONFIGS = [dict(zero=0), dict(zero=1), dict(zero=2), dict(zero=3), dict(zero=2, offload_optimizer=True)]
STEPS = 30


def _child() -> None:
    from bitnet_dist.config import TrainConfig
    from bitnet_dist.engines import make_engine
    from bitnet_dist.layers import bit_layers
    from bitnet_dist.presets import model_preset, precision_preset
    from bitnet_dist.telemetry import Telemetry

    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 500, (8, 129), generator=g)
    batches = [dict(tokens=toks[i:i + 4, :-1], labels=toks[i:i + 4, 1:], loss_mask=torch.ones(4, 128))
               for i in (0, 4)]
    for c in CONFIGS:
        cfg = TrainConfig(model=model_preset("small"), precision=precision_preset("v2_a8"))
        cfg.engine.name = "deepspeed"
        cfg.parallel.zero_stage = c["zero"]
        cfg.parallel.offload_optimizer = c.get("offload_optimizer", False)
        cfg.trainer.micro_batch_size, cfg.trainer.global_batch_size, cfg.trainer.seq_length = 4, 8, 128
        eng = make_engine(cfg)
        eng.init_parallel()
        eng.build(500)
        dtype = next(eng.model_chunks()[0].parameters()).dtype
        losses = [eng.train_step(batches, lr=3e-3, weight_decay=0.1).loss for _ in range(STEPS)]
        tel = Telemetry(cfg, "/tmp", enabled=False)
        with tel.stats_probe(eng.model_chunks()):
            eng.eval_loss(batches)
        with tempfile.TemporaryDirectory() as d:
            eng.save(Path(d), {"step": STEPS})
            after = [eng.train_step(batches, lr=3e-3, weight_decay=0.1).loss for _ in range(2)]
            eng.load(Path(d))
            replay = [eng.train_step(batches, lr=3e-3, weight_decay=0.1).loss for _ in range(2)]
        print(json.dumps(dict(c, dtype=str(dtype), device=str(eng.device), losses=losses, after=after, replay=replay,
                              batched=eng.batched_weights, bit_layers=len(bit_layers(eng.model_chunks()[0])),
                              stats_keys=len(tel.stats_probe_result),
                              wo_kurt=tel.stats_probe_result.get("stats/wo/kurtosis_post"),
                              max_mem_gib=torch.cuda.max_memory_allocated() / 2 ** 30)), flush=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (NCCL, bf16)")
def test_zero_stages_train_in_bf16_on_gpu():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=900, env=env,
                         cwd=Path(__file__).parent)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(CONFIGS), out.stdout[-3000:] + out.stderr[-5000:]
    first = rows[0]["losses"]
    zero1 = next(r["losses"] for r in rows if r["zero"] == 1)
    for r in rows:
        assert r["dtype"] == "torch.bfloat16" and r["device"].startswith("cuda")
        # every ternary weight quantized in one pass per step, except under ZeRO-3 (parameters gathered per module)
        assert r["bit_layers"] > 0 and r["batched"] == (0 if r["zero"] == 3 else r["bit_layers"]), r
        assert r["losses"][-1] < r["losses"][0] - 1.0, r  # memorizes a fixed batch
        # Same model, data and first update: the first two losses agree across stages up to rounding.
        assert abs(r["losses"][0] - first[0]) < 1e-3 and abs(r["losses"][1] - first[1]) < 0.02 * first[1], (r, first)
        # Thirty steps on: the stages that partition (1, 2, 3, offload) run ZeRO's optimizer and stay close to
        # ZeRO-1. Stage 0 runs DeepSpeed's other bf16 optimizer wrapper, and a ternary model at lr 3e-3 amplifies
        # rounding: measured on the H100, stage 0 ends 9% and 23% below ZeRO-1 with two weight-scale summation
        # orders, so only the above binds it.
        if r["zero"] > 0:
            assert abs(r["losses"][-1] - zero1[-1]) < 0.1 * zero1[-1], (r, zero1)
        # qkv / fc1 / wo / wdown x 11 statistics, plus the histograms (pre, post, edges) of the two H-BitLinear
        # inputs (44 before the histograms were added; this test had not run on a GPU since)
        assert r["stats_keys"] == 4 * 11 + 2 * 3
        # GPU kernels are not bitwise reproducible across runs; a reload continues from the same state.
        assert max(abs(a - b) for a, b in zip(r["after"], r["replay"])) < 2e-2, r


if __name__ == "__main__":
    _child()
