"""Tucker maths: HOSVD / HOOI exactness and error, the factorised product, counts, and a cross-check with tensorly."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from compressed_transformer.functional.tucker import (
    hooi,
    hosvd,
    kron_matmul,
    mode_product,
    resolve_tucker_ranks,
    tucker_linear_apply,
    tucker_linear_factors,
    tucker_linear_macs,
    tucker_params,
    tucker_to_dense,
)

F64 = torch.float64


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a))


def random_tucker(shape, ranks) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return torch.randn(ranks, dtype=F64), [torch.randn(n, r, dtype=F64) for n, r in zip(shape, ranks, strict=True)]


def test_mode_product_matches_einsum() -> None:
    tensor, matrix = torch.randn(3, 4, 5, dtype=F64), torch.randn(7, 4, dtype=F64)
    assert_close(mode_product(tensor, matrix, 1), torch.einsum("anc,mn->amc", tensor, matrix))


def test_resolve_tucker_ranks() -> None:
    assert resolve_tucker_ranks(3, [2, 5, 4]) == [2, 3, 3]
    assert resolve_tucker_ranks([1, 5, 4], [2, 5, 4]) == [1, 5, 4]


@pytest.mark.parametrize(
    "ranks, match",
    [
        (0, "must be >= 1"),
        ([1, 2], "one rank per mode"),
        ([0, 2, 2], r"ranks\[0\]=0 is outside \[1, 2\]"),
        ([2, 6, 2], r"ranks\[1\]=6 is outside \[1, 5\]"),
    ],
)
def test_resolve_tucker_ranks_rejects_bad_ranks(ranks, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_tucker_ranks(ranks, [2, 5, 4])


@pytest.mark.parametrize("decompose", [hosvd, hooi])
@pytest.mark.parametrize("shape, ranks", [((4, 5, 6), [2, 3, 4]), ((3, 4, 2, 5), [2, 2, 2, 3]), ((6, 7), [3, 3])])
def test_known_tucker_ranks_are_recovered_exactly(decompose, shape, ranks) -> None:
    tensor = tucker_to_dense(*random_tucker(shape, ranks))
    core, factors = decompose(tensor, ranks)
    assert list(core.shape) == ranks
    for factor, n, r in zip(factors, shape, ranks, strict=True):
        assert factor.shape == (n, r)
        assert_close(factor.T @ factor, torch.eye(r, dtype=F64))  # orthonormal columns
    assert_close(tucker_to_dense(core, factors), tensor)


@pytest.mark.parametrize("decompose", [hosvd, hooi])
def test_full_ranks_are_exact(decompose) -> None:
    tensor = torch.randn(3, 4, 5, dtype=F64)
    core, factors = decompose(tensor, 100)  # an int is capped at each mode size
    assert core.shape == tensor.shape
    assert_close(tucker_to_dense(core, factors), tensor)


def test_rank_above_what_the_unfolding_has_is_completed_orthonormally() -> None:
    tensor = torch.randn(6, 2, 2, dtype=F64)  # mode-0 unfolding is 6 x 4: rank 5 needs a completed factor
    core, factors = hosvd(tensor, [5, 2, 2])
    assert_close(factors[0].T @ factors[0], torch.eye(5, dtype=F64))
    assert_close(tucker_to_dense(core, factors), tensor)


def test_error_decreases_with_rank_and_hooi_never_worse_than_hosvd() -> None:
    tensor = torch.randn(5, 6, 4, 3, dtype=F64)
    errors = []
    for r in range(1, 7):
        hosvd_error = rel_error(tensor, tucker_to_dense(*hosvd(tensor, r)))
        hooi_error = rel_error(tensor, tucker_to_dense(*hooi(tensor, r)))
        assert hooi_error <= hosvd_error + 1e-12
        errors.append(hosvd_error)
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-12


@pytest.mark.parametrize("shape, ranks", [((4, 5, 6, 3), [2, 3, 3, 2]), ((6, 5, 4), [2, 2, 3]), ((8, 9), [3, 3])])
def test_hosvd_and_hooi_match_tensorly(shape, ranks) -> None:
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import tucker

    tensor = torch.randn(shape, dtype=F64)
    array = tensor.numpy()
    with tl.backend_context("numpy"):
        # init="svd" is HOSVD; zero iterations keep it, many iterations run HOOI to convergence.
        hosvd_theirs = tucker(array, rank=ranks, n_iter_max=0, init="svd")
        hooi_theirs = tucker(array, rank=ranks, n_iter_max=200, tol=0, init="svd")
        errors = [float(tl.norm(array - tl.tucker_to_tensor(t)) / tl.norm(array)) for t in (hosvd_theirs, hooi_theirs)]
    assert rel_error(tensor, tucker_to_dense(*hosvd(tensor, ranks))) == pytest.approx(errors[0], rel=1e-9)
    ours = rel_error(tensor, tucker_to_dense(*hooi(tensor, ranks, n_iter=200, tol=0.0)))
    assert ours == pytest.approx(errors[1], rel=1e-6)


@pytest.mark.parametrize("lead", [(), (5,), (2, 3), (0,)])
@pytest.mark.parametrize(
    "out_modes, in_modes, ranks", [((2, 4), (3, 4), [2, 3, 2, 3]), ((6,), (2, 3, 2), [3, 2, 2, 1])]
)
def test_tucker_linear_apply_equals_dense_product(lead, out_modes, in_modes, ranks) -> None:
    core, factors = random_tucker([*out_modes, *in_modes], ranks)
    d = len(out_modes)
    weight = tucker_to_dense(core, factors).reshape(math.prod(out_modes), math.prod(in_modes))
    x = torch.randn(*lead, weight.shape[1], dtype=F64)
    y = tucker_linear_apply(x, core, factors[:d], factors[d:])
    assert y.shape == (*lead, weight.shape[0])
    assert_close(y, x @ weight.T)


def test_tucker_params_and_macs() -> None:
    assert tucker_params([2, 4, 3, 4], [2, 3, 2, 3]) == 2 * 3 * 2 * 3 + 2 * 2 + 4 * 3 + 3 * 2 + 4 * 3
    # Input projections (N, 3, 4) -> (N, 2, 4) -> (N, 2, 3), core (prod r = 6) x (prod s = 6), outputs 2 then 4.
    expected = 12 * 2 + 8 * 3 + 6 * 6 + 6 * 2 + 6 * 4
    assert tucker_linear_macs([2, 4], [3, 4], [2, 3, 2, 3]) == expected


@pytest.mark.parametrize("shapes", [[(5, 2)], [(4, 2), (3, 3)], [(2, 1), (3, 2), (4, 3)]])
def test_kron_matmul_is_the_kronecker_product_times_the_matrix(shapes) -> None:
    gen = torch.Generator().manual_seed(0)
    factors = [torch.randn(n, r, dtype=F64, generator=gen, requires_grad=True) for n, r in shapes]
    matrix = torch.randn(math.prod(r for _, r in shapes), 3, dtype=F64, generator=gen, requires_grad=True)
    expected = functools.reduce(torch.kron, factors) @ matrix
    assert_close(kron_matmul(factors, matrix), expected)
    torch.autograd.gradcheck(lambda m, *f: kron_matmul(f, m), (matrix, *factors))
    with pytest.raises(ValueError, match="matrix must be"):
        kron_matmul(factors, matrix[:-1])
    with pytest.raises(ValueError, match="at least one"):
        kron_matmul([], matrix)


@pytest.mark.parametrize("ranks", [(2, 2, 2, 2), (2, 3, 1, 2), (1, 1, 3, 3)])
def test_tucker_linear_factors_multiply_to_the_weight(ranks) -> None:
    out_modes, in_modes = (4, 5), (3, 6)
    core, factors = random_tucker(out_modes + in_modes, ranks)
    left, right = tucker_linear_factors(core, factors[:2], factors[2:])
    weight = tucker_to_dense(core, factors).reshape(20, 18)
    assert left.shape[1] == right.shape[0] == min(ranks[0] * ranks[1], ranks[2] * ranks[3])
    assert_close(left @ right, weight)
