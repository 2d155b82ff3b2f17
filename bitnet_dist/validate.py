"""Checks of the whole train config, imported by the entry points. Every check runs before any process
group or GPU work and raises ConfigError naming the key, the value, and what would work. The model /
parallel-layout rules live next to the presets (bitnet_dist.presets.check_model), the data rules in the
data pipeline (bitnet_dist.data.check_data_config); this module runs them all."""
from __future__ import annotations

from typing import Any

from bitnet_dist.config import conf_options
from bitnet_dist.data import check_data_config
from bitnet_dist.engines import resolve_engine_name
from bitnet_dist.errors import ConfigError
from bitnet_dist.fusions import check_fusions
from bitnet_dist.presets import check_model
from bitnet_dist.recompute import check_recompute

# -- the whole train config -------------------------------------------------------------------------------

ENGINES = ("auto", "megatron", "deepspeed")
SCHEDULES = ("two_stage", "cosine", "constant")
OPTIMIZERS = ("adamw",)
WANDB_MODES = ("offline", "online", "disabled")
DTYPES = ("auto", "bf16", "fp32")


def _positive_int(key: str, v: Any, allow_zero: bool = False) -> None:
    ok = isinstance(v, int) and not isinstance(v, bool) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        raise ConfigError(key, v, "a non-negative integer" if allow_zero else "a positive integer")


def check_batch(trainer, dp_size: int) -> int:
    """global = micro * dp * accumulation; returns the micro-batches per rank per optimizer step."""
    _positive_int("trainer.micro_batch_size", trainer.micro_batch_size)
    _positive_int("trainer.global_batch_size", trainer.global_batch_size)
    mbs, gbs = trainer.micro_batch_size, trainer.global_batch_size
    if gbs % (mbs * dp_size):
        ok = [g for g in range(mbs * dp_size, 8 * mbs * dp_size + 1, mbs * dp_size)][:4]
        raise ConfigError("trainer.global_batch_size", gbs,
                          f"a multiple of micro_batch_size * data_parallel = {mbs} * {dp_size} = {mbs * dp_size}, "
                          f"e.g. {ok} (or change trainer.micro_batch_size / the number of processes)")
    return gbs // (mbs * dp_size)


def check_train(cfg, world_size: int, engine_name: str | None = None) -> None:
    """Every check of a TrainConfig (bitnet_dist.config) that can be made before process groups exist.

    ``world_size``: processes in the job (bitnet_dist.distributed.parse_launch_env().world_size);
    ``engine_name``: "megatron" or "deepspeed" (default: engine.name resolved as make_engine does,
    auto = megatron on CUDA). Raises ConfigError on the first problem.
    """
    t, o, par, eng = cfg.trainer, cfg.optim, cfg.parallel, cfg.engine
    world = world_size
    check_finite(cfg)

    if eng.name not in ENGINES:
        raise ConfigError("engine", eng.name, f"one of {list(ENGINES)}")
    if o.schedule not in SCHEDULES:
        raise ConfigError("optim.schedule", o.schedule, f"one of {list(SCHEDULES)}")
    if o.name not in OPTIMIZERS:
        raise ConfigError("optim.name", o.name, f"one of {list(OPTIMIZERS)}")
    if cfg.logging.wandb not in WANDB_MODES:
        raise ConfigError("logging.wandb", cfg.logging.wandb, f"one of {list(WANDB_MODES)}")
    if t.dtype not in DTYPES:
        raise ConfigError("trainer.dtype", t.dtype, f"one of {list(DTYPES)}")

    for key in ("max_steps", "seq_length", "log_interval", "eval_interval", "eval_batches", "save_interval",
                "keep_checkpoints", "max_skipped_steps"):
        _positive_int(f"trainer.{key}", getattr(t, key))
    _positive_int("trainer.stats_interval", t.stats_interval, allow_zero=True)
    _positive_int("trainer.profile_step", getattr(t, "profile_step", 0), allow_zero=True)
    _positive_int("trainer.stats_micro_batches", t.stats_micro_batches, allow_zero=True)
    _positive_int("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    check_recompute(t, cfg.model, cfg.parallel.pipeline)
    check_fusions(t, o)
    if t.exit_after_steps is not None:
        _positive_int("trainer.exit_after_steps", t.exit_after_steps)
        if not getattr(t, "checkpoints", True):
            raise ConfigError("trainer.exit_after_steps", t.exit_after_steps,
                              "null with trainer.checkpoints=false (a chunk that saves nothing cannot be resumed), "
                              "or set trainer.checkpoints=true")
    if t.wall_clock_minutes is not None and not t.wall_clock_minutes > 0:
        raise ConfigError("trainer.wall_clock_minutes", t.wall_clock_minutes, "a positive number of minutes or null")
    if t.seq_length > cfg.model.max_sequence_length:
        raise ConfigError("trainer.seq_length", t.seq_length,
                          f"at most model.max_sequence_length={cfg.model.max_sequence_length} (or raise that)")
    if not o.lr > 0 or o.min_lr < 0 or o.min_lr > o.lr:
        raise ConfigError("optim.lr / optim.min_lr", (o.lr, o.min_lr), "0 <= min_lr <= lr and lr > 0")
    if o.schedule == "two_stage":
        if not o.min_lr <= o.lr_stage2:
            raise ConfigError("optim.lr_stage2", o.lr_stage2, f"at least optim.min_lr={o.min_lr}")
        if o.warmup_steps >= t.max_steps // 2:
            raise ConfigError("optim.warmup_steps", o.warmup_steps,
                              f"fewer than half of trainer.max_steps={t.max_steps} (the two-stage schedule "
                              f"drops at the midpoint), e.g. {max(0, t.max_steps // 10)}")
    elif o.warmup_steps >= t.max_steps:
        raise ConfigError("optim.warmup_steps", o.warmup_steps, f"fewer than trainer.max_steps={t.max_steps}")
    if o.clip_grad < 0:
        raise ConfigError("optim.clip_grad", o.clip_grad, "a non-negative max norm (0 = no clipping)")

    check_model(cfg.model, cfg.precision, par)
    check_data_config(cfg)  # the data pipeline's own rules (names, tokenizer, files)

    # engine / parallel combinations
    if engine_name is None:
        engine_name = resolve_engine_name(eng.name)
    name = engine_name
    tp, pp = par.tensor, par.pipeline
    if par.zero_stage not in (0, 1, 2, 3):
        raise ConfigError("parallel.zero_stage", par.zero_stage, "0, 1, 2 or 3")
    if name == "deepspeed":
        if getattr(eng, "cuda_graph", False):
            raise ConfigError("engine.cuda_graph", True,
                              "false with engine=deepspeed (the full-step CUDA graph is megatron-core's; use "
                              "engine=megatron)")
        if pp > 1 or par.virtual_pipeline is not None:
            raise ConfigError("parallel.pipeline", pp,
                              "1 with engine=deepspeed (pipeline parallel needs engine=megatron)")
        if par.sequence:
            raise ConfigError("parallel.sequence", True, "false with engine=deepspeed (sequence parallel needs engine=megatron)")
        if par.zero_stage == 3 and tp > 1:
            raise ConfigError("parallel.zero_stage", 3,
                              "0, 1 or 2 with parallel.tensor > 1 (ZeRO-3 shards the TP-partitioned parameters "
                              "again; use parallel.tensor=1 with ZeRO-3)")
        if par.offload_params and par.zero_stage != 3:
            raise ConfigError("parallel.offload_params", True, "false unless parallel.zero_stage=3")
        if par.offload_optimizer and par.zero_stage == 0:
            raise ConfigError("parallel.offload_optimizer", True, "false unless parallel.zero_stage >= 1")
    else:  # megatron
        if par.zero_stage:
            raise ConfigError("parallel.zero_stage", par.zero_stage,
                              "0 with engine=megatron (it shards the optimizer with parallel.distributed_optimizer; "
                              "ZeRO stages need engine=deepspeed)")
        if par.offload_optimizer or par.offload_params:
            raise ConfigError("parallel.offload_optimizer/offload_params", True, "false with engine=megatron")

    # process layout and batch arithmetic
    if world % (tp * pp):
        raise ConfigError("parallel.tensor * parallel.pipeline", tp * pp,
                          f"a divisor of the number of processes ({world}); launch a multiple of {tp * pp} processes")
    check_batch(t, world // (tp * pp))


def check_finite(cfg, prefix: str = "") -> None:
    """Every float setting (at any depth of the config dataclasses, and inside list / dict values) is finite:
    ``optim.lr=inf`` would train on NaN weights from the first step."""
    import dataclasses
    import math

    def walk(key: str, v: Any) -> None:
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(key, v, "a finite number")
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            for f in dataclasses.fields(v):
                walk(f"{key}.{f.name}" if key else f.name, getattr(v, f.name))
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(f"{key}.{k}", x)
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(f"{key}[{i}]", x)

    walk(prefix, cfg)


CONFIG_GROUPS = ("model", "precision", "parallel", "engine", "data", "optim", "logging", "experiment")


def check_group_choices(overrides, options=None) -> None:
    """``group=option`` command-line overrides name existing options (conf/<group>/<option>.yaml).

    Checked before Hydra composes, so ``model=huge`` gets the same one-line ConfigError as every other
    bad setting, listing the choices. Sweeps (``precision=v2_a8,bf16``) check each option; Hydra's
    sweep functions (``choice(...)``, ``glob(...)``) are left to Hydra. ``options(group)`` lists a
    group's options (default: the configs shipped in the package, bitnet_dist.config.conf_options).
    """
    options = options or conf_options
    for arg in overrides:
        key, sep, value = str(arg).partition("=")
        if not sep or key not in CONFIG_GROUPS or "(" in value or value in ("null", ""):
            continue
        choices = options(key)
        for option in value.split(","):
            if option.strip() not in choices:
                raise ConfigError(key, option.strip(), f"one of {choices} (the files in conf/{key}/)")
