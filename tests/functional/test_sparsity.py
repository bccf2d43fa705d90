"""Sparsity maths: magnitude thresholds and masks, log-alpha and the Sparse VD KL approximation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from compressed_transformer.functional.sparsity import (
    global_magnitude_threshold,
    log_alpha,
    magnitude_mask,
    magnitude_threshold,
    sparse_vd_kl,
)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_magnitude_mask_removes_the_requested_fraction_of_smallest_weights(sparsity: float) -> None:
    weight = torch.randn(20, 30)
    mask = magnitude_mask(weight, magnitude_threshold(weight, sparsity))
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    assert int((~mask).sum()) == round(sparsity * weight.numel())
    if sparsity > 0:
        assert weight[mask].abs().min() > weight[~mask].abs().max()  # the smallest magnitudes go first


def test_zero_sparsity_keeps_everything_even_zeros() -> None:
    weight = torch.tensor([[0.0, 1.0], [-2.0, 0.0]])
    assert magnitude_threshold(weight, 0.0) == -1.0
    assert magnitude_mask(weight, -1.0).all()


def test_global_threshold_spans_all_weights() -> None:
    small = 0.5 * torch.rand(10, 10) * torch.randn(10, 10).sign()  # |w| < 0.5
    large = (1.0 + torch.rand(10, 10)) * torch.randn(10, 10).sign()  # |w| >= 1
    threshold = global_magnitude_threshold([small, large], 0.5)
    kept = int(magnitude_mask(small, threshold).sum() + magnitude_mask(large, threshold).sum())
    assert kept == 100
    assert not magnitude_mask(small, threshold).any()  # every small weight is below every large one here


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_sparsity_outside_half_open_unit_interval_raises(sparsity: float) -> None:
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        magnitude_threshold(torch.randn(4, 4), sparsity)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        global_magnitude_threshold([torch.randn(4, 4)], sparsity)


def test_log_alpha_is_log_sigma2_minus_log_theta2_clamped() -> None:
    theta = torch.tensor([1.0, 0.1, 1e-6, 100.0])
    log_sigma2 = torch.tensor([-2.0, -2.0, 0.0, -2.0])
    expected = torch.tensor([-2.0, -2.0 - math.log(0.01 + 1e-8), 10.0, -10.0])
    assert_close(log_alpha(theta, log_sigma2), expected)


def test_sparse_vd_kl_matches_the_paper_formula() -> None:
    k1, k2, k3 = 0.63576, 1.87320, 1.48695  # Molchanov et al. (2017), eq. 14
    la = torch.linspace(-10, 10, 41, dtype=torch.float64)
    neg_kl = k1 / (1 + torch.exp(-(k2 + k3 * la))) - 0.5 * torch.log(1 + torch.exp(-la)) - k1
    assert_close(sparse_vd_kl(la), -neg_kl.sum())
    per_weight = torch.stack([sparse_vd_kl(a[None]) for a in la])
    assert (per_weight[1:] <= per_weight[:-1]).all()  # KL falls as the weight gets noisier
    assert per_weight[-1] < 1e-3 and per_weight[0] > 4.0
