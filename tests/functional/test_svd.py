"""Truncated SVD: Eckart-Young optimality, the even split of singular values, the energy rule and its errors."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from compressed_transformer.functional.svd import rank_for_energy, svd_error, truncated_svd

F64 = torch.float64


@pytest.mark.parametrize("shape", [(8, 12), (12, 8), (5, 5)])
def test_truncated_svd_is_the_best_rank_r_approximation(shape) -> None:
    weight = torch.randn(shape, dtype=F64)
    s = torch.linalg.svdvals(weight)
    for rank in range(1, min(shape) + 1):
        left, right = truncated_svd(weight, rank=rank)
        assert left.shape == (shape[0], rank) and right.shape == (rank, shape[1])
        error = torch.linalg.matrix_norm(weight - left @ right)
        assert_close(error, torch.linalg.vector_norm(s[rank:]))  # Eckart-Young: the tail of the spectrum
        assert svd_error(s, rank) == pytest.approx(float(error / torch.linalg.matrix_norm(weight)), abs=1e-12)
        # Even split: both factors carry sqrt(S).
        assert_close(torch.linalg.vector_norm(left, dim=0), s[:rank].sqrt())
        assert_close(torch.linalg.vector_norm(right, dim=1), s[:rank].sqrt())
    assert_close(left @ right, weight)


def test_rank_for_energy() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 9 / 14 + 1e-6) == 2
    assert rank_for_energy(s, 13 / 14) == 2
    assert rank_for_energy(s, 1.0) == 3
    weight = torch.randn(10, 6, dtype=F64)
    left, _ = truncated_svd(weight, energy=0.8)
    kept = torch.linalg.svdvals(weight)[: left.shape[1]].pow(2).sum() / weight.pow(2).sum()
    assert kept >= 0.8


@pytest.mark.parametrize("energy", [0.0, -0.5, 1.5])
def test_energy_outside_unit_interval_raises(energy: float) -> None:
    with pytest.raises(ValueError, match=r"energy must be in \(0, 1\]"):
        truncated_svd(torch.randn(4, 3), energy=energy)


@pytest.mark.parametrize("rank", [0, -1, 4])
def test_rank_outside_range_raises(rank: int) -> None:
    with pytest.raises(ValueError, match=r"rank must be in \[1, 3\]"):
        truncated_svd(torch.randn(4, 3), rank=rank)


@pytest.mark.parametrize("kwargs", [{}, {"rank": 2, "energy": 0.5}])
def test_exactly_one_of_rank_and_energy(kwargs) -> None:
    with pytest.raises(ValueError, match="exactly one of rank= or energy="):
        truncated_svd(torch.randn(4, 3), **kwargs)
