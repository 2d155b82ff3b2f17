"""A tiny megatron-engine run on one CUDA GPU for the diagnostics in this folder (graph_probe.py,
resume_diag.py): the same configuration as the GPU tests' (tests/engines/test_megatron_gpu.py), kept here so the
tools do not import the test suite. Run the tools as scripts (``python tools/megatron/<tool>.py``): the
script's folder is then on sys.path and ``import tiny_run`` finds this module.
"""
from __future__ import annotations

import torch

from bitnet_dist.config import TrainConfig
from bitnet_dist.engines.megatron_engine import MegatronEngine
from bitnet_dist.presets import model_preset, precision_preset
from bitnet_dist.telemetry import Telemetry

VOCAB = 512
SEQ = 64


def cfg_for(precision="v2_a8", dtype="bf16", distributed_optimizer=True, seed=1234, gbs=8):

    cfg = TrainConfig()
    cfg.model = model_preset("tiny")
    cfg.precision = precision_preset(precision)
    cfg.engine.name = "megatron"
    cfg.parallel.distributed_optimizer = distributed_optimizer
    cfg.trainer.seq_length, cfg.trainer.micro_batch_size, cfg.trainer.global_batch_size = SEQ, 2, gbs
    cfg.trainer.dtype, cfg.trainer.seed = dtype, seed
    cfg.optim.lr, cfg.optim.weight_decay = 3e-3, 0.1
    return cfg


def step_batches(step, n=4, mbs=2):
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(n):
        t = torch.randint(0, VOCAB // 8, (mbs, SEQ + 1), generator=g)  # a small alphabet: learnable unigram
        mask = torch.ones(mbs, SEQ)
        mask[:, :3] = 0
        out.append({"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(), "loss_mask": mask})
    return out


def make(cfg):
    e = MegatronEngine(cfg)
    e.init_parallel()
    e.build(VOCAB)
    return e


def graph_curve(cuda_graph, precision, steps, switch_at=None, probe_at=None):
    """Per-step losses and grad norms of one tiny run; engine.cuda_graph on or off; the act-bits switch to 4
    before step ``switch_at``; telemetry's statistics probe before step ``probe_at``, as the trainer takes it:
    a forward-only pass over the step's micro-batches, then the step as usual."""
    cfg = cfg_for(precision)
    cfg.engine.cuda_graph, cfg.engine.cuda_graph_warmup = cuda_graph, 2
    cfg.trainer.stats_interval = 1
    e = make(cfg)
    tel = Telemetry.__new__(Telemetry)  # only its statistics probe (no run directory, no wandb)
    tel.stats_probe_result = None
    rows = []
    for s in range(steps):
        if switch_at is not None and s == switch_at:
            e.set_act_bits(4)
        if s == probe_at:
            with tel.stats_probe(e.model_chunks()):
                e.eval_loss(step_batches(s))
            assert tel.stats_probe_result or precision == "bf16", "the probe saw no statistics"
        st = e.train_step(step_batches(s), 3e-3, 0.1)
        rows.append((st.loss, st.grad_norm))
    e.drop_cuda_graph()
    return rows, e.graph_replays


