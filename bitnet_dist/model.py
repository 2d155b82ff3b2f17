"""The BitNet v2 model: a megatron-core layer spec plus GPTModel.

LLaMA-like decoder (RMSNorm, RoPE, SwiGLU, no biases, causal SDPA attention with GQA — flash attention on
GPU through torch SDPA), embeddings and output head in high precision. The precision preset picks the
linear layers:

    preset              qkv / fc1                 wo / wdown                 pre-norms
    bf16                ColumnParallelLinear      RowParallelLinear          RMSNorm (LLaMA)
    b158                BitColumnParallelLinear   BitRowParallelLinear       identity (SubLN inside)
    v2_* (Hadamard)     BitColumnParallelLinear   HBitRowParallelLinear      identity (SubLN inside)
    v2_a4_no_hadamard   BitColumnParallelLinear   BitRowParallelLinear       identity (SubLN inside)

The MLP is ``layers.SwiGLUMLP`` for every preset: megatron's MLP with the SwiGLU on Triton kernels on CUDA and,
with ``precision.fused_swiglu`` in the quantized presets, applied inside fc2 (which then keeps [gate | up] and its
codes instead of the product).

Initialization is layout-independent: every parameter is drawn from a generator seeded by (seed, its
global name), full-size, then sliced to this rank's TP shard, so TP/PP/VP layouts start from the same
weights (``init_weights``).
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from bitnet_dist.errors import ConfigError
from bitnet_dist.layers import (
    BitColumnParallelLinear,
    BitRowParallelLinear,
    BitSettings,
    HBitRowParallelLinear,
    SwiGLUMLP,
)
from bitnet_dist.norm import RMSNorm
from bitnet_dist.presets import ModelConfig, ParallelConfig, PrecisionConfig, check_model, padded_vocab_size


@dataclass
class BitNetTransformerConfig(TransformerConfig):
    """megatron's TransformerConfig plus what the BitLinear layers read (set by build_model)."""

    bitnet: Optional[BitSettings] = None
    # the loss from the bf16 logits in one fused kernel each way (BitNetGPTModel); set by the engines from
    # trainer.fused_cross_entropy
    fused_cross_entropy: bool = False


def _token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy, fp32: logits [s, b, V] (bf16 or fp32), labels [b, s] -> [b, s]."""
    s, b, v = logits.shape
    loss = F.cross_entropy(logits.float().reshape(s * b, v), labels.t().reshape(s * b), reduction="none")
    return loss.view(s, b).t()


class _CompiledOnCuda:
    """``fn`` through ``torch.compile`` (compiled on first use) where its first argument is a CUDA tensor, eagerly
    elsewhere: the fused element-wise paths below."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, None

    def __call__(self, x: torch.Tensor, *args):
        if not x.is_cuda:
            return self.fn(x, *args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=False)
        return self.compiled(x, *args)


_compiled_ce = _CompiledOnCuda(_token_cross_entropy)


def fused_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``_token_cross_entropy`` through torch.compile on CUDA: forward and backward each one reduction over the bf16
    logits (the fp32 upcast, max, log-sum-exp and the gradient softmax - onehot computed in registers), where
    megatron's vocab-parallel cross-entropy writes fp32 copies of the logits ([s, b, V], 1 GiB per 8192 tokens at a
    32k vocabulary) in several passes and keeps one for backward. Elsewhere the same formula eagerly."""
    return _compiled_ce(logits, labels)


def _rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding in megatron's rotate-half layout: t [s, b, heads, d] (any float dtype), freqs
    [s, 1, 1, r] fp32 (r <= d; the dims past r pass through). Computed in fp32 (fp64 for fp64 input) and rounded
    once to t's dtype, as Transformer Engine's fused RoPE does; megatron's unfused path rounds cos, sin and each
    product to t's dtype (the same arithmetic in fp32)."""
    r = freqs.shape[-1]
    x = t[..., :r].to(torch.promote_types(t.dtype, torch.float32))
    x1, x2 = x.chunk(2, dim=-1)
    f = freqs.to(x.dtype)
    y = x * torch.cos(f) + torch.cat((-x2, x1), dim=-1) * torch.sin(f)
    return torch.cat((y.to(t.dtype), t[..., r:]), dim=-1)


_compiled_rope = _CompiledOnCuda(_rope)


def fused_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """megatron's ``fused_apply_rotary_pos_emb`` hook (``apply_rope_fusion``): ``_rope`` through torch.compile on
    CUDA, one kernel each way instead of megatron's ~7 element-wise passes over q and k per direction (slices,
    rotate-half cat, two products, sum, a cat with the pass-through dims); the same formula eagerly elsewhere."""
    if interleaved:
        raise ConfigError("rotary_interleaved", True, "false (the fused RoPE implements the rotate-half layout)")
    return _compiled_rope(t, freqs)


def install_fused_rope() -> str:
    """Make megatron's RoPE fusion (``TransformerConfig.apply_rope_fusion``) available: Transformer Engine's fused
    RoPE where megatron found one, else ``fused_rope``. Returns which ("transformer_engine" or "bitnet_dist")."""
    current = rope_utils.fused_apply_rotary_pos_emb
    if current is not None and current is not fused_rope:
        return "transformer_engine"
    rope_utils.fused_apply_rotary_pos_emb = fused_rope
    return "bitnet_dist"


class BitNetGPTModel(GPTModel):
    """megatron's GPTModel with the fused cross-entropy (``config.fused_cross_entropy``) where the vocabulary is not
    split over tensor-parallel ranks; megatron's vocab-parallel loss otherwise."""

    def compute_language_model_loss(self, labels, logits):
        if getattr(self.config, "fused_cross_entropy", False) and self.config.tensor_model_parallel_size == 1:
            return fused_token_cross_entropy(logits, labels)
        return super().compute_language_model_loss(labels, logits)


class SDPACoreAttention(MegatronModule):
    """Core attention through torch SDPA (flash / memory-efficient kernels on GPU, math on CPU).

    Inputs q [s, b, heads/tp, d], k/v [s, b, groups/tp, d]; output [s, b, heads/tp * d]. megatron has no
    SDPA backend and its DotProductAttention forks the CUDA RNG even at dropout 0.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type=None, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, **kwargs):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ConfigError("parallel.context", config.context_parallel_size, "1 (context parallel is not supported)")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention supports neither packed sequences nor attention bias")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        gqa = k.shape[1] != q.shape[1]
        p = self.dropout_p if self.training else 0.0
        mask_type = attn_mask_type or self.attn_mask_type
        if attention_mask is None and mask_type == AttnMaskType.causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, scale=self.softmax_scale,
                                                 enable_gqa=gqa)
        else:  # megatron masks: True = masked out; SDPA boolean masks: True = attend
            mask = None if attention_mask is None else ~attention_mask
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.softmax_scale,
                                                 enable_gqa=gqa)
        s, b = out.shape[2], out.shape[0]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


class _QuietSwiGLUMLP(logging.Filter):
    """megatron's TransformerLayer recognises its MLP by class equality and logs "Unknown MLP type ... Using
    default kwargs" for the SwiGLUMLP subclass on every layer; the default (parallel_state's TP group) is what
    MLP itself uses when no group is passed, so the message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Unknown MLP type" not in record.getMessage()


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_QuietSwiGLUMLP())


def layer_spec(precision: PrecisionConfig) -> ModuleSpec:
    """The transformer layer spec for a precision preset (see the table in the module docstring)."""
    if precision.quantize:
        qkv = fc1 = BitColumnParallelLinear
        out = HBitRowParallelLinear if precision.hadamard else BitRowParallelLinear
        pre_norm = IdentityOp  # every BitLinear normalizes its own input
    else:
        qkv = fc1 = ColumnParallelLinear
        out = RowParallelLinear
        pre_norm = RMSNorm
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=pre_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(linear_qkv=qkv, core_attention=SDPACoreAttention,
                                                   linear_proj=out, q_layernorm=IdentityOp,
                                                   k_layernorm=IdentityOp),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_norm,
            mlp=ModuleSpec(module=SwiGLUMLP,
                           submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=out)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def transformer_config(model: ModelConfig, parallel: ParallelConfig, *, params_dtype=torch.float32, bf16=False,
                       use_cpu_initialization=True, **overrides) -> BitNetTransformerConfig:
    """megatron TransformerConfig for a model preset and parallel layout (validated first)."""
    check_model(model, PrecisionConfig(quantize=False, hadamard=False), parallel)
    kw = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups or model.num_attention_heads,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        sequence_parallel=parallel.sequence,
        use_cpu_initialization=use_cpu_initialization,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,  # STE weights are non-leaf: no main_grad on them
        apply_rope_fusion=False,
        persist_layer_norm=False,
        params_dtype=params_dtype,
        bf16=bf16,
        pipeline_dtype=params_dtype,
    )
    kw.update(overrides)
    if kw["apply_rope_fusion"]:
        install_fused_rope()  # before the config: its __post_init__ checks that a fused RoPE is there
    return BitNetTransformerConfig(**kw)


def build_model(model: ModelConfig, precision: PrecisionConfig, config: TransformerConfig, *, vocab_size: int,
                pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
                seed: Optional[int] = None) -> GPTModel:
    """Build this rank's chunk of the BitNet v2 GPTModel (megatron parallel_state must be initialized).

    ``vocab_size`` is padded with presets.padded_vocab_size (idempotent on a padded size). With ``seed`` the
    weights are re-drawn layout-independently (``init_weights``); without it megatron's CPU init is used
    (also TP-independent when ``use_cpu_initialization``; seed torch yourself).
    """
    parallel = ParallelConfig(tensor=config.tensor_model_parallel_size,
                              pipeline=config.pipeline_model_parallel_size,
                              virtual_pipeline=config.virtual_pipeline_model_parallel_size,
                              sequence=config.sequence_parallel)
    check_model(model, precision, parallel)
    config.bitnet = BitSettings(act_bits=precision.act_bits, hadamard=precision.hadamard,
                                hadamard_block=model.hadamard_block, kernels=precision.kernels,
                                fp8_backward=precision.fp8_backward, fused_swiglu=precision.fused_swiglu)
    spec = layer_spec(precision)
    n_local = get_num_layers_to_build(config, vp_stage=vp_stage)
    block = ModuleSpec(module=TransformerBlock,
                       submodules=TransformerBlockSubmodules(layer_specs=[spec] * n_local, layer_norm=RMSNorm))
    gpt = BitNetGPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=padded_vocab_size(vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=model.max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=model.rope_base,
        vp_stage=vp_stage,
    )
    if seed is not None:
        init_weights(gpt, seed, model)
    return gpt


# ------------------------------------------------------------------------ layout-independent init
def _global_name(module_name: str, gpt: GPTModel) -> str:
    """Replace the chunk-local layer index by megatron's global layer number."""
    parts = module_name.split(".")
    if len(parts) >= 3 and parts[0] == "decoder" and parts[1] == "layers":
        layer = gpt.decoder.layers[int(parts[2])]
        parts[2] = f"L{layer.layer_number}"
    return ".".join(parts)


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@torch.no_grad()
def init_weights(gpt: GPTModel, seed: int, model: ModelConfig) -> None:
    """Re-draw every weight matrix full-size from (seed, global name) and keep this rank's TP slice.

    Linear and embedding weights ~ N(0, init_std); the output projections of each block (Wo, Wdown) use
    init_std / sqrt(2 * num_layers) as megatron does. Norm weights stay 1. The slicing mirrors megatron's
    CPU init: split the master along the partition dim into chunks of local_size/stride, take rank::TP.
    """
    tp = ps.get_tensor_model_parallel_world_size()
    rank = ps.get_tensor_model_parallel_rank()
    out_std = model.init_std / math.sqrt(2.0 * model.num_layers)
    for name, p in gpt.named_parameters():
        if p.dim() != 2 or name.endswith("norm_weight"):
            continue
        gname = _global_name(name, gpt)
        std = out_std if (".linear_proj." in name or ".linear_fc2." in name) else model.init_std
        shape = list(p.shape)
        dim = getattr(p, "partition_dim", -1) if getattr(p, "tensor_model_parallel", False) else -1
        stride = getattr(p, "partition_stride", 1)
        if dim >= 0 and tp > 1:
            shape[dim] *= tp
        master = torch.empty(shape, dtype=torch.float32)
        master.normal_(0.0, std, generator=_generator(seed, gname))
        if dim >= 0 and tp > 1:
            chunks = torch.split(master, p.shape[dim] // stride, dim=dim)
            master = torch.cat(chunks[rank::tp], dim=dim)
        p.copy_(master.to(p.dtype))
