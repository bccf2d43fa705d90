"""The seed's one-hidden-layer MNIST network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressed_transformer.compress import compress_
from compressed_transformer.layers import TTLinear
from compressed_transformer.models.mlp import MLP, MLPConfig
from compressed_transformer.size import stored_params


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def test_default_shape_and_parameter_count():
    model = MLP()
    assert (model.fc1.in_features, model.fc1.out_features, model.fc2.out_features) == (784, 256, 10)
    assert model.config.dense_params == 203_530 == sum(p.numel() for p in model.parameters())
    assert stored_params(model) == 203_530


@pytest.mark.parametrize("shape", [(5, 784), (5, 28, 28), (2, 3, 784)])
def test_forward_shapes(shape):
    out = MLP()(torch.randn(*shape))
    assert out.shape == (*shape[: -2 if shape[-1] == 28 else -1], 10)


def test_flattened_and_image_inputs_agree():
    model = MLP()
    images = torch.randn(4, 28, 28)
    torch.testing.assert_close(model(images), model(images.reshape(4, 784)))


def test_hidden_width_and_no_bias():
    config = MLPConfig(hidden=64, bias=False)
    model = MLP(config)
    assert model.fc1.bias is None and config.dense_params == 784 * 64 + 64 * 10


def test_seed_tt_network_counts_as_the_seed_did():
    # The seed's TT layer: 748 weights; with fc1's bias and a dense fc2 the network stores 3,574 -> 56.95x.
    fc1 = TTLinear(784, 256, in_modes=(7, 4, 7, 4), out_modes=(2, 8, 8, 2), ranks=[1, 2, 4, 2, 1])
    model = MLP(fc1=fc1)
    assert stored_params(model) == 748 + 256 + 2570
    assert round(203_530 / stored_params(model), 2) == 56.95
    assert model(torch.randn(3, 784)).shape == (3, 10)


def test_compress_swaps_layers_by_name():
    model = MLP()
    compress_(model, "svd", filter="fc1", rank=8)
    assert type(model.fc2) is nn.Linear and model.fc1.rank == 8
    assert model(torch.randn(2, 784)).shape == (2, 10)


@pytest.mark.parametrize("kwargs", [{"hidden": 0}, {"in_features": -1}, {"out_features": 2.5}])
def test_bad_config(kwargs):
    with pytest.raises(ValueError, match="must be a positive int"):
        MLPConfig(**kwargs)


def test_layer_of_the_wrong_shape():
    with pytest.raises(ValueError, match="fc1 must map 784 -> 256 features, got 784 -> 128"):
        MLP(fc1=nn.Linear(784, 128))
