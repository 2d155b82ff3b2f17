"""Turn users' text into a megatron indexed dataset (.bin/.idx) for ``data=indexed``.

    python -m bitnet_dist.data.preprocess --input corpus.jsonl --json-key text \\
        --tokenizer gpt2 --output-prefix data/corpus --workers 4

Inputs (one or more ``--input``, read in the order given):
  * ``.jsonl`` (or ``.json`` lines): one document per line, its text under ``--json-key``;
  * ``.txt``: documents separated by one or more blank lines (``--txt-doc-per-line``: one per line).
``--tokenizer``: ``gpt2`` or a path to a HF tokenizer.json (e.g. ``RUN_DIR/tokenizer.json`` of a run with
``data.tokenizer=bpe``); the tokenizer's ``<|endoftext|>`` (or ``--eod-token``) is appended to every document.
The output does not depend on ``--workers``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Iterator

from bitnet_dist.data.errors import DataError
from bitnet_dist.data.indexed import write_indexed
from bitnet_dist.data.tokenizer import load_tokenizer


class InputError(ValueError):
    """An input file that cannot be read as documents (the message names file, line and fix)."""


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file; a line that is not UTF-8 is an InputError naming file and line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{lineno} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                 "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove that line") from None


def iter_documents(path: Path, json_key: str = "text", txt_doc_per_line: bool = False) -> Iterator[str]:
    """Documents of one input file, in file order. Bad records are errors naming ``file:line`` (not skipped):
    a line that is not UTF-8, not JSON, without ``json_key``, or whose text is not a string (null, a number)."""
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        for lineno, line in _lines(path):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno} is not valid JSON ({e.msg}); expected one JSON object "
                                 "per line") from None
            if not isinstance(rec, dict) or json_key not in rec:
                keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                raise InputError(f"{path}:{lineno} has no key {json_key!r} (found {keys}); pass "
                                 "--json-key NAME")
            text = rec[json_key]
            if not isinstance(text, str):
                raise InputError(f"{path}:{lineno}: {json_key!r} is {json.dumps(text)[:40]} "
                                 f"({'null' if text is None else type(text).__name__}), not a string; fix or "
                                 "remove that record")
            yield text
    elif path.suffix == ".txt":
        f = (line for _, line in _lines(path))
        if txt_doc_per_line:
            yield from (line.rstrip("\n") for line in f)
            return
        block: list[str] = []
        for line in f:
            if line.strip():
                block.append(line.rstrip("\n"))
            elif block:
                yield "\n".join(block)
                block = []
        if block:
            yield "\n".join(block)
    else:
        raise InputError(f"--input {path}: unsupported file type {path.suffix!r}; use .jsonl or .txt")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bitnet_dist.data.preprocess",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help=".jsonl or .txt files, read in this order")
    p.add_argument("--json-key", default="text", help="JSON key holding each document's text (default: text)")
    p.add_argument("--txt-doc-per-line", action="store_true", help=".txt: one document per line")
    p.add_argument("--tokenizer", default="gpt2", help="gpt2 or a path to a HF tokenizer.json (default: gpt2)")
    p.add_argument("--eod-token", default=None,
                   help="end-of-document token of a tokenizer.json (default <|endoftext|>)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.meta.json")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (output is identical for any value)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    inputs = [Path(p) for p in args.input]
    for p in inputs:
        if not p.is_file():
            print(f"error: --input {p} does not exist", file=sys.stderr)
            return 2
    if args.workers < 0:
        print("error: --workers must be >= 0", file=sys.stderr)
        return 2
    try:
        tok = load_tokenizer(args.tokenizer, args.eod_token)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def docs() -> Iterator[str]:
        for p in inputs:
            yield from iter_documents(p, args.json_key, args.txt_doc_per_line)

    t0 = time.perf_counter()
    try:
        # workers=1 means "tokenize here": one extra process would only add start-up time
        meta = write_indexed(docs(), tok, args.output_prefix, workers=args.workers if args.workers > 1 else 0,
                             extra_meta={"inputs": [str(p) for p in inputs]})
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    if meta["documents"] == 0:
        for ext in (".bin", ".idx", ".meta.json"):
            Path(args.output_prefix + ext).unlink(missing_ok=True)
        print(f"error: the input holds no documents ({meta['skipped_empty']} empty or whitespace-only skipped): "
              f"{' '.join(map(str, inputs))}; nothing written. Check --input and --json-key", file=sys.stderr)
        return 2
    print(f"wrote {args.output_prefix}.bin/.idx: {meta['documents']} documents, {meta['tokens']} tokens "
          f"({meta['dtype']}, eod={meta['eod_id']}, {meta['skipped_empty']} empty skipped) in {dt:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
