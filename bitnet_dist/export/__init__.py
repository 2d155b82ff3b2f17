"""A trained model leaves the trainer: Hugging Face export, text generation and evaluation (docs/export.md).

* ``bitnet_dist.export.hf``: ``export(checkpoint, out)`` and the ``bitnet-export`` command;
* ``bitnet_dist.export.generate``: ``bitnet-generate`` (KV-cache sampling from a checkpoint or an export);
* ``bitnet_dist.export.evaluate``: ``bitnet-eval`` (perplexity of a checkpoint or an export);
* ``bitnet_dist.export.reader``: checkpoints of either engine at any layout -> one TP=1 state dict;
* ``modeling_bitnet_v2.py``: the modeling code shipped inside v2 exports (plain torch + transformers).

This package imports the model, layers and engines' checkpoint formats; nothing in bitnet_dist imports it
except its own entry points. transformers, safetensors and lm-eval come with the ``hf`` extra.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


def ensure_transformers() -> None:
    """Import PyPI's ``kernels`` (a dependency of transformers 5) before transformers looks it up.

    In a source checkout the project's Triton kernels live in the top-level folder ``kernels/`` (installed as
    ``bitnet_dist.kernels``). When the checkout's root is on sys.path (``python -m ...`` run from it, the test
    command among them), ``import kernels`` finds that folder instead of the PyPI package and transformers' hub
    kernels fail to import (``cannot import name 'CUDAProperties' from 'kernels'``). This imports the installed
    package once, with the checkout root left out of sys.path for that one import; elsewhere it does nothing.
    """
    if "kernels" in sys.modules:
        return
    root = Path(__file__).resolve().parents[2]
    ours = root / "kernels"
    if not (ours / "ternary.py").is_file():  # not a source checkout: nothing shadows anything
        return
    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parent != ours.resolve():
        return
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        importlib.invalidate_caches()
        try:
            importlib.import_module("kernels")
        except ImportError:  # no PyPI kernels installed: transformers then finds none either way
            sys.modules.pop("kernels", None)
    finally:
        sys.path[:] = saved


def quiet_library_warnings() -> None:
    """CLI runs: drop megatron-core's import-time notices (no Apex / Transformer Engine, deprecated options) and
    torch.distributed.checkpoint's deprecation notices, which say nothing about the user's command."""
    import warnings

    for module in ("megatron", "torch.distributed.checkpoint", "torch.distributed"):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    try:  # transformers' per-tensor "Loading weights" progress bar
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def require_hf(prog: str) -> None:
    """Exit with one line naming the fix when the ``hf`` extra is not installed."""
    missing = [m for m in ("transformers", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"{prog}: error: {', '.join(missing)} not installed: pip install 'bitnet-dist[hf]' (or -e '.[hf]')",
              file=sys.stderr, flush=True)
        raise SystemExit(2)
