"""bitnet-dist: distributed training of BitNet v2 (ternary weights, 4/8-bit activations, H-BitLinear)."""
from pathlib import Path as _Path

__version__ = "0.1.0"

# The Triton kernels live in the repository's top-level kernels/ folder and install as
# bitnet_dist.kernels (pyproject package-dir). In a source checkout used without an install
# (PYTHONPATH=<repo>, as on the GPU machine), let the same name resolve to that folder.
_root = _Path(__file__).resolve().parent.parent
if (_root / "kernels" / "__init__.py").is_file() and (_root / "pyproject.toml").is_file():
    __path__.append(str(_root))  # noqa: F821 - package __path__
