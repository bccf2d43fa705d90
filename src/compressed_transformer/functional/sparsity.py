"""Sparsity maths: magnitude masks (Han et al. 2015) and Sparse Variational Dropout (Molchanov et al. 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "K1",
    "K2",
    "K3",
    "global_magnitude_threshold",
    "log_alpha",
    "magnitude_mask",
    "magnitude_threshold",
    "sparse_vd_kl",
]

# Molchanov et al. (2017), eq. 14: -KL(q || p) ~= k1 sigmoid(k2 + k3 log_alpha) - 0.5 log(1 + 1/alpha) - k1.
K1, K2, K3 = 0.63576, 1.87320, 1.48695


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (the fraction of weights set to zero), got {sparsity}")


def magnitude_threshold(weight: torch.Tensor, sparsity: float) -> float:
    """The ``lambda`` such that zeroing weights with ``|w| <= lambda`` removes ``round(sparsity * numel)`` weights.

    Returns ``-1.0`` (keep everything) for ``sparsity == 0``.

    Raises:
        ValueError: if ``sparsity`` is outside ``[0, 1)``.
    """
    return global_magnitude_threshold([weight], sparsity)


def global_magnitude_threshold(weights: Sequence[torch.Tensor], sparsity: float) -> float:
    """One threshold across several weights, removing ``round(sparsity * total)`` of their entries together."""
    _check_sparsity(sparsity)
    magnitudes = torch.cat([w.detach().abs().flatten().float() for w in weights])
    drop = round(sparsity * magnitudes.numel())
    if drop == 0:
        return -1.0
    return float(torch.kthvalue(magnitudes.cpu(), drop).values)


def magnitude_mask(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """The mask ``1[|w| > threshold]`` as a ``bool`` tensor of ``weight``'s shape."""
    return weight.detach().abs() > threshold


def log_alpha(theta: torch.Tensor, log_sigma2: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``log alpha = log sigma^2 - log theta^2``, clamped to ``[-10, 10]`` for numerical stability."""
    return (log_sigma2 - torch.log(theta * theta + eps)).clamp(-10.0, 10.0)


def sparse_vd_kl(log_alpha: torch.Tensor) -> torch.Tensor:
    """Approximate ``KL(q(w | theta, alpha) || p(w))`` for the log-uniform prior, summed over all weights.

    Uses Molchanov et al. (2017), eq. 14, with constants ``k1, k2, k3 = 0.63576, 1.87320, 1.48695``;
    returns ``sum(-(k1 sigmoid(k2 + k3 log_alpha) - 0.5 log1p(exp(-log_alpha)) - k1))``.
    """
    neg_kl = K1 * torch.sigmoid(K2 + K3 * log_alpha) - 0.5 * torch.nn.functional.softplus(-log_alpha) - K1
    return -neg_kl.sum()
