"""``compress_``: swapping by name, Transformer FFNs, ratio targets, filters, the report, and every bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from compressed_transformer.compress import (
    CompressionReport,
    compress_,
    compress_embeddings_,
    pruned_to_sparse_,
    select_linears,
    sparse_vd_to_pruned_,
)
from compressed_transformer.functional.svd import truncated_svd
from compressed_transformer.layers import (
    METHODS,
    LowRankEmbedding,
    LowRankLinear,
    PrunedLinear,
    SparseLinear,
    SparseVDLinear,
)
from compressed_transformer.size import compression_ratio, dense_params, stored_params

ALL = list(METHODS)
RATIO_METHODS = ["prune", "sparse", "svd", "tt", "tucker"]
OPTIONS = {
    "tt": {"ranks": 2},
    "tucker": {"ranks": 2},
    "svd": {"rank": 3},
    "prune": {"sparsity": 0.5},
    "sparse": {"sparsity": 0.5},
    "svd-o": {},
}
SIZE_OPTIONS = [
    ("tt", {"ranks": 2}),
    ("tt", {"eps": 0.5}),
    ("tucker", {"ranks": 2}),
    ("svd", {"rank": 2}),
    ("svd", {"energy": 0.5}),
    ("prune", {"sparsity": 0.5}),
    ("prune", {"threshold": 0.1}),
    ("prune", {"global_sparsity": 0.5}),
]


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def wide_mlp() -> nn.Sequential:
    """Large enough for rank-1 factorisations to fit a budget of 1/10."""
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def encoder_layer() -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)


def linears_of(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules() if type(module) is nn.Linear}


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    weight, approx = weight.detach().double(), approx.detach().double()
    return float(torch.linalg.matrix_norm(weight - approx) / torch.linalg.matrix_norm(weight))


def dense_reference(original: nn.Module, compressed: nn.Module, names: list[str]) -> nn.Module:
    """``original`` with the named linears' weights replaced by what the compressed layers represent (at eval)."""
    reference = copy.deepcopy(original)
    with torch.no_grad():
        for name in names:
            reference.get_submodule(name).weight.copy_(compressed.get_submodule(name).to_dense())
    return reference


# --- whole models ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL)
def test_compress_sequential(method: str) -> None:
    model = mlp()
    original = copy.deepcopy(model)
    weights = {name: m.weight.detach().clone() for name, m in linears_of(model).items()}
    report = compress_(model, method, **OPTIONS[method])
    assert isinstance(report, CompressionReport) and report.method == method
    assert [row.name for row in report.rows] == ["0", "2", "4"]
    assert not linears_of(model)
    for row in report.rows:
        layer = model.get_submodule(row.name)
        assert isinstance(layer, METHODS[method])
        assert (row.in_features, row.out_features) == (layer.in_features, layer.out_features)
        assert row.params_before == layer.in_features * layer.out_features + layer.out_features
        assert row.params_after == layer.num_stored_params()
        assert row.rel_error == pytest.approx(relative_error(weights[row.name], layer.to_dense()), abs=1e-9)
        assert row.ratio == pytest.approx(row.params_before / row.params_after)
    assert report.params_before == (16 * 32 + 32) + (32 * 16 + 16) + (16 * 4 + 4)
    assert report.params_after == sum(model.get_submodule(r.name).num_stored_params() for r in report.rows)
    assert report.params_after == stored_params(model)  # the ReLUs store nothing
    assert report.ratio == pytest.approx(compression_ratio(model))
    model.eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert_close(model(x), dense_reference(original, model, ["0", "2", "4"])(x))


def test_report_errors_match_independent_computations() -> None:
    model = mlp()
    weights = {name: m.weight.detach().double().clone() for name, m in linears_of(model).items()}
    report = compress_(model, "svd", rank=3)
    for row in report.rows:
        s = torch.linalg.svdvals(weights[row.name])
        assert row.rel_error == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-6)  # Eckart-Young tail
    model = mlp()
    weights = {name: m.weight.detach().double().clone() for name, m in linears_of(model).items()}
    report = compress_(model, "prune", sparsity=0.75)
    for row in report.rows:
        mask = model.get_submodule(row.name).mask
        assert row.rel_error == pytest.approx(float(weights[row.name][~mask].norm() / weights[row.name].norm()))
        assert row.options == {"sparsity": pytest.approx(0.75, abs=1e-3)}


def test_report_renders_and_serialises() -> None:
    report = compress_(mlp(), "tt", ranks=2)
    text = str(report)
    assert text.count("\n") == len(report.rows) + 2
    assert "| **total** | tt |" in text and "16→32" in text
    data = report.to_dict()
    assert data["params_before"] == report.params_before and data["ratio"] == pytest.approx(report.ratio)
    assert [layer["name"] for layer in data["layers"]] == ["0", "2", "4"]
    assert data["layers"][0]["options"]["ranks"] == report.rows[0].options["ranks"]


@pytest.mark.parametrize("method", ALL)
def test_compress_transformer_encoder_ffn(method: str) -> None:
    layer = encoder_layer()
    original = copy.deepcopy(layer)
    out_proj = layer.self_attn.out_proj
    report = compress_(layer, method, **OPTIONS[method])  # every nn.Linear: out_proj is a subclass, left alone
    assert [row.name for row in report.rows] == ["linear1", "linear2"]
    assert isinstance(layer.linear1, METHODS[method]) and isinstance(layer.linear2, METHODS[method])
    assert layer.self_attn.out_proj is out_proj  # the attention projection is left alone
    assert_close(out_proj.weight, original.self_attn.out_proj.weight)
    x = torch.randn(2, 5, 16)
    layer.train()
    y = layer(x)
    assert y.shape == x.shape
    y.pow(2).sum().backward()
    assert all(p.grad is not None for p in layer.linear1.parameters())
    layer.eval()
    reference = dense_reference(original, layer, ["linear1", "linear2"]).eval()
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    with torch.no_grad():  # eval + no_grad: PyTorch may take its fused fast path
        assert_close(layer(x), reference(x))
        assert_close(layer(x, src_key_padding_mask=padding), reference(x, src_key_padding_mask=padding))


@pytest.mark.parametrize("method", RATIO_METHODS)
def test_ratio_on_transformer_ffn_leaves_attention_alone(method: str) -> None:
    layer = encoder_layer()
    report = compress_(layer, method, ratio=4)  # no filter: the attention's out_proj (an nn.Linear subclass) is
    assert report.ratio >= 4 and [row.name for row in report.rows] == ["linear1", "linear2"]  # not a candidate
    assert type(layer.self_attn.out_proj) is not METHODS[method]
    with torch.no_grad():
        assert layer.eval()(torch.randn(2, 5, 16)).shape == (2, 5, 16)


@pytest.mark.parametrize("ratio", [2, 5, 10])
@pytest.mark.parametrize("method", RATIO_METHODS)
def test_ratio_reaches_its_target(method: str, ratio: float) -> None:
    model = wide_mlp()
    report = compress_(model, method, ratio=ratio)
    assert report.ratio >= ratio
    # Pruning moves one weight at a time; a singular component costs in + out parameters (11% of this budget at
    # ratio 10); TT / Tucker ranks move in coarser steps still.
    slack = {"prune": 1.01, "sparse": 1.01, "svd": 1.2, "tt": 1.5, "tucker": 1.5}[method]
    assert report.ratio <= slack * ratio, report
    assert report.params_after <= report.params_before / ratio
    assert compression_ratio(model) == pytest.approx(report.ratio)


@pytest.mark.parametrize("method", RATIO_METHODS)
def test_a_higher_ratio_costs_accuracy(method: str) -> None:
    errors = []
    for ratio in (2, 8):
        report = compress_(wide_mlp(), method, ratio=ratio)
        errors.append(sum(r.rel_error**2 for r in report.rows))
    assert errors[0] < errors[1]


def test_global_sparsity_uses_one_threshold() -> None:
    model = mlp()
    weights = {name: m.weight.detach().clone() for name, m in linears_of(model).items()}
    compress_(model, "prune", global_sparsity=0.7)
    layers = {name: model.get_submodule(name) for name in weights}
    total = sum(w.numel() for w in weights.values())
    assert sum(int((~layer.mask).sum()) for layer in layers.values()) == round(0.7 * total)
    kept = torch.cat([weights[n][layer.mask].abs() for n, layer in layers.items()])
    dropped = torch.cat([weights[n][~layer.mask].abs() for n, layer in layers.items()])
    assert kept.min() > dropped.max()


def test_prune_ratio_ranks_weights_relative_to_their_layer() -> None:
    # Layers on very different scales: a raw global threshold would empty the small-scale layer.
    model = wide_mlp()
    with torch.no_grad():
        model[2].weight.mul_(1e-3)
    weights = {name: m.weight.detach().clone() for name, m in linears_of(model).items()}
    report = compress_(model, "prune", ratio=8)
    assert report.ratio >= 8
    layers = {name: model.get_submodule(name) for name in weights}
    assert all(layer.mask.any() for layer in layers.values())
    scores = {n: weights[n].abs() / weights[n].norm() for n in weights}
    kept = torch.cat([scores[n][layer.mask] for n, layer in layers.items()])
    dropped = torch.cat([scores[n][~layer.mask] for n, layer in layers.items()])
    assert kept.min() >= dropped.max()


def test_a_shared_linear_is_replaced_everywhere() -> None:
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), nn.Sequential(shared))
    report = compress_(model, "svd", rank=2)
    assert [row.name for row in report.rows] == ["0"]
    assert model[0] is model[2][0] and isinstance(model[0], METHODS["svd"])


def test_a_linear_tied_to_another_module_is_refused() -> None:
    model = nn.ModuleDict({"emb": nn.Embedding(100, 16), "hidden": nn.Linear(16, 16), "out": nn.Linear(16, 100)})
    model["out"].weight = model["emb"].weight  # a tied output projection
    with pytest.raises(ValueError, match=r"'out' shares a parameter with emb\.weight.*compress_embeddings_"):
        compress_(model, "svd", ratio=2)
    assert type(model["out"]) is nn.Linear and type(model["hidden"]) is nn.Linear  # nothing replaced
    compress_(model, "svd", filter="hidden", rank=2)  # the untied layer alone is fine
    compress_embeddings_(model, rank=4)  # and the table with its tied projection
    assert model["out"].left is model["emb"].left


def test_new_layers_take_the_train_or_eval_mode_of_the_modules_they_replace() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Embedding(10, 8)).eval()
    model[1].train()
    compress_(model, "svd", rank=2)
    compress_embeddings_(model, rank=2)
    assert [type(m).__name__ for m in model] == ["LowRankLinear", "LowRankLinear", "LowRankEmbedding"]
    assert [m.training for m in model] == [False, True, False]


# --- filters --------------------------------------------------------------------------------------------------------


def test_callable_filter() -> None:
    model = mlp()
    seen = []

    def wide_outputs(name: str, module: nn.Module) -> bool:
        seen.append((name, type(module)))
        return module.out_features == 16

    report = compress_(model, "svd", filter=wide_outputs, rank=2)
    assert seen == [("0", nn.Linear), ("2", nn.Linear), ("4", nn.Linear)]
    assert [row.name for row in report.rows] == ["2"]
    assert type(model[0]) is nn.Linear and type(model[4]) is nn.Linear


def test_regex_filter_on_nested_names() -> None:
    model = nn.Sequential(nn.ModuleDict({"ffn": mlp(), "head": nn.Linear(4, 2)}))
    report = compress_(model, "prune", filter=r"ffn\.[02]$", sparsity=0.5)
    assert [row.name for row in report.rows] == ["0.ffn.0", "0.ffn.2"]
    assert isinstance(model[0]["ffn"][2], PrunedLinear) and type(model[0]["ffn"][4]) is nn.Linear
    assert [name for name, _ in select_linears(model, "head")] == ["0.head"]


# --- bad input --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, kwargs, match",
    [
        (
            mlp(),
            {"method": "cp"},
            r"unknown method 'cp'; choose one of \['tt', 'tucker', 'svd', 'prune', 'sparse', 'svd-o'\]",
        ),
        (mlp(), {"method": "svd", "filter": "attn", "rank": 2}, r"filter 'attn' selects no nn.Linear.*are: 0, 2, 4"),
        (encoder_layer(), {"method": "svd", "filter": "norm", "rank": 2}, r"not nn.Linear: norm1 \(LayerNorm\)"),
        (encoder_layer(), {"method": "svd", "filter": "out_proj", "rank": 2}, "NonDynamicallyQuantizableLinear"),
        (mlp(), {"method": "svd", "filter": "(", "rank": 2}, "not a valid regular expression"),
        (mlp(), {"method": "svd", "filter": 3, "rank": 2}, "filter must be None, a regex string or a callable"),
        (mlp(), {"method": "svd", "filter": lambda n, m: False, "rank": 2}, "selects no nn.Linear"),
        (nn.Sequential(nn.ReLU(), nn.Conv1d(3, 3, 1)), {"method": "svd", "rank": 1}, "has no nn.Linear"),
        (nn.Linear(4, 4), {"method": "svd", "rank": 1}, r"the model itself is an nn.Linear; use LowRankLinear"),
        (mlp(), {"method": "svd", "ranks": 2}, "invalid options for method 'svd' on layer '0'"),
        (mlp(), {"method": "svd"}, "exactly one of rank= or energy="),
        (mlp(), {"method": "svd", "rank": 5}, r"rank must be in \[1, 4\]"),
        (mlp(), {"method": "tt", "eps": 1.0}, r"eps must be in \(0, 1\)"),
        (mlp(), {"method": "tt", "ranks": 0}, "ranks must be >= 1"),
        (mlp(), {"method": "tt", "ranks": [1, 99, 1]}, r"ranks\[1\]=99 is outside"),
        (mlp(), {"method": "tt", "ranks": 2, "in_modes": (4, 5)}, r"in_modes=\[4, 5\] multiply to 20"),
        (mlp(), {"method": "tucker", "ranks": [2, 2, 2, 9], "in_modes": (4, 4), "out_modes": (4, 8)}, "outside"),
        (mlp(), {"method": "prune", "sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
        (mlp(), {"method": "prune", "global_sparsity": -0.1}, r"sparsity must be in \[0, 1\)"),
        (mlp(), {"method": "svd-o", "ratio": 4}, "ratio= is not available for 'svd-o'"),
        (mlp(), {"method": "svd", "ratio": 0.5}, "ratio must be a finite number >= 1"),
        (mlp(), {"method": "svd", "ratio": float("inf")}, "ratio must be a finite number >= 1"),
        (mlp(), {"method": "svd", "ratio": float("nan")}, "ratio must be a finite number >= 1"),
        (mlp(), {"method": "svd", "rank": 2.0}, "on layer '0': rank must be an int, got 2.0"),
        (mlp(), {"method": "tt", "ranks": 2.5}, "ranks must be an int or a list of ints, got 2.5"),
        (mlp(), {"method": "tt", "ranks": [1, 2.0, 1]}, "ranks must be an int or a list of ints"),
        (mlp(), {"method": "tucker", "ranks": True}, "ranks must be an int or a list of ints, got True"),
        (
            encoder_layer(),
            {"method": "tt", "filter": r"linear[12]", "ranks": 2, "in_modes": (4, 4)},
            r"on layer 'linear2': in_modes=\[4, 4\] multiply to 16",  # fits linear1 (16 -> 32), not linear2
        ),
    ],
)
def test_bad_input_raises(model: nn.Module, kwargs, match: str) -> None:
    kwargs = dict(kwargs)
    method = kwargs.pop("method")
    with pytest.raises(ValueError, match=match):
        compress_(model, method, **kwargs)


@pytest.mark.parametrize("method, options", SIZE_OPTIONS, ids=lambda v: str(v))
def test_ratio_with_size_options_raises(method: str, options) -> None:
    with pytest.raises(ValueError, match=rf"give either ratio= or \['{next(iter(options))}'\]"):
        compress_(mlp(), method, ratio=2, **options)


@pytest.mark.parametrize("method", RATIO_METHODS)
def test_unreachable_ratio_raises(method: str) -> None:
    """The budget quoted is the whole one (biases included), as the smallest size quoted beside it."""
    model = mlp()
    budget = math.floor(dense_params(model) / 1_000_000)
    with pytest.raises(ValueError, match=rf"ratio=1000000 is out of reach: .* above the budget of {budget}$"):
        compress_(model, method, ratio=1_000_000)


def test_frozen_layers_stay_frozen() -> None:
    """A frozen weight (or bias) gives frozen factors (or bias): freezing survives compression."""
    model = mlp()
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    for method, options in (("svd", {"rank": 2}), ("tt", {"ranks": 2}), ("sparse", {"sparsity": 0.5})):
        copy_ = copy.deepcopy(model)
        compress_(copy_, method, **options)
        for name, param in copy_.named_parameters():
            frozen = name.startswith("0.") or name == "2.bias"
            assert param.requires_grad != frozen, (method, name)


@pytest.mark.parametrize(
    "method, options, match",
    [
        ("svd", {"rank": 5}, r"rank must be in \[1, 4\] for a \(4, 16\) weight"),
        ("tt", {"ranks": [1, 12, 1]}, r"ranks\[1\]=12 is outside"),
        ("cp", {}, "unknown method 'cp'"),
    ],
)
def test_a_failure_leaves_the_model_untouched(method: str, options, match: str) -> None:
    model = mlp()
    before = dict(model.named_modules())
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):  # "svd" fails on the last layer (16 -> 4), after the first two
        compress_(model, method, **options)
    assert dict(model.named_modules()) == before
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name])


class _TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(40, 12, padding_idx=0)
        self.proj = nn.Linear(12, 12)
        self.head = nn.Linear(12, 40)  # a bias the tie does not cover
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(self.embed(ids))))


def test_compress_embeddings_keeps_the_tie_and_matches_the_svd_of_the_table() -> None:

    model = _TiedLM()
    ids = torch.tensor([[0, 5, 39, 2], [7, 7, 1, 0]])
    with torch.no_grad():
        reference = model(ids)
        left, right = truncated_svd(model.embed.weight.double(), rank=3)
        low_rank_table = (left @ right).float()
    dense_total = dense_params(model)
    report = compress_embeddings_(model, rank=3)
    assert isinstance(model.embed, LowRankEmbedding) and isinstance(model.head, LowRankLinear)
    assert model.head.left is model.embed.left and model.head.right is model.embed.right
    assert report.rows[0].options == {"rank": 3, "tied": ["head"]}
    assert report.rows[0].params_after == 3 * (40 + 12)
    torch.testing.assert_close(model.embed.weight[1:], low_rank_table[1:], atol=1e-5, rtol=1e-5)
    assert not model.embed.weight[0].any()  # the padding row stays exactly zero
    torch.testing.assert_close(model.head.to_dense(), model.embed.weight)
    # sizes: the factors count once; the dense model is what it was (the tied table counted once)
    assert dense_params(model) == dense_total
    stored = 3 * (40 + 12) + 40 + (12 * 12 + 12)
    assert stored_params(model) == stored
    assert compression_ratio(model) == pytest.approx(dense_total / stored)
    # full rank reproduces the dense model; training reaches the shared factors through both uses
    full = _TiedLM()
    compress_embeddings_(full, rank=12)
    torch.testing.assert_close(full(ids), reference, atol=1e-5, rtol=1e-5)
    full(ids).sum().backward()
    assert full.embed.left.grad is not None and full.embed.left.grad[1:].abs().sum() > 0


def test_low_rank_table_keeps_a_trained_padding_row_and_a_zero_one_exactly() -> None:
    """A tied output projection trains the padding row, which the lookups leave alone: the approximation keeps it
    (at full rank the logits are the table's); a padding row still at zero stays exactly zero."""
    torch.manual_seed(0)
    trained = nn.Embedding(30, 8, padding_idx=3)
    with torch.no_grad():
        trained.weight[3].normal_()
    hidden = torch.randn(5, 8)
    full = LowRankEmbedding.from_embedding(trained, rank=8)
    assert_close(full.attend(hidden), hidden @ trained.weight.detach().T, rtol=1e-5, atol=1e-5)
    fresh = LowRankEmbedding.from_embedding(nn.Embedding(30, 8, padding_idx=-1), rank=4)
    assert fresh.padding_idx == 29 and torch.equal(fresh.left[29], torch.zeros(4))
    for bad in (30, -31):
        with pytest.raises(ValueError, match=f"padding_idx {bad} is outside a vocabulary of 30"):
            LowRankEmbedding(30, 8, 4, padding_idx=bad)


def test_compress_embeddings_rejects_bad_input_and_leaves_the_model_alone() -> None:

    model = _TiedLM()
    with pytest.raises(ValueError, match="rank"):
        compress_embeddings_(model, rank=13)
    assert type(model.embed) is nn.Embedding and model.head.weight is model.embed.weight
    with pytest.raises(ValueError, match=r"selects no nn\.Embedding"):
        compress_embeddings_(model, rank=2, filter="proj")
    with pytest.raises(ValueError, match=r"has no nn\.Embedding"):
        compress_embeddings_(nn.Sequential(nn.Linear(2, 2)), rank=1)


def test_tt_embeddings_keep_the_tie_and_match_the_tt_svd_of_the_table() -> None:
    from compressed_transformer.functional import tt_matrix_from_dense, tt_matrix_to_dense
    from compressed_transformer.layers import TTEmbedding, TTLinear

    model = _TiedLM()
    ids = torch.tensor([[0, 5, 39, 2], [7, 7, 1, 0]])
    with torch.no_grad():
        reference = model(ids)
        expected = tt_matrix_to_dense(tt_matrix_from_dense(model.embed.weight.double(), [5, 8], [3, 4], ranks=3))
    dense_total = dense_params(model)
    report = compress_embeddings_(model, "tt", ranks=3, voc_modes=[5, 8], emb_modes=[3, 4])
    assert isinstance(model.embed, TTEmbedding) and isinstance(model.head, TTLinear)
    assert model.head.cores is model.embed.cores
    row = report.rows[0]
    assert row.method == "tt-embedding" and row.options == {"ranks": [1, 3, 1], "voc_modes": [5, 8], "tied": ["head"]}
    stored_table = 5 * 3 * 3 + 3 * 8 * 4
    assert row.params_after == stored_table
    torch.testing.assert_close(model.embed.weight, expected.float(), atol=1e-5, rtol=1e-5)
    assert not model.embed(torch.tensor([0])).any()  # the padding id embeds to zeros
    # the projection is the table (its bias kept): through the shared cores, without building the table
    hidden = torch.randn(3, 12)
    torch.testing.assert_close(model.head(hidden), hidden @ model.embed.table.to_dense().T + model.head.bias)
    assert dense_params(model) == dense_total
    assert stored_params(model) == stored_table + 40 + (12 * 12 + 12)
    # full ranks reproduce the model; training reaches the shared cores through both uses
    full = _TiedLM()
    compress_embeddings_(full, "tt", ranks=64, voc_modes=[5, 8], emb_modes=[3, 4])
    torch.testing.assert_close(full(ids), reference, atol=1e-5, rtol=1e-5)
    full(ids).sum().backward()
    assert all(core.grad is not None and core.grad.abs().sum() > 0 for core in full.embed.cores)


def test_a_tt_table_padded_past_its_vocabulary_keeps_the_tie() -> None:
    """Vocabulary modes that pad the table (a prime vocabulary, e.g. GPT-2's 50257) pad the tied projection's
    outputs too: its logits are the table's rows, without the padding."""
    from compressed_transformer.layers import TTEmbedding, TTLinear

    model = _TiedLM()
    ids = torch.tensor([[0, 5, 39, 2], [7, 7, 1, 0]])
    with torch.no_grad():
        reference = model(ids)
    report = compress_embeddings_(model, "tt", ranks=64, voc_modes=[7, 6], emb_modes=[3, 4])  # 42 rows for 40
    assert isinstance(model.embed, TTEmbedding) and isinstance(model.head, TTLinear) and model.head.padded
    assert model.head.cores is model.embed.cores and report.rows[0].options["tied"] == ["head"]
    torch.testing.assert_close(model(ids), reference, atol=1e-5, rtol=1e-5)
    hidden = torch.randn(3, 12)
    torch.testing.assert_close(model.head(hidden), model.embed.attend(hidden) + model.head.bias)
    model(ids).sum().backward()
    assert all(core.grad is not None and core.grad.abs().sum() > 0 for core in model.embed.cores)


def test_compress_embeddings_tt_errors_leave_the_model_alone() -> None:
    model = _TiedLM()
    with pytest.raises(ValueError, match="at most 5 padding rows"):  # 49 rows for 40 ids
        compress_embeddings_(model, "tt", ranks=2, voc_modes=[7, 7], emb_modes=[3, 4])
    assert type(model.embed) is nn.Embedding and model.head.weight is model.embed.weight
    with pytest.raises(ValueError, match="unknown embedding method"):
        compress_embeddings_(model, "tucker", ranks=2)
    with pytest.raises(ValueError, match=r"unknown options \['rank'\] for 'tt'"):
        compress_embeddings_(model, "tt", rank=2)
    with pytest.raises(ValueError, match="needs rank="):
        compress_embeddings_(model, "svd")
    with pytest.raises(ValueError, match="ranks= and/or eps="):
        compress_embeddings_(model, "tt")
    assert type(model.embed) is nn.Embedding and type(model.head) is nn.Linear
    # an untied table may pad its vocabulary
    untied = nn.ModuleDict({"embed": nn.Embedding(41, 12)})
    compress_embeddings_(untied, "tt", ranks=2, voc_modes=[7, 6], emb_modes=[3, 4])
    assert untied["embed"].to_dense().shape == (41, 12)


@pytest.mark.parametrize("method", ["svd", "tt"])
def test_compress_embeddings_to_a_ratio_takes_the_largest_rank_that_fits(method: str) -> None:
    from compressed_transformer.layers import TTEmbedding

    model = _TiedLM()
    report = compress_embeddings_(model, method, ratio=4)
    row = report.rows[0]
    assert row.params_after <= 40 * 12 / 4 and row.ratio >= 4
    # one rank more would not fit
    bigger = (
        LowRankEmbedding(40, 12, row.options["rank"] + 1)
        if method == "svd"
        else TTEmbedding(
            40,
            12,
            voc_modes=row.options["voc_modes"],
            emb_modes=model.embed.emb_modes,
            ranks=max(row.options["ranks"]) + 1,
        )
    )
    assert bigger.num_stored_params() > 40 * 12 / 4
    with pytest.raises(ValueError, match="ratio= chooses the rank"):
        compress_embeddings_(_TiedLM(), method, ratio=4, **({"rank": 2} if method == "svd" else {"ranks": 2}))
    with pytest.raises(ValueError, match="out of reach"):
        compress_embeddings_(_TiedLM(), method, ratio=1000)
    with pytest.raises(ValueError, match=r"ratio must be a finite number >= 1, got 0\.5"):
        compress_embeddings_(_TiedLM(), method, ratio=0.5)
    with pytest.raises(ValueError, match="ratio must be a finite number >= 1, got nan"):
        compress_embeddings_(_TiedLM(), method, ratio=float("nan"))


@pytest.mark.parametrize("method, options", [("svd", {"rank": 4}), ("tt", {"ranks": 2})])
@pytest.mark.parametrize("flag", [{"max_norm": 1.0}, {"scale_grad_by_freq": True}, {"sparse": True}])
def test_embedding_options_a_factorised_table_cannot_keep_are_refused(method: str, options, flag) -> None:
    model = nn.ModuleDict({"table": nn.Embedding(64, 16, **flag)})
    with pytest.raises(ValueError, match=f"cannot keep nn.Embedding's {next(iter(flag))}"):
        compress_embeddings_(model, method, **options)
    assert type(model["table"]) is nn.Embedding


def test_pruned_to_sparse_keeps_outputs_modes_and_shared_layers() -> None:
    shared = nn.Linear(8, 8)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), shared, shared)
    compress_(model, "prune", filter=r"^[02]$", sparsity=0.75)
    compress_(model, "prune", filter=r"^3$", sparsity=0.5)  # the shared layer, under both names
    model[2].eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        before = model(x)
    assert pruned_to_sparse_(model) == ["0", "2", "3"]
    assert all(type(model[i]) is SparseLinear for i in (0, 2, 3, 4)) and model[3] is model[4]
    assert model[0].training and not model[2].training
    assert model[0].nnz == 32 and model[3].nnz == 32
    with torch.no_grad():
        assert_close(model(x), before)
    assert pruned_to_sparse_(model) == []


def test_conversions_refuse_a_model_that_is_the_layer_itself() -> None:
    """They replace submodules: the root cannot replace itself (and no child named '' may appear)."""
    pruned = PrunedLinear.from_linear(nn.Linear(8, 8), sparsity=0.5)
    with pytest.raises(ValueError, match=r"model itself is a PrunedLinear; use SparseLinear.from_pruned\(layer\)"):
        pruned_to_sparse_(pruned)
    vd = SparseVDLinear(8, 8)
    with pytest.raises(ValueError, match=r"model itself is a SparseVDLinear; use layer.to_pruned\(\)"):
        sparse_vd_to_pruned_(vd)
    assert dict(pruned.named_children()) == {} and dict(vd.named_children()) == {}


def test_tt_out_modes_may_pad_an_output_size_that_factorises_badly() -> None:
    """``compress_(..., "tt", out_modes=...)`` pads a prime number of outputs (37 -> 40), at given ranks and at a
    ratio: the layer's padding rows are never output, and full ranks reproduce the model."""
    from compressed_transformer.layers import TTLinear

    def head() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 37))

    x = torch.randn(5, 16)
    full, reference = head(), head()
    compress_(full, "tt", filter="2", ranks=10**6, in_modes=[4, 4], out_modes=[5, 8])
    assert isinstance(full[2], TTLinear) and full[2].padded
    torch.testing.assert_close(full(x), reference(x), atol=1e-5, rtol=1e-5)
    small = head()
    report = compress_(small, "tt", filter="2", ratio=4, in_modes=[4, 4], out_modes=[5, 8])
    layer = small[2]
    assert layer.out_modes == [5, 8] and layer.num_stored_params() <= (16 * 37 + 37) / 4
    assert report.rows[0].params_after == layer.num_stored_params()
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias)
    with pytest.raises(ValueError, match=r"on layer '2': out_modes=\[6, 8\] multiply to 48, .* product is 37 to 41"):
        compress_(head(), "tt", filter="2", ranks=2, in_modes=[4, 4], out_modes=[6, 8])
    with pytest.raises(ValueError, match=r"on layer '2': out_modes=\[6, 8\] multiply to 48"):  # the same at a ratio
        compress_(head(), "tt", filter="2", ratio=4, in_modes=[4, 4], out_modes=[6, 8])
    # without modes the same 37 stays one core (no padding within 10 % balances it), but 509 outputs pad to 525
    prime = nn.Sequential(nn.Linear(32, 509))
    x = torch.randn(5, 32)
    compress_(prime, "tt", ratio=8)
    layer = prime[0]
    assert layer.padded and layer.out_modes == [7, 5, 5, 3] and len(layer.ranks) == 5
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias)


def test_a_shared_linear_is_selected_by_any_of_its_names() -> None:
    shared = nn.Linear(8, 8)
    model = nn.Sequential(nn.Linear(8, 8), shared, nn.Sequential(shared))
    report = compress_(model, "svd", filter=r"^2\.0$", rank=2)
    assert [row.name for row in report.rows] == ["1"] and type(model[0]) is nn.Linear
    assert model[1] is model[2][0] and isinstance(model[1], LowRankLinear)
    other = nn.Sequential(shared := nn.Linear(8, 8), shared)
    report = compress_(other, "prune", filter=lambda name, _: name == "1", sparsity=0.5)
    assert [row.name for row in report.rows] == ["0"] and other[0] is other[1]


def test_layers_on_the_meta_device_are_refused_clearly() -> None:
    with torch.device("meta"):
        model = nn.ModuleDict({"emb": nn.Embedding(10, 8), "fc": nn.Linear(8, 8)})
    for method in ALL:
        with pytest.raises(ValueError, match=r"but fc has its weight on the meta device"):
            compress_(model, method, **OPTIONS[method])
    with pytest.raises(ValueError, match=r"but emb has its weight on the meta device"):
        compress_embeddings_(model, rank=2)
    assert type(model["fc"]) is nn.Linear and type(model["emb"]) is nn.Embedding


def test_hooks_on_a_replaced_linear_warn() -> None:
    model = mlp()
    model[2].register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match=r"replaces 2, which has hooks registered"):
        compress_(model, "svd", rank=2)


class _SharedTables(nn.Module):
    """Encoder and decoder tables that are two modules holding one weight, tied to the output (as in BART / T5)."""

    def __init__(self, decoder_padding: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder_embed = nn.Embedding(40, 12, padding_idx=0)
        self.decoder_embed = nn.Embedding(40, 12, padding_idx=decoder_padding)
        self.decoder_embed.weight = self.encoder_embed.weight
        self.head = nn.Linear(12, 40, bias=False)
        self.head.weight = self.encoder_embed.weight


@pytest.mark.parametrize(("method", "options"), [("svd", {"rank": 3}), ("tt", {"ranks": 2}), ("svd", {"ratio": 4})])
def test_embedding_modules_sharing_one_weight_become_one_table(method: str, options: dict) -> None:
    model = _SharedTables()
    dense = stored_params(model)
    report = compress_embeddings_(model, method, filter="encoder", **options)
    assert model.encoder_embed is model.decoder_embed
    assert [row.name for row in report.rows] == ["encoder_embed"] and report.params_before == 40 * 12
    assert report.rows[0].options["shared"] == ["decoder_embed"] and report.rows[0].options["tied"] == ["head"]
    assert stored_params(model) == report.params_after < dense
    with pytest.raises(ValueError, match=r"'encoder_embed' and 'decoder_embed' share one weight but differ in padding"):
        compress_embeddings_(_SharedTables(decoder_padding=1), method, **options)


def test_compress_embeddings_keeps_a_frozen_table_frozen() -> None:
    for method, options in (("svd", {"rank": 3}), ("tt", {"ranks": 2})):
        model = _TiedLM()
        model.embed.weight.requires_grad_(False)
        compress_embeddings_(model, method, **options)
        assert not any(p.requires_grad for p in model.embed.parameters())
        assert model.head.bias.requires_grad and model.proj.weight.requires_grad
