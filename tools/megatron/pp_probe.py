"""Pipeline-parallel forward probe (GPU, NCCL, fp32): the same batches through (a) the engine's schedule in
forward-only mode, (b) the engine's training step (first loss, before the update), (c) the unwrapped chunks
walked by hand with send/recv. Run with torchrun at PP=1, PP=2 and PP=2 x VP=2 and compare the numbers.
  torchrun --nproc_per_node 2 tools/megatron/pp_probe.py --pp 2 --vp 2
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import MarkovText, make_cfg  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--pp", type=int, default=1)
p.add_argument("--vp", type=int, default=None)
p.add_argument("--tp", type=int, default=1)
p.add_argument("--model", default="small")
p.add_argument("--kernels", default="torch")
p.add_argument("--precision", default="v2_a8")
p.add_argument("--dtype", default="fp32")
p.add_argument("--no-overlap", action="store_true")
a = p.parse_args()
ns = argparse.Namespace(model=a.model, layers=None, kernels=a.kernels, seq=128, mbs=2, gbs=8, dtype=a.dtype, seed=1234,
                        lr=1e-3, vocab=1024, precision=a.precision, engine="megatron", tensor=a.tp, pipeline=a.pp,
                        virtual=a.vp, sp=False)
cfg = make_cfg(ns)
if a.no_overlap:
    cfg.engine.overlap_grad_reduce = False
from bitnet_dist.engines import make_engine  # noqa: E402
from bitnet_dist.engines.common import batch_to_device, position_ids  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402

eng = make_engine(cfg)
eng.init_parallel()
eng.build(1024)
data = MarkovText(1024, seed=1234)
bs = [data.batch(0, j, 2, 128) for j in range(4)]
res = {"layout": f"tp{a.tp}pp{a.pp}vp{a.vp}", "eval_schedule": eng.eval_loss(bs)[0]}
# by hand: stage order (v, r) for v in chunks, r in pipeline ranks
chunks = eng.model_chunks()
pp, r = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
grp = ps.get_pipeline_model_parallel_group()
ranks = dist.get_process_group_ranks(grp)
s_sum = n_sum = 0.0
per_mb = []
with torch.no_grad():
    for m in chunks:
        m.eval()
    for b in bs:
        b = batch_to_device(b, torch.device("cuda"))
        h = None
        for v in range(len(chunks)):
            for s in range(pp):
                first, last = v == 0 and s == 0, v == len(chunks) - 1 and s == pp - 1
                if s == r:
                    m = chunks[v]
                    if not first:
                        m.set_input_tensor(h)
                    o = m(input_ids=b["tokens"], position_ids=position_ids(b["tokens"]), attention_mask=None,
                          labels=b["labels"] if last else None)
                    if last:
                        s_sum += (o.float() * b["loss_mask"]).sum().item()
                        n_sum += b["loss_mask"].sum().item()
                        per_mb.append((o.float() * b["loss_mask"]).sum().item() / b["loss_mask"].sum().item())
                    else:
                        h = o.contiguous()
                        dist.send(h, dst=ranks[(s + 1) % pp])
                elif not last and r == (s + 1) % pp:
                    h = torch.empty(128, 2, cfg.model.hidden_size, device="cuda", dtype=eng._dtype)
                    dist.recv(h, src=ranks[s])
    for m in chunks:
        m.train()
t = torch.tensor([s_sum, n_sum], dtype=torch.float64, device="cuda")
if pp > 1:
    dist.broadcast(t, src=ranks[-1], group=grp)
res["eval_by_hand"] = (t[0] / t[1]).item()
res["train_first"] = eng.train_step(bs, 1e-3, 0.1).loss
res["mb_train"] = getattr(eng, "last_micro_losses", None)
res["mb_by_hand"] = per_mb
res["train_second"] = eng.train_step([data.batch(1, j, 2, 128) for j in range(4)], 1e-3, 0.1).loss
res["layers"] = [[l.layer_number for l in m.decoder.layers] for m in chunks]
if dist.get_rank() == dist.get_world_size() - 1:
    print("[pp]", json.dumps(res), flush=True)
dist.barrier()
