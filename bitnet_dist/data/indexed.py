"""Megatron indexed datasets (.bin/.idx): the one writer (users' data and the bundled corpus) and a
document-level reader for the loader.

Layout (megatron.core.datasets.indexed_dataset): ``PREFIX.bin`` holds the token ids of every document
back to back (uint16 when the vocabulary fits, else int32); ``PREFIX.idx`` holds sequence lengths and
document boundaries. We write one sequence per document, each ending with the tokenizer's EOD id, like
megatron's tools/preprocess_data.py with ``--append-eod``. ``PREFIX.meta.json`` (ours, ignored by megatron)
records the tokenizer so the loader can refuse files made with another vocabulary.
"""
from __future__ import annotations

import collections
import json
import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from bitnet_dist.data.errors import DataError
from bitnet_dist.data.tokenizer import load_tokenizer, tokenizer_fingerprint

# megatron-core's indexed-dataset module is imported where used (megatron-core is heavy to import).

_worker_tok = None


def _init_worker(spec: str, eod_token: str | None) -> None:
    global _worker_tok
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _worker_tok = load_tokenizer(spec, eod_token)


def _encode_chunk(texts: list[str]) -> list[np.ndarray]:
    return _encode_with(_worker_tok, texts)


def _encode_with(tok, texts: list[str]) -> list[np.ndarray]:
    out = []
    for ids in tok.encode_batch(texts):
        ids.append(tok.eod_id)
        out.append(np.asarray(ids, dtype=np.int64))
    return out


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    buf: list[str] = []
    for t in texts:
        buf.append(t)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def index_dtype(vocab_size: int):
    """megatron's choice: uint16 below 65500 ids, else int32 (DType.optimal_dtype)."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def write_indexed(texts: Iterable[str], tokenizer, prefix: str | os.PathLike, *, workers: int = 0,
                  chunk_docs: int = 256, extra_meta: dict | None = None) -> dict:
    """Tokenize ``texts`` (one document each; empty ones skipped), append EOD, write ``prefix``.bin/.idx.

    ``workers`` > 0 tokenizes in that many spawned processes (each rebuilds the tokenizer from
    ``tokenizer.spec``); results are consumed in input order, so the files are byte-identical for any
    worker count. Files appear atomically: written under a temporary prefix, renamed .bin, .idx, then
    .meta.json last, so ``meta.json`` existing means the dataset is complete. Returns the metadata.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # deferred: megatron-core is heavy

    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    dtype = index_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    n_docs = n_tokens = n_empty = 0

    def nonempty() -> Iterator[str]:
        nonlocal n_empty
        for t in texts:
            if t and t.strip():
                yield t
            else:
                n_empty += 1

    def add(arrays: list[np.ndarray]) -> None:
        nonlocal n_docs, n_tokens
        for ids in arrays:
            builder.add_document(ids, [ids.size])
            n_docs += 1
            n_tokens += int(ids.size)

    pool = None
    try:
        if workers and workers > 0:
            pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker,
                                                initargs=(tokenizer.spec, getattr(tokenizer, "eod_token", None)))
            # the input is read here, in the main thread (not by Pool.imap's feeder thread, where an input
            # error would hang the pool); results are taken in submission order -> worker-count independent
            pending: collections.deque = collections.deque()
            for chunk in _chunks(nonempty(), chunk_docs):
                pending.append(pool.apply_async(_encode_chunk, (chunk,)))
                if len(pending) >= 2 * workers:
                    add(pending.popleft().get())
            while pending:
                add(pending.popleft().get())
        else:
            for chunk in _chunks(nonempty(), chunk_docs):
                add(_encode_with(tokenizer, chunk))
        builder.finalize(tmp + ".idx")
    except BaseException:
        builder.data_file.close()
        for ext in (".bin", ".idx"):
            Path(tmp + ext).unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    meta = {"format": "megatron-indexed", "documents": n_docs, "tokens": n_tokens, "skipped_empty": n_empty,
            "dtype": np.dtype(dtype).name, "tokenizer": tokenizer.spec,
            "tokenizer_sha": tokenizer_fingerprint(tokenizer), "vocab_size": tokenizer.vocab_size,
            "eod_id": tokenizer.eod_id, **(extra_meta or {})}
    Path(prefix + ".meta.json").unlink(missing_ok=True)  # an old dataset under this prefix is no longer complete
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")
    meta_tmp = tmp + ".meta.json"
    Path(meta_tmp).write_text(json.dumps(meta, indent=1))
    os.replace(meta_tmp, prefix + ".meta.json")
    return meta


def read_meta(prefix: str | os.PathLike) -> dict | None:
    p = Path(f"{prefix}.meta.json")
    return json.loads(p.read_text()) if p.is_file() else None


def indexed_exists(prefix: str | os.PathLike) -> bool:
    return Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()


_IDX_MAGIC = b"MMIDIDX\x00\x00"  # megatron.core.datasets.indexed_dataset._INDEX_HEADER
_IDX_HEADER = 9 + 8 + 1 + 8 + 8  # magic, version <Q, dtype code <B, sequence count <Q, document count <Q


def check_indexed(prefix: str | os.PathLike) -> dict:
    """Check ``prefix``.idx and ``prefix``.bin against each other before anything reads them: the header, the
    index size its counts imply, the document boundaries, and the .bin size the sequence lengths imply; an
    empty dataset is an error too. Raises DataError naming the file and the fix (re-run the preprocessing);
    returns {"sequences", "documents", "tokens"}. The layout is megatron-core's (indexed_dataset.py:
    _IndexWriter / _IndexReader)."""
    from megatron.core.datasets.indexed_dataset import DType

    prefix = str(prefix)
    idx, binf = Path(prefix + ".idx"), Path(prefix + ".bin")
    fix = (f"re-create it: python -m bitnet_dist.data.preprocess --input FILE.jsonl --tokenizer TOKENIZER "
           f"--output-prefix {prefix} (or bitnet-preprocess)")
    for p in (idx, binf):
        if not p.is_file():
            raise DataError(f"{p} is missing: {fix}")
    size = idx.stat().st_size
    with idx.open("rb") as f:
        head = f.read(_IDX_HEADER)
        if len(head) < _IDX_HEADER or head[:9] != _IDX_MAGIC:
            raise DataError(f"{idx} is not a megatron index ({size} bytes, "
                            f"{'too short' if len(head) < _IDX_HEADER else 'wrong header'}): {fix}")
        version, = np.frombuffer(head[9:17], "<u8")
        code = head[17]
        n_seq, n_doc = (int(x) for x in np.frombuffer(head[18:34], "<u8"))
        if version != 1:
            raise DataError(f"{idx}: index version {int(version)}, expected 1: {fix}")
        try:
            dtype = np.dtype(DType.dtype_from_code(code))
        except (KeyError, ValueError, TypeError):
            raise DataError(f"{idx}: unknown token dtype code {code}: {fix}") from None
        expect = _IDX_HEADER + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if size != expect:
            raise DataError(f"{idx} is {size} bytes; its header ({n_seq} sequences, {n_doc} document boundaries) "
                            f"implies {expect}: the file is cut short or damaged: {fix}")
        lengths = np.fromfile(f, dtype=np.int32, count=n_seq)
        f.seek(_IDX_HEADER + 12 * n_seq)
        docs = np.fromfile(f, dtype=np.int64, count=n_doc)
    if n_seq == 0 or n_doc < 2 or int(lengths.sum(dtype=np.int64)) == 0:
        raise DataError(f"{prefix}.bin/.idx hold no documents (an empty corpus): {fix} from a corpus with text")
    if docs[0] != 0 or docs[-1] != n_seq or np.any(np.diff(docs) < 0) or np.any(lengths < 0):
        raise DataError(f"{idx}: document boundaries do not match its {n_seq} sequences: {fix}")
    tokens = int(lengths.sum(dtype=np.int64))
    want = tokens * dtype.itemsize
    have = binf.stat().st_size
    if have != want:
        raise DataError(f"{binf} is {have} bytes; {idx} describes {tokens} tokens of {dtype.name} = {want} bytes "
                        f"({'cut short' if have < want else 'extra bytes'}; .bin and .idx of different runs?): {fix}")
    return {"sequences": n_seq, "documents": n_doc - 1, "tokens": tokens}


@dataclass
class DocTokens:
    """Documents of one indexed dataset: ``tokens`` (memory-mapped, all ids back to back),
    ``doc_start``/``doc_len`` int64 [num_docs] in tokens. Reads the .idx with megatron's reader."""

    prefix: str
    tokens: np.ndarray
    doc_start: np.ndarray
    doc_len: np.ndarray

    @classmethod
    def open(cls, prefix: str | os.PathLike) -> "DocTokens":
        prefix = str(prefix)
        if not indexed_exists(prefix):
            raise DataError(f"no indexed dataset at prefix {prefix!r} (expected {prefix}.bin and {prefix}.idx); "
                            "create it with: python -m bitnet_dist.data.preprocess --input FILE.jsonl "
                            f"--tokenizer gpt2 --output-prefix {prefix}")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        check_indexed(prefix)  # one clear error, not megatron's or numpy's traceback, for damaged or empty files
        ds = IndexedDataset(prefix, mmap=True)
        # copies: these are views into the index's mmap, which megatron closes when ds is collected
        seq_len = np.array(ds.sequence_lengths, dtype=np.int64, copy=True)
        docs = np.array(ds.document_indices, dtype=np.int64, copy=True)
        dtype = ds.index.dtype
        del ds
        # sequences are stored contiguously in order, so a document's tokens are one slice of the .bin
        seq_cum = np.concatenate([[0], np.cumsum(seq_len)])
        start = seq_cum[docs[:-1]]
        length = seq_cum[docs[1:]] - start
        n = int(seq_cum[-1])
        tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
        return cls(prefix, tokens, start, length)

    @property
    def num_docs(self) -> int:
        return int(self.doc_len.size)

    def doc(self, i: int) -> np.ndarray:
        s = int(self.doc_start[i])
        return np.asarray(self.tokens[s:s + int(self.doc_len[i])])
