"""megatron-core GPT datasets over the project's indexed files (``bitnet-preprocess`` output).

``build_gpt_datasets`` turns ``data.paths`` / ``data.valid_paths`` into megatron's
``BlendedMegatronDatasetBuilder(GPTDataset, ...)``: blends (``[w1, prefix1, w2, prefix2, ...]``),
a train/valid split by document (``data.valid_fraction``) when no separate validation files are given,
sample indices built on global rank 0 and cached under ``cache_dir`` while the other ranks wait at a
barrier and then read the cache. ``GPTTrainStream`` / ``valid_batches`` cut the samples into this
data-parallel rank's micro-batches in the Batch format of bitnet_dist.engines.base.

Why the pre-check (``check_splits``): megatron's GPTDataset loops forever in ``_get_num_epochs`` when
a split that must produce samples has no documents (gpt_dataset.py:626-637), and the other ranks then
wait at the builder's barrier: a silent hang. We compute megatron's document split ourselves on every
rank (reading only the .idx files) and raise one clear error on all ranks instead.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from bitnet_dist.errors import ConfigError

Batch = dict[str, torch.Tensor]
SPLITS = ("train", "valid", "test")


class DatasetTokenizer:
    """What megatron's GPTDataset reads from a tokenizer: ``vocab_size``, ``eod`` and
    ``unique_identifiers`` (part of the cache key of the built indices)."""

    def __init__(self, vocab_size: int, eod_id: int, name: str = "bitnet"):
        self.vocab_size = int(vocab_size)
        self.eod = int(eod_id)
        self.unique_identifiers = {"class": name, "vocab_size": self.vocab_size, "eod": self.eod}

    @classmethod
    def wrap(cls, tok) -> "DatasetTokenizer":
        """From the data pipeline's tokenizer (``.vocab_size``, ``.eod_id``)."""
        name = type(tok).__name__
        try:
            from bitnet_dist.data.tokenizer import tokenizer_fingerprint

            name = f"{name}:{tokenizer_fingerprint(tok)}"
        except Exception:  # fingerprint is an optional refinement of the cache key
            pass
        return cls(tok.vocab_size, tok.eod_id, name)


def parse_blend(paths: Sequence[Any], key: str = "data.paths") -> tuple[list[str], Optional[list[float]]]:
    """``[prefix]``, ``[p1, p2]`` (weights by size) or ``[w1, p1, w2, p2]`` -> (prefixes, weights or None)."""
    paths = list(paths)
    if not paths:
        raise ConfigError(key, paths, "one or more indexed-dataset prefixes, e.g. [/data/corpus] or [0.7,/data/a,0.3,/data/b]")

    def is_num(x):
        try:
            float(x)
            return True
        except (TypeError, ValueError):
            return False

    if all(not is_num(p) for p in paths):
        return [str(p) for p in paths], None
    if len(paths) % 2 or not all(is_num(w) for w in paths[0::2]) or any(is_num(p) for p in paths[1::2]):
        raise ConfigError(key, paths, "either prefixes only or alternating weight, prefix pairs: [0.7,/data/a,0.3,/data/b]")
    weights = [float(w) for w in paths[0::2]]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(key, paths, "non-negative blend weights with a positive sum")
    return [str(p) for p in paths[1::2]], weights


def _split_ranges(num_docs: int, split_vector: Sequence[float]) -> list[tuple[int, int]]:
    """Document ranges per split exactly as megatron computes them (blended_megatron_dataset_builder.py:
    ``beg = round(split[i][0] * n)``, ``end = round(split[i][1] * n)``)."""
    from megatron.core.datasets.blended_megatron_dataset_config import convert_split_vector_to_split_matrix

    out = []
    for bounds in convert_split_vector_to_split_matrix(list(split_vector)):
        if bounds is None:
            out.append((0, 0))
        else:
            out.append((int(round(bounds[0] * float(num_docs))), int(round(bounds[1] * float(num_docs)))))
    return out


def _index(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    p = Path(prefix)
    if not Path(str(p) + ".idx").is_file() or not Path(str(p) + ".bin").is_file():
        from bitnet_dist.data.errors import DataError

        raise DataError(f"indexed dataset {prefix}.bin/.idx not found: make it with "
                        f"`bitnet-preprocess --input docs.jsonl --output-prefix {prefix}` or fix data.paths")
    from bitnet_dist.data.indexed import check_indexed

    check_indexed(str(p))  # damaged, mismatched or empty .bin/.idx: one DataError naming the file and the fix
    return IndexedDataset(str(p), mmap=True)


def check_splits(prefixes: Sequence[str], split_vector: Sequence[float], sizes: Sequence[Optional[int]],
                 key: str = "data.valid_fraction") -> list[list[int]]:
    """Documents per (prefix, split); ConfigError when a split asked for samples has no tokens.

    Returns counts[prefix][split]. Runs on every rank (only the .idx headers are read), so all
    ranks fail together rather than some waiting at megatron's barrier forever.
    """
    counts = []
    for prefix in prefixes:
        ds = _index(prefix)
        lengths = np.asarray(ds.sequence_lengths)
        n = len(lengths)
        row = []
        for i, (beg, end) in enumerate(_split_ranges(n, split_vector)):
            row.append(end - beg)
            if sizes[i] and (end <= beg or int(lengths[beg:end].sum()) == 0):
                frac = split_vector[i]
                raise ConfigError(key, frac,
                                  f"a split that leaves the {SPLITS[i]} split of {prefix} at least one document: it has "
                                  f"{n} documents and the {SPLITS[i]} share {frac:.4g} rounds to {end - beg} "
                                  f"(need a fraction >= {1.0 / max(n, 1):.3g}, more documents, or separate "
                                  f"data.valid_paths)")
        counts.append(row)
    return counts


def build_gpt_datasets(cfg, tokenizer, *, num_samples: Sequence[Optional[int]], cache_dir: Optional[Path] = None,
                       is_built_on_rank: Callable[[], bool] = lambda: True):
    """(train, valid, test) megatron datasets (BlendedDataset / GPTDataset / None) for ``cfg.data``.

    ``num_samples``: samples per split (train = max_steps * global_batch_size, valid = eval sequences).
    ``is_built_on_rank``: every rank by default, because in our engines every rank (all TP and PP
    ranks too) reads its own micro-batches; rank 0 still builds the index cache first.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    d, t = cfg.data, cfg.trainer
    if not isinstance(tokenizer, DatasetTokenizer):
        tokenizer = DatasetTokenizer.wrap(tokenizer)
    # megatron asserts size None => no blend weights; 0 asks for nothing and works with weights
    sizes = [0 if s is None else int(s) for s in list(num_samples) + [None] * (3 - len(num_samples))]
    common = dict(random_seed=t.seed, sequence_length=t.seq_length, tokenizer=tokenizer,
                  reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                  create_attention_mask=False,  # causal SDPA builds its own mask
                  path_to_cache=str(cache_dir) if cache_dir is not None else None,
                  mid_level_dataset_surplus=0.005)
    if d.valid_paths:
        train_blend, valid_blend = parse_blend(d.paths), parse_blend(d.valid_paths, "data.valid_paths")
        check_splits(train_blend[0], [1.0, 0.0, 0.0], [sizes[0], None, None], key="data.paths")
        check_splits(valid_blend[0], [1.0, 0.0, 0.0], [sizes[1], None, None], key="data.valid_paths")
        gcfg = GPTDatasetConfig(blend_per_split=[train_blend, valid_blend, None], **common)
    else:
        vf = float(d.valid_fraction)
        if not 0.0 <= vf < 1.0:
            raise ConfigError("data.valid_fraction", vf, "a fraction in [0, 1)")
        split_vector = [1.0 - vf, vf, 0.0]
        blend = parse_blend(d.paths)
        if sizes[1] and vf == 0.0:
            raise ConfigError("data.valid_fraction", vf, "> 0 (validation samples were requested) or set data.valid_paths")
        check_splits(blend[0], split_vector, sizes)
        gcfg = GPTDatasetConfig(blend=blend, split=",".join(f"{x:.6f}" for x in split_vector), **common)
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank, gcfg).build()


def _collate(samples: list[dict]) -> Batch:
    return {
        "tokens": torch.stack([torch.as_tensor(s["tokens"], dtype=torch.int64) for s in samples]),
        "labels": torch.stack([torch.as_tensor(s["labels"], dtype=torch.int64) for s in samples]),
        "loss_mask": torch.stack([torch.as_tensor(s["loss_mask"], dtype=torch.float32) for s in samples]),
    }


def _rank_micro_batches(ds, start: int, num_micro: int, mbs: int, dp_rank: int, dp_size: int) -> list[Batch]:
    """Micro-batch j of rank r holds samples start + j*mbs*dp + r*mbs ... + mbs (megatron's pretraining
    sampler order), so a global batch is the same set of samples at every DP size."""
    out = []
    for j in range(num_micro):
        base = start + j * mbs * dp_size + dp_rank * mbs
        out.append(_collate([ds[(base + k) % len(ds)] for k in range(mbs)]))
    return out


class GPTTrainStream:
    """The TrainStream contract over a megatron dataset: ``next_step()`` -> this rank's micro-batches of
    one optimizer step; ``state_dict()`` / ``load_state_dict()`` resume at the exact sample."""

    def __init__(self, ds, *, micro_batch_size: int, global_batch_size: int, dp_rank: int, dp_size: int):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ConfigError("trainer.global_batch_size", global_batch_size,
                              f"a multiple of micro_batch_size * data_parallel = {micro_batch_size * dp_size}")
        self.ds, self.mbs, self.gbs = ds, micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_micro = global_batch_size // (micro_batch_size * dp_size)
        self.consumed_samples = 0

    def next_step(self) -> list[Batch]:
        out = _rank_micro_batches(self.ds, self.consumed_samples, self.num_micro, self.mbs, self.dp_rank, self.dp_size)
        self.consumed_samples += self.gbs
        return out

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, d: dict) -> None:
        self.consumed_samples = int(d["consumed_samples"])


def valid_batches(ds, num_micro_batches: int, *, micro_batch_size: int, dp_rank: int, dp_size: int) -> list[Batch]:
    """The same validation micro-batches on every call (samples from index 0)."""
    return _rank_micro_batches(ds, 0, num_micro_batches, micro_batch_size, dp_rank, dp_size)


def cache_key(*parts: Any) -> str:
    """Short stable hash for a cache sub-directory name."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
