"""megatron-core compatibility: the CPU path, and multi-tensor ops without host syncs.

**Multi-tensor ops.** Without Transformer Engine or apex, megatron-core 0.16 / 0.17 falls back to
``megatron.core.utils.local_multi_tensor_l2_norm`` / ``local_multi_tensor_scale`` for the gradient norm and
clipping (optimizer/clip_grads.py). The L2 norm builds ``torch.tensor(list of per-tensor CUDA norms)``: one
host sync per gradient tensor, 111-147 per step of the 1.3B model (measured on the H100 with
``torch.cuda.set_sync_debug_mode``; docs/training.md). ``install_foreach_multi_tensor()`` swaps those two
fallbacks, and only those, for ``torch._foreach_norm`` / ``torch._foreach_mul_`` equivalents (one multi-tensor
kernel each, no host sync; the norm in fp32). With TE or apex present, megatron uses amp_C and nothing changes.

**The CPU path** (documented in docs/numerics.md, "Running on CPU").

megatron-core 0.16.1 has no CPU path: besides CUDA-only subsystems we never use on CPU (its schedules,
optimizers and RNG tracker), two calls sit on paths the model itself takes and are harmless to redirect
(megatron-core 0.16.1 source):

* ``torch.cuda.current_device()`` names the device of new buffers: the global memory buffer used by the
  sequence-parallel all-gather, RoPE's ``inv_freq.to(...)``, the TP mappings' all-gather and
  reduce-scatter outputs, DDP's grad buffers and dist_checkpointing. On CPU it returns "cpu".
* ``torch.cuda.synchronize()`` before checkpoint I/O and in p2p becomes a no-op.
* activation recomputation (``trainer.recompute``) saves and restores only the CPU RNG state (megatron's
  checkpoint function also saves the CUDA generator's and its tracker's).

``install_cpu_path()`` patches exactly these functions, and only when CUDA is not available: on a GPU
machine it does nothing, so GPU runs never see it. Call it once before building a model on CPU.

**Console.** Without Transformer Engine or apex, importing megatron-core's optimizer, clip-grads, FSDP
mixed-precision and norm backends warns once per module that it falls back to torch implementations (six
UserWarnings per start). bitnet-dist does not use TE or apex by design, so the entry points filter exactly
those warnings (``filter_backend_warnings``: by message and module); every other warning still shows.
"""
from __future__ import annotations

import contextlib
import importlib
import warnings

import torch

# The messages of megatron-core's "no TE / apex" fallback warnings (0.16 and 0.17).
BACKEND_WARNING_MESSAGE = r"(Transformer Engine and Apex are|Apex is|Transformer Engine is) not installed"
# megatron-core's modules, and the FSDP package it vendors (megatron_fsdp)
BACKEND_WARNING_MODULE = r"(megatron|megatron_fsdp)(\..*)?"


# megatron-core 0.16's own default TransformerConfig.cuda_graph_scope ("full") warns that it is deprecated on
# every config it builds; bitnet-dist never sets the field.
DEFAULT_SCOPE_WARNING_MESSAGE = r"full scope is deprecated"


def filter_backend_warnings() -> None:
    """Ignore megatron-core's UserWarnings about absent Transformer Engine / apex (see the module docstring) and
    the deprecation warning of its own default cuda_graph_scope; call before megatron-core is imported."""
    warnings.filterwarnings("ignore", message=BACKEND_WARNING_MESSAGE, category=UserWarning,
                            module=BACKEND_WARNING_MODULE)
    warnings.filterwarnings("ignore", message=DEFAULT_SCOPE_WARNING_MESSAGE, category=UserWarning,
                            module=r"megatron\.core\.transformer\.transformer_config")

_installed = False


def install_cpu_path() -> bool:
    """Redirect megatron's two CUDA device calls to the CPU. Returns True if the patch is active."""
    global _installed
    if torch.cuda.is_available():
        return False
    if not _installed:
        torch.cuda.current_device = lambda: "cpu"  # torch.empty(..., device="cpu") is valid
        torch.cuda.synchronize = lambda *args, **kwargs: None
        _cpu_checkpoint_rng()
        _installed = True
    return True


def _cpu_checkpoint_rng() -> None:
    """megatron's activation checkpoint (``tensor_parallel.random.CheckpointFunction``, trainer.recompute) saves and
    restores the CPU, CUDA and tracker RNG states around the recomputed forward; without CUDA only the CPU state
    exists, so its two state helpers keep that one (the CUDA parts are None)."""
    try:
        from megatron.core.tensor_parallel import random as mr
    except ImportError:
        return
    mr._get_all_rng_states = lambda: (torch.get_rng_state(), None, None)
    mr._set_all_rng_states = lambda cpu, cuda=None, tracker=None: torch.set_rng_state(cpu)


def cpu_path_active() -> bool:
    return _installed


@contextlib.contextmanager
def host_device():
    """Run a model that is kept on the CPU of a CUDA machine (the export reader's TP=1 model, ``bitnet-eval`` of a
    checkpoint): inside, ``torch.cuda.current_device()`` names the CPU, as on a machine without CUDA.

    megatron-core's RoPE moves its ``inv_freq`` to ``torch.cuda.current_device()`` on every forward where it finds
    it on the CPU (``RotaryEmbedding.get_emb``, 0.16 / 0.17), so without this the CPU model's attention mixes a CUDA
    angle table with CPU activations and fails. On a machine without CUDA it changes nothing (the CPU path already
    names the CPU)."""
    current = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.current_device = current


# -- multi-tensor ops ----------------------------------------------------------------------------------------
def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for ``amp_C.multi_tensor_l2norm`` as megatron calls it through ``multi_tensor_applier``:
    (the L2 norm of all tensors of ``tensor_lists[0]`` as a fp32 [1] tensor on their device, None). Per-tensor
    norms in fp32 by ``torch._foreach_norm``, then the norm of those: no host sync."""
    ts = tensor_lists[0]
    if not ts:
        return torch.zeros(1, dtype=torch.float32, device=noop_flag.device), None
    try:
        norms = torch._foreach_norm(ts, 2, dtype=torch.float32)
    except TypeError:  # a torch whose _foreach_norm has no dtype argument
        norms = [n.float() for n in torch._foreach_norm([t.float() for t in ts], 2)]
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for ``amp_C.multi_tensor_scale``: dst = src * scale for the pairs of ``tensor_lists`` (in place
    when the lists hold the same tensors, as megatron's gradient clipping passes them)."""
    src, dst = tensor_lists
    if not src:
        return
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def install_foreach_multi_tensor() -> list[str]:
    """Replace megatron's local (no TE / apex) multi-tensor L2 norm and scale with the ones above wherever a
    megatron module holds them. Returns what was replaced (empty with TE / apex, or without megatron)."""
    try:
        from megatron.core import utils as mu  # deferred: megatron-core is heavy; only the megatron paths call this
    except ImportError:
        return []
    swaps = {getattr(mu, "local_multi_tensor_l2_norm", None): foreach_l2_norm,
             getattr(mu, "local_multi_tensor_scale", None): foreach_scale}
    swaps.pop(None, None)
    done = []
    for mod_name in ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer"):
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for attr in ("l2_norm_impl", "multi_tensor_scale_impl"):
            new = swaps.get(getattr(mod, attr, None))
            if new is not None:
                setattr(mod, attr, new)
                done.append(f"{mod_name}.{attr}")
    return done
