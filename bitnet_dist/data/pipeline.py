"""``build_data``: from a TrainConfig to this DP rank's tokenizer, train stream and validation batches.

data.name:
  * ``brown``: the bundled Brown corpus (fetched once into the cache), tokenized once with
    data.tokenizer (``bpe``: trained on the train split and saved as RUN_DIR/tokenizer.json, reused on
    resume; ``gpt2``; or a tokenizer.json path) into indexed files;
  * ``indexed``: users' megatron indexed datasets, data.paths = [prefix] or [w1, prefix1, w2, prefix2, ...];
    validation from data.valid_paths, else the last data.valid_fraction of each dataset's documents;
  * ``synthetic``: uniform random tokens (benchmarks; nothing to learn).
Rank 0 prepares files while the other ranks wait; an error on rank 0 is raised on every rank.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch.distributed as dist

from bitnet_dist.data.corpus import prepare_brown_text, read_jsonl_texts, resolve_cache_dir
from bitnet_dist.data.errors import DataError
from bitnet_dist.data.indexed import DocTokens, indexed_exists, read_meta, write_indexed
from bitnet_dist.data.loader import PackedSource, SyntheticSource, TrainStream, ValidSet, unigram_perplexity
from bitnet_dist.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, tokenizer_fingerprint, train_bpe
from bitnet_dist.errors import ConfigError
from bitnet_dist.presets import padded_vocab_size  # one definition, re-exported

log = logging.getLogger(__name__)

DATA_NAMES = ("brown", "indexed", "synthetic")
TOKENIZERS = ("bpe", "gpt2")


@dataclass
class DataBundle:
    """What the train loop needs from the data pipeline (see the data contract in docs/data.md).

    ``vocab_size`` is the embedding size: tokenizer.vocab_size padded by
    bitnet_dist.presets.padded_vocab_size (lcm(128, TP); padded ids never occur in the data).
    """

    tokenizer: Any
    vocab_size: int
    train: Any  # loader.TrainStream
    valid: Callable[[int], list]  # num_micro_batches -> this rank's list[Batch], the same every call
    unigram_perplexity: float
    info: dict = field(default_factory=dict)  # files, token counts, tokenizer spec (for reports)


def _config_error(key: str, value, fix: str) -> Exception:
    return ConfigError(key, value, fix)


def _preprocess_hint(prefix: str) -> str:
    return (f"create it with `python -m bitnet_dist.data.preprocess --input YOUR.jsonl --json-key text "
            f"--tokenizer gpt2 --output-prefix {prefix}` (see docs/data.md)")


def parse_blend(paths, key: str = "data.paths") -> list[tuple[float | None, str]]:
    """[prefix] | [prefix1, prefix2, ...] | [w1, prefix1, w2, prefix2, ...] -> [(weight or None, prefix)].

    Weight None (no weights given) means "proportional to the dataset's size", like concatenation.
    """
    items = list(paths or [])
    if not items:
        raise _config_error(key, items, "a list [prefix] or [weight1, prefix1, weight2, prefix2, ...] of indexed "
                                        "datasets; " + _preprocess_hint("PREFIX"))

    def as_weight(x):
        if isinstance(x, bool):
            return None
        try:
            return float(x)
        except (TypeError, ValueError):
            return None

    weights = [as_weight(x) for x in items]
    if all(w is None for w in weights):
        return [(None, str(p)) for p in items]
    if len(items) % 2 or any(w is None for w in weights[0::2]) or any(w is not None for w in weights[1::2]):
        raise _config_error(key, items, "alternate weights and prefixes: [weight1, prefix1, weight2, prefix2, ...]")
    out = [(weights[i], str(items[i + 1])) for i in range(0, len(items), 2)]
    for w, p in out:
        if not (w > 0 and math.isfinite(w)):
            raise _config_error(key, items, f"positive weights (got {w} for {p})")
    return out


def check_data_config(cfg) -> None:
    """Cheap checks of cfg.data (no imports of megatron, no files written); ConfigError on a bad value."""
    d = cfg.data
    if d.name not in DATA_NAMES:
        raise _config_error("data.name", d.name, f"one of {', '.join(DATA_NAMES)}")
    tok = str(d.tokenizer)
    if tok not in TOKENIZERS and not (tok.endswith(".json") and Path(tok).expanduser().is_file()):
        raise _config_error("data.tokenizer", tok, "bpe (trained on the corpus, saved with the run), gpt2, or the "
                                                   "path of an existing HF tokenizer.json")
    if d.name == "indexed" and tok == "bpe":
        raise _config_error("data.tokenizer", tok, "with data=indexed, the tokenizer the files were made with: gpt2 "
                                                   "or the path of its tokenizer.json (bpe is trained on the bundled "
                                                   "corpus)")
    if not isinstance(d.vocab_size, int) or not 257 <= d.vocab_size <= 1 << 24:
        raise _config_error("data.vocab_size", d.vocab_size, "an integer between 257 and 16777216 (e.g. 8192)")
    if not 0.0 < float(d.valid_fraction) <= 0.5:
        raise _config_error("data.valid_fraction", d.valid_fraction, "a fraction in (0, 0.5], e.g. 0.05")
    if not isinstance(d.num_workers, int) or d.num_workers < 0:
        raise _config_error("data.num_workers", d.num_workers, "0 (tokenize in-process) or a number of processes")
    if d.name == "indexed":
        for key in ("data.paths", "data.valid_paths"):
            paths = d.paths if key == "data.paths" else d.valid_paths
            if key == "data.valid_paths" and not paths:
                continue
            for _, prefix in parse_blend(paths, key):
                if not indexed_exists(prefix):
                    raise _config_error(key, prefix, f"a prefix with {prefix}.bin and {prefix}.idx, which do not "
                                                     f"exist; {_preprocess_hint(prefix)}")



def _on_rank0(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on global rank 0 while the others wait; every rank gets its result or its error."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    result, err, exc = None, None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:
            exc, err = e, f"{type(e).__name__}: {e}"
    box = [(result, err)]
    dist.broadcast_object_list(box, src=0)
    result, err = box[0]
    if exc is not None:
        raise exc
    if err is not None:
        raise DataError(f"rank 0 failed to prepare the data: {err}")
    return result


def _prepare_brown(cfg, run_dir: Path) -> dict:
    """Rank 0: fetch + split + tokenizer + indexed files. Returns plain paths (broadcast to all ranks)."""
    d = cfg.data
    cache = resolve_cache_dir(d.cache_dir)
    text = prepare_brown_text(cache, float(d.valid_fraction))
    if d.tokenizer == "gpt2":
        tok = load_tokenizer("gpt2")
        out_dir = text["train"].parent / "gpt2"  # shared by every run: the ids do not depend on the run
    elif d.tokenizer == "bpe":
        tok_path = run_dir / "tokenizer.json"
        if tok_path.is_file():
            tok = HFTokenizer(tok_path)
            if tok.vocab_size != d.vocab_size:
                raise _config_error("data.vocab_size", d.vocab_size,
                                    f"{tok.vocab_size}, the size of the tokenizer this run already trained "
                                    f"({tok_path}), or a new run_dir")
        else:
            log.info("training a %d-token byte-level BPE on the Brown train split -> %s", d.vocab_size, tok_path)
            tok = train_bpe(read_jsonl_texts(text["train"]), d.vocab_size, tok_path)
        out_dir = run_dir / "data"
    else:
        tok = load_tokenizer(str(Path(d.tokenizer).expanduser()))
        out_dir = run_dir / "data"
    fp = tokenizer_fingerprint(tok)
    prefixes = {}
    for split in ("train", "valid"):
        prefix = out_dir / f"brown_{split}"
        meta = read_meta(prefix)
        if meta is None or meta.get("tokenizer_sha") != fp or meta.get("source") != str(text[split]):
            write_indexed(read_jsonl_texts(text[split]), tok, prefix, workers=d.num_workers,
                          extra_meta={"source": str(text[split])})
        prefixes[split] = str(prefix)
    return {"tokenizer": tok.spec, "train": [(1.0, prefixes["train"])], "valid": [(1.0, prefixes["valid"])]}


def _resolve_tokenizer(cfg, run_dir: Path):
    d = cfg.data
    if d.tokenizer == "gpt2":
        return load_tokenizer("gpt2")
    if d.tokenizer == "bpe":
        # synthetic data has no text to train on; ids are random anyway
        return ByteTokenizer(d.vocab_size)
    return load_tokenizer(str(Path(d.tokenizer).expanduser()))


def build_data(cfg, run_dir, *, dp_rank: int, dp_size: int) -> DataBundle:
    """The data of one DP rank. ``cfg``: TrainConfig; ``run_dir``: the run's directory (tokenizer, files).

    Batches: tokens/labels int64 [micro_batch_size, seq_length], loss_mask float32 [same].
    """
    check_data_config(cfg)
    d, t = cfg.data, cfg.trainer
    run_dir = Path(run_dir)
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if t.global_batch_size % (t.micro_batch_size * dp_size):
        raise _config_error("trainer.global_batch_size", t.global_batch_size,
                            f"a multiple of trainer.micro_batch_size * data-parallel size = {t.micro_batch_size} * "
                            f"{dp_size} = {t.micro_batch_size * dp_size}")
    seq, seed = int(t.seq_length), int(t.seed)
    signature = {"data": d.name, "seq_length": seq, "seed": seed}
    common = dict(micro_batch_size=t.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)

    if d.name == "synthetic":
        tok = _resolve_tokenizer(cfg, run_dir)
        train_src = [SyntheticSource(tok.vocab_size, seq, seed=seed, stream=0)]
        valid_src = [SyntheticSource(tok.vocab_size, seq, seed=seed, stream=1)]
        train = TrainStream(train_src, [1.0], global_batch_size=t.global_batch_size, signature=signature, **common)
        valid = ValidSet(valid_src, [1.0], **common)
        return DataBundle(tok, padded_vocab_size(tok.vocab_size, cfg.parallel.tensor), train, valid,
                          # uniform ids: the add-one unigram estimate converges to the vocabulary size
                          float(tok.vocab_size), {"data": "synthetic", "tokenizer": tok.spec})

    if d.name == "brown":
        plan = _on_rank0(lambda: _prepare_brown(cfg, run_dir))
    else:
        plan = {"tokenizer": "gpt2" if d.tokenizer == "gpt2" else str(Path(d.tokenizer).expanduser()),
                "train": parse_blend(d.paths, "data.paths"),
                "valid": parse_blend(d.valid_paths, "data.valid_paths") if d.valid_paths else None}
    tok = load_tokenizer(plan["tokenizer"])
    fp = tokenizer_fingerprint(tok)

    def open_docs(prefix: str) -> DocTokens:
        meta = read_meta(prefix)
        if meta is not None and meta.get("tokenizer_sha") not in (None, fp):
            raise _config_error("data.tokenizer", d.tokenizer,
                                f"{meta.get('tokenizer')}, the tokenizer that made {prefix} (or re-run the "
                                f"preprocess command with --tokenizer {plan['tokenizer']})")
        docs = DocTokens.open(prefix)
        if meta is None and docs.tokens.size:
            # files from another tool (e.g. megatron's preprocess_data.py): at least catch a wrong vocabulary
            top = int(np.asarray(docs.tokens[:1 << 22]).max())
            if top >= tok.vocab_size:
                raise _config_error("data.tokenizer", d.tokenizer,
                                    f"the tokenizer that made {prefix}: it holds id {top}, beyond this tokenizer's "
                                    f"{tok.vocab_size} ids")
        return docs

    train_src, train_w, valid_src, valid_w = [], [], [], []
    for i, (w, prefix) in enumerate(plan["train"]):
        docs = open_docs(prefix)
        cut = docs.num_docs
        if plan["valid"] is None:
            # no validation set given: hold out the last documents of each dataset
            if docs.num_docs < 2:
                raise DataError(f"{prefix} has {docs.num_docs} document(s): cannot hold out validation documents; "
                                "give data.valid_paths or more documents")
            n_valid = max(1, round(float(d.valid_fraction) * docs.num_docs))
            cut = docs.num_docs - n_valid
            valid_src.append(PackedSource(docs, seq, seed=seed, source_id=i, shuffle=False, doc_begin=cut))
            valid_w.append(w)
        train_src.append(PackedSource(docs, seq, seed=seed, source_id=i, shuffle=True, doc_end=cut))
        train_w.append(w)
    if plan["valid"] is not None:
        for w, prefix in plan["valid"]:
            valid_src.append(PackedSource(open_docs(prefix), seq, seed=seed, source_id=0, shuffle=False))
            valid_w.append(w)
    # no weights given: proportional to size, like concatenating the datasets
    train_w = [s.num_windows if w is None else w for w, s in zip(train_w, train_src)]
    valid_w = [s.num_windows if w is None else w for w, s in zip(valid_w, valid_src)]
    # basenames: a dataset moved to another mount between requeues is still the same data
    signature["sources"] = [[os.path.basename(s.docs.prefix), s.num_windows] for s in train_src]
    train = TrainStream(train_src, train_w, global_batch_size=t.global_batch_size, signature=signature, **common)
    valid = ValidSet(valid_src, valid_w, **common)
    ppl = unigram_perplexity(train_src, valid_src, tok.vocab_size)
    info = {"data": d.name, "tokenizer": plan["tokenizer"], "tokenizer_vocab_size": tok.vocab_size,
            "train_tokens": sum(s.num_tokens for s in train_src), "valid_tokens": sum(s.num_tokens for s in valid_src),
            "train_prefixes": [s.docs.prefix for s in train_src], "valid_prefixes": [s.docs.prefix for s in valid_src],
            "valid_windows": valid.num_windows}
    return DataBundle(tok, padded_vocab_size(tok.vocab_size, cfg.parallel.tensor), train, valid, ppl, info)
