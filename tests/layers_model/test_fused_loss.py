"""The fused cross-entropy (trainer.fused_cross_entropy, bitnet_dist.model.fused_token_cross_entropy): against a
float64 formula and megatron's vocab-parallel cross-entropy, compiled (as on CUDA) and eager, and in the model."""
import numpy as np
import pytest
import torch
from dist_utils import run_ranks
from throughput_workers import cross_entropy_paths

from bitnet_dist.model import _token_cross_entropy


def _reference(logits, labels):
    lg = logits.double()
    lse = torch.logsumexp(lg, dim=-1)
    picked = lg.gather(-1, labels.t().unsqueeze(-1)).squeeze(-1)
    return (lse - picked).t()  # [b, s]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_cross_entropy_equals_the_formula_and_megatron(dtype):

    from bitnet_dist.compat import install_cpu_path

    install_cpu_path()
    torch.manual_seed(0)
    s, b, v = 12, 3, 50
    logits = (4 * torch.randn(s, b, v)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, v, (b, s))
    ours = _token_cross_entropy(logits, labels)
    assert ours.dtype == torch.float32 and ours.shape == (b, s)
    torch.testing.assert_close(ours.double(), _reference(logits.detach(), labels), rtol=1e-6, atol=1e-6)
    g = torch.randn(b, s)
    (gl,) = torch.autograd.grad(ours, logits, g)
    ref_logits = logits.detach().double().requires_grad_(True)
    (gr,) = torch.autograd.grad(_reference(ref_logits, labels), ref_logits, g.double())
    torch.testing.assert_close(gl.double(), gr, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


@pytest.mark.slow
def test_compiled_cross_entropy_equals_eager():
    """The torch.compile'd form the CUDA path runs, here compiled for the CPU: same loss and logits gradient."""
    torch.manual_seed(1)
    logits = (3 * torch.randn(16, 2, 64)).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 64, (2, 16))
    g = torch.randn(2, 16)
    eager = _token_cross_entropy(logits, labels)
    (ge,) = torch.autograd.grad(eager, logits, g)
    comp = torch.compile(_token_cross_entropy, dynamic=False)(logits, labels)
    (gc,) = torch.autograd.grad(comp, logits, g)
    torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gc.float(), ge.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_model_loss_and_grads_with_the_fused_cross_entropy(tp):
    """In the model (CPU, fp32): the same loss and gradients as megatron's loss at TP=1; at TP=2 (vocabulary split over
    ranks) megatron's loss runs either way, bitwise the same."""
    res = run_ranks(cross_entropy_paths, tp)[0]
    (l0, g0), (l1, g1) = res[False], res[True]
    assert abs(l1 - l0) <= 1e-6 * abs(l0)
    for n in g0:
        if tp == 2:
            assert np.array_equal(g0[n], g1[n]), n
        else:
            # rounding-level loss differences move a few INT8 codes: within 1e-5 of each tensor's largest entry
            assert float(np.abs(g1[n] - g0[n]).max()) <= 1e-5 * float(np.abs(g0[n]).max()), n
