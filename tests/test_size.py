"""Size accounting on models that mix dense and compressed layers, checked against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressed_transformer.layers import (
    LowRankLinear,
    PrunedLinear,
    SparseLinear,
    SparseVDLinear,
    TTLinear,
    TuckerLinear,
)
from compressed_transformer.size import compression_ratio, dense_bytes, dense_params, stored_bytes, stored_params

PRUNED_KEPT, VD_KEPT = 30, 5


def mixed_model(dtype: torch.dtype) -> nn.Sequential:
    """Dense, TT, pruned, low-rank, Tucker and Sparse VD layers with masks of known size, plus norms."""
    pruned = PrunedLinear(12, 6, dtype=dtype)
    mask = torch.zeros(6 * 12, dtype=torch.bool)
    mask[torch.randperm(6 * 12)[:PRUNED_KEPT]] = True
    pruned.set_mask_(mask.reshape(6, 12))
    vd = SparseVDLinear(4, 3, bias=False, dtype=dtype)
    with torch.no_grad():
        vd.theta.uniform_(0.5, 1.0)
        keep = torch.zeros(3 * 4, dtype=torch.bool)
        keep[torch.randperm(3 * 4)[:VD_KEPT]] = True
        vd.log_sigma2.copy_(torch.where(keep, -10.0, 10.0).reshape(3, 4))  # log alpha ~ -10 (kept) or 10 (dropped)
    return nn.Sequential(
        nn.Linear(10, 20, dtype=dtype),  # 200 + 20
        nn.ReLU(),
        TTLinear(20, 12, in_modes=(4, 5), out_modes=(3, 4), ranks=[1, 2, 1], dtype=dtype),  # 1*3*4*2 + 2*4*5*1 + 12
        nn.LayerNorm(12, dtype=dtype),  # 12 + 12
        pruned,  # 30 kept + 6 bias (the bool mask is a buffer: not counted)
        LowRankLinear(6, 5, rank=2, dtype=dtype),  # 2 * (6 + 5) + 5
        TuckerLinear(5, 4, bias=False, in_modes=(5,), out_modes=(4,), ranks=[2, 3], dtype=dtype),  # 2*3 + 4*2 + 5*3
        vd,  # 5 kept, no bias (log sigma^2 is training-only)
        nn.BatchNorm1d(3, dtype=dtype),  # 3 + 3 (running statistics are buffers: not counted)
    )


DENSE_STORED = 220 + (24 + 40 + 12) + 24 + 27 + (6 + 8 + 15) + 6  # every parameter of the non-sparse modules
DENSE_EQUIVALENT = 220 + (240 + 12) + 24 + (72 + 6) + (30 + 5) + 20 + 12 + 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sizes_of_a_mixed_model(dtype: torch.dtype) -> None:
    model = mixed_model(dtype)
    element = torch.finfo(dtype).bits // 8
    assert stored_params(model) == DENSE_STORED + (PRUNED_KEPT + 6) + VD_KEPT
    # CSR: one int32 column index per nonzero, out_features + 1 int32 row pointers, then the bias.
    pruned_bytes = PRUNED_KEPT * (element + 4) + (6 + 1) * 4 + 6 * element
    vd_bytes = VD_KEPT * (element + 4) + (3 + 1) * 4
    assert stored_bytes(model) == DENSE_STORED * element + pruned_bytes + vd_bytes
    assert dense_params(model) == DENSE_EQUIVALENT
    assert dense_bytes(model) == DENSE_EQUIVALENT * element
    assert compression_ratio(model) == pytest.approx(DENSE_EQUIVALENT / stored_params(model))
    assert compression_ratio(model, by="bytes") == pytest.approx(DENSE_EQUIVALENT * element / stored_bytes(model))


def test_dense_model_counts_every_parameter_once() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4, bias=False))
    expected = sum(p.numel() for p in model.parameters())
    assert stored_params(model) == dense_params(model) == expected
    assert stored_bytes(model) == dense_bytes(model) == 4 * expected
    assert compression_ratio(model) == 1.0


def test_a_module_without_parameters_has_ratio_one() -> None:
    for module in (nn.ReLU(), nn.Sequential()):
        assert compression_ratio(module) == 1.0 and compression_ratio(module, by="bytes") == 1.0


def test_shared_modules_and_tied_parameters_count_once() -> None:
    shared = nn.Linear(4, 4)
    tied = nn.Linear(4, 4)
    tied.weight = shared.weight  # tied weight, separate bias
    tt = TTLinear(4, 4, in_modes=(2, 2), out_modes=(2, 2), ranks=[1, 2, 1])
    model = nn.Sequential(shared, nn.Sequential(shared, tied), nn.ModuleList([tt, nn.Sequential(tt)]))
    assert stored_params(model) == 16 + 4 + 4 + tt.num_stored_params()
    assert dense_params(model) == 16 + 4 + 4 + 16 + 4
    assert stored_params(nn.Sequential(shared, tied)) == sum(
        p.numel() for p in nn.Sequential(shared, tied).parameters()
    )


def test_a_single_compressed_layer_and_the_ratio_it_reports() -> None:
    layer = TTLinear(784, 256, in_modes=(7, 4, 7, 4), out_modes=(2, 8, 8, 2), ranks=[1, 2, 4, 2, 1])
    assert stored_params(layer) == 748 + 256
    assert dense_params(layer) == 784 * 256 + 256
    assert compression_ratio(layer) == pytest.approx((784 * 256 + 256) / (748 + 256))


def test_sparse_vd_counts_only_weights_kept_at_eval() -> None:
    model = mixed_model(torch.float32)
    vd = model[7]
    before = stored_params(model)
    with torch.no_grad():
        vd.log_sigma2.fill_(-10.0)  # keep everything
    assert stored_params(model) == before + (12 - VD_KEPT)


def test_sparse_linear_bytes_count_the_index_buffers_it_holds() -> None:
    """32-bit positions up to 2**31 - 2 weights, 64-bit from 2**31 - 1 (flat positions must fit): the bytes
    reported are those of the buffers."""
    small, huge = SparseLinear(3, 5, nnz=4), SparseLinear(65536, 32768, bias=False, nnz=0)
    assert small.col_indices.dtype == torch.int32 and huge.crow_indices.dtype == torch.int64
    assert stored_bytes(small) == 4 * (4 + 4) + 6 * 4 + 5 * 4
    assert stored_bytes(huge) == sum(b.numel() * b.element_size() for b in huge.buffers()) == (32768 + 1) * 8


def test_compression_ratio_rejects_unknown_measure() -> None:
    with pytest.raises(ValueError, match="by must be 'params' or 'bytes', got 'flops'"):
        compression_ratio(nn.Linear(3, 3), by="flops")
