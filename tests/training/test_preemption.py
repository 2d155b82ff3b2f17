"""bitnet_dist.preemption: signal flag, all-rank agreement, wall-clock guard, stop file, requeue."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from bitnet_dist.preemption import PreemptionGuard, requeue_command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def guard_factory():
    made = []

    def make(*a, **kw):
        kw.setdefault("stop_file", "")
        g = PreemptionGuard(*a, **kw)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


def test_signal_only_sets_flag_and_process_survives(guard_factory):
    g = guard_factory()
    assert not g.should_stop()
    os.kill(os.getpid(), signal.SIGUSR2)  # the default action would end this process
    assert g.signal_received == signal.SIGUSR2
    assert g.should_stop() and g.reason == "signal SIGUSR2"
    assert g.should_stop()  # sticky


def test_sigterm_stops_too(guard_factory):
    g = guard_factory()
    os.kill(os.getpid(), signal.SIGTERM)
    assert g.should_stop() and g.reason == "signal SIGTERM"


def test_close_restores_previous_handlers():
    seen = []
    prev = signal.signal(signal.SIGUSR2, lambda s, f: seen.append(s))
    try:
        g = PreemptionGuard(stop_file="")
        assert signal.getsignal(signal.SIGUSR2) == g._handler
        g.close()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == [signal.SIGUSR2] and not g.should_stop()
    finally:
        signal.signal(signal.SIGUSR2, prev)


def test_wall_clock_guard(guard_factory):
    clock = FakeClock()
    g = guard_factory(wall_clock_minutes=2.5, clock=clock)
    clock.t += 149.0
    assert not g.should_stop()
    clock.t += 1.0  # 150 s = 2.5 min
    assert g.should_stop() and g.reason == "wall-clock limit"


@pytest.mark.parametrize("minutes", [None, 0])
def test_no_wall_clock_limit(guard_factory, minutes):
    clock = FakeClock()
    g = guard_factory(wall_clock_minutes=minutes, clock=clock)
    clock.t += 1e9
    assert not g.should_stop()


def test_bad_wall_clock_value():
    with pytest.raises(ValueError, match="wall_clock_minutes"):
        PreemptionGuard(wall_clock_minutes="soon", signals=())


def test_stop_file(guard_factory, tmp_path, monkeypatch):
    flag = tmp_path / "stop"
    monkeypatch.setenv("BITNET_STOP_FILE", str(flag))
    g = PreemptionGuard()  # reads BITNET_STOP_FILE
    try:
        assert not g.should_stop()
        flag.touch()
        assert g.should_stop() and g.reason == f"stop file {flag}"
    finally:
        g.close()


# -- all ranks agree (2 gloo processes) ---------------------------------------------------------------
# Each scenario: 8 step boundaries; one rank is signalled, or its wall clock runs out, at one step.
AGREE_CHILD = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    from bitnet_dist.distributed import init_distributed, destroy_distributed
    from bitnet_dist.preemption import PreemptionGuard

    class Clock:
        t = 0.0
        def __call__(self):
            return self.t

    info = init_distributed()
    out = []
    for signal_rank, signal_step, clock_rank, clock_step in json.loads(sys.argv[1]):
        clock = Clock()
        g = PreemptionGuard(wall_clock_minutes=1.0, clock=clock, stop_file="")
        res = [None, None]
        for step in range(8):
            if info.rank == signal_rank and step == signal_step:
                os.kill(os.getpid(), signal.SIGUSR2)
            if info.rank == clock_rank and step == clock_step:
                clock.t += 61.0
            if g.should_stop():
                res = [step, g.reason]
                break
        g.close()
        out.append(res)
    print(json.dumps(out), flush=True)
    destroy_distributed()
""")


@pytest.mark.slow
def test_ranks_agree_at_the_same_step():
    scenarios = [[1, 3, None, None],     # rank 1 gets USR2 before boundary 3
                 [None, None, 0, 5],     # rank 0's wall clock runs out before boundary 5
                 [None, None, None, None]]
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", AGREE_CHILD, json.dumps(scenarios)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
                                   "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    r0, r1 = (json.loads(o.strip().splitlines()[-1]) for o, _ in outs)
    assert (r0[0], r1[0]) == ([3, "another rank stopped"], [3, "signal SIGUSR2"])
    assert (r0[1], r1[1]) == ([5, "wall-clock limit"], [5, "another rank stopped"])
    assert (r0[2], r1[2]) == ([None, None], [None, None])


# -- requeue --------------------------------------------------------------------------------------
class FakeRun:
    def __init__(self, returncode=0):
        self.calls, self.returncode = [], returncode

    def __call__(self, cmd, **kw):
        self.calls.append(cmd)
        return subprocess.CompletedProcess(cmd, self.returncode, "", "boom" if self.returncode else "")


def test_requeue_command():
    assert requeue_command({"SLURM_JOB_ID": "4242"}) == ["scontrol", "requeue", "4242"]
    # a job-array element has its own SLURM_JOB_ID: only it is requeued
    assert requeue_command({"SLURM_JOB_ID": "4243", "SLURM_ARRAY_JOB_ID": "4240",
                            "SLURM_ARRAY_TASK_ID": "3"}) == ["scontrol", "requeue", "4243"]
    assert requeue_command({}) is None
    with pytest.raises(ValueError, match="SLURM_JOB_ID"):
        requeue_command({"SLURM_JOB_ID": "12; rm -rf /"})


def test_requeue_runs_scontrol_on_rank0_under_slurm(guard_factory):
    g, run = guard_factory(), FakeRun()
    assert g.requeue(env={"SLURM_JOB_ID": "77", "RANK": "0"}, run=run) is True
    assert run.calls == [["scontrol", "requeue", "77"]]


def test_requeue_skipped_off_rank0_and_outside_slurm(guard_factory):
    g, run = guard_factory(), FakeRun()
    assert g.requeue(env={"SLURM_JOB_ID": "77", "RANK": "1"}, run=run) is False
    assert g.requeue(env={"RANK": "0"}, run=run) is False
    assert run.calls == []


def test_requeue_failure_is_reported_not_raised(guard_factory):
    g, run = guard_factory(), FakeRun(returncode=1)
    assert g.requeue(env={"SLURM_JOB_ID": "77"}, run=run) is False
    assert run.calls == [["scontrol", "requeue", "77"]]


def test_requeue_under_submitit_hands_over_to_its_handler():
    """submitit's own USR2 handler (installed before the app) does the resubmission; no scontrol from us."""
    calls = []

    def submitit_handler(signum, frame):
        calls.append(signum)
        raise SystemExit(-1)  # what submitit does after requeueing

    prev = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        g, run = PreemptionGuard(stop_file=""), FakeRun()
        os.kill(os.getpid(), signal.SIGUSR2)  # our handler now: only the flag
        assert calls == [] and g.should_stop()
        with pytest.raises(SystemExit):
            g.requeue(env={"SLURM_JOB_ID": "77", "SUBMITIT_EXECUTOR": "slurm"}, run=run)
        assert calls == [signal.SIGUSR2] and run.calls == []
        g.close()
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler
    finally:
        signal.signal(signal.SIGUSR2, prev)


def test_requeue_ignores_sigterm_while_scontrol_runs(guard_factory):
    """Slurm SIGTERMs the whole job once it accepts the requeue; scontrol (our child) must not die of it."""
    g = guard_factory()
    seen = []

    def run(cmd, **kw):
        seen.append(signal.getsignal(signal.SIGTERM))  # what the child inherits
        return subprocess.CompletedProcess(cmd, 0, "", "")

    assert g.requeue(env={"SLURM_JOB_ID": "5"}, run=run)
    assert seen == [signal.SIG_IGN]
    assert signal.getsignal(signal.SIGTERM) == g._handler  # restored afterwards
