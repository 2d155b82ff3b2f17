"""bitnet-generate and bitnet-eval on a model the train app trained: the quick start's model and precision
(model=small, v2_a8_to_a4) trained briefly by experiment=smoke on synthetic tokens (the byte tokenizer; the Brown
corpus of the real quick start is a download), DeepSpeed on the CPU, past the 8 -> 4-bit switch:

* greedy decoding with the KV cache equals transformers' ``generate`` on the export token for token, and the
  project's own model decoded without a cache (full recompute per token);
* a sampled continuation (temperature / top-k / top-p, seeded) has >= 20 tokens and is reproducible by seed;
* bitnet-eval's perplexity of the checkpoint (the project's model) and lm-evaluation-harness's rolling
  log-likelihood of the export agree within 1e-4 relative; lm-eval runs a local task (YAML + JSONL) end to end;
* the export's model card carries the run's configuration and final validation loss.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from bitnet_dist.export import ensure_transformers

ensure_transformers()
pytest.importorskip("transformers", reason="the hf extra (pip install -e '.[hf]') is not installed")

import export_utils as eu  # noqa: E402
from dist_utils import run_ranks  # noqa: E402

pytestmark = pytest.mark.slow

ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")

# Bundled text for the local evaluation task (the hub is unreachable in CI); the last document is longer than
# the 256-token window both sides score with, so the rolling windows are exercised.
DOCS = [
    "The jury said it did find that many of the registration and election laws were outmoded or inadequate.",
    "It recommended that the legislature provide enabling funds to re-set the election system.",
    "Merger proposed. The mayor said the two offices would be merged to save money for the city.",
    " ".join(["A long document keeps going so that it needs more than one window of the model's context;"] * 8),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run_dir, last checkpoint, export dir) of a smoke run trained by the train app."""
    root = tmp_path_factory.mktemp("smoke")
    run_dir = root / "run"
    args = ["experiment=smoke", "model=small", "precision=v2_a8_to_a4", "engine=deepspeed", "trainer.dtype=fp32", "logging.wandb=disabled",
            "trainer.max_steps=12", "optim.warmup_steps=2", "trainer.eval_interval=6", "trainer.save_interval=6",
            "trainer.stats_interval=0", "trainer.progress_bar=false", "trainer.report=false",
            "precision.switch_fraction=0.5", f"run_dir={run_dir}"]
    p = subprocess.run([sys.executable, "-m", "bitnet_dist.train", *args], env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "step_00000012"
    assert ckpt.is_dir()
    out = root / "hf"
    p = subprocess.run([sys.executable, "-m", "bitnet_dist.export.hf", str(ckpt), str(out)], env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return run_dir, ckpt, out


def test_export_of_a_trained_run(trained):
    run_dir, ckpt, out = trained
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_type"] == "bitnet_v2" and conf["act_bits"] == 4  # trained past the 8 -> 4 switch
    card = (out / "README.md").read_text()
    val = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert f"{val[-1]['val_loss']:.4f}" in card and "step 12" in card
    assert "precision:" in card and "name: v2_a8_to_a4" in card  # the run configuration
    from transformers import AutoTokenizer

    from bitnet_dist.data.tokenizer import ByteTokenizer

    ours = ByteTokenizer(512)  # the smoke run's synthetic data (conf/data/synthetic.yaml): bytes, EOD = 511
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == conf["eos_token_id"] == ours.eod_id and conf["vocab_size"] == 512
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token_id == ours.eod_id
    text = "Héllo, wörld! 123"
    assert tok.encode(text, add_special_tokens=False) == ours.encode(text)
    assert tok.decode(ours.encode(text)) == text


def test_greedy_kv_cache_equals_transformers_and_the_project_model(trained):
    _, ckpt, out = trained
    res = run_ranks(eu.generate_worker, 1, str(ckpt), str(out), 40)[0]
    assert res["ours"] == res["hf"], res
    assert res["ours"] == res["project_no_cache"], res
    assert len(res["ours"]) >= 20 or res["ours"][-1] == res["eos"]


def test_sampling(trained):
    _, ckpt, out = trained
    res = run_ranks(eu.sampling_worker, 1, str(out))[0]
    assert len(res["a"]) >= 20
    assert res["a"] == res["a_again"]  # the seed fixes the continuation
    assert res["a"] != res["b"]  # another seed, another continuation
    assert res["top_k1"] == res["greedy"]  # top-k 1 keeps only the argmax
    assert res["text"]


def test_filter_logits_against_a_direct_count():
    from bitnet_dist.export.generate import filter_logits

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    p = torch.softmax(logits, -1)
    assert torch.isinf(filter_logits(logits, 2, 1.0)[2:]).all() and torch.isfinite(filter_logits(logits, 2, 1.0)[:2]).all()
    # top-p: the smallest prefix of the sorted probabilities whose sum reaches p
    for top_p in (0.3, 0.6, 0.9, 0.99):
        keep = int((torch.cumsum(p, 0) < top_p).sum()) + 1
        got = torch.isfinite(filter_logits(logits, 0, top_p))
        assert got.tolist() == [i < keep for i in range(5)], top_p
    shuffled = logits[[3, 0, 4, 2, 1]]
    assert torch.isfinite(filter_logits(shuffled, 0, 0.6)).tolist() == [False, True, False, False, True]


def test_generate_cli_from_the_run_directory(trained):
    run_dir, _, _ = trained
    p = subprocess.run([sys.executable, "-m", "bitnet_dist.export.generate", str(run_dir), "--prompt", "The jury",
                        "--max-new-tokens", "24", "--temperature", "0.8", "--top-k", "50", "--seed", "0"], env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith("The jury") and len(p.stdout.strip()) > len("The jury")


def test_project_model_stays_on_the_cpu_where_cuda_is_the_current_device(trained):
    """bitnet-eval of a checkpoint (and the export tests' reference) keep the project model on the CPU; on a CUDA
    machine megatron's RoPE moved its angle table to the GPU and the forward failed (H100, 2026-12-07)."""
    res = run_ranks(eu.host_model_worker, 1, str(trained[1]))[0]
    assert res["equal"] and res["device"] == "cpu", res
    assert res["bare_error"] is not None, "the simulation does not reproduce the CUDA machine's failure"


def test_perplexity_agrees_with_lm_eval(trained, tmp_path):
    _, ckpt, out = trained
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    res = run_ranks(eu.eval_worker, 1, str(ckpt), str(out), str(data), str(tmp_path))[0]
    ours, hf, lm = res["project"], res["export"], res["lm_eval_loglikelihood"]
    assert ours["tokens"] == sum(len(d.encode()) for d in DOCS) and len(DOCS[-1]) > 2 * 256
    assert math.isfinite(ours["perplexity"]) and ours["perplexity"] > 1
    assert abs(hf["loglikelihood"] - ours["loglikelihood"]) <= 1e-4 * abs(ours["loglikelihood"])
    ppl_lm = math.exp(-lm / ours["tokens"])
    assert abs(ppl_lm - ours["perplexity"]) <= 1e-4 * ours["perplexity"], (ppl_lm, ours)
    assert res["lm_eval_docs"] == len(DOCS)
    assert res["lm_eval_metrics"]["word_perplexity,none"] > 1
    # the indexed dataset of the same documents (each ending with its EOD token) scores one more token each
    assert res["indexed"]["tokens"] == ours["tokens"] + len(DOCS)
