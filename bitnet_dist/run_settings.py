"""The settings that define a run's computation, recorded in every checkpoint and compared on resume.

A checkpoint holds ``settings.json`` (``computation_settings``). Before a resume touches anything in the
run directory, ``check_resume`` compares the newest checkpoint's record with this launch's settings and
refuses with one line per differing key (old value, new value) and how to start a new run instead. What
may change on resume, and what may not, is listed in docs/failures.md:

* refused: every model.* and precision.* key, the resolved compute dtype, trainer.seq_length,
  trainer.global_batch_size, trainer.seed, the data (data.name, tokenizer, vocab_size, paths,
  valid_paths, valid_fraction), the engine, and for engine=deepspeed the layout DeepSpeed cannot
  reshard (parallel.tensor, parallel.zero_stage, number of processes); trainer.max_steps unless nothing
  in the schedule depends on it (optim.schedule=constant and no act-bits switch).
* allowed and reported (one note each): optim.* and engine.ds_config_overrides (an operator lowering the
  learning rate after a spike), precision.kernels (the same computation by another implementation).
* allowed silently: intervals, logging, checkpoint retention, exit_after_steps, wall-clock limits,
  trainer.micro_batch_size (the same gradient, summed in another order), trainer.recompute and the fusions
  (trainer.fused_rope / fused_cross_entropy: the same computation up to rounding), data.cache_dir / num_workers,
  and with engine=megatron the parallel layout (dist_checkpointing reshards).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Optional

from bitnet_dist.errors import ConfigError

SETTINGS_FILE = "settings.json"

_DATA_KEYS = ("name", "tokenizer", "vocab_size", "paths", "valid_paths", "valid_fraction")


def _flat(prefix: str, obj: Any) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in dataclasses.asdict(obj).items()}


def resolved_dtype(dtype: str, cuda: Optional[bool] = None) -> str:
    if dtype != "auto":
        return dtype
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    return "bf16" if cuda else "fp32"


def computation_settings(cfg, world_size: int, engine_name: str, cuda: Optional[bool] = None) -> dict[str, Any]:
    """Flat {dotted key: value} of everything that must not change within a run (module docstring), plus
    the reported ``optim.*`` keys and trainer.max_steps (whose rule depends on the schedule)."""
    t = cfg.trainer
    out: dict[str, Any] = {}
    out.update(_flat("model", cfg.model))
    out.update(_flat("precision", cfg.precision))
    out["trainer.dtype"] = resolved_dtype(t.dtype, cuda)
    out["trainer.seq_length"] = t.seq_length
    out["trainer.global_batch_size"] = t.global_batch_size
    out["trainer.seed"] = t.seed
    out["trainer.max_steps"] = t.max_steps
    for k in _DATA_KEYS:
        out[f"data.{k}"] = getattr(cfg.data, k)
    out["engine"] = engine_name
    if engine_name == "deepspeed":
        out["parallel.tensor"] = cfg.parallel.tensor
        out["parallel.zero_stage"] = cfg.parallel.zero_stage
        out["number of processes"] = world_size
    out.update(_flat("optim", cfg.optim))
    out["engine.ds_config_overrides"] = dict(cfg.engine.ds_config_overrides or {})
    return json.loads(json.dumps(out, default=str))  # the values as a JSON round trip gives them back


REPORTED_PREFIXES = ("optim.", "engine.ds_config_overrides", "precision.kernels")


def max_steps_free(settings: dict[str, Any]) -> bool:
    """Nothing in the schedule depends on max_steps: a constant lr schedule and no act-bits switch."""
    return settings.get("optim.schedule") == "constant" and settings.get("precision.final_act_bits") is None


def compare(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """(refused, reported) differences [(key, old, new)] between a checkpoint's record and this launch."""
    refused, reported = [], []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<not recorded>"), new.get(key, "<not recorded>")
        if a == b or (key not in old):  # a key a newer version records: nothing to compare against
            continue
        if key.startswith(REPORTED_PREFIXES):
            reported.append((key, a, b))
        elif key == "trainer.max_steps" and max_steps_free(old) and max_steps_free(new):
            continue
        else:
            refused.append((key, a, b))
    return refused, reported


class ResumeMismatchError(ConfigError):
    """This launch's settings define another computation than the run directory's checkpoints."""

    def __init__(self, run_dir: Path, ckpt: Path, diffs: list[tuple[str, Any, Any]]):
        key, old, new = diffs[0]
        lines = "\n".join(f"  {k}: checkpoint {a!r}, now {b!r}" + _why(k) for k, a, b in diffs)
        fix = (f"the checkpoints in {run_dir} ({ckpt.name}) were written with other settings that define the "
               f"computation; resuming would mix two runs:\n{lines}\n"
               f"Resume with the checkpoint's values (drop these overrides), or start a new run in another "
               f"directory (run_dir=...; the default run directory is named after the overrides).")
        super().__init__(key, new, fix)
        self.diffs = diffs


def _why(key: str) -> str:
    if key == "trainer.max_steps":
        return " (the lr / weight-decay / act-bits schedule is a function of it)"
    if key in ("parallel.tensor", "parallel.zero_stage", "number of processes"):
        return " (DeepSpeed checkpoints load only in the layout that wrote them; engine=megatron reshards)"
    return ""


def newest_record(run_dir: Path) -> tuple[Optional[Path], Optional[dict]]:
    """The newest checkpoint that records its settings, and those settings (None, None: no checkpoint with a
    manifest; (newest, None): checkpoints that record none). Read-only; a settings file counts only when it
    matches its manifest's SHA-256."""
    from bitnet_dist.checkpoint import CheckpointManager, read_manifest, sha256_file

    newest = None
    for _, p in reversed(CheckpointManager(run_dir).steps()):
        m = read_manifest(p)
        if not m:
            continue
        newest = newest or p
        meta = (m.get("files") or {}).get(SETTINGS_FILE) if isinstance(m.get("files"), dict) else None
        f = p / SETTINGS_FILE
        if meta is None or not f.is_file() or sha256_file(f) != meta.get("sha256"):
            continue
        try:
            return p, json.loads(f.read_text())
        except ValueError:
            continue
    return newest, None


def check_resume(cfg, world_size: int, engine_name: str, cuda: Optional[bool] = None) -> Optional[Path]:
    """Compare this launch with the run directory's newest checkpoint (every rank; reads files only).
    Raises ResumeMismatchError; prints one note per reported (allowed) change. Returns the checkpoint
    compared against (None: nothing to resume)."""
    import os

    run_dir = Path(cfg.run_dir)
    talk = os.environ.get("RANK", "0") == "0"  # every rank compares; rank 0 prints the notes
    ckpt, old = newest_record(run_dir)
    if ckpt is None:
        return None
    if old is None:
        if talk:
            print(f"[bitnet-train] note: {ckpt} records no settings (written by an older version); this launch's "
                  "settings are not compared with it", file=sys.stderr, flush=True)
        return ckpt
    new = computation_settings(cfg, world_size, engine_name, cuda)
    refused, reported = compare(old, new)
    if refused:
        raise ResumeMismatchError(run_dir, ckpt, refused)
    for k, a, b in reported if talk else ():
        print(f"[bitnet-train] note: {k} changed since {ckpt.name} ({a!r} -> {b!r}); the run continues with the "
              "new value", file=sys.stderr, flush=True)
    return ckpt
