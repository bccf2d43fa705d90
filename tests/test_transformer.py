"""The encoder-decoder Transformer: config, FFN block selection, shapes, masks, caching, every FFN method."""

from __future__ import annotations

import copy

import pytest
import torch

from compressed_transformer.models.transformer import (
    FFN_METHODS,
    FeedForward,
    FFNSpec,
    Transformer,
    TransformerConfig,
    ffn_module_names,
    parameter_report,
    preset,
    resolve_blocks,
)
from toy_corpus import METHOD_OPTIONS


def tiny(**changes) -> TransformerConfig:
    return preset("tiny", **changes)


def test_presets() -> None:
    base, iwslt, small = preset("base"), preset("iwslt"), preset("small")
    assert (base.d_model, base.d_ff, base.heads, base.enc_layers, base.dec_layers) == (512, 2048, 8, 6, 6)
    assert (iwslt.d_model, iwslt.d_ff, iwslt.heads, iwslt.enc_layers) == (512, 1024, 4, 6)
    assert small.d_model == 256 and small.enc_layers == 3
    # Vaswani et al. and fairseq put no dropout on the FFN hidden layer (see TransformerConfig.activation_dropout)
    assert base.ffn_dropout == iwslt.ffn_dropout == 0.0 and (base.dropout, iwslt.dropout) == (0.1, 0.3)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


@pytest.mark.parametrize(
    ("blocks", "expected"),
    [
        ("all", ((0, 1, 2, 3), (0, 1, 2, 3))),
        ("none", ((), ())),
        ("encoder", ((0, 1, 2, 3), ())),
        ("decoder", ((), (0, 1, 2, 3))),
        ("1/2", ((0, 1), (0, 1))),
        ("0.25", ((0,), (0,))),
        ("3/4", ((0, 1, 2), (0, 1, 2))),
        ("enc:0,3;dec:1", ((0, 3), (1,))),
        ("dec:2", ((), (2,))),
        ("0,1,7", ((0, 1), (3,))),
        ("1", ((1,), ())),  # a bare integer is a block index, not the fraction 1
        ("0", ((0,), ())),
        ("5", ((), (1,))),
        ("1.0", ((0, 1, 2, 3), (0, 1, 2, 3))),
        ("0.0", ((), ())),
    ],
)
def test_resolve_blocks(blocks: str, expected) -> None:
    assert resolve_blocks(blocks, 4, 4) == expected


@pytest.mark.parametrize(
    ("blocks", "match"),
    [
        ("enc:9", r"do not exist \(enc:9\)"),
        ("12", r"do not exist \(dec:8\)"),
        ("half", "cannot parse"),
        ("5/4", r"fraction must be in \[0, 1\]"),
        ("enc:x", "cannot parse"),
    ],
)
def test_resolve_blocks_rejects(blocks: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_blocks(blocks, 4, 4)


def test_config_validation_and_round_trip() -> None:
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(d_model=30, heads=4)
    with pytest.raises(ValueError, match="d_model=15 must be even"):
        TransformerConfig(d_model=15, heads=5)
    narrow = Transformer(tiny(d_model=12, heads=4))  # an odd head width (3) is fine
    assert narrow(torch.randint(4, 64, (1, 3)), torch.randint(4, 64, (1, 2))).shape == (1, 2, tiny().vocab_size)
    with pytest.raises(ValueError, match="unknown FFN method"):
        FFNSpec("quantum")
    config = tiny(ffn=FFNSpec("tt", {"ranks": 2}, "1/2"))
    assert TransformerConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown keys"):
        TransformerConfig.from_dict({**config.to_dict(), "flux": 1})


def test_ffn_spec_that_does_not_fit_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        Transformer(tiny(ffn=FFNSpec("tt", {"ranks": 2, "in_modes": [5, 7]})))


def test_shapes_and_ffn_selection() -> None:
    config = tiny(ffn=FFNSpec("svd", {"rank": 4}, "enc:1;dec:0"))
    model = Transformer(config)
    src, tgt = torch.randint(4, 64, (3, 7)), torch.randint(4, 64, (3, 5))
    assert model(src, tgt).shape == (3, 5, 64)
    assert ffn_module_names(config) == [
        "encoder.1.ffn.fc1",
        "encoder.1.ffn.fc2",
        "decoder.0.ffn.fc1",
        "decoder.0.ffn.fc2",
    ]
    assert type(model.encoder[0].ffn.fc1) is torch.nn.Linear
    assert type(model.encoder[1].ffn.fc1) is not torch.nn.Linear
    report = parameter_report(model)
    assert report["total"] == report["ffn"] + report["embeddings"] + report["other"]


@pytest.mark.parametrize("norm_first", [False, True])
def test_no_attention_to_padding(norm_first: bool) -> None:
    model = Transformer(tiny(norm_first=norm_first)).eval()
    src = torch.randint(4, 64, (2, 6))
    src[0, 4:] = 0  # padding
    tgt = torch.randint(4, 64, (2, 5))
    batched = model(src, tgt)
    alone = model(src[:1, :4], tgt[:1])  # the same sentence without its padding
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=1e-5)
    _, mask = model.encode(src)
    assert mask[0, 0, 0].tolist() == [True] * 4 + [False] * 2


def test_no_attention_to_the_future() -> None:
    model = Transformer(tiny()).eval()
    src, tgt = torch.randint(4, 64, (2, 6)), torch.randint(4, 64, (2, 5))
    out = model(src, tgt)
    changed = tgt.clone()
    changed[:, 3:] = torch.randint(4, 64, (2, 2))
    torch.testing.assert_close(model(src, changed)[:, :3], out[:, :3])
    assert not torch.allclose(model(src, changed)[:, 3:], out[:, 3:])


def test_incremental_decoding_matches_teacher_forcing() -> None:
    model = Transformer(tiny(norm_first=True)).eval()
    src, tgt = torch.randint(4, 64, (2, 6)), torch.randint(4, 64, (2, 5))
    src[1, 4:] = 0
    full = torch.log_softmax(model(src, tgt), dim=-1)
    memory, mask = model.encode(src)
    cache = None
    for step in range(tgt.shape[1]):
        logp, cache = model.decode_step(tgt[:, step], memory, mask, cache, step)
        torch.testing.assert_close(logp, full[:, step], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", FFN_METHODS)
def test_every_ffn_method_trains(method: str) -> None:
    model = Transformer(tiny(ffn=FFNSpec(method, METHOD_OPTIONS[method], "all")))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    src, tgt = torch.randint(4, 64, (4, 6)), torch.randint(4, 64, (4, 6))
    losses = []
    for _ in range(5):
        loss = model.loss(model(src, tgt[:, :-1]), tgt[:, 1:]) / tgt[:, 1:].numel()
        if method == "svd-o":
            from compressed_transformer.layers import model_kl

            loss = loss + 1e-6 * model_kl(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_mode_options_describe_fc1_and_are_swapped_for_fc2() -> None:
    options = {"ranks": [1, 2, 2, 1], "in_modes": [4, 4, 2], "out_modes": [4, 4, 4]}
    model = Transformer(tiny(ffn=FFNSpec("tt", options, "enc:0")))
    fc1, fc2 = model.encoder[0].ffn.fc1, model.encoder[0].ffn.fc2
    assert (fc1.in_features, fc1.out_features, fc2.in_features, fc2.out_features) == (32, 64, 64, 32)
    assert "in_modes=[4, 4, 4]" in fc2.extra_repr()


def test_tied_and_untied_embeddings() -> None:
    tied = Transformer(tiny())
    assert tied.src_embed is tied.tgt_embed and tied.output is None
    untied = Transformer(tiny(share_embeddings=False, tie_output=False))
    assert untied.src_embed is not untied.tgt_embed and untied.output is not None
    assert parameter_report(untied)["embeddings"] == 2 * parameter_report(tied)["embeddings"]


def test_activation_dropout_is_the_ffn_hidden_dropout_only() -> None:
    legacy = preset("tiny", dropout=0.2)
    assert legacy.activation_dropout is None and legacy.ffn_dropout == 0.2
    old = {k: v for k, v in legacy.to_dict().items() if k != "activation_dropout"}  # a checkpoint from before
    assert TransformerConfig.from_dict(old) == legacy
    model = Transformer(legacy.replace(activation_dropout=0.0))
    ffn = [m.dropout.p for m in model.modules() if isinstance(m, FeedForward)]
    others = [m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and ".ffn." not in n]
    assert ffn and set(ffn) == {0.0} and others and set(others) == {0.2}
    with pytest.raises(ValueError, match="activation_dropout"):
        preset("tiny", activation_dropout=1.0)


def test_a_tt_embedding_table_in_the_transformer_matches_its_dense_table() -> None:
    """Lookups of both stacks and the tied logits go through the TT cores; the model equals the dense model with
    the reconstructed table (and full TT-ranks reproduce the trained dense model)."""
    from compressed_transformer.compress import compress_embeddings_
    from compressed_transformer.layers import TTEmbedding

    torch.manual_seed(0)
    dense = Transformer(preset("tiny")).double().eval()
    src, tgt = torch.randint(1, 64, (2, 7)), torch.randint(1, 64, (2, 5))
    src[0, -2:] = dense.config.pad_id
    model = copy.deepcopy(dense)
    compress_embeddings_(model, "tt", ranks=64, filter=r"^(src|tgt)_embed$")
    assert isinstance(model.src_embed, TTEmbedding) and model.tgt_embed is model.src_embed
    with torch.no_grad():
        torch.testing.assert_close(model(src, tgt), dense(src, tgt), rtol=1e-9, atol=1e-9)
    small = copy.deepcopy(dense)
    compress_embeddings_(small, "tt", ranks=2, filter=r"^(src|tgt)_embed$")
    rebuilt = copy.deepcopy(dense)
    with torch.no_grad():
        rebuilt.src_embed.weight.copy_(small.src_embed.to_dense())
        torch.testing.assert_close(small(src, tgt), rebuilt(src, tgt), rtol=1e-9, atol=1e-9)
    assert parameter_report(small)["embeddings"] == small.src_embed.num_stored_params()


def test_compress_embeddings_of_an_untied_model_compresses_the_output_projection_too() -> None:
    torch.manual_seed(0)
    model = Transformer(preset("tiny", share_embeddings=False, tie_output=False))
    assert model.compress_embeddings_("tt", ranks=2) is model
    kinds = {type(m).__name__ for m in (model.src_embed, model.tgt_embed, model.output)}
    assert kinds == {"TTEmbedding", "TTLinear"} and model.src_embed is not model.tgt_embed
    svd = Transformer(preset("tiny", share_embeddings=False, tie_output=False)).compress_embeddings_("svd", rank=3)
    assert type(svd.output).__name__ == "LowRankLinear" and svd.output.rank == 3
    src, tgt = torch.randint(1, 64, (2, 5)), torch.randint(1, 64, (2, 4))
    assert model(src, tgt).shape == svd(src, tgt).shape == (2, 4, 64)
    # a prime vocabulary: the output projection takes the target table's padded modes, not a single 61-row core
    prime = Transformer(preset("tiny", vocab_size=61, share_embeddings=False, tie_output=False))
    prime.compress_embeddings_("tt", ranks=2)
    assert prime.output.padded and prime.output.out_modes == prime.tgt_embed.voc_modes
    assert prime.output.in_modes == prime.tgt_embed.emb_modes and prime(src % 61, tgt % 61).shape == (2, 4, 61)
    with pytest.raises(ValueError, match="unknown embedding method"):
        Transformer(preset("tiny")).compress_embeddings_("prune", sparsity=0.5)


def test_compress_embeddings_of_an_untied_model_to_a_ratio_and_its_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ratio=`` reaches the separate output projection too; a failure there puts the original tables back."""
    import compressed_transformer.compress as library

    for method in ("svd", "tt"):
        model = Transformer(preset("tiny", tie_output=False))
        model.compress_embeddings_(method, ratio=2)
        dense = model.config.vocab_size * model.config.d_model
        assert model.output.num_stored_params() <= dense / 2 and model.src_embed.num_stored_params() <= dense / 2

    def failing(*args, **kwargs):
        raise ValueError("output projection failed")

    model = Transformer(preset("tiny", share_embeddings=False, tie_output=False))
    tables = model.src_embed, model.tgt_embed
    monkeypatch.setattr(library, "compress_", failing)
    with pytest.raises(ValueError, match="output projection failed"):
        model.compress_embeddings_("svd", rank=2)
    assert (model.src_embed, model.tgt_embed) == tables and type(model.output) is torch.nn.Linear


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"pad_id": 64}, r"pad_id must be a token id in \[0, vocab_size=64\), got 64"),
        ({"bos_id": -1}, r"bos_id must be a token id"),
        ({"vocab_size": 3, "eos_id": 3}, r"eos_id must be a token id"),
        ({"d_model": 32.0}, r"d_model must be an int, got 32\.0"),
        ({"heads": True}, r"heads must be an int, got True"),
    ],
)
def test_special_ids_and_sizes_are_validated(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny(**changes)


def test_malformed_token_ids_are_a_value_error() -> None:
    model = Transformer(tiny()).eval()
    tgt = torch.tensor([[2, 5]])
    for src in (torch.zeros(1, 0, dtype=torch.long), torch.tensor([5, 6, 7])):
        with pytest.raises(ValueError, match=r"shape \(batch, length\) with length >= 1"):
            model(src, tgt)
    assert model(torch.tensor([[5]]), torch.tensor([[2]])).shape == (1, 1, 64)  # a batch of one, one token
