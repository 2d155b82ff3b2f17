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
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one is required (the message names the directory and the fix)."""


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


def write_manifest(ckpt_dir: Path, step: int) -> dict:
    """fsync every file (and directory) under ``ckpt_dir``, then write and fsync its manifest."""
    files = {}
    for p in _files(ckpt_dir):
        _fsync_path(p)
        files[p.relative_to(ckpt_dir).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    for d in sorted({p.parent for p in _files(ckpt_dir)} | {ckpt_dir}, key=lambda q: -len(q.parts)):
        _fsync_path(d)
    manifest = {"step": step, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
    tmp = ckpt_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_dir / MANIFEST)
    _fsync_path(ckpt_dir)
    return manifest


def verify(ckpt_dir: Path) -> Optional[str]:
    """None when ``ckpt_dir`` is a complete checkpoint, else the reason it is not."""
    mpath = ckpt_dir / MANIFEST
    if not mpath.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest.json ({e})"
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


class CheckpointManager:
    """Atomic checkpoints under ``run_dir/checkpoints``; keeps the newest ``keep`` complete ones."""

    def __init__(self, run_dir: Path | str, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep = keep

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
    def save(self, step: int, write_fn: Callable[[Path], None]) -> Path:
        """Every rank calls this; ``write_fn(tmp_dir)`` writes this rank's files into the shared temporary
        directory. Returns the published directory ``step_{step:08d}``."""
        final, tmp = self.path(step), self.dir / f".tmp_step_{step:08d}"
        if _rank() == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # a save of this step that died half-way: keep it for inspection, out of the way
                aside = tmp.with_name(f"{tmp.name}.partial-{time.strftime('%Y%m%d-%H%M%S')}")
                _report(f"{tmp} is a partial save from an earlier attempt; moved to {aside.name}")
                tmp.rename(aside)
            tmp.mkdir()
        _barrier()
        write_fn(tmp)
        _barrier()
        if _rank() == 0:
            write_manifest(tmp, step)
            if final.exists():  # the same step saved twice (e.g. a rerun after a crash right after publishing)
                aside = final.with_name(f"{final.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                _report(f"{final} already exists; moved to {aside.name} before publishing the new one")
                final.rename(aside)
            os.replace(tmp, final)
            _fsync_path(self.dir)
            self._retain(final)
        _barrier()
        return final

    def _retain(self, newest: Path) -> None:
        """Delete complete checkpoints older than the newest ``keep`` complete ones (rank 0). Incomplete
        ones are never deleted; the one just published is never deleted."""
        complete = [p for _, p in self.steps() if (p / MANIFEST).is_file()]
        for p in complete[:-self.keep]:
            if p != newest:
                shutil.rmtree(p)

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
                reason = verify(p)
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
