"""Bad data gets one clear error naming the file (issue item 5): preprocessing and training start."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_failures import train_cli

REPO = Path(__file__).resolve().parents[2]


def preprocess(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "bitnet_dist.data.preprocess", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _good_lines(n=5):
    return [json.dumps({"text": f"document number {i} with a few words"}).encode() + b"\n" for i in range(n)]


@pytest.mark.parametrize("bad,expect", [
    (b'{"text": "caf\xe9 latin-1"}\n', "is not valid UTF-8 (byte 0xe9 at column 14)"),
    (b'{"text": null}\n', "'text' is null (null), not a string"),
    (b'{"text": 12345}\n', "'text' is 12345 (int), not a string"),
])
def test_preprocess_bad_record_names_file_and_line(tmp_path, bad, expect):
    src = tmp_path / "in.jsonl"
    lines = _good_lines()
    lines.insert(3, bad)  # line 4
    src.write_bytes(b"".join(lines))
    r = preprocess("--input", str(src), "--tokenizer", "gpt2", "--output-prefix", str(tmp_path / "out"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"{src}:4" in r.stderr and expect in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not list(tmp_path.glob("out*"))


@pytest.mark.parametrize("content", [b"", b"\n\n", b'{"text": "   "}\n{"text": ""}\n'], ids=["empty", "blank", "spaces"])
def test_preprocess_empty_corpus_is_an_error(tmp_path, content):
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    r = preprocess("--input", str(src), "--tokenizer", "gpt2", "--output-prefix", str(tmp_path / "out"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "holds no documents" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("out*"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    src = d / "in.jsonl"
    src.write_bytes(b"".join(_good_lines(200)))
    r = preprocess("--input", str(src), "--tokenizer", "gpt2", "--output-prefix", str(d / "corpus"))
    assert r.returncode == 0, r.stderr
    return d / "corpus"


def _damaged(dataset, tmp_path, kind):
    import shutil

    prefix = tmp_path / "corpus"
    for ext in (".bin", ".idx", ".meta.json"):
        shutil.copy(f"{dataset}{ext}", f"{prefix}{ext}")
    idx, binf = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    if kind == "idx-truncated":
        idx.write_bytes(idx.read_bytes()[:-20])
    elif kind == "idx-header":
        idx.write_bytes(b"GARBAGE!!" + idx.read_bytes()[9:])
    elif kind == "idx-tiny":
        idx.write_bytes(idx.read_bytes()[:10])
    elif kind == "bin-truncated":
        binf.write_bytes(binf.read_bytes()[:-7])
    elif kind == "bin-longer":
        binf.write_bytes(binf.read_bytes() + b"\0\0")
    elif kind == "empty":
        from bitnet_dist.data.indexed import write_indexed
        from bitnet_dist.data.tokenizer import load_tokenizer

        write_indexed(["", "   "], load_tokenizer("gpt2"), prefix)  # what an empty corpus used to produce
    return prefix


KINDS = {"idx-truncated": ".idx is", "idx-header": "is not a megatron index", "idx-tiny": "too short",
         "bin-truncated": ".bin is", "bin-longer": "extra bytes", "empty": "hold no documents"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_damaged_or_empty_index_is_one_clear_error(dataset, tmp_path, kind):
    from bitnet_dist.data.errors import DataError
    from bitnet_dist.data.indexed import DocTokens, check_indexed

    prefix = _damaged(dataset, tmp_path, kind)
    with pytest.raises(DataError) as e:
        DocTokens.open(prefix)
    assert KINDS[kind] in str(e.value) and str(prefix) in str(e.value) and "bitnet_dist.data.preprocess" in str(e.value)
    assert check_indexed(dataset)["documents"] == 200


@pytest.mark.slow  # runs the train app in subprocesses
@pytest.mark.parametrize("kind", ["empty", "bin-truncated"])
def test_training_start_refuses_damaged_or_empty_data(dataset, tmp_path, kind):
    prefix = _damaged(dataset, tmp_path, kind)
    r = train_cli(tmp_path / "run", "data=indexed", f"data.paths=[{prefix}]", "data.tokenizer=gpt2")
    assert r.returncode == 2, r.stderr[-3000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("bitnet-train:")]
    assert len(err) == 1 and "data error" in err[0] and KINDS[kind] in err[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr


