"""Tensor-train (TT) maths: TT-SVD, TT-matrices, their reconstruction and their product with a batch of vectors.

Conventions (as in Oseledets 2011 and Novikov et al. 2015, "Tensorizing Neural Networks"):

* A TT-tensor of shape ``(n_1, ..., n_d)`` is a list of cores ``G_k`` of shape ``(r_{k-1}, n_k, r_k)`` with
  ``r_0 = r_d = 1``; ``T[i_1, ..., i_d] = G_1[:, i_1, :] @ ... @ G_d[:, i_d, :]``.
* A TT-matrix representing a weight ``W`` of shape ``(out_features, in_features)`` with
  ``out_features = prod(out_modes)`` and ``in_features = prod(in_modes)`` is a list of cores of shape
  ``(r_{k-1}, out_modes[k], in_modes[k], r_k)``;
  ``W[(o_1..o_d), (i_1..i_d)] = G_1[:, o_1, i_1, :] @ ... @ G_d[:, o_d, i_d, :]`` where the row and column
  multi-indices are flattened in row-major (C) order. This is t3f's convention with rows = outputs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._validate import check_ranks
from .costs import CPU_COSTS, CostModel
from .matmul import autocast_inputs, linear, oriented_matmul

__all__ = [
    "MAX_PADDING",
    "TTPlan",
    "factorize",
    "max_padding_rows",
    "max_tt_ranks",
    "pad_rows",
    "resolve_tt_ranks",
    "tt_apply_matrices",
    "tt_groupings",
    "tt_matrix_apply",
    "tt_matrix_from_dense",
    "tt_matrix_macs",
    "tt_matrix_merge",
    "tt_matrix_params",
    "tt_matrix_plan",
    "tt_matrix_rebuild",
    "tt_matrix_rows",
    "tt_matrix_to_dense",
    "tt_plan_candidates",
    "tt_plan_chunk",
    "tt_plan_macs",
    "tt_plan_matrices",
    "tt_plan_seconds",
    "tt_plan_shapes",
    "tt_plan_steps",
    "tt_svd",
    "tt_to_dense",
    "tt_vocab_modes",
]


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


def factorize(n: int, d: int) -> list[int]:
    """Split ``n`` into ``d`` integer factors that are as equal as possible.

    Prime factors are assigned, largest first, to the currently smallest factor. The result is sorted in
    decreasing order; factors of 1 appear when ``n`` has fewer than ``d`` prime factors.

    Args:
        n: the number to factorise, ``n >= 1``.
        d: how many factors, ``d >= 1``.

    Returns:
        ``d`` integers whose product is ``n``.

    Raises:
        ValueError: if ``n < 1`` or ``d < 1``.
    """
    if n < 1 or d < 1:
        raise ValueError(f"factorize needs n >= 1 and d >= 1, got n={n}, d={d}")
    buckets = [1] * d
    for p in sorted(_prime_factors(n), reverse=True):
        buckets[buckets.index(min(buckets))] *= p
    return sorted(buckets, reverse=True)


def max_tt_ranks(shape: Sequence[int]) -> list[int]:
    """The largest meaningful TT-ranks of a tensor of ``shape``: ``r_k = min(prod(shape[:k]), prod(shape[k:]))``.

    Returns:
        ``len(shape) + 1`` ranks, the first and the last equal to 1.
    """
    d = len(shape)
    return [min(math.prod(shape[:k]), math.prod(shape[k:])) for k in range(d + 1)]


def resolve_tt_ranks(ranks: int | Sequence[int], shape: Sequence[int], *, name: str = "ranks") -> list[int]:
    """Turn an ``int`` or a full rank list into a validated list of ``d + 1`` TT-ranks for a tensor of ``shape``.

    An ``int`` ``r`` means ``[1, r, ..., r, 1]`` with every inner rank capped at the maximal TT-rank of that bond
    (the cap is what the integer form means: "at most ``r``"). An explicit list is taken as given and must have
    ``d + 1`` entries, ends equal to 1 and every inner rank within ``[1, max_tt_ranks(shape)[k]]``.

    Raises:
        ValueError: for ranks that are not integers or below 1, a list of the wrong length or ends, or a listed rank
            above the maximal one.
    """
    d = len(shape)
    limits = max_tt_ranks(shape)
    ranks = check_ranks(ranks, name)
    if isinstance(ranks, int):
        if ranks < 1:
            raise ValueError(f"{name} must be >= 1, got {ranks}")
        return [1] + [min(ranks, limits[k]) for k in range(1, d)] + [1]
    ranks = [int(r) for r in ranks]
    if len(ranks) != d + 1:
        raise ValueError(f"{name} must have {d + 1} entries (d + 1 for {d} cores), got {len(ranks)}: {ranks}")
    if ranks[0] != 1 or ranks[-1] != 1:
        raise ValueError(f"{name} must start and end with 1, got {ranks}")
    for k in range(1, d):
        if not 1 <= ranks[k] <= limits[k]:
            raise ValueError(
                f"{name}[{k}]={ranks[k]} is outside [1, {limits[k]}], the maximal TT-rank of that bond for "
                f"mode sizes {list(shape)}; maximal ranks are {limits}"
            )
    return ranks


def _check_eps(eps: float | None) -> None:
    if eps is not None and not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1) (a relative Frobenius error), got {eps}")


def tt_svd(
    tensor: torch.Tensor, ranks: int | Sequence[int] | None = None, eps: float | None = None
) -> list[torch.Tensor]:
    """TT-SVD (Oseledets 2011, Alg. 1): decompose a dense tensor into TT-cores.

    With ``eps`` alone the result satisfies ``||tensor - tt_to_dense(cores)||_F <= eps * ||tensor||_F`` with the
    smallest ranks the sequential SVDs allow (each of the ``d - 1`` truncations may drop
    ``eps / sqrt(d - 1)`` of the norm). ``ranks`` caps the ranks; with a cap the bound is not guaranteed. Where a
    requested rank exceeds what the previous truncations leave, the core is padded with zeros so that the cores
    have exactly the requested shapes (the represented tensor is unchanged).

    Args:
        tensor: the dense tensor of shape ``(n_1, ..., n_d)``.
        ranks: an ``int`` cap, a full list of ``d + 1`` ranks, or ``None`` (no cap).
        eps: relative Frobenius error bound in ``(0, 1)``, or ``None`` (exact up to the rank caps).

    Returns:
        ``d`` cores of shapes ``(r_{k-1}, n_k, r_k)``.

    Raises:
        ValueError: for invalid ``ranks`` or ``eps``.
    """
    _check_eps(eps)
    shape = list(tensor.shape)
    d = len(shape)
    caps = max_tt_ranks(shape) if ranks is None else resolve_tt_ranks(ranks, shape)
    exact = ranks is not None and not isinstance(ranks, int)  # a full list: pad to exactly these ranks
    norm = torch.linalg.vector_norm(tensor)
    delta = (eps / math.sqrt(d - 1)) * norm if (eps is not None and d > 1) else None
    cores: list[torch.Tensor] = []
    rest = tensor.reshape(1, -1)
    r_prev = 1
    for k in range(d - 1):
        rest = rest.reshape(r_prev * shape[k], -1)  # (r_{k-1} n_k, n_{k+1} ... n_d)
        u, s, vh = torch.linalg.svd(rest, full_matrices=False)
        r = min(caps[k + 1], s.numel())
        if delta is not None:
            # tail[j] = ||s[j:]||: keep the smallest r whose discarded tail fits in delta.
            tail = torch.flip(torch.cumsum(torch.flip(s * s, [0]), 0), [0]).sqrt()
            fits = (tail <= delta).nonzero()
            r = min(r, max(1, int(fits[0]) if fits.numel() else s.numel()))
        core = u[:, :r].reshape(r_prev, shape[k], r)
        rest = s[:r, None] * vh[:r]
        if exact and r < caps[k + 1]:
            pad = caps[k + 1] - r
            core = torch.cat([core, core.new_zeros(r_prev, shape[k], pad)], dim=2)
            rest = torch.cat([rest, rest.new_zeros(pad, rest.shape[1])], dim=0)
            r = caps[k + 1]
        cores.append(core)
        r_prev = r
    cores.append(rest.reshape(r_prev, shape[-1], 1))
    return cores


def tt_to_dense(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rebuild the dense tensor of shape ``(n_1, ..., n_d)`` from TT-cores of shapes ``(r_{k-1}, n_k, r_k)``."""
    shape = [c.shape[1] for c in cores]
    full = cores[0].reshape(-1, cores[0].shape[-1])  # (n_1, r_1)
    for core in cores[1:]:
        full = full @ core.reshape(core.shape[0], -1)  # (n_1..n_k, n_{k+1} r_{k+1})
        full = full.reshape(-1, core.shape[-1])
    return full.reshape(shape)


def _check_modes(weight_shape: Sequence[int], out_modes: Sequence[int], in_modes: Sequence[int]) -> None:
    if len(out_modes) != len(in_modes):
        raise ValueError(f"out_modes and in_modes need the same length, got {list(out_modes)} and {list(in_modes)}")
    if math.prod(out_modes) != weight_shape[0]:
        raise ValueError(f"prod(out_modes)={math.prod(out_modes)} must equal out_features={weight_shape[0]}")
    if math.prod(in_modes) != weight_shape[1]:
        raise ValueError(f"prod(in_modes)={math.prod(in_modes)} must equal in_features={weight_shape[1]}")


def tt_matrix_from_dense(
    weight: torch.Tensor,
    out_modes: Sequence[int],
    in_modes: Sequence[int],
    ranks: int | Sequence[int] | None = None,
    eps: float | None = None,
) -> list[torch.Tensor]:
    """TT-matrix decomposition of a weight of shape ``(out_features, in_features)`` (t3f's ``to_tt_matrix``).

    The weight is reshaped to ``(o_1..o_d, i_1..i_d)``, permuted to ``(o_1, i_1, ..., o_d, i_d)`` and merged
    into a ``d``-way tensor of mode sizes ``o_k i_k``, which TT-SVD decomposes. With ``eps`` alone,
    ``||W - tt_matrix_to_dense(cores)||_F <= eps ||W||_F``.

    Args:
        weight: ``(out_features, in_features)``.
        out_modes: ``d`` factors of ``out_features``.
        in_modes: ``d`` factors of ``in_features``.
        ranks: ``int`` cap, full list of ``d + 1`` ranks, or ``None``.
        eps: relative Frobenius error bound in ``(0, 1)`` or ``None``.

    Returns:
        ``d`` cores of shapes ``(r_{k-1}, out_modes[k], in_modes[k], r_k)``.

    Raises:
        ValueError: if the modes do not multiply to the features, or for invalid ranks / eps.
    """
    _check_modes(weight.shape, out_modes, in_modes)
    d = len(out_modes)
    tensor = weight.reshape(*out_modes, *in_modes)  # (o_1..o_d, i_1..i_d)
    order = [a for k in range(d) for a in (k, d + k)]
    tensor = tensor.permute(order).reshape([o * i for o, i in zip(out_modes, in_modes, strict=True)])
    cores = tt_svd(tensor, ranks=ranks, eps=eps)
    return [c.reshape(c.shape[0], o, i, c.shape[-1]) for c, o, i in zip(cores, out_modes, in_modes, strict=True)]


def tt_matrix_to_dense(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rebuild ``W`` of shape ``(prod out_modes, prod in_modes)`` from TT-matrix cores ``(r, o_k, i_k, r')``."""
    full = cores[0].reshape(cores[0].shape[1], cores[0].shape[2], cores[0].shape[3])  # (O, I, r)
    for core in cores[1:]:
        big_o, big_i, _ = full.shape
        full = torch.einsum("abr,rcds->acbds", full, core)  # (O, o_k, I, i_k, r_k)
        full = full.reshape(big_o * core.shape[1], big_i * core.shape[2], core.shape[3])
    return full[..., 0]


@dataclass(frozen=True)
class TTPlan:
    """How :func:`tt_matrix_apply` contracts a batch of vectors with TT-matrix cores.

    Runs of consecutive cores are first merged into one core each (``groups`` gives the run lengths), then the
    merged cores are swept over the input in one direction, each step one matmul with no transposes in between:

    * ``"ltr"``: the running tensor is ``(N, O_done, r_{k-1}, I_k, I_rest)``; step ``k`` is a batched matmul of
      the ``(O_k r_k, r_{k-1} I_k)`` matrix of merged core ``k`` with ``N * O_done`` matrices
      ``(r_{k-1} I_k, I_rest)``; the last step is one GEMM.
    * ``"rtl"``: the mirror image, ``(N, I_left, I_k, r_k, O_done)``, consuming input modes from the last core.

    ``groups=(d,)`` merges every core, i.e. rebuilds ``W`` and runs one GEMM; ``groups=(1,) * d`` contracts core
    by core (fewest multiply-adds, most and smallest steps). ``chunk`` splits the tokens into blocks of that many
    rows so that the intermediates stay in cache; the result does not depend on it.

    Args:
        groups: run lengths of merged cores; positive, summing to the number of cores.
        direction: ``"ltr"`` or ``"rtl"``.
        chunk: tokens per block, or ``None`` for all at once.

    Raises:
        ValueError: for an unknown direction, a non-positive group or chunk.
    """

    groups: tuple[int, ...]
    direction: str = "ltr"
    chunk: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(int(g) for g in self.groups))
        if self.direction not in ("ltr", "rtl"):
            raise ValueError(f"direction must be 'ltr' or 'rtl', got {self.direction!r}")
        if not self.groups or any(g < 1 for g in self.groups):
            raise ValueError(f"groups must be positive run lengths of cores, got {self.groups}")
        if self.chunk is not None and self.chunk < 1:
            raise ValueError(f"chunk must be >= 1 or None, got {self.chunk}")


def _check_plan(plan: TTPlan, d: int) -> None:
    if sum(plan.groups) != d:
        raise ValueError(f"plan groups {plan.groups} must sum to the number of cores, {d}")


def tt_plan_shapes(
    out_modes: Sequence[int], in_modes: Sequence[int], ranks: Sequence[int], groups: Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """Shapes ``(r, O, I, s)`` of the merged cores of ``groups`` (see :class:`TTPlan`)."""
    shapes, k = [], 0
    for g in groups:
        shapes.append((ranks[k], math.prod(out_modes[k : k + g]), math.prod(in_modes[k : k + g]), ranks[k + g]))
        k += g
    return shapes


def _features(shapes: tuple[tuple[int, int, int, int], ...]) -> tuple[int, int]:
    """``(in_features, out_features)`` of merged core shapes."""
    return math.prod([c[2] for c in shapes]), math.prod([c[1] for c in shapes])


def _steps(shapes: Sequence[tuple[int, int, int, int]], direction: str, tokens: int) -> list[tuple[int, int, int, int]]:
    steps = []
    if direction == "ltr":
        done, rest = 1, math.prod([s[2] for s in shapes])
        for r, o, i, s in shapes:
            rest //= i
            steps.append((tokens * done, o * s, r * i, rest))
            done *= o
    else:
        done, rest = 1, math.prod([s[2] for s in shapes])
        for r, o, i, s in reversed(shapes):
            rest //= i
            steps.append((tokens * rest, r * o, i * s, done))
            done *= o
    return steps


def tt_plan_steps(
    out_modes: Sequence[int], in_modes: Sequence[int], ranks: Sequence[int], plan: TTPlan, tokens: int
) -> list[tuple[int, int, int, int]]:
    """The matmuls of ``plan`` for ``tokens`` vectors (ignoring ``plan.chunk``), each ``(batch, m, k, n)``:
    ``batch`` matrices ``(m, k) @ (k, n)``, or for ``n == 1`` one GEMM ``(batch, k) @ (k, m)``.

    Merging the cores of a group costs ``O(params)`` and is not counted.
    """
    _check_plan(plan, len(out_modes))
    return _steps(tt_plan_shapes(out_modes, in_modes, ranks, plan.groups), plan.direction, tokens)


def tt_plan_macs(out_modes: Sequence[int], in_modes: Sequence[int], ranks: Sequence[int], plan: TTPlan) -> int:
    """Multiply-adds per input vector of ``plan``."""
    return sum(b * m * k * n for b, m, k, n in tt_plan_steps(out_modes, in_modes, ranks, plan, 1))


def tt_matrix_merge(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Merge consecutive TT-matrix cores ``(r_{k-1}, o_k, i_k, r_k)`` into one core ``(r_a, prod o, prod i, r_b)``.

    The merged core represents the same operator: ``tt_matrix_to_dense`` of a list with the run replaced by its
    merge is unchanged.
    """
    merged = cores[0]
    for core in cores[1:]:
        r, big_o, big_i, _ = merged.shape
        _, o, i, s = core.shape
        merged = torch.einsum("aOIr,rois->aOoIis", merged, core).reshape(r, big_o * o, big_i * i, s)
    return merged


def tt_matrix_rebuild(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """``W`` of shape ``(prod out_modes, prod in_modes)``, as :func:`tt_matrix_to_dense`, built the fast way.

    The cores are merged into two halves ``A`` ``(1, O_1, I_1, r)`` and ``B`` ``(r, O_2, I_2, 1)``; ``W`` is one
    GEMM ``(O_1 I_1, r) @ (r, O_2 I_2)`` and one transpose to ``(O_1 O_2, I_1 I_2)``. Under autograd this costs
    about half of the core-by-core rebuild (fewer weight-sized intermediates to write and differentiate).
    """
    if len(cores) == 1:
        return cores[0].reshape(cores[0].shape[1], cores[0].shape[2])
    half = len(cores) // 2
    a, b = tt_matrix_merge(cores[:half]), tt_matrix_merge(cores[half:])
    _, o1, i1, r = a.shape
    _, o2, i2, _ = b.shape
    left, right = a.reshape(o1 * i1, r), b.reshape(r, o2 * i2)
    if not (torch.is_grad_enabled() and (left.requires_grad or right.requires_grad)):
        return _interleave(left @ right, o1, i1, o2, i2)
    left, right = autocast_inputs(left.device.type, left, right)
    return _HalvesProduct.apply(left, right, (o1, i1, o2, i2))


def _interleave(product: torch.Tensor, o1: int, i1: int, o2: int, i2: int) -> torch.Tensor:
    """``(o1 i1, o2 i2)`` -> ``(o1 o2, i1 i2)``: one weight-sized copy."""
    return product.reshape(o1, i1, o2, i2).permute(0, 2, 1, 3).reshape(o1 * o2, i1 * i2)


class _HalvesProduct(torch.autograd.Function):
    """``W = interleave(A @ B)`` of :func:`tt_matrix_rebuild`, with a backward that makes one weight-sized copy
    (the gradient, de-interleaved) and two thin GEMMs, oriented by shape. Autograd's own backward of the same ops
    makes three, and weight-sized copies are most of a rebuild's cost at the ranks where a rebuild pays."""

    generate_vmap_rule = True  # (forward and setup_context apart: torch.func's grad and vmap can run it)

    @staticmethod
    def forward(left: torch.Tensor, right: torch.Tensor, dims: tuple[int, int, int, int]) -> torch.Tensor:
        return _interleave(left @ right, *dims)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        left, right, ctx.dims = inputs
        ctx.save_for_backward(left, right)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        left, right = ctx.saved_tensors
        o1, i1, o2, i2 = ctx.dims
        grad = grad.to(left.dtype)
        product_grad = grad.reshape(o1, o2, i1, i2).permute(0, 2, 1, 3).reshape(o1 * i1, o2 * i2)
        grad_left = oriented_matmul(product_grad, right.T) if ctx.needs_input_grad[0] else None
        grad_right = left.T @ product_grad if ctx.needs_input_grad[1] else None
        return grad_left, grad_right, None


def tt_plan_matrices(cores: Sequence[torch.Tensor], plan: TTPlan) -> list[torch.Tensor]:
    """The 2-D matrices :func:`tt_apply_matrices` multiplies with, one per group of ``plan``, in sweep order.

    ``"ltr"``: merged core ``(r, O, I, s)`` as ``(O s, r I)``; ``"rtl"``: as ``(r O, I s)``, last group first.
    They are cheap to build (``O(params)`` work) and differentiable; a layer may cache them in eval mode.
    """
    _check_plan(plan, len(cores))
    merged, k = [], 0
    for g in plan.groups:
        merged.append(tt_matrix_merge(cores[k : k + g]) if g > 1 else cores[k])
        k += g
    if plan.direction == "ltr":
        return [c.permute(1, 3, 0, 2).reshape(c.shape[1] * c.shape[3], c.shape[0] * c.shape[2]) for c in merged]
    return [c.reshape(c.shape[0] * c.shape[1], c.shape[2] * c.shape[3]) for c in reversed(merged)]


class _SharedMatrixBmm(torch.autograd.Function):
    """``matrix @ t[b]`` for every ``b``: ``torch.bmm`` with ``matrix`` broadcast over the batch.

    Autograd's own backward of ``bmm(matrix.expand(B, m, k), t)`` materialises a ``(B, m, k)`` gradient and sums
    it, which for many small matrices (large ``B``, ``k > n``) costs far more than the forward; here the gradient
    of ``matrix`` is one GEMM over the whole batch instead.
    """

    generate_vmap_rule = True  # (forward and setup_context apart: torch.func's grad and vmap can run it)

    @staticmethod
    def forward(matrix: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.bmm(matrix.expand(t.shape[0], *matrix.shape), t)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        matrix, t = ctx.saved_tensors
        grad = grad.to(t.dtype)  # under autocast a float32 gradient may come back to this bf16 output
        grad_matrix = grad_t = None
        if ctx.needs_input_grad[0]:
            batch, m, n = grad.shape
            k = t.shape[1]
            # sum_b grad[b] @ t[b]^T as one (m, B n) x (B n, k) GEMM
            grad_matrix = oriented_matmul(
                grad.transpose(0, 1).reshape(m, batch * n), t.transpose(1, 2).reshape(batch * n, k)
            )
        if ctx.needs_input_grad[1]:
            grad_t = torch.bmm(matrix.t().expand(grad.shape[0], matrix.shape[1], matrix.shape[0]), grad)
        return grad_matrix, grad_t


# Below this many elements of the expanded ``(batch, m, k)`` matrix, autograd's own backward of the expanded
# ``bmm`` (a batched product and a sum over the batch) costs less than the Python-level autograd.Function's fixed
# overhead (about 15 us a call on CPU): TT training at 1 token took 25-30 % less time (measured 2026-11-25).
NATIVE_SHARED_BMM_MAX = 16384


def _shared_bmm(matrix: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    matrix, t = autocast_inputs(t.device.type, matrix, t)
    expanded = matrix.expand(t.shape[0], *matrix.shape)
    if (
        torch.is_grad_enabled()
        and (matrix.requires_grad or t.requires_grad)
        and expanded.numel() > NATIVE_SHARED_BMM_MAX
    ):
        return _SharedMatrixBmm.apply(matrix, t)
    return torch.bmm(expanded, t)


def _sweep(
    x: torch.Tensor,
    matrices: Sequence[torch.Tensor],
    shapes: Sequence[tuple[int, int, int, int]],
    direction: str,
    bias: torch.Tensor | None,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """``x`` ``(n, in)`` -> ``(n, out)``; writes into ``out`` (no autograd) when given."""
    n = x.shape[0]
    out_features = _features(shapes)[1]
    t = x
    steps = _steps(shapes, direction, n)
    last = len(steps) - 1
    for index, (matrix, (batch, m, k, cols)) in enumerate(zip(matrices, steps, strict=True)):
        final = index == last
        if cols == 1:  # one GEMM (batch, k) @ (k, m)
            a = t.reshape(batch, k)
            if final and bias is not None and m == out_features:
                if out is not None:
                    return torch.addmm(bias, a, matrix.t(), out=out)
                return linear(a, matrix, bias)
            if final and out is not None:
                torch.mm(a, matrix.t(), out=out.view(batch, m))
                if bias is not None:
                    out.add_(bias)
                return out
            t = linear(a, matrix)  # (batch, m)
        else:
            b = t.reshape(batch, k, cols)
            expanded = matrix.expand(batch, m, k)
            if final and bias is not None:  # rtl: the output is (n, o_1, O_rest) and the bias broadcasts over n
                lhs = bias.view(1, m, cols)
                if out is not None:
                    return torch.baddbmm(lhs, expanded, b, out=out.view(batch, m, cols)).view(n, out_features)
                if torch.is_grad_enabled() and (matrix.requires_grad or b.requires_grad or bias.requires_grad):
                    t = _shared_bmm(matrix, b) + lhs
                else:
                    t = torch.baddbmm(lhs, expanded, b)
                return t.reshape(n, out_features)
            if final and out is not None:
                torch.bmm(expanded, b, out=out.view(batch, m, cols))
                return out
            t = _shared_bmm(matrix, b) if out is None else torch.bmm(expanded, b)  # (batch, m, cols)
    y = t.reshape(n, out_features)
    return y + bias if bias is not None else y


def tt_apply_matrices(
    x: torch.Tensor,
    matrices: Sequence[torch.Tensor],
    shapes: Sequence[tuple[int, int, int, int]],
    plan: TTPlan,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` from the matrices of :func:`tt_plan_matrices` (the sweep of :class:`TTPlan`).

    Args:
        x: ``(..., in_features)``, any strides.
        matrices: ``tt_plan_matrices(cores, plan)``.
        shapes: ``tt_plan_shapes(out_modes, in_modes, ranks, plan.groups)``.
        plan: the plan the matrices were built for.
        bias: ``(out_features,)`` or ``None``.

    Returns:
        ``(..., out_features)``, contiguous.
    """
    shapes = tuple(shapes)
    in_features, out_features = _features(shapes)
    lead = x.shape[:-1]
    n = math.prod(lead)
    flat = x.reshape(n, in_features)
    (bias,) = autocast_inputs(flat.device.type, bias)  # under autocast, added in the products' dtype (as F.linear)
    chunk = plan.chunk
    if chunk is None or chunk >= n:
        y = _sweep(flat, matrices, shapes, plan.direction, bias, None)
    elif torch.is_autocast_enabled(flat.device.type) or (
        torch.is_grad_enabled()
        and (flat.requires_grad or any(m.requires_grad for m in matrices) or (bias is not None and bias.requires_grad))
    ):
        # one split (its backward is one cat), not n / chunk slices (each slice's backward fills a full-size zero
        # gradient: quadratic in the number of chunks); under autocast the ops choose the output dtype, so no out=
        parts = [_sweep(part, matrices, shapes, plan.direction, bias, None) for part in flat.split(chunk)]
        y = torch.cat(parts)
    else:
        y = flat.new_empty(n, out_features)
        for s in range(0, n, chunk):
            _sweep(flat[s : s + chunk], matrices, shapes, plan.direction, bias, y[s : s + chunk])
    return y.reshape(*lead, out_features)


def tt_matrix_apply(
    x: torch.Tensor,
    cores: Sequence[torch.Tensor],
    *,
    bias: torch.Tensor | None = None,
    plan: TTPlan | None = None,
) -> torch.Tensor:
    """Compute ``x @ W.T (+ bias)`` for a TT-matrix ``W`` (without building ``W`` unless ``plan`` says so).

    With the default plan the cores are contracted one by one, left to right: at step ``k`` the running tensor
    has shape ``(N, o_1..o_{k-1}, r_{k-1}, i_k, i_{k+1}..i_d)`` and the core consumes ``(r_{k-1}, i_k)`` and
    produces ``(o_k, r_k)``. Any :class:`TTPlan` gives the same result up to rounding; see :func:`tt_matrix_plan`
    for choosing one by cost.

    Args:
        x: ``(..., in_features)``.
        cores: TT-matrix cores of shapes ``(r_{k-1}, o_k, i_k, r_k)``.
        bias: ``(out_features,)`` added to the result, or ``None``.
        plan: how to contract; ``TTPlan((1,) * d, "ltr")`` when omitted.

    Returns:
        ``(..., out_features)``.

    Raises:
        ValueError: if ``plan`` does not fit the number of cores.
    """
    plan = plan if plan is not None else TTPlan((1,) * len(cores), "ltr")
    shapes = tt_plan_shapes(
        [c.shape[1] for c in cores], [c.shape[2] for c in cores], [1] + [c.shape[3] for c in cores], plan.groups
    )
    return tt_apply_matrices(x, tt_plan_matrices(cores, plan), shapes, plan, bias)


def tt_groupings(d: int) -> list[tuple[int, ...]]:
    """Every way to split ``d`` cores into runs of consecutive cores (``2^(d-1)`` of them), as run lengths."""
    out = []
    for cuts in range(1 << (d - 1)):
        groups, run = [], 1
        for k in range(d - 1):
            if cuts >> k & 1:
                groups.append(run)
                run = 1
            else:
                run += 1
        out.append((*groups, run))
    return out


def tt_plan_chunk(
    out_modes: Sequence[int],
    in_modes: Sequence[int],
    ranks: Sequence[int],
    plan: TTPlan,
    tokens: int,
    *,
    chunk_bytes: int | None,
    element_size: int = 4,
) -> int | None:
    """Tokens per chunk so that the largest intermediate of ``plan`` fits ``chunk_bytes`` (at least 32 tokens);
    ``None`` when everything fits or ``chunk_bytes`` is ``None``."""
    if chunk_bytes is None:
        return None
    per_token = max(max(b * m * n, b * k * n) for b, m, k, n in tt_plan_steps(out_modes, in_modes, ranks, plan, 1))
    chunk = max(32, chunk_bytes // (per_token * element_size))
    return None if chunk >= tokens else chunk


def tt_plan_seconds(
    out_modes: Sequence[int],
    in_modes: Sequence[int],
    ranks: Sequence[int],
    plan: TTPlan,
    tokens: int,
    *,
    train: bool = False,
    threads: int = 1,
    costs: CostModel = CPU_COSTS,
    element_size: int = 4,
    cached_factors: bool = False,
) -> tuple[float, int | None]:
    """Predicted seconds of the factorised ``plan`` (its groups and direction) for ``tokens`` vectors, with the
    chunk size :func:`tt_plan_chunk` chooses for it: ``(seconds, chunk)``. Arguments as in :func:`tt_matrix_plan`."""
    d = len(out_modes)
    op = (costs.train if train else costs.forward).op_s
    chunk = tt_plan_chunk(
        out_modes, in_modes, ranks, plan, tokens, chunk_bytes=costs.chunk_bytes, element_size=element_size
    )
    rows = min(tokens, chunk) if chunk else tokens
    blocks = -(-tokens // rows) if tokens else 1
    steps = tt_plan_steps(out_modes, in_modes, ranks, plan, max(rows, 1))
    seconds = blocks * (costs.steps_seconds(steps, train=train, threads=threads) + (costs.forward.op_s if chunk else 0))
    if not cached_factors:  # each merge of two cores: an einsum and reshapes (and their backward)
        seconds += 1.5 * (d - len(plan.groups)) * op
    return seconds, chunk


def tt_plan_candidates(d: int) -> list[TTPlan]:
    """The factorised plans :func:`tt_matrix_plan` chooses from for ``d`` cores: every contiguous grouping with at
    least two groups (one group, rebuilding ``W``, is the dense path), in both directions."""
    return [
        TTPlan(groups, direction)
        for groups in tt_groupings(d)
        if len(groups) > 1 or d == 1
        for direction in (("ltr", "rtl") if len(groups) > 1 else ("ltr",))
    ]


@functools.lru_cache(maxsize=4096)
def _best_plan(
    out_modes: tuple[int, ...],
    in_modes: tuple[int, ...],
    ranks: tuple[int, ...],
    tokens: int,
    train: bool,
    threads: int,
    costs: CostModel,
    element_size: int,
    cached_factors: bool,
) -> tuple[TTPlan, float]:
    best: tuple[float, TTPlan] | None = None
    for plan in tt_plan_candidates(len(out_modes)):
        seconds, chunk = tt_plan_seconds(
            out_modes,
            in_modes,
            ranks,
            plan,
            tokens,
            train=train,
            threads=threads,
            costs=costs,
            element_size=element_size,
            cached_factors=cached_factors,
        )
        if best is None or seconds < best[0]:
            best = (seconds, TTPlan(plan.groups, plan.direction, chunk))
    assert best is not None
    return best[1], best[0]


def tt_matrix_plan(
    out_modes: Sequence[int],
    in_modes: Sequence[int],
    ranks: Sequence[int],
    tokens: int,
    *,
    train: bool = False,
    threads: int = 1,
    costs: CostModel = CPU_COSTS,
    element_size: int = 4,
    cached_factors: bool = False,
) -> tuple[TTPlan, float]:
    """The cheapest factorised :class:`TTPlan` (at least two groups) for ``tokens`` vectors, by ``costs``.

    Every contiguous grouping of the cores and both sweep directions are priced (``2^d`` candidates), and the
    chunk size is chosen by :func:`tt_plan_chunk`. Rebuilding ``W`` (one group) is left out: the dense path is
    priced by the caller, who knows whether ``W`` is cached.

    Args:
        out_modes, in_modes, ranks: the TT-matrix structure.
        tokens: number of input vectors.
        train: price a forward+backward pass instead of a forward pass.
        threads: intra-op threads.
        costs: the :class:`~compressed_transformer.functional.costs.CostModel`.
        element_size: bytes per element (for the chunk size).
        cached_factors: the merged cores come from a cache (eval mode); otherwise every merge of two cores is
            priced as one more op.

    Returns:
        ``(plan, predicted seconds)``.
    """
    args = (tuple(out_modes), tuple(in_modes), tuple(ranks), int(tokens), bool(train), int(threads), costs)
    return _best_plan(*args, element_size, bool(cached_factors))


def tt_matrix_rows(cores: Sequence[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """Rows ``W[rows]`` of a TT-matrix, without building ``W``: the lookup of a TT embedding table (Hrinchuk et
    al. 2020, *Tensorized Embedding Layers*).

    Row ``n`` has the multi-index ``(n_1, .., n_d)`` of ``n`` in ``(o_1, .., o_d)`` (row-major, as
    :func:`tt_matrix_to_dense` orders rows); its entries are the products of the cores' slices ``G_k[:, n_k]``,
    contracted core by core: ``sum_k i_1..i_k r_{k-1} r_k`` multiply-adds per row.

    Args:
        cores: TT-matrix cores ``(r_{k-1}, o_k, i_k, r_k)``.
        rows: integer tensor of any shape with entries in ``[0, prod o_k)``.

    Returns:
        ``(*rows.shape, prod i_k)``.
    """
    out_modes = [c.shape[1] for c in cores]
    flat = rows.reshape(-1)
    strides = [math.prod(out_modes[k + 1 :]) for k in range(len(cores))]
    result, width = None, 1  # (N, i_1..i_k, r_k)
    for core, stride, o in zip(cores, strides, out_modes, strict=True):
        index = torch.div(flat, stride, rounding_mode="floor") % o
        piece = core.index_select(1, index).permute(1, 0, 2, 3)  # (N, r_{k-1}, i_k, r_k)
        n, r, i, s = piece.shape
        width *= i
        if result is None:
            result = piece.reshape(n, i, s)
        else:
            result = torch.bmm(result, piece.reshape(n, r, i * s)).reshape(n, width, s)
    return result.reshape(*rows.shape, width)


MAX_PADDING = 0.1
"""How much a TT layer may pad a size that factorises badly: :func:`tt_vocab_modes` looks at most this fraction
above it (:func:`max_padding_rows`)."""


def max_padding_rows(size: int, max_padding: float = MAX_PADDING) -> int:
    """The most rows :func:`tt_vocab_modes` adds to ``size``: ``max_padding`` of it, rounded down, plus one."""
    return int(size * (1 + max_padding)) + 1 - size


def tt_vocab_modes(num_embeddings: int, d: int, *, slack: float = 1.5, max_padding: float = MAX_PADDING) -> list[int]:
    """``d`` balanced modes whose product is the smallest ``n >= num_embeddings`` with no mode above
    ``slack * n ** (1 / d)`` (a vocabulary size that factorises badly, e.g. a prime, is padded with unused rows, as
    Hrinchuk et al. 2020 do); ``factorize(num_embeddings, d)`` when no such ``n`` is within
    :func:`max_padding_rows`.

    Raises:
        ValueError: if ``num_embeddings < 1`` or ``d < 1``.
    """
    if num_embeddings < 1 or d < 1:
        raise ValueError(f"tt_vocab_modes needs num_embeddings >= 1 and d >= 1, got {num_embeddings}, {d}")
    for n in range(num_embeddings, num_embeddings + max_padding_rows(num_embeddings, max_padding) + 1):
        modes = factorize(n, d)
        if modes[0] <= slack * n ** (1.0 / d):
            return modes
    return factorize(num_embeddings, d)


def pad_rows(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    """``matrix`` with zero rows appended up to ``rows`` rows (itself when it has as many): the dense matrix a TT
    layer whose modes pad its outputs represents."""
    if matrix.shape[0] == rows:
        return matrix
    padded = matrix.new_zeros(rows, *matrix.shape[1:])
    padded[: matrix.shape[0]] = matrix
    return padded


def tt_matrix_params(out_modes: Sequence[int], in_modes: Sequence[int], ranks: Sequence[int]) -> int:
    """Number of parameters of TT-matrix cores: ``sum_k r_{k-1} o_k i_k r_k``."""
    return sum(ranks[k] * o * i * ranks[k + 1] for k, (o, i) in enumerate(zip(out_modes, in_modes, strict=True)))


def tt_matrix_macs(out_modes: Sequence[int], in_modes: Sequence[int], ranks: Sequence[int]) -> int:
    """Multiply-adds per input vector of :func:`tt_matrix_apply` (left-to-right order)."""
    total = 0
    d = len(out_modes)
    for k in range(d):
        done_out = math.prod(out_modes[:k])
        rest_in = math.prod(in_modes[k + 1 :])
        total += done_out * rest_in * ranks[k] * in_modes[k] * out_modes[k] * ranks[k + 1]
    return total
