"""The fast forward paths: every TT contraction plan, both sides of every dense/factorised switch, the eval-mode
cache and its invalidation, the CSR kernels, the cost model and torch.compile, all checked against ``to_dense()``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from compressed_transformer.functional.costs import CPU_COSTS, CUDA_COSTS, cost_model_for
from compressed_transformer.functional.tt import (
    TTPlan,
    resolve_tt_ranks,
    tt_groupings,
    tt_matrix_apply,
    tt_matrix_macs,
    tt_matrix_merge,
    tt_matrix_plan,
    tt_matrix_to_dense,
    tt_plan_candidates,
    tt_plan_chunk,
    tt_plan_macs,
    tt_plan_seconds,
    tt_plan_steps,
)
from compressed_transformer.functional.tucker import tucker_linear_factors, tucker_to_dense
from compressed_transformer.layers import (
    LowRankEmbedding,
    LowRankLinear,
    PrunedLinear,
    SparseLinear,
    SparseVDLinear,
    TTEmbedding,
    TTLinear,
    TuckerLinear,
)
from compressed_transformer.layers._fast import EvalCache, cache_nbytes, clear_caches, csr_linear, to_csr
from forced_paths import force_path


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def tt_cores(out_modes, in_modes, ranks, dtype=torch.float64) -> list[torch.Tensor]:
    ranks = resolve_tt_ranks(ranks, [o * i for o, i in zip(out_modes, in_modes, strict=True)])
    return [
        torch.randn(ranks[k], o, i, ranks[k + 1], dtype=dtype)
        for k, (o, i) in enumerate(zip(out_modes, in_modes, strict=True))
    ]


def odd_input(tokens: int, features: int, dtype=torch.float64) -> torch.Tensor:
    """A non-contiguous ``(tokens, features)`` input (a transposed view)."""
    x = torch.randn(features, tokens, dtype=dtype).t()
    assert tokens < 2 or not x.is_contiguous()
    return x


def all_plans(d: int, chunks=(None, 1, 3, 64)) -> list[TTPlan]:
    return [TTPlan(g, direction, chunk) for g in tt_groupings(d) for direction in ("ltr", "rtl") for chunk in chunks]


TT_STRUCTURES = [
    ([8, 4, 4, 4], [8, 8, 8, 4], 2),  # 512 -> 2048, the study's shape
    ([4, 3, 2], [2, 5, 3], [1, 3, 4, 1]),  # odd modes, uneven ranks
    ([7], [5], 1),  # one core: the dense weight itself
    ([2, 1, 3], [1, 4, 2], 2),  # modes of 1
]


# --- functional: TT plans ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_modes, out_modes, ranks", TT_STRUCTURES)
def test_every_plan_equals_dense_product(in_modes, out_modes, ranks) -> None:
    cores = tt_cores(out_modes, in_modes, ranks)
    weight = tt_matrix_to_dense(cores)
    bias = torch.randn(weight.shape[0], dtype=torch.float64)
    for tokens in (0, 1, 5, 13):
        x = odd_input(tokens, weight.shape[1])
        for plan in all_plans(len(cores)):
            assert_close(tt_matrix_apply(x, cores, plan=plan), x @ weight.T)
            with torch.no_grad():  # the no-autograd branch writes chunks into a preallocated output
                assert_close(tt_matrix_apply(x, cores, bias=bias, plan=plan), x @ weight.T + bias)


def test_leading_dimensions_are_kept() -> None:
    cores = tt_cores([2, 5, 3], [4, 3, 2], 3)
    weight = tt_matrix_to_dense(cores)
    x = torch.randn(3, 5, 7, 24, dtype=torch.float64).transpose(0, 2)
    for plan in all_plans(3, chunks=(None, 4)):
        y = tt_matrix_apply(x, cores, plan=plan)
        assert y.shape == (7, 5, 3, 30)
        assert_close(y, x @ weight.T)


@pytest.mark.parametrize("shared_bmm", ["autograd", "function"])
@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("direction", ["ltr", "rtl"])
def test_plan_gradients_equal_dense_gradients(
    direction: str, chunk: int | None, shared_bmm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both backwards of a shared-matrix batched product: autograd's (small products) and the one-GEMM
    autograd.Function (large ones)."""
    threshold = 10**9 if shared_bmm == "autograd" else 0
    monkeypatch.setattr("compressed_transformer.functional.tt.NATIVE_SHARED_BMM_MAX", threshold)
    cores = [c.requires_grad_() for c in tt_cores([2, 5, 3], [4, 3, 2], [1, 3, 4, 1])]
    bias = torch.randn(30, dtype=torch.float64, requires_grad=True)
    x = odd_input(7, 24).requires_grad_()
    grad = torch.randn(7, 30, dtype=torch.float64)
    expected = torch.autograd.grad((x @ tt_matrix_to_dense(cores).T + bias).mul(grad).sum(), [x, bias, *cores])
    for groups in tt_groupings(3):
        y = tt_matrix_apply(x, cores, bias=bias, plan=TTPlan(groups, direction, chunk))
        got = torch.autograd.grad(y.mul(grad).sum(), [x, bias, *cores])
        for g, e in zip(got, expected, strict=True):
            assert_close(g, e)


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4), (torch.bfloat16, 5e-2)], ids=["f64", "f32", "bf16"]
)
def test_plans_in_every_dtype(dtype: torch.dtype, tol: float) -> None:
    cores = tt_cores([8, 4, 4], [4, 4, 8], 3, dtype=torch.float64)
    weight = tt_matrix_to_dense(cores)
    x = odd_input(9, weight.shape[1])
    expected = x @ weight.T
    low = [c.to(dtype) for c in cores]
    scale = expected.abs().max()
    for plan in all_plans(3, chunks=(None, 4)):
        y = tt_matrix_apply(x.to(dtype), low, plan=plan)
        assert y.dtype == dtype
        assert float((y.double() - expected).abs().max() / scale) < tol


def test_merge_keeps_the_operator() -> None:
    cores = tt_cores([4, 3, 2, 2], [2, 5, 3, 2], 3)
    merged = [cores[0], tt_matrix_merge(cores[1:3]), cores[3]]
    assert merged[1].shape == (cores[1].shape[0], 6, 15, cores[2].shape[3])  # (r, o_2 o_3, i_2 i_3, r')
    assert_close(tt_matrix_to_dense(merged), tt_matrix_to_dense(cores))


def test_plan_validation() -> None:
    with pytest.raises(ValueError, match="direction"):
        TTPlan((2, 2), "up")
    with pytest.raises(ValueError, match="positive"):
        TTPlan((2, 0))
    with pytest.raises(ValueError, match="chunk"):
        TTPlan((4,), chunk=0)
    with pytest.raises(ValueError, match="sum to the number of cores"):
        tt_matrix_apply(torch.randn(2, 24, dtype=torch.float64), tt_cores([2, 5, 3], [4, 3, 2], 2), plan=TTPlan((2,)))


def test_plan_steps_and_macs_closed_form() -> None:
    out_modes, in_modes, ranks = [8, 8, 8, 4], [8, 4, 4, 4], [1, 2, 2, 2, 1]
    # Two halves, left to right: (O1 r, I1) x (I1, I2) per token, then (N O1, r I2) x (r I2, O2).
    steps = tt_plan_steps(out_modes, in_modes, ranks, TTPlan((2, 2), "ltr"), tokens=10)
    assert steps == [(10, 64 * 2, 32, 16), (10 * 64, 32, 2 * 16, 1)]
    assert tt_plan_macs(out_modes, in_modes, ranks, TTPlan((2, 2), "ltr")) == 2 * (64 * 512 + 16 * 2048)
    # Core by core needs the fewest multiply-adds; one group is the dense product.
    singles = tt_plan_macs(out_modes, in_modes, ranks, TTPlan((1, 1, 1, 1)))
    assert singles == tt_matrix_macs(out_modes, in_modes, ranks) == 73728
    assert tt_plan_macs(out_modes, in_modes, ranks, TTPlan((4,))) == 512 * 2048


def test_cost_model_picks_the_cheapest_factorised_plan_and_bounds_chunks() -> None:
    out_modes, in_modes, ranks = [8, 8, 8, 4], [8, 4, 4, 4], [1, 2, 2, 2, 1]
    candidates = tt_plan_candidates(4)
    assert len(candidates) == 2 * (2**3 - 1) and all(len(p.groups) >= 2 for p in candidates)  # W rebuilt: dense
    chosen = set()
    for tokens in (1, 32, 4096):
        for train in (False, True):
            plan, seconds = tt_matrix_plan(out_modes, in_modes, ranks, tokens, train=train)
            priced = {c: tt_plan_seconds(out_modes, in_modes, ranks, c, tokens, train=train) for c in candidates}
            assert seconds == min(s for s, _ in priced.values()) > 0  # the minimum over every candidate
            best = TTPlan(plan.groups, plan.direction)
            assert priced[best] == (seconds, plan.chunk)
            chosen.add((plan.groups, plan.direction))
    assert len(chosen) > 1  # the choice depends on the token count and the pass
    plan, _ = tt_matrix_plan(out_modes, in_modes, ranks, 16384)
    assert plan.chunk is not None
    largest = max(max(b * m * n, b * k * n) for b, m, k, n in tt_plan_steps(out_modes, in_modes, ranks, plan, 1))
    assert largest * 4 * plan.chunk <= CPU_COSTS.chunk_bytes
    assert tt_plan_chunk(out_modes, in_modes, ranks, plan, 16384, chunk_bytes=None) is None
    assert cost_model_for("cuda") is CUDA_COSTS and cost_model_for("cpu") is CPU_COSTS


def test_cost_model_orders_dense_and_small_steps() -> None:
    gemm = CPU_COSTS.gemm_seconds(4096 * 512 * 2048, weight_bytes=4 << 20, train=False, threads=2)
    # The same multiply-adds spread over many small batched matrices cost more than one large GEMM.
    batched = CPU_COSTS.steps_seconds([(4096 * 64, 16, 8, 2048 // 64 // 16 * 64)], train=False, threads=2)
    assert batched > CPU_COSTS.steps_seconds([(4096, 2048, 512, 1)], train=False, threads=2) > 0
    assert CPU_COSTS.gemm_seconds(1, weight_bytes=0, train=True) > CPU_COSTS.gemm_seconds(1, train=False)
    assert gemm > 0


# --- functional: Tucker as a rank-R product ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "out_modes, in_modes, ranks",
    [([8, 4], [4, 4], [2, 2, 2, 2]), ([4, 3], [5], [4, 1, 5]), ([6], [2, 3, 4], [3, 2, 3, 1])],
)
def test_tucker_factors_multiply_to_the_weight(out_modes, in_modes, ranks) -> None:
    core = torch.randn(*ranks, dtype=torch.float64)
    outs = [torch.randn(o, r, dtype=torch.float64) for o, r in zip(out_modes, ranks, strict=False)]
    ins = [torch.randn(i, s, dtype=torch.float64) for i, s in zip(in_modes, ranks[len(out_modes) :], strict=True)]
    weight = tucker_to_dense(core, outs + ins).reshape(math.prod(out_modes), math.prod(in_modes))
    left, right = tucker_linear_factors(core, outs, ins)
    rank = min(math.prod(ranks[: len(out_modes)]), math.prod(ranks[len(out_modes) :]))
    assert left.shape == (weight.shape[0], rank) and right.shape == (rank, weight.shape[1])
    assert_close(left @ right, weight)


# --- layers: both sides of every switch -----------------------------------------------------------------------------


def make_layer(method: str, dtype=torch.float64) -> nn.Module:
    if method == "tt":
        return TTLinear(24, 30, in_modes=[2, 4, 3], out_modes=[5, 3, 2], ranks=[1, 3, 2, 1], dtype=dtype)
    if method == "tucker":
        return TuckerLinear(24, 30, in_modes=[4, 6], out_modes=[5, 6], ranks=[2, 3, 3, 2], dtype=dtype)
    if method == "svd":
        return LowRankLinear(24, 30, rank=4, dtype=dtype)
    if method == "prune":
        return PrunedLinear(24, 30, dtype=dtype).set_mask_(torch.rand(30, 24) > 0.9)
    layer = SparseVDLinear(24, 30, dtype=dtype)
    with torch.no_grad():
        layer.log_sigma2.uniform_(-12.0, 4.0)
    return layer


FACTORIZED = ["tt", "tucker", "svd"]
ALL = [*FACTORIZED, "prune", "svd-o"]


def reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return x @ layer.to_dense().T + (layer.bias if layer.bias is not None else 0)


def reference_train(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x W^T + b`` with ``W = to_dense()`` kept in the graph, so autograd gives the reference gradients."""
    return x @ layer.to_dense().T + (layer.bias if layer.bias is not None else 0)


@pytest.mark.parametrize("factorized", [True, False], ids=["factorized", "dense"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("method", FACTORIZED)
def test_both_sides_of_the_switch(monkeypatch, method: str, mode: str, factorized: bool) -> None:
    layer = make_layer(method).train(mode == "train")
    calls = force_path(monkeypatch, layer, factorized)
    for tokens in (1, 7, 300):  # 300 tokens: TT plans chunk at this size only with tiny budgets; still valid
        x = odd_input(tokens, 24)
        if mode == "eval":
            with torch.no_grad():
                assert_close(layer(x), reference(layer, x))
                assert_close(layer(x), reference(layer, x))  # served from the cache
        else:
            x.requires_grad_()
            y = layer(x)
            assert_close(y, reference(layer, x))
            params = [p for p in layer.parameters()]
            grads = torch.autograd.grad(y.sum(), [x, *params])
            expected = torch.autograd.grad(reference_train(layer, x).sum(), [x, *params])
            for g, e in zip(grads, expected, strict=True):
                assert_close(g, e)
    assert calls, "the forward no longer consults the hook force_path patches"


@pytest.mark.parametrize("method", ["tt", "tucker", "svd"])
def test_the_cost_model_takes_both_paths_on_real_shapes(method: str) -> None:
    """At 512 -> 2048 the factorised path wins at moderate ranks; at the highest ranks dense wins for many
    tokens: both sides of the switch are reachable without patching."""
    cheap = {"tt": TTLinear(512, 2048, ranks=2), "tucker": TuckerLinear(512, 2048, ranks=2)}
    cheap["svd"] = LowRankLinear(512, 2048, rank=16)
    costly = {"tt": TTLinear(512, 2048, ranks=64), "tucker": TuckerLinear(512, 2048, ranks=32)}
    costly["svd"] = LowRankLinear(512, 2048, rank=512)
    assert cheap[method].use_factorized(4096, train=False)
    assert cheap[method].use_factorized(4096, train=True)
    assert not costly[method].use_factorized(4096, train=False)
    x = torch.randn(4096, 512)
    for layer in (cheap[method], costly[method]):
        layer.eval()
        with torch.no_grad():
            y = layer(x)
            assert_close(y, reference(layer, x), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4), (torch.bfloat16, 6e-2)], ids=["f64", "f32", "bf16"]
)
@pytest.mark.parametrize("method", ALL)
def test_layers_in_every_dtype(method: str, dtype: torch.dtype, tol: float) -> None:
    layer = make_layer(method, dtype=torch.float64).eval()
    x = odd_input(33, 24)
    expected = reference(layer, x)
    low = copy.deepcopy(layer).to(dtype)
    with torch.no_grad():
        for _ in range(2):
            y = low(x.to(dtype))
            assert y.dtype == dtype
            assert float((y.double() - expected).abs().max() / expected.abs().max()) < tol


def sparse_layer(method: str) -> nn.Module:
    """A pruned / Sparse VD layer sparse and large enough for the CSR kernels (97 % of its weights zero)."""
    torch.manual_seed(0)
    if method == "prune-csr":
        return PrunedLinear.from_linear(nn.Linear(512, 256), sparsity=0.97)
    layer = SparseVDLinear.from_linear(nn.Linear(512, 256))
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.where(torch.rand_like(layer.theta) < 0.97, 5.0, -12.0))
    return layer


@pytest.mark.parametrize("method", [*ALL, "prune-csr", "svd-o-csr"])
def test_layers_under_autocast(method: str) -> None:
    """bf16 autocast (how the trainer runs on CUDA, and on CPU with --precision bf16), eval and train: outputs in
    bf16 as nn.Linear's; TT at 20000 tokens takes its chunked plan; sparse layers leave their CSR kernels (which
    autocast does not cover) for the dense product."""
    if method.endswith("-csr"):
        layer = sparse_layer(method)
    else:
        layer = TTLinear(512, 2048, ranks=2) if method == "tt" else make_layer(method, dtype=torch.float32)
    x = torch.randn(20000 if method == "tt" else 300, layer.in_features)
    expected = reference(layer.eval(), x).double()
    if method == "tt":
        assert layer.forward_path(x.shape[0], train=False).endswith("x512")  # chunked
    if method.endswith("-csr"):
        assert layer.forward_path(x.shape[0]) == "csr"  # without autocast
    for mode in ("eval", "train"):
        if mode == "train" and method.startswith("svd-o"):
            continue  # training samples noise
        layer.train(mode == "train")
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(mode == "train"):
            y = layer(x)
        assert y.dtype == torch.bfloat16, mode
        assert float((y.detach().double() - expected).norm() / expected.norm()) < 2e-2, mode
        if mode == "train":  # the backward runs outside autocast, through the custom TT autograd Function too
            y.float().pow(2).mean().backward()
            assert all(p.grad is not None and p.grad.isfinite().all() for p in layer.parameters() if p.requires_grad)


# --- the eval-mode cache -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [*ALL, "prune-csr", "embedding-svd", "embedding-tt"])
def test_a_cache_filled_under_autocast_serves_forwards_without_it(method: str) -> None:
    """The eval cache holds the parameters' dtype: a forward under bf16 autocast, then one without, gives float32
    outputs equal to the first plain forward (and the autocast one still computes in bf16)."""
    if method.startswith("embedding"):
        layer = (LowRankEmbedding(59, 24, rank=3) if method.endswith("svd") else TTEmbedding(59, 24, ranks=3)).eval()
        x = torch.randint(0, 59, (7, 5))
    else:
        layer = sparse_layer(method) if method.endswith("-csr") else make_layer(method, dtype=torch.float32)
        layer.eval()
        x = torch.randn(300, layer.in_features)
    for tokens in (x[:1], x):
        with torch.no_grad():
            expected = layer(tokens)
            clear_caches(layer)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = layer(tokens)
            y = layer(tokens)
        assert y.dtype == torch.float32 and torch.equal(y, expected)
        if not method.startswith("embedding"):
            assert low.dtype == torch.bfloat16


@pytest.mark.parametrize("factorized", [True, False], ids=["factorized", "dense"])
@pytest.mark.parametrize("method", FACTORIZED)
def test_cache_is_used_in_eval_and_invalidated_by_an_optimiser_step(monkeypatch, method: str, factorized) -> None:
    layer = make_layer(method).eval()
    force_path(monkeypatch, layer, factorized)
    x = torch.randn(5, 24, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
    assert cache_nbytes(layer) > 0 or (method == "svd" and factorized)  # two thin GEMMs need no cache
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    layer.train()
    layer(x).pow(2).sum().backward()
    assert cache_nbytes(layer) == 0  # a training forward frees the cache
    layer.eval()
    with torch.no_grad():
        before = layer(x)
    optimizer.step()
    with torch.no_grad():
        after = layer(x)
    assert not torch.allclose(before, after)
    assert_close(after, reference(layer, x))


@pytest.mark.parametrize("method", ALL)
def test_cache_never_serves_stale_values(method: str) -> None:
    layer = make_layer(method).eval()
    other = make_layer(method).eval()
    x = torch.randn(5, 24, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        layer.load_state_dict(other.state_dict())  # in-place copies bump the version counters
        assert_close(layer(x), reference(other, x))
        for p in layer.parameters():
            p.mul_(0.5)
        assert_close(layer(x), reference(layer, x))
    converted = layer.to(torch.float32)  # new tensors
    with torch.no_grad():
        assert_close(converted(x.float()), reference(converted, x.float()))


def test_cache_is_not_used_when_gradients_are_needed() -> None:
    layer = make_layer("tt").eval()
    x = torch.randn(5, 24, dtype=torch.float64)
    y = layer(x)
    assert y.grad_fn is not None and cache_nbytes(layer) == 0
    y.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize("method", ["tt", "tucker", "svd", "svd-o"])
def test_weight_property_serves_the_eval_cache_and_stays_fresh(method: str) -> None:
    layer = make_layer(method).eval()
    with torch.no_grad():
        first = layer.weight
        assert layer.weight is first and cache_nbytes(layer) > 0  # built once, shared with the forward
        assert_close(first, layer.to_dense(), atol=0, rtol=0)
        factor = next(p for name, p in layer.named_parameters() if name != "bias")
        factor.mul_(0.5)  # an in-place change: the next read rebuilds
        assert_close(layer.weight, layer.to_dense(), atol=0, rtol=0)
        assert not torch.equal(layer.weight, first)
        layer.train()
        assert layer.weight is not layer.weight  # training mode: rebuilt at every read, nothing cached
    weight = layer.eval().weight  # autograd on: a fresh W in the graph of the factors
    assert weight.grad_fn is not None and weight is not layer.weight


@pytest.mark.parametrize("table", [LowRankEmbedding(59, 12, rank=3), TTEmbedding(59, 12, ranks=3)], ids=["svd", "tt"])
def test_embedding_weight_is_cached_in_eval_mode(table: nn.Module) -> None:
    table.eval()
    with torch.no_grad():
        first = table.weight
        assert first.shape == (59, 12) and table.weight.data_ptr() == first.data_ptr()
        assert_close(first, table.to_dense(), atol=0, rtol=0)
    assert table.weight.grad_fn is not None


@pytest.mark.parametrize("method", ["tt", "tucker", "svd", "prune", "svd-o"])
def test_pytorch_encoder_fast_path_uses_the_cached_weights(method: str) -> None:
    """``nn.TransformerEncoderLayer`` in eval mode multiplies with its linears' ``.weight`` in a fused kernel,
    bypassing their forward: the compressed layers hand it their cached ``W``, and it computes the same output."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoderLayer(24, 4, 30, dropout=0.0, batch_first=True)
    encoder.linear1 = make_layer(method, torch.float32)  # 24 -> 30
    encoder.linear2 = type(encoder.linear1).from_linear(nn.Linear(30, 24), **_options(method))
    encoder.eval()
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        fused = encoder(x)
        assert cache_nbytes(encoder) > 0 or method == "prune"
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            plain = encoder(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def _options(method: str) -> dict:
    return {"tt": {"ranks": 2}, "tucker": {"ranks": 2}, "svd": {"rank": 3}, "prune": {"sparsity": 0.9}}.get(method, {})


@pytest.mark.parametrize("method", ALL)
def test_caches_built_in_inference_mode_serve_later_training(method: str) -> None:
    layer = make_layer(method).eval()
    x = torch.randn(4, 24, dtype=torch.float64)
    with torch.inference_mode():
        layer(x)
    layer.train()
    layer(x).sum().backward()  # a cached inference tensor here would fail: "cannot be saved for backward"
    for param in layer.parameters():  # frozen parameters, input gradients only, after an inference-mode call
        param.requires_grad_(False)
    layer.eval()
    with torch.inference_mode():
        layer(x)
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad is not None


def test_threshold_change_invalidates_the_sparse_vd_cache() -> None:
    layer = make_layer("svd-o").eval()
    x = torch.randn(5, 24, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        layer.threshold = -2.0
        assert_close(layer(x), reference(layer, x))


def test_copies_and_clear_caches() -> None:
    layer = make_layer("tucker").eval()
    with torch.no_grad():
        layer(torch.randn(3, 24, dtype=torch.float64))
    assert cache_nbytes(layer) > 0
    assert cache_nbytes(copy.deepcopy(layer)) == 0
    model = nn.Sequential(layer)
    clear_caches(model)
    assert cache_nbytes(model) == 0
    cache = EvalCache()
    t = torch.ones(3)
    built = []
    cache.get("a", [t], lambda: built.append(1) or t * 2)
    cache.get("a", [t], lambda: built.append(1) or t * 2)
    t.add_(1)
    cache.get("a", [t], lambda: built.append(1) or t * 2)
    assert built == [1, 1]


# --- sparse kernels --------------------------------------------------------------------------------------------------


def test_csr_linear_matches_dense() -> None:
    weight = torch.randn(30, 24, dtype=torch.float64) * (torch.rand(30, 24) > 0.9)
    bias = torch.randn(30, dtype=torch.float64)
    for tokens in (0, 1, 7, 600):  # 600: several CSR blocks
        x = odd_input(tokens, 24)
        assert_close(csr_linear(x, to_csr(weight), bias), x @ weight.T + bias)
        assert_close(csr_linear(x, to_csr(weight), None), x @ weight.T)


@pytest.mark.parametrize("method", ["prune", "svd-o"])
def test_sparse_layers_use_csr_at_high_sparsity(method: str) -> None:
    if method == "prune":
        layer = PrunedLinear(512, 2048).set_mask_(torch.rand(2048, 512) > 0.98).eval()
    else:
        layer = SparseVDLinear(512, 2048).eval()
        with torch.no_grad():
            layer.log_sigma2.copy_(
                torch.log(layer.theta**2 + 1e-8) + torch.where(torch.rand(2048, 512) < 0.98, 8.0, -8.0)
            )
    assert layer.forward_path(32) == "csr"
    assert layer.forward_path(32, train=True) == ("csr" if method == "prune" else "sampled")
    x = torch.randn(3, 11, 512)
    with torch.no_grad():
        assert_close(layer(x), reference(layer, x), atol=1e-4, rtol=1e-4)
    dense = PrunedLinear(512, 2048).eval()  # no pruning: the dense kernel wins
    assert dense.forward_path(32) == "dense"


# the weight gradient is sampled at 98 % sparsity, and at 90 % from 9 tokens up; dense times the mask below that
@pytest.mark.parametrize(("tokens", "sparsity"), [(1, 0.98), (5, 0.98), (300, 0.98), (1, 0.9), (8, 0.9), (9, 0.9)])
def test_pruned_training_through_csr_kernels_matches_the_masked_dense_gradients(tokens: int, sparsity: float) -> None:
    layer = PrunedLinear(512, 2048).set_mask_(torch.rand(2048, 512) > sparsity)
    assert layer.forward_path(tokens, train=True) == "csr"
    with torch.no_grad():
        layer.weight.add_(torch.randn(2048, 512) * 0.01)  # pruned entries too: the kernels must ignore them
    x = odd_input(tokens, 512, dtype=torch.float32).requires_grad_()
    grad = torch.randn(tokens, 2048)
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    expected = torch.nn.functional.linear(x_ref, weight * layer.mask, bias)
    expected.backward(grad)
    y = layer(x)
    y.backward(grad)
    assert_close(y, expected, atol=1e-4, rtol=1e-4)
    assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)
    assert_close(layer.weight.grad, weight.grad, atol=1e-4, rtol=1e-4)
    assert_close(layer.bias.grad, bias.grad)
    assert not layer.weight.grad[~layer.mask].any()


def test_pruned_mask_as_weight_follows_the_mask_and_the_weight_dtype() -> None:
    layer = PrunedLinear(16, 8).set_mask_(torch.rand(8, 16) > 0.5)
    first = layer.mask_as_weight()
    assert first.dtype == torch.float32 and torch.equal(first.bool(), layer.mask)
    assert layer.mask_as_weight() is first  # cached while the mask is unchanged
    layer.set_mask_(torch.rand(8, 16) > 0.5)
    assert torch.equal(layer.mask_as_weight().bool(), layer.mask)
    layer.double()
    assert layer.mask_as_weight().dtype == torch.float64
    assert_close(layer.to_dense(), layer.weight * layer.mask)


def test_sparse_kernels_are_skipped_for_unsupported_dtypes() -> None:
    layer = PrunedLinear(512, 2048, dtype=torch.bfloat16).set_mask_(torch.rand(2048, 512) > 0.98).eval()
    assert not layer.use_sparse(32)
    x = torch.randn(4, 512, dtype=torch.bfloat16)
    with torch.no_grad():
        assert_close(layer(x), reference(layer, x), atol=1e-3, rtol=2e-2)


# --- torch.compile ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ALL)
def test_torch_compile_fast_paths(method: str) -> None:
    """fullgraph tracing of the planned forwards, eval (against ``to_dense()``) and train (finite gradients). Under
    compile a TT layer decides per bucket of token counts and never chunks (4096 tokens chunk in eager mode)."""
    layer = TTLinear(512, 2048, ranks=2) if method == "tt" else make_layer(method, dtype=torch.float32)
    features = layer.in_features
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    layer.eval()
    x = torch.randn(4096 if method == "tt" else 40, features)
    with torch.no_grad():
        assert_close(compiled(x), reference(layer, x), atol=2e-4, rtol=1e-4)
    layer.train()
    if method == "svd-o":
        return  # training mode samples noise
    compiled(x).sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in layer.parameters())


# --- torch.func ------------------------------------------------------------------------------------------------------


def func_layer(method: str) -> nn.Module:
    """A layer whose own forward takes its fast path at 300 tokens: factorised TT / Tucker / SVD at the study's
    shape, CSR kernels for the 97 %-sparse layers."""
    torch.manual_seed(0)
    if method == "sparse-csr":
        return SparseLinear.from_linear(nn.Linear(512, 256), sparsity=0.97)
    if method.endswith("-csr"):
        return sparse_layer(method)
    return {"tt": TTLinear(512, 2048, ranks=2), "tucker": TuckerLinear(512, 2048, ranks=2)}.get(
        method, LowRankLinear(512, 2048, rank=16)
    )


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("method", [*FACTORIZED, "prune-csr", "sparse-csr", "svd-o-csr"])
def test_torch_func_grad_and_per_sample_gradients(method: str, mode: str) -> None:
    """``torch.func.grad`` and ``vmap`` (per-sample gradients) through ``functional_call`` give autograd's
    gradients: under a transform the layers leave the CSR kernels (wrapped tensors have no strides) and the eval
    cache (a cached weight would not depend on the wrapped parameters), and their autograd Functions run."""
    if method == "svd-o-csr" and mode == "train":
        pytest.skip("Sparse VD training samples noise")
    layer = func_layer(method).train(mode == "train")
    fast = "csr" if method.endswith("-csr") else None
    if fast:
        assert layer.forward_path(300, train=mode == "train") in ("csr", "sampled")
    else:
        assert layer.use_factorized(300, train=mode == "train")
    params = {name: p.detach() for name, p in layer.named_parameters()}

    def loss(params: dict, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, params, (x,)).pow(2).sum()

    x = torch.randn(300, layer.in_features)
    assert_same_grads(layer, x, torch.func.grad(loss)(params, x))
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x[:3])
    for i in range(3):
        assert_same_grads(layer, x[i : i + 1], {name: g[i] for name, g in per_sample.items()})
    if mode == "train":  # the Jacobian of one output vector in its input is the represented weight
        jacobian = torch.func.jacrev(lambda v: torch.func.functional_call(layer, params, (v,)))(x[0])
        assert_close(jacobian, layer.to_dense().detach(), rtol=1e-4, atol=1e-5)


def assert_same_grads(layer: nn.Module, x: torch.Tensor, grads: dict[str, torch.Tensor]) -> None:
    """``grads`` are autograd's gradients of ``layer(x).pow(2).sum()`` (zero where autograd gives none: Sparse VD's
    ``log sigma^2`` in eval mode)."""
    layer.zero_grad(set_to_none=True)
    layer(x).pow(2).sum().backward()
    for name, p in layer.named_parameters():
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        assert_close(grads[name], expected, rtol=1e-4, atol=1e-3 * float(expected.abs().max()))


# --- CUDA (run where a GPU is present; skipped elsewhere) -------------------------------------------------------------

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def relative_error(y: torch.Tensor, expected: torch.Tensor) -> float:
    return float((y.double().cpu() - expected).norm() / expected.norm())


@CUDA
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.bfloat16, 4e-2)], ids=["f32", "bf16"])
@pytest.mark.parametrize("factorized", [True, False, None], ids=["factorized", "dense", "cost-model"])
@pytest.mark.parametrize("method", ALL)
def test_every_path_on_cuda_matches_the_float64_reference(monkeypatch, method, factorized, dtype, tol) -> None:
    """Eval (twice: the cache) and training (outputs and every gradient) on the GPU, against float64 on the CPU.
    ``None`` leaves the switch to the CUDA cost model; the sparse layers ignore ``factorized``."""
    if factorized is not None and method not in FACTORIZED:
        pytest.skip("the switch is the factorised layers'")
    cpu = make_layer(method)
    layer = copy.deepcopy(cpu).to("cuda", dtype)
    if factorized is not None:
        force_path(monkeypatch, layer, factorized)
    for tokens in (1, 7, 300):
        x = odd_input(tokens, 24)
        expected = reference(cpu.eval(), x)
        layer.eval()
        with torch.no_grad():
            for _ in range(2):
                y = layer(x.to("cuda", dtype))
                assert y.dtype == dtype and y.is_cuda
                assert relative_error(y, expected) < tol
        if method == "svd-o":
            continue  # training samples noise
        layer.train()
        cpu.train()
        x_gpu = x.to("cuda", dtype).requires_grad_()
        grads = torch.autograd.grad(layer(x_gpu).sum(), [x_gpu, *layer.parameters()], allow_unused=True)
        x_ref = x.clone().requires_grad_()
        params = list(cpu.parameters())
        expected_grads = torch.autograd.grad(reference_train(cpu, x_ref).sum(), [x_ref, *params], allow_unused=True)
        for got, want in zip(grads, expected_grads, strict=True):
            if want is None or not want.any():
                continue
            assert relative_error(got, want) < tol


@CUDA
@pytest.mark.slow
@pytest.mark.parametrize("method", ALL)
def test_torch_compile_inductor_on_cuda(method: str) -> None:
    """The real compiler (inductor, Triton kernels) on the GPU, eval and train, against ``to_dense()``."""
    layer = (TTLinear(512, 2048, ranks=2) if method == "tt" else make_layer(method, dtype=torch.float32)).cuda()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(4096 if method == "tt" else 40, layer.in_features, device="cuda")
    layer.eval()
    with torch.no_grad():
        assert_close(compiled(x), reference(layer, x), atol=2e-3, rtol=2e-3)
    if method == "svd-o":
        return
    layer.train()
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)
