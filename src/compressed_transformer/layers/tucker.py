"""Tucker-factorised linear layer: the weight seen as a tensor over its output and input modes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.matmul import low_rank_linear, matmul
from ..functional.tucker import (
    hooi,
    hosvd,
    resolve_tucker_ranks,
    tucker_linear_factors,
    tucker_linear_macs,
    tucker_linear_rank,
    tucker_params,
)
from ._common import check_features, check_linear, copy_bias, product_init_std, reset_bias, resolve_modes
from ._fast import (
    device_key,
    grad_needed,
    layer_cache,
    low_rank_is_faster,
    params_of,
    prepare_forward,
    represented_weight,
    resolve_mode,
    tensor_attr,
    tokens_of,
)

__all__ = ["TuckerLinear"]


class TuckerLinear(nn.Module):
    """A linear layer whose weight is a Tucker tensor (Tucker 1966; Kolda & Bader 2009).

    ``W`` reshaped to ``(o_1, ..., o_d, i_1, ..., i_d)`` equals ``G x_1 U_1 ... x_d U_d x_{d+1} V_1 ... x_{2d} V_d``
    with a core ``G`` of shape ``(r_1..r_d, s_1..s_d)``, output factors ``U_k`` ``(o_k, r_k)`` and input factors
    ``V_k`` ``(i_k, s_k)``. Equivalently ``W = (U_1 ⊗ .. ⊗ U_d) G (V_1 ⊗ .. ⊗ V_d)^T``, a rank
    ``R = min(prod r, prod s)`` product, so the forward is two thin GEMMs through rank ``R``
    (:func:`~compressed_transformer.functional.tucker.tucker_linear_factors`); it rebuilds ``W`` and runs one GEMM
    instead when the cost model predicts that to be faster. In eval mode without autograd the factor matrices or
    ``W`` are cached until a parameter changes (see :mod:`compressed_transformer.layers._fast`).

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias.
        in_modes: factors of ``in_features``; two balanced factors when omitted.
        out_modes: factors of ``out_features``; balanced when omitted.
        ranks: one ``int`` for every mode (capped by the mode size), or ``2d`` ranks: output modes first.
        device: parameter device.
        dtype: parameter dtype.

    Shape:
        input ``(..., in_features)``, output ``(..., out_features)``.

    Raises:
        ValueError: for modes that do not multiply to the features, or ranks outside ``[1, mode size]``.
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
        self.in_modes, self.out_modes = resolve_modes(in_features, out_features, in_modes, out_modes, default_d=2)
        self.ranks = resolve_tucker_ranks(ranks, self.out_modes + self.in_modes)
        d = len(self.out_modes)
        self.core = nn.Parameter(torch.empty(*self.ranks, **factory))
        self.out_factors = nn.ParameterList(
            nn.Parameter(torch.empty(o, r, **factory)) for o, r in zip(self.out_modes, self.ranks[:d], strict=True)
        )
        self.in_factors = nn.ParameterList(
            nn.Parameter(torch.empty(i, s, **factory)) for i, s in zip(self.in_modes, self.ranks[d:], strict=True)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Gaussian core and factors scaled so that ``W`` has ``nn.Linear``'s default variance."""
        std = product_init_std(self.in_features, 1 + len(self.ranks), math.prod(self.ranks))
        for param in [self.core, *self.out_factors, *self.in_factors]:
            nn.init.normal_(param, 0.0, std)
        reset_bias(self.bias, self.in_features)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        ranks: int | Sequence[int],
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        n_iter: int = 10,
    ) -> TuckerLinear:
        """Initialise from a trained ``nn.Linear`` by HOSVD, refined by ``n_iter`` HOOI sweeps (0: HOSVD only).

        Raises:
            ValueError: for invalid modes or ranks, or ``n_iter < 0``.
        """
        check_linear(linear, cls.__name__)
        if n_iter < 0:
            raise ValueError(f"n_iter must be >= 0, got {n_iter}")
        in_modes, out_modes = resolve_modes(linear.in_features, linear.out_features, in_modes, out_modes, 2)
        with torch.no_grad():
            weight = linear.weight.detach()
            tensor = weight.double().reshape(*out_modes, *in_modes)
            core, factors = hooi(tensor, ranks, n_iter=n_iter) if n_iter else hosvd(tensor, ranks)
            layer = cls(
                linear.in_features,
                linear.out_features,
                linear.bias is not None,
                in_modes=in_modes,
                out_modes=out_modes,
                ranks=list(core.shape),
                device=weight.device,
                dtype=weight.dtype,
            )
            layer.core.copy_(core)
            d = len(out_modes)
            for param, factor in zip([*layer.out_factors, *layer.in_factors], factors, strict=True):
                param.copy_(factor)
            assert len(factors) == 2 * d
            copy_bias(layer.bias, linear)
        return layer

    def factorized_macs(self) -> int:
        """Multiply-adds per input vector of the factorised path: ``R (in_features + out_features)``."""
        return tucker_linear_rank(self.ranks, len(self.out_modes)) * (self.in_features + self.out_features)

    def mode_product_macs(self) -> int:
        """Multiply-adds per input vector of the mode-by-mode product of
        :func:`~compressed_transformer.functional.tucker.tucker_linear_apply`."""
        return tucker_linear_macs(self.out_modes, self.in_modes, self.ranks)

    def reconstruction_macs(self) -> int:
        """Multiply-adds to rebuild the dense weight: both Kronecker sides by
        :func:`~compressed_transformer.functional.tucker.kron_matmul`, then ``left @ right``."""
        d = len(self.out_modes)
        rank = tucker_linear_rank(self.ranks, d)

        def kron_side(modes: list[int], ranks: list[int]) -> int:
            return sum(math.prod(modes[: k + 1]) * math.prod(ranks[k:]) * rank for k in range(len(modes)))

        sides = kron_side(self.out_modes, self.ranks[:d]) + kron_side(self.in_modes, self.ranks[d:])
        return sides + rank * self.in_features * self.out_features

    def use_factorized(self, tokens: int, *, train: bool | None = None, cached: bool | None = None) -> bool:
        """Whether the forward runs the two thin GEMMs (rather than one with ``W``) for ``tokens`` input vectors.

        Args:
            tokens: number of input vectors.
            train: price a forward+backward pass rather than inference; default: whether a forward now would
                differentiate the parameters.
            cached: whether ``W`` and the factors would come from the eval cache; default: as a forward now.
        """
        train, cached = resolve_mode(self, [*self._factor_params(), self.bias], train, cached)
        return self._factorized(tokens, train, cached, tensor_attr(self, "core"))

    def _factorized(self, tokens: int, train: bool, cached: bool, core: torch.Tensor) -> bool:
        rank = tucker_linear_rank(self.ranks, len(self.out_modes))
        return low_rank_is_faster(device_key(core), tokens, self.in_features, self.out_features, rank, train, cached)

    def forward_path(self, tokens: int, *, train: bool | None = None) -> str:
        """``"low-rank"`` or ``"dense"``: the path taken for ``tokens`` vectors."""
        factorized = self.use_factorized(tokens, train=train, cached=None if train is None else not train)
        return "low-rank" if factorized else "dense"

    def _factor_params(self) -> list[torch.Tensor]:
        """The core, the output factors and the input factors (what ``W`` is derived from)."""
        return [self.core, *params_of(self, "out_factors"), *params_of(self, "in_factors")]

    def to_dense(self) -> torch.Tensor:
        """The represented weight, ``(out_features, in_features)``: ``left @ right`` of
        :func:`~compressed_transformer.functional.tucker.tucker_linear_factors` (one GEMM through rank ``R``)."""
        left, right = tucker_linear_factors(self.core, params_of(self, "out_factors"), params_of(self, "in_factors"))
        return matmul(left, right)

    @property
    def weight(self) -> torch.Tensor:
        """The represented dense weight (computed, not stored; in eval mode without autograd, the cached copy the
        forward uses)."""
        return represented_weight(self, self._factor_params(), self.to_dense)

    def num_stored_params(self) -> int:
        """Stored weights and bias: ``prod(ranks) + sum_k n_k r_k + out_features``."""
        bias = self.out_features if self.bias is not None else 0
        return tucker_params(self.out_modes + self.in_modes, self.ranks) + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # parameters read once (tensor_attr: a few % of a one-token forward)
        core, bias = tensor_attr(self, "core"), tensor_attr(self, "bias")
        outs, ins = params_of(self, "out_factors"), params_of(self, "in_factors")
        params = [core, *outs, *ins]
        train = grad_needed([*params, bias])
        cached = prepare_forward(self, train=train)
        if self._factorized(tokens_of(x, self.in_features), train, cached, core):
            if cached:
                build = lambda: tucker_linear_factors(core, outs, ins)  # noqa: E731
                left, right = layer_cache(self).get("factors", params, build)
            else:
                left, right = tucker_linear_factors(core, outs, ins)
            return low_rank_linear(x, left, right, bias)
        weight = layer_cache(self).get("dense", params, self.to_dense) if cached else self.to_dense()
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"in_modes={self.in_modes}, out_modes={self.out_modes}, ranks={self.ranks}"
        )
