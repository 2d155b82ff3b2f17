"""Batches from indexed datasets: packing, blending, deterministic order, DP sharding, exact resume.

* A ``PackedSource`` concatenates a contiguous range of documents (each ends with EOD) and cuts it into
  windows of ``seq_length + 1`` tokens with stride ``seq_length`` (neighbouring windows share one token,
  as in megatron's GPTDataset), so every token but the first is a label once per epoch. Each epoch
  permutes the documents and then the windows with an RNG seeded by (trainer.seed, source, epoch):
  window j of a source is a pure function of j, which is what makes resume and sharding exact.
* ``blend_assign`` maps global sample k to (source, that source's sample count) with megatron's greedy
  rule (pick the source whose share lags its weight most): exact proportions, no RNG, O(sources).
* ``TrainStream`` step t uses global samples [t*G, (t+1)*G); DP rank r takes the contiguous slice
  [r*G/dp, (r+1)*G/dp) cut into micro-batches, so rank 0's micro-batches followed by rank 1's ... are
  the 1-rank global batch. Its state is three integers and the per-source counts (JSON).
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch

from bitnet_dist.data.errors import DataError
from bitnet_dist.data.indexed import DocTokens

Batch = dict[str, torch.Tensor]
log = logging.getLogger(__name__)

_SYNTHETIC_STREAM = 0x5EED


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


class PackedSource:
    """Windows int64 [seq_length + 1] over documents ``[doc_begin, doc_end)`` of one indexed dataset."""

    def __init__(self, docs: DocTokens, seq_length: int, *, seed: int, source_id: int, shuffle: bool,
                 doc_begin: int = 0, doc_end: int | None = None):
        self.docs, self.seq_length, self.shuffle = docs, int(seq_length), shuffle
        self.seed, self.source_id = int(seed), int(source_id)
        self.doc_begin = int(doc_begin)
        self.doc_end = docs.num_docs if doc_end is None else int(doc_end)
        n_tokens = int(docs.doc_len[self.doc_begin:self.doc_end].sum())
        self.num_tokens = n_tokens
        self.num_windows = max(0, (n_tokens - 1) // self.seq_length)
        if self.num_windows == 0:
            raise DataError(f"dataset {docs.prefix!r} (documents {self.doc_begin}..{self.doc_end}) has {n_tokens} "
                            f"tokens, fewer than trainer.seq_length+1 = {self.seq_length + 1}: add data or "
                            "lower trainer.seq_length")
        self._layouts: OrderedDict[int, tuple] = OrderedDict()

    def token_range(self) -> tuple[int, int]:
        """[start, end) in the .bin of this source's documents (they are contiguous)."""
        start = int(self.docs.doc_start[self.doc_begin])
        return start, start + self.num_tokens

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        lay = self._layouts.get(epoch)
        if lay is None:
            order = np.arange(self.doc_begin, self.doc_end, dtype=np.int64)
            perm = None
            if self.shuffle:
                rng = _rng(self.seed, self.source_id, epoch)
                order = order[rng.permutation(order.size)]
                perm = rng.permutation(self.num_windows)
            cum = np.concatenate([[0], np.cumsum(self.docs.doc_len[order])])
            lay = (order, cum, perm)
            self._layouts[epoch] = lay
            while len(self._layouts) > 2:  # a step straddles at most one epoch boundary
                self._layouts.popitem(last=False)
        return lay

    def window(self, j: int) -> np.ndarray:
        """The source's j-th sample (j may exceed one epoch): int64 [seq_length + 1]."""
        epoch, w = divmod(int(j), self.num_windows)
        order, cum, perm = self._layout(epoch)
        if perm is not None:
            w = int(perm[w])
        start, end = w * self.seq_length, w * self.seq_length + self.seq_length + 1
        d = int(np.searchsorted(cum, start, side="right")) - 1
        pieces = []
        while start < end:
            doc = int(order[d])
            lo, hi = start - int(cum[d]), min(end, int(cum[d + 1])) - int(cum[d])
            s0 = int(self.docs.doc_start[doc])
            pieces.append(self.docs.tokens[s0 + lo:s0 + hi])
            start = int(cum[d]) + hi
            d += 1
        return np.concatenate(pieces).astype(np.int64)


class SyntheticSource:
    """Uniform random tokens in [0, vocab_size); sample j is a pure function of (seed, stream, j)."""

    def __init__(self, vocab_size: int, seq_length: int, *, seed: int, stream: int = 0):
        self.vocab_size, self.seq_length, self.seed, self.stream = int(vocab_size), int(seq_length), int(seed), stream
        self.num_windows = 1 << 62
        self.num_tokens = None

    def window(self, j: int) -> np.ndarray:
        return _rng(self.seed, _SYNTHETIC_STREAM, self.stream, j).integers(0, self.vocab_size, self.seq_length + 1,
                                                                           dtype=np.int64)


def blend_assign(weights: Sequence[float], counts: list[int], first_sample: int, n: int) -> list[tuple[int, int]]:
    """(source, index within source) for global samples first_sample .. first_sample+n-1; updates ``counts``.

    Megatron's greedy rule (datasets/helpers.cpp build_blending_indices): at sample k pick the source
    with the largest ``weight * max(k, 1) - count``, first one on ties.
    """
    if len(weights) == 1:
        out = [(0, counts[0] + i) for i in range(n)]
        counts[0] += n
        return out
    w = np.asarray(weights, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    out = []
    for k in range(first_sample, first_sample + n):
        s = int(np.argmax(w * max(k, 1.0) - c))
        out.append((s, counts[s]))
        counts[s] += 1
        c[s] += 1.0
    return out


def make_batch(windows: np.ndarray) -> Batch:
    """[mbs, seq+1] int64 windows -> tokens/labels int64 [mbs, seq], loss_mask float32 [mbs, seq] (all ones)."""
    t = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64))
    return {"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(),
            "loss_mask": torch.ones(t.shape[0], t.shape[1] - 1, dtype=torch.float32)}


def _normalized(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    return [float(w) / total for w in weights]


class TrainStream:
    """This DP rank's micro-batches, one optimizer step at a time, resumable exactly."""

    def __init__(self, sources: Sequence, weights: Sequence[float], *, micro_batch_size: int,
                 global_batch_size: int, dp_rank: int, dp_size: int, signature: dict | None = None):
        if global_batch_size % (micro_batch_size * dp_size):
            raise DataError(f"trainer.global_batch_size={global_batch_size} is not a multiple of "
                            f"trainer.micro_batch_size*dp_size={micro_batch_size}*{dp_size}")
        self.sources, self.weights = list(sources), _normalized(weights)
        self.mbs, self.gbs, self.dp_rank, self.dp_size = micro_batch_size, global_batch_size, dp_rank, dp_size
        self.step = 0
        self.consumed_samples = 0
        self.source_counts = [0] * len(self.sources)
        self._signature = {"global_batch_size": global_batch_size, "weights": [round(w, 12) for w in self.weights],
                           **(signature or {})}

    @property
    def micro_batches_per_step(self) -> int:
        return self.gbs // (self.mbs * self.dp_size)

    def next_step(self) -> list[Batch]:
        """global_batch_size / (micro_batch_size * dp_size) micro-batches for this rank's share of one step."""
        assign = blend_assign(self.weights, self.source_counts, self.consumed_samples, self.gbs)
        per_rank = self.gbs // self.dp_size
        mine = assign[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        windows = np.stack([self.sources[s].window(j) for s, j in mine])
        self.step += 1
        self.consumed_samples += self.gbs
        return [make_batch(windows[i:i + self.mbs]) for i in range(0, per_rank, self.mbs)]

    def state_dict(self) -> dict:
        """JSON-able position; identical on every DP rank (it describes the global stream)."""
        return {"version": 1, "step": self.step, "consumed_samples": self.consumed_samples,
                "source_counts": list(self.source_counts), "signature": self._signature}

    def load_state_dict(self, state: dict) -> None:
        sig = state.get("signature")
        if sig != self._signature:
            diff = {k: (sig.get(k) if isinstance(sig, dict) else None, v) for k, v in self._signature.items()
                    if not isinstance(sig, dict) or sig.get(k) != v}
            raise DataError(f"the checkpoint's data position was made with other data settings {diff} "
                            "(saved, now): resume with the original data/trainer settings or start a new run_dir")
        self.step = int(state["step"])
        self.consumed_samples = int(state["consumed_samples"])
        self.source_counts = [int(c) for c in state["source_counts"]]


class ValidSet:
    """Fixed validation micro-batches: the first samples of the (unshuffled) validation blend, sharded like
    training; ``__call__(n)`` returns this rank's n micro-batches, the same every call. When the set
    has fewer windows than asked for, it wraps around (the report's validation covers it all)."""

    def __init__(self, sources: Sequence, weights: Sequence[float], *, micro_batch_size: int, dp_rank: int,
                 dp_size: int):
        self.sources, self.weights = list(sources), _normalized(weights)
        self.mbs, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self._cache: dict[int, list[Batch]] = {}

    @property
    def num_windows(self) -> int:
        return sum(s.num_windows for s in self.sources)

    def __call__(self, num_micro_batches: int) -> list[Batch]:
        n = int(num_micro_batches)
        if n not in self._cache:
            per_rank = n * self.mbs
            if per_rank * self.dp_size > self.num_windows:
                log.warning("validation asks for %d windows but the validation set has %d: repeating it",
                            per_rank * self.dp_size, self.num_windows)
            assign = blend_assign(self.weights, [0] * len(self.sources), 0, per_rank * self.dp_size)
            mine = assign[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
            windows = np.stack([self.sources[s].window(j) for s, j in mine]) if mine else np.zeros((0, 1), np.int64)
            self._cache = {n: [make_batch(windows[i:i + self.mbs]) for i in range(0, per_rank, self.mbs)]}
        return self._cache[n]


def unigram_perplexity(train: Sequence[PackedSource], valid: Sequence[PackedSource], vocab_size: int, *,
                       max_tokens: int = 200_000_000) -> float:
    """exp of the mean negative log-probability of the validation tokens under the training unigram
    distribution with add-one smoothing, p(t) = (count(t) + 1) / (N + vocab_size).

    Counts use at most ``max_tokens`` tokens per side (the first ones of each source), to bound the cost
    on large users' datasets; the bundled corpus is far below that.
    """
    def counts(sources: Sequence[PackedSource]) -> np.ndarray:
        c = np.zeros(vocab_size, dtype=np.int64)
        budget = max_tokens
        for src in sources:
            start, end = src.token_range()
            end = min(end, start + budget)
            budget -= end - start
            for s in range(start, end, 1 << 24):  # chunks bound the int64 copy of uint16 ids
                ids = np.asarray(src.docs.tokens[s:min(end, s + (1 << 24))])
                c += np.bincount(ids, minlength=vocab_size)[:vocab_size]
            if budget <= 0:
                break
        return c

    ct, cv = counts(train), counts(valid)
    logp = np.log(ct + 1.0) - math.log(ct.sum() + vocab_size)
    return float(math.exp(-(cv * logp).sum() / max(cv.sum(), 1)))
