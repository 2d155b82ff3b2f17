"""The import contracts of pyproject.toml ([tool.importlinter]) hold for the installed layout, and the check
fails on a violation: an upward import from the numerics, an import of validation from below, an import cycle.
.ci/lint runs the same check in CI."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).parent / "lint-imports"  # the dev extra's import-linter


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    assert LINT.is_file(), f"{LINT} missing: install the dev extra (pip install -e '.[dev]')"
    tmp = tmp_path_factory.mktemp("contracts")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("bitnet_dist", "kernels", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-compile", "--target", str(tmp / "site"), str(src)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    return tmp / "site"


def lint(site: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site)}
    return subprocess.run([str(LINT), str(REPO / "pyproject.toml")], cwd=site.parent, env=env, capture_output=True,
                          text=True, timeout=600)


def test_contracts_hold(site):
    out = lint(site)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "5 kept, 0 broken" in out.stdout


@pytest.mark.parametrize("module,line,broken", [
    # the numerics import something above errors
    ("quant.py", "from bitnet_dist import presets", "but errors BROKEN"),
    # the model imports validation
    ("model.py", "from bitnet_dist import validate", "below them BROKEN"),
    # a bottom module imports a numerics module (the layer order)
    ("step_cache.py", "from bitnet_dist import quant", "bottom modules BROKEN"),
    # the kernels import package internals
    ("kernels/ternary.py", "from bitnet_dist import layers", "step_cache, errors) BROKEN"),
    # a cycle of two bottom modules: errors -> step_cache -> errors
    ("errors.py", "from bitnet_dist import step_cache", "included) BROKEN"),
])
def test_a_violation_breaks_its_contract(site, module, line, broken):
    edits = {site / "bitnet_dist" / module: line}
    if module == "errors.py":
        edits[site / "bitnet_dist" / "step_cache.py"] = "from bitnet_dist import errors"
    originals = {path: path.read_text() for path in edits}
    try:
        for path, text in edits.items():
            path.write_text(originals[path] + f"\n{text}\n")
        out = lint(site)
    finally:
        for path, text in originals.items():
            path.write_text(text)
    assert out.returncode != 0, out.stdout[-3000:]
    assert broken in out.stdout, out.stdout[-3000:]
