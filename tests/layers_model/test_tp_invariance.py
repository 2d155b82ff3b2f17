"""Same seed and data at TP = 1, 2, 4 (gloo, CPU processes): same loss and same gathered gradients."""
import pytest
import torch
from dist_utils import run_ranks
from mp_workers import loss_and_grads

PRESETS = ["v2_a8", "v2_a4"]
RTOL = 1e-5


@pytest.fixture(scope="module")
def tp1():
    return run_ranks(loss_and_grads, 1, PRESETS)[0]


def rel(a, b):
    a, b = torch.from_numpy(a).double(), torch.from_numpy(b).double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare(ref, got):
    worst = {}
    for preset in PRESETS:
        (l1, g1), (l2, g2) = ref[preset], got[preset]
        assert set(g1) == set(g2)
        worst[preset] = (abs(l2 - l1) / abs(l1), max((rel(g2[n], g1[n]), n) for n in g1))
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_loss_and_grads_equal_across_tp(tp1, tp):
    got = run_ranks(loss_and_grads, tp, PRESETS)[0]
    for preset, (loss_rel, (grad_rel, name)) in compare(tp1, got).items():
        assert loss_rel <= RTOL, f"{preset} TP={tp}: loss differs by {loss_rel:.2e}"
        assert grad_rel <= RTOL, f"{preset} TP={tp}: grad of {name} differs by {grad_rel:.2e}"


@pytest.mark.slow
def test_missing_norm_backward_all_reduce_is_caught(tp1):
    """With megatron's forward-only reduce in the row-parallel SubLN, the loss still matches but the
    gradients do not: the comparison above must see it."""
    got = run_ranks(loss_and_grads, 2, PRESETS, True)[0]
    for preset, (loss_rel, (grad_rel, name)) in compare(tp1, got).items():
        assert loss_rel <= RTOL
        assert grad_rel > 1e-3, f"{preset}: broken SubLN backward went unnoticed ({name}: {grad_rel:.2e})"
