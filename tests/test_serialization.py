"""save_compressed / load_compressed_: a fresh dense model becomes the saved compressed one, exactly."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file, save_model
from torch import nn
from torch.testing import assert_close

from compressed_transformer.compress import compress_, compress_embeddings_, sparse_vd_to_pruned_
from compressed_transformer.layers import (
    METHODS,
    LowRankEmbedding,
    LowRankLinear,
    PrunedLinear,
    SparseVDLinear,
    TTLinear,
)
from compressed_transformer.serialization import (
    FORMAT,
    layer_structure,
    load_compressed_,
    read_structure,
    restructure_,
    save_compressed,
    saved_bytes,
)

OPTIONS = {
    "tt": {"ranks": 3},
    "tucker": {"ranks": 2},
    "svd": {"rank": 5},
    "prune": {"sparsity": 0.7},
    "sparse": {"sparsity": 0.7},
    "svd-o": {},
}


def encoder_layer(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.TransformerEncoderLayer(32, 4, 96, dropout=0.0, batch_first=True).eval()


def perturb_(model: nn.Module) -> None:
    """Move every parameter away from its conversion values (as fine-tuning would)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for m in model.modules():
            if isinstance(m, PrunedLinear):
                m.weight.mul_(m.mask)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_fresh_dense_model_loads_into_the_saved_compressed_model(method: str, tmp_path) -> None:
    model = encoder_layer(0)
    compress_(model, method, filter=r"linear[12]", **OPTIONS[method])
    perturb_(model)
    path = tmp_path / "model.safetensors"
    save_compressed(model, path)

    fresh = encoder_layer(1)  # another initialisation, still dense
    assert isinstance(fresh.linear1, nn.Linear)
    load_compressed_(fresh, path)
    assert layer_structure(fresh) == layer_structure(model)
    assert type(fresh.linear1) is METHODS[method] and type(fresh.linear2) is METHODS[method]
    expected, got = model.state_dict(), fresh.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_mixed_methods_shared_modules_and_tied_weights_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    shared = nn.Linear(16, 24)
    model = nn.ModuleDict({"a": shared, "b": shared, "c": nn.Linear(24, 16), "emb": nn.Embedding(10, 16)})
    model["out"] = nn.Linear(16, 10, bias=False)
    model["out"].weight = model["emb"].weight  # tied, as in a Transformer's embedding and output projection
    compress_(model, "tt", filter="^a$", ranks=2)
    compress_(model, "svd-o", filter="^c$", threshold=2.5)
    assert model["a"] is model["b"]
    path = tmp_path / "mixed.safetensors"
    save_compressed(model, path, metadata={"note": "hello"})

    torch.manual_seed(1)
    fresh_shared = nn.Linear(16, 24)
    fresh = nn.ModuleDict({"a": fresh_shared, "b": fresh_shared, "c": nn.Linear(24, 16), "emb": nn.Embedding(10, 16)})
    fresh["out"] = nn.Linear(16, 10, bias=False)
    fresh["out"].weight = fresh["emb"].weight
    load_compressed_(fresh, path)
    assert isinstance(fresh["a"], TTLinear) and fresh["a"] is fresh["b"]  # replaced once, under both names
    assert isinstance(fresh["c"], SparseVDLinear) and fresh["c"].threshold == 2.5
    assert fresh["out"].weight is fresh["emb"].weight
    assert torch.equal(fresh["emb"].weight, model["emb"].weight)
    assert_close(fresh["a"].to_dense(), model["a"].to_dense(), atol=0, rtol=0)
    structure, header = read_structure(path)
    assert header["format"] == FORMAT and header["note"] == "hello"
    assert set(structure) == {"a", "c"}


def test_loading_into_the_same_compressed_model_keeps_its_layers(tmp_path) -> None:
    model = encoder_layer(0)
    compress_(model, "svd", filter=r"linear1", rank=4)
    path = tmp_path / "m.safetensors"
    save_compressed(model, path)
    other = encoder_layer(1)
    compress_(other, "svd", filter=r"linear1", rank=4)
    layer = other.linear1
    load_compressed_(other, path)
    assert other.linear1 is layer  # same structure: kept, weights loaded into it
    assert torch.equal(layer.left, model.linear1.left)


def test_uncompressed_models_round_trip_too(tmp_path) -> None:
    model = encoder_layer(0)
    path = tmp_path / "dense.safetensors"
    save_compressed(model, path)
    fresh = encoder_layer(1)
    load_compressed_(fresh, path)
    assert torch.equal(fresh.linear1.weight, model.linear1.weight)
    assert read_structure(path)[0] == {}


def test_bad_files_and_mismatched_models_get_clear_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_compressed_(encoder_layer(0), tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="is a folder, not a file"):
        load_compressed_(encoder_layer(0), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"the folder .* does not exist"):
        save_compressed(encoder_layer(0), tmp_path / "no" / "such" / "x.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        read_structure(junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="not written by compressed_transformer"):
        load_compressed_(encoder_layer(0), plain)

    model = encoder_layer(0)
    compress_(model, "tt", filter=r"linear1", ranks=2)
    path = tmp_path / "tt.safetensors"
    save_compressed(model, path)
    with pytest.raises(ValueError, match="no module 'linear1'"):
        load_compressed_(nn.Sequential(nn.Linear(32, 96)), path)
    wrong_shape = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    untouched = wrong_shape.linear1
    with pytest.raises(
        ValueError, match=re.escape("is Linear(in=32, out=64, bias=True) but the saved layer is 32->96")
    ):
        load_compressed_(wrong_shape, path)
    assert wrong_shape.linear1 is untouched  # a failed restructure changes nothing
    other = encoder_layer(1)
    compress_(other, "svd", filter=r"linear1", rank=3)
    load_compressed_(other, path)  # a compressed layer of another structure is replaced too
    assert isinstance(other.linear1, TTLinear)
    with pytest.raises(ValueError, match=r"is a LayerNorm; expected nn\.Linear or a compressed layer"):
        restructure_(encoder_layer(0), {"norm1": read_structure(path)[0]["linear1"]})
    with pytest.raises(ValueError, match="unknown method 'zip'"):
        restructure_(
            encoder_layer(0),
            {"linear1": {"method": "zip", "in_features": 32, "out_features": 96, "bias": True, "options": {}}},
        )
    with pytest.raises(ValueError, match="invalid structure entry"):
        restructure_(encoder_layer(0), {"linear1": {"method": "tt"}})
    with pytest.raises(ValueError, match="cannot build 'tt'"):
        restructure_(
            encoder_layer(0),
            {
                "linear1": {
                    "method": "tt",
                    "in_features": 32,
                    "out_features": 96,
                    "bias": True,
                    "options": {"ranks": [1, 2]},
                }
            },
        )
    with pytest.raises(ValueError, match="reserved"):
        save_compressed(model, tmp_path / "x.safetensors", metadata={"format": "mine"})
    with pytest.raises(ValueError, match="strings"):
        save_compressed(model, tmp_path / "x.safetensors", metadata={"n": 3})


def test_weights_that_do_not_fit_raise_value_error(tmp_path) -> None:
    model = encoder_layer(0)
    compress_(model, "prune", filter=r"linear1", sparsity=0.5)
    path = tmp_path / "m.safetensors"
    save_compressed(model, path)
    bigger = nn.TransformerEncoderLayer(32, 4, 96, dropout=0.0, batch_first=True)
    bigger.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="do not fit"):
        load_compressed_(bigger, path)
    load_compressed_(bigger, path, strict=False)  # the extra module is left as it was
    assert torch.equal(bigger.linear1.mask, model.linear1.mask)
    assert json.loads(read_structure(path)[1]["compressed_layers"])["linear1"]["method"] == "prune"


class TinyLM(nn.Module):
    """An embedding, a hidden layer and an output projection tied to the embedding (as in most language models)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(50, 16, padding_idx=0)
        self.hidden = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embed(ids))))


def test_low_rank_embeddings_and_their_tied_projection_round_trip(tmp_path) -> None:
    model = TinyLM(0)
    compress_embeddings_(model, rank=4)
    compress_(model, "tt", filter="hidden", ranks=2)
    perturb_(model)
    assert model.head.left is model.embed.left  # still tied after "fine-tuning"
    path = tmp_path / "lm.safetensors"
    save_compressed(model, path)
    structure = read_structure(path)[0]
    assert structure["embed"]["method"] == "svd-embedding" and structure["head"]["tied_to"] == "embed"

    fresh = TinyLM(1)
    load_compressed_(fresh, path)
    assert isinstance(fresh.embed, LowRankEmbedding) and isinstance(fresh.head, LowRankLinear)
    assert fresh.head.left is fresh.embed.left and fresh.head.right is fresh.embed.right
    assert layer_structure(fresh) == layer_structure(model)
    ids = torch.tensor([[0, 3, 49, 7]])
    with torch.no_grad():
        assert_close(fresh(ids), model(ids), atol=0, rtol=0)
    load_compressed_(fresh, path)  # loading again keeps the layers (and the tie)
    assert fresh.head.left is fresh.embed.left


@pytest.mark.parametrize("voc_modes", [[5, 10], [6, 9]], ids=["exact", "padded"])  # 50 or 54 rows for 50 ids
def test_tt_embeddings_and_their_tied_projection_round_trip(tmp_path, voc_modes: list[int]) -> None:
    from compressed_transformer.layers import TTEmbedding, TTLinear

    model = TinyLM(0)
    compress_embeddings_(model, "tt", ranks=3, voc_modes=voc_modes, emb_modes=[4, 4])
    assert model.head.padded == (voc_modes == [6, 9])
    perturb_(model)
    path = tmp_path / "lm.safetensors"
    save_compressed(model, path)
    structure = read_structure(path)[0]
    assert set(structure) == {"embed", "head"}  # the table's own TTLinear is part of the table
    assert structure["embed"]["method"] == "tt-embedding" and structure["head"]["tied_to"] == "embed"
    fresh = TinyLM(1)
    load_compressed_(fresh, path)
    assert isinstance(fresh.embed, TTEmbedding) and isinstance(fresh.head, TTLinear)
    assert fresh.head.cores is fresh.embed.cores
    assert layer_structure(fresh) == layer_structure(model)
    ids = torch.tensor([[0, 3, 49, 7]])
    with torch.no_grad():
        assert_close(fresh(ids), model(ids), atol=0, rtol=0)


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()


CSR_PARTS = ("weight.csr_values", "weight.csr_crow", "weight.csr_col")


def test_pruned_layers_are_stored_as_their_kept_weights(tmp_path) -> None:
    dense_file, sparse_file, unpacked_file = (tmp_path / f"{n}.safetensors" for n in ("dense", "sparse", "unpacked"))
    save_compressed(mlp(0), dense_file)
    model = mlp(0)
    compress_(model, "prune", sparsity=0.9)
    model.shared = model[0]  # a shared pruned layer is packed under both names
    perturb_(model)
    save_compressed(model, sparse_file)
    save_compressed(model, unpacked_file, pack_sparse=False)
    dense_bytes = dense_file.stat().st_size
    assert saved_bytes(model) == sparse_file.stat().st_size and saved_bytes(mlp(0)) == dense_bytes
    # 10 % of the weights, float32 values + int16 columns: ~0.15 of the dense bytes, plus headers and biases
    assert sparse_file.stat().st_size < 0.2 * dense_bytes
    assert unpacked_file.stat().st_size > dense_bytes  # dense weight plus bool mask
    _, header = read_structure(sparse_file)
    assert json.loads(header["packed_layers"]) == ["0", "2", "shared"]
    assert json.loads(header["aliases"]) == {f"shared.{k}": f"0.{k}" for k in ("bias", *CSR_PARTS)}

    for path in (sparse_file, unpacked_file):
        fresh = mlp(1)
        fresh.shared = fresh[0]
        load_compressed_(fresh, path)
        assert isinstance(fresh[0], PrunedLinear) and fresh.shared is fresh[0]
        for key, value in model.state_dict().items():
            assert torch.equal(fresh.state_dict()[key], value), key
        x = torch.randn(5, 256)
        with torch.no_grad():
            assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_pruned_layers_stay_dense_where_csr_would_be_larger(tmp_path) -> None:
    model = mlp(0)
    compress_(model, "prune", filter="^0$", sparsity=0.1)  # 6 bytes per kept weight > 5 bytes per dense one
    compress_(model, "prune", filter="^2$", sparsity=0.3)
    path = tmp_path / "m.safetensors"
    save_compressed(model, path)
    assert json.loads(read_structure(path)[1]["packed_layers"]) == ["2"]
    fresh = load_compressed_(mlp(1), path)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_sparse_vd_models_ship_as_pruned_layers(tmp_path) -> None:
    model = mlp(0)
    compress_(model, "svd-o")
    with torch.no_grad():  # as after variational training: most weights with a large log alpha
        for layer in (model[0], model[2]):
            layer.log_sigma2.copy_(torch.where(torch.rand_like(layer.theta) < 0.95, 5.0, -12.0))
    x = torch.randn(6, 256)
    with torch.no_grad():
        expected = model(x)
    variational = tmp_path / "svd-o.safetensors"
    save_compressed(model, variational)
    assert sparse_vd_to_pruned_(model) == ["0", "2"]
    assert isinstance(model[0], PrunedLinear) and not model[0].training
    with torch.no_grad():
        assert_close(model(x), expected, atol=1e-6, rtol=1e-6)
    shipped = tmp_path / "pruned.safetensors"
    save_compressed(model, shipped)
    assert shipped.stat().st_size < 0.06 * variational.stat().st_size  # no log sigma^2, 5 % of theta
    fresh = load_compressed_(mlp(1), shipped)
    assert isinstance(fresh[2], PrunedLinear) and abs(fresh[2].sparsity - 0.95) < 0.01
    with torch.no_grad():
        assert_close(fresh(x), expected, atol=1e-6, rtol=1e-6)


def test_first_format_files_still_load(tmp_path) -> None:
    model = encoder_layer(0)
    compress_(model, "prune", filter=r"linear1", sparsity=0.5)
    path = tmp_path / "v1.safetensors"
    structure = json.dumps(layer_structure(model), sort_keys=True)
    save_model(model, str(path), metadata={"format": "compressed-transformer/1", "compressed_layers": structure})
    fresh = load_compressed_(encoder_layer(1), path)
    assert torch.equal(fresh.linear1.weight, model.linear1.weight)
    assert torch.equal(fresh.linear1.mask, model.linear1.mask)


def test_corrupt_packed_layers_and_aliases_get_clear_errors(tmp_path) -> None:
    model = mlp(0)
    compress_(model, "prune", filter="^0$", sparsity=0.8)
    path = tmp_path / "m.safetensors"
    save_compressed(model, path)
    tensors, header = load_file(path), read_structure(path)[1]

    def rewrite(name: str, changed: dict, **header_changes: str) -> None:
        save_file({**tensors, **changed}, str(tmp_path / name), metadata={**header, **header_changes})

    rewrite("columns.safetensors", {"0.weight.csr_col": tensors["0.weight.csr_col"] + 300})
    with pytest.raises(ValueError, match=r"packed pruned layer '0' is unreadable: CSR column indices out of range"):
        load_compressed_(mlp(1), tmp_path / "columns.safetensors")
    rewrite("alias.safetensors", {}, aliases=json.dumps({"0.bias": "9.bias"}))
    with pytest.raises(ValueError, match=r"alias of '9\.bias', which the file lacks"):
        load_compressed_(mlp(1), tmp_path / "alias.safetensors")
    rewrite("not-pruned.safetensors", {}, packed_layers=json.dumps(["2"]))
    with pytest.raises(ValueError, match="'2' is not a PrunedLinear"):
        load_compressed_(mlp(1), tmp_path / "not-pruned.safetensors")
    with pytest.raises(ValueError, match="reserved"):
        save_compressed(model, path, metadata={"aliases": "{}"})


def test_a_saved_compressed_layer_that_is_the_whole_model_is_refused_on_a_dense_one(tmp_path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "layer.safetensors"
    save_compressed(TTLinear.from_linear(nn.Linear(16, 32), ranks=2), path)
    dense = nn.Linear(16, 32)
    with pytest.raises(ValueError, match=r"the saved model is itself a 'tt' layer.*TTLinear\(16, 32"):
        load_compressed_(dense, path)
    assert list(dense.named_children()) == []  # not given a child named ''
    same = TTLinear(16, 32, **layer_structure(TTLinear.from_linear(nn.Linear(16, 32), ranks=2))[""]["options"])
    load_compressed_(same, path)  # the same structure loads


def _rewrite_header(path, out, **changes: str) -> None:
    save_file(load_file(path), str(out), metadata={**read_structure(path)[1], **changes})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("compressed_layers", "[]", "compressed-layer structure .* must be a JSON object"),
        ("compressed_layers", '"x"', "compressed-layer structure .* must be a JSON object"),
        ("compressed_layers", '{"0": {"method": ["tt"]}}', "invalid structure entry for layer '0'"),
        ("packed_layers", "{}", "packed-layer list .* must be a JSON list of names"),
        ("packed_layers", "null", "packed-layer list .* must be a JSON list of names"),
        ("aliases", "[]", "alias list .* must be a JSON object of names"),
        ("aliases", '{"0.bias": 5}', "alias list .* must be a JSON object of names"),
    ],
)
def test_headers_of_the_wrong_json_type_get_clear_errors(tmp_path, key: str, value: str, message: str) -> None:
    model = mlp(0)
    compress_(model, "prune", filter="^0$", sparsity=0.8)
    path, tampered = tmp_path / "m.safetensors", tmp_path / "tampered.safetensors"
    save_compressed(model, path)
    _rewrite_header(path, tampered, **{key: value})
    with pytest.raises(ValueError, match=message):
        load_compressed_(mlp(1), tampered)


def test_a_projection_tied_to_an_unrecorded_table_names_it(tmp_path) -> None:
    model = TinyLM(0)
    compress_embeddings_(model, rank=4)
    path, tampered = tmp_path / "lm.safetensors", tmp_path / "tampered.safetensors"
    save_compressed(model, path)
    structure = read_structure(path)[0]
    structure["head"]["tied_to"] = "hidden"
    _rewrite_header(path, tampered, compressed_layers=json.dumps(structure))
    fresh = TinyLM(1)
    with pytest.raises(ValueError, match="'head' is recorded as tied to 'hidden', which the file does not record as"):
        load_compressed_(fresh, tampered)
    assert isinstance(fresh.embed, nn.Embedding)  # left untouched


def test_bad_devices_are_reported_before_the_model_changes(tmp_path) -> None:
    model = encoder_layer(0)
    compress_(model, "svd", filter="linear1", rank=4)
    path = tmp_path / "m.safetensors"
    save_compressed(model, path)
    fresh = encoder_layer(1)
    with pytest.raises(ValueError, match=r"cannot load onto device 'gpu0': Invalid device string"):
        load_compressed_(fresh, path, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"cannot load onto device 'cuda'"):
            load_compressed_(fresh, path, device="cuda")
    assert isinstance(fresh.linear1, nn.Linear)
    load_compressed_(fresh, path, device=torch.device("cpu"))
    assert torch.equal(fresh.linear1.left, model.linear1.left)


def test_compressed_layers_the_file_stores_dense_are_named(tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    model = encoder_layer(0)
    compress_(model, "svd", filter="linear1", rank=4)
    save_compressed(model, path)
    other = encoder_layer(1)
    compress_(other, "tt", ranks=2)  # linear2 too, which the file stores as an nn.Linear
    with pytest.raises(ValueError, match=r"'linear2' \(TTLinear\).*stores them dense"):
        load_compressed_(other, path)
    assert isinstance(other.linear1, TTLinear)  # refused before any change
    load_compressed_(other, path, strict=False)  # as load_state_dict(strict=False): the rest is left as it is
    assert isinstance(other.linear1, LowRankLinear) and isinstance(other.linear2, TTLinear)
