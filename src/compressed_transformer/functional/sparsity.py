"""Sparsity maths: magnitude masks (Han et al. 2015) and Sparse Variational Dropout (Molchanov et al. 2017)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "K1",
    "K2",
    "K3",
    "csr_from_mask",
    "global_magnitude_threshold",
    "log_alpha",
    "magnitude_mask",
    "magnitude_threshold",
    "masked_from_csr",
    "sparse_vd_kl",
]

# Molchanov et al. (2017), eq. 14: -KL(q || p) ~= k1 sigmoid(k2 + k3 log_alpha) - 0.5 log(1 + 1/alpha) - k1.
K1, K2, K3 = 0.63576, 1.87320, 1.48695


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (the fraction of weights set to zero), got {sparsity}")


def magnitude_threshold(weight: torch.Tensor, sparsity: float) -> float:
    """The ``lambda`` such that zeroing weights with ``|w| <= lambda`` removes ``round(sparsity * numel)`` weights
    (more where several magnitudes tie at ``lambda``: ties are kept or removed together).

    Returns ``-1.0`` (keep everything) for ``sparsity == 0``.

    Raises:
        ValueError: if ``sparsity`` is outside ``[0, 1)``.
    """
    return global_magnitude_threshold([weight], sparsity)


def global_magnitude_threshold(weights: Sequence[torch.Tensor], sparsity: float) -> float:
    """One threshold across several weights, removing ``round(sparsity * total)`` of their entries together."""
    _check_sparsity(sparsity)
    # in float64 if any weight is (a float32 threshold would misplace the cut between close float64 magnitudes);
    # bf16 / fp16 magnitudes are exact in float32
    dtype = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
    magnitudes = torch.cat([w.detach().abs().flatten().to(dtype) for w in weights])
    drop = round(sparsity * magnitudes.numel())
    if drop == 0:
        return -1.0
    return float(torch.kthvalue(magnitudes.cpu(), drop).values)


def magnitude_mask(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """The mask ``1[|w| > threshold]`` as a ``bool`` tensor of ``weight``'s shape, exact for any ``threshold``.

    (A Python ``float`` compared with a tensor is first rounded to the tensor's dtype, to the nearest value: a
    ``bfloat16`` weight of ``1.0`` would not count as above ``0.999``. The comparison is made with the largest
    value of ``weight``'s dtype not above ``threshold`` instead, which no weight exceeds unless it exceeds
    ``threshold``.)

    Raises:
        ValueError: if ``threshold`` is NaN (no weight would be kept).
    """
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("threshold must be a number, got nan")
    magnitudes = weight.detach().abs()
    if magnitudes.is_floating_point():
        rounded = torch.tensor(threshold, dtype=magnitudes.dtype)
        if float(rounded) > threshold:
            rounded = torch.nextafter(rounded, rounded.new_tensor(-math.inf))
        threshold = float(rounded)
    return magnitudes > threshold


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


def _index_dtype(limit: int) -> torch.dtype:
    """The narrowest signed integer type that holds ``0 .. limit``."""
    for dtype in (torch.int16, torch.int32):
        if limit <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def csr_from_mask(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept entries of a masked 2-D ``weight`` in compressed sparse row form: ``(values, crow, col)``.

    ``values`` are ``weight[mask]`` in row-major order (zeros inside the mask are kept: the pattern is the mask's,
    not the weight's), ``crow`` the ``rows + 1`` row pointers, ``col`` the column of each value. Indices use the
    narrowest integer type that holds them (``int16`` columns for up to 32767 columns), so a layer at sparsity
    ``s`` stores about ``(1 - s) * (element size + 2)`` bytes per weight instead of ``element size``.

    Raises:
        ValueError: if ``weight`` is not 2-D or ``mask`` is not a ``bool`` tensor of its shape.
    """
    if weight.dim() != 2 or mask.shape != weight.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"need a 2-D weight and a bool mask of its shape, got {tuple(weight.shape)} and "
            f"{tuple(mask.shape)} {mask.dtype}"
        )
    rows, cols = weight.shape
    row, col = mask.nonzero(as_tuple=True)
    crow = torch.zeros(rows + 1, dtype=torch.int64, device=mask.device)
    crow[1:] = torch.cumsum(torch.bincount(row, minlength=rows), 0)
    values = weight.detach()[row, col]
    return values, crow.to(_index_dtype(int(crow[-1]))), col.to(_index_dtype(cols - 1))


def masked_from_csr(
    values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`csr_from_mask`: the dense ``(weight, mask)`` of ``shape``, zero outside the mask.

    Raises:
        ValueError: if the arrays do not describe a valid CSR pattern of ``shape`` (lengths, row pointers that
            decrease or do not end at the number of values, columns out of range or repeated within a row).
    """
    rows, cols = shape
    nnz = values.numel()
    if values.dim() != 1 or crow.shape != (rows + 1,) or col.shape != (nnz,):
        raise ValueError(
            f"invalid CSR arrays for a {rows}x{cols} weight: values {tuple(values.shape)}, crow "
            f"{tuple(crow.shape)} (expected ({rows + 1},)), col {tuple(col.shape)} (expected ({nnz},))"
        )
    crow, col = crow.long(), col.long()
    counts = crow.diff()
    if int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((counts < 0).any()):
        raise ValueError(f"invalid CSR row pointers for {nnz} values: they must rise from 0 to {nnz}")
    if nnz and (int(col.min()) < 0 or int(col.max()) >= cols):
        raise ValueError(f"CSR column indices out of range [0, {cols})")
    row = torch.repeat_interleave(torch.arange(rows, device=crow.device), counts)
    mask = torch.zeros(shape, dtype=torch.bool, device=values.device)
    mask[row, col] = True
    if int(mask.sum()) != nnz:
        raise ValueError("CSR column indices repeat within a row")
    weight = torch.zeros(shape, dtype=values.dtype, device=values.device)
    weight[row, col] = values
    return weight, mask
