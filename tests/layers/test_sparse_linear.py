"""SparseLinear: the compact form of a pruned layer, checked against PrunedLinear and against its dense weight on
both of its paths (CSR kernels and the dense weight built from the values)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from compressed_transformer.layers import PrunedLinear, SparseLinear, cache_nbytes

F64 = torch.float64


def pair(in_features=24, out_features=40, sparsity=0.8, bias=True, dtype=F64) -> tuple[PrunedLinear, SparseLinear]:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    pruned = PrunedLinear.from_linear(linear, sparsity=sparsity)
    return pruned, SparseLinear.from_pruned(pruned)


def force(monkeypatch: pytest.MonkeyPatch, layer: SparseLinear, sparse: bool) -> list[int]:
    calls: list[int] = []

    def decide(tokens, train, values) -> bool:
        calls.append(tokens)
        return sparse

    monkeypatch.setattr(layer, "_use_sparse", decide)
    return calls


def grads(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().requires_grad_()
    params = [p for p in layer.parameters()]
    y = layer(x)
    got = torch.autograd.grad(y, [x, *params], upstream)
    return (y.detach(), *got)


@pytest.mark.parametrize("sparse", [True, False], ids=["csr", "dense"])
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 3), (300,)])
def test_same_outputs_and_gradients_as_the_pruned_layer(monkeypatch, sparse: bool, lead) -> None:
    pruned, layer = pair()
    calls = force(monkeypatch, layer, sparse)
    x, upstream = torch.randn(*lead, 24, dtype=F64), torch.randn(*lead, 40, dtype=F64)
    y, gx, g_values, g_bias = grads(layer, x, upstream)
    y_ref, gx_ref, g_weight, g_bias_ref = grads(pruned, x, upstream)
    assert calls, "the forward no longer asks _use_sparse"
    assert_close(y, y_ref)
    assert_close(gx, gx_ref)
    assert_close(g_values, g_weight.reshape(-1)[pruned.mask.reshape(-1)])  # kept entries, CSR (row-major) order
    assert_close(g_bias, g_bias_ref)
    layer.eval()  # inference, with and without a cache
    with torch.no_grad():
        assert_close(layer(x), x @ pruned.to_dense().T + pruned.bias)
        assert_close(layer(x), x @ pruned.to_dense().T + pruned.bias)


@pytest.mark.parametrize("sparse", [True, False], ids=["csr", "dense"])
def test_gradcheck(monkeypatch, sparse: bool) -> None:
    _, layer = pair(6, 5, sparsity=0.5)
    force(monkeypatch, layer, sparse)
    x = torch.randn(3, 6, dtype=F64, requires_grad=True)
    values = layer.values.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()

    def run(x, values, bias):
        return torch.func.functional_call(layer, {"values": values, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(run, (x, values, bias))


def test_non_contiguous_input_and_no_bias(monkeypatch) -> None:
    _, layer = pair(bias=False)
    assert layer.bias is None
    x = torch.randn(24, 9, dtype=F64).T  # (9, 24), transposed view
    for sparse in (True, False):
        force(monkeypatch, layer, sparse)
        assert_close(layer(x), x @ layer.to_dense().T)


def test_from_linear_prunes_by_magnitude_as_pruned_linear_does() -> None:
    linear = nn.Linear(30, 20)
    for kwargs in ({"sparsity": 0.9}, {"threshold": 0.1}):
        layer, pruned = SparseLinear.from_linear(linear, **kwargs), PrunedLinear.from_linear(linear, **kwargs)
        assert_close(layer.to_dense(), pruned.to_dense())
        assert_close(layer.bias, linear.bias)
        assert torch.equal(layer.mask, pruned.mask)
    assert SparseLinear.from_linear(linear, sparsity=0.9).nnz == 60  # round(0.1 * 600) kept


def test_to_pruned_round_trip_and_sizes() -> None:
    pruned, layer = pair(sparsity=0.9)
    back = layer.to_pruned()
    assert torch.equal(back.mask, pruned.mask)
    assert_close(back.to_dense(), pruned.to_dense())
    assert layer.nnz == int(pruned.mask.sum())
    assert layer.sparsity == pytest.approx(pruned.sparsity)
    assert layer.num_stored_params() == pruned.num_stored_params()
    # what it holds: the kept weights and the bias, nothing weight-sized
    assert sum(p.numel() for p in layer.parameters()) == layer.nnz + 40
    assert sum(p.numel() for p in pruned.parameters()) == 24 * 40 + 40


def test_optimiser_state_shrinks_and_pruned_entries_stay_zero() -> None:
    _, layer = pair(sparsity=0.9)
    before = layer.to_dense().detach().clone()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    layer(torch.randn(8, 24, dtype=F64)).square().sum().backward()
    optimizer.step()
    state = optimizer.state[layer.values]
    assert state["exp_avg"].shape == (layer.nnz,)
    after = layer.to_dense().detach()
    assert torch.equal(after[~layer.mask], before[~layer.mask])  # zeros stay zeros
    assert not torch.equal(after[layer.mask], before[layer.mask])


@pytest.mark.parametrize("sparse", [True, False], ids=["csr", "dense"])
def test_eval_cache_follows_in_place_updates(monkeypatch, sparse: bool) -> None:
    _, layer = pair()
    force(monkeypatch, layer, sparse)
    layer.eval()
    x = torch.randn(4, 24, dtype=F64)
    with torch.no_grad():
        first = layer(x)
        layer.values.mul_(2.0)
        assert_close(layer(x), 2.0 * (first - layer.bias) + layer.bias)
        assert layer.weight is layer.weight  # the cached copy while nothing changes


def test_state_dict_loads_into_a_default_layer_and_keeps_the_structure() -> None:
    pruned, layer = pair(sparsity=0.7)
    fresh = SparseLinear(24, 40, dtype=F64)  # all 960 positions
    fresh.load_state_dict(layer.state_dict())
    assert fresh.nnz == layer.nnz
    assert torch.equal(fresh.mask, pruned.mask)
    x = torch.randn(5, 24, dtype=F64)
    assert_close(fresh(x), layer(x))
    assert set(layer.state_dict()) == {"values", "crow_indices", "col_indices", "bias"}


def test_a_new_layer_has_linear_scale_and_random_positions() -> None:
    torch.manual_seed(0)
    layer = SparseLinear(256, 128, nnz=3000)
    assert layer.nnz == 3000
    assert float(layer.values.detach().abs().max()) <= 1 / 16
    assert int(layer.mask.sum()) == 3000
    rows = layer.mask.sum(1)
    assert int((rows > 0).sum()) > 100  # spread over the rows, not the first ones
    assert SparseLinear(4, 3).nnz == 12


@pytest.mark.parametrize("nnz", [-1, 13, 2.5])
def test_rejects_a_bad_number_of_entries(nnz) -> None:
    with pytest.raises(ValueError, match="nnz must be an int in"):
        SparseLinear(4, 3, nnz=nnz)


def test_rejects_bad_sources() -> None:
    with pytest.raises(TypeError, match="expects a PrunedLinear"):
        SparseLinear.from_pruned(nn.Linear(3, 4))
    with pytest.raises(ValueError, match=r"expects an nn\.Linear"):
        SparseLinear.from_linear(PrunedLinear(3, 4), sparsity=0.5)
    with pytest.raises(ValueError, match="exactly one of"):
        SparseLinear.from_linear(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="exactly one of"):
        SparseLinear.from_linear(nn.Linear(3, 4), sparsity=0.5, threshold=0.1)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s: s.update(crow_indices=s["crow_indices"][:-1]), "crow_indices must have"),
        (lambda s: s.update(values=s["values"][:-1]), "same length"),
        (lambda s: s["crow_indices"].__setitem__(-1, 5), "must rise from 0"),
        (lambda s: s["col_indices"].__setitem__(0, 99), r"must lie in \[0, 24\)"),
        (lambda s: s["col_indices"].__setitem__(slice(0, 2), s["col_indices"][:2].flip(0)), "sorted within each row"),
    ],
)
def test_loading_rejects_an_inconsistent_structure(change, match: str) -> None:
    _, layer = pair(sparsity=0.5)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    change(state)
    with pytest.raises(ValueError, match=match):
        SparseLinear(24, 40, dtype=F64).load_state_dict(state)


def test_bf16_runs_the_dense_path() -> None:
    pruned, layer = pair(dtype=torch.float32)
    layer = layer.to(torch.bfloat16)
    assert layer.forward_path(64, train=True) == "dense"
    x = torch.randn(64, 24)
    assert_close(layer(x.bfloat16()).float(), pruned(x), rtol=0.05, atol=0.05)


def test_torch_compile() -> None:
    _, layer = pair(dtype=torch.float32)
    x = torch.randn(6, 24)
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    assert_close(y, x @ layer.to_dense().T + layer.bias)
    y.sum().backward()
    assert layer.values.grad is not None and torch.isfinite(layer.values.grad).all()
    layer.eval()
    with torch.no_grad():
        assert_close(compiled(x), x @ layer.to_dense().T + layer.bias)


def test_memory_held_is_proportional_to_the_stored_weights(monkeypatch) -> None:
    """Inference through CSR kernels caches nothing (the CSR matrix is a view of ``values``); training on more than
    one token adds the transpose's indices, 12 bytes per stored weight (int32 row, int64 permutation)."""
    _, layer = pair(64, 128, sparsity=0.9, dtype=torch.float32)
    force(monkeypatch, layer, True)
    index_bytes = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert index_bytes == 4 * (layer.nnz + 129)  # int32 CSR indices
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(5, 64))
    assert cache_nbytes(layer) == 0
    layer.train()
    layer(torch.randn(5, 64)).sum().backward()
    assert cache_nbytes(layer) == 12 * layer.nnz + 4 * 65


@pytest.mark.parametrize("sparse", [True, False], ids=["csr", "dense"])
def test_an_empty_layer_is_its_bias(monkeypatch, sparse: bool) -> None:
    layer = SparseLinear(8, 6, nnz=0, dtype=F64)
    force(monkeypatch, layer, sparse)
    for tokens in (1, 3):
        x = torch.randn(tokens, 8, dtype=F64, requires_grad=True)
        y = layer(x)
        assert_close(y, layer.bias.expand(tokens, 6))
        y.sum().backward()
        assert layer.values.grad.shape == (0,) and float(x.grad.abs().sum()) == 0.0
