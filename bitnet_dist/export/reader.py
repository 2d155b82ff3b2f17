"""Read a training checkpoint of either engine, at any layout, into one TP=1 model on the CPU.

``load_run(checkpoint)`` returns a :class:`LoadedRun`: the run's config (``config.yaml`` of the run directory,
or one given explicitly), the trainer state saved with the checkpoint (step, activation bits of the last step),
the run's tokenizer and the full, unsharded state dict of the TP=1 / PP=1 ``GPTModel`` in megatron's names.

* megatron engine (``megatron/`` holds a dist checkpoint): a TP=1 model is built in this process (a one-rank
  gloo group) and ``megatron.core.dist_checkpointing.load`` reads its sharded state dict from the files; the
  ShardedTensors carry global offsets and global layer numbers, so any TP / PP / virtual-PP / DP layout that
  wrote the files loads (only the model is read, not the optimizer).
* DeepSpeed engine (``state/mp_rank_XX_model_states.pt``): ZeRO stages 0-2 keep each TP rank's whole module in
  its model-states file; the TP shards are joined along each parameter's partition dimension, undoing megatron's
  strided split (fc1 = [gate | up] holds a gate and an up slice per rank). ZeRO-3 partitions the parameters
  themselves over DP; DeepSpeed's own ``zero_to_fp32`` reassembles them (TP=1 is the only ZeRO-3 layout).

Every checkpoint is verified against its manifest first (``bitnet_dist.checkpoint.verify``); a corrupt or
incomplete one, or one that does not fit the config, raises :class:`ExportError` naming the file and the fix.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from bitnet_dist.compat import host_device
from bitnet_dist.errors import ConfigError
from bitnet_dist.presets import PRECISION_PRESETS, padded_vocab_size


class ExportError(RuntimeError):
    """A checkpoint or export directory that cannot be used; the message names the path and the fix."""


@dataclass
class LoadedRun:
    cfg: Any  # bitnet_dist.config.TrainConfig
    run_dir: Path
    checkpoint: Path
    engine: str  # "megatron" | "deepspeed"
    trainer_state: dict
    tokenizer: Any  # bitnet_dist.data.tokenizer tokenizer (encode / decode / vocab_size / eod_id)
    state_dict: dict  # megatron names of the TP=1 GPTModel, CPU tensors in the training dtype
    dtype: torch.dtype  # the training dtype of the weights

    @property
    def act_bits(self) -> int:
        """Activation bits of the last step (v2_a8_to_a4: 4 after the switch)."""
        return int(self.trainer_state.get("act_bits", self.cfg.precision.act_bits))

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)


# ------------------------------------------------------------------------------------------ config
def find_config(checkpoint: Path, config: Optional[Path]) -> Path:
    if config is not None:
        config = Path(config)
        if not config.is_file():
            raise ExportError(f"run config {config} does not exist: give the config.yaml of the run that wrote "
                              f"{checkpoint}")
        return config
    for cand in (checkpoint.parent.parent / "config.yaml", checkpoint / "config.yaml"):
        if cand.is_file():
            return cand
    raise ExportError(f"no run config next to {checkpoint} (expected RUN_DIR/config.yaml for "
                      "RUN_DIR/checkpoints/step_*): pass --config RUN_DIR/config.yaml")


def load_config(path: Path):
    """config.yaml (as the train app writes it) -> TrainConfig; unknown precision names are refused."""
    from omegaconf import OmegaConf

    from bitnet_dist.config import TrainConfig, cfg_from_omegaconf

    try:
        raw = OmegaConf.load(path)
    except Exception as e:
        raise ExportError(f"run config {path} is not readable YAML ({e})") from None
    name = OmegaConf.select(raw, "precision.name")
    if name not in PRECISION_PRESETS:
        raise ConfigError("precision", name, f"one of {sorted(PRECISION_PRESETS)} (the run config {path} names "
                                             "a precision bitnet-export cannot write)")
    try:
        cfg = cfg_from_omegaconf(OmegaConf.merge(OmegaConf.structured(TrainConfig), raw))
    except Exception as e:
        raise ExportError(f"run config {path} does not fit the train schema ({e})") from None
    preset = PRECISION_PRESETS[name]
    for key in ("quantize", "hadamard", "act_bits", "final_act_bits"):
        if getattr(cfg.precision, key) != getattr(preset, key):
            raise ConfigError(f"precision.{key}", getattr(cfg.precision, key),
                              f"{getattr(preset, key)!r} as in the {name} preset: bitnet-export writes the presets' "
                              "formats only")
    return cfg


def run_tokenizer(cfg, run_dir: Path):
    """The tokenizer the run trained with (bitnet_dist.data.tokenizer object)."""
    from bitnet_dist.data.tokenizer import ByteTokenizer, load_tokenizer

    d = cfg.data
    if d.tokenizer == "gpt2":
        return load_tokenizer("gpt2")
    if d.tokenizer == "bpe":
        if d.name == "synthetic":  # synthetic data: bytes as ids (bitnet_dist.data.pipeline)
            return ByteTokenizer(d.vocab_size)
        path = run_dir / "tokenizer.json"
        if not path.is_file():
            raise ExportError(f"{path} is missing: the run trained its BPE there; restore it from the run directory")
        return load_tokenizer(str(path))
    return load_tokenizer(str(Path(d.tokenizer).expanduser()))


# ------------------------------------------------------------------------------------ checkpoint
def _verify(checkpoint: Path) -> None:
    from bitnet_dist.checkpoint import MANIFEST, verify

    if not checkpoint.is_dir():
        raise ExportError(f"checkpoint {checkpoint} is not a directory: give RUN_DIR/checkpoints/step_XXXXXXXX")
    if not (checkpoint / MANIFEST).is_file() and (checkpoint / "checkpoints").is_dir():
        raise ExportError(f"{checkpoint} is a run directory: give one of its checkpoints, "
                          f"{checkpoint}/checkpoints/step_XXXXXXXX")
    reason = verify(checkpoint)
    if reason is not None:
        raise ExportError(f"checkpoint {checkpoint} is corrupt or incomplete: {reason}. Export another checkpoint "
                          "of the run (or restore this one from a good copy)")


def _engine_of(checkpoint: Path) -> str:
    if (checkpoint / "megatron" / "metadata.json").is_file():
        return "megatron"
    if (checkpoint / "deepspeed_layout.json").is_file():
        return "deepspeed"
    raise ExportError(f"{checkpoint} holds neither a megatron dist checkpoint (megatron/metadata.json) nor a "
                      "DeepSpeed one (deepspeed_layout.json)")


def _single_process_group() -> None:
    import torch.distributed as dist

    from bitnet_dist.compat import install_cpu_path
    from bitnet_dist.engines.common import ensure_process_group, init_model_parallel

    if dist.is_initialized() and dist.get_world_size() != 1:
        raise ExportError(f"bitnet-export reads checkpoints in one process; this one is rank {dist.get_rank()} of "
                          f"{dist.get_world_size()}: run it without a launcher")
    install_cpu_path()
    ensure_process_group(torch.device("cpu"))
    init_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)


def build_tp1_model(cfg, vocab_size: int, dtype: torch.dtype = torch.float32):
    """The project's own GPTModel at TP=1 on the CPU (megatron parallel state for one rank is set up here)."""
    from bitnet_dist import model as bm
    from bitnet_dist.presets import ParallelConfig

    _single_process_group()
    tcfg = bm.transformer_config(cfg.model, ParallelConfig(), params_dtype=dtype, bf16=dtype == torch.bfloat16)
    prec = copy.deepcopy(cfg.precision)
    prec.kernels = "torch"
    return bm.build_model(cfg.model, prec, tcfg, vocab_size=vocab_size, seed=cfg.trainer.seed).eval()


def _model_keys(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _read_megatron(checkpoint: Path, cfg, vocab_size: int, dtype: torch.dtype) -> dict:
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    model = build_tp1_model(cfg, vocab_size, dtype)
    template = {"model0": model.sharded_state_dict(prefix="")}
    try:
        loaded = dist_checkpointing.load(template, str(checkpoint / "megatron"))
        model.load_state_dict(loaded["model0"])
    except (Exception, CheckpointException) as e:
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        if "Global shape mismatch" in str(e):
            detail = str(e)[str(e).index("Global shape mismatch"):].splitlines()[0]
        raise ExportError(f"the megatron checkpoint {checkpoint} does not fit the run config's model "
                          f"({cfg.model.name}: hidden {cfg.model.hidden_size}, {cfg.model.num_layers} layers, "
                          f"vocab {vocab_size}; {type(e).__name__}: {detail[:300]}): pass the config.yaml of the "
                          "run that wrote it (--config)") from None
    return _model_keys(model)


def _merge_tp(shards: list[dict], template) -> dict:
    """Join the TP shards of every parameter into the TP=1 tensor (the inverse of megatron's strided split:
    the full tensor cut along ``partition_dim`` into tp * stride chunks, rank r holding chunks r, r + tp, ...)."""
    tp = len(shards)
    params = dict(template.named_parameters())
    out = {}
    for key in shards[0]:
        if key.endswith("_extra_state"):
            continue
        p = params.get(key)
        parts = [s[key] for s in shards]
        if tp == 1 or p is None or not getattr(p, "tensor_model_parallel", False):
            out[key] = parts[0]
            continue
        dim, stride = p.partition_dim, getattr(p, "partition_stride", 1)
        chunks = [torch.chunk(t, stride, dim=dim) for t in parts]
        out[key] = torch.cat([chunks[r][j] for j in range(stride) for r in range(tp)], dim=dim)
    return out


def _read_deepspeed(checkpoint: Path, cfg, vocab_size: int, dtype: torch.dtype) -> dict:
    layout = json.loads((checkpoint / "deepspeed_layout.json").read_text())
    tp, stage = int(layout.get("tensor", 1)), int(layout.get("zero_stage", 0))
    model = build_tp1_model(cfg, vocab_size, dtype)
    state = checkpoint / "state"
    if stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="state")
        sd = {k: v.to(dtype) for k, v in sd.items()}
    else:
        shards = []
        for r in range(tp):
            f = state / f"mp_rank_{r:02d}_model_states.pt"
            if not f.is_file():
                raise ExportError(f"{f} is missing: the DeepSpeed checkpoint {checkpoint} (tensor={tp}) is incomplete")
            shards.append(torch.load(f, map_location="cpu", weights_only=False)["module"])
        sd = _merge_tp(shards, model)
    try:
        model.load_state_dict(sd, strict=False)
        missing = [k for k in _model_keys(model) if k not in sd]
        if missing:
            raise RuntimeError(f"missing keys {missing[:4]}")
    except RuntimeError as e:
        raise ExportError(f"the DeepSpeed checkpoint {checkpoint} does not fit the run config's model "
                          f"({cfg.model.name}: hidden {cfg.model.hidden_size}, {cfg.model.num_layers} layers, "
                          f"vocab {vocab_size}; {str(e)[:300]}): pass the config.yaml of the run that wrote it "
                          "(--config)") from None
    return _model_keys(model)


def _training_dtype(checkpoint: Path, engine: str, cfg) -> torch.dtype:
    if engine == "megatron":
        layout = json.loads((checkpoint / "megatron_layout.json").read_text())
        return torch.bfloat16 if "bfloat16" in str(layout.get("dtype", "")) else torch.float32
    # DeepSpeed: trainer.dtype auto is bf16 on CUDA and fp32 on CPU; the stored module says which
    t = cfg.trainer.dtype
    if t in ("bf16", "fp32"):
        return torch.bfloat16 if t == "bf16" else torch.float32
    f = checkpoint / "state" / "mp_rank_00_model_states.pt"
    if f.is_file():
        mod = torch.load(f, map_location="cpu", weights_only=False).get("module") or {}
        for v in mod.values():
            if torch.is_tensor(v) and v.is_floating_point() and v.numel():
                return v.dtype
    return torch.float32


def load_run(checkpoint, config=None) -> LoadedRun:
    """The checkpoint (``RUN_DIR/checkpoints/step_*``) and its run config, read into a TP=1 state dict."""
    from bitnet_dist.engines.common import load_trainer_state

    checkpoint = Path(checkpoint).resolve()
    _verify(checkpoint)
    cfg_path = find_config(checkpoint, config)
    cfg = load_config(cfg_path)
    run_dir = cfg_path.parent
    engine = _engine_of(checkpoint)
    tok = run_tokenizer(cfg, run_dir)
    vocab = padded_vocab_size(tok.vocab_size)
    dtype = _training_dtype(checkpoint, engine, cfg)
    reader = _read_megatron if engine == "megatron" else _read_deepspeed
    sd = reader(checkpoint, cfg, tok.vocab_size, dtype)
    emb = sd.get("embedding.word_embeddings.weight")
    if emb is not None and emb.shape[0] != vocab:
        raise ExportError(f"checkpoint {checkpoint} has {emb.shape[0]} embedding rows; the run's tokenizer "
                          f"({tok.vocab_size} ids) pads to {vocab}: pass the run's own config")
    state = load_trainer_state(checkpoint)
    return LoadedRun(cfg=cfg, run_dir=run_dir, checkpoint=checkpoint, engine=engine, trainer_state=state,
                     tokenizer=tok, state_dict=sd, dtype=dtype)


class HostModel(torch.nn.Module):
    """The TP=1 model on the CPU, on any machine: its forward runs inside ``compat.host_device`` (on a CUDA machine
    megatron's RoPE would otherwise move its angle table to the GPU). Called like the model it holds."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        with host_device():
            return self.model(*args, **kwargs)


def load_project_model(run: LoadedRun, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The project's own GPTModel (TP=1) holding the checkpoint's weights, at the last step's act bits, on ``device``
    (cpu: wrapped in ``HostModel``, which keeps it there on a CUDA machine too; cuda[:N]: moved there)."""
    from bitnet_dist.layers import set_act_bits

    model = build_tp1_model(run.cfg, run.vocab_size, dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in run.state_dict.items()}, strict=False)
    if run.cfg.precision.quantize:
        set_act_bits(model, run.act_bits)
    if torch.device(device).type == "cpu":
        return HostModel(model).eval()
    return model.to(device).eval()
