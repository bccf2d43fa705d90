"""TT maths: TT-SVD error bounds and exactness, TT-matrices, the contraction, and a cross-check against tensorly."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from compressed_transformer.functional.tt import (
    factorize,
    max_tt_ranks,
    resolve_tt_ranks,
    tt_matrix_apply,
    tt_matrix_from_dense,
    tt_matrix_macs,
    tt_matrix_params,
    tt_matrix_rebuild,
    tt_matrix_to_dense,
    tt_svd,
    tt_to_dense,
)

F64 = torch.float64
SHAPES = [(7, 9), (4, 5, 6), (3, 4, 5, 6), (2, 2, 2, 2, 2, 2)]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a))


def random_tt(shape, ranks, dtype=F64) -> list[torch.Tensor]:
    return [torch.randn(ranks[k], n, ranks[k + 1], dtype=dtype) for k, n in enumerate(shape)]


def random_tt_matrix(out_modes, in_modes, ranks) -> list[torch.Tensor]:
    return [
        torch.randn(ranks[k], o, i, ranks[k + 1], dtype=F64)
        for k, (o, i) in enumerate(zip(out_modes, in_modes, strict=True))
    ]


def decaying_tensor(shape) -> torch.Tensor:
    """A tensor with a quickly decaying TT spectrum (a low-rank part plus small noise), so eps changes the ranks."""
    low = tt_to_dense(random_tt(shape, [1] + [2] * (len(shape) - 1) + [1]))
    return low / low.norm() + 0.05 * torch.randn(shape, dtype=F64) / math.sqrt(math.prod(shape))


def ranks_of(cores) -> list[int]:
    return [1] + [c.shape[-1] for c in cores]


@pytest.mark.parametrize("n, d", [(1, 1), (12, 3), (784, 4), (256, 4), (97, 2), (2048, 3), (10, 4)])
def test_factorize_multiplies_to_n_and_is_balanced(n: int, d: int) -> None:
    factors = factorize(n, d)
    assert len(factors) == d
    assert math.prod(factors) == n
    assert factors == sorted(factors, reverse=True)


def test_factorize_examples() -> None:
    assert factorize(784, 4) == [7, 7, 4, 4]
    assert factorize(256, 4) == [4, 4, 4, 4]
    assert factorize(10, 4) == [5, 2, 1, 1]


@pytest.mark.parametrize("n, d", [(0, 2), (12, 0), (-3, 1)])
def test_factorize_rejects_bad_input(n: int, d: int) -> None:
    with pytest.raises(ValueError, match="n >= 1 and d >= 1"):
        factorize(n, d)


def test_max_tt_ranks() -> None:
    assert max_tt_ranks([4, 5, 6]) == [1, 4, 6, 1]
    assert max_tt_ranks([2, 2, 2, 2]) == [1, 2, 4, 2, 1]
    assert max_tt_ranks([9]) == [1, 1]


def test_resolve_tt_ranks_int_is_capped_and_list_is_exact() -> None:
    assert resolve_tt_ranks(3, [2, 2, 2, 2]) == [1, 2, 3, 2, 1]
    assert resolve_tt_ranks([1, 2, 4, 2, 1], [2, 2, 2, 2]) == [1, 2, 4, 2, 1]


@pytest.mark.parametrize(
    "ranks, match",
    [
        (0, "must be >= 1"),
        (-2, "must be >= 1"),
        ([1, 2, 1], "must have 5 entries"),
        ([2, 2, 2, 2, 1], "start and end with 1"),
        ([1, 2, 2, 2, 3], "start and end with 1"),
        ([1, 0, 2, 2, 1], r"ranks\[1\]=0 is outside \[1, 2\]"),
        ([1, 2, 5, 2, 1], r"ranks\[2\]=5 is outside \[1, 4\]"),
        ([1, 3, 4, 2, 1], "maximal TT-rank"),
    ],
)
def test_resolve_tt_ranks_rejects_bad_ranks(ranks, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_tt_ranks(ranks, [2, 2, 2, 2])


@pytest.mark.parametrize("shape", SHAPES)
def test_tt_svd_without_truncation_is_exact(shape) -> None:
    tensor = torch.randn(shape, dtype=F64)
    cores = tt_svd(tensor)
    assert ranks_of(cores) == max_tt_ranks(shape)
    assert_close(tt_to_dense(cores), tensor)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [0.01, 0.1, 0.3, 0.6, 0.9])
def test_tt_svd_eps_bound_holds(shape, eps: float) -> None:
    for tensor in (torch.randn(shape, dtype=F64), decaying_tensor(shape)):
        cores = tt_svd(tensor, eps=eps)
        assert rel_error(tensor, tt_to_dense(cores)) <= eps + 1e-12
        ranks = ranks_of(cores)
        assert all(1 <= r <= m for r, m in zip(ranks, max_tt_ranks(shape), strict=True))


def test_tt_svd_eps_compresses_a_decaying_tensor() -> None:
    shape = (4, 5, 6, 3)
    tensor = decaying_tensor(shape)
    loose, tight = tt_svd(tensor, eps=0.3), tt_svd(tensor, eps=1e-3)
    assert sum(c.numel() for c in loose) < sum(c.numel() for c in tight)
    assert rel_error(tensor, tt_to_dense(loose)) > rel_error(tensor, tt_to_dense(tight))


@pytest.mark.parametrize("shape", SHAPES)
def test_tt_svd_error_decreases_with_rank(shape) -> None:
    tensor = torch.randn(shape, dtype=F64)
    top = max(max_tt_ranks(shape))
    errors = [rel_error(tensor, tt_to_dense(tt_svd(tensor, ranks=r))) for r in range(1, top + 1)]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(errors)), errors
    assert errors[0] > 0.1
    assert errors[-1] < 1e-12


@pytest.mark.parametrize(
    "shape, ranks",
    [((3, 4, 5, 3), [1, 2, 3, 2, 1]), ((4, 6, 5), [1, 3, 2, 1]), ((2, 3, 4, 3, 2), [1, 2, 4, 3, 2, 1])],
)
def test_tt_svd_recovers_known_ranks(shape, ranks) -> None:
    tensor = tt_to_dense(random_tt(shape, ranks))
    exact = tt_svd(tensor, ranks=ranks)
    assert ranks_of(exact) == ranks
    assert_close(tt_to_dense(exact), tensor)
    found = tt_svd(tensor, eps=1e-8)
    assert all(r <= known for r, known in zip(ranks_of(found), ranks, strict=True)), ranks_of(found)
    assert_close(tt_to_dense(found), tensor)


def test_tt_svd_pads_explicit_ranks_above_what_is_left() -> None:
    # A rank-1 tensor asked for ranks [1, 2, 3, 1] with eps: the truncation keeps rank 1, the cores are padded.
    tensor = tt_to_dense(random_tt((3, 4, 5), [1, 1, 1, 1]))
    cores = tt_svd(tensor, ranks=[1, 2, 3, 1], eps=0.1)
    assert [tuple(c.shape) for c in cores] == [(1, 3, 2), (2, 4, 3), (3, 5, 1)]
    assert_close(tt_to_dense(cores), tensor)


@pytest.mark.parametrize("eps", [0.0, 1.0, -0.1, 1.5])
def test_tt_svd_rejects_eps_outside_unit_interval(eps: float) -> None:
    with pytest.raises(ValueError, match=r"eps must be in \(0, 1\)"):
        tt_svd(torch.randn(3, 4, 5), eps=eps)


def test_tt_svd_rejects_explicit_ranks_above_the_maximum() -> None:
    with pytest.raises(ValueError, match="maximal TT-rank"):
        tt_svd(torch.randn(3, 4, 5), ranks=[1, 4, 5, 1])


def test_tt_svd_rejects_rank_below_one() -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        tt_svd(torch.randn(3, 4, 5), ranks=0)


@pytest.mark.parametrize(
    "out_modes, in_modes, ranks",
    [((2, 3), (4, 2), [1, 3, 1]), ((2, 8, 8, 2), (7, 4, 7, 4), [1, 2, 4, 2, 1]), ((3, 1, 2), (2, 5, 2), [1, 2, 2, 1])],
)
def test_tt_matrix_round_trip_and_known_ranks(out_modes, in_modes, ranks) -> None:
    cores = random_tt_matrix(out_modes, in_modes, ranks)
    weight = tt_matrix_to_dense(cores)
    assert weight.shape == (math.prod(out_modes), math.prod(in_modes))
    # Entry check against the definition W[(o_1..o_d), (i_1..i_d)] = G_1[:, o_1, i_1, :] ... G_d[:, o_d, i_d, :].
    for row, col in [(0, 0), (weight.shape[0] - 1, weight.shape[1] - 1), (weight.shape[0] // 2, weight.shape[1] // 3)]:
        o_idx = torch.unravel_index(torch.tensor(row), out_modes)
        i_idx = torch.unravel_index(torch.tensor(col), in_modes)
        product = torch.ones(1, 1, dtype=F64)
        for core, o, i in zip(cores, o_idx, i_idx, strict=True):
            product = product @ core[:, int(o), int(i), :]
        assert_close(weight[row, col], product[0, 0])
    recovered = tt_matrix_from_dense(weight, out_modes, in_modes, ranks=ranks)
    assert [tuple(c.shape) for c in recovered] == [tuple(c.shape) for c in cores]
    assert_close(tt_matrix_to_dense(recovered), weight)
    found = tt_matrix_from_dense(weight, out_modes, in_modes, eps=1e-8)
    assert all(r <= k for r, k in zip(ranks_of(found), ranks, strict=True))


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.5, 0.8])
@pytest.mark.parametrize(
    "out_modes, in_modes", [((4, 4), (4, 8)), ((2, 4, 4), (4, 2, 4)), ((2, 2, 2, 2), (3, 2, 2, 3))]
)
def test_tt_matrix_from_dense_eps_bound(eps: float, out_modes, in_modes) -> None:
    weight = torch.randn(math.prod(out_modes), math.prod(in_modes), dtype=F64)
    weight = weight + 3 * torch.outer(torch.randn(weight.shape[0], dtype=F64), torch.randn(weight.shape[1], dtype=F64))
    approx = tt_matrix_to_dense(tt_matrix_from_dense(weight, out_modes, in_modes, eps=eps))
    assert rel_error(weight, approx) <= eps + 1e-12


@pytest.mark.parametrize(
    "out_modes, in_modes, match",
    [
        ((2, 3), (4, 3), r"prod\(in_modes\)=12 must equal in_features=8"),
        ((2, 2), (4, 2), r"prod\(out_modes\)=4 must equal out_features=6"),
        ((6,), (4, 2), "same length"),
    ],
)
def test_tt_matrix_from_dense_rejects_bad_modes(out_modes, in_modes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tt_matrix_from_dense(torch.randn(6, 8), out_modes, in_modes, ranks=2)


@pytest.mark.parametrize("lead", [(), (5,), (2, 3), (0,)])
def test_tt_matrix_apply_equals_dense_product(lead) -> None:
    out_modes, in_modes, ranks = (2, 3, 2), (3, 2, 2), [1, 3, 2, 1]
    cores = random_tt_matrix(out_modes, in_modes, ranks)
    x = torch.randn(*lead, 12, dtype=F64)
    y = tt_matrix_apply(x, cores)
    assert y.shape == (*lead, 12)
    assert_close(y, x @ tt_matrix_to_dense(cores).T)


@pytest.mark.parametrize(
    "out_modes, in_modes, ranks",
    [
        ((6,), (5,), [1, 1]),
        ((2, 3), (3, 2), [1, 3, 1]),
        ((2, 3, 2), (3, 2, 2), [1, 3, 2, 1]),
        ((2, 2, 3, 2), (3, 2, 2, 2), [1, 2, 4, 3, 1]),
    ],
)
def test_tt_matrix_rebuild_equals_core_by_core_rebuild_with_gradients(out_modes, in_modes, ranks) -> None:
    cores = [c.requires_grad_() for c in random_tt_matrix(out_modes, in_modes, ranks)]
    w = tt_matrix_rebuild(cores)
    reference = tt_matrix_to_dense(cores)
    assert_close(w, reference)
    with torch.no_grad():  # the no-autograd branch
        assert_close(tt_matrix_rebuild(cores), reference)
    upstream = torch.randn_like(w)
    grads = torch.autograd.grad(w, cores, upstream)
    expected = torch.autograd.grad(reference, cores, upstream)
    for g, e in zip(grads, expected, strict=True):
        assert_close(g, e)
    assert torch.autograd.gradcheck(lambda *c: tt_matrix_rebuild(list(c)), tuple(cores))


def test_tt_matrix_params_and_macs() -> None:
    out_modes, in_modes, ranks = (2, 8, 8, 2), (7, 4, 7, 4), [1, 2, 4, 2, 1]
    assert tt_matrix_params(out_modes, in_modes, ranks) == 748  # the seed's MNIST layer
    # Left-to-right: step k costs (o_1..o_{k-1}) (i_{k+1}..i_d) r_{k-1} i_k o_k r_k.
    expected = (
        1 * (4 * 7 * 4) * 1 * 7 * 2 * 2 + 2 * (7 * 4) * 2 * 4 * 8 * 4 + 16 * 4 * 4 * 7 * 8 * 2 + 128 * 1 * 2 * 4 * 2
    )
    assert tt_matrix_macs(out_modes, in_modes, ranks) == expected


@pytest.mark.parametrize(
    "shape, ranks", [((4, 5, 6, 3), [1, 3, 4, 2, 1]), ((6, 5, 4), [1, 2, 3, 1]), ((8, 9), [1, 4, 1])]
)
def test_tt_svd_matches_tensorly(shape, ranks) -> None:
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import tensor_train

    tensor = torch.randn(shape, dtype=F64)
    ours = rel_error(tensor, tt_to_dense(tt_svd(tensor, ranks=ranks)))
    array = tensor.numpy()
    with tl.backend_context("numpy"):
        theirs_tt = tensor_train(array, rank=ranks)
        theirs = float(tl.norm(array - tl.tt_to_tensor(theirs_tt)) / tl.norm(array))
        assert [f.shape[-1] for f in theirs_tt] == ranks[1:]
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)
