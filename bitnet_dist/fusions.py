"""The fused element-wise paths of the model outside the BitLinear layers, as settings of both engines.

    trainer.fused_rope           megatron's RoPE fusion (``apply_rope_fusion``) with Transformer Engine's fused
                                 RoPE where installed, else bitnet_dist.model.fused_rope (torch.compile)
    trainer.fused_cross_entropy  the loss from the bf16 logits in one compiled kernel each way at tensor parallel 1
                                 (bitnet_dist.model.fused_token_cross_entropy); megatron's vocab-parallel loss at
                                 tensor parallel > 1 in any case
    optim.fused                  engine=megatron without Transformer Engine / Apex: torch's fused AdamW (one
                                 kernel over all tensors) for the torch AdamW megatron-core falls back to, which
                                 runs the multi-tensor (foreach) implementation

Each takes ``auto`` (on with CUDA, off on CPU), ``true`` or ``false``. ``auto`` keeps the CPU runs on megatron's own
unfused formulas (the references of the tests), and gives a GPU run the fused paths without a flag. Both fused
paths compute in fp32 and round once, where megatron's unfused RoPE rounds each product to the activation dtype:
in fp32 the two agree bit for bit (tests/layers_model/test_fusions.py). This module imports nothing of the
package but ``errors``.
"""
from __future__ import annotations

from bitnet_dist.errors import ConfigError

SETTINGS = ("fused_rope", "fused_cross_entropy")
VALUES = ("auto", "true", "false")


def _value(section, name: str, key: str) -> str:
    v = str(getattr(section, name, "auto")).lower()  # OmegaConf gives a str field "True" / "False" for a boolean
    if v not in VALUES:
        raise ConfigError(key, getattr(section, name), f"one of {list(VALUES)}")
    return v


def check_fusions(trainer, optim=None) -> None:
    """ConfigError for a fusion setting other than auto / true / false (before any process-group work)."""
    for name in SETTINGS:
        _value(trainer, name, f"trainer.{name}")
    if optim is not None:
        _value(optim, "fused", "optim.fused")


def _enabled(section, name: str, key: str, cuda: bool) -> bool:
    v = _value(section, name, key)
    return cuda if v == "auto" else v == "true"


def fusion_enabled(trainer, name: str, cuda: bool) -> bool:
    """Whether ``trainer.<name>`` is on for a run on CUDA (``cuda``) or not."""
    return _enabled(trainer, name, f"trainer.{name}", cuda)


def fused_adam_enabled(optim, cuda: bool) -> bool:
    """Whether ``optim.fused`` is on for a run on CUDA (``cuda``) or not."""
    return _enabled(optim, "fused", "optim.fused", cuda)


def megatron_fusions(trainer, cuda: bool) -> dict:
    """The TransformerConfig fields of the fusion settings (BitNetTransformerConfig.fused_cross_entropy and
    megatron's apply_rope_fusion)."""
    return {"apply_rope_fusion": fusion_enabled(trainer, "fused_rope", cuda),
            "fused_cross_entropy": fusion_enabled(trainer, "fused_cross_entropy", cuda)}
