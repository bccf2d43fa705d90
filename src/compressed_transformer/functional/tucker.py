"""Tucker decomposition maths: HOSVD, HOOI, reconstruction and the factorised product with a batch of vectors.

A Tucker tensor of shape ``(n_1, ..., n_D)`` is a core ``G`` of shape ``(r_1, ..., r_D)`` and factors ``U_k`` of
shape ``(n_k, r_k)``: ``T = G x_1 U_1 x_2 ... x_D U_D`` (Kolda & Bader 2009, mode products).

For a linear layer the weight ``W`` of shape ``(out_features, in_features)`` is seen as the tensor of shape
``(*out_modes, *in_modes)``; the first ``len(out_modes)`` factors act on outputs, the rest on inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._validate import check_ranks

__all__ = [
    "hooi",
    "hosvd",
    "kron_matmul",
    "mode_product",
    "resolve_tucker_ranks",
    "tucker_linear_apply",
    "tucker_linear_factors",
    "tucker_linear_macs",
    "tucker_linear_rank",
    "tucker_params",
    "tucker_to_dense",
]


def resolve_tucker_ranks(ranks: int | Sequence[int], shape: Sequence[int], *, name: str = "ranks") -> list[int]:
    """Validate Tucker ranks for a tensor of ``shape``; an ``int`` is used for every mode (capped by the mode size).

    Raises:
        ValueError: for a rank that is not an integer, below 1 or above its mode size, or a list of the wrong length.
    """
    ranks = check_ranks(ranks, name)
    if isinstance(ranks, int):
        if ranks < 1:
            raise ValueError(f"{name} must be >= 1, got {ranks}")
        return [min(ranks, n) for n in shape]
    ranks = [int(r) for r in ranks]
    if len(ranks) != len(shape):
        raise ValueError(f"{name} needs one rank per mode ({len(shape)} for modes {list(shape)}), got {ranks}")
    for k, (r, n) in enumerate(zip(ranks, shape, strict=True)):
        if not 1 <= r <= n:
            raise ValueError(f"{name}[{k}]={r} is outside [1, {n}], the size of mode {k} of {list(shape)}")
    return ranks


def mode_product(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """``tensor x_mode matrix``: contract axis ``mode`` (size ``n``) of ``tensor`` with ``matrix`` of shape ``(m, n)``.

    Returns:
        the tensor with axis ``mode`` now of size ``m``.
    """
    moved = tensor.movedim(mode, -1)  # (..., n)
    return (moved @ matrix.T).movedim(-1, mode)


def _leading_left_vectors(unfolding: torch.Tensor, rank: int) -> torch.Tensor:
    u, _, _ = torch.linalg.svd(unfolding, full_matrices=False)
    u = u[:, :rank]
    if u.shape[1] < rank:  # the unfolding has fewer columns than the rank: complete with orthonormal columns
        q, _ = torch.linalg.qr(torch.cat([u, torch.eye(u.shape[0], dtype=u.dtype, device=u.device)], dim=1))
        u = q[:, :rank]
    return u


def hosvd(tensor: torch.Tensor, ranks: int | Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Truncated higher-order SVD (De Lathauwer et al. 2000).

    Args:
        tensor: ``(n_1, ..., n_D)``.
        ranks: an ``int`` for every mode or one rank per mode.

    Returns:
        ``(core, factors)`` with ``core`` of shape ``(r_1, ..., r_D)`` and orthonormal ``factors[k]`` of shape
        ``(n_k, r_k)``.
    """
    ranks = resolve_tucker_ranks(ranks, tensor.shape)
    factors = [_leading_left_vectors(tensor.movedim(k, 0).reshape(tensor.shape[k], -1), r) for k, r in enumerate(ranks)]
    core = tensor
    for k, u in enumerate(factors):
        core = mode_product(core, u.T, k)
    return core, factors


def hooi(
    tensor: torch.Tensor, ranks: int | Sequence[int], n_iter: int = 10, tol: float = 1e-7
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Higher-order orthogonal iteration (De Lathauwer et al. 2000), started from :func:`hosvd`.

    Each sweep refits every factor to the leading left singular vectors of the tensor projected on all other
    factors; it never increases the reconstruction error. Stops after ``n_iter`` sweeps or when the core norm
    changes by less than ``tol`` (relative).

    Returns:
        ``(core, factors)`` as :func:`hosvd`.
    """
    ranks = resolve_tucker_ranks(ranks, tensor.shape)
    core, factors = hosvd(tensor, ranks)
    previous = torch.linalg.vector_norm(core)
    for _ in range(n_iter):
        for k in range(tensor.ndim):
            projected = tensor
            for j, u in enumerate(factors):
                if j != k:
                    projected = mode_product(projected, u.T, j)
            factors[k] = _leading_left_vectors(projected.movedim(k, 0).reshape(tensor.shape[k], -1), ranks[k])
        core = tensor
        for k, u in enumerate(factors):
            core = mode_product(core, u.T, k)
        norm = torch.linalg.vector_norm(core)
        if abs(norm - previous) <= tol * max(float(previous), 1e-30):
            break
        previous = norm
    return core, factors


def tucker_to_dense(core: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rebuild the dense tensor ``core x_1 U_1 ... x_D U_D`` of shape ``(n_1, ..., n_D)``."""
    full = core
    for k, u in enumerate(factors):
        full = mode_product(full, u, k)
    return full


def tucker_linear_apply(
    x: torch.Tensor, core: torch.Tensor, out_factors: Sequence[torch.Tensor], in_factors: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Compute ``x @ W.T`` for ``W = tucker_to_dense(core, out_factors + in_factors)`` reshaped to a matrix.

    The input is projected on the input factors (``(N, i_1..i_e) -> (N, s_1..s_e)``), multiplied by the core
    viewed as a ``(prod r, prod s)`` matrix, and expanded by the output factors.

    Args:
        x: ``(..., in_features)``.
        core: ``(r_1..r_d, s_1..s_e)``.
        out_factors: ``d`` factors ``(o_k, r_k)``.
        in_factors: ``e`` factors ``(i_k, s_k)``.

    Returns:
        ``(..., out_features)``.
    """
    lead = x.shape[:-1]
    n = math.prod(lead)
    t = x.reshape(n, *[u.shape[0] for u in in_factors])  # (N, i_1..i_e)
    for k, u in enumerate(in_factors):
        t = mode_product(t, u.T, k + 1)  # i_k -> s_k
    d = len(out_factors)
    r_out, r_in = math.prod(core.shape[:d]), math.prod(core.shape[d:])  # explicit sizes: N may be 0
    t = t.reshape(n, r_in) @ core.reshape(r_out, r_in).T  # (N, prod r)
    t = t.reshape(n, *core.shape[:d])
    for k, u in enumerate(out_factors):
        t = mode_product(t, u, k + 1)  # r_k -> o_k
    return t.reshape(*lead, math.prod([u.shape[0] for u in out_factors]))


def kron_matmul(factors: Sequence[torch.Tensor], matrix: torch.Tensor) -> torch.Tensor:
    """``(F_1 ⊗ ... ⊗ F_d) @ matrix`` without forming the Kronecker product.

    One broadcasting matmul per factor: the rows of ``matrix``, indexed by ``(r_1, ..., r_d)``, are expanded mode by
    mode into ``(n_1, ..., n_d)``. Costs ``sum_k (n_1..n_k) r_k (r_{k+1}..r_d) R`` multiply-adds, and its backward
    is matmuls too (``torch.kron``'s is broadcast products and reductions, several times slower on small factors).

    Args:
        factors: ``d`` matrices ``(n_k, r_k)``.
        matrix: ``(r_1 ... r_d, R)``.

    Returns:
        ``(n_1 ... n_d, R)``.

    Raises:
        ValueError: if ``factors`` is empty or ``matrix`` has not ``prod r_k`` rows.
    """
    if not factors:
        raise ValueError("kron_matmul needs at least one factor")
    ranks = [int(f.shape[1]) for f in factors]
    if matrix.dim() != 2 or matrix.shape[0] != math.prod(ranks):
        raise ValueError(f"matrix must be ({math.prod(ranks)}, R) for factors of ranks {ranks}")
    columns, lead, out = matrix.shape[1], [], matrix
    for factor in factors:
        rows, rank = factor.shape
        out = factor @ out.reshape(*lead, rank, -1)  # (n_1..n_{k-1}, r_k, rest) -> (n_1..n_{k-1}, n_k, rest)
        lead.append(rows)
    return out.reshape(-1, columns)


def tucker_linear_factors(
    core: torch.Tensor, out_factors: Sequence[torch.Tensor], in_factors: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``W = left @ right`` for the Tucker weight of :func:`tucker_linear_apply`, as a rank-``R`` product.

    With ``U = U_1 ⊗ ... ⊗ U_d`` (``(out, prod r)``), ``V = V_1 ⊗ ... ⊗ V_e`` (``(in, prod s)``) and the core
    as a ``(prod r, prod s)`` matrix ``G``, ``W = U G V^T``. The core is folded into the smaller side, so
    ``R = min(prod r, prod s)`` and ``x @ W.T = (x @ right.T) @ left.T`` costs ``R (in + out)`` multiply-adds per
    vector: two GEMMs, no transposes. The Kronecker products are applied by :func:`kron_matmul`, in
    ``O(R (in + out))``.

    Returns:
        ``(left, right)`` of shapes ``(out_features, R)`` and ``(R, in_features)``.
    """
    d = len(out_factors)
    r_out = math.prod(core.shape[:d])
    g = core.reshape(r_out, -1)  # (prod r, prod s)
    if g.shape[1] <= g.shape[0]:
        eye = torch.eye(g.shape[1], dtype=g.dtype, device=g.device)
        return kron_matmul(out_factors, g), kron_matmul(in_factors, eye).T
    eye = torch.eye(r_out, dtype=g.dtype, device=g.device)
    return kron_matmul(out_factors, eye), kron_matmul(in_factors, g.T).T


def tucker_linear_rank(ranks: Sequence[int], d: int) -> int:
    """Inner rank ``R = min(prod ranks[:d], prod ranks[d:])`` of :func:`tucker_linear_factors`."""
    return min(math.prod(ranks[:d]), math.prod(ranks[d:]))


def tucker_params(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Parameters of a Tucker tensor: ``prod r + sum n_k r_k``."""
    return math.prod(ranks) + sum(n * r for n, r in zip(shape, ranks, strict=True))


def tucker_linear_macs(out_modes: Sequence[int], in_modes: Sequence[int], ranks: Sequence[int]) -> int:
    """Multiply-adds per input vector of :func:`tucker_linear_apply`."""
    d = len(out_modes)
    r_out, r_in = list(ranks[:d]), list(ranks[d:])
    macs = 0
    sizes = list(in_modes)
    for k in range(len(sizes)):  # project input modes one by one
        macs += math.prod(sizes) * r_in[k]
        sizes[k] = r_in[k]
    macs += math.prod(r_out) * math.prod(r_in)
    sizes = list(r_out)
    for k in range(d):
        macs += math.prod(sizes) * out_modes[k]
        sizes[k] = out_modes[k]
    return macs
