"""Checkpoint directories: atomic publication, integrity manifest, retention, discovery.

Layout: ``run_dir/checkpoints/step_{step:08d}/`` holds whatever the engine and the trainer wrote plus
``manifest.json`` ({"step", "files": {relative path: {"size", "sha256"}}}). A checkpoint is published
by renaming a fully written, fsynced temporary directory (``.tmp_step_XXXXXXXX``), so a crash leaves
either the previous state or a complete checkpoint, never a half-written ``step_*``. A ``step_*``
whose manifest is missing or does not match its files (disk corruption, a copy cut short, a
hand-edited file) is reported and skipped by :meth:`CheckpointManager.latest`, and never deleted:
neither by discovery nor by retention, which removes only complete checkpoints older than the newest
``keep``.

Every rank calls :meth:`save` and :meth:`latest` (collectives inside when torch.distributed is
initialized); rank 0 does the file-system work. The run directory must be on a file system every
rank sees.

Failure rules (docs/failures.md): one writer per run directory (:class:`RunDirLock`); a manifest that
lacks a file the engine needs (``required`` patterns) is incomplete; before a save the free space is
checked against the size of the newest complete checkpoint (:class:`DiskSpaceError` names the directory
and the bytes needed); a failed save removes its temporary directory; retention also removes the
leftovers of interrupted saves (``.tmp_step_*``, ``*.partial-*``; ``step_X.replaced-*`` once step X falls
out of the kept window) and never deletes the newest checkpoint whose manifest records finite state.
"""
from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch.distributed as dist

MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one is required (the message names the directory and the fix)."""


class DiskSpaceError(CheckpointError):
    """A checkpoint does not fit: the message names the directory, the bytes needed and the bytes free."""


class RunDirLocked(CheckpointError):
    """Another live process writes this run directory (the message names its host, pid and job)."""


def free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged writer on the file system of ``path`` (tests patch this)."""
    return shutil.disk_usage(path).free


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _dist():
    return dist if dist.is_available() and dist.is_initialized() else None


def _rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def _barrier() -> None:
    d = _dist()
    if d:
        d.barrier()


def _broadcast(obj):
    """rank 0's ``obj`` on every rank."""
    d = _dist()
    if not d:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=0)
    return box[0]


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(ckpt_dir: Path, step: int, extra: Optional[dict] = None) -> dict:
    """fsync every file (and directory) under ``ckpt_dir``, then write and fsync its manifest (``extra``
    keys, e.g. {"finite": true}, are recorded beside step and files)."""
    files = {}
    for p in _files(ckpt_dir):
        _fsync_path(p)
        files[p.relative_to(ckpt_dir).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    for d in sorted({p.parent for p in _files(ckpt_dir)} | {ckpt_dir}, key=lambda q: -len(q.parts)):
        _fsync_path(d)
    manifest = {**(extra or {}), "step": step, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": files}
    tmp = ckpt_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_dir / MANIFEST)
    _fsync_path(ckpt_dir)
    return manifest


def read_manifest(ckpt_dir: Path) -> Optional[dict]:
    try:
        return json.loads((Path(ckpt_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def checkpoint_bytes(ckpt_dir: Path) -> int:
    """Size of a checkpoint from its manifest (0 when unreadable)."""
    m = read_manifest(ckpt_dir) or {}
    try:
        return sum(int(v["size"]) for v in m.get("files", {}).values())
    except (TypeError, KeyError, ValueError):
        return 0


def verify(ckpt_dir: Path, required: Sequence[str] = ()) -> Optional[str]:
    """None when ``ckpt_dir`` is a complete checkpoint, else the reason it is not. ``required``: glob
    patterns (relative paths) each of which some manifest entry must match (the files the engine and the
    trainer need to load it)."""
    mpath = ckpt_dir / MANIFEST
    if not mpath.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest.json ({e})"
    if not isinstance(files, dict):
        return "unreadable manifest.json (no file table)"
    for pattern in required:
        if not any(fnmatch.fnmatchcase(rel, pattern) for rel in files):
            return f"the manifest lists no {pattern} (a file needed to load it)"
    m = _STEP_RE.match(ckpt_dir.name)
    if m and manifest.get("step") != int(m.group(1)):
        return f"manifest says step {manifest.get('step')}, directory says {int(m.group(1))}"
    for rel, meta in files.items():
        p = ckpt_dir / rel
        if not p.is_file():
            return f"missing file {rel}"
        if p.stat().st_size != meta["size"]:
            return f"{rel}: size {p.stat().st_size} != {meta['size']} in the manifest"
        if sha256_file(p) != meta["sha256"]:
            return f"{rel}: SHA-256 differs from the manifest"
    extra = [p.relative_to(ckpt_dir).as_posix() for p in _files(ckpt_dir)
             if p.relative_to(ckpt_dir).as_posix() not in files]
    if extra:
        return f"files not in the manifest: {extra[:3]}"
    return None


def _report(msg: str) -> None:
    # One line on stderr, whatever logging is configured to (Hydra's job logging is off in the app).
    print(f"[bitnet-dist checkpoint] WARNING: {msg}", file=sys.stderr, flush=True)


_LEFTOVER_RE = re.compile(r"^(\.tmp_step_\d{8,}.*|step_\d{8,}\.(partial|replaced)-.*)$")


class CheckpointManager:
    """Atomic checkpoints under ``run_dir/checkpoints``; keeps the newest ``keep`` complete ones.

    ``required``: glob patterns of files every complete checkpoint lists in its manifest (``verify``).
    ``space_margin``: a save needs ``space_margin`` x the newest complete checkpoint's size free.
    """

    def __init__(self, run_dir: Path | str, keep: int = 3, required: Sequence[str] = (), space_margin: float = 1.1):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep = keep
        self.required = tuple(required)
        self.space_margin = space_margin

    def path(self, step: int) -> Path:
        return self.dir / f"step_{step:08d}"

    def steps(self) -> list[tuple[int, Path]]:
        """Every ``step_*`` directory (complete or not), oldest first."""
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
        return sorted(out)

    # -- save -------------------------------------------------------------------------------------------
    def space_needed(self) -> int:
        """Bytes a save needs free: ``space_margin`` x the newest complete checkpoint (0: none yet)."""
        for _, p in reversed(self.steps()):
            if (p / MANIFEST).is_file():
                return int(checkpoint_bytes(p) * self.space_margin)
        return 0

    def check_space(self) -> None:
        """DiskSpaceError when the checkpoint directory's file system has less free than ``space_needed``."""
        need = self.space_needed()
        where = self.dir if self.dir.is_dir() else self.run_dir
        free = free_bytes(where)
        if need and free < need:
            raise DiskSpaceError(
                f"not enough space for a checkpoint in {self.dir}: {_gib(need)} needed (the previous checkpoint "
                f"is {_gib(need / self.space_margin)}), {_gib(free)} free. Free space there or point run_dir "
                "elsewhere (copy the run directory over and relaunch)")

    def save(self, step: int, write_fn: Callable[[Path], None], extra: Optional[dict] = None) -> Path:
        """Every rank calls this; ``write_fn(tmp_dir)`` writes this rank's files into the shared temporary
        directory. Returns the published directory ``step_{step:08d}``. ``extra`` goes into the manifest.

        Raises DiskSpaceError (nothing written) when ``check_space`` fails or a write runs out of space; any
        failure removes the temporary directory, so the previous checkpoints stay as they were.
        """
        final, tmp = self.path(step), self.dir / f".tmp_step_{step:08d}"
        err = None
        if _rank() == 0:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                self.check_space()
                if tmp.exists():  # a save that died half-way; this process is the run's one writer (RunDirLock)
                    _report(f"removing {tmp}, an interrupted save of an earlier launch")
                    shutil.rmtree(tmp)
                tmp.mkdir()
            except BaseException as e:
                err = e
        err = _broadcast(err if isinstance(err, CheckpointError) else (
            None if err is None else CheckpointError(f"cannot create {tmp}: {err}")))
        if err is not None:
            raise err
        try:
            write_fn(tmp)
            _barrier()
            if _rank() == 0:
                write_manifest(tmp, step, extra)
                if final.exists():  # the same step saved twice (e.g. a rerun after a crash right after publishing)
                    aside = final.with_name(f"{final.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                    _report(f"{final} already exists; moved to {aside.name} before publishing the new one")
                    final.rename(aside)
                os.replace(tmp, final)
                _fsync_path(self.dir)
        except BaseException as e:
            full = _disk_full(self.dir)  # before the partial files go
            # torch.save on a full disk: "unexpected pos" / "iostream error"; megatron's dist checkpoint wraps
            # its writer's failure in torch's CheckpointException, a BaseException
            disk = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or (
                full and not isinstance(e, (KeyboardInterrupt, SystemExit)))
            if not disk:
                if _rank() == 0:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
            what = e.strerror if isinstance(e, OSError) and e.strerror else _first_error_line(e)
            # The failed writer's file objects live on in the traceback's frames, and with them the space of the
            # deleted files: drop the frames before removing the partial save.
            x = e
            while x is not None:
                x.__traceback__ = None
                x = x.__context__
            del e
        else:
            what = None
        if what is not None:
            import gc

            gc.collect()
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise DiskSpaceError(
                f"the checkpoint of step {step} did not fit in {self.dir} ({what}); its partial files were removed "
                f"({_gib(free_bytes(self.dir))} free now). Free space there or point run_dir elsewhere")
        if _rank() == 0:
            self._retain(final)
        _barrier()
        return final

    def remove_leftovers(self, replaced_before: Optional[int] = None) -> list[Path]:
        """Remove what interrupted saves left (rank 0, under the run-directory lock): every ``.tmp_step_*`` and
        ``*.partial-*``, and a ``step_X.replaced-*`` (a checkpoint a later save of step X moved aside, kept for
        inspection) once X < ``replaced_before``, i.e. once retention would have removed step X itself.
        Returns what was removed."""
        gone = []
        if self.dir.is_dir():
            for p in sorted(self.dir.iterdir()):
                m = _LEFTOVER_RE.match(p.name)
                if not m:
                    continue
                if m.group(2) == "replaced":
                    step = int(p.name[len("step_"):].split(".")[0])
                    if replaced_before is None or step >= replaced_before:
                        continue
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                gone.append(p)
        return gone

    def _retain(self, newest: Path) -> None:
        """Delete complete checkpoints older than the newest ``keep`` complete ones, and leftovers of
        interrupted saves (rank 0). Never deleted: incomplete ``step_*`` (left for inspection), the one just
        published, and the newest checkpoint whose manifest records finite state."""
        complete = [p for _, p in self.steps() if (p / MANIFEST).is_file()]
        finite = [p for p in complete if (read_manifest(p) or {}).get("finite") is True]
        newest_finite = finite[-1] if finite else None
        for p in complete[:-self.keep]:
            if p != newest and p != newest_finite:
                shutil.rmtree(p)
        kept = [int(_STEP_RE.match(p.name).group(1)) for p in complete[-self.keep:]]
        self.remove_leftovers(replaced_before=min(kept) if kept else None)

    def complete(self) -> list[Path]:
        """Complete checkpoints, newest first (verification on rank 0, broadcast); incomplete ones are
        reported once and skipped."""
        result: list = []
        if _rank() == 0:
            for _step, p in reversed(self.steps()):
                reason = verify(p, self.required)
                if reason is None:
                    result.append(str(p))
                else:
                    _report(f"skipping checkpoint {p}: {reason}; left in place for inspection")
        return [Path(p) for p in _broadcast(result)]

    # -- discovery --------------------------------------------------------------------------------------
    def latest(self) -> Optional[Path]:
        """Newest complete checkpoint, None when there is none at all.

        Incomplete or corrupt ones are reported (one line on stderr) and skipped, never deleted. Raises
        CheckpointError when ``step_*`` directories exist but none is complete: starting from scratch
        over them would silently throw the run away.
        """
        result = None
        if _rank() == 0:
            bad = []
            for _step, p in reversed(self.steps()):
                reason = verify(p, self.required)
                if reason is None:
                    result = str(p)
                    break
                bad.append((p, reason))
                _report(f"skipping checkpoint {p}: {reason}; left in place for inspection")
            if result is None and bad:
                result = CheckpointError(
                    f"no complete checkpoint in {self.dir}: "
                    + "; ".join(f"{p.name}: {r}" for p, r in bad)
                    + ". Restore a good copy, or move these directories out of the way to start this run "
                      "from scratch (or choose another run_dir).")
        result = _broadcast(result)
        if isinstance(result, CheckpointError):
            raise result
        return Path(result) if result else None


def _first_error_line(e: BaseException) -> str:
    """The line of an exception's text that says what failed: the first, or for a wrapper that lists its ranks'
    tracebacks (torch's CheckpointException) the last line that names an error."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
    if len(lines) > 1:
        named = [x for x in lines if "Error" in x or "error" in x]
        if named:
            return named[-1]
    return lines[0]


def _disk_full(path: Path) -> bool:
    try:
        return free_bytes(path) < (1 << 20)
    except OSError:
        return False


# -- one writer per run directory -------------------------------------------------------------------------------
LOCK_FILE = ".lock"


def _boot_id() -> Optional[str]:
    """This host's boot id (Linux), or None where the system has none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _pid_start(pid: int) -> Optional[int]:
    """When process ``pid`` started, in clock ticks since boot (Linux /proc), or None where unknown: a pid that
    runs with another start time than its lock records was reused by an unrelated process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDirLock:
    """``run_dir/.lock``: the run directory's one writer (rank 0 of the job that holds it).

    Taken with ``open(O_CREAT | O_EXCL)``, which is atomic on local file systems, on NFSv3+ and on Lustre
    (the shared file systems Slurm clusters use); the file holds the holder's host, pid and SLURM_JOB_ID.
    A lock is stale, and is taken over, when its holder is gone:

    * the same host and a pid that no longer runs, or runs but started at another time than the holder (the
      pid was reused, e.g. after a container restart), or the host has rebooted since (another boot id);
    * the same SLURM_JOB_ID from an earlier incarnation (a requeued job: Slurm ended the earlier one before
      starting this one; SLURM_RESTART_COUNT tells them apart). Two launches in the same incarnation of one
      job (two ``srun`` steps at once) follow the host and pid rule instead, so the second one is refused.

    A lock held from another host without a matching job id is never broken automatically: the message
    names the holder; remove the file by hand once that process is certainly gone.
    """

    def __init__(self, run_dir: Path | str, env: Optional[dict] = None):
        self.path = Path(run_dir) / LOCK_FILE
        self.env = os.environ if env is None else env
        self.held = False

    def _me(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(),
                "slurm_job_id": self.env.get("SLURM_JOB_ID") or None,
                "slurm_restart_count": self.env.get("SLURM_RESTART_COUNT") or "0",
                "boot_id": _boot_id(), "pid_start": _pid_start(os.getpid()),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def holder(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def stale(self, holder: dict) -> Optional[str]:
        """Why the lock of ``holder`` may be taken over, or None when its holder may be alive."""
        me = self._me()
        same_job = bool(holder.get("slurm_job_id")) and holder.get("slurm_job_id") == me["slurm_job_id"]
        # a lock from before restart counts were recorded counts as an earlier incarnation
        if same_job and str(holder.get("slurm_restart_count")) != me["slurm_restart_count"]:
            return (f"same Slurm job {me['slurm_job_id']}, earlier incarnation (restart "
                    f"{holder.get('slurm_restart_count')}, now {me['slurm_restart_count']}: requeued)")
        if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int):
            pid = holder["pid"]
            if pid == me["pid"]:
                return "held by this process"
            if holder.get("boot_id") and me["boot_id"] and holder["boot_id"] != me["boot_id"]:
                return f"{me['host']} has restarted since process {pid} took it"
            if not _pid_alive(pid):
                return f"process {pid} on {me['host']} is gone"
            now = _pid_start(pid)
            if holder.get("pid_start") is not None and now is not None and now != holder["pid_start"]:
                return f"process {pid} on {me['host']} is gone (its pid now belongs to another process)"
        elif same_job and holder.get("host") != me["host"]:
            # the same incarnation from another node: its pid cannot be checked from here; earlier versions
            # took such a lock over as a requeue, so keep doing that (documented in docs/failures.md)
            return f"same Slurm job {me['slurm_job_id']} from {holder.get('host')} (requeued)"
        return None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._me(), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def acquire(self) -> None:
        try:
            self._acquire()
        except OSError as e:
            raise RunDirLocked(f"cannot create the lock {self.path} ({e.strerror or e}): the run directory must be "
                               "writable by this job") from None

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self.held = True
                return
            holder = self.holder()
            if holder is None:  # released in between
                continue
            why = self.stale(holder) if holder else None
            if why is None:
                who = (f"host {holder.get('host')}, pid {holder.get('pid')}, SLURM_JOB_ID {holder.get('slurm_job_id') or 'none'}, "
                       f"since {holder.get('started')}") if holder else "unreadable lock file"
                raise RunDirLocked(
                    f"{self.path.parent} is in use by another training process ({who}): one run directory has one "
                    f"writer. Wait for it to finish, use another run_dir, or, if that process is certainly gone, "
                    f"remove {self.path}")
            # take over a stale lock: move it aside atomically (only one taker succeeds), then create ours
            aside = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            _report(f"taking over the lock of {self.path.parent} ({why})")
            aside.unlink(missing_ok=True)
        raise RunDirLocked(f"could not take the lock {self.path} (another launch is taking it at the same time)")

    def release(self) -> None:
        if self.held:
            holder = self.holder()
            if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
            self.held = False
