"""bitnet_dist.checkpoint: atomic publication, manifest integrity, retention, corrupt-skip, never delete."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bitnet_dist.checkpoint import MANIFEST, CheckpointError, CheckpointManager, verify


def _writer(payload: bytes):
    def write(tmp: Path) -> None:
        (tmp / "model.bin").write_bytes(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "opt.bin").write_bytes(payload[::-1] + b"opt")
    return write


def test_save_publishes_manifest_with_sha256(tmp_path):
    m = CheckpointManager(tmp_path, keep=3)
    p = m.save(5, _writer(b"hello"))
    assert p == tmp_path / "checkpoints" / "step_00000005"
    manifest = json.loads((p / MANIFEST).read_text())
    assert manifest["step"] == 5
    assert manifest["files"]["model.bin"] == {"size": 5, "sha256": hashlib.sha256(b"hello").hexdigest()}
    assert manifest["files"]["sub/opt.bin"]["sha256"] == hashlib.sha256(b"ollehopt").hexdigest()
    assert not any(q.name.startswith(".tmp") for q in (tmp_path / "checkpoints").iterdir())
    assert verify(p) is None and m.latest() == p


def test_retention_keeps_last_k_and_never_deletes_incomplete(tmp_path):
    m = CheckpointManager(tmp_path, keep=2)
    for s in (1, 2):
        m.save(s, _writer(bytes([s]) * 10))
    broken = m.path(3)
    broken.mkdir()
    (broken / "model.bin").write_bytes(b"half")  # no manifest: a crash before publishing (or a bad copy)
    for s in (4, 5, 6):
        m.save(s, _writer(bytes([s]) * 10))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000003", "step_00000005", "step_00000006"]
    assert m.latest() == m.path(6)


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete_file", "no_manifest", "bad_manifest",
                                    "extra_file"])
def test_corrupt_latest_is_reported_skipped_and_kept(tmp_path, capsys, damage):
    m = CheckpointManager(tmp_path, keep=5)
    m.save(10, _writer(b"a" * 100))
    p = m.save(20, _writer(b"b" * 100))
    f = p / "sub" / "opt.bin"
    if damage == "flip_byte":
        data = bytearray(f.read_bytes())
        data[3] ^= 1
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:50])
    elif damage == "delete_file":
        f.unlink()
    elif damage == "no_manifest":
        (p / MANIFEST).unlink()
    elif damage == "bad_manifest":
        (p / MANIFEST).write_text("{not json")
    else:
        (p / "stray.bin").write_bytes(b"x")
    assert verify(p) is not None
    capsys.readouterr()
    assert m.latest() == m.path(10)
    err = capsys.readouterr().err
    assert "step_00000020" in err and "skipping" in err and err.count("\n") == 1  # one clear line
    assert p.is_dir()  # never deleted
    m.save(30, _writer(b"c" * 100))  # retention does not touch it either
    assert p.is_dir()


def test_only_corrupt_checkpoints_is_one_clear_error(tmp_path):
    m = CheckpointManager(tmp_path, keep=2)
    p = m.save(7, _writer(b"z" * 10))
    (p / "model.bin").write_bytes(b"y" * 10)  # same size, other content
    with pytest.raises(CheckpointError, match=r"no complete checkpoint.*step_00000007.*SHA-256.*move these"):
        m.latest()
    assert p.is_dir()


def test_empty_run_dir_has_no_checkpoint(tmp_path):
    assert CheckpointManager(tmp_path / "new").latest() is None


def test_crash_during_write_leaves_previous_checkpoint(tmp_path):
    """A process killed inside write_fn publishes nothing; the next save (the run directory's one writer, under
    its lock) removes the partial save (docs/failures.md)."""
    code = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from bitnet_dist.checkpoint import CheckpointManager
        m = CheckpointManager({str(tmp_path)!r}, keep=3)
        m.save(1, lambda d: (d / "model.bin").write_bytes(b"one"))
        def die(d):
            (d / "model.bin").write_bytes(b"partial")
            os._exit(9)
        m.save(2, die)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    m = CheckpointManager(tmp_path, keep=3)
    assert [p.name for _, p in m.steps()] == ["step_00000001"]
    assert m.latest() == m.path(1)
    assert (tmp_path / "checkpoints" / ".tmp_step_00000002").is_dir()
    m.save(2, _writer(b"full"))
    assert m.latest() == m.path(2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000001", "step_00000002"], names


@pytest.mark.slow
def test_two_ranks_write_one_checkpoint(tmp_path):
    """Every rank writes its own file into the shared temporary directory; rank 0 publishes after a barrier."""
    code = textwrap.dedent(f"""
        import os, sys, torch.distributed as dist
        from pathlib import Path
        from bitnet_dist.checkpoint import CheckpointManager
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2)
        m = CheckpointManager({str(tmp_path)!r}, keep=1)
        for step in (1, 2):
            p = m.save(step, lambda d: (d / f"rank{{rank}}.bin").write_bytes(bytes([rank, step]) * 1000))
        assert m.latest() == p, (m.latest(), p)
        dist.destroy_process_group()
    """)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), outs
    m = CheckpointManager(tmp_path, keep=1)
    assert [p.name for _, p in m.steps()] == ["step_00000002"]
    assert sorted(json.loads((m.path(2) / MANIFEST).read_text())["files"]) == ["rank0.bin", "rank1.bin"]
