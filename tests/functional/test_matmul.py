"""Shape-oriented products: the same numbers as ``@`` / ``F.linear``, forward and backward, in every dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from compressed_transformer.functional.matmul import linear, low_rank_linear, matmul, oriented_matmul

F64 = torch.float64


@pytest.mark.parametrize("m,k,n", [(300, 50, 4), (4, 50, 300), (64, 8, 64), (100, 7, 65)])
def test_oriented_matmul_is_the_product(m: int, k: int, n: int) -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, dtype=F64, generator=gen), torch.randn(k, n, dtype=F64, generator=gen)
    assert_close(oriented_matmul(a, b), a @ b)
    assert_close(oriented_matmul(a.T.contiguous().T, b), a @ b)  # transposed views
    with pytest.raises(ValueError, match="2-D"):
        oriented_matmul(a[None], b)


def _grads(fn, *tensors: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach(), *[leaf.grad for leaf in leaves]]


@pytest.mark.parametrize(
    "lead,out_features,in_features,oriented",
    [((4096,), 1024, 4, True), ((8, 300), 256, 16, True), ((3,), 1024, 4, False), ((512,), 64, 256, False)],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_f_linear_forward_and_backward(lead, out_features, in_features, oriented, with_bias) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, in_features, dtype=F64, generator=gen)
    weight = torch.randn(out_features, in_features, dtype=F64, generator=gen)
    bias = torch.randn(out_features, dtype=F64, generator=gen) if with_bias else None
    grad = torch.randn(*lead, out_features, dtype=F64, generator=gen)
    inputs = (x, weight) if bias is None else (x, weight, bias)
    got = _grads(lambda *t: linear(*t), *inputs, grad=grad)
    expected = _grads(lambda *t: F.linear(*t), *inputs, grad=grad)
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e)
    probe = linear(x, weight.requires_grad_(True), bias)
    assert ("_Linear" in type(probe.grad_fn).__name__) == oriented  # the shape rule dispatches as documented


def test_linear_without_autograd_is_f_linear() -> None:
    x, weight = torch.randn(4096, 4), torch.randn(1024, 4)
    with torch.no_grad():
        assert_close(linear(x, weight.requires_grad_(True)), F.linear(x, weight))


def test_linear_under_cpu_autocast_returns_float32_gradients() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4096, 4, generator=gen)
    weight = torch.randn(1024, 4, generator=gen, requires_grad=True)
    bias = torch.randn(1024, generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x, weight, bias)
    assert y.dtype == torch.bfloat16 and "_Linear" in type(y.grad_fn).__name__
    y.float().sum().backward()
    assert weight.grad.dtype == bias.grad.dtype == torch.float32
    assert_close(weight.grad, x.sum(0).expand(1024, 4), rtol=2e-2, atol=2.0)
    assert_close(bias.grad, torch.full((1024,), 4096.0))


def test_matmul_and_low_rank_linear() -> None:
    gen = torch.Generator().manual_seed(3)
    left, right = torch.randn(1024, 4, dtype=F64, generator=gen), torch.randn(4, 256, dtype=F64, generator=gen)
    x, bias = torch.randn(64, 256, dtype=F64, generator=gen), torch.randn(1024, dtype=F64, generator=gen)
    grad_w = torch.randn(1024, 256, dtype=F64, generator=gen)
    for g, e in zip(
        _grads(matmul, left, right, grad=grad_w), _grads(lambda a, b: a @ b, left, right, grad=grad_w), strict=True
    ):
        assert_close(g, e)
    assert_close(low_rank_linear(x, left, right, bias), x @ (left @ right).T + bias)
