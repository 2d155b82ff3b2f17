"""BitNet v2 for Hugging Face transformers (shipped inside every bitnet-dist v2 export; trust_remote_code=True).

Plain torch + transformers: transformers' own BitNet model (``model_type: bitnet``: pre-norm decoder with the
sub-norms ``attn_sub_norm`` / ``ffn_sub_norm`` before ``o_proj`` / ``down_proj``, RoPE, GQA, SwiGLU) with its
seven projections per layer replaced by H-BitLinear layers, which transformers' ``bitnet`` quantization has no
field for:

    y = weight_scale * (W_ternary @ Q_act(H(x)))

* ``x`` is already RMS-normalized by the layer's norm (input_layernorm, attn_sub_norm, post_attention_layernorm,
  ffn_sub_norm: BitNet's per-linear norm);
* ``H`` is the normalized block-diagonal Walsh-Hadamard transform with block ``hadamard_block`` on the inputs
  of ``o_proj`` and ``down_proj`` only (0: no transform anywhere, the no-Hadamard ablation);
* ``Q_act`` quantizes each token: INT8 absmax (scale max|x| / 127, codes in [-128, 127]) or INT4 absmean
  (scale mean|x| / sqrt(7), codes in [-8, 7]); statistics clamped from below at 1e-5, round half to even;
* ``W_ternary`` in {-1, 0, 1}, packed four rows per byte exactly as transformers' bitnet integration packs
  them (code + 1 in bits 2i..2i+1 of byte [r, c] for row r + i * out / 4), ``weight_scale`` = mean|W| of the
  latent weight (the ``autobitlinear`` offline convention). ``quantization_mode: online`` exports keep the
  latent weight instead and quantize it at every forward (absmean, per projection).

Statistics and the Hadamard run in fp32 (fp64 for fp64 inputs); the matmul runs in the input's dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.bitnet.configuration_bitnet import BitNetConfig
from transformers.models.bitnet.modeling_bitnet import BitNetForCausalLM

SCALE_EPS = 1e-5
_RANGE = {8: (-128, 127), 4: (-8, 7)}


class BitNetV2Config(BitNetConfig):
    model_type = "bitnet_v2"

    def __init__(self, act_bits: int = 8, hadamard_block: int = 0, quantization_mode: str = "offline", **kwargs):
        self.act_bits = int(act_bits)
        self.hadamard_block = int(hadamard_block)
        self.quantization_mode = str(quantization_mode)
        super().__init__(**kwargs)
        if self.act_bits not in _RANGE:
            raise ValueError(f"act_bits={self.act_bits}: 4 or 8")
        if self.quantization_mode not in ("offline", "online"):
            raise ValueError(f"quantization_mode={self.quantization_mode!r}: offline or online")


def hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """Normalized block-diagonal Sylvester Walsh-Hadamard transform over the last dim (butterflies)."""
    shape = x.shape
    y = x.reshape(-1, shape[-1] // block, block)
    h = 1
    while h < block:
        y = y.view(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, b = y[:, :, :, 0, :], y[:, :, :, 1, :]
        y = torch.stack((a + b, a - b), dim=3).view(y.shape[0], y.shape[1], block)
        h *= 2
    return (y * (1.0 / math.sqrt(block))).reshape(shape)


def unpack_ternary(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """uint8 [ceil(rows / 4), in] -> int8 codes [rows, in] in {-1, 0, 1}."""
    parts = [((packed >> (2 * i)) & 3).to(torch.int8) - 1 for i in range(4)]
    return torch.cat(parts, dim=0)[:rows]


def quantize_activations(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token fake-quantized activation (codes * scale), in the statistics dtype."""
    a = x.abs()
    if bits == 8:
        scale = a.amax(dim=-1, keepdim=True).clamp_min(SCALE_EPS) / 127.0
    else:
        scale = (a.sum(dim=-1, keepdim=True) / x.shape[-1]).clamp_min(SCALE_EPS) / math.sqrt(7.0)
    lo, hi = _RANGE[bits]
    return torch.round(x / scale).clamp_(lo, hi) * scale


class HBitLinear(nn.Module):
    """A BitNet v2 projection: optional block Hadamard -> per-token INT8 / INT4 -> ternary weight."""

    def __init__(self, in_features: int, out_features: int, act_bits: int, hadamard_block: int, online: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.act_bits, self.hadamard_block, self.online = act_bits, hadamard_block, online
        if online:
            self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        else:
            self.weight = nn.Parameter(torch.zeros(-(-out_features // 4), in_features, dtype=torch.uint8),
                                       requires_grad=False)
            self.weight_scale = nn.Parameter(torch.ones(1), requires_grad=False)

    def ternary(self):
        """(codes as float [out, in], scale []) in fp32."""
        if self.online:
            w = self.weight.float()
            scale = w.abs().mean().clamp_min(SCALE_EPS)
            return torch.round(w / scale).clamp_(-1, 1), scale
        return unpack_ternary(self.weight, self.out_features).float(), self.weight_scale.float().reshape(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        h = x.to(acc)
        if self.hadamard_block > 1:
            h = hadamard(h, self.hadamard_block)
        xq = quantize_activations(h, self.act_bits)
        codes, scale = self.ternary()
        y = F.linear(xq, codes.to(acc)) * scale.to(acc)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, act_bits={self.act_bits}, "
                f"hadamard_block={self.hadamard_block}, {'online' if self.online else 'packed'}")


class BitNetV2ForCausalLM(BitNetForCausalLM):
    config_class = BitNetV2Config

    def __init__(self, config: BitNetV2Config):
        super().__init__(config)
        online = config.quantization_mode == "online"
        for layer in self.model.layers:
            for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                  (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
                for name in names:
                    old = getattr(parent, name)
                    block = config.hadamard_block if name in ("o_proj", "down_proj") else 0
                    setattr(parent, name, HBitLinear(old.in_features, old.out_features, config.act_bits, block,
                                                     online))


__all__ = ["BitNetV2Config", "BitNetV2ForCausalLM", "HBitLinear"]
