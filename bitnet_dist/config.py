"""Typed configuration of the train app (Hydra structured configs).

The dotted keys here are the operators' contract (README): trainer.*, parallel.*, engine, precision,
model, data, logging.wandb, run_dir. Validation of the whole config lives in bitnet_dist.validate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from bitnet_dist.presets import ModelConfig, ParallelConfig, PrecisionConfig


@dataclass
class TrainerConfig:
    max_steps: int = 200
    seq_length: int = 256
    micro_batch_size: int = 8
    global_batch_size: int = 32  # sequences per optimizer step over all data-parallel ranks
    log_interval: int = 10
    eval_interval: int = 50
    eval_batches: int = 8  # micro-batches per evaluation (per data-parallel rank)
    save_interval: int = 100
    keep_checkpoints: int = 3
    seed: int = 1234
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU | bf16 | fp32
    stats_interval: int = 50  # activation / weight statistics every N steps (0 = off)
    progress_bar: bool = True
    wall_clock_minutes: Optional[float] = None  # save and exit cleanly after this long (clusters that send no signal)


@dataclass
class OptimConfig:
    name: str = "adamw"
    schedule: str = "two_stage"  # two_stage (BitNet b1.58 / v2 recipe) | cosine | constant
    lr: float = 1.8e-3  # peak P1
    lr_stage2: float = 1.2e-3  # peak P2 of the second stage (two_stage only)
    min_lr: float = 0.0
    warmup_steps: int = 375
    weight_decay: float = 0.1  # first stage; the second stage uses weight_decay_stage2
    weight_decay_stage2: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class EngineConfig:
    name: str = "auto"  # auto: megatron on CUDA, deepspeed otherwise | megatron | deepspeed
    overlap_grad_reduce: bool = True  # megatron DDP
    overlap_param_gather: bool = False  # megatron distributed optimizer
    grad_reduce_in_fp32: bool = True
    ds_config_overrides: dict = field(default_factory=dict)  # merged into the generated DeepSpeed JSON


@dataclass
class DataConfig:
    name: str = "brown"  # brown | indexed | synthetic
    tokenizer: str = "bpe"  # bpe (trained locally, saved with the run) | gpt2
    vocab_size: int = 8192  # for the locally trained BPE
    paths: list = field(default_factory=list)  # indexed datasets: [weight, prefix, weight, prefix, ...] or [prefix]
    valid_paths: list = field(default_factory=list)
    valid_fraction: float = 0.05  # brown: fraction of documents held out for validation
    cache_dir: Optional[str] = None  # default: $BITNET_CACHE or ~/.cache/bitnet_dist
    num_workers: int = 0


@dataclass
class LoggingConfig:
    wandb: str = "offline"  # offline | online | disabled
    project: str = "bitnet-dist"
    entity: Optional[str] = None
    run_name: Optional[str] = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    experiment: str = "default"
    run_dir: str = "runs/default"
