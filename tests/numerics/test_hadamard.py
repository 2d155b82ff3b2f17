"""Block fast Walsh-Hadamard transform against the dense Sylvester matrix (float64)."""
import math

import pytest
import torch

from bitnet_dist.errors import ConfigError
from bitnet_dist.hadamard import fwht, hadamard_matrix


def sylvester(n):
    """Independent reference: H[i, j] = (-1)^popcount(i & j) / sqrt(n)."""
    idx = torch.arange(n)
    k = max(1, int(math.log2(n)))
    bits = ((idx[:, None] >> torch.arange(k)) & 1).double()  # [n, log2 n]
    pop = (bits @ bits.T).long()  # popcount(i & j) = sum_k bit_k(i) bit_k(j)
    return (1 - 2 * (pop % 2)).double() / math.sqrt(n)


@pytest.mark.parametrize("n", [2 ** k for k in range(0, 13)])
def test_equals_dense_sylvester_up_to_4096(n):
    x = torch.randn(3, n, dtype=torch.float64)
    H = sylvester(n)
    torch.testing.assert_close(hadamard_matrix(n), H, rtol=0, atol=1e-15)
    torch.testing.assert_close(fwht(x, n), x @ H.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 16, 256, 4096])
def test_orthonormal_symmetric_self_inverse(n):
    H = hadamard_matrix(n)
    rows = torch.randperm(n)[:64]  # a sample of rows keeps the 4096 case cheap: (H H^T)[rows] = I[rows]
    torch.testing.assert_close(H[rows] @ H.T, torch.eye(n, dtype=torch.float64)[rows], rtol=0, atol=1e-12)
    torch.testing.assert_close(H, H.T, rtol=0, atol=0)
    x = torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close(fwht(fwht(x, n), n), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fwht(x, n).norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("block,dim", [(4, 32), (16, 48), (64, 64 * 5)])
def test_block_diagonal(block, dim):
    x = torch.randn(2, 7, dim, dtype=torch.float64)
    H = hadamard_matrix(block)
    ref = (x.reshape(2, 7, dim // block, block) @ H.T).reshape(2, 7, dim)
    torch.testing.assert_close(fwht(x, block), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_is_transform_of_upstream(dtype):
    x = torch.randn(4, 128, dtype=dtype, requires_grad=True)
    up = torch.randn(4, 128, dtype=dtype)
    y = fwht(x, 32)
    assert y.dtype == dtype
    (y * up).sum().backward()
    torch.testing.assert_close(x.grad, fwht(up, 32), rtol=0, atol=0)
    ref = (up.double().reshape(4, 4, 32) @ hadamard_matrix(32)).reshape(4, 128)
    torch.testing.assert_close(x.grad.double(), ref, rtol=2e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_gradcheck_float64():
    x = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fwht(t, 8), (x,))


@pytest.mark.parametrize("block,dim", [(3, 12), (12, 24), (64, 96), (0, 8)])
def test_bad_block_raises_config_error(block, dim):
    with pytest.raises(ConfigError, match="hadamard_block"):
        fwht(torch.randn(2, dim), block)
