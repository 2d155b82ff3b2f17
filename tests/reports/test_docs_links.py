"""The documentation's relative links resolve (tools/check_links.py), and the checker catches a broken one."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKER = ROOT / "tools" / "check_links.py"


def run(*args):
    return subprocess.run([sys.executable, str(CHECKER), *args], capture_output=True, text=True, timeout=60)


def test_repository_docs_have_no_broken_links():
    r = run("--root", str(ROOT))
    assert r.returncode == 0, r.stdout + r.stderr


def _tree(tmp_path, readme):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Page A\n\n## Two words, `code`\n\ntext\n")
    (tmp_path / "docs" / "data.json").write_text("{}\n")
    (tmp_path / "README.md").write_text(readme)
    return tmp_path


def test_good_links_pass(tmp_path):
    root = _tree(tmp_path, "[a](docs/a.md) [h](docs/a.md#two-words-code) [j](docs/data.json) "
                           "[self](#top) [web](https://example.org/x.md)\n\n# Top\n\n"
                           "```\n[not a link](missing.md)\n```\n`[code](missing.md)`\n")
    r = run("--root", str(root))
    assert r.returncode == 0, r.stdout + r.stderr


def test_broken_file_anchor_and_absolute_links_fail(tmp_path):
    root = _tree(tmp_path, "[gone](docs/gone.md)\n[bad anchor](docs/a.md#no-such-heading)\n[abs](/etc/passwd)\n")
    r = run("--root", str(root))
    assert r.returncode == 1
    assert "README.md:1: docs/gone.md: no such file" in r.stdout
    assert "README.md:2: docs/a.md#no-such-heading: no heading #no-such-heading in a.md" in r.stdout
    assert "README.md:3: /etc/passwd: absolute path" in r.stdout


def test_broken_link_inside_docs_subfolder_fails(tmp_path):
    root = _tree(tmp_path, "ok\n")
    (root / "docs" / "sub").mkdir()
    (root / "docs" / "sub" / "b.md").write_text("see [a](../a.md) and [x](../../nothing/here.md)\n")
    r = run("--root", str(root))
    assert r.returncode == 1
    assert r.stdout.count("no such file") == 1 and "docs/sub/b.md:1: ../../nothing/here.md" in r.stdout
