"""What one transformer layer keeps for backward, by module, in the real model (GPU; docs/kernels.md).

    python tools/megatron/saved_memory.py --model 1.3B --mbs 4 --seq 2048 --out X.json

Builds the model (one layer, bf16 parameters, TP 1) per precision, runs one forward under autograd's saved-
tensor hooks and records every saved tensor's storage with the innermost module that saved it. A storage
counts once however often it is saved, parameters not at all (the BitLinear layers keep their
ternary codes in the per-step cache, not as saved tensors; bf16 layers save their weights, which exist anyway) (SDPA's output and the Wo layer's input, for instance, are one
storage when no copy sits between them). Per module: ``own`` = bytes of the storages only that module keeps,
``shared`` = storages it keeps that another module keeps too. The layer-alone benchmark (bitnet_dist.bench)
cannot see that sharing; this is the in-model measure of the Wo / Wdown memory target.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from collections import defaultdict

import torch


def layer_saved(model, tokens, prefix: str) -> dict:
    stack: list[str] = []
    owners: dict[int, set] = defaultdict(set)
    sizes: dict[int, int] = {}

    def pre(name):
        return lambda mod, args: stack.append(name)

    def post(name):
        def f(mod, args, out):
            stack.pop()
        return f

    handles = []
    for name, mod in model.named_modules():
        if name.startswith(prefix):
            handles.append(mod.register_forward_pre_hook(pre(name[len(prefix):].lstrip(".") or "<layer>")))
            handles.append(mod.register_forward_hook(post(name)))

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if stack:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr in params:  # a weight kept for backward exists anyway: not activation memory
                return t
            owners[ptr].add(stack[-1])
            sizes[ptr] = st.nbytes()
        return t

    pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=tokens, position_ids=pos, attention_mask=None, labels=tokens).float().mean()
    for h in handles:
        h.remove()
    own: dict[str, int] = defaultdict(int)
    shared: dict[str, int] = defaultdict(int)
    for ptr, mods in owners.items():
        for m in mods:
            (own if len(mods) == 1 else shared)[m] += sizes[ptr]
    del loss
    return {"total_bytes": sum(sizes.values()), "own": dict(own), "shared": dict(shared),
            "storages": len(sizes)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="1.3B")
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--precision", nargs="+", default=["bf16", "v2_a8", "v2_a4", "v2_a4:unfused"],
                   help="preset[:unfused] (unfused: precision.fused_swiglu=false)")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the tool (torch reference layers)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    from megatron.core import parallel_state as ps

    from bitnet_dist.engines import common
    from bitnet_dist.model import build_model, transformer_config
    from bitnet_dist.presets import ParallelConfig, model_preset, precision_preset

    dev = torch.device(a.device)
    if dev.type == "cpu":
        from bitnet_dist.compat import install_cpu_path

        install_cpu_path()
    common.ensure_process_group(dev)
    ps.initialize_model_parallel(1, 1)
    if dev.type == "cuda":
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1)
    mc = model_preset(a.model, num_layers=1)
    meta = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "date": _dt.datetime.utcnow().strftime("%Y-%m-%d %H:%M"),
            "torch": torch.__version__, "command": " ".join(sys.argv), "model": a.model, "mbs": a.mbs,
            "seq": a.seq, "hidden": mc.hidden_size, "ffn": mc.ffn_hidden_size}
    rows = []
    for spec in a.precision:
        name, _, flag = spec.partition(":")
        prec = precision_preset(name, fused_swiglu=(flag != "unfused"))
        tcfg = transformer_config(mc, ParallelConfig(), params_dtype=torch.bfloat16, bf16=True)
        torch.manual_seed(1)
        m = build_model(mc, prec, tcfg, vocab_size=32000, seed=1).to(dev)
        tokens = torch.randint(0, 32000, (a.mbs, a.seq), device=dev)
        r = layer_saved(m, tokens, "decoder.layers.0")
        row = {**meta, "precision": spec, **r}
        print("[saved]", json.dumps(row), flush=True)
        rows.append(row)
        del m
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    with open(a.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(to_markdown(rows))


def to_markdown(rows) -> str:
    """Table: MiB per module (own / shared) for each precision."""
    mods = sorted({m for r in rows for m in list(r["own"]) + list(r["shared"])})
    mib = 2 ** 20
    head = "| module | " + " | ".join(r["precision"] for r in rows) + " |"
    out = [head, "|---" * (len(rows) + 1) + "|"]
    for m in mods:
        cells = []
        for r in rows:
            o, s = r["own"].get(m, 0) / mib, r["shared"].get(m, 0) / mib
            cells.append(f"{o:.1f}" + (f" (+{s:.1f} shared)" if s else ""))
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    out.append("| **layer total (unique storages)** | "
               + " | ".join(f"**{r['total_bytes'] / mib:.1f}**" for r in rows) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
