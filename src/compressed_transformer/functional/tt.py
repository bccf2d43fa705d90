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

import math
from collections.abc import Sequence

import torch

__all__ = [
    "factorize",
    "max_tt_ranks",
    "resolve_tt_ranks",
    "tt_matrix_apply",
    "tt_matrix_from_dense",
    "tt_matrix_macs",
    "tt_matrix_params",
    "tt_matrix_to_dense",
    "tt_svd",
    "tt_to_dense",
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
        ValueError: for ranks below 1, a list of the wrong length or ends, or a listed rank above the maximal one.
    """
    d = len(shape)
    limits = max_tt_ranks(shape)
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


def tt_matrix_apply(x: torch.Tensor, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Compute ``x @ W.T`` for a TT-matrix ``W`` without building ``W``.

    Cores are contracted left to right; at step ``k`` the running tensor has shape
    ``(N, o_1..o_{k-1}, r_{k-1}, i_k, i_{k+1}..i_d)`` and the core consumes ``(r_{k-1}, i_k)`` and produces
    ``(o_k, r_k)``.

    Args:
        x: ``(..., in_features)``.
        cores: TT-matrix cores of shapes ``(r_{k-1}, o_k, i_k, r_k)``.

    Returns:
        ``(..., out_features)``.
    """
    lead = x.shape[:-1]
    n = math.prod(lead)
    rest = x.shape[-1]  # explicit sizes, not -1: an empty batch (N = 0) leaves -1 ambiguous
    t = x.reshape(n, 1, 1, rest)  # (N, O_done=1, r_0=1, I_rest)
    for core in cores:
        r, o, i, s = core.shape
        big_o, rest = t.shape[1], rest // i
        t = t.reshape(n, big_o, r, i, rest)  # (N, O, r, i_k, I_rest)
        t = torch.einsum("bxrjz,rojs->bxosz", t, core)  # (N, O, o_k, r_k, I_rest)
        t = t.reshape(n, big_o * o, s, rest)
    return t.reshape(*lead, t.shape[1])


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
