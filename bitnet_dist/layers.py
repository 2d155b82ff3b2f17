"""BitLinear and H-BitLinear as megatron-core tensor-parallel layers.

    BitLinear:    Y = Qw(W) · Qact( RMSNorm(X) )                 (QKV, fc1 = gate|up; column-parallel)
    H-BitLinear:  Y = Qw(W) · Qact( H( RMSNorm(X) ) )            (Wo, Wdown; row-parallel)

Each layer normalizes its own input (BitNet's SubLN), so the transformer layer's pre-norms are identity
in the quantized presets. megatron's parent ``forward()`` keeps all TP/SP communication; we override only
``_forward_impl`` and hand the quantized input and weight to megatron's GEMM (the STE keeps ``weight`` a
leaf for megatron's DDP hooks).

Tensor-parallel invariance (the model computes the same function at every TP degree):
* column-parallel input is the full hidden vector: its norm and per-token statistics are local;
* row-parallel input is feature-sharded: the SubLN all-reduces the sum of squares *in forward and in
  backward* (``torch.distributed.nn.functional.all_reduce``; megatron's reduce_from_tensor_model_parallel_
  region has an identity backward and gives silently wrong norm gradients), per-token absmax (MAX) and
  abs-sum (SUM) are all-reduced, and the Hadamard is block-diagonal with a model-fixed block that divides
  every rank's slice;
* the weight absmean (per segment for fused QKV and gate|up) is all-reduced over TP.
"""
from __future__ import annotations

import functools
import importlib
import logging
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from bitnet_dist import kernels, quant
from bitnet_dist.errors import ConfigError
from bitnet_dist.hadamard import check_block, fwht
from bitnet_dist.norm import rms_norm


@dataclass
class BitSettings:
    """What the layers read from the model's TransformerConfig (``config.bitnet``)."""

    act_bits: int = 8
    hadamard: bool = True
    hadamard_block: int = 64
    kernels: str = "auto"  # auto | triton | torch
    fp8_backward: bool = False  # Triton path: FP8 e4m3 backward GEMMs
    fused_swiglu: bool = True  # SwiGLUMLP hands [gate | up] to fc2, which keeps it instead of silu(gate) * up


_KIND_BY_BUFFER = {"qkv": "qkv", "fc1": "fc1", "proj": "wo", "fc2": "wdown"}


def _tp_size(group) -> int:
    return 1 if group is None or not dist.is_initialized() else dist.get_world_size(group)


@functools.lru_cache(maxsize=1)
def kernel_status():
    """(the Triton package, "") where it runs, else (None, why not). Checked once per process: CUDA present,
    Triton importable and the kernel modules the layers call importable (a broken Triton install fails here,
    at the start of a run, not in the first forward)."""
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    try:
        import triton  # noqa: F401
    except Exception as e:
        return None, f"import triton failed: {type(e).__name__}: {e}"
    if not getattr(kernels, "available", lambda: False)():
        return None, "bitnet_dist.kernels.available() is False"
    try:
        for mod in ("hbit_autograd", "swiglu", "ternary"):
            importlib.import_module(f"bitnet_dist.kernels.{mod}")
    except Exception as e:
        return None, f"import bitnet_dist.kernels.{mod} failed: {type(e).__name__}: {e}"
    return kernels, ""


def _kernels():
    """The Triton package, or None where it cannot run (no CUDA, no Triton, not built)."""
    return kernel_status()[0]


_fallback_warned = False


def warn_kernel_fallback(reason: str) -> None:
    """Say once per process that ``precision.kernels=auto`` runs the torch path on a CUDA device, and why."""
    global _fallback_warned
    if _fallback_warned:
        return
    _fallback_warned = True
    msg = (f"precision.kernels=auto: the Triton kernels cannot run ({reason}); the layers take the torch reference "
           "path, several times slower on GPU. Fix the Triton install, or set precision.kernels=torch to "
           "silence this.")
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    logging.getLogger("bitnet_dist").warning(msg)


@dataclass
class KernelPath:
    """Which code the layers run on this process's device: ``name`` "triton" or "torch", and why."""

    name: str
    reason: str

    def __str__(self) -> str:
        return self.name + (f" ({self.reason})" if self.reason else "")


def kernel_path(setting: str, device, *, sequence_parallel: bool = False) -> KernelPath:
    """The kernel path a run with ``precision.kernels=setting`` takes on ``device`` (warns once when ``auto``
    falls back to torch on CUDA; raises ConfigError when ``triton`` cannot run there)."""
    device = torch.device(device)
    if setting not in ("auto", "triton", "torch"):
        raise ConfigError("precision.kernels", setting, "auto, triton or torch")
    if setting == "torch":
        return KernelPath("torch", "precision.kernels=torch")
    if device.type != "cuda":
        if setting == "triton":
            raise ConfigError("precision.kernels", "triton", f"auto or torch on {device.type} (the kernels need CUDA)")
        return KernelPath("torch", f"{device.type} device")
    k, reason = kernel_status()
    if k is None:
        if setting == "triton":
            raise ConfigError("precision.kernels", "triton", f"auto or torch: the Triton kernels cannot run ({reason})")
        warn_kernel_fallback(reason)
        return KernelPath("torch", reason)
    return KernelPath("triton", "")


def _swiglu_torch(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h = [gate | up]: megatron MLP's SwiGLU ops (the torch path; no Triton import)."""
    gate, up = torch.chunk(h, 2, dim=-1)
    return torch.nn.functional.silu(gate) * up


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group in forward and in backward: y = sum_r x_r, so dL/dx_r = sum_r' dL/dy_r'.

    (torch.distributed.nn.functional.all_reduce does the same but is deprecated in torch 2.13.)
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, dy):
        dx = dy.clone()
        dist.all_reduce(dx, group=ctx.group)
        return dx, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-reduce (sum) over ``group``; identity when the group has one rank."""
    return _AllReduceSum.apply(x, group) if _tp_size(group) > 1 else x


class _BitMixin:
    """State and helpers shared by the three BitLinear layers."""

    layer_kind: str
    has_hadamard: bool = False
    stats_hook: Optional[Callable] = None

    def _init_bit(self, config, tp_comm_buffer_name: Optional[str]) -> None:
        s: BitSettings = getattr(config, "bitnet", None) or BitSettings()
        quant.check_act_bits(s.act_bits)
        self.act_bits = s.act_bits
        self.kernels = s.kernels
        self.fp8_backward = bool(getattr(s, "fp8_backward", False))
        self.eps = config.layernorm_epsilon
        self.layer_kind = _KIND_BY_BUFFER.get(tp_comm_buffer_name or "", tp_comm_buffer_name or "linear")
        self.stats_hook = None
        self._segments: Optional[torch.Tensor] = None
        self._num_segments: Optional[int] = None

    def _set_segments(self, ids: Optional[torch.Tensor]) -> None:
        if ids is not None:
            self.register_buffer("weight_segments", ids, persistent=False)
            self._num_segments = int(ids.max().item()) + 1

    @property
    def segments(self) -> Optional[torch.Tensor]:
        return getattr(self, "weight_segments", None)

    def quantized_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return quant.weight_quant(weight, self.segments, self._num_segments, self.tp_group)

    @torch.no_grad()
    def quantized_weight_codes(self) -> torch.Tensor:
        """int8 ternary codes of this rank's weight shard (scales all-reduced over TP)."""
        scale = quant.weight_absmean(self.weight, self.segments, self._num_segments, self.tp_group)
        return quant.ternary_codes(self.weight, scale)

    def _use_kernels(self, x: torch.Tensor) -> bool:
        if self.kernels == "torch" or not x.is_cuda:
            return False
        k = _kernels()
        if k is None:
            reason = kernel_status()[1]
            if self.kernels == "triton":
                raise RuntimeError(f"precision.kernels=triton but bitnet_dist.kernels is unavailable ({reason}); "
                                   "use precision.kernels=auto or torch")
            warn_kernel_fallback(reason)
            return False
        return True

    def _probe(self, pre: torch.Tensor, post: torch.Tensor) -> None:
        if self.stats_hook is not None:
            with torch.no_grad():
                self.stats_hook(self, pre, post)


class BitColumnParallelLinear(_BitMixin, ColumnParallelLinear):
    """BitLinear for QKV and fc1: RMSNorm (own weight, replicated over TP) -> INT8/INT4 per token ->
    ternary GEMM. Fused weights get one scale per segment: q / k / v, gate / up."""

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self._init_bit(config, kwargs.get("tp_comm_buffer_name"))
        self.norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype,
                                                         device=self.weight.device))
        # Replicated over TP; under SP each rank normalizes its own tokens, so the grads need the SP reduce.
        self.norm_weight.sequence_parallel = bool(config.sequence_parallel)
        self._set_segments(self._segment_ids(config, kwargs.get("stride", 1)))

    def _segment_ids(self, config, stride: int) -> Optional[torch.Tensor]:
        rows = self.output_size_per_partition
        dev = self.weight.device
        if self.layer_kind == "qkv":
            # megatron's fused QKV rows, per query group: [q (heads_per_group * d), k (d), v (d)].
            d = config.kv_channels
            groups = (config.num_query_groups or config.num_attention_heads)
            per_group = rows // (groups // _tp_size(self.tp_group))
            q_rows = per_group - 2 * d
            one = torch.cat([torch.zeros(q_rows), torch.ones(d), torch.full((d,), 2.0)])
            return one.repeat(rows // per_group).long().to(dev)
        if self.layer_kind == "fc1" and config.gated_linear_unit:
            # SwiGLU fc1 with stride 2: each rank holds [gate shard; up shard].
            half = rows // 2
            return torch.cat([torch.zeros(half), torch.ones(half)]).long().to(dev)
        return None

    def _forward_impl(self, input, weight, *args, **kwargs):
        if self._use_kernels(input):
            if self.stats_hook is not None:
                x = rms_norm(input, self.norm_weight, self.eps)
                self._probe(x, x)
            # The fused kernel normalizes and quantizes the whole input, and its backward gives this rank's share of
            # the input and norm-weight gradients (from its own output columns). Those shares are summed over TP:
            norm_weight = self.norm_weight
            if kwargs.get("sequence_parallel", False):
                # the sequence all-gather before the fused norm + quantize (its backward reduce-scatters the input
                # gradient); the norm weight's shares are summed by megatron's all-reduce of sequence-parallel
                # parameters (finalize_model_grads), as the torch path's per-token-shard gradients are
                x_in = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True,
                                                            group=self.tp_group)
            else:
                x_in = (copy_to_tensor_model_parallel_region(input, group=self.tp_group)
                        if kwargs.get("allreduce_dgrad", False) else input)
                if _tp_size(self.tp_group) > 1:
                    # replicated, not sequence-parallel: nothing else sums its gradient over TP
                    norm_weight = copy_to_tensor_model_parallel_region(norm_weight, group=self.tp_group)
            return _kernels().hbit_linear(
                x_in, weight, norm_weight, act_bits=self.act_bits, hadamard_block=0, eps=self.eps,
                weight_segments=self.segments, tp_group=self.tp_group,  # weight scale over all TP rows
                fp8_backward=self.fp8_backward)
        x = rms_norm(input, self.norm_weight, self.eps)
        self._probe(x, x)
        xq = quant.act_quant(x, self.act_bits)
        return super()._forward_impl(xq, self.quantized_weight(weight), *args, **kwargs)


class BitRowParallelLinear(_BitMixin, RowParallelLinear):
    """Row-parallel BitLinear with SubLN over the full (sharded) feature dim; ``has_hadamard`` adds the
    block Hadamard (the H-BitLinear subclass). Without it: BitNet b1.58 and the no-Hadamard ablation."""

    has_hadamard = False

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self._init_bit(config, kwargs.get("tp_comm_buffer_name"))
        self.full_dim = input_size
        # Set by SwiGLUMLP around its call: the input is the SwiGLU's [gate | up] and the layer applies
        # silu(gate) * up itself (Triton path: that product is recomputed in backward, not kept).
        self.glu_input = False
        self.norm_weight = torch.nn.Parameter(torch.ones(self.input_size_per_partition, dtype=config.params_dtype,
                                                         device=self.weight.device))
        # Sharded like the input features (dim 0), so grad-norm de-duplication and checkpoints treat it as TP.
        set_tensor_model_parallel_attributes(self.norm_weight, True, 0, 1)
        if self.has_hadamard:
            s: BitSettings = getattr(config, "bitnet", None) or BitSettings()
            # 0 = the whole input dimension (the paper's setting; TP=1 only, checked in validate.py).
            block = s.hadamard_block or self.input_size_per_partition
            check_block(block, self.input_size_per_partition)
            self.hadamard_block = block
        else:
            self.hadamard_block = 0

    def _sub_norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        ss = xf.pow(2).sum(dim=-1, keepdim=True)
        # Differentiable all-reduce: every rank's output depends on every rank's squares.
        ss = all_reduce_sum(ss, self.tp_group)
        y = xf * torch.rsqrt(ss / self.full_dim + self.eps)
        return y.to(x.dtype) * self.norm_weight.to(x.dtype)

    def _forward_impl(self, input, weight, *args, **kwargs):
        glu = self.glu_input
        if glu and input.shape[-1] != 2 * self.input_size_per_partition:
            raise ValueError(f"{type(self).__name__} with glu_input: the input has {input.shape[-1]} features, "
                             f"expected [gate | up] = 2 x {self.input_size_per_partition}")
        if self._use_kernels(input) and self.stats_hook is None:
            return _kernels().hbit_linear(
                input, weight, self.norm_weight, act_bits=self.act_bits, hadamard_block=self.hadamard_block,
                eps=self.eps, weight_segments=None, tp_group=self.tp_group, full_dim=self.full_dim,
                fp8_backward=self.fp8_backward, glu=glu)
        if glu:
            input = _swiglu_torch(input)
        x = self._sub_norm(input)
        h = fwht(x, self.hadamard_block) if self.has_hadamard else x
        self._probe(x, h)
        xq = quant.act_quant(h, self.act_bits, self.tp_group, self.full_dim)
        return super()._forward_impl(xq, self.quantized_weight(weight), *args, **kwargs)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        # The SubLN weight is TP-sharded along the input features; undeclared keys would be saved as
        # replicated from one rank.
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, {"weight": 1, "norm_weight": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group"))


class HBitRowParallelLinear(BitRowParallelLinear):
    """H-BitLinear (Wo, Wdown): SubLN -> block Hadamard -> per-token INT8/INT4 -> ternary GEMM."""

    has_hadamard = True


class SwiGLUMLP(MLP):
    """megatron's MLP with the SwiGLU on our kernels (CUDA) and, in the quantized presets, moved into fc2.

    megatron's SwiGLU without its torch.compile fusion is three torch ops that keep gate, up, silu(gate) and
    up + 0 (its offset add) for backward, and run unvectorized on the strided halves of h = [gate | up].
    On CUDA (``precision.kernels`` auto / triton) the SwiGLU is ``kernels.swiglu``: one kernel each way,
    h kept and nothing else (as megatron's fused SwiGLU), for every precision, the bf16 baseline included.
    ``precision.fused_swiglu`` (quantized presets): fc2 gets h itself (``glu_input``) and applies the SwiGLU
    inside its H-BitLinear Function, so the product is neither kept (fc2 keeps h and its 1-byte codes; the
    product, which its RMSNorm backward needs, is recomputed in backward) nor written to memory and read back
    by a separate activation. On the torch path (CPU) the SwiGLU is megatron's ops, in fc2 or here (same
    values). Only the plain SwiGLU (silu, gated, no bias, clamp or offset, not TE's activation, no per-token
    scale) takes these paths; anything else runs megatron's forward.
    """

    def __init__(self, config, submodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        s: BitSettings = getattr(config, "bitnet", None) or BitSettings()
        self.kernels = s.kernels
        self.plain_swiglu = (
            config.gated_linear_unit and self.activation_func is torch.nn.functional.silu
            and not config.add_bias_linear and not config.bias_activation_fusion
            and not getattr(config, "use_te_activation_func", False)
            and getattr(config, "activation_func_clamp_value", None) is None
            and not getattr(config, "glu_linear_offset", 0.0))
        self.fused_swiglu = (self.plain_swiglu and bool(getattr(s, "fused_swiglu", True))
                             and isinstance(self.linear_fc2, BitRowParallelLinear))

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not self.plain_swiglu or per_token_scale is not None:
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        h, bias = self.linear_fc1(hidden_states)
        assert bias is None  # no bias (checked in __init__)
        if self.fused_swiglu:
            self.linear_fc2.glu_input = True
            try:
                return self.linear_fc2(h)
            finally:
                self.linear_fc2.glu_input = False
        k = _kernels() if (h.is_cuda and self.kernels != "torch") else None
        if k is None and h.is_cuda and self.kernels != "torch":
            reason = kernel_status()[1]
            if self.kernels == "triton":
                raise RuntimeError(f"precision.kernels=triton but bitnet_dist.kernels is unavailable ({reason}); "
                                   "use precision.kernels=auto or torch")
            warn_kernel_fallback(reason)
        if k is not None:
            from bitnet_dist.kernels.swiglu import swiglu_op  # deferred: imports Triton

            x = swiglu_op(h)
        else:
            x = _swiglu_torch(h)
        return self.linear_fc2(x)


BIT_LAYERS = (BitColumnParallelLinear, BitRowParallelLinear)


def bit_layers(module: torch.nn.Module):
    return [m for m in module.modules() if isinstance(m, BIT_LAYERS)]


def batchable_layers(modules) -> list:
    """The BitLinear layers under ``modules`` whose forward takes the Triton path's per-step weight codes (kernels
    not forced to torch; sequence parallelism included). The device is not checked here (see
    ``batch_weight_quant``)."""
    return [layer for m in modules for layer in bit_layers(m) if layer.kernels != "torch"]


def batch_weight_quant(modules) -> int:
    """Quantize the ternary weights of these layers together, once per step (kernels/ternary.py ``WeightBatch``:
    a handful of launches instead of three per weight in the first micro-batch's forward). For engines whose
    weights stay materialized for the whole step (not DeepSpeed ZeRO-3, not megatron's overlapped parameter
    all-gather). Returns how many weights were batched (0 without CUDA / Triton, or with
    BITNET_BATCHED_WEIGHT_QUANT=0)."""
    if _kernels() is None:
        return 0
    # deferred: these modules import Triton, which only the CUDA path needs
    from bitnet_dist.kernels.hbit_autograd import weight_fp8
    from bitnet_dist.kernels.ternary import WeightBatch, WeightMember

    def wants_fp8(ref):  # the layer by weak reference: the batch must not keep the model alive (WeightBatch)
        return lambda: (lay := ref()) is not None and weight_fp8(lay.act_bits, lay.weight)

    members = [WeightMember(layer.weight, layer.segments, layer.tp_group, wants_fp8(weakref.ref(layer)))
               for layer in batchable_layers(modules)]  # WeightBatch takes CUDA weights (CPU ones interpreted)
    batch = WeightBatch.attach(members)
    return 0 if batch is None else len(batch.members)


def set_act_bits(module: torch.nn.Module, bits: int) -> int:
    """Switch every BitLinear / H-BitLinear under ``module`` to ``bits`` at run time (no rebuild, no
    change to parameters or optimizer state). Returns how many layers were switched."""
    quant.check_act_bits(bits)
    layers = bit_layers(module)
    for m in layers:
        m.act_bits = bits
    return len(layers)
