"""Magnitude-pruned linear layer (Han et al. 2015): ``w = 1[|w| > lambda] w``, the mask kept through training."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.sparsity import magnitude_mask, magnitude_threshold
from ._common import check_features, check_linear, copy_bias
from ._fast import (
    csr_linear,
    csr_pattern,
    device_key,
    layer_cache,
    mask_cache,
    masked_csr_linear,
    prepare_forward,
    sparse_is_faster,
    sparse_supported,
    sparse_train_is_faster,
    tensor_attr,
    to_csr,
    tokens_of,
)

__all__ = ["PrunedLinear"]


class PrunedLinear(nn.Module):
    """A linear layer with a fixed binary mask on its weight: ``y = x (mask * W)^T + b``.

    The mask is a ``bool`` buffer saved in the ``state_dict``. Pruned entries of ``weight`` are stored as zeros and
    receive zero gradient (the forward multiplies by the mask), so optimiser steps never revive them; decoupled
    weight decay keeps zeros at zero too.

    In eval mode without autograd the masked weight is cached until the weight or the mask changes, and when the
    cost model predicts a sparse kernel to be faster (high sparsity, float32/float64) the forward multiplies with
    a cached CSR copy instead (``torch.sparse.addmm``). With autograd, at high sparsity, the forward and the input
    gradient use CSR kernels too and the weight gradient is computed only at the kept entries
    (``torch.sparse.sampled_addmm``), exactly the masked gradient of the dense path. :meth:`forward_path` says
    which kernels run (see :mod:`compressed_transformer.layers._fast`).

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias.
        device: parameter device.
        dtype: parameter dtype.

    Shape:
        input ``(..., in_features)``, output ``(..., out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_features(in_features, out_features)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default initialisation; the mask is left as it is."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        with torch.no_grad():
            self.weight.mul_(self.mask)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, sparsity: float | None = None, threshold: float | None = None
    ) -> PrunedLinear:
        """Prune ``linear``'s weight by magnitude (``linear`` is not modified).

        Args:
            linear: the source layer.
            sparsity: fraction of weights to zero, in ``[0, 1)`` (the smallest magnitudes go first).
            threshold: alternatively, the ``lambda`` of ``1[|w| > lambda]`` (e.g. a global threshold).

        Raises:
            ValueError: if neither or both are given, or ``sparsity`` is outside ``[0, 1)``.
        """
        check_linear(linear, cls.__name__)
        if (sparsity is None) == (threshold is None):
            raise ValueError("PrunedLinear.from_linear needs exactly one of sparsity= or threshold=")
        with torch.no_grad():
            weight = linear.weight.detach()
            if threshold is None:
                threshold = magnitude_threshold(weight, sparsity)
            layer = cls(
                linear.in_features,
                linear.out_features,
                linear.bias is not None,
                device=weight.device,
                dtype=weight.dtype,
            )
            layer.set_mask_(magnitude_mask(weight, threshold))
            layer.weight.copy_(weight * layer.mask)
            copy_bias(layer.bias, linear)
        return layer

    @torch.no_grad()
    def set_mask_(self, mask: torch.Tensor) -> PrunedLinear:
        """Replace the mask (``bool``, ``(out_features, in_features)``) and zero the newly pruned weights."""
        if mask.shape != self.weight.shape:
            raise ValueError(f"mask must have shape {tuple(self.weight.shape)}, got {tuple(mask.shape)}")
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            # e.g. a weight or a soft mask passed by mistake: ``.to(bool)`` would keep every nonzero entry
            raise ValueError(f"mask must be a bool tensor (or hold only 0 and 1), got {mask.dtype} with other values")
        self.mask.copy_(mask.to(torch.bool))
        self.weight.mul_(self.mask)
        return self

    @property
    def sparsity(self) -> float:
        """Fraction of pruned weights."""
        return 1.0 - float(self.mask.sum()) / self.mask.numel()

    def mask_as_weight(self) -> torch.Tensor:
        """The mask as 0/1 values of ``weight``'s dtype. Multiplying by it is 4x faster than by the ``bool`` mask
        (no type promotion); it is cached while the mask is unchanged, at the cost of one weight's memory
        (counted by :func:`~compressed_transformer.layers._fast.cache_nbytes`)."""
        if torch.compiler.is_compiling():
            return self.mask.to(self.weight.dtype)
        dtype = self.weight.dtype
        return mask_cache(self).get("mask", [self.mask], lambda: self.mask.to(dtype), (dtype,))

    def to_dense(self) -> torch.Tensor:
        """The effective weight ``mask * weight``, ``(out_features, in_features)``."""
        return self.weight * self.mask_as_weight()

    def num_stored_params(self) -> int:
        """Kept (unmasked) weights plus bias."""
        bias = self.out_features if self.bias is not None else 0
        return int(self.mask.sum()) + bias

    def use_sparse(self, tokens: int, *, train: bool = False) -> bool:
        """Whether the forward uses CSR kernels for ``tokens`` input vectors: in eval mode without autograd with a
        cached CSR weight, with autograd (``train``) through :func:`~compressed_transformer.layers._fast.
        masked_csr_linear` (sparse input gradient, weight gradient sampled at the kept entries)."""
        return self._use_sparse(tokens, train, tensor_attr(self, "weight"), tensor_attr(self, "mask"))

    def _use_sparse(self, tokens: int, train: bool, weight: torch.Tensor, mask: torch.Tensor) -> bool:
        # no input vectors: csr_linear's empty output would not be attached to an input needing its gradient
        if not sparse_supported(weight) or tokens == 0:
            return False
        nnz = mask_cache(self).get("nnz", [mask], lambda: int(mask.sum()))
        decide = sparse_train_is_faster if train else sparse_is_faster
        return decide(device_key(weight), tokens, self.in_features, self.out_features, nnz)

    def forward_path(self, tokens: int, *, train: bool = False) -> str:
        """``"csr"`` or ``"dense"``: the kernels a forward (``train``: with autograd) uses for ``tokens`` vectors."""
        return "csr" if self.use_sparse(tokens, train=train) else "dense"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # parameters read once (tensor_attr: a few % of a one-token forward)
        weight, bias, mask = tensor_attr(self, "weight"), tensor_attr(self, "bias"), tensor_attr(self, "mask")
        tokens = tokens_of(x, self.in_features)
        if not prepare_forward(self, [weight, bias]):
            if self._use_sparse(tokens, True, weight, mask):
                pattern = mask_cache(self).get("pattern", [mask], lambda: csr_pattern(mask))
                return masked_csr_linear(x, weight, bias, pattern, self.mask_as_weight)
            return F.linear(x, self.to_dense(), bias)
        tensors, cache = [weight, mask], layer_cache(self)
        if self._use_sparse(tokens, False, weight, mask):
            return csr_linear(x, cache.get("csr", tensors, lambda: to_csr(self.to_dense())), bias)
        return F.linear(x, cache.get("dense", tensors, self.to_dense), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"sparsity={self.sparsity:.4f}"
        )
