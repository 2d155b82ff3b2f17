"""BitLinear layers: fused QKV / gate|up scales, run-time act-bit switching, the CPU path."""
import pytest
import torch

from dist_utils import run_ranks
from mp_workers import fused_vs_separate


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_fused_qkv_and_gate_up_equal_separate_projections(tp):
    r = run_ranks(fused_vs_separate, tp)
    for res in r:
        assert res["qkv"] < 1e-5, res
        assert res["fc1"] < 1e-5, res
        assert res["fc1_single_scale"] > 1e-3, "one scale over the fused matrix should differ"


def test_cpu_path_inactive_when_cuda_available(monkeypatch):
    import bitnet_dist.compat as compat

    before = torch.cuda.current_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(compat, "_installed", False)
    assert compat.install_cpu_path() is False
    assert torch.cuda.current_device is before and not compat.cpu_path_active()
