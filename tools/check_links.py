"""Check the relative links of the documentation: every link in README.md, CHANGELOG.md and docs/**/*.md
that is not a URL must name a file or folder that exists, and a `#anchor` must match a heading of the
target Markdown file (GitHub's anchor rules: lower case, punctuation dropped, spaces to dashes).

    python tools/check_links.py                 # the repository this file lives in
    python tools/check_links.py --root DIR      # another tree
    python tools/check_links.py FILE.md ...     # only these files (paths relative to the root or absolute)

Prints one line per broken link (file:line: target: why) and exits 1 when there is any, else 0.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

# [text](target) and [text](target "title"); images too. Reference-style definitions: [id]: target
INLINE = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s{0,3}(```|~~~)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def doc_files(root: Path) -> list[Path]:
    files = [root / n for n in ("README.md", "CHANGELOG.md") if (root / n).is_file()]
    if (root / "docs").is_dir():
        files += sorted((root / "docs").rglob("*.md"))
    return files


def slug(heading: str) -> str:
    text = re.sub(r"`([^`]*)`", r"\1", heading)             # code spans keep their text
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links keep their text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)                    # GitHub drops punctuation, keeps - and _
    return text.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_fence = False
    for line in md.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        m = None if in_fence else HEADING.match(line)
        if m:
            s = slug(m.group(2))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    for m in re.finditer(r"<a\s+(?:name|id)=\"([^\"]+)\"", md.read_text(encoding="utf-8")):
        out.add(m.group(1))
    return out


def links(md: Path):
    in_fence = False
    for no, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        for m in INLINE.finditer(line):
            yield no, m.group(1)
        m = REFDEF.match(line)
        if m:
            yield no, m.group(1)


def check(files: list[Path], root: Path) -> list[str]:
    errors = []
    cache: dict[Path, set[str]] = {}
    for md in files:
        for no, target in links(md):
            if SCHEME.match(target) or target.startswith("//"):
                continue  # a URL (http:, https:, mailto:): not checked here
            path_part, _, frag = target.partition("#")
            where = f"{md.relative_to(root) if md.is_relative_to(root) else md}:{no}: {target}"
            dest = md if not path_part else (md.parent / path_part)
            if path_part.startswith("/"):
                errors.append(f"{where}: absolute path; use a path relative to {md.name}")
                continue
            if not dest.exists():
                errors.append(f"{where}: no such file")
                continue
            if frag and dest.is_file() and dest.suffix == ".md":
                if dest not in cache:
                    cache[dest] = anchors(dest)
                if frag.lower() not in cache[dest]:
                    errors.append(f"{where}: no heading #{frag} in {dest.name}")
    return errors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("files", nargs="*", type=Path, help="Markdown files (default: README, CHANGELOG, docs/**/*.md)")
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="repository root")
    a = p.parse_args(argv)
    root = a.root.resolve()
    files = [f if f.is_absolute() else (root / f) for f in a.files] or doc_files(root)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        print(f"check_links: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    errors = check([f.resolve() for f in files], root)
    for e in errors:
        print(e)
    print(f"check_links: {len(files)} files, {len(errors)} broken links", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
