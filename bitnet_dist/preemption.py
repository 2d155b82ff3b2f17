"""Preemption and time limits: stop every rank at the same step boundary, then requeue.

Use (the train loop)::

    guard = PreemptionGuard(cfg.trainer.wall_clock_minutes)   # after init_distributed()
    for step in ...:
        train one step
        if guard.should_stop():          # collective: every rank calls it at every step boundary
            save a checkpoint, close telemetry
            guard.requeue()              # rank 0 under Slurm; the last thing before exiting 0
            break

Three things raise the stop flag on a rank:

* a signal: SIGUSR2 (Slurm's warning, ``--signal=[B:]USR2@300``) or SIGTERM (time limit without a
  warning, scancel, Slurm preemption). The handler only records it: saving inside a signal handler
  would interrupt a collective half-way on one rank.
* a stop file: when ``BITNET_STOP_FILE`` names a path that exists. The torchrun sbatch template
  uses it because torchrun's agent forwards only SIGTERM/SIGINT/SIGHUP/SIGQUIT and dies on USR2, so
  its batch shell catches the warning (``B:USR2``) and touches the file instead.
* the wall-clock guard: ``wall_clock_minutes`` after construction (clusters that send no signal).
* Ctrl-C (``interrupt=True``, the train app): the first SIGINT stops like SIGTERM (checkpoint at the next
  step boundary, clean exit, no requeue); a second one raises KeyboardInterrupt at once.

``should_stop()`` all-reduces the flag (MAX) so the ranks agree even when only one was signalled or
their clocks differ.

Requeue rule: plain Slurm (sbatch/srun) -> rank 0 runs ``scontrol requeue $SLURM_JOB_ID``; the job
keeps its id and overrides, so the requeued run finds its run_dir and resumes. Under submitit
(hydra-submitit-launcher; ``SUBMITIT_EXECUTOR`` is set) submitit owns resubmission: its own USR2
handler pickles the submission and requeues. The guard keeps that handler and, on rank 0, calls it
from ``requeue()`` after our checkpoint is on disk; it ends the process (SystemExit) by design so
submitit writes no "finished" result. Outside Slurm ``requeue()`` does nothing.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
STOP_FILE_ENV = "BITNET_STOP_FILE"


def under_submitit(env: Optional[Mapping[str, str]] = None) -> bool:
    env = os.environ if env is None else env
    return bool(env.get("SUBMITIT_EXECUTOR"))


def requeue_command(env: Optional[Mapping[str, str]] = None) -> Optional[list[str]]:
    """The command that requeues this Slurm job, or None when not under Slurm.

    Uses SLURM_JOB_ID, which for a job-array element is that element's own id, so only it requeues.
    """
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID", "").strip()
    if not job_id:
        return None
    if not job_id.isdigit():
        raise ValueError(f"SLURM_JOB_ID={job_id!r} is not a job number; cannot requeue")
    return ["scontrol", "requeue", job_id]


class PreemptionGuard:
    """Stop flag shared by all ranks; see the module docstring.

    wall_clock_minutes: stop after this many minutes from construction (None or <= 0: no limit).
    signals: signals that raise the flag (default SIGUSR2, SIGTERM).
    stop_file: a path whose existence raises the flag (None: $BITNET_STOP_FILE if set; "": off).
    clock: monotonic seconds (injectable for tests).
    Handlers are installed only from the main thread (Python allows no other); ``close()`` (or leaving
    a ``with`` block) restores the previous handlers.
    """

    def __init__(self, wall_clock_minutes: Optional[float] = None, *,
                 signals: Sequence[int] = DEFAULT_SIGNALS, stop_file: Optional[str] = None,
                 clock: Callable[[], float] = time.monotonic, group=None, interrupt: bool = False):
        if wall_clock_minutes is not None and not isinstance(wall_clock_minutes, (int, float)):
            raise ValueError(f"trainer.wall_clock_minutes={wall_clock_minutes!r}: a number of minutes or null")
        self._clock = clock
        self._deadline = (clock() + 60.0 * wall_clock_minutes
                          if wall_clock_minutes is not None and wall_clock_minutes > 0 else None)
        self._stop_file = stop_file if stop_file is not None else (os.environ.get(STOP_FILE_ENV) or None)
        self._group = group
        self._signal: Optional[int] = None
        self._stopped = False
        self.reason: Optional[str] = None  # set when should_stop() first returns True
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handler)
            if interrupt and signal.SIGINT not in self._previous:
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        else:
            log.warning("PreemptionGuard created outside the main thread: no signal handlers installed")

    # The handler must stay trivial: it can run between any two bytecodes, also inside a collective.
    def _handler(self, signum, frame) -> None:
        if self._signal is None:
            self._signal = signum

    def _interrupt(self, signum, frame) -> None:
        if self._signal == signal.SIGINT:  # the second Ctrl-C: abort now, no checkpoint
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if self._signal is None:
            self._signal = signum
        # os.write: print() may be in progress on the interrupted frame (not reentrant)
        os.write(2, b"\n[bitnet-train] Ctrl-C: stopping at the next step boundary with a checkpoint; "
                    b"press Ctrl-C again to abort at once (without one)\n")

    @property
    def interrupted(self) -> bool:
        """The stop came from Ctrl-C (SIGINT): the user stops the run, nothing to requeue."""
        return self._signal == signal.SIGINT

    @property
    def signal_received(self) -> Optional[int]:
        """The first signal this rank received, or None."""
        return self._signal

    def _local_reason(self) -> Optional[str]:
        if self._signal is not None:
            return f"signal {signal.Signals(self._signal).name}"
        if self._stop_file and os.path.exists(self._stop_file):
            return f"stop file {self._stop_file}"
        if self._deadline is not None and self._clock() >= self._deadline:
            return "wall-clock limit"
        return None

    def should_stop(self) -> bool:
        """True on every rank once any rank was told to stop. Collective when world size > 1.

        Cost: one all-reduce of a 1-element tensor per call. Once True it stays True.
        """
        if self._stopped:
            return True
        reason = self._local_reason()
        flag = 1 if reason else 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self._group) > 1:
            device = (torch.device("cuda", torch.cuda.current_device())
                      if dist.get_backend(self._group) == "nccl" else torch.device("cpu"))
            t = torch.tensor([flag], dtype=torch.int32, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
            flag = int(t.item())
            if flag and reason is None:
                reason = "another rank stopped"
        if flag:
            self._stopped = True
            self.reason = reason
        return bool(flag)

    def requeue(self, env: Optional[Mapping[str, str]] = None,
                run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> bool:
        """Requeue this job (rank 0 only); returns True when a requeue was issued.

        Call after the checkpoint is complete on every rank: Slurm ends the running job as soon as
        the requeue is accepted. Under submitit this calls submitit's own handler, which exits.
        """
        env = os.environ if env is None else env
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(env.get("RANK", "0"))
        if rank != 0:
            return False
        # Slurm ends every process of the job as soon as it accepts the requeue, the scontrol client
        # included, sometimes before that client has read the reply (then submitit raises). Ignored
        # signals survive fork+exec: with SIGTERM ignored here, scontrol finishes; SIGKILL still
        # follows after KillWait.
        main = threading.current_thread() is threading.main_thread()
        prev_term = signal.signal(signal.SIGTERM, signal.SIG_IGN) if main else None
        try:
            return self._requeue(env, run)
        finally:
            if main:
                signal.signal(signal.SIGTERM, prev_term if prev_term is not None else signal.SIG_DFL)

    def _requeue(self, env: Mapping[str, str], run: Callable[..., subprocess.CompletedProcess]) -> bool:
        if under_submitit(env):
            handler = self._previous.get(signal.SIGUSR2)
            if callable(handler):
                log.info("requeue: handing over to submitit's preemption handler")
                handler(signal.SIGUSR2, None)  # pickles the resubmission, requeues, raises SystemExit
                return True
            log.warning("requeue: under submitit but its USR2 handler was not found; not requeued")
            return False
        cmd = requeue_command(env)
        if cmd is None:
            log.info("requeue: not under Slurm (no SLURM_JOB_ID); nothing to requeue")
            return False
        try:
            res = run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            log.error("requeue: %s failed: %s", " ".join(cmd), e)
            return False
        if res.returncode != 0:
            # e.g. the job was cancelled (SIGTERM from scancel): nothing to come back to
            log.error("requeue: %s exited %d: %s", " ".join(cmd), res.returncode, (res.stderr or "").strip())
            return False
        log.info("requeue: %s", " ".join(cmd))
        return True

    def close(self) -> None:
        """Restore the signal handlers that were installed before this guard."""
        if threading.current_thread() is threading.main_thread():
            for sig, prev in self._previous.items():
                signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> "PreemptionGuard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
