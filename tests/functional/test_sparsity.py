"""Sparsity maths: magnitude thresholds and masks, log-alpha and the Sparse VD KL approximation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from compressed_transformer.functional.sparsity import (
    csr_from_mask,
    global_magnitude_threshold,
    log_alpha,
    magnitude_mask,
    magnitude_threshold,
    masked_from_csr,
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_threshold_is_exact_in_the_weights_own_precision(dtype: torch.dtype) -> None:
    """Magnitudes a float32 threshold cannot tell apart (float64 weights 1e-12 apart) are still cut exactly; the
    lower precisions are cut exactly where their magnitudes are distinct."""
    torch.manual_seed(0)
    spread = {torch.float64: 1e-12, torch.float32: 1e-3, torch.bfloat16: 1.0}[dtype]
    weight = (1.0 + spread * torch.randperm(1000, dtype=torch.float64) / 1000).to(dtype)
    assert weight.unique().numel() == 1000 or dtype == torch.bfloat16
    for sparsity in (0.1, 0.5, 0.937):
        dropped = int((~magnitude_mask(weight, magnitude_threshold(weight, sparsity))).sum())
        if dtype == torch.bfloat16:  # few distinct values: ties are removed together
            assert dropped >= round(sparsity * 1000)
        else:
            assert dropped == round(sparsity * 1000)


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_magnitude_mask_is_exact_for_thresholds_between_the_dtypes_values(dtype: torch.dtype) -> None:
    """``1[|w| > threshold]`` exactly, where ``threshold`` rounds up to a weight in the weight's dtype: bfloat16
    ``1.0 > 0.999`` (a plain comparison rounds the threshold to 1.0 first and drops the weight), also for a global
    threshold taken among float64 weights and for ``PrunedLinear.from_linear(threshold=)``."""
    from compressed_transformer.layers import PrunedLinear

    weight = torch.tensor([[1.0, -1.0, 0.5, 2.0]], dtype=dtype)
    below = float(torch.nextafter(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)))
    for threshold in (0.999, below):
        assert magnitude_mask(weight, threshold).tolist() == [[True, True, False, True]]
    assert magnitude_mask(weight, 1.0).tolist() == [[False, False, False, True]]  # ties at lambda are dropped
    other = torch.tensor([0.25, below], dtype=torch.float64)
    assert global_magnitude_threshold([weight, other], 0.5) == below  # drops 0.25, 0.5 and `below`
    assert magnitude_mask(weight, global_magnitude_threshold([weight, other], 0.5)).sum() == 3
    linear = torch.nn.Linear(4, 1, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    assert PrunedLinear.from_linear(linear, threshold=0.999).mask.tolist() == [[True, True, False, True]]
    with pytest.raises(ValueError, match="threshold must be a number"):
        magnitude_mask(weight, math.nan)


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


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("shape", [(7, 5), (1, 40), (40, 1), (300, 200)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_csr_arrays_of_a_mask_rebuild_the_masked_weight_exactly(shape: tuple[int, int], density: float) -> None:
    torch.manual_seed(0)
    weight = torch.randn(shape, dtype=torch.float64)
    mask = torch.rand(shape) < density
    weight[0, 0] = 0.0  # a zero inside the mask stays inside it: the pattern is the mask's
    mask[0, 0] = density > 0
    values, crow, col = csr_from_mask(weight, mask)
    assert values.numel() == col.numel() == int(mask.sum()) and crow.numel() == shape[0] + 1
    assert col.dtype == torch.int16 and values.dtype == torch.float64
    rebuilt, rebuilt_mask = masked_from_csr(values, crow, col, shape)
    assert torch.equal(rebuilt_mask, mask) and torch.equal(rebuilt, weight * mask)
    if mask.any():  # the same arrays as torch's own CSR conversion of the masked weight
        reference = (weight * mask + 1e9 * mask).to_sparse_csr()  # no cancelled zeros
        assert torch.equal(crow.long(), reference.crow_indices()) and torch.equal(col.long(), reference.col_indices())


def test_csr_indices_widen_only_when_needed() -> None:
    mask = torch.zeros(2, 40000, dtype=torch.bool)
    mask[1, 39999] = True
    _, crow, col = csr_from_mask(torch.ones(2, 40000), mask)
    assert col.dtype == torch.int32 and crow.dtype == torch.int16 and int(col[0]) == 39999


def test_bad_csr_input_is_refused() -> None:
    weight, mask = torch.randn(3, 4), torch.rand(3, 4) < 0.5
    with pytest.raises(ValueError, match="bool mask"):
        csr_from_mask(weight, mask.float())
    with pytest.raises(ValueError, match="2-D"):
        csr_from_mask(weight[0], mask[0])
    values, crow, col = csr_from_mask(weight, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="invalid CSR arrays"):
        masked_from_csr(values, crow, col, (4, 3))
    with pytest.raises(ValueError, match="row pointers"):
        masked_from_csr(values, crow.flip(0), col, (3, 4))
    with pytest.raises(ValueError, match="out of range"):
        masked_from_csr(values, crow, col + 1, (3, 4))
    with pytest.raises(ValueError, match="repeat"):
        masked_from_csr(values, crow, torch.zeros_like(col), (3, 4))
