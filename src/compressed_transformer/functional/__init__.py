"""Pure tensor maths (no ``nn.Module``): TT, Tucker, truncated SVD, sparsity masks and the Sparse VD KL term."""

from .sparsity import global_magnitude_threshold, log_alpha, magnitude_mask, magnitude_threshold, sparse_vd_kl
from .svd import rank_for_energy, svd_error, truncated_svd
from .tt import (
    factorize,
    max_tt_ranks,
    resolve_tt_ranks,
    tt_matrix_apply,
    tt_matrix_from_dense,
    tt_matrix_macs,
    tt_matrix_params,
    tt_matrix_to_dense,
    tt_svd,
    tt_to_dense,
)
from .tucker import (
    hooi,
    hosvd,
    mode_product,
    resolve_tucker_ranks,
    tucker_linear_apply,
    tucker_linear_macs,
    tucker_params,
    tucker_to_dense,
)

__all__ = [
    "factorize",
    "global_magnitude_threshold",
    "hooi",
    "hosvd",
    "log_alpha",
    "magnitude_mask",
    "magnitude_threshold",
    "max_tt_ranks",
    "mode_product",
    "rank_for_energy",
    "resolve_tt_ranks",
    "resolve_tucker_ranks",
    "sparse_vd_kl",
    "svd_error",
    "truncated_svd",
    "tt_matrix_apply",
    "tt_matrix_from_dense",
    "tt_matrix_macs",
    "tt_matrix_params",
    "tt_matrix_to_dense",
    "tt_svd",
    "tt_to_dense",
    "tucker_linear_apply",
    "tucker_linear_macs",
    "tucker_params",
    "tucker_to_dense",
]
