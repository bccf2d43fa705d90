"""Low-rank linear layer from a truncated SVD."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..functional._validate import _is_int
from ..functional.matmul import low_rank_linear, matmul
from ..functional.svd import truncated_svd
from ._common import check_features, check_linear, copy_bias, product_init_std, reset_bias
from ._fast import (
    device_key,
    grad_needed,
    layer_cache,
    low_rank_is_faster,
    prepare_forward,
    represented_weight,
    resolve_mode,
    tensor_attr,
    tokens_of,
)

__all__ = ["LowRankLinear"]


class LowRankLinear(nn.Module):
    """A linear layer with a rank-``r`` weight ``W = left @ right`` (``(out, r) @ (r, in)``), ``y = x W^T + b``.

    Computed as two thin GEMMs, ``(x right^T) left^T``, which needs ``r (in + out)`` multiply-adds per vector
    instead of ``in out``; when the cost model (:class:`~compressed_transformer.functional.costs.CostModel`)
    predicts that this is not faster, one GEMM with ``W`` is used, and in eval mode without autograd that ``W`` is
    cached until a parameter changes (see :mod:`compressed_transformer.layers._fast`).

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias.
        rank: inner rank in ``[1, min(in_features, out_features)]``.
        device: parameter device.
        dtype: parameter dtype.

    Shape:
        input ``(..., in_features)``, output ``(..., out_features)``.

    Raises:
        ValueError: if ``rank`` is outside ``[1, min(in_features, out_features)]``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        rank: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_features(in_features, out_features)
        max_rank = min(in_features, out_features)
        if not _is_int(rank) or not 1 <= rank <= max_rank:  # (a bool is no rank; a NumPy integer is one)
            raise ValueError(f"rank must be an int in [1, {max_rank}] for {in_features}->{out_features}, got {rank!r}")
        rank = int(rank)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.left = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.right = nn.Parameter(torch.empty(rank, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = product_init_std(self.in_features, 2, self.rank)
        nn.init.normal_(self.left, 0.0, std)
        nn.init.normal_(self.right, 0.0, std)
        reset_bias(self.bias, self.in_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rank: int | None = None, energy: float | None = None) -> LowRankLinear:
        """Best rank-``rank`` approximation of ``linear.weight`` (or the smallest rank keeping ``energy`` of the
        squared singular values); ``linear`` is not modified.

        Raises:
            ValueError: if neither or both of ``rank``/``energy`` are given, or either is out of range.
        """
        check_linear(linear, cls.__name__)
        with torch.no_grad():
            weight = linear.weight.detach()
            left, right = truncated_svd(weight.double(), rank=rank, energy=energy)
            layer = cls(
                linear.in_features,
                linear.out_features,
                linear.bias is not None,
                rank=left.shape[1],
                device=weight.device,
                dtype=weight.dtype,
            )
            layer.left.copy_(left)
            layer.right.copy_(right)
            copy_bias(layer.bias, linear)
        return layer

    def factorized_macs(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def use_factorized(self, tokens: int, *, train: bool | None = None, cached: bool | None = None) -> bool:
        """Whether the forward runs two thin GEMMs (rather than one with ``W``) for ``tokens`` input vectors.

        Args:
            tokens: number of input vectors.
            train: price a forward+backward pass rather than inference; default: whether a forward now would
                differentiate the parameters.
            cached: whether ``W`` would come from the eval cache; default: as a forward now.
        """
        train, cached = resolve_mode(self, [self.left, self.right, self.bias], train, cached)
        return self._factorized(tokens, train, cached, tensor_attr(self, "left"))

    def _factorized(self, tokens: int, train: bool, cached: bool, left: torch.Tensor) -> bool:
        return low_rank_is_faster(
            device_key(left), tokens, self.in_features, self.out_features, self.rank, train, cached
        )

    def forward_path(self, tokens: int, *, train: bool | None = None) -> str:
        """``"low-rank"`` or ``"dense"``: the path taken for ``tokens`` vectors."""
        factorized = self.use_factorized(tokens, train=train, cached=None if train is None else not train)
        return "low-rank" if factorized else "dense"

    def to_dense(self) -> torch.Tensor:
        """The represented weight, ``(out_features, in_features)``."""
        return matmul(self.left, self.right)

    @property
    def weight(self) -> torch.Tensor:
        """The represented dense weight (computed, not stored; in eval mode without autograd, the cached copy the
        forward uses)."""
        return represented_weight(self, [self.left, self.right], self.to_dense)

    def num_stored_params(self) -> int:
        bias = self.out_features if self.bias is not None else 0
        return self.rank * (self.in_features + self.out_features) + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # parameters read once (tensor_attr: a few % of a one-token forward)
        left, right, bias = tensor_attr(self, "left"), tensor_attr(self, "right"), tensor_attr(self, "bias")
        train = grad_needed([left, right, bias])
        cached = prepare_forward(self, train=train)
        if self._factorized(tokens_of(x, self.in_features), train, cached, left):
            return low_rank_linear(x, left, right, bias)
        weight = layer_cache(self).get("dense", [left, right], self.to_dense) if cached else self.to_dense()
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"rank={self.rank}"
        )
