"""Tensor-train linear layer (Novikov et al. 2015, "Tensorizing Neural Networks")."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.tt import (
    resolve_tt_ranks,
    tt_matrix_apply,
    tt_matrix_from_dense,
    tt_matrix_macs,
    tt_matrix_params,
    tt_matrix_to_dense,
)
from ._common import check_features, check_linear, copy_bias, product_init_std, reset_bias, resolve_modes

__all__ = ["TTLinear"]


class TTLinear(nn.Module):
    """A linear layer whose weight is a TT-matrix.

    ``W[(o_1..o_d), (i_1..i_d)] = G_1[:, o_1, i_1, :] G_2[:, o_2, i_2, :] ... G_d[:, o_d, i_d, :]`` with cores
    ``G_k`` of shape ``(r_{k-1}, out_modes[k], in_modes[k], r_k)``, ``r_0 = r_d = 1``; ``y = x W^T + b``. The
    layer stores ``sum_k r_{k-1} o_k i_k r_k`` weights instead of ``prod(o) prod(i)``.

    The forward pass contracts ``x`` with the cores one by one when that needs fewer multiply-adds than
    rebuilding ``W`` and running one GEMM, and uses the dense path otherwise (both give the same result).

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias.
        in_modes: factors of ``in_features``; a balanced factorisation when omitted.
        out_modes: factors of ``out_features`` (as many as ``in_modes``); balanced when omitted.
        ranks: an ``int`` (every inner TT-rank, capped by the maximal rank of its bond) or the full list of
            ``d + 1`` ranks, e.g. ``[1, 2, 2, 2, 2, 1]``.
        device: parameter device.
        dtype: parameter dtype.

    Shape:
        input ``(..., in_features)``, output ``(..., out_features)``.

    Raises:
        ValueError: for modes that do not multiply to the features, or ranks below 1 / above the maximal TT-rank.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        ranks: int | Sequence[int] = 2,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_features(in_features, out_features)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.in_modes, self.out_modes = resolve_modes(in_features, out_features, in_modes, out_modes, default_d=4)
        shape = [o * i for o, i in zip(self.out_modes, self.in_modes, strict=True)]
        self.ranks = resolve_tt_ranks(ranks, shape)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(self.ranks[k], o, i, self.ranks[k + 1], **factory))
            for k, (o, i) in enumerate(zip(self.out_modes, self.in_modes, strict=True))
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Gaussian cores scaled so that the represented weight has ``nn.Linear``'s default variance."""
        std = product_init_std(self.in_features, len(self.cores), math.prod(self.ranks[1:-1]))
        for core in self.cores:
            nn.init.normal_(core, 0.0, std)
        reset_bias(self.bias, self.in_features)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        ranks: int | Sequence[int] | None = None,
        eps: float | None = None,
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
    ) -> TTLinear:
        """Initialise from a trained ``nn.Linear`` by TT-SVD of its weight (``linear`` is not modified).

        Args:
            linear: the source layer.
            ranks: rank cap (``int``) or exact ranks (list); ``None`` for no cap.
            eps: relative Frobenius error bound ``||W - W_tt||_F <= eps ||W||_F`` (guaranteed without a cap).
            in_modes: factors of ``in_features``; balanced when omitted.
            out_modes: factors of ``out_features``; balanced when omitted.

        Raises:
            ValueError: if neither ``ranks`` nor ``eps`` is given, or for invalid modes / ranks / eps.
        """
        check_linear(linear, cls.__name__)
        if ranks is None and eps is None:
            raise ValueError("TTLinear.from_linear needs ranks= (int or list), eps= (in (0, 1)) or both")
        in_modes, out_modes = resolve_modes(linear.in_features, linear.out_features, in_modes, out_modes, 4)
        with torch.no_grad():
            weight = linear.weight.detach()
            cores = tt_matrix_from_dense(weight.double(), out_modes, in_modes, ranks=ranks, eps=eps)
            layer = cls(
                linear.in_features,
                linear.out_features,
                linear.bias is not None,
                in_modes=in_modes,
                out_modes=out_modes,
                ranks=[1] + [c.shape[-1] for c in cores],
                device=weight.device,
                dtype=weight.dtype,
            )
            for param, core in zip(layer.cores, cores, strict=True):
                param.copy_(core)
            copy_bias(layer.bias, linear)
        return layer

    def factorized_macs(self) -> int:
        """Multiply-adds per input vector of the core-by-core contraction."""
        return tt_matrix_macs(self.out_modes, self.in_modes, self.ranks)

    def reconstruction_macs(self) -> int:
        """Multiply-adds to rebuild the dense weight (paid once per forward on the dense path)."""
        total, rows, cols = 0, 1, 1
        for k, (o, i) in enumerate(zip(self.out_modes, self.in_modes, strict=True)):
            total += rows * cols * self.ranks[k] * o * i * self.ranks[k + 1] if k else 0
            rows, cols = rows * o, cols * i
        return total

    def use_factorized(self, tokens: int) -> bool:
        """Whether the contraction path is cheaper than rebuilding ``W`` for ``tokens`` input vectors."""
        dense = self.reconstruction_macs() + tokens * self.in_features * self.out_features
        return tokens * self.factorized_macs() < dense

    def to_dense(self) -> torch.Tensor:
        """The represented weight, ``(out_features, in_features)``."""
        return tt_matrix_to_dense(list(self.cores))

    @property
    def weight(self) -> torch.Tensor:
        """The represented dense weight (computed, not stored), so code reading ``.weight`` keeps working."""
        return self.to_dense()

    def num_stored_params(self) -> int:
        """Stored weights and bias: ``sum_k r_{k-1} o_k i_k r_k + out_features``."""
        bias = self.out_features if self.bias is not None else 0
        return tt_matrix_params(self.out_modes, self.in_modes, self.ranks) + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // self.in_features
        if self.use_factorized(tokens):
            y = tt_matrix_apply(x, list(self.cores))
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.to_dense(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"in_modes={self.in_modes}, out_modes={self.out_modes}, ranks={self.ranks}"
        )
