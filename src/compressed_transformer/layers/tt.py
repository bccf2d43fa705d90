"""Tensor-train linear layer (Novikov et al. 2015, "Tensorizing Neural Networks")."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..functional._validate import check_ranks
from ..functional.costs import CostModel, cost_model_for, costs_version
from ..functional.matmul import autocast_inputs
from ..functional.tt import (
    TTPlan,
    pad_rows,
    resolve_tt_ranks,
    tt_apply_matrices,
    tt_matrix_from_dense,
    tt_matrix_macs,
    tt_matrix_params,
    tt_matrix_plan,
    tt_matrix_rebuild,
    tt_matrix_to_dense,
    tt_plan_matrices,
    tt_plan_shapes,
)
from ._common import check_features, check_linear, copy_bias, product_init_std, reset_bias, resolve_modes
from ._fast import (
    TOKEN_BUCKETS,
    DeviceKey,
    device_key,
    grad_needed,
    layer_cache,
    memo,
    params_of,
    pick,
    prepare_forward,
    represented_weight,
    resolve_mode,
    tensor_attr,
    tokens_of,
)

__all__ = ["TTLinear"]


@functools.lru_cache(maxsize=4096)
def _tt_best(
    out_modes: tuple[int, ...],
    in_modes: tuple[int, ...],
    ranks: tuple[int, ...],
    tokens: int,
    train: bool,
    cached: bool,
    device: DeviceKey,
) -> tuple[TTPlan, float]:
    """The cheapest factorised plan (:func:`tt_matrix_plan`) and its predicted seconds."""
    device_type, element_size, threads, _ = device
    return tt_matrix_plan(
        out_modes,
        in_modes,
        ranks,
        tokens,
        train=train,
        threads=threads,
        costs=cost_model_for(device_type),
        element_size=element_size,
        cached_factors=cached,
    )


def _rebuild_seconds(
    out_modes: tuple[int, ...],
    in_modes: tuple[int, ...],
    ranks: tuple[int, ...],
    costs: CostModel,
    train: bool,
    threads: int,
    element_size: int,
) -> float:
    """Predicted seconds of :func:`tt_matrix_rebuild`: a GEMM through the middle rank and a weight-sized
    transpose (with their backward when ``train``)."""
    half = len(out_modes) // 2
    rows = math.prod(out_modes[:half]) * math.prod(in_modes[:half])
    cols = math.prod(out_modes[half:]) * math.prod(in_modes[half:])
    gemm = costs.steps_seconds([(rows, cols, ranks[half], 1)], train=train, threads=threads)
    return gemm + costs.copy_seconds(rows * cols * element_size, train=train, threads=threads)


@functools.lru_cache(maxsize=4096)
def _tt_choice(
    out_modes: tuple[int, ...],
    in_modes: tuple[int, ...],
    ranks: tuple[int, ...],
    tokens: int,
    train: bool,
    cached: bool,
    device: DeviceKey,
) -> TTPlan | None:
    """The plan of the forward, or ``None`` when one GEMM with the rebuilt (or cached) ``W`` is predicted faster."""
    device_type, element_size, threads, _ = device
    costs = cost_model_for(device_type)
    plan, factorized = _tt_best(out_modes, in_modes, ranks, tokens, train, cached, device)
    weights = math.prod(out_modes) * math.prod(in_modes)
    dense = costs.gemm_seconds(tokens * weights, weight_bytes=weights * element_size, train=train, threads=threads)
    rebuild = 0.0 if cached else _rebuild_seconds(out_modes, in_modes, ranks, costs, train, threads, element_size)
    return plan if costs.prefers(factorized, dense, rebuild) else None


@torch.compiler.assume_constant_result
def _tt_table(out_modes, in_modes, ranks, train, cached, device) -> tuple:
    """``(bound, (use factorised, groups, direction))`` per bucket of token counts, for ``torch.compile`` (which
    calls this once at trace time and guards on the comparisons of :func:`~compressed_transformer.layers._fast.
    pick`)."""
    rows = []
    for bound in TOKEN_BUCKETS:
        plan, _ = _tt_best(out_modes, in_modes, ranks, bound, train, cached, device)
        use = _tt_choice(out_modes, in_modes, ranks, bound, train, cached, device) is not None
        rows.append((bound, (use, plan.groups, plan.direction)))
    return tuple(rows)


def _full_rank_list(ranks: int | Sequence[int] | None) -> bool:
    """Whether ``ranks`` lists every TT rank (so it fixes the number of cores).

    Raises:
        ValueError: if ``ranks`` is neither ``None``, an int nor a list of ints.
    """
    return ranks is not None and not isinstance(check_ranks(ranks), int)


def _cores_for(ranks: int | Sequence[int] | None) -> int:
    """Number of cores for default modes: ``len(ranks) - 1`` for a full rank list (the seed's
    ``[1, 2, 2, 2, 2, 1]`` means 5 cores), else 4."""
    return max(1, len(ranks) - 1) if _full_rank_list(ranks) else 4


class TTLinear(nn.Module):
    """A linear layer whose weight is a TT-matrix.

    ``W[(o_1..o_d), (i_1..i_d)] = G_1[:, o_1, i_1, :] G_2[:, o_2, i_2, :] ... G_d[:, o_d, i_d, :]`` with cores
    ``G_k`` of shape ``(r_{k-1}, out_modes[k], in_modes[k], r_k)``, ``r_0 = r_d = 1``; ``y = x W^T + b``. The
    layer stores ``sum_k r_{k-1} o_k i_k r_k`` weights instead of ``prod(o) prod(i)``.

    The forward pass picks, for each token count, the fastest of: the factorised product under the cheapest
    :class:`~compressed_transformer.functional.tt.TTPlan` (cores merged into groups and swept left-to-right or
    right-to-left, in cache-sized blocks of tokens), or one GEMM with the rebuilt ``W``. The choice is made by
    :class:`~compressed_transformer.functional.costs.CostModel` (time, not multiply-adds: small matmuls are less
    efficient than one large GEMM). In eval mode without autograd the rebuilt ``W`` or the merged factors are
    cached until a parameter changes (see :mod:`compressed_transformer.layers._fast`). Every path gives the same
    result up to rounding.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias.
        in_modes: factors of ``in_features``; a balanced factorisation when omitted.
        out_modes: factors of ``out_features`` (as many as ``in_modes``); balanced when omitted. Their product may
            exceed ``out_features`` by up to :func:`~compressed_transformer.functional.tt.max_padding_rows` (for a
            size that factorises badly, e.g. a prime vocabulary: :func:`~compressed_transformer.functional.tt.
            tt_vocab_modes`): the TT-matrix then has ``prod(out_modes)`` rows, and the last ones, padding, are
            never output.
        ranks: an ``int`` (every inner TT-rank, capped by the maximal rank of its bond) or the full list of
            ``d + 1`` ranks, e.g. ``[1, 2, 2, 2, 2, 1]``.
        device: parameter device.
        dtype: parameter dtype.

    Shape:
        input ``(..., in_features)``, output ``(..., out_features)``.

    Raises:
        ValueError: for modes that do not multiply to the features (or pad ``out_features`` by more than
            allowed), or ranks below 1 / above the maximal TT-rank.
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
        self.in_modes, self.out_modes = resolve_modes(
            in_features,
            out_features,
            in_modes,
            out_modes,
            _cores_for(ranks),
            exact_d=_full_rank_list(ranks),
            pad_out=True,
        )
        self.padded = math.prod(self.out_modes) != out_features  # the TT-matrix has rows that are never output
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
            out_modes: factors of ``out_features``; balanced when omitted; may pad it (see the class).

        Raises:
            ValueError: if neither ``ranks`` nor ``eps`` is given, or for invalid modes / ranks / eps.
        """
        check_linear(linear, cls.__name__)
        if ranks is None and eps is None:
            raise ValueError("TTLinear.from_linear needs ranks= (int or list), eps= (in (0, 1)) or both")
        features = (linear.in_features, linear.out_features)
        in_modes, out_modes = resolve_modes(
            *features, in_modes, out_modes, _cores_for(ranks), exact_d=_full_rank_list(ranks), pad_out=True
        )
        with torch.no_grad():
            weight = linear.weight.detach()
            padded = pad_rows(weight.double(), math.prod(out_modes))  # zero rows: padding outputs
            cores = tt_matrix_from_dense(padded, out_modes, in_modes, ranks=ranks, eps=eps)
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

    def _core_list(self) -> list[torch.Tensor]:
        return params_of(self, "cores")

    def _decision(
        self, tokens: int, train: bool, cached: bool, cores: list[torch.Tensor]
    ) -> tuple[TTPlan | None, TTPlan, list]:
        """``(plan of the forward or None for dense, cheapest factorised plan, its merged core shapes)``."""
        first = cores[0]
        modes = (tuple(self.out_modes), tuple(self.in_modes), tuple(self.ranks))
        if torch.compiler.is_compiling():  # tokens may be symbolic: decide per bucket, never chunk
            use, groups, direction = pick(_tt_table(*modes, train, cached, device_key(first)), tokens)
            best = TTPlan(groups, direction)
            return (best if use else None), best, tt_plan_shapes(*modes, groups)
        key = (tokens, train, cached, first.dtype, first.device, torch.get_num_threads(), costs_version())
        table = memo(self)
        hit = table.get(key)
        if hit is None:
            device = device_key(first)
            best, _ = _tt_best(*modes, tokens, train, cached, device)
            use = _tt_choice(*modes, tokens, train, cached, device) is not None
            if len(table) > 1024:
                table.clear()
            hit = table[key] = ((best if use else None), best, tt_plan_shapes(*modes, best.groups))
        return hit

    def forward_plan(self, tokens: int, *, train: bool | None = None, cached: bool | None = None) -> TTPlan | None:
        """The contraction plan the forward uses for ``tokens`` input vectors, or ``None`` for the dense path.

        Args:
            tokens: number of input vectors (product of the leading dimensions).
            train: price a forward+backward pass rather than inference; default: whether a forward now would
                differentiate the cores (autograd on and a core requires grad).
            cached: whether the rebuilt ``W`` would come from the eval cache (free); default: as a forward now.
        """
        cores = self._core_list()
        train, cached = resolve_mode(self, [*cores, self.bias], train, cached)
        decision = self._decision(tokens, train, cached, cores)
        return decision[0]

    def use_factorized(self, tokens: int, *, train: bool | None = None, cached: bool | None = None) -> bool:
        """Whether the forward contracts with the cores (rather than rebuilding ``W``) for ``tokens`` vectors;
        ``train`` and ``cached`` as in :meth:`forward_plan`."""
        return self.forward_plan(tokens, train=train, cached=cached) is not None

    def forward_path(self, tokens: int, *, train: bool | None = None) -> str:
        """A short description of the path taken for ``tokens`` vectors, e.g. ``"ltr(2,2)x512"`` or ``"dense"``
        (``train`` as in :meth:`forward_plan`; eval-mode caching assumed for inference)."""
        plan = self.forward_plan(tokens, train=train, cached=None if train is None else not train)
        if plan is None:
            return "dense"
        chunk = f"x{plan.chunk}" if plan.chunk else ""
        return f"{plan.direction}({','.join(map(str, plan.groups))}){chunk}"

    def to_dense(self) -> torch.Tensor:
        """The represented weight, ``(out_features, in_features)`` (without the padding rows)."""
        return tt_matrix_to_dense(self._core_list())[: self.out_features]

    def _cached_dense(self) -> torch.Tensor:
        weight = self.to_dense()
        return weight.clone() if self.padded else weight

    @property
    def weight(self) -> torch.Tensor:
        """The represented dense weight (computed, not stored; in eval mode without autograd, the cached copy the
        forward uses), so code reading ``.weight`` keeps working."""
        return represented_weight(self, self._core_list(), self._cached_dense)

    def num_stored_params(self) -> int:
        """Stored weights and bias: ``sum_k r_{k-1} o_k i_k r_k + out_features``."""
        bias = self.out_features if self.bias is not None else 0
        return tt_matrix_params(self.out_modes, self.in_modes, self.ranks) + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One pass over the mode checks (at a token or two, each microsecond of Python is a few % of nn.Linear's)
        cores, bias = self._core_list(), tensor_attr(self, "bias")  # (see tensor_attr)
        train = grad_needed([*cores, bias])
        cached = prepare_forward(self, train=train)
        tokens = tokens_of(x, self.in_features)
        use, plan, shapes = self._decision(tokens, train, cached, cores)
        if use is None:
            if cached:  # (padded: a copy without the padding rows, so the cache holds what it reports)
                weight = layer_cache(self).get("dense", cores, self._cached_dense)
            else:
                weight = tt_matrix_rebuild(cores)[: self.out_features]  # rows of a row-major matrix: a view
            return F.linear(x, weight, bias)
        if cached:
            key = (plan.groups, plan.direction)
            matrices = layer_cache(self).get("factors", cores, lambda: tt_plan_matrices(cores, plan), key)
        else:
            matrices = tt_plan_matrices(cores, plan)
        if not self.padded:
            return tt_apply_matrices(x, matrices, shapes, plan, bias)
        out = tt_apply_matrices(x, matrices, shapes, plan, None)[..., : self.out_features]
        if bias is None:
            return out.contiguous()
        (bias,) = autocast_inputs(x.device.type, bias)  # as tt_apply_matrices adds it: the product's dtype
        return out + bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"in_modes={self.in_modes}, out_modes={self.out_modes}, ranks={self.ranks}"
            + (f", padding={math.prod(self.out_modes) - self.out_features}" if self.padded else "")
        )
