"""GPU checks of the throughput work (skipped without CUDA; their CPU counterparts are the other test_throughput_*
files): the kernel path on a CUDA machine, and the compiled cross-entropy on CUDA against the eager formula."""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_kernel_path_is_triton_on_cuda():
    from bitnet_dist.layers import kernel_path, kernel_status

    module, reason = kernel_status()
    assert module is not None, reason
    assert kernel_path("auto", "cuda").name == "triton"


def test_compiled_cross_entropy_on_cuda_equals_eager():
    from bitnet_dist.model import _token_cross_entropy, fused_token_cross_entropy

    torch.manual_seed(0)
    logits = (3 * torch.randn(512, 2, 32000, device="cuda")).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 32000, (2, 512), device="cuda")
    g = torch.randn(2, 512, device="cuda")
    fused = fused_token_cross_entropy(logits, labels)
    (gf,) = torch.autograd.grad(fused, logits, g)
    eager = _token_cross_entropy(logits, labels)
    (ge,) = torch.autograd.grad(eager, logits, g)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gf.float(), ge.float(), rtol=2e-2, atol=1e-4)
