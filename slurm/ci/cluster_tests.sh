#!/usr/bin/env bash
# Tests on a real single-host Slurm cluster, run by .ci/run as root after the unit tests,
# on a Debian bookworm machine where ./launch/test.sh already created .venv:
#
#   a. sbatch slurm/train_tasks.sbatch: the small model, 2 tasks (gloo, CPU, engine=deepspeed) completes
#      and writes its metrics;
#   b. preemption: USR2 is sent to the batch shell mid-run (what --signal=B:USR2@300 does), the job
#      checkpoints, requeues itself, resumes and finishes; its steps are contiguous (none lost or
#      repeated) and its losses equal those of run a (the same computation, uninterrupted);
#   c. a Hydra -m sweep of two configurations through the submitit Slurm launcher
#      (hydra/launcher=slurm_cpu), both completing;
#   d. b with slurm/train_torchrun.sbatch (one torchrun per node; the batch shell touches the stop file);
#   e. b through the submitit launcher: USR2 to the tasks (submitit's --signal has no B:), the app
#      checkpoints and hands over to submitit, which requeues; the element resumes and completes;
#   h. bitnet_dist.distributed.expand_hostlist agrees with `scontrol show hostnames`.
#
# Installs slurmctld / slurmd / slurm-client with apt-get when missing, starts both daemons on free
# ports with a scratch state directory, and stops them by their PIDs at the end whatever happened.
# Every wait is bounded. Last line: "N passed, N failed"; exit status 0 only when nothing failed.
#
#   BITNET_CI_WORK        scratch directory (default: a new one under /tmp; removed when all passed)
#   BITNET_CI_STEPS       steps of the runs in a, b, d, e (default 60)
#   BITNET_CI_TESTS       which tests to run (default "h a b c d e"; b, d, e compare against a's run)
#   BITNET_TRAIN_CMD      replaces "python -m bitnet_dist.train" in a, b, d (slurm/common.sh)
set -uo pipefail
if [ "$(id -u)" != 0 ]; then
  echo "cluster_tests.sh: run as root (it installs Slurm and starts slurmctld/slurmd as root)" >&2
  echo "0 passed, 1 failed"
  exit 1
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
t_start=$(date +%s)
work="${BITNET_CI_WORK:-$(mktemp -d /tmp/bitnet-slurm-ci.XXXXXX)}"
mkdir -p "$work"
steps="${BITNET_CI_STEPS:-60}"
passed=0 failed=0 ctld_pid="" slurmd_pid="" sweep_pid=""

log() { echo "[cluster-tests $(date -u +%T) +$(( $(date +%s) - t_start ))s] $*"; }
pass() { passed=$((passed + 1)); log "PASS $1"; }
fail() { failed=$((failed + 1)); log "FAIL $1: $2"; }

# Poll "$@" every second until it succeeds or $1 seconds pass.
wait_for() {
  local limit=$1; shift
  local end=$(( $(date +%s) + limit ))
  until "$@"; do
    [ "$(date +%s)" -ge "$end" ] && return 1
    sleep 1
  done
}

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  [ -n "$sweep_pid" ] && kill -TERM "$sweep_pid" 2>/dev/null
  if [ -n "$ctld_pid" ] && kill -0 "$ctld_pid" 2>/dev/null; then
    # Jobs first, so slurmd's step daemons end their processes before slurmd goes away.
    timeout 10 scancel --full --quiet --partition=debug 2>/dev/null
    wait_for 30 bash -c '[ -z "$(timeout 5 squeue -h 2>/dev/null)" ]' || log "jobs still listed after scancel"
  fi
  for pid in $slurmd_pid $ctld_pid; do
    kill -TERM "$pid" 2>/dev/null
  done
  for pid in $slurmd_pid $ctld_pid; do
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && { log "daemon $pid ignored SIGTERM; SIGKILL"; kill -KILL "$pid"; }
    wait "$pid" 2>/dev/null
  done
  if [ "$failed" -eq 0 ] && [ "$passed" -gt 0 ] && [ -z "${BITNET_CI_WORK:-}" ]; then
    rm -rf "$work"
  else
    log "logs and runs kept in $work"
  fi
  log "finished in $(( $(date +%s) - t_start )) s"
  echo "$passed passed, $failed failed"
  if [ "$failed" -gt 0 ] || [ "$passed" -eq 0 ]; then exit 1; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# -- the cluster ----------------------------------------------------------------------------------
free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }

start_cluster() {
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null; then
    log "installing slurmctld slurmd slurm-client"
    # Package scripts may try to start services without systemd; that failure is harmless.
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client; } \
      > "$work/apt.log" 2>&1 || { log "apt-get failed:"; tail -20 "$work/apt.log"; return 1; }
  fi
  local state="$work/slurm" host mem
  host="$(hostname -s)"
  mkdir -p "$state/state" "$state/spool"
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 2048 ))  # half of the RAM, in MiB
  sed -e "s|@STATE@|$state|g" -e "s|@HOST@|$host|g" -e "s|@CPUS@|$(nproc --all)|g" -e "s|@MEM_MB@|$mem|g" \
      -e "s|@CTLD_PORT@|$(free_port)|g" -e "s|@SLURMD_PORT@|$(free_port)|g" \
      slurm/ci/slurm.conf.template > "$state/slurm.conf"
  export SLURM_CONF="$state/slurm.conf"
  slurmctld -D -i -f "$SLURM_CONF" > "$state/slurmctld.out" 2>&1 &
  ctld_pid=$!
  wait_for 30 bash -c 'timeout 5 sinfo -h >/dev/null 2>&1' || { log "slurmctld did not answer"; tail "$state"/slurmctld.*; return 1; }
  slurmd -D -f "$SLURM_CONF" > "$state/slurmd.out" 2>&1 &
  slurmd_pid=$!
  if ! wait_for 60 node_idle; then
    log "node not idle: $(sinfo 2>&1)"; tail -20 "$state"/slurmd.*; return 1
  fi
  log "cluster up: slurmctld $ctld_pid, slurmd $slurmd_pid, $(sinfo -h -o '%P %D %c %t')"
}

job_state() { timeout 10 squeue -h -j "$1" -o %T 2>/dev/null; }
job_gone() { [ -z "$(job_state "$1")" ]; }
node_idle() { [ "$(timeout 10 sinfo -h -o %t 2>/dev/null)" = idle ]; }
job_field() { timeout 10 scontrol show job "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n1; }
check() { python slurm/ci/check_metrics.py "$@"; }
# A requeued job waits for its BeginTime (about 2 minutes); tests need not: start it once it is
# pending again, the node is idle (the old allocation's processes are gone) and the clock has moved past
# the second of the requeue. slurmd refuses a launch whose credential is not newer than the job's
# revocation, in whole seconds ("Job credential revoked" / "Job N already killed, do not launch batch
# job": a kick in the same second failed the job once). Returns when the job is pending-and-kicked,
# running or gone (bounded).
kick_requeued() {
  local jid=$1 st
  for _ in $(seq 60); do
    st=$(job_state "$jid")
    case "$st" in
      PENDING)
        wait_for 60 node_idle || true
        sleep 2
        scontrol update jobid="$jid" starttime=now && return 0;;
      RUNNING|"") return 0;;
    esac
    sleep 1
  done
}

# shellcheck disable=SC1091
. .venv/bin/activate
export WANDB_MODE=disabled PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS=1 BITNET_ROOT="$root"
export BITNET_CACHE="${BITNET_CACHE:-$work/cache}"
if ! start_cluster; then
  fail cluster "single-host Slurm did not start"
  exit 1
fi

# The runs of a, b, d, e differ only in run_dir (and how they are launched): the same computation.
common=(experiment=smoke model=small engine=deepspeed "trainer.max_steps=$steps"
        trainer.log_interval=1 trainer.save_interval=1000 trainer.eval_interval=1000 trainer.stats_interval=0
        trainer.progress_bar=false trainer.report=false)
ref="$work/ref"
submit() {  # submit NAME SCRIPT SBATCH_RESOURCES OVERRIDES... -> job id
  local name=$1 script=$2 res=$3; shift 3
  # shellcheck disable=SC2086
  env -u WANDB_MODE sbatch --parsable --job-name="$name" --nodes=1 $res --time=00:20:00 \
    --output="$work/$name.out" "slurm/$script" "$@"
}

# Wait until RUN_DIR has logged AT training steps (grep, not Python: the signal must land well before
# the last step), while job JID lives. Globs allowed in RUN_DIR (sweep runs name their directory).
wait_logged() {
  local run=$1 at=$2 jid=$3 end=$(( $(date +%s) + 240 )) i=0 f
  while :; do
    for f in $run/metrics.jsonl; do
      [ "$(grep -c '"loss"' "$f" 2>/dev/null)" -ge "$at" ] 2>/dev/null && return 0
    done
    [ "$(date +%s)" -ge "$end" ] && return 1
    i=$((i + 1))
    if [ $((i % 10)) = 0 ] && [ -n "$jid" ] && job_gone "$jid"; then return 1; fi
    sleep 0.2
  done
}

# After the warning signal: wait for the requeue, start the job again at once, wait for the end.
# Echoes nothing; sets $restarts; returns 1 with a reason on stdout when something is off.
finish_requeued() {
  local jid=$1 st
  local end=$(( $(date +%s) + 120 ))
  until [ "$(job_field "$jid" Restarts)" -ge 1 ] 2>/dev/null; do
    if job_gone "$jid"; then
      echo "job $jid ended without a requeue (state $(job_field "$jid" JobState)): the signal came too late or was lost"
      return 1
    fi
    [ "$(date +%s)" -ge "$end" ] && { echo "job $jid was not requeued within 120 s"; return 1; }
    sleep 1
  done
  kick_requeued "$jid"
  wait_for 300 job_gone "$jid" || { echo "requeued job $jid still $(job_state "$jid") after 300 s"; return 1; }
  st=$(job_field "$jid" JobState); restarts=$(job_field "$jid" Restarts)
  [ "$st" = COMPLETED ] || { echo "job $jid ended $st"; return 1; }
}

# The checks shared by b, d, e on a run that was stopped, requeued and resumed.
check_resumed() {
  local run=$1
  check stopped "$run" || { echo "no stop/resume pair in $run/metrics.jsonl"; return 1; }
  check complete "$run" "$steps" || { echo "steps lost or repeated"; return 1; }
  check same-losses "$ref" "$run" || { echo "losses differ from the uninterrupted run a"; return 1; }
}

# Start a Hydra -m sweep in the background (sweep_pid; output in $1), then wait_sweep LIMIT: its exit
# status, 124 on time-out. Without accounting (sacct) submitit cannot see a job that died without
# writing its result and would wait forever: give up 30 s after the last job left the queue.
start_sweep() {
  local out=$1; shift
  python -m bitnet_dist.train -m "$@" > "$out" 2>&1 &
  sweep_pid=$!
}
wait_sweep() {
  local out=$1 limit=$2 seen=0 idle=0 end rc
  end=$(( $(date +%s) + limit ))
  while kill -0 "$sweep_pid" 2>/dev/null; do
    if [ "$(date +%s)" -ge "$end" ] || [ "$idle" -ge 30 ]; then
      kill -TERM "$sweep_pid"; wait "$sweep_pid"; sweep_pid=""
      [ "$idle" -ge 30 ] && echo "the sweep's jobs ended but the launcher got no result (a job failed)" >> "$out"
      return 124
    fi
    if [ -n "$(timeout 10 squeue -h 2>/dev/null)" ]; then seen=1 idle=0; elif [ "$seen" = 1 ]; then idle=$((idle + 1)); fi
    sleep 1
  done
  wait "$sweep_pid"; rc=$?; sweep_pid=""
  return "$rc"
}
show_sweep_logs() {
  tail -20 "$1"
  find "$2" -name '*_log.*' -print -exec tail -8 {} \; 2>/dev/null | head -60
}

# -- a. a 2-task job completes and writes its metrics ------------------------------------------
test_a() {
  local jid st
  rm -rf "$ref"
  jid=$(submit ci-ref train_tasks.sbatch "--ntasks=2 --cpus-per-task=1" "${common[@]}" "run_dir=$ref" \
        logging.wandb=disabled) || { fail a "sbatch refused the job"; return; }
  log "a: job $jid (2 tasks, $steps steps)"
  if ! wait_for 300 job_gone "$jid"; then fail a "job $jid still $(job_state "$jid") after 300 s"; tail -30 "$work/ci-ref.out"; return; fi
  st=$(job_field "$jid" JobState)
  if [ "$st" != COMPLETED ]; then fail a "job $jid ended $st"; tail -40 "$work/ci-ref.out"; return; fi
  if ! check complete "$ref" "$steps"; then fail a "metrics of $ref incomplete"; return; fi
  pass "a (sbatch train_tasks, 2 tasks, gloo: COMPLETED, $steps steps in metrics.jsonl)"
}

# -- b. USR2 to the batch shell mid-run: checkpoint, requeue, resume, same losses -----------------
test_b() {
  local run="$work/preempt" jid at=$(( steps / 5 )) why restarts
  rm -rf "$run"
  # wandb offline here (disabled elsewhere): the requeued job must continue the same wandb run
  jid=$(submit ci-preempt train_tasks.sbatch "--ntasks=2 --cpus-per-task=1" "${common[@]}" "run_dir=$run" \
        logging.wandb=offline) || { fail b "sbatch refused the job"; return; }
  log "b: job $jid; USR2 to the batch shell (= --signal=B:USR2) once step $at is logged"
  wait_logged "$run" "$at" "$jid" || { fail b "step $at not logged within 240 s"; tail -30 "$work/ci-preempt.out"; return; }
  scancel --signal=USR2 --batch "$jid"
  log "b: sent USR2 at step $(check last-step "$run")"
  why=$(finish_requeued "$jid") || { fail b "$why"; tail -40 "$work/ci-preempt.out"; return; }
  restarts=$(job_field "$jid" Restarts)
  why=$(check_resumed "$run") || { echo "$why"; fail b "${why##*$'\n'}"; tail -40 "$work/ci-preempt.out"; return; }
  echo "$why"
  if ! check same-wandb-run "$run"; then fail b "the requeued job did not continue the same wandb run"; return; fi
  pass "b (USR2 -> checkpoint -> scontrol requeue (Restarts=$restarts) -> resume; steps contiguous; losses equal to a; same wandb run)"
}

# -- c. Hydra -m sweep through the submitit Slurm launcher ---------------------------------------
test_c() {
  local sweep="$work/sweep" n rc
  rm -rf "$sweep"
  log "c: python -m bitnet_dist.train -m hydra/launcher=slurm_cpu ... optim.lr=0.001,0.002"
  start_sweep "$work/sweep.out" hydra/launcher=slurm_cpu hydra.launcher.timeout_min=15 \
      "hydra.sweep.dir=$sweep/multirun" "run_dir=$sweep/runs/\${bitnet_run_name:}" \
      experiment=smoke engine=deepspeed trainer.max_steps=10 trainer.log_interval=1 trainer.progress_bar=false \
      trainer.report=false logging.wandb=disabled 'optim.lr=0.001,0.002'
  wait_sweep "$work/sweep.out" 420; rc=$?
  if [ "$rc" -ne 0 ]; then fail c "the sweep failed (exit $rc)"; show_sweep_logs "$work/sweep.out" "$sweep"; return; fi
  n=0
  for d in "$sweep"/runs/*/; do
    check complete "$d" 10 >/dev/null && n=$((n + 1))
  done
  if [ "$n" -ne 2 ]; then fail c "expected 2 complete runs under $sweep/runs, found $n: $(ls "$sweep/runs" 2>&1)"; return; fi
  pass "c (hydra -m through submitit on Slurm: 2 array elements, both complete: $(ls "$sweep/runs" | tr '\n' ' '))"
}

# -- d. like b, one torchrun per node: the batch shell touches the stop file ----------------------
test_d() {
  local run="$work/torchrun" jid at=$(( steps / 5 )) why restarts
  rm -rf "$run"
  jid=$(BITNET_NPROC_PER_NODE=2 BITNET_STOP_FILE="$work/torchrun.stop" submit ci-torchrun train_torchrun.sbatch \
        "--ntasks-per-node=1 --cpus-per-task=2" "${common[@]}" "run_dir=$run" logging.wandb=disabled) \
    || { fail d "sbatch refused the job"; return; }
  log "d: job $jid (torchrun, 2 ranks); USR2 to the batch shell once step $at is logged"
  wait_logged "$run" "$at" "$jid" || { fail d "step $at not logged within 240 s"; tail -30 "$work/ci-torchrun.out"; return; }
  scancel --signal=USR2 --batch "$jid"
  log "d: sent USR2 at step $(check last-step "$run")"
  why=$(finish_requeued "$jid") || { fail d "$why"; tail -40 "$work/ci-torchrun.out"; return; }
  restarts=$(job_field "$jid" Restarts)
  why=$(check_resumed "$run") || { echo "$why"; fail d "${why##*$'\n'}"; tail -40 "$work/ci-torchrun.out"; return; }
  echo "$why"
  pass "d (torchrun per node: USR2 -> stop file -> checkpoint -> requeue (Restarts=$restarts) -> resume; losses equal to a)"
}

# -- e. like b, through the submitit launcher ----------------------------------------------------
test_e() {
  local sweep="$work/subpre" jid="" at=$(( steps / 5 )) rc restarts run
  rm -rf "$sweep"
  log "e: a one-element sweep through submitit (2 tasks); USR2 to its tasks once step $at is logged"
  start_sweep "$work/subpre.out" hydra/launcher=slurm_cpu hydra.launcher.timeout_min=15 \
      hydra.launcher.tasks_per_node=2 "hydra.sweep.dir=$sweep/multirun" "run_dir=$sweep/runs/\${bitnet_run_name:}" \
      "${common[@]}" logging.wandb=disabled
  if wait_logged "$sweep/runs/*" "$at" ""; then
    jid=$(timeout 10 squeue -h -o %i | head -n1)
    # submitit asks for --signal=USR2@N without B:, so Slurm signals the tasks, not the batch shell
    scancel --signal=USR2 "$jid"
    log "e: sent USR2 to the tasks of $jid at step $(check last-step "$sweep"/runs/*)"
    kick_requeued_after_restart "$jid"
  fi
  wait_sweep "$work/subpre.out" 480; rc=$?
  run=$(ls -d "$sweep"/runs/*/ 2>/dev/null | head -n1)
  if [ -z "$jid" ]; then fail e "step $at not logged within 240 s"; show_sweep_logs "$work/subpre.out" "$sweep"; return; fi
  if [ "$rc" -ne 0 ]; then fail e "the sweep failed (exit $rc)"; show_sweep_logs "$work/subpre.out" "$sweep"; return; fi
  restarts=$(job_field "$jid" Restarts)
  if [ "${restarts:-0}" -lt 1 ]; then fail e "job $jid completed without a restart (Restarts=$restarts)"; return; fi
  why=$(check_resumed "$run") || { echo "$why"; fail e "${why##*$'\n'}"; show_sweep_logs "$work/subpre.out" "$sweep"; return; }
  echo "$why"
  pass "e (submitit: USR2 -> checkpoint -> submitit requeue (Restarts=$restarts) -> resume; losses equal to a)"
}
# -- h. our host-list expansion agrees with scontrol's ----------------------------------------------
test_h() {
  if python -m pytest -q -p no:cacheprovider tests/distributed/test_distributed.py -k matches_scontrol 2>&1 | tail -3 | tee "$work/h.out" \
      | grep -q "1 passed"; then
    pass "h (expand_hostlist == scontrol show hostnames)"
  else
    fail h "$(cat "$work/h.out")"
  fi
}

kick_requeued_after_restart() {
  wait_for 120 bash -c "timeout 10 scontrol show job $1 2>/dev/null | grep -q 'Restarts=[1-9]'" && kick_requeued "$1"
}

for t in ${BITNET_CI_TESTS:-h a b c d e}; do
  "test_$t"
done
