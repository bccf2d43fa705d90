"""Truncated SVD of a weight matrix: ``W ~= left @ right`` with ``left`` ``(out, r)`` and ``right`` ``(r, in)``."""

from __future__ import annotations

import torch

from ._validate import check_rank

__all__ = ["rank_for_energy", "svd_error", "truncated_svd"]


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep at least ``energy`` of ``sum(s**2)``.

    Raises:
        ValueError: if ``energy`` is outside ``(0, 1]``.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    power = singular_values.double() ** 2
    kept = torch.cumsum(power, 0) / power.sum().clamp_min(1e-300)
    return min(int((kept < energy - 1e-12).sum()) + 1, singular_values.numel())


def truncated_svd(
    weight: torch.Tensor, rank: int | None = None, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``r`` approximation (Eckart-Young) of ``weight``, split evenly as ``(U sqrt(S), sqrt(S) Vh)``.

    Args:
        weight: ``(out_features, in_features)``.
        rank: kept rank in ``[1, min(out, in)]``.
        energy: alternatively, the kept fraction of spectral energy in ``(0, 1]``.

    Returns:
        ``(left, right)`` of shapes ``(out, r)`` and ``(r, in)``.

    Raises:
        ValueError: if neither or both of ``rank``/``energy`` are given, or either is out of range.
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank= or energy=")
    rank = None if rank is None else check_rank(rank)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    rank = rank_for_energy(s, energy) if rank is None else rank
    max_rank = min(weight.shape)
    if not 1 <= rank <= max_rank:
        raise ValueError(f"rank must be in [1, {max_rank}] for a {tuple(weight.shape)} weight, got {rank}")
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def svd_error(singular_values: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of the rank-``rank`` truncation: ``||s[rank:]|| / ||s||``."""
    s = singular_values.double()
    return float(torch.linalg.vector_norm(s[rank:]) / torch.linalg.vector_norm(s).clamp_min(1e-300))
