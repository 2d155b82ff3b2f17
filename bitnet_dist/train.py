"""The train app: ``python -m bitnet_dist.train [group=option ...] [key=value ...]`` (or ``bitnet-train``).

Orchestration only. The order is fixed: validate the whole config (before any process-group work) ->
init_distributed -> make_engine(cfg) -> engine.init_parallel() -> build_data -> engine.build(vocab) ->
resume from the newest complete checkpoint in run_dir -> the loop -> final evaluation, checkpoint and
report. Everything numeric lives elsewhere: schedules (bitnet_dist.schedule), the model and optimizer
(the engine), batches (bitnet_dist.data), records (bitnet_dist.telemetry), checkpoint directories
(bitnet_dist.checkpoint), stop signals (bitnet_dist.preemption).

Step convention: ``step`` counts completed optimizer steps. Optimizer step ``s`` (0-based) runs with
the schedule's values at ``s``; its metrics are logged as step ``s + 1``; ``step_{k:08d}`` holds the
state after k steps, and a resumed run continues with step index k, so its losses are the ones an
uninterrupted run computes (bitwise on CPU fp32: the data position, RNG states, optimizer, act_bits
and schedule step all come back).
"""
from __future__ import annotations

import errno
import json
import math
import multiprocessing as mp
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from bitnet_dist.compat import filter_backend_warnings

# before the imports below bring in megatron-core, whose modules warn at import time that Transformer Engine and
# apex are absent (bitnet_dist.compat): the CLI starts without those warnings
filter_backend_warnings()

from bitnet_dist import schedule  # noqa: E402
from bitnet_dist.checkpoint import CheckpointError, CheckpointManager, DiskSpaceError, RunDirLock, _broadcast  # noqa: E402
from bitnet_dist.config import CONF_SEARCH_PATH, TrainConfig, cfg_from_omegaconf, register_configs  # noqa: E402
from bitnet_dist.data import build_data  # noqa: E402
from bitnet_dist.data.errors import DataError  # noqa: E402
from bitnet_dist.distributed import LaunchEnvError, destroy_distributed, init_distributed, parse_launch_env  # noqa: E402
from bitnet_dist.engines import make_engine, resolve_engine_name  # noqa: E402
from bitnet_dist.engines.common import resolve_dtype  # noqa: E402
from bitnet_dist.engines.guard import DivergenceError, SkipCounter, fmt_value, nonfinite_fields, state_finite  # noqa: E402
from bitnet_dist.errors import ConfigError  # noqa: E402
from bitnet_dist.layers import kernel_path  # noqa: E402
from bitnet_dist.preemption import PreemptionGuard  # noqa: E402
from bitnet_dist.profile import profile_step  # noqa: E402
from bitnet_dist.report import write_report  # noqa: E402
from bitnet_dist.run_settings import SETTINGS_FILE, check_resume, computation_settings, max_steps_free  # noqa: E402
from bitnet_dist.telemetry import Telemetry, device_peak_flops, flops_per_token, memory_stats, throughput_metrics  # noqa: E402
from bitnet_dist.validate import check_group_choices, check_train  # noqa: E402

RANK_STATE = "trainer_rank{rank:05d}.pt"  # per-rank data position and RNG states inside a checkpoint


# -- per-rank state ---------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def probe_micro_batches(requested: int, available: int, multiple: int = 1) -> int:
    """Micro-batches the statistics probe reads: trainer.stats_micro_batches (0 = all ``available``), rounded up
    to a multiple of the engine's ``micro_batch_multiple`` (megatron's interleaved schedule: parallel.pipeline;
    the step's own count is one), at most the step's."""
    n = requested or available
    return min(available, -(-n // multiple) * multiple)


class Trainer:
    """One training run in one process (every rank builds one). ``run()`` returns the final val loss."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        t = cfg.trainer
        self.run_dir = Path(cfg.run_dir).resolve()
        self.dist = init_distributed()
        # Before the (possibly long) start-up, so a preemption signal during it is caught, not fatal.
        self.guard = PreemptionGuard(wall_clock_minutes=t.wall_clock_minutes, interrupt=True)
        self.rank = self.dist.rank
        self.world_size = self.dist.world_size
        # One writer per run directory (docs/failures.md): taken before anything is written there.
        self.lock = RunDirLock(self.run_dir)
        self._take_lock()
        try:
            self._build(cfg)
        except BaseException:
            self.close()
            raise

    def _take_lock(self) -> None:

        err = None
        if self.rank == 0:
            try:
                self.lock.acquire()
            except CheckpointError as e:
                err = e
        err = _broadcast(err)
        if err is not None:
            self.guard.close()
            raise err

    def _build(self, cfg: TrainConfig) -> None:

        t = cfg.trainer
        _seed_everything(t.seed)
        self.engine = make_engine(cfg)
        self.engine.init_parallel()
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data = build_data(cfg, self.run_dir, dp_rank=self.engine.dp_rank, dp_size=self.engine.dp_size)
        self.engine.build(self.data.vocab_size)
        self.device = self.engine.device

        # the code the layers run here (Triton kernels or the torch reference), named in the start record, the
        # log and the report; precision.kernels=auto falling back to torch on CUDA warns once with the reason
        self.kernel_path = kernel_path(cfg.precision.kernels, self.device)
        self.telemetry = Telemetry(cfg, self.run_dir, enabled=self.engine.is_logging_rank)
        self.ckpt = CheckpointManager(
            self.run_dir, keep=t.keep_checkpoints,
            required=[*self.engine.checkpoint_files(), *(RANK_STATE.format(rank=r) for r in range(self.world_size))])
        self.skips = SkipCounter(t.max_skipped_steps)
        self.max_steps = t.max_steps
        self.tokens_per_step = t.global_batch_size * t.seq_length
        self.switch_step = schedule.switch_step(cfg.precision, t.max_steps)
        self.flops_per_token = flops_per_token(cfg.model, t.seq_length, self.data.vocab_size)
        self.peak_flops = device_peak_flops(self.device, resolve_dtype(t.dtype, self.device))
        self.step = 0
        self.act_bits = cfg.precision.act_bits
        self.last_saved: Optional[int] = None
        self.last_eval: Optional[tuple[int, float]] = None

    # -- checkpoints --------------------------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "act_bits": self.act_bits, "tokens": self.step * self.tokens_per_step,
                "max_steps": self.max_steps, "seed": self.cfg.trainer.seed, **self.skips.state()}

    def _last_checkpoint(self) -> Optional[str]:
        return str(self.ckpt.path(self.last_saved)) if self.last_saved is not None else None

    def save(self, final: bool = False) -> None:
        """Checkpoint the state after ``self.step`` steps (docs/failures.md for what a failure does).

        Never publishes non-finite state (DivergenceError). A periodic save that does not fit on the disk is
        skipped with a warning and training goes on; a ``final`` one (end of run, stop signal) raises."""

        if self.last_saved == self.step or not self.cfg.trainer.checkpoints:
            return
        if not state_finite(self.engine.state_tensors(), self.device):
            last = self._last_checkpoint()
            raise DivergenceError(
                f"step {self.step}: the model or optimizer state holds NaN or inf; no checkpoint written "
                f"({'the last complete one is ' + last if last else 'there is no earlier checkpoint'}). Lower optim.lr "
                "and relaunch to resume from it")

        def write(tmp: Path) -> None:
            self.engine.save(tmp, self._trainer_state())
            torch.save({"data": self.data.train.state_dict(), "rng": _rng_state()},
                       tmp / RANK_STATE.format(rank=self.rank))
            if self.rank == 0:
                settings = computation_settings(self.cfg, self.world_size, self.engine.name,
                                                cuda=self.device.type == "cuda")
                (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=1, sort_keys=True))

        try:
            path = self.ckpt.save(self.step, write, extra={"finite": True})
        except DiskSpaceError as e:
            if final:
                raise
            last = self._last_checkpoint()
            self.telemetry.event(self.step, "checkpoint_skipped", reason=str(e))
            if self.engine.is_logging_rank:
                print(f"[bitnet-train] WARNING: checkpoint of step {self.step} skipped: {e}. Training goes on; "
                      f"the last checkpoint is {last or 'none yet'}", file=sys.stderr, flush=True)
            return
        self.last_saved = self.step
        self.telemetry.event(self.step, "checkpoint", path=str(path))

    def _load(self, path: Path) -> tuple[dict, dict]:
        state = self.engine.load(path)
        rank_file = path / RANK_STATE.format(rank=self.rank)
        if not rank_file.is_file():
            raise ConfigError("number of processes", self.world_size,
                              f"the layout that wrote {path} ({rank_file.name} is missing there)")
        return state, torch.load(rank_file, map_location="cpu", weights_only=False)

    def _load_newest(self) -> Optional[tuple[Path, dict, dict]]:
        """Load the newest complete checkpoint that loads; a failure falls back to the previous complete one
        with a warning (the ranks agree on each attempt). None: no checkpoint at all."""


        candidates = self.ckpt.complete()
        if not candidates:
            self.ckpt.latest()  # raises CheckpointError when step_* directories exist but none is complete
            return None
        failures = []
        for path in candidates:
            try:
                state, rank_state = self._load(path)
                err = None
            except ConfigError:
                raise
            except Exception as e:
                err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ok = torch.tensor([0 if err else 1], dtype=torch.int32)
            if dist.is_initialized() and dist.get_world_size() > 1:
                ok = ok.to(self.device)
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if int(ok.item()) == 1:
                return path, state, rank_state
            failures.append(f"{path.name}: {err or 'failed on another rank'}")
            print(f"[bitnet-train] WARNING: could not load {path} ({err or 'failed on another rank'}); falling back "
                  "to the previous complete checkpoint", file=sys.stderr, flush=True)
        raise CheckpointError(f"no checkpoint in {self.ckpt.dir} loads: " + "; ".join(failures)
                              + ". Restore a good copy, or move the checkpoints away to start this run from scratch")

    def resume(self) -> None:
        loaded = self._load_newest()
        if loaded is None:
            self.telemetry.truncate_after(0)
            self.telemetry.event(0, "start", unigram_ppl=self.data.unigram_perplexity,
                                 vocab_size=self.data.vocab_size, world_size=self.world_size,
                                 engine=self.engine.name, switch_step=self.switch_step,
                                 kernels=self.kernel_path.name, kernels_reason=self.kernel_path.reason,
                                 fused=self.engine.fused_paths())
            self._log_kernels()
            return
        latest, state, rank_state = loaded
        if state.get("max_steps", self.max_steps) != self.max_steps:

            if not max_steps_free(computation_settings(self.cfg, self.world_size, self.engine.name)):
                raise ConfigError("trainer.max_steps", self.max_steps,
                                  f"{state['max_steps']} as in the checkpoints of {self.run_dir} (the schedule "
                                  "depends on it), or another run_dir")
        self.data.train.load_state_dict(rank_state["data"])
        _set_rng_state(rank_state["rng"])
        self.step = int(state["step"])
        self.act_bits = int(state["act_bits"])
        self.skips.consecutive = int(state.get("skipped_consecutive", 0))
        self.skips.total = int(state.get("skipped_total", 0))
        self.last_saved = self.step
        self.telemetry.truncate_after(self.step)
        self.telemetry.event(self.step, "resume", checkpoint=str(latest), kernels=self.kernel_path.name,
                             kernels_reason=self.kernel_path.reason, fused=self.engine.fused_paths())
        self._log_kernels()
        if self.engine.is_logging_rank:
            print(f"[bitnet-train] resumed from {latest} at step {self.step}", flush=True)

    def _log_kernels(self) -> None:
        if self.engine.is_logging_rank:
            print(f"[bitnet-train] kernels: {self.kernel_path} (precision.kernels={self.cfg.precision.kernels}, "
                  f"device {self.device}); fused: {', '.join(self.engine.fused_paths()) or 'none'}", flush=True)
            p = self.cfg.precision
            if p.fp8_backward and p.quantize and self.kernel_path.name != "triton":
                print("[bitnet-train] note: precision.fp8_backward=true has no effect on the torch path "
                      f"({self.kernel_path.reason}): the backward GEMMs run in "
                      f"{str(resolve_dtype(self.cfg.trainer.dtype, self.device)).replace('torch.', '')}; the FP8 "
                      "backward needs the Triton kernels on CUDA", file=sys.stderr, flush=True)

    # -- evaluation ---------------------------------------------------------------------------------------
    def evaluate(self, suffix: str = "") -> float:
        loss, _ = self.engine.eval_loss(self.data.valid(self.cfg.trainer.eval_batches))
        ppl = math.exp(min(loss, 50.0))
        self.telemetry.log(self.step, {f"val_loss{suffix}": loss, f"val_ppl{suffix}": ppl,
                                       "act_bits": self.act_bits})
        if not suffix:
            self.last_eval = (self.step, loss)
        return loss

    def maybe_switch_act_bits(self) -> None:
        """Apply the act-bits schedule for the next step (``self.step``) when it differs from now.

        Runs at the end of a step, before its checkpoint, so a checkpoint at the switch step already
        holds the new bits and a resume from it neither repeats the switch nor its evaluations.
        """
        if self.step >= self.max_steps:
            return
        bits = schedule.act_bits_at(self.step, self.cfg.precision, self.max_steps)
        if bits != self.act_bits:
            self.switch_act_bits(bits)

    def switch_act_bits(self, bits: int) -> None:
        """The 8 -> 4 transition: evaluate, switch every layer (optimizer state untouched), evaluate."""
        self.evaluate("_before_switch")
        old, self.act_bits = self.act_bits, bits
        self.engine.set_act_bits(bits)
        self.telemetry.event(self.step, "act_bits_switch", from_bits=old, to_bits=bits,
                             tokens=self.step * self.tokens_per_step)
        self.evaluate("_after_switch")

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self) -> Optional[float]:
        cfg, t = self.cfg, self.cfg.trainer
        self.resume()
        self.engine.set_act_bits(self.act_bits)
        self.maybe_switch_act_bits()  # a switch at step 0 (switch_fraction * max_steps < 1)
        if self.step >= self.max_steps:
            if self.engine.is_logging_rank:
                print(f"[bitnet-train] {self.run_dir} is complete ({self.step} steps); writing the report",
                      flush=True)
            self.finish(evaluate=False)
            return None
        steps_here, window_tokens, window_time = 0, 0, 0.0
        self.tokens_per_s = float("nan")
        while self.step < self.max_steps:
            s = self.step
            lr = schedule.lr_at(s, cfg.optim, self.max_steps)
            wd = schedule.weight_decay_at(s, cfg.optim, self.max_steps)
            probe = t.stats_interval and ((s + 1) % t.stats_interval == 0
                                          or (self.switch_step is not None and s in (self.switch_step - 1,
                                                                                     self.switch_step)))
            t0 = time.perf_counter()
            batches = self.data.train.next_step()
            probe_s = 0.0
            if probe:
                # The statistics of the weights and of this step's first trainer.stats_micro_batches
                # micro-batches come from a forward-only pass of their own (evaluation mode, no autograd graph)
                # before the step, so the step runs exactly as without the probe: its Triton kernels (hooked
                # layers take the torch path), its CUDA graph (engine.cuda_graph), its memory; no loss changes.
                tp = time.perf_counter()
                n = probe_micro_batches(t.stats_micro_batches, len(batches), self.engine.micro_batch_multiple)
                with self.telemetry.stats_probe(self.engine.model_chunks()):
                    self.engine.eval_loss(batches[:n])
                probe_s = time.perf_counter() - tp  # the probe's exit read its sums on the host: work done
            profiled = t.profile_step == s + 1
            if profiled:  # trainer.profile_step: this step under torch.profiler, left out of tokens_per_s

                with profile_step(self.run_dir / f"profile_step_{s + 1}.json", self.device,
                                  meta={"step": s + 1, "tokens": self.tokens_per_step}):
                    stats = self.engine.train_step(batches, lr, wd)
            else:
                stats = self.engine.train_step(batches, lr, wd)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if not profiled:
                window_time += time.perf_counter() - t0 - probe_s
                window_tokens += self.tokens_per_step
            self.step += 1
            steps_here += 1
            self._count_skip(stats)
            if probe:
                self.telemetry.log(self.step, {**(self.telemetry.stats_probe_result or {}), "stats_probe_s": probe_s})
            if self.step % t.log_interval == 0 or self.step == self.max_steps:
                # tokens/s over the train steps since the last record (evaluations, saves and statistics
                # probes excluded; a probe's own time is in its record as stats_probe_s)
                speed = throughput_metrics(window_tokens, window_time, self.flops_per_token, self.world_size,
                                           self.peak_flops)
                self.telemetry.log(self.step, {
                    "loss": stats.loss, "lr": lr, "wd": wd, "grad_norm": stats.grad_norm,
                    "act_bits": self.act_bits, "tokens": self.step * self.tokens_per_step,
                    # steps skipped so far in this run (non-finite loss or gradient norm); which of the two
                    # numbers of this step is non-finite (JSON writes them as null)
                    "skipped": self.skips.total, **self._nonfinite(stats), **speed, **memory_stats(self.device),
                    # engine.cuda_graph: training steps replayed from the captured graph so far (dashboards show
                    # whether the graph is in use; warm-up steps and evaluation run eagerly)
                    **({"cuda_graph_replays": self.engine.graph_replays}
                       if getattr(self.engine, "graph_replays", 0) else {})})
                self.tokens_per_s = speed["tokens_per_s"]
                window_tokens, window_time = 0, 0.0
            self.telemetry.progress(self.step, self.max_steps, loss=stats.loss, tok_s=self.tokens_per_s,
                                    act_bits=self.act_bits)
            if self.step % t.eval_interval == 0:
                self.evaluate()
            self.maybe_switch_act_bits()
            if self.step % t.save_interval == 0:
                self.save()
            if self.step < self.max_steps:
                # Collective: every rank asks at every step boundary (one tiny all-reduce).
                stop = self.guard.should_stop()
                chunk_done = t.exit_after_steps is not None and steps_here >= t.exit_after_steps
                if stop or chunk_done:
                    reason = self.guard.reason if stop else f"trainer.exit_after_steps={t.exit_after_steps}"
                    self.save(final=True)
                    self.telemetry.event(self.step, "stop", reason=reason)
                    if self.engine.is_logging_rank:
                        print(f"[bitnet-train] stopped at step {self.step} ({reason}); checkpoint in "
                              f"{self.ckpt.path(self.step)}; relaunch with the same overrides to resume",
                              flush=True)
                    self.telemetry.close()
                    if stop and not self.guard.interrupted:
                        self.guard.requeue()
                    return None
        return self.finish(evaluate=True)

    def finish(self, evaluate: bool) -> Optional[float]:
        loss = None
        if evaluate:
            loss = self.last_eval[1] if self.last_eval and self.last_eval[0] == self.step else self.evaluate()
            self.save(final=True)
        self.telemetry.event(self.step, "finished")
        self.telemetry.close()
        if self.cfg.trainer.report and self.rank == 0:
            path = write_report(self.run_dir, self.cfg, unigram_ppl=self.data.unigram_perplexity)
            print(f"[bitnet-train] report: {path}\n[bitnet-train] plot:   {path.with_name('report.png')}\n"
                  f"[bitnet-train] metrics: {self.run_dir / 'metrics.jsonl'}", flush=True)
        return loss

    def _nonfinite(self, stats) -> dict:

        bad = nonfinite_fields(stats.loss, stats.grad_norm)
        return {"nonfinite": bad} if bad else {}

    def _count_skip(self, stats) -> None:
        """Count a skipped step; warn on one line; DivergenceError after trainer.max_skipped_steps in a row."""

        try:
            line = self.skips.record(self.step, stats.skipped, stats.loss, stats.grad_norm, self._last_checkpoint())
        except DivergenceError as e:
            self.telemetry.event(self.step, "diverged", message=str(e))
            raise
        if line is not None:
            self.telemetry.event(self.step, "skipped_step", loss=fmt_value(stats.loss),
                                 grad_norm=fmt_value(stats.grad_norm), consecutive=self.skips.consecutive,
                                 skipped=self.skips.total)
            if self.engine.is_logging_rank:
                print(f"[bitnet-train] WARNING: {line}", file=sys.stderr, flush=True)

    def close(self) -> None:
        telemetry = getattr(self, "telemetry", None)
        if telemetry is not None:
            try:
                telemetry.close()
            except Exception as e:  # the guard and the run-directory lock are released regardless
                print(f"[bitnet-train] WARNING: closing the run's metrics and logger failed: {type(e).__name__}: {e}",
                      file=sys.stderr, flush=True)
        self.guard.close()
        self.lock.release()


def _standard_start_method() -> None:
    """Inside joblib's loky workers (hydra/launcher=joblib) multiprocessing reports the start method 'loky',
    which the spawned children of megatron's checkpoint writer cannot restore ("cannot find context for
    'loky'"): fall back to spawn there."""
    if mp.get_start_method(allow_none=True) not in (None, "fork", "spawn", "forkserver"):
        mp.set_start_method("spawn", force=True)


def train(cfg: TrainConfig) -> Optional[float]:
    """Validate, then run one training job in this process; returns the final validation loss (None when
    the run stopped early or was already complete)."""
    filter_backend_warnings()  # also in Hydra launcher workers, which call train() without main()
    world_size = parse_launch_env().world_size
    check_train(cfg, world_size=world_size)

    # before anything in run_dir changes: the checkpoints there must be of this computation
    check_resume(cfg, world_size, resolve_engine_name(cfg.engine.name))
    _standard_start_method()
    trainer = None
    try:
        trainer = Trainer(cfg)
        if trainer.rank == 0:
            (trainer.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
        destroy_distributed()  # a multirun sweep starts the next job in this process


register_configs()


def _hydra_entry():
    import hydra  # deferred: importing the module (tests, train()) needs no Hydra app

    @hydra.main(version_base="1.3", config_path=CONF_SEARCH_PATH, config_name="train")
    def _main(dcfg) -> Optional[float]:
        try:
            return train(cfg_from_omegaconf(dcfg))
        except (ConfigError, CheckpointError, LaunchEnvError) as e:
            kind = ("config error" if isinstance(e, ConfigError) else
                    "checkpoint error" if isinstance(e, CheckpointError) else "launch error")
            print(f"bitnet-train: {kind}: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except DivergenceError as e:
            print(f"bitnet-train: {e}", file=sys.stderr, flush=True)
            raise SystemExit(3) from None
        except KeyboardInterrupt:
            print("bitnet-train: aborted by a second Ctrl-C; the run resumes from its last complete checkpoint "
                  f"in {Path(str(dcfg.get('run_dir', '.'))) / 'checkpoints'}", file=sys.stderr, flush=True)
            raise SystemExit(130) from None
        except Exception as e:
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                print(f"bitnet-train: disk full: writing {e.filename or 'a file of the run'} failed ({e.strerror}). "
                      f"Free space under {dcfg.get('run_dir', '.')} and relaunch: the run resumes from its "
                      "last complete checkpoint", file=sys.stderr, flush=True)
                raise SystemExit(2) from None
            if isinstance(e, DataError):
                print(f"bitnet-train: data error: {e}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None
            raise

    return _main


def main() -> None:
    """Console script ``bitnet-train``."""
    filter_backend_warnings()
    try:
        check_group_choices(sys.argv[1:])
    except ConfigError as e:
        print(f"bitnet-train: config error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    _hydra_entry()()


if __name__ == "__main__":
    main()
