"""The five compressed layers against ``nn.Linear``: parity, both forward paths, gradients, counts, state dicts,
``from_linear`` hygiene, input validation, Sparse VD's KL term and sparsification, and ``torch.compile``."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.testing import assert_close

from compressed_transformer.functional.tt import max_padding_rows, tt_matrix_to_dense
from compressed_transformer.layers import (
    METHODS,
    LowRankLinear,
    PrunedLinear,
    SparseLinear,
    SparseVDLinear,
    TTLinear,
    TuckerLinear,
    build_linear,
    cache_nbytes,
    model_kl,
)
from forced_paths import force_path

IN, OUT = 12, 8
ALL = list(METHODS)  # tt, tucker, svd, prune, svd-o
FACTORIZED = ["tt", "tucker", "svd"]  # the layers with a dense / factorised forward switch
LEADS = [(), (5,), (2, 3), (0,)]

# Small configurations; every option is given so that a fresh layer can be rebuilt from them.
OPTIONS = {
    "tt": {"in_modes": (2, 3, 2), "out_modes": (2, 2, 2), "ranks": [1, 3, 2, 1]},
    "tucker": {"in_modes": (3, 4), "out_modes": (2, 4), "ranks": [2, 3, 2, 3]},
    "svd": {"rank": 3},
    "prune": {},
    "sparse": {"nnz": 40},
    "svd-o": {"threshold": 3.0},
}

# from_linear at full rank / zero sparsity: the layer must reproduce the source exactly. Sparse VD starts with
# log sigma^2 = -20, so log alpha <= -20 - log(theta^2 + 1e-8) < 3 keeps every weight at eval.
FULL = {
    "tt": lambda linear: TTLinear.from_linear(linear, ranks=10**6),  # an int cap: every bond at its maximum
    "tucker": lambda linear: TuckerLinear.from_linear(linear, ranks=10**6),
    "svd": lambda linear: LowRankLinear.from_linear(linear, rank=min(linear.in_features, linear.out_features)),
    "prune": lambda linear: PrunedLinear.from_linear(linear, sparsity=0.0),
    "sparse": lambda linear: SparseLinear.from_linear(linear, sparsity=0.0),
    "svd-o": lambda linear: SparseVDLinear.from_linear(linear, log_sigma2_init=-20.0),
}

# from_linear with real compression.
COMPRESS = {
    "tt": lambda linear: TTLinear.from_linear(linear, ranks=2),
    "tucker": lambda linear: TuckerLinear.from_linear(linear, ranks=2),
    "svd": lambda linear: LowRankLinear.from_linear(linear, rank=2),
    "prune": lambda linear: PrunedLinear.from_linear(linear, sparsity=0.5),
    "sparse": lambda linear: SparseLinear.from_linear(linear, sparsity=0.5),
    "svd-o": lambda linear: SparseVDLinear.from_linear(linear),
}


def make(method: str, bias: bool = True, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A randomly initialised layer; pruned and Sparse VD layers get a nontrivial mask."""
    layer = METHODS[method](IN, OUT, bias, **OPTIONS[method], dtype=dtype)
    with torch.no_grad():
        if method == "prune":
            layer.set_mask_(torch.rand(OUT, IN) > 0.5)
        if method == "svd-o":
            layer.log_sigma2.uniform_(-8.0, 0.0)  # some weights have log alpha > 3
    return layer


def closed_form_params(layer: nn.Module, method: str) -> int:
    bias = OUT if layer.bias is not None else 0
    if method == "tt":
        r, o, i = layer.ranks, layer.out_modes, layer.in_modes
        return sum(r[k] * o[k] * i[k] * r[k + 1] for k in range(len(o))) + bias
    if method == "tucker":
        modes = [*layer.out_modes, *layer.in_modes]
        return math.prod(layer.ranks) + sum(n * r for n, r in zip(modes, layer.ranks, strict=True)) + bias
    if method == "svd":
        return layer.rank * (IN + OUT) + bias
    if method == "prune":
        return int(layer.mask.sum()) + bias
    if method == "sparse":
        return layer.values.numel() + bias
    return int((layer.log_alpha() <= layer.threshold).sum()) + bias


# --- parity with nn.Linear ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method", ALL)
def test_full_rank_layer_reproduces_linear(method: str, bias: bool, dtype: torch.dtype) -> None:
    linear = nn.Linear(IN, OUT, bias, dtype=dtype)
    layer = FULL[method](linear).eval()
    x = torch.randn(2, 5, IN, dtype=dtype)
    with torch.no_grad():
        assert_close(layer.to_dense(), linear.weight)
        assert_close(layer(x), linear(x))


@pytest.mark.parametrize("method", ["tt", "tucker"])
def test_full_rank_with_default_modes_reproduces_linear(method: str) -> None:
    linear = nn.Linear(784, 256)  # the seed's MNIST layer, balanced modes chosen by the layer
    layer = FULL[method](linear)
    x = torch.randn(4, 784)
    with torch.no_grad():
        assert_close(layer(x), linear(x), atol=1e-4, rtol=1e-4)


def test_sparse_vd_train_mode_adds_only_tiny_noise_at_log_sigma2_minus_20() -> None:
    linear = nn.Linear(IN, OUT)
    layer = FULL["svd-o"](linear).train()
    x = torch.randn(5, IN)
    with torch.no_grad():
        # The sampled pre-activation has std sqrt(x^2 e^-20 + 1e-8) ~ 1e-4.
        assert_close(layer(x), linear(x), atol=1e-3, rtol=0)


# --- forward ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("method", ALL)
def test_forward_equals_dense_weight_product(method: str, lead, bias: bool) -> None:
    layer = make(method, bias).eval()
    x = torch.randn(*lead, IN)
    y = layer(x)
    assert y.shape == (*lead, OUT)
    expected = x @ layer.to_dense().T + (layer.bias if bias else 0)
    assert_close(y, expected)


@pytest.mark.parametrize("factorized", [True, False], ids=["factorized", "dense"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("method", FACTORIZED)
def test_both_forward_paths_equal_dense_weight_product(
    monkeypatch: pytest.MonkeyPatch, method: str, lead, bias: bool, factorized: bool
) -> None:
    layer = make(method, bias)
    calls = force_path(monkeypatch, layer, factorized)
    x = torch.randn(*lead, IN)
    y = layer(x)
    assert calls == [math.prod(lead)], "the forward no longer asks the hook force_path patches; update it"
    assert y.shape == (*lead, OUT)
    assert_close(y, x @ layer.to_dense().T + (layer.bias if bias else 0))


@pytest.mark.parametrize("factorized", [True, False], ids=["factorized", "dense"])
@pytest.mark.parametrize("in_features, out_features", [(7, 5), (1, 4), (12, 1), (13, 26)])
@pytest.mark.parametrize("method", ["tt", "tucker"])
def test_default_modes_for_awkward_sizes(
    monkeypatch: pytest.MonkeyPatch, method: str, in_features: int, out_features: int, factorized: bool
) -> None:
    linear = nn.Linear(in_features, out_features)
    layer = FULL[method](linear)
    assert math.prod(layer.in_modes) == in_features and math.prod(layer.out_modes) == out_features
    force_path(monkeypatch, layer, factorized)
    x = torch.randn(3, in_features)
    with torch.no_grad():
        assert_close(layer(x), linear(x))


def test_a_full_tt_rank_list_fixes_the_number_of_cores() -> None:
    """6 has two prime factors, but [1, 2, 2, 1] asks for three cores: modes of 1 fill the rest ((3, 2, 1) is
    balanced enough not to pad; 10's (5, 2, 1) is not, and pads to (3, 2, 2))."""
    linear = nn.Linear(64, 6)
    layer = TTLinear(64, 6, ranks=[1, 2, 2, 1])
    assert (len(layer.cores), layer.out_modes, math.prod(layer.in_modes)) == (3, [3, 2, 1], 64)
    exact = TTLinear.from_linear(linear, ranks=[1, 12, 4, 1])  # the largest ranks these modes allow: exact
    assert len(exact.cores) == 3
    assert_close(exact.to_dense(), linear.weight.detach(), atol=1e-5, rtol=1e-5)
    assert TTLinear(64, 10, ranks=[1, 2, 2, 1]).out_modes == [3, 2, 2]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("method", ALL)
def test_weight_property_is_the_weight_the_forward_applies(method: str, mode: str) -> None:
    """``.weight`` against the layer's own forward on the identity (bias removed), in training mode (rebuilt) and
    in eval mode without autograd (the cached copy)."""
    layer = make(method).train(mode == "train")
    with torch.no_grad():
        applied = (layer(torch.eye(IN)) - layer.bias).T if mode == "eval" or method != "svd-o" else None
        weight = layer.weight * layer.mask if method == "prune" else layer.weight
    assert weight.shape == (OUT, IN)
    if applied is not None:  # (a Sparse VD layer in training mode samples its weights)
        assert_close(weight, applied, atol=1e-5, rtol=1e-5)
    assert_close(weight, layer.to_dense())


def test_sparse_vd_eval_drops_weights_above_threshold() -> None:
    layer = make("svd-o").eval()
    keep = layer.log_alpha() <= 3.0
    assert 0 < int(keep.sum()) < keep.numel()
    assert_close(layer.to_dense(), layer.theta * keep)
    assert layer.sparsity == pytest.approx(1 - float(keep.float().mean()))


def test_sparse_vd_train_mode_samples_the_local_reparameterisation() -> None:
    layer = make("svd-o", dtype=torch.float64).train()
    x = torch.randn(IN, dtype=torch.float64)
    with torch.no_grad():
        samples = layer(x.expand(40000, IN))  # (40000, OUT): independent draws for one input
        mean = x @ layer.theta.T + layer.bias
        var = (x * x) @ layer.log_sigma2.exp().T
    assert_close(samples.mean(0), mean, atol=4 * float(var.max().sqrt()) / 200, rtol=0)
    assert_close(samples.var(0), var + 1e-8, rtol=0.05, atol=0)


# --- gradients ----------------------------------------------------------------------------------------------------


def gradcheck_layer(layer: nn.Module, x: torch.Tensor, reseed: bool = False) -> None:
    """gradcheck with respect to the input and every parameter of ``layer``."""
    names = [name for name, _ in layer.named_parameters()]
    values = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]

    def run(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        if reseed:  # the same noise on every call makes a stochastic forward a deterministic function
            torch.manual_seed(1)
        return functional_call(layer, dict(zip(names, params, strict=True)), (x,))

    assert torch.autograd.gradcheck(run, (x.requires_grad_(), *values))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method", ALL)
def test_gradcheck(method: str, bias: bool) -> None:
    layer = make(method, bias, dtype=torch.float64).eval()  # Sparse VD at eval: deterministic
    gradcheck_layer(layer, torch.randn(2, 3, IN, dtype=torch.float64))


@pytest.mark.parametrize("factorized", [True, False], ids=["factorized", "dense"])
@pytest.mark.parametrize("method", FACTORIZED)
def test_gradcheck_both_paths(monkeypatch: pytest.MonkeyPatch, method: str, factorized: bool) -> None:
    layer = make(method, dtype=torch.float64)
    force_path(monkeypatch, layer, factorized)
    gradcheck_layer(layer, torch.randn(3, IN, dtype=torch.float64))


def test_gradcheck_sparse_vd_train_mode() -> None:
    layer = make("svd-o", dtype=torch.float64).train()
    gradcheck_layer(layer, torch.randn(3, IN, dtype=torch.float64), reseed=True)


@pytest.mark.parametrize("method", ALL)
def test_gradients_reach_every_parameter(method: str) -> None:
    layer = make(method).train()
    loss = layer(torch.randn(6, IN)).pow(2).sum() + (layer.kl() if method == "svd-o" else 0)
    loss.backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    if method == "prune":
        assert (layer.weight.grad[~layer.mask] == 0).all()


# --- parameter counts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method", ALL)
def test_num_stored_params_matches_closed_form(method: str, bias: bool) -> None:
    layer = make(method, bias)
    assert layer.num_stored_params() == closed_form_params(layer, method)
    if method in FACTORIZED:  # factorised layers store exactly their parameters
        assert layer.num_stored_params() == sum(p.numel() for p in layer.parameters())


def test_seed_mnist_tt_layer_stores_748_weights() -> None:
    kwargs = {"in_modes": (7, 4, 7, 4), "out_modes": (2, 8, 8, 2), "ranks": [1, 2, 4, 2, 1]}
    layer = TTLinear(784, 256, **kwargs)
    assert [tuple(c.shape) for c in layer.cores] == [(1, 2, 7, 2), (2, 8, 4, 4), (4, 8, 7, 2), (2, 2, 4, 1)]
    assert layer.num_stored_params() == 748 + 256
    assert TTLinear(784, 256, bias=False, **kwargs).num_stored_params() == 748
    assert layer(torch.randn(3, 784)).shape == (3, 256)


@pytest.mark.parametrize("method", FACTORIZED)
def test_init_matches_linear_weight_variance(method: str) -> None:
    options = {"tt": {"ranks": 4}, "tucker": {"ranks": 4}, "svd": {"rank": 16}}[method]
    variances = [float(METHODS[method](256, 128, **options).to_dense().detach().var()) for _ in range(5)]
    target = 1.0 / (3 * 256)  # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in))
    assert 0.5 * target < sum(variances) / len(variances) < 2.0 * target


# --- pruning through training -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda params: torch.optim.Adam(params, lr=0.05),
        lambda params: torch.optim.Adam(params, lr=0.05, weight_decay=0.1),
        lambda params: torch.optim.AdamW(params, lr=0.05, weight_decay=0.1),
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1),
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    ],
    ids=["adam", "adam-l2", "adamw", "sgd-momentum-wd", "sgd-nesterov-wd"],
)
def test_pruned_weights_stay_zero_through_training(optimizer) -> None:
    layer = PrunedLinear.from_linear(nn.Linear(IN, OUT), sparsity=0.6)
    mask = layer.mask.clone()
    kept_before = layer.weight.detach()[mask].clone()
    opt = optimizer(layer.parameters())
    x, target = torch.randn(32, IN), torch.randn(32, OUT)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.mse_loss(layer(x), target).backward()
        opt.step()
    assert torch.equal(layer.mask, mask)
    assert (layer.weight[~mask] == 0).all()  # stored
    assert (layer.to_dense()[~mask] == 0).all()  # effective
    assert not torch.equal(layer.weight.detach()[mask], kept_before)  # the kept weights did train
    assert layer.num_stored_params() == int(mask.sum()) + OUT


def test_set_mask_zeroes_newly_pruned_weights() -> None:
    layer = PrunedLinear(IN, OUT)
    mask = torch.rand(OUT, IN) > 0.3
    layer.set_mask_(mask)
    assert (layer.weight[~mask] == 0).all()
    assert layer.sparsity == pytest.approx(1 - float(mask.float().mean()))
    with pytest.raises(ValueError, match=r"mask must have shape \(8, 12\)"):
        layer.set_mask_(torch.ones(IN, OUT, dtype=torch.bool))


def test_set_mask_refuses_values_other_than_zero_and_one() -> None:
    layer = PrunedLinear(IN, OUT)
    layer.set_mask_((torch.rand(OUT, IN) > 0.5).float())  # a 0/1 mask of another dtype is fine
    soft = torch.rand(OUT, IN)  # e.g. a weight or scores passed by mistake: .to(bool) would keep everything
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        layer.set_mask_(soft)


@pytest.mark.parametrize("method", ["prune", "sparse", "svd-o"])
def test_sparse_layers_keep_the_input_gradient_at_zero_tokens(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """An empty batch through a frozen layer in eval mode (the cached CSR path when the cost model prefers it,
    which it does at any sparsity for 0 tokens on large layers) still depends on the input, as through nn.Linear."""
    for module in ("pruned", "sparse", "sparse_vd"):
        monkeypatch.setattr(f"compressed_transformer.layers.{module}.sparse_is_faster", lambda *args: True)
    layer = make(method, dtype=torch.float64).eval().requires_grad_(False)
    for lead in [(0,), (2, 0)]:
        x = torch.randn(*lead, IN, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        assert y.shape == (*lead, OUT) and y.requires_grad
        (grad,) = torch.autograd.grad(y.sum(), x)
        assert grad.shape == x.shape
    assert layer.forward_path(0) == "dense" and layer.forward_path(3) == "csr"


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.9])
def test_pruned_from_linear_keeps_the_largest_weights(sparsity: float) -> None:
    linear = nn.Linear(IN, OUT)
    layer = PrunedLinear.from_linear(linear, sparsity=sparsity)
    assert int((~layer.mask).sum()) == round(sparsity * IN * OUT)
    assert_close(layer.to_dense(), linear.weight * layer.mask)
    if sparsity:
        assert linear.weight[layer.mask].abs().min() > linear.weight[~layer.mask].abs().max()


# --- Sparse VD ----------------------------------------------------------------------------------------------------


def test_sparse_vd_kl_matches_formula() -> None:
    layer = make("svd-o", dtype=torch.float64)
    with torch.no_grad():
        layer.theta.mul_(torch.rand_like(layer.theta) * 3)
    k1, k2, k3 = 0.63576, 1.87320, 1.48695
    la = (layer.log_sigma2 - torch.log(layer.theta**2 + 1e-8)).clamp(-10, 10)
    expected = -(k1 / (1 + torch.exp(-k2 - k3 * la)) - 0.5 * torch.log1p(torch.exp(-la)) - k1).sum()
    assert_close(layer.kl(), expected)


def test_model_kl_sums_sparse_vd_layers() -> None:
    model = nn.Sequential(make("svd-o"), nn.ReLU(), nn.Linear(OUT, OUT), SparseVDLinear(OUT, 4))
    assert_close(model_kl(model), model[0].kl() + model[3].kl())
    empty = model_kl(nn.Sequential(nn.Linear(3, 3)))
    assert empty.shape == () and float(empty) == 0.0


def test_sparse_vd_learns_sparsity_on_a_toy_regression() -> None:
    """Linear regression where only three of twenty inputs matter: the ELBO drives the rest to log alpha > 3."""
    n, relevant = 256, [0, 5, 11]
    x = torch.randn(n, 20)
    w = torch.zeros(20)
    w[relevant] = torch.tensor([2.0, -3.0, 1.5])
    y = x @ w + 0.1 * torch.randn(n)
    layer = SparseVDLinear(20, 1)
    steps = 500
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    for _ in range(steps):
        nll = 0.5 * (layer(x).squeeze(-1) - y).pow(2).sum()  # Gaussian likelihood, unit variance
        loss = (nll + layer.kl()) / n  # negative ELBO per example
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    log_alpha = layer.log_alpha().detach()[0]
    irrelevant = torch.ones(20, dtype=torch.bool)
    irrelevant[relevant] = False
    assert (log_alpha[irrelevant] > 3).float().mean() >= 0.8
    assert (log_alpha[~irrelevant] < 3).all()
    layer.eval()
    with torch.no_grad():
        assert nn.functional.mse_loss(layer(x).squeeze(-1), y) < 0.05  # the noise variance is 0.01
    assert layer.sparsity >= 0.6
    pruned = layer.to_pruned()
    assert_close(pruned(x), layer(x))
    assert pruned.num_stored_params() == layer.num_stored_params()


@pytest.mark.parametrize("bias", [True, False])
def test_sparse_vd_to_pruned_gives_the_same_eval_output(bias: bool) -> None:
    layer = make("svd-o", bias).eval()
    pruned = layer.to_pruned()
    assert isinstance(pruned, PrunedLinear)
    x = torch.randn(2, 5, IN)
    assert_close(pruned(x), layer(x))
    assert torch.equal(pruned.mask, layer.mask())
    assert pruned.num_stored_params() == layer.num_stored_params()
    assert pruned.sparsity == pytest.approx(layer.sparsity)


# --- state dicts --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method", ALL)
def test_state_dict_round_trip(tmp_path, method: str, bias: bool) -> None:
    layer = make(method, bias).eval()
    path = tmp_path / "layer.pt"
    torch.save(layer.state_dict(), path)
    fresh = METHODS[method](IN, OUT, bias, **OPTIONS[method]).eval()
    x = torch.randn(4, IN)
    assert not torch.allclose(fresh(x), layer(x))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert_close(fresh(x), layer(x))
    assert fresh.num_stored_params() == layer.num_stored_params()


@pytest.mark.parametrize("method", ALL)
def test_built_on_meta_then_materialised_and_loaded(method: str) -> None:
    """The usual route for large models: build on the meta device (no memory), ``to_empty``, load the weights."""
    layer = make(method).eval()
    with torch.device("meta"):
        empty = METHODS[method](IN, OUT, True, **OPTIONS[method])
    assert all(t.is_meta for t in [*empty.parameters(), *empty.buffers()])
    assert [b.dtype for b in empty.buffers()] == [b.dtype for b in layer.buffers()]  # index buffers stay integers
    fresh = empty.to_empty(device="cpu").eval()
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, IN)
    assert_close(fresh(x), layer(x))


@pytest.mark.parametrize("method", ALL)
def test_frozen_parameters_stay_frozen_through_loading(method: str) -> None:
    """Even where loading replaces a parameter (a SparseLinear given another number of stored weights)."""
    layer = make(method).requires_grad_(False)
    layer.load_state_dict(make(method).state_dict() if method != "sparse" else SparseLinear(IN, OUT).state_dict())
    assert not any(p.requires_grad for p in layer.parameters())


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("method", ALL)
def test_rejects_an_input_of_the_wrong_width(method: str, mode: str) -> None:
    """As nn.Linear does, on every path (a CSR or factorised kernel would otherwise reshape it without looking),
    also for an input of no rows."""
    layer = make(method).train(mode == "train")
    for shape in [(3, IN - 1), (0, IN + 1), (IN + 4,), ()]:
        with pytest.raises(ValueError, match=rf"expected an input of shape \(\.\.\., {IN}\)"):
            layer(torch.randn(shape))


# --- from_linear --------------------------------------------------------------------------------------------------


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ALL)
def test_from_linear_leaves_source_alone_and_copies_device_and_dtype(
    method: str, dtype: torch.dtype, device: str
) -> None:
    linear = nn.Linear(IN, OUT, dtype=dtype, device=device)
    before = copy.deepcopy(linear.state_dict())
    layer = COMPRESS[method](linear)
    for name, tensor in linear.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(p.requires_grad and p.grad is None for p in linear.parameters())
    for name, param in layer.named_parameters():
        assert param.dtype == dtype and param.device == linear.weight.device, name
        assert param.requires_grad, name
    assert all(buffer.device == linear.weight.device for buffer in layer.buffers())
    with torch.no_grad():  # the new layer does not alias the source's storage
        for param in layer.parameters():
            param.add_(1.0)
    for name, tensor in linear.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    y = layer(torch.randn(3, IN, dtype=dtype, device=device))
    assert y.dtype == dtype and y.device == linear.weight.device


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize(
    "module", [nn.Conv1d(IN, OUT, 1), nn.Embedding(IN, OUT), nn.Bilinear(IN, IN, OUT)], ids=lambda m: type(m).__name__
)
def test_from_linear_rejects_non_linear_modules(method: str, module: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"from_linear expects an nn.Linear, got " + type(module).__name__):
        COMPRESS[method](module)


def test_tt_from_linear_with_eps_meets_the_bound() -> None:
    linear = nn.Linear(64, 32)
    weight = linear.weight.detach()
    for eps in (0.2, 0.5, 0.8):
        approx = TTLinear.from_linear(linear, eps=eps).to_dense().detach()
        assert float(torch.linalg.matrix_norm(weight - approx) / torch.linalg.matrix_norm(weight)) <= eps + 1e-5


def test_from_linear_rank_options() -> None:
    linear = nn.Linear(IN, OUT)
    tt = TTLinear.from_linear(linear, ranks=[1, 2, 3, 1], in_modes=(2, 3, 2), out_modes=(2, 2, 2))
    assert tt.ranks == [1, 2, 3, 1]
    assert TuckerLinear.from_linear(linear, ranks=[1, 2, 3, 2], out_modes=(2, 4), in_modes=(3, 4)).ranks == [1, 2, 3, 2]
    assert LowRankLinear.from_linear(linear, energy=1.0).rank == OUT
    threshold = float(linear.weight.detach().abs().median())
    pruned = PrunedLinear.from_linear(linear, threshold=threshold)
    assert torch.equal(pruned.mask, linear.weight.abs() > threshold)


def test_tucker_hooi_is_no_worse_than_hosvd() -> None:
    linear = nn.Linear(IN, OUT)
    weight = linear.weight.detach()
    errors = [
        float(
            torch.linalg.matrix_norm(weight - TuckerLinear.from_linear(linear, ranks=2, n_iter=n).to_dense().detach())
        )
        for n in (0, 10)
    ]
    assert errors[1] <= errors[0] + 1e-6


# --- bad input ----------------------------------------------------------------------------------------------------


BAD_CONSTRUCTORS = [
    (lambda: TTLinear(IN, OUT, in_modes=(2, 3, 3), out_modes=(2, 2, 2)), r"in_modes=\[2, 3, 3\] multiply to 18"),
    (lambda: TTLinear(IN, OUT, in_modes=(2, 3, 2), out_modes=(2, 2, 3)), r"out_modes=\[2, 2, 3\] multiply to 12"),
    (lambda: TTLinear(IN, OUT, in_modes=(3, 4), out_modes=(2, 2, 2)), "same length"),
    (lambda: TTLinear(IN, OUT, in_modes=(0, 12), out_modes=(2, 4)), "must be positive ints"),
    (lambda: TTLinear(IN, OUT, ranks=0), "ranks must be >= 1"),
    (lambda: TTLinear(IN, OUT, in_modes=(2, 3, 2), out_modes=(2, 2, 2), ranks=[1, 0, 2, 1]), r"ranks\[1\]=0"),
    (lambda: TTLinear(IN, OUT, in_modes=(2, 3, 2), out_modes=(2, 2, 2), ranks=[1, 5, 2, 1]), "maximal TT-rank"),
    (lambda: TTLinear(IN, OUT, in_modes=(2, 3, 2), out_modes=(2, 2, 2), ranks=[1, 2, 1]), "must have 4 entries"),
    (lambda: TuckerLinear(IN, OUT, in_modes=(3, 3), out_modes=(2, 4)), r"in_modes=\[3, 3\] multiply to 9"),
    (lambda: TuckerLinear(IN, OUT, ranks=0), "ranks must be >= 1"),
    (lambda: TuckerLinear(IN, OUT, in_modes=(3, 4), out_modes=(2, 4), ranks=[3, 3, 2, 3]), r"outside \[1, 2\]"),
    (lambda: TuckerLinear(IN, OUT, in_modes=(3, 4), out_modes=(2, 4), ranks=[2, 2]), "one rank per mode"),
    (lambda: LowRankLinear(IN, OUT, rank=0), r"rank must be an int in \[1, 8\]"),
    (lambda: LowRankLinear(IN, OUT, rank=9), r"rank must be an int in \[1, 8\]"),
    (lambda: LowRankLinear(IN, OUT, rank=True), r"rank must be an int in \[1, 8\] for 12->8, got True"),
    (lambda: PrunedLinear(0, OUT), "in_features must be a positive int"),
    (lambda: SparseVDLinear(IN, -1), "out_features must be a positive int"),
    (lambda: LowRankLinear(IN, 8.0, rank=2), "out_features must be a positive int"),
]


@pytest.mark.parametrize("build, match", BAD_CONSTRUCTORS)
def test_constructors_reject_bad_input(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


BAD_FROM_LINEAR = [
    (lambda lin: TTLinear.from_linear(lin), "needs ranks="),
    (lambda lin: TTLinear.from_linear(lin, eps=0.0), r"eps must be in \(0, 1\)"),
    (lambda lin: TTLinear.from_linear(lin, eps=1.0), r"eps must be in \(0, 1\)"),
    (lambda lin: TTLinear.from_linear(lin, ranks=-1), "ranks must be >= 1"),
    (lambda lin: TTLinear.from_linear(lin, in_modes=(2, 2, 2), out_modes=(2, 2, 2), ranks=2), "multiply to 8"),
    (
        lambda lin: TTLinear.from_linear(lin, in_modes=(2, 3, 2), out_modes=(2, 2, 2), ranks=[1, 4, 5, 1]),
        "maximal TT-rank",
    ),  # never silently clipped
    (lambda lin: TuckerLinear.from_linear(lin, ranks=[2, 5, 2, 2], out_modes=(2, 4), in_modes=(3, 4)), "outside"),
    (lambda lin: TuckerLinear.from_linear(lin, ranks=2, n_iter=-1), "n_iter must be >= 0"),
    (lambda lin: LowRankLinear.from_linear(lin), "exactly one of rank= or energy="),
    (lambda lin: LowRankLinear.from_linear(lin, rank=9), r"rank must be in \[1, 8\]"),
    (lambda lin: LowRankLinear.from_linear(lin, energy=1.5), r"energy must be in \(0, 1\]"),
    (lambda lin: PrunedLinear.from_linear(lin), "exactly one of sparsity= or threshold="),
    (lambda lin: PrunedLinear.from_linear(lin, sparsity=0.5, threshold=0.1), "exactly one of sparsity="),
    (lambda lin: PrunedLinear.from_linear(lin, sparsity=1.0), r"sparsity must be in \[0, 1\)"),
    (lambda lin: PrunedLinear.from_linear(lin, sparsity=-0.1), r"sparsity must be in \[0, 1\)"),
]


@pytest.mark.parametrize("convert, match", BAD_FROM_LINEAR)
def test_from_linear_rejects_bad_options(convert, match: str) -> None:
    linear = nn.Linear(IN, OUT)
    with pytest.raises(ValueError, match=match):
        convert(linear)


def test_build_linear() -> None:
    assert type(build_linear("dense", IN, OUT)) is nn.Linear
    for method in ALL:
        layer = build_linear(method, IN, OUT, bias=False, dtype=torch.float64, **OPTIONS[method])
        assert isinstance(layer, METHODS[method]) and layer.bias is None
        assert layer(torch.randn(2, IN, dtype=torch.float64)).shape == (2, OUT)
    assert build_linear("prune", IN, OUT, sparsity=0.5).sparsity == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown method 'cp'; choose one of"):
        build_linear("cp", IN, OUT)
    with pytest.raises(ValueError, match="invalid options for method 'svd'"):
        build_linear("svd", IN, OUT, ranks=2)
    with pytest.raises(ValueError, match="method 'dense' takes no options"):
        build_linear("dense", IN, OUT, rank=2)


@pytest.mark.parametrize("method", ALL)
def test_extra_repr_describes_the_layer(method: str) -> None:
    text = repr(make(method))
    assert text.startswith(METHODS[method].__name__)
    assert "in_features=12, out_features=8, bias=True" in text


# --- torch.compile ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ALL)
def test_torch_compile(method: str) -> None:
    """Dynamo traces each forward into one graph (``fullgraph``) and AOT autograd differentiates it; the
    ``aot_eager`` backend keeps this fast on CPU (no C++ code generation)."""
    layer = make(method).eval()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, IN)
    assert_close(compiled(x), layer(x))
    layer.train()
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


class _Halve(nn.Module):
    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value * 0.5


@pytest.mark.parametrize(
    ("method", "name"), [("tt", "bias"), ("tucker", "core"), ("tucker", "bias"), ("svd", "left"), ("prune", "weight")]
)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_parametrized_and_torch_pruned_tensors_reach_the_forward(method: str, name: str, mode: str) -> None:
    """torch.nn.utils.parametrize / prune move a parameter out of ``_parameters``: the forward must still use the
    (parametrized) value, on every path."""
    from torch.nn.utils import parametrize, prune

    layer = make(method).train(mode == "train")
    parametrize.register_parametrization(layer, name, _Halve())
    x = torch.randn(3, IN)
    bias = layer.bias if layer.bias is not None else 0
    with torch.no_grad():
        assert_close(layer(x), x @ layer.to_dense().T + bias)  # to_dense reads the parametrized value
    pruned = make(method).train(mode == "train")
    prune.l1_unstructured(pruned, "bias", amount=0.5)
    with torch.no_grad():
        y = pruned(x)
    assert_close(y, x @ pruned.to_dense().T + pruned.bias)
    assert int((pruned.bias == 0).sum()) == OUT // 2


# --- TT outputs padded to modes that factorise (a prime vocabulary) -----------------------------------------------

PADDED = {"in_modes": (2, 3, 2), "out_modes": (3, 1, 3), "ranks": [1, 3, 2, 1]}  # 9 TT rows for OUT = 8 outputs


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("factorized", [True, False], ids=["factorized", "dense"])
@pytest.mark.parametrize("bias", [True, False])
def test_padded_tt_outputs_equal_the_dense_weight_product_with_its_gradients(
    monkeypatch: pytest.MonkeyPatch, bias: bool, factorized: bool, mode: str
) -> None:
    """Every path (factorised or rebuilt, trained or eval-cached) leaves out the padding row, values and
    gradients alike, and returns a contiguous ``(..., out_features)`` tensor as ``nn.Linear`` does."""
    torch.manual_seed(0)
    layer = TTLinear(IN, OUT, bias, **PADDED)
    assert layer.padded and layer.to_dense().shape == layer.weight.shape == (OUT, IN)
    calls = force_path(monkeypatch, layer, factorized)
    x = torch.randn(5, 2 * IN)[:, ::2]  # non-contiguous
    if mode == "eval":
        layer.eval()
        with torch.no_grad():
            expected = x @ layer.to_dense().T + (layer.bias if bias else 0)
            for _ in range(2):  # the second forward is served by the eval cache
                y = layer(x)
                assert y.shape == (5, OUT) and y.is_contiguous()
                assert_close(y, expected)
        if not factorized:  # the cached weight holds no padding row: what cache_nbytes reports is what it holds
            (cached,) = [value for _, value in layer.__dict__["_eval_cache"]._entries.values()]
            assert cached.untyped_storage().nbytes() == cache_nbytes(layer) == OUT * IN * 4
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the product's dtype on every path, as nn.Linear's
            assert layer(x).dtype == torch.bfloat16
        return
    y = layer(x.requires_grad_())
    assert calls and y.shape == (5, OUT) and y.is_contiguous()
    grad_out = torch.randn(5, OUT)
    params = [x, *layer.parameters()]
    got = torch.autograd.grad(y, params, grad_out)
    reference = F.linear(x, layer.to_dense(), layer.bias)  # autograd through the reconstruction
    assert_close(y, reference)
    for mine, theirs in zip(got, torch.autograd.grad(reference, params, grad_out), strict=True):
        assert_close(mine, theirs)


@pytest.mark.parametrize("factorized", [True, False], ids=["factorized", "dense"])
def test_gradcheck_padded_tt(monkeypatch: pytest.MonkeyPatch, factorized: bool) -> None:
    layer = TTLinear(IN, OUT, **PADDED, dtype=torch.float64)
    force_path(monkeypatch, layer, factorized)
    gradcheck_layer(layer, torch.randn(3, IN, dtype=torch.float64))


def test_padded_tt_from_linear_and_its_bounds() -> None:
    """At full rank the padded TT-SVD reproduces the layer (its padding rows are zero); ``out_modes`` may pad the
    outputs by at most ``max_padding_rows``, and never fall short."""
    torch.manual_seed(0)
    linear = nn.Linear(IN, 37).double()  # 37 is prime: (5, 4, 2) pads it to 40
    layer = TTLinear.from_linear(linear, ranks=10**6, in_modes=[2, 3, 2], out_modes=[5, 4, 2])
    x = torch.randn(4, IN, dtype=torch.float64)
    assert_close(layer(x), linear(x))
    padding_rows = tt_matrix_to_dense(list(layer.cores))[37:]
    assert padding_rows.shape == (3, IN) and padding_rows.abs().max() < 1e-12
    assert "padding=3" in repr(layer) and layer.num_stored_params() == sum(c.numel() for c in layer.cores) + 37
    assert max_padding_rows(37) == 4
    for out_modes in ([3, 3, 5], [3, 4, 3]):  # 45: 8 rows of padding; 36: too few rows
        with pytest.raises(ValueError, match=r"product is 37 to 41 \(e.g. \[5, 4, 2\]\)"):
            TTLinear(IN, 37, in_modes=[2, 3, 2], out_modes=out_modes)
    with pytest.raises(ValueError, match=r"in_modes=\[2, 2, 2\] multiply to 8, but in_features=12"):
        TTLinear(IN, 37, in_modes=[2, 2, 2], out_modes=[5, 4, 2])  # inputs are never padded
    with pytest.raises(ValueError, match="product is 8"):
        TuckerLinear(IN, OUT, in_modes=[3, 4], out_modes=[3, 3])  # nor are Tucker's outputs


@pytest.mark.parametrize(
    ("features", "ranks", "in_modes", "out_modes"),
    [
        ((32, 509), 2, [4, 2, 2, 2], [7, 5, 5, 3]),  # a prime: 525 rows, 16 of them padding
        ((256, 1021), [1, 2, 2, 2, 2, 1], [4, 4, 4, 2, 2], [4, 4, 4, 4, 4]),  # the seed's 5 cores: 1024 rows
        ((768, 50257), 2, [8, 6, 4, 4], [21, 19, 14, 9]),  # GPT-2's vocabulary
        ((256, 1018), 2, [4, 4, 4, 4], [8, 8, 4, 4]),  # 2 x 509: as many cores as the inputs have
        ((256, 1024), 2, [4, 4, 4, 4], [8, 8, 4, 4]),  # balanced already: never padded
        ((256, 13), 2, [256], [13]),  # no padding within 10 % balances 13: one core, as before
        ((512, 7), 2, [8, 8, 8], [2, 2, 2]),  # 7 -> 8 has three factors: three cores, no modes of 1
    ],
)
def test_default_out_modes_pad_a_size_that_factorises_badly(features, ranks, in_modes, out_modes) -> None:
    """Omitted modes pad ``out_features`` where its own balanced factors are not balanced (a mode over twice the
    balanced size) and padding by at most ``max_padding_rows`` balances them, instead of leaving one huge core."""
    layer = TTLinear(*features, ranks=ranks, dtype=torch.float64)
    assert (layer.in_modes, layer.out_modes) == (in_modes, out_modes)
    rows = math.prod(out_modes)
    assert layer.padded == (rows != features[1]) and rows - features[1] <= max_padding_rows(features[1])
    if features[1] < 2000:  # the dense reconstruction of the large ones is slow in float64, and proven above
        x = torch.randn(3, features[0], dtype=torch.float64)
        assert_close(layer(x), x @ layer.to_dense().T + layer.bias)


@pytest.mark.slow
def test_torch_compile_padded_tt() -> None:
    layer = TTLinear(IN, OUT, **PADDED).eval()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, IN)
    with torch.no_grad():
        assert_close(compiled(x), layer(x))
    layer.train()
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_low_rank_rank_may_be_a_numpy_integer() -> None:
    """As ``from_linear`` takes it (and TT / Tucker ranks): the rank is stored as an ``int``."""
    layer = LowRankLinear(IN, OUT, rank=np.int64(3))
    assert type(layer.rank) is int and layer.left.shape == (OUT, 3)


@pytest.mark.parametrize(
    ("out_features", "out_modes", "example"),
    [(1024, [8, 8, 8], "[16, 8, 8]"), (8192, [16, 16, 16], "[32, 16, 16]"), (1018, [8, 8, 8], "[13, 10, 8]")],
)
def test_wrong_out_modes_are_told_the_default_modes(out_features: int, out_modes: list[int], example: str) -> None:
    """The example in the error is what omitted ``out_modes`` would be: a power of two is never padded (it was
    told to pad 1024 to [13, 10, 8]); a size that factorises badly is."""
    with pytest.raises(ValueError, match=rf"product is {out_features} to \d+ \(e\.g\. {re.escape(example)}\)"):
        TTLinear(64, out_features, in_modes=[4, 4, 4], out_modes=out_modes)
    default = TTLinear(64, out_features, in_modes=[4, 4, 4])
    assert str(default.out_modes) == example
