"""Budgets and compression settings of the MNIST study: each row's compressed network within its ratio."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...compress import compress_
from ...functional.tt import max_tt_ranks, tt_matrix_params
from ...functional.tucker import mode_product, tucker_params
from ...layers import TTLinear
from ...layers._common import resolve_modes
from ...models.mlp import MLP, MLPConfig
from ...size import stored_params
from .config import FC2_TT_MODES, SEED_TT, RowRecipe


def whole_network_budget(dense: int, ratio: float) -> int:
    """The most parameters a network may store to be ``ratio`` times smaller than ``dense`` at the seed's precision.

    The seed reports ratios with two decimals (its TT network, 203,530 / 3,574 = 56.947, is listed as 56.95), so
    a size counts as reaching ``ratio`` when ``round(dense / size, 2) >= ratio``.

    Raises:
        ValueError: if ``ratio`` is below 1 or not finite.
    """
    if not (math.isfinite(ratio) and ratio >= 1.0):
        raise ValueError(f"ratio must be a finite number >= 1, got {ratio}")
    budget = math.floor(dense / ratio)
    while budget < dense and round(dense / (budget + 1), 2) >= ratio:
        budget += 1
    return budget


def reaches(ratio: float, target: float) -> bool:
    """Whether ``ratio`` reaches ``target`` at the seed's two-decimal precision."""
    return round(ratio, 2) >= target


def _linear_size(linear: nn.Module) -> int:
    return linear.in_features * linear.out_features + (linear.out_features if linear.bias is not None else 0)


def _modes(name: str, linear: nn.Module, method: str) -> dict[str, Any]:
    """Mode factorisations of a layer: the seed's for the 784-256-10 network, balanced ones otherwise."""
    if method == "tt" and name == "fc1" and (linear.in_features, linear.out_features) == (784, 256):
        return {"in_modes": SEED_TT["in_modes"], "out_modes": SEED_TT["out_modes"]}
    if method == "tt" and name == "fc2" and (linear.in_features, linear.out_features) == (256, 10):
        return dict(FC2_TT_MODES)
    default_d = 4 if method == "tt" else 2
    in_modes, out_modes = resolve_modes(linear.in_features, linear.out_features, None, None, default_d)
    return {"in_modes": tuple(in_modes), "out_modes": tuple(out_modes)}


def _tt_ranks_within(in_modes: Sequence[int], out_modes: Sequence[int], budget: int) -> list[int] | None:
    """The TT-ranks with the most weights within ``budget``: ``[1, a, b, a, 1]`` (``a <= b <= 2a``) for four cores,
    one uniform rank otherwise; ``None`` when even rank 1 does not fit."""
    shape = [o * i for o, i in zip(out_modes, in_modes, strict=True)]
    limits = max_tt_ranks(shape)
    d = len(shape)
    if d == 4:
        # a on the two outer bonds, a <= b <= 2a on the middle one (the widest bond of a balanced TT-matrix)
        candidates = (
            [1, min(a, limits[1]), min(b, limits[2]), min(a, limits[3]), 1]
            for a in range(1, max(limits[1], limits[3]) + 1)
            for b in range(a, 2 * a + 1)
        )
    else:
        candidates = ([1] + [min(r, limits[k]) for k in range(1, d)] + [1] for r in range(1, max(limits) + 1))
    best, best_size = None, -1
    for ranks in candidates:
        size = tt_matrix_params(out_modes, in_modes, ranks)
        if best_size < size <= budget:
            best, best_size = ranks, size
    return best


def _tucker_ranks_within(
    weight: torch.Tensor, shape: Sequence[int], d: int, budget: int, *, balanced: bool
) -> list[int] | None:
    """Tucker ranks within ``budget``: one rank ``r_out`` for the ``d`` output modes, one ``r_in`` for the input
    modes, each as large as the other allows.

    ``balanced`` (for rows that are fine-tuned) keeps ``|r_out - r_in| <= 1`` and takes the most parameters, which
    trains best; otherwise the setting whose HOSVD reconstructs ``weight`` best is taken (it is usually lopsided,
    e.g. ``[14, 14, 4, 4]``, and fine-tunes worse). ``None`` when rank 1 does not fit.
    """

    def ranks_of(r_out: int, r_in: int) -> list[int]:
        return [min(r_out, n) for n in shape[:d]] + [min(r_in, n) for n in shape[d:]]

    candidates = []
    for r_out in range(1, max(shape[:d]) + 1):
        fitting = [r for r in range(1, max(shape[d:]) + 1) if tucker_params(shape, ranks_of(r_out, r)) <= budget]
        if fitting:
            candidates.append((r_out, fitting[-1]))
    if not candidates:
        return None
    if balanced:
        near = [(r_out, min(r_in, r_out + 1)) for r_out, r_in in candidates if r_in >= r_out - 1]
        return max((ranks_of(*c) for c in near), key=lambda ranks: tucker_params(shape, ranks))
    tensor = weight.detach().double().reshape(*shape)
    # HOSVD factors are leading left singular vectors of each unfolding, so one SVD per mode serves every candidate;
    # with orthonormal factors the squared error is ||W||^2 - ||core||^2.
    bases = [torch.linalg.svd(tensor.movedim(k, 0).reshape(n, -1), full_matrices=False)[0] for k, n in enumerate(shape)]
    total = float(tensor.square().sum())
    best, best_error = None, math.inf
    for candidate in candidates:
        ranks = ranks_of(*candidate)
        core = tensor
        for k, (basis, rank) in enumerate(zip(bases, ranks, strict=True)):
            core = mode_product(core, basis[:, :rank].T, k)  # mode k: n_k -> rank
        error = total - float(core.square().sum())
        if error < best_error:
            best, best_error = ranks, error
    return best


def whitened_low_rank(
    weight: torch.Tensor, gram: torch.Tensor, rank: int, damping: float = 1e-2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of ``weight`` that best preserve the layer's outputs on its inputs (data-aware SVD).

    Minimises ``E ||(W - left @ right) x||^2`` over inputs ``x`` with second moment ``gram = E[x x^T]``: with the
    Cholesky factor ``gram = L L^T``, truncate the SVD of ``W L`` to ``U_r S_r V_r^T`` and take
    ``left = U_r S_r``, ``right = V_r^T L^{-1}`` (Zhang et al. 2015, "Accelerating Very Deep Convolutional Networks
    for Classification and Detection", use the same response-reconstruction objective). Plain truncated SVD is the
    case ``gram = I``.

    Args:
        weight: ``(out_features, in_features)``.
        gram: ``(in_features, in_features)`` second moment of the inputs.
        rank: kept rank.
        damping: added to the diagonal, relative to its mean, so that constant inputs (MNIST's border pixels) keep
            ``gram`` positive definite.

    Returns:
        ``left`` ``(out_features, rank)`` and ``right`` ``(rank, in_features)``, in ``weight``'s dtype.
    """
    gram = gram.double()
    gram = gram + damping * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    chol = torch.linalg.cholesky(gram)  # (in, in), lower
    u, s, vh = torch.linalg.svd(weight.detach().double() @ chol, full_matrices=False)
    left = u[:, :rank] * s[:rank]  # (out, r)
    right = torch.linalg.solve_triangular(chol.T, vh[:rank].T, upper=True).T  # (r, in): V_r^T L^{-1}
    return left.to(weight.dtype), right.to(weight.dtype)


def _infeasible(row: str, ratio: float, budget: int, needed: int, what: str) -> ValueError:
    return ValueError(
        f"row {row!r} cannot reach {ratio}x: the whole network may store {budget:,} parameters, but {what} "
        f"already needs {needed:,}; lower the ratio (--ratio {row}=R) or compress more layers"
    )


def compress_row(
    original: MLP,
    row: str,
    recipe: RowRecipe,
    ratio: float,
    *,
    tt_fc2_rank: int = 3,
    input_gram: torch.Tensor | None = None,
) -> tuple[MLP, dict[str, Any], dict[str, float]]:
    """A compressed copy of ``original`` storing at most ``1/ratio`` of the dense network's parameters.

    Args:
        original: the trained network (not modified).
        row: row name, for messages.
        recipe: method and layers.
        ratio: target whole-network ratio.
        tt_fc2_rank: TT-rank of ``fc2`` when a TT recipe compresses it.
        input_gram: second moment of ``fc1``'s inputs; given, ``svd`` compresses ``fc1`` with
            :func:`whitened_low_rank` instead of a plain truncated SVD (same rank, same size).

    Returns:
        The compressed model, each layer's settings and each layer's relative reconstruction error.

    Raises:
        ValueError: if the ratio cannot be reached with the recipe's layers.
    """
    model = copy.deepcopy(original)
    dense = original.config.dense_params
    budget = whole_network_budget(dense, ratio)
    layers = {name: getattr(original, name) for name in recipe.layers}
    fixed = dense - sum(_linear_size(layer) for layer in layers.values())  # parameters left dense
    layer_budget = budget - fixed
    biases = sum(layer.out_features for layer in layers.values() if layer.bias is not None)
    if layer_budget - biases < len(layers):
        raise _infeasible(row, ratio, budget, fixed + biases + len(layers), "the dense layers and biases alone")
    pattern = "^(" + "|".join(recipe.layers) + ")$"
    options, errors = {}, {}
    if recipe.method in ("prune", "svd"):
        layer_dense = dense - fixed
        try:
            report = compress_(model, recipe.method, filter=pattern, ratio=layer_dense / layer_budget)
        except ValueError as error:
            raise ValueError(f"row {row!r} cannot reach {ratio}x: {error}") from None
        options = {r.name: r.options for r in report.rows}
        errors = {r.name: r.rel_error for r in report.rows}
        if recipe.method == "svd" and input_gram is not None and "fc1" in layers:
            with torch.no_grad():
                left, right = whitened_low_rank(original.fc1.weight, input_gram, model.fc1.rank)
                model.fc1.left.copy_(left)
                model.fc1.right.copy_(right)
                weight = original.fc1.weight.detach()
                errors["fc1"] = float(
                    torch.linalg.matrix_norm(weight - left @ right) / torch.linalg.matrix_norm(weight)
                )
            options["fc1"] = dict(options["fc1"], whitened=True)
    elif recipe.method in ("tt", "tucker"):
        remaining = layer_budget - biases
        plans = {}
        # fc2 (if compressed) takes a fixed small TT-rank / Tucker share first; fc1 takes the rest.
        for name in sorted(layers, key=lambda n: n != "fc2"):
            linear = layers[name]
            modes = _modes(name, linear, recipe.method)
            if recipe.method == "tt":
                if name == "fc2" and len(layers) > 1:
                    shape = [o * i for o, i in zip(modes["out_modes"], modes["in_modes"], strict=True)]
                    ranks = [1] + [min(tt_fc2_rank, m) for m in max_tt_ranks(shape)[1:-1]] + [1]
                else:
                    ranks = _tt_ranks_within(modes["in_modes"], modes["out_modes"], remaining)
                size = tt_matrix_params(modes["out_modes"], modes["in_modes"], ranks) if ranks else None
            else:
                shape = list(modes["out_modes"]) + list(modes["in_modes"])
                d = len(modes["out_modes"])
                share = remaining if name == "fc1" or len(layers) == 1 else remaining // 10
                ranks = _tucker_ranks_within(linear.weight, shape, d, share, balanced=recipe.fine_tune)
                size = tucker_params(shape, ranks) if ranks else None
            if ranks is None or size > remaining:
                raise _infeasible(row, ratio, budget, budget - remaining + (size or 1), f"rank 1 on {name}")
            remaining -= size
            plans[name] = dict(modes, ranks=list(ranks))
        for name, plan in plans.items():
            report = compress_(model, recipe.method, filter=f"^{name}$", **plan)
            options[name] = report.rows[0].options
            errors[name] = report.rows[0].rel_error
    else:
        raise AssertionError(recipe.method)
    params = stored_params(model)
    assert params <= budget, (row, params, budget)
    return model, options, errors


def build_tt_scratch(config: MLPConfig) -> MLP:
    """The seed's TT network, randomly initialised: fc1 a TT-matrix with ranks ``[1, 2, 4, 2, 1]`` (the seed's
    modes ``7*4*7*4 -> 2*8*8*2`` for 784 -> 256, balanced four-way factorisations otherwise), fc2 dense."""
    if (config.in_features, config.hidden) == (784, 256):
        fc1 = TTLinear(config.in_features, config.hidden, config.bias, **SEED_TT)
    else:
        fc1 = TTLinear(config.in_features, config.hidden, config.bias, ranks=[1, 2, 4, 2, 1])
    return MLP(config, fc1=fc1)
