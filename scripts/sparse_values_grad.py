"""An experiment, not part of the library: how fast would a pruned layer train if its parameter held only the kept
weights (a ``(nnz,)`` vector beside fixed CSR indices) instead of a dense weight and a mask, as ``PrunedLinear``
does now?

With a dense parameter, every training pass gathers the kept values out of the dense weight and writes a dense
weight gradient (the outer product times the mask, or a zero tensor with the sampled values scattered in); at one
token those weight-sized passes cost more than ``nn.Linear``'s whole step. With the values as the parameter,
neither happens: the forward and the input gradient are CSR products, and the gradient of the values is the
sampled product ``g[row] * x[col]`` (``torch.sparse.sampled_addmm`` for many tokens).

Prints, per shape, density and token count, the time of one forward+backward of that design and of
``PrunedLinear`` (as the study uses it), both relative to ``nn.Linear`` (median thread CPU time, one thread).

    OMP_NUM_THREADS=1 python scripts/sparse_values_grad.py
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn

from compressed_transformer.layers import PrunedLinear
from compressed_transformer.layers._fast import csr_linear, csr_pattern


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


class _ValuesCSRLinear(torch.autograd.Function):
    """``y = x W^T + b`` with ``W`` the CSR matrix of ``values`` at fixed indices; gradients for all three."""

    @staticmethod
    def forward(ctx, x, values, bias, pattern, shape):
        ctx.save_for_backward(x, values)
        ctx.pattern, ctx.shape = pattern, shape
        return csr_linear(x, _csr(pattern["crow"], pattern["col"], values, shape), bias)

    @staticmethod
    def backward(ctx, grad):
        x, values = ctx.saved_tensors
        p, (out_features, in_features) = ctx.pattern, ctx.shape
        grad2, x2 = grad.reshape(-1, out_features), x.reshape(-1, in_features)
        transposed = _csr(p["crow_t"], p["col_t"], values.index_select(0, p["perm"]), (in_features, out_features))
        grad_x = csr_linear(grad2, transposed, None).reshape(x.shape)
        if grad2.shape[0] == 1:
            grad_values = grad2[0].index_select(0, p["row"]) * x2[0].index_select(0, p["col64"])
        else:
            empty = _csr(p["crow"], p["col"], torch.zeros_like(values), ctx.shape)
            grad_values = torch.sparse.sampled_addmm(empty, grad2.t(), x2, beta=0.0).values()
        return grad_x, grad_values, grad2.sum(0), None, None


def _step(module, params: list[torch.Tensor], x: torch.Tensor, grad: torch.Tensor):
    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        module(x).backward(grad)

    return step


def _check_same_gradients(layer, pruned: PrunedLinear, values, flat, x: torch.Tensor, grad: torch.Tensor) -> None:
    """The experiment computes what ``PrunedLinear`` computes: the same output and gradients."""
    outputs = []
    for module, params in ((layer, [values, pruned.bias]), (pruned, [*pruned.parameters()])):
        for p in params:
            p.grad = None
        x.grad = None
        y = module(x)
        y.backward(grad)
        outputs.append((y.detach(), x.grad.clone(), params[0].grad.reshape(-1), pruned.bias.grad.clone()))
    (y, gx, gv, gb), (y_ref, gx_ref, gw_ref, gb_ref) = outputs
    for got, want in ((y, y_ref), (gx, gx_ref), (gv, gw_ref[flat]), (gb, gb_ref)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _median_ms(step, repeats: int) -> float:
    for _ in range(5):
        step()
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        step()
        times.append(time.thread_time() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    print("shape      density  tokens   values-param / dense   PrunedLinear / dense   dense ms")
    for in_features, out_features in [(512, 2048), (2048, 512), (256, 1024)]:
        for density in (0.1, 0.02):
            dense = nn.Linear(in_features, out_features)
            pruned = PrunedLinear(in_features, out_features).set_mask_(torch.rand(out_features, in_features) < density)
            pattern = csr_pattern(pruned.mask)
            pattern["row"] = pattern["flat"] // in_features
            pattern["col64"] = pattern["flat"] % in_features
            values = pruned.weight.detach().reshape(-1)[pattern["flat"]].clone().requires_grad_()
            bias = pruned.bias

            def layer(x, values=values, bias=bias, pattern=pattern, shape=(out_features, in_features)):
                return _ValuesCSRLinear.apply(x, values, bias, pattern, shape)

            for tokens in (1, 32, 512):
                x = torch.randn(tokens, in_features, requires_grad=True)
                g = torch.randn(tokens, out_features)
                _check_same_gradients(layer, pruned, values, pattern["flat"], x, g)

                repeats = 200 if tokens < 512 else 40
                base = _median_ms(_step(dense, [*dense.parameters()], x, g), repeats)
                ours = _median_ms(_step(layer, [values, bias], x, g), repeats)
                now = _median_ms(_step(pruned, [*pruned.parameters()], x, g), repeats)
                print(
                    f"{in_features}x{out_features:<5} {density:7.2f} {tokens:7d} {ours / base:22.2f} "
                    f"{now / base:22.2f} {base:10.3f}"
                )


if __name__ == "__main__":
    main()
