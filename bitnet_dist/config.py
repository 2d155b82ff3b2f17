"""Typed configuration of the train app (Hydra structured configs).

The dotted keys here are the operators' contract (README): trainer.*, parallel.*, engine, precision,
model, data, logging.wandb, run_dir. ``register_configs()`` puts the schema into Hydra's ConfigStore
as ``train_schema``; conf/train.yaml extends it, so every YAML value and command-line override is
type-checked against these dataclasses. Semantic checks of the whole config live in
bitnet_dist.validate (``check_train``), the one place that rejects impossible settings.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from bitnet_dist.presets import MODEL_PRESETS, PRECISION_PRESETS, ModelConfig, ParallelConfig, PrecisionConfig

# The Hydra configs ship as package data (the repository's conf/ folder installs as bitnet_dist.conf), so
# they are found through the package in a source checkout and in an installed wheel alike.
CONF_PACKAGE = "bitnet_dist.conf"
CONF_SEARCH_PATH = f"pkg://{CONF_PACKAGE}"


def conf_options(group: str) -> list[str]:
    """The options of a config group: the stems of ``conf/<group>/*.yaml`` inside the installed package."""
    folder = resources.files(CONF_PACKAGE) / group
    if not folder.is_dir():
        return []
    return sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".yaml") and f.is_file())


def conf_file(*parts: str):
    """A file of the shipped configs, e.g. ``conf_file("experiment", "smoke.yaml")`` (a Traversable)."""
    node = resources.files(CONF_PACKAGE)
    for part in parts:
        node = node / part
    return node


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
    # micro-batches of the step that the statistics probe's forward pass reads (the first N; 0 = all of them)
    stats_micro_batches: int = 1
    progress_bar: bool = True
    wall_clock_minutes: Optional[float] = None  # save and exit cleanly after this long (clusters that send no signal)
    # Save and exit 0 after this many optimizer steps *in this process* (as on preemption); a later
    # launch with the same overrides resumes. For chunked jobs and for the resume-exactness test.
    exit_after_steps: Optional[int] = None
    report: bool = True  # write run_dir/report.md and the loss / perplexity PNG at the end
    # activation recomputation (bitnet_dist.recompute): none | selective (the submodules in recompute_modules:
    # mlp, core_attn) | full (whole layers, recompute_num_layers per unit); megatron-core's, in both engines
    recompute: str = "none"
    recompute_modules: list = field(default_factory=lambda: ["mlp"])
    recompute_num_layers: int = 1
    # the fused element-wise paths (bitnet_dist.fusions): auto (on with CUDA, off on CPU) | true | false.
    # fused_rope: megatron's RoPE fusion, one kernel each way; fused_cross_entropy: the loss from the bf16 logits in
    # one compiled kernel each way at tensor parallel 1 (no fp32 logits in memory); docs/training.md
    fused_rope: str = "auto"
    fused_cross_entropy: str = "auto"
    # profile optimizer step N (1-based; 0 = none) with torch.profiler: run_dir/profile_step_N.json, the step's kernel
    # time by category (bitnet_dist.profile); that step is left out of tokens_per_s
    profile_step: int = 0
    # false: write no checkpoint at all, the final one included (benchmarks, throwaway runs; such a run cannot resume)
    checkpoints: bool = True
    # this many optimizer steps in a row with a non-finite loss or gradient norm (each skipped) stop the run
    # with an error (docs/failures.md)
    max_skipped_steps: int = 5


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
    # engine=megatron: torch's fused AdamW in place of the multi-tensor one megatron-core uses without Transformer
    # Engine / Apex; auto (on with CUDA) | true | false (bitnet_dist.fusions)
    fused: str = "auto"


@dataclass
class EngineConfig:
    name: str = "auto"  # auto: megatron on CUDA, deepspeed otherwise | megatron | deepspeed
    overlap_grad_reduce: bool = True  # megatron DDP
    overlap_param_gather: bool = False  # megatron distributed optimizer
    grad_reduce_in_fp32: bool = True
    # megatron on CUDA: replay each training step's forward + backward (all micro-batches) as one CUDA graph,
    # captured after cuda_graph_warmup eager steps (megatron-core's FullCudaGraphWrapper; docs/training.md)
    cuda_graph: bool = False
    cuda_graph_warmup: int = 2
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


# Overrides that do not change what a run computes: two launches differing only in these share a run
# directory (a requeued job, a resubmission with a longer time limit, a different log cadence).
# conf/train.yaml repeats this list in hydra.job.config.override_dirname.exclude_keys; a test keeps
# the two equal.
RUN_INVARIANT_KEYS: tuple[str, ...] = (
    "experiment", "run_dir",
    "trainer.log_interval", "trainer.eval_interval", "trainer.eval_batches", "trainer.save_interval",
    "trainer.keep_checkpoints", "trainer.stats_interval", "trainer.stats_micro_batches", "trainer.progress_bar",
    "trainer.wall_clock_minutes", "trainer.exit_after_steps", "trainer.report", "trainer.max_skipped_steps",
    "logging", "logging.wandb", "logging.project", "logging.entity", "logging.run_name",
    "data.cache_dir", "data.num_workers",
)


def run_name(override_dirname: str | None = None) -> str:
    """Directory name of a run from Hydra's ``override_dirname`` (already without run-invariant keys).

    None: read it from the running Hydra job (``hydra.job.override_dirname``; "" outside a Hydra job,
    e.g. a bare ``compose()``). ``""`` (no overrides) -> ``"base"``; characters that would nest
    directories or confuse shells are replaced, so ``data.paths=[a/b]`` stays one path component.
    """
    if override_dirname is None:
        from hydra.core.hydra_config import HydraConfig  # deferred: Hydra is loaded only inside a Hydra job

        override_dirname = HydraConfig.get().job.override_dirname if HydraConfig.initialized() else ""
    if not override_dirname:
        return "base"
    return re.sub(r"[^A-Za-z0-9_.,=+\-]", "_", override_dirname)


def unknown_keys(cfg, schema=None, prefix: str = "") -> list[str]:
    """Dotted keys of a composed config that are not fields of the typed schema (TrainConfig and its nested
    dataclasses). Hydra's ``+key=value`` adds a key even to a structured config, and OmegaConf.to_object
    keeps it as a stray attribute that nothing reads: ``+trainer.max_step=30`` would be ignored in silence.
    Free-form dict fields (engine.ds_config_overrides) are not looked into."""
    import dataclasses

    from omegaconf import DictConfig

    schema = TrainConfig if schema is None else schema
    fields = {f.name: f for f in dataclasses.fields(schema)}
    out = []
    for key in cfg.keys():
        dotted = f"{prefix}{key}"
        if key not in fields:
            out.append(dotted)
            continue
        sub = cfg._get_node(key)
        nested = fields[key].default_factory
        if isinstance(sub, DictConfig) and nested is not dataclasses.MISSING and dataclasses.is_dataclass(nested):
            out += unknown_keys(sub, nested, dotted + ".")
    return out


def check_known_keys(cfg) -> None:
    """ConfigError naming the first key outside the schema, with the nearest real keys as the fix."""
    import dataclasses
    import difflib

    from bitnet_dist.errors import ConfigError

    bad = unknown_keys(cfg)
    if not bad:
        return

    def all_keys(schema, prefix=""):
        for f in dataclasses.fields(schema):
            fac = f.default_factory
            if fac is not dataclasses.MISSING and dataclasses.is_dataclass(fac):
                yield from all_keys(fac, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    known = list(all_keys(TrainConfig))
    key = bad[0]
    near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    value = cfg
    for part in key.split("."):
        value = value.get(part) if hasattr(value, "get") else None
    raise ConfigError(key, value, f"not a setting of the train app ({hint}the keys are the fields of "
                      "bitnet_dist.config.TrainConfig; a '+' does not add settings)"
                      + (f"; also unknown: {', '.join(bad[1:])}" if len(bad) > 1 else ""))


def cfg_from_omegaconf(cfg) -> TrainConfig:
    """A composed DictConfig (train_schema) -> TrainConfig dataclass instance. Raises ConfigError for a key
    outside the schema (``check_known_keys``)."""
    check_known_keys(cfg)
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, TrainConfig):  # composed without the schema (should not happen)
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg))
    return obj


_registered = False


def register_configs() -> None:
    """Register ``train_schema`` in Hydra's ConfigStore and the ``bitnet_run_name`` resolver (idempotent)."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore  # deferred: Hydra is loaded only by the train app

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("bitnet_run_name"):
        OmegaConf.register_new_resolver("bitnet_run_name", run_name)
    _registered = True


def write_preset_yamls(conf_dir) -> list:
    """(Re)write conf/model/*.yaml and conf/precision/*.yaml from bitnet_dist.presets, the source of
    truth (tests/config/test_config.py fails when they drift). ``python -m bitnet_dist.config CONF_DIR``."""
    def value(v):
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return repr(v) if "e" not in repr(v) or "." in repr(v) else repr(v).replace("e", ".0e")
        return str(v)

    written = []
    for group, presets, origin in (("model", MODEL_PRESETS, "MODEL_PRESETS"),
                                   ("precision", PRECISION_PRESETS, "PRECISION_PRESETS")):
        d = Path(conf_dir) / group
        d.mkdir(parents=True, exist_ok=True)
        for name, preset in presets.items():
            lines = [f"# {group.capitalize()} preset {name!r}: generated from bitnet_dist.presets.{origin} by "
                     "`python -m bitnet_dist.config conf`; tests/config/test_config.py keeps them equal."]
            lines += [f"{k}: {value(v)}" for k, v in asdict(preset).items()]
            (d / f"{name}.yaml").write_text("\n".join(lines) + "\n")
            written.append(d / f"{name}.yaml")
    return written


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m bitnet_dist.config CONF_DIR   (the repository's conf/ folder)")
    for p in write_preset_yamls(sys.argv[1]):
        print(p)
