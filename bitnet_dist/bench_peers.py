"""The end-to-end benchmark's peers: a plain PyTorch LLaMA of a preset's shapes, trained the way a careful user
would train it without this project, and the same model with torchao's BitNet b1.58 training linears.

* ``plain``: RMSNorm (torch's fused ``F.rms_norm``), RoPE (rotate-half, fp32 tables), GQA through SDPA (flash
  attention on GPU, ``is_causal``), SwiGLU MLP, untied output head, fp32 parameters under bf16 autocast, fused
  AdamW, gradient clipping, every transformer block and the head + loss ``torch.compile``d (one compilation
  serves all blocks: torch inlines module parameters as graph inputs).
* ``torchao``: the same model with an RMSNorm before each block linear (BitNet's SubLN: the pre-norms feed QKV
  and fc1, two more norms feed Wo and Wdown) and those linears swapped by torchao's
  ``quantize_(model, bitnet_training())``: ternary absmean weights, int8 per-token activations, int8 forward
  GEMM, bf16 backward GEMMs. The embedding and the output head stay bf16, as in BitNet and in this project.

``train_peer`` times optimizer steps of ``micro_batches`` micro-batches on random tokens (as ``data=synthetic``)
and returns tokens/s per step, the loss and the peak memory. torchao is an optional dependency (extra ``bench``).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

PEERS = ("plain", "torchao")


@dataclass
class PeerShape:
    hidden: int
    ffn: int
    heads: int
    groups: int
    layers: int
    vocab: int
    seq: int
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    init_std: float = 0.02

    @classmethod
    def from_model(cls, model_cfg, vocab: int, seq: int) -> "PeerShape":
        """The shapes of a ``presets.ModelConfig`` (``vocab``: the padded vocabulary the project's model has)."""
        m = model_cfg
        return cls(hidden=m.hidden_size, ffn=m.ffn_hidden_size, heads=m.num_attention_heads,
                   groups=m.num_query_groups or m.num_attention_heads, layers=m.num_layers, vocab=vocab, seq=seq,
                   norm_eps=m.norm_eps, rope_base=float(m.rope_base), init_std=m.init_std)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(seq: int, head_dim: int, base: float, device=None):
    """cos, sin [seq, head_dim] (fp32) of rotate-half RoPE: frequency i of the first half pairs with i + d/2."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    ang = torch.outer(torch.arange(seq, dtype=torch.float32, device=device), inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    """x [b, n, s, d]."""
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)


class Block(nn.Module):
    def __init__(self, s: PeerShape, subln: bool):
        super().__init__()
        self.s = s
        d = s.hidden // s.heads
        self.head_dim = d
        self.attn_norm = RMSNorm(s.hidden, s.norm_eps)
        self.qkv = nn.Linear(s.hidden, (s.heads + 2 * s.groups) * d, bias=False)
        self.wo_norm = RMSNorm(s.hidden, s.norm_eps) if subln else nn.Identity()
        self.wo = nn.Linear(s.heads * d, s.hidden, bias=False)
        self.mlp_norm = RMSNorm(s.hidden, s.norm_eps)
        self.fc1 = nn.Linear(s.hidden, 2 * s.ffn, bias=False)
        self.fc2_norm = RMSNorm(s.ffn, s.norm_eps) if subln else nn.Identity()
        self.fc2 = nn.Linear(s.ffn, s.hidden, bias=False)

    def forward(self, x, cos, sin):
        s, d = self.s, self.head_dim
        b, t, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split([s.heads * d, s.groups * d, s.groups * d], dim=-1)
        q = apply_rope(q.view(b, t, s.heads, d).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(b, t, s.groups, d).transpose(1, 2), cos, sin)
        v = v.view(b, t, s.groups, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=s.groups != s.heads)
        x = x + self.wo(self.wo_norm(o.transpose(1, 2).reshape(b, t, s.heads * d)))
        gate, up = self.fc1(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.fc2(self.fc2_norm(F.silu(gate) * up))


class PeerLM(nn.Module):
    """Decoder-only LM; ``forward(tokens [b, s], labels [b, s])`` -> mean token cross-entropy (fp32)."""

    def __init__(self, s: PeerShape, subln: bool = False):
        super().__init__()
        self.s = s
        self.embed = nn.Embedding(s.vocab, s.hidden)
        self.blocks = nn.ModuleList(Block(s, subln) for _ in range(s.layers))
        self.norm = RMSNorm(s.hidden, s.norm_eps)
        self.head = nn.Linear(s.hidden, s.vocab, bias=False)
        cos, sin = rope_tables(s.seq, s.hidden // s.heads, s.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.head_loss = self._head_loss
        out_std = s.init_std / math.sqrt(2.0 * s.layers)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, out_std if name.endswith(("wo.weight", "fc2.weight")) else s.init_std)

    def _head_loss(self, x, labels):
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))

    def forward(self, tokens, labels):
        t = tokens.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return self.head_loss(x, labels)

    def compile(self, **kw):
        """Each block and the head + loss through torch.compile (the regions torchtitan compiles)."""
        for i, blk in enumerate(self.blocks):
            self.blocks[i] = torch.compile(blk, **kw)
        self.head_loss = torch.compile(self._head_loss, **kw)
        return self


def torchao_filter(module: nn.Module, fqn: str) -> bool:
    """The linears torchao's BitNet replaces: every block linear, not the output head."""
    return isinstance(module, nn.Linear) and fqn.startswith("blocks.")


def apply_torchao_bitnet(model: PeerLM) -> int:
    """Swap the block linears' weights for torchao's BitNet training weights; returns how many were swapped.
    Raises ImportError without torchao (``pip install bitnet-dist[bench]``)."""
    from torchao.prototype.quantized_training import bitnet_training
    from torchao.quantization import quantize_

    quantize_(model, bitnet_training(), filter_fn=torchao_filter)
    return sum(1 for n, m in model.named_modules() if torchao_filter(m, n) and "BitNet" in type(m.weight).__name__)


def build_peer(kind: str, s: PeerShape, device, *, compile: bool = True) -> PeerLM:
    if kind not in PEERS:
        raise ValueError(f"peer {kind!r}: one of {PEERS}")
    torch.manual_seed(0)
    model = PeerLM(s, subln=kind == "torchao").to(device)
    if kind == "torchao":
        apply_torchao_bitnet(model)
    if compile:
        model.compile()
    return model


def train_peer(kind: str, s: PeerShape, *, micro_batch: int, global_batch: int, steps: int, warmup: int,
               device="cuda", compile: bool = True, lr: float = 3e-4, clip: float = 1.0,
               seed: int = 1234, profile: Optional[str] = None) -> dict:
    """Train ``steps`` optimizer steps of ``global_batch // micro_batch`` micro-batches (random tokens) and time
    them. -> {"step_s": [...], "tokens_per_s": median over the steps after ``warmup``, "loss": [...],
    "peak_mem_gib"}."""
    if global_batch % micro_batch:
        raise ValueError(f"global_batch {global_batch} is not a multiple of micro_batch {micro_batch}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model = build_peer(kind, s, device, compile=compile)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=cuda or None)
    n_micro = global_batch // micro_batch
    gen = torch.Generator(device=device).manual_seed(seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    step_s, losses = [], []

    def one_step(data):
        total = torch.zeros((), device=device)
        for m in range(n_micro):
            with autocast:
                loss = model(data[m, :, :-1], data[m, :, 1:]) / n_micro
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        return total

    for _i in range(steps):
        data = torch.randint(0, s.vocab, (n_micro, micro_batch, s.seq + 1), device=device, generator=gen)
        t0 = time.perf_counter()
        total = one_step(data)
        step_s.append(time.perf_counter() - t0)
        losses.append(total.item())
    if profile:  # one more step under torch.profiler (not timed above): bitnet_dist.profile
        from bitnet_dist.profile import profile_step

        data = torch.randint(0, s.vocab, (n_micro, micro_batch, s.seq + 1), device=device, generator=gen)
        with profile_step(profile, device, meta={"step": steps + 1, "tokens": global_batch * s.seq}):
            one_step(data)
    timed = step_s[warmup:] or step_s
    out = {"peer": kind, "step_s": step_s, "loss": losses,
           "tokens_per_s": global_batch * s.seq / statistics.median(timed)}
    out["peak_mem_gib"] = (torch.cuda.max_memory_allocated(device) / 2**30) if cuda else None
    return out


def peer_available(kind: str, device) -> Optional[str]:
    """None when ``kind`` can run on ``device``, else the reason."""
    if kind == "torchao":
        try:
            import torchao  # noqa: F401
            from torchao.prototype.quantized_training import bitnet_training  # noqa: F401
        except Exception as e:
            return f"torchao not importable ({type(e).__name__}: {e}); pip install 'bitnet-dist[bench]'"
    return None
