"""Matrix products for the thin GEMMs of factorised layers, oriented by shape.

A CPU BLAS computes ``a @ b`` and ``(b.T @ a.T).T`` (the same numbers) at very different speeds when the result
has few columns: with ``a`` ``(1024, 4096)`` (a transposed view) and ``b`` ``(4096, 4)``, the second order was 16x
faster on this project's machine (oneDNN / MKL, float32, one thread), and ``(4096, 1024) @ (1024, 4)`` 2.7x. Such
products are exactly the backward of a factorised layer: the gradient of a rank-4 factor (``grad.T @ z``) and the
gradient flowing back through it (``grad @ left``). Autograd's own backward of ``F.linear`` takes the slow order;
:func:`linear` takes the fast one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["autocast_inputs", "linear", "low_rank_linear", "matmul", "oriented_matmul"]

# A result with at most this many columns (and more rows than columns) is computed transposed on CPU.
THIN_COLUMNS = 64
# Gradients smaller than this (elements of the layer's output) are cheap in any order: below it the custom
# autograd Function's own cost (tens of microseconds) outweighs the saving.
MIN_ORIENTED_OUTPUT = 1 << 14


def autocast_inputs(device_type: str, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``tensors`` cast to the autocast dtype when autocast is on for ``device_type`` (``None`` passes through).

    A custom autograd Function must cast its inputs before ``apply``, where autograd sees the cast: its backward
    runs outside autocast, and would otherwise meet gradients and saved tensors of different dtypes.
    """
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def oriented_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D ``a`` ``(m, k)`` and ``b`` ``(k, n)``, computed as ``(b.T @ a.T).T`` on CPU when the
    result is thin (``n <= 64`` and ``n < m``), where that order is the fast one. The result may be a transposed
    (non-contiguous) view.

    Raises:
        ValueError: for operands that are not 2-D.
    """
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"oriented_matmul takes 2-D operands, got {tuple(a.shape)} and {tuple(b.shape)}")
    m, n = a.shape[0], b.shape[1]
    if a.device.type == "cpu" and n <= THIN_COLUMNS and n < m:
        return (b.T @ a.T).T
    return a @ b


class _Linear(torch.autograd.Function):
    """``F.linear`` whose backward computes its two products with :func:`oriented_matmul`."""

    generate_vmap_rule = True  # (forward and setup_context apart: torch.func's grad and vmap can run it)

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.to(x.dtype)
        grad2 = grad.reshape(-1, grad.shape[-1])  # (tokens, out)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = oriented_matmul(grad2, weight).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = oriented_matmul(grad2.T, x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad2.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; with autograd on CPU, for a thin ``weight`` (``in_features <= 64``, fewer
    than ``out_features``: the left factor of a low-rank product) and a large enough output, its backward products
    are oriented by shape (:func:`oriented_matmul`). Otherwise it is ``F.linear`` itself, whose backward orients
    well.

    Args:
        x: ``(..., in_features)``.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or ``None``.
    """
    out_features, in_features = weight.shape
    if (  # cheapest tests first: this runs for every small GEMM of a TT sweep
        in_features > THIN_COLUMNS
        or in_features >= out_features
        or x.numel() * out_features < MIN_ORIENTED_OUTPUT * in_features  # tokens * out_features
        or x.device.type != "cpu"
        or not torch.is_grad_enabled()
        or not (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    ):
        return F.linear(x, weight, bias)
    return _Linear.apply(*autocast_inputs("cpu", x, weight, bias))


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D operands, with the backward of :func:`linear` (e.g. rebuilding ``W = left @ right``)."""
    return linear(a, b.T)


def low_rank_linear(
    x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ (left @ right).T + bias`` as two thin GEMMs through the rank of ``left`` ``(out, R)`` and ``right``
    ``(R, in)``, with :func:`linear`'s backward."""
    return linear(linear(x, right), left, bias)
