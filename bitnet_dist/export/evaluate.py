"""bitnet-eval: perplexity of a checkpoint or an export on a text file, a JSONL file or an indexed dataset.

    bitnet-eval MODEL DATA [--max-length N] [--config RUN_DIR/config.yaml] [--json]

MODEL: a checkpoint (RUN_DIR/checkpoints/step_*), a run directory (its newest complete checkpoint) or a
bitnet-export directory. A checkpoint is scored by the project's own model (the TP=1 GPTModel of bitnet_dist,
fp32, CPU, at the activation bits of its last step); an export by transformers.

DATA: ``*.jsonl`` (one document per line, its ``"text"`` field), any other text file (documents separated by
blank lines), or the prefix of an indexed dataset (PREFIX.bin / PREFIX.idx of bitnet-preprocess: already token
ids, each document ending with its end-of-document token).

Scoring is lm-evaluation-harness's rolling log-likelihood (``loglikelihood_rolling``): each document's tokens,
after one end-of-document token as the first context, are predicted in disjoint windows of ``max_length`` (the
model's max_position_embeddings by default), each window's input being the ``max_length`` tokens before its
last target. Perplexity = exp(-sum of log-likelihoods / number of predicted tokens). The same numbers come out
of ``lm_eval --model hf --model_args pretrained=EXPORT,trust_remote_code=True`` on a task with
``output_type: loglikelihood_rolling`` (docs/export.md).
"""
from __future__ import annotations

import abc
import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from bitnet_dist.errors import ConfigError
from bitnet_dist.export import ensure_transformers, quiet_library_warnings, require_hf
from bitnet_dist.export.reader import ExportError

ensure_transformers()


@dataclass
class Perplexity:
    documents: int
    tokens: int
    loglikelihood: float  # sum over every predicted token (natural log)
    perplexity: float
    max_length: int


def rolling_windows(tokens: list[int], prefix: int, max_length: int):
    """(input ids, target ids) covering every token once, the targets being predicted at the last positions of
    the input (lm-eval's rolling windows with context length 1)."""
    full = [prefix] + list(tokens)
    n = len(tokens)
    start = 0
    while start < n:
        end = min(start + max_length, n)
        lo = max(0, end - max_length)  # full[lo:end]: the max_length tokens before the last target
        yield full[lo:end], list(tokens[start:end])
        start = end


# ------------------------------------------------------------------------------------------ data
def read_documents(data, tokenizer_encode: Callable[[str], list[int]]) -> Iterable[list[int]]:
    """Token ids per document of a JSONL / text file, or an indexed dataset prefix."""
    data = Path(data)
    if data.suffix == ".jsonl" and data.is_file():
        for i, line in enumerate(data.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                raise ExportError(f"{data}:{i + 1} is not a JSON object with a \"text\" field") from None
            ids = tokenizer_encode(text)
            if ids:
                yield ids
        return
    if data.is_file():
        for para in data.read_text(encoding="utf-8").split("\n\n"):
            if para.strip():
                yield tokenizer_encode(para)
        return
    if Path(str(data) + ".idx").is_file() and Path(str(data) + ".bin").is_file():
        from bitnet_dist.data.indexed import DocTokens

        docs = DocTokens.open(data)
        for i in range(docs.num_docs):
            ids = [int(t) for t in docs.doc(i)]
            if ids:
                yield ids
        return
    raise ExportError(f"{data}: not a .jsonl file, a text file, nor an indexed dataset prefix (PREFIX.bin / PREFIX.idx)")


# ------------------------------------------------------------------------------------------ scorers
class _Scorer(abc.ABC):
    """What perplexity needs of a model: its tokenizer and its per-position log-probabilities."""

    eod_id: int
    max_length: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (the model's own tokenizer)."""

    @abc.abstractmethod
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), V] fp64 log-softmax of the logits at every input position."""


class ProjectScorer(_Scorer):
    """The project's own GPTModel (TP=1, fp32; CPU or ``device``) holding a checkpoint's weights."""

    def __init__(self, checkpoint, config=None, device: str = "cpu"):
        from bitnet_dist.export.reader import load_project_model, load_run

        self.run = load_run(checkpoint, config)
        self.device = device
        self.model = load_project_model(self.run, device=device)
        self.eod_id = self.run.tokenizer.eod_id
        self.max_length = self.run.cfg.model.max_sequence_length
        self.vocab = self.run.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.run.tokenizer.encode(text)

    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor([ids], device=self.device)
        logits = self.model(t, torch.arange(len(ids), device=self.device)[None], None)[0, :, :self.vocab]
        return torch.log_softmax(logits.double(), dim=-1).cpu()


class HFScorer(_Scorer):
    """A Hugging Face export through transformers."""

    def __init__(self, path, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                          trust_remote_code=True).to(device).eval()
        self.tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
        self.eod_id = self.tok.eos_token_id
        self.max_length = int(self.model.config.max_position_embeddings)
        self.device = device

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        logits = self.model(torch.tensor([ids], device=self.device)).logits[0]
        return torch.log_softmax(logits.double(), dim=-1).cpu()


def scorer_for(model_path, *, config=None, device: str = "cpu") -> _Scorer:
    from bitnet_dist.export.generate import _resolve_model_dir

    path = Path(model_path).resolve()
    if not path.exists():
        raise ExportError(f"{path} does not exist")
    kind, path = _resolve_model_dir(path)
    return HFScorer(path, device) if kind == "export" else ProjectScorer(path, config, device)


def perplexity(scorer: _Scorer, data, max_length: Optional[int] = None) -> Perplexity:
    """Rolling log-likelihood perplexity of ``scorer`` on ``data`` (see the module docstring)."""
    L = int(max_length or scorer.max_length)
    if L < 1:
        raise ConfigError("max_length", L, "an integer >= 1")
    total, ntok, ndoc = 0.0, 0, 0
    for ids in read_documents(data, scorer.encode):
        ndoc += 1
        for window, targets in rolling_windows(ids, scorer.eod_id, L):
            lp = scorer.logprobs(window)[-len(targets):]
            total += float(lp.gather(1, torch.tensor(targets)[:, None]).sum())
            ntok += len(targets)
    if ntok == 0:
        raise ExportError(f"{data} holds no tokens to score")
    return Perplexity(documents=ndoc, tokens=ntok, loglikelihood=total, perplexity=math.exp(-total / ntok),
                      max_length=L)


def main(argv=None) -> None:
    """Console script ``bitnet-eval``."""
    ap = argparse.ArgumentParser(prog="bitnet-eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a checkpoint (RUN_DIR/checkpoints/step_*), a run directory or a bitnet-export directory")
    ap.add_argument("data", help="a .jsonl file (\"text\" per line), a text file (blank-line separated documents) or "
                                 "an indexed dataset prefix")
    ap.add_argument("--max-length", type=int, default=None, help="window length (default: the model's)")
    ap.add_argument("--config", default=None, help="a checkpoint's run config.yaml (default: RUN_DIR/config.yaml)")
    ap.add_argument("--device", default="cpu", help="cpu (default) | cuda[:N]: where the model runs (a checkpoint: the "
                    "project's own model; an export: transformers)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = ap.parse_args(argv)
    require_hf("bitnet-eval")
    quiet_library_warnings()
    try:
        res = perplexity(scorer_for(args.model, config=args.config, device=args.device), args.data, args.max_length)
    except (ConfigError, ExportError) as e:
        print(f"bitnet-eval: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if args.json:
        print(json.dumps(asdict(res)), flush=True)
    else:
        print(f"bitnet-eval: {res.documents} documents, {res.tokens} tokens, perplexity {res.perplexity:.4f} "
              f"(mean NLL {-res.loglikelihood / res.tokens:.5f}, window {res.max_length})", flush=True)


if __name__ == "__main__":
    main()
