"""TTEmbedding (Hrinchuk et al. 2020) and its pure maths: every lookup and tied logit against the dense table."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from compressed_transformer.functional import factorize, tt_matrix_rows, tt_matrix_to_dense, tt_vocab_modes
from compressed_transformer.layers import LowRankEmbedding, TTEmbedding, TTLinear
from compressed_transformer.layers.embedding import tie_projection_


def random_cores(out_modes, in_modes, ranks, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(ranks[k], o, i, ranks[k + 1], generator=gen, dtype=dtype)
        for k, (o, i) in enumerate(zip(out_modes, in_modes, strict=True))
    ]


@pytest.mark.parametrize(
    ("out_modes", "in_modes", "ranks"),
    [
        ([5, 4, 3], [2, 3, 2], [1, 3, 2, 1]),
        ([7], [6], [1, 1]),
        ([2, 9], [4, 1], [1, 4, 1]),
        ([3, 1, 4, 2], [2, 2, 1, 3], [1, 2, 3, 2, 1]),
    ],
)
def test_tt_matrix_rows_are_the_rows_of_the_dense_matrix(out_modes, in_modes, ranks) -> None:
    cores = random_cores(out_modes, in_modes, ranks)
    dense = tt_matrix_to_dense(cores)
    rows = torch.randint(0, math.prod(out_modes), (3, 5), generator=torch.Generator().manual_seed(1))
    got = tt_matrix_rows(cores, rows)
    assert got.shape == (3, 5, math.prod(in_modes))
    torch.testing.assert_close(got, dense[rows], rtol=1e-12, atol=1e-12)
    every = torch.arange(math.prod(out_modes))
    torch.testing.assert_close(tt_matrix_rows(cores, every), dense, rtol=1e-12, atol=1e-12)
    assert tt_matrix_rows(cores, torch.zeros(0, dtype=torch.long)).shape == (0, math.prod(in_modes))


def test_vocabulary_modes_pad_only_badly_factorising_sizes() -> None:
    assert tt_vocab_modes(8000, 3) == [20, 20, 20]
    assert tt_vocab_modes(32000, 3) == factorize(32000, 3)
    padded = tt_vocab_modes(7919, 3)  # a prime
    assert 7919 <= math.prod(padded) <= 7919 * 1.1 and max(padded) <= 1.5 * math.prod(padded) ** (1 / 3)
    assert tt_vocab_modes(7, 1) == [7]
    with pytest.raises(ValueError, match="num_embeddings >= 1"):
        tt_vocab_modes(0, 3)
    # a table's default modes pad as a TTLinear's outputs do: a power of two never, a prime or 2 x 5087 always
    defaults = {1024: [16, 8, 8], 128: [8, 4, 4], 8000: [20, 20, 20], 50257: [51, 34, 29], 30522: [37, 33, 25]}
    for vocabulary, modes in defaults.items():
        assert TTEmbedding(vocabulary, 8, ranks=2).voc_modes == modes, vocabulary


@pytest.mark.parametrize("padding_idx", [None, 0, 5])
@pytest.mark.parametrize("num", [60, 59])  # exact modes, and a padded vocabulary (59 is prime)
def test_lookup_and_attend_match_the_dense_table(num: int, padding_idx: int | None) -> None:
    torch.manual_seed(0)
    layer = TTEmbedding(num, 12, padding_idx, ranks=3, dtype=torch.float64)
    assert math.prod(layer.voc_modes) >= num and math.prod(layer.emb_modes) == 12
    table = layer.to_dense()
    assert table.shape == (num, 12)
    ids = torch.randint(0, num, (4, 7))
    ids[0, :3] = torch.tensor([0, 5, num - 1])
    expected = table[ids] if padding_idx is None else table[ids] * (ids != padding_idx).unsqueeze(-1)
    torch.testing.assert_close(layer(ids), expected, rtol=1e-12, atol=1e-12)
    hidden = torch.randn(3, 2, 12, dtype=torch.float64)
    torch.testing.assert_close(layer.attend(hidden), hidden @ table.T, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.weight, table)
    with torch.no_grad():  # in eval mode, .weight is the cached table the lookup reads: the forward's own rows
        rows = layer.eval()(torch.arange(num))
        cached = layer.weight if padding_idx is None else layer.weight.index_fill(0, torch.tensor([padding_idx]), 0)
    torch.testing.assert_close(cached, rows, rtol=0, atol=0)
    if padding_idx is not None:
        assert not layer(torch.tensor([padding_idx])).any() and table[padding_idx].any()
        # the padding id passes no gradient
        layer.zero_grad()
        layer(torch.tensor([padding_idx, padding_idx])).sum().backward()
        assert all(not core.grad.any() for core in layer.cores)
    assert layer.num_stored_params() == sum(c.numel() for c in layer.cores)


def test_gradients_of_the_lookup() -> None:
    torch.manual_seed(0)
    layer = TTEmbedding(24, 6, voc_modes=[2, 3, 4], emb_modes=[1, 2, 3], ranks=2, dtype=torch.float64)
    ids = torch.tensor([[1, 23, 1], [7, 0, 12]])
    cores = [c.detach().clone().requires_grad_() for c in layer.cores]
    assert torch.autograd.gradcheck(lambda *c: tt_matrix_rows(list(c), ids), cores)


def test_from_embedding_is_the_tt_svd_of_the_table() -> None:
    torch.manual_seed(0)
    embedding = nn.Embedding(59, 8, padding_idx=1)  # padded to prod(voc_modes) rows of zeros
    weight = embedding.weight.detach().clone()
    full = TTEmbedding.from_embedding(embedding, ranks=64)
    torch.testing.assert_close(full.to_dense(), weight, rtol=1e-5, atol=1e-5)
    assert torch.equal(embedding.weight, weight)  # the source is not modified
    sizes = []
    for eps in (0.1, 0.5):
        approx = TTEmbedding.from_embedding(embedding, eps=eps)
        error = (approx.table.to_dense()[:59] - weight).norm() / weight.norm()
        assert error <= eps + 1e-5
        sizes.append(approx.num_stored_params())
    assert sizes[1] < sizes[0] <= full.num_stored_params()
    capped = TTEmbedding.from_embedding(embedding, ranks=2, voc_modes=[4, 15], emb_modes=[2, 4])
    assert capped.ranks == [1, 2, 1] and capped.voc_modes == [4, 15]
    with pytest.raises(ValueError, match="ranks= and/or eps="):
        TTEmbedding.from_embedding(embedding)


def test_initial_table_has_the_transformer_embedding_scale() -> None:
    torch.manual_seed(0)
    table = TTEmbedding(8000, 256, ranks=16).to_dense()
    assert table.std().item() == pytest.approx(256**-0.5, rel=0.15)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="below num_embeddings"):
        TTEmbedding(100, 8, voc_modes=[3, 3], emb_modes=[2, 4])
    with pytest.raises(
        ValueError, match=r"pad 40 ids to 49 rows; at most 5 padding rows are allowed \(e.g. \[8, 5\]\)"
    ):
        TTEmbedding(40, 8, voc_modes=[7, 7], emb_modes=[2, 4])  # as many as a TTLinear may pad its outputs
    with pytest.raises(ValueError, match="must equal embedding_dim"):
        TTEmbedding(9, 8, voc_modes=[3, 3], emb_modes=[2, 2])
    with pytest.raises(ValueError, match="same length"):
        TTEmbedding(9, 8, voc_modes=[3, 3], emb_modes=[8])
    with pytest.raises(ValueError, match="padding_idx"):
        TTEmbedding(9, 8, padding_idx=9)
    with pytest.raises(ValueError, match="ranks"):
        TTEmbedding(9, 8, voc_modes=[3, 3], emb_modes=[2, 4], ranks=[1, 2, 2])
    layer = TTEmbedding(9, 8, voc_modes=[3, 3], emb_modes=[2, 4])
    with pytest.raises(IndexError, match=r"\[0, 9\)"):
        layer(torch.tensor([9]))
    with pytest.raises(IndexError):
        layer(torch.tensor([-1]))
    with pytest.raises(TypeError, match="integer ids"):
        layer(torch.tensor([1.0]))


@pytest.mark.slow
def test_torch_compile() -> None:
    """Lookups and tied logits trace into one graph each (``fullgraph``) and differentiate (as the linear layers'
    test does, on the ``aot_eager`` backend)."""
    torch.manual_seed(0)
    layer = TTEmbedding(59, 12, padding_idx=0, ranks=3)
    ids = torch.tensor([[0, 3, 58], [7, 7, 1]])
    lookup = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(lookup(ids), layer(ids))
    hidden = torch.randn(4, 12)
    attend = torch.compile(layer.attend, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(attend(hidden), layer.attend(hidden))
    (lookup(ids).sum() + attend(hidden).sum()).backward()
    assert all(core.grad is not None and core.grad.abs().sum() > 0 for core in layer.cores)
    with pytest.raises(RuntimeError, match=r"ids must be in \[0, 59\)"):  # not the wrapped-around rows
        lookup(torch.tensor([[59, 60, 61], [0, 1, 2]]))


def test_eval_lookups_and_logits_share_the_cached_table() -> None:
    from compressed_transformer.layers._fast import cache_nbytes

    torch.manual_seed(0)
    layer = TTEmbedding(59, 12, padding_idx=3, ranks=3)
    ids = torch.tensor([[0, 3, 58], [7, 7, 1]])
    hidden = torch.randn(4, 12)
    trained = layer(ids).detach()
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(ids), trained)
        assert cache_nbytes(layer) == 60 * 12 * 4  # the padded table, built once
        torch.testing.assert_close(layer.attend(hidden), hidden @ layer.to_dense().T)
        assert cache_nbytes(layer) == 60 * 12 * 4
        layer.cores[0].mul_(2)  # a changed core rebuilds the table
        torch.testing.assert_close(layer(ids), tt_matrix_rows(list(layer.cores), ids) * (ids != 3).unsqueeze(-1))
        torch.testing.assert_close(layer.attend(hidden), hidden @ layer.to_dense().T)
    layer.train()
    layer(ids)
    assert cache_nbytes(layer) == 0


@pytest.mark.parametrize(
    ("voc_modes", "emb_modes", "name"), [([4, 4, 4.5], [2, 3, 2], "voc_modes"), ([4, 4, 4], [2, 1.5, 4], "emb_modes")]
)
def test_fractional_modes_are_refused_not_truncated(voc_modes, emb_modes, name: str) -> None:
    """``int(4.5)`` would quietly build a table of other modes than asked for (4 x 4 x 4 here)."""
    with pytest.raises(ValueError, match=rf"{name} must be positive ints, got \[.*\]"):
        TTEmbedding(64, 12, voc_modes=voc_modes, emb_modes=emb_modes)


def test_a_tied_projection_gives_one_logit_per_id() -> None:
    """The same cores serve tables of 61 to 64 ids (``voc_modes`` (4, 4, 4) may pad): a 61-output projection tied to
    a 64-id table would drop logits of real ids, a 64-output one tied to a 61-id table score padding rows."""
    table = TTEmbedding(61, 12, voc_modes=[4, 4, 4], emb_modes=[2, 3, 2], ranks=3)
    for outputs in (64, 60):
        projection = TTLinear(12, outputs, in_modes=[2, 3, 2], out_modes=[4, 4, 4], ranks=3)
        with pytest.raises(ValueError, match=rf"the projection has {outputs} outputs, the table 61 ids"):
            tie_projection_(projection, table)
    projection = TTLinear(12, 61, in_modes=[2, 3, 2], out_modes=[4, 4, 4], ranks=3)
    tie_projection_(projection, table)
    assert projection.cores is table.cores
    hidden = torch.randn(3, 12)
    torch.testing.assert_close(projection(hidden) - projection.bias, table.attend(hidden))


def test_low_rank_embedding_rank_is_an_int() -> None:
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 4\] for a 10x4 table, got True"):
        LowRankEmbedding(10, 4, rank=True)  # a bool is no rank (it failed deep inside torch.empty)
    layer = LowRankEmbedding(10, 4, rank=np.int64(3))  # a NumPy integer is one
    assert type(layer.rank) is int and layer.left.shape == (10, 3)
