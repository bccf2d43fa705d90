"""The MNIST study: train the seed's 784-256-10 network, compress it with every method, compare with the seed.

``compressed-transformer mnist --data-dir DIR --out runs/mnist`` trains the original network, builds one row per
method (``original, prune, prune+ft, svd, svd+ft, svd-o, tucker, tucker+ft, tt, tt+ft, tt-scratch``) and writes
``table.md``, ``results.json`` and ``pareto.png`` (test accuracy against compression ratio, the seed's points drawn
for comparison; ``--sweep`` adds each method's curve over ranks / sparsities).

Accounting, as the seed counts it: compression ratio = parameters of the whole dense network (weights and biases,
203,530 for 784-256-10) / parameters stored by the compressed one (factor entries for TT / Tucker / SVD, nonzero
weights for pruning and Sparse VD, biases in full). Ratios are compared with the seed's at its precision (two
decimals). The bytes ratio counts CSR indices of sparse layers too (see :mod:`compressed_transformer.size`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..compress import compress_
from ..data.mnist import DATA_ENV_VAR, MNIST, load_mnist
from ..functional.tt import max_tt_ranks, tt_matrix_params
from ..functional.tucker import mode_product, tucker_params
from ..layers import SparseVDLinear, TTLinear, model_kl
from ..layers._common import resolve_modes
from ..models.mlp import MLP, MLPConfig
from ..provenance import git_revision
from ..size import stored_bytes, stored_params

__all__ = [
    "DISTILL_MODES",
    "RECIPES",
    "ROWS",
    "SEED_ANSWERS",
    "SEED_TABLE",
    "FineTuneConfig",
    "MNISTStudyConfig",
    "RowRecipe",
    "RowResult",
    "SparseVDConfig",
    "StudyResult",
    "TrainConfig",
    "register",
    "run_study",
    "whole_network_budget",
]

# Normalisation of the pixels (mean and std of the MNIST training images in [0, 1]).
PIXEL_MEAN, PIXEL_STD = 0.1307, 0.3081


@dataclass(frozen=True)
class SeedPoint:
    """One row of the seed's table (slides, "Results on MNIST")."""

    label: str
    accuracy: float
    ratio: float


SEED_TABLE: dict[str, SeedPoint] = {
    "original": SeedPoint("Original Model", 0.9770, 1.00),
    "prune": SeedPoint("Magnitude Pruning", 0.9546, 8.15),
    "svd": SeedPoint("SVD", 0.9669, 7.54),
    "svd+ft": SeedPoint("SVD + fine tuning", 0.9641, 12.68),
    "svd-o": SeedPoint("Variational Dropout", 0.9841, 23.39),
    "tucker": SeedPoint("Tucker", 0.9247, 28.82),
    "tt": SeedPoint("Tensor Train", 0.9643, 56.95),
    "tt+ft": SeedPoint("Tensor Train + fine tuning", 0.9620, 72.02),
}

# Which of our rows may answer each seed row (the seed's TT row was trained from scratch).
SEED_ANSWERS: dict[str, tuple[str, ...]] = {
    "original": ("original",),
    "prune": ("prune", "prune+ft"),
    "svd": ("svd",),
    "svd+ft": ("svd+ft",),
    "svd-o": ("svd-o",),
    "tucker": ("tucker", "tucker+ft"),
    "tt": ("tt", "tt-scratch"),
    "tt+ft": ("tt+ft",),
}

# Stretch goals of the study: every compressed row within this many accuracy points of the original at the seed's
# ratio or better, and Sparse VD at this ratio or more (Molchanov et al. report 68x on LeNet-300-100).
STRETCH_DROP = 0.005
STRETCH_SPARSE_VD_RATIO = 60.0


@dataclass(frozen=True)
class RowRecipe:
    """How one row of the table is built.

    Attributes:
        method: ``"dense"``, ``"prune"``, ``"svd"``, ``"tucker"``, ``"tt"`` or ``"svd-o"`` (Sparse VD).
        layers: the layers compressed (``"fc1"``, ``"fc2"``); the others stay dense.
        ratio: target compression ratio of the whole network (``None`` for rows whose size is not chosen:
            the original, Sparse VD, and the seed's fixed TT configuration).
        fine_tune: train the compressed network after compression (optionally distilling the original).
        scratch: train the compressed network from a random initialisation instead of compressing the original.
    """

    method: str
    layers: tuple[str, ...]
    ratio: float | None
    fine_tune: bool = False
    scratch: bool = False


RECIPES: dict[str, RowRecipe] = {
    "original": RowRecipe("dense", (), None),
    "prune": RowRecipe("prune", ("fc1", "fc2"), SEED_TABLE["prune"].ratio),
    "prune+ft": RowRecipe("prune", ("fc1", "fc2"), SEED_TABLE["prune"].ratio, fine_tune=True),
    "svd": RowRecipe("svd", ("fc1",), SEED_TABLE["svd"].ratio),
    "svd+ft": RowRecipe("svd", ("fc1",), SEED_TABLE["svd+ft"].ratio, fine_tune=True),
    "svd-o": RowRecipe("svd-o", ("fc1", "fc2"), None),
    "tucker": RowRecipe("tucker", ("fc1",), SEED_TABLE["tucker"].ratio),
    "tucker+ft": RowRecipe("tucker", ("fc1",), SEED_TABLE["tucker"].ratio, fine_tune=True),
    "tt": RowRecipe("tt", ("fc1", "fc2"), SEED_TABLE["tt"].ratio),
    "tt+ft": RowRecipe("tt", ("fc1", "fc2"), SEED_TABLE["tt+ft"].ratio, fine_tune=True),
    "tt-scratch": RowRecipe("tt", ("fc1",), None, scratch=True),
}
ROWS: tuple[str, ...] = tuple(RECIPES)
DISTILL_MODES = ("off", "on", "both")

# Whole-network ratios traced by --sweep for each method (the +ft rows follow the same grid).
SWEEP_RATIOS: dict[str, tuple[float, ...]] = {
    "prune": (2, 4, 8, 16, 32, 64),
    "svd": (2, 4, 8, 16, 32),
    "tucker": (4, 8, 16, 32, 64),
    "tt": (8, 16, 32, 64, 128),
}
# Sparse VD is swept over the log-alpha threshold of its trained model (no retraining).
SWEEP_SPARSE_VD_THRESHOLDS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)

# The seed's TT layer (trained from scratch): 784 = 7*4*7*4 -> 256 = 2*8*8*2, ranks [1, 2, 4, 2, 1], 748 weights.
SEED_TT = {"in_modes": (7, 4, 7, 4), "out_modes": (2, 8, 8, 2), "ranks": (1, 2, 4, 2, 1)}
# fc2 (256 -> 10) as a two-core TT-matrix, 256 = 16*16 -> 10 = 2*5; its rank is MNISTStudyConfig.tt_fc2_rank.
FC2_TT_MODES = {"in_modes": (16, 16), "out_modes": (2, 5)}


@dataclass(frozen=True)
class TrainConfig:
    """One training phase: Adam with a cosine learning-rate decay to zero.

    Attributes:
        epochs: passes over the training set.
        lr: peak learning rate.
        batch_size: examples per step.
        shift: augmentation: translate each training image by up to this many pixels per axis (0: none).
    """

    epochs: int
    lr: float
    batch_size: int = 128
    shift: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"epochs must be an int >= 0, got {self.epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if not isinstance(self.shift, int) or not 0 <= self.shift <= 14:
            raise ValueError(f"shift must be an int in [0, 14] pixels, got {self.shift!r}")


@dataclass(frozen=True)
class FineTuneConfig:
    """Fine-tuning of each compression method (the ``+ft`` rows)."""

    prune: TrainConfig = TrainConfig(epochs=5, lr=1e-3, shift=1)
    svd: TrainConfig = TrainConfig(epochs=8, lr=1e-3, shift=1)
    tucker: TrainConfig = TrainConfig(epochs=12, lr=2e-3, shift=1)
    tt: TrainConfig = TrainConfig(epochs=15, lr=3e-3)

    def for_method(self, method: str) -> TrainConfig:
        return getattr(self, method)


@dataclass(frozen=True)
class SparseVDConfig:
    """Sparse Variational Dropout (Molchanov et al. 2017) started from the trained original network.

    The loss is the negative ELBO per example, ``mean CE + kl_weight * KL / N`` (the paper's ``N * mean CE +
    KL`` divided by the training-set size ``N``), with ``kl_weight`` rising linearly from 0 to 1 over
    ``warmup_epochs``.

    Attributes:
        train: epochs, learning rate and batch size.
        warmup_epochs: epochs over which the KL weight goes from 0 to 1.
        threshold: ``log alpha`` above which a weight is dropped (3 in the paper).
        log_sigma2_init: initial ``log sigma^2`` of every weight.
    """

    train: TrainConfig = TrainConfig(epochs=120, lr=2e-3, batch_size=2048, shift=1)
    warmup_epochs: float = 5.0
    threshold: float = 3.0
    log_sigma2_init: float = -10.0


def asdict_shallow(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


@dataclass(frozen=True)
class MNISTStudyConfig:
    """Everything the study does; written, resolved, into ``results.json``.

    Attributes:
        out: output folder.
        data_dir: folder holding the four IDX ``.gz`` files (``None``: ``$COMPRESSED_TRANSFORMER_DATA/mnist``,
            else ``data/mnist``).
        download: fetch missing files from the public mirrors.
        verify: check the files' checksums.
        seed: seeds every row's initialisation, shuffling and noise.
        hidden: hidden width of the network.
        rows: the rows to build (``original`` is always built: every other row starts from it).
        ratios: per-row overrides of the target whole-network ratio, ``((row, ratio), ...)``.
        original: training of the original network.
        original_checkpoint: load the original network from this ``original.pt`` (written by every run) instead
            of training it.
        finetune: fine-tuning per method.
        scratch: training of ``tt-scratch``.
        sparse_vd: the ``svd-o`` row.
        tt_fc2_rank: TT-rank of ``fc2`` in the ``tt`` rows (``fc1`` takes the rest of the budget).
        svd_whiten: the ``svd`` rows truncate the SVD of ``fc1`` in the metric of its training inputs
            (:func:`whitened_low_rank`, data-aware) rather than the plain Frobenius one.
        distill: knowledge distillation from the original in the ``+ft`` rows: ``"off"``, ``"on"``, or ``"both"``
            (``+ft`` rows without it plus ``<row>+kd`` rows with it).
        kd_alpha: weight of the distillation term (``1 - kd_alpha`` on the labels).
        kd_temperature: softmax temperature of the distillation term.
        sweep: also trace each method's accuracy-ratio curve.
        train_limit: use only the first N training images (``None``: all 60,000).
        test_limit: use only the first N test images (``None``: all 10,000).
        threads: ``torch.set_num_threads``; 0 keeps PyTorch's default (every core). One thread is the default
            because on a small shared machine a multi-threaded run slows down by an order of magnitude as soon as
            another process competes for the cores, while a single-threaded one barely notices.
        progress: show tqdm progress bars.
    """

    out: str = "runs/mnist"
    data_dir: str | None = None
    download: bool = True
    verify: bool = True
    seed: int = 0
    hidden: int = 256
    rows: tuple[str, ...] = ROWS
    ratios: tuple[tuple[str, float], ...] = ()
    original: TrainConfig = TrainConfig(epochs=20, lr=2e-3, shift=2)
    original_checkpoint: str | None = None
    finetune: FineTuneConfig = field(default_factory=FineTuneConfig)
    scratch: TrainConfig = TrainConfig(epochs=20, lr=3e-3)
    sparse_vd: SparseVDConfig = field(default_factory=SparseVDConfig)
    tt_fc2_rank: int = 3
    svd_whiten: bool = True
    distill: str = "on"
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    sweep: bool = False
    train_limit: int | None = None
    test_limit: int | None = None
    threads: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = [row for row in self.rows if row not in RECIPES]
        if unknown:
            raise ValueError(f"unknown row(s) {unknown}; choose from {list(ROWS)}")
        if not self.rows:
            raise ValueError(f"rows must name at least one row of {list(ROWS)}")
        for row, ratio in self.ratios:
            if row not in RECIPES:
                raise ValueError(f"--ratio names unknown row {row!r}; choose from {list(ROWS)}")
            if RECIPES[row].ratio is None:
                fixed = [name for name, recipe in RECIPES.items() if recipe.ratio is None]
                raise ValueError(f"row {row!r} has no target ratio to change (rows without one: {fixed})")
            if not (math.isfinite(ratio) and ratio >= 1.0):
                raise ValueError(f"the ratio of row {row!r} must be a finite number >= 1, got {ratio}")
        if self.distill not in DISTILL_MODES:
            raise ValueError(f"distill must be one of {DISTILL_MODES}, got {self.distill!r}")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ValueError(f"kd_alpha must be in [0, 1], got {self.kd_alpha}")
        if not self.kd_temperature > 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        if self.tt_fc2_rank < 1:
            raise ValueError(f"tt_fc2_rank must be >= 1, got {self.tt_fc2_rank}")
        for name in ("train_limit", "test_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or omitted), got {value}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: PyTorch's default), got {self.threads}")
        MLPConfig(hidden=self.hidden)  # validates the width

    @property
    def model(self) -> MLPConfig:
        return MLPConfig(hidden=self.hidden)

    def target_ratio(self, row: str) -> float | None:
        """The whole-network ratio row ``row`` is compressed to (its recipe's, unless overridden)."""
        return dict(self.ratios).get(row, RECIPES[row].ratio)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RowResult:
    """One point of the study: a row of the table or a point of a sweep."""

    method: str
    accuracy: float
    ratio: float
    params: int
    bytes: int
    bytes_ratio: float
    seconds: float
    compression: str
    layers: list[str]
    target_ratio: float | None = None
    fine_tuned: bool = False
    distilled: bool = False
    from_scratch: bool = False
    layer_options: dict[str, Any] = field(default_factory=dict)
    rel_error: dict[str, float] = field(default_factory=dict)
    sweep: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StudyResult:
    """The rows, the sweep points and the comparison with the seed."""

    rows: list[RowResult]
    sweep: list[RowResult]
    seed_matches: dict[str, dict[str, Any]]
    stretch: dict[str, Any]
    seconds: float
    out: Path


# ---------------------------------------------------------------------------------------------------------------
# Budgets and compression settings
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensors:
    """The data in memory: normalised ``(N, 784)`` float images and ``(N,)`` labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def to_tensors(data: MNIST, train_limit: int | None = None, test_limit: int | None = None) -> Tensors:
    train, test = data.train.subset(train_limit), data.test.subset(test_limit)
    return Tensors(
        (train.flat_float() - PIXEL_MEAN) / PIXEL_STD,
        train.labels,
        (test.flat_float() - PIXEL_MEAN) / PIXEL_STD,
        test.labels,
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 10000) -> float:
    """Top-1 accuracy in eval mode (Sparse VD layers deterministic, their dropped weights zero)."""
    model.eval()
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        correct += int((model(x[start : start + batch_size]).argmax(-1) == y[start : start + batch_size]).sum())
    return correct / max(x.shape[0], 1)


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015): ``T^2 KL(softmax(teacher / T) || softmax(logits / T))``, averaged over the batch."""
    student = F.log_softmax(logits / temperature, dim=-1)
    target = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(student, target, log_target=True, reduction="batchmean") * temperature**2


def random_shift(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each flattened 28x28 image by a random whole number of pixels in ``[-shift, shift]`` per axis.

    Args:
        images: ``(B, 784)`` normalised images.
        shift: largest translation in pixels.
        generator: source of the offsets.

    Returns:
        ``(B, 784)`` shifted images, uncovered pixels set to the background value.
    """
    batch = images.shape[0]
    background = -PIXEL_MEAN / PIXEL_STD
    padded = F.pad(images.reshape(batch, 28, 28), (shift, shift, shift, shift), value=background)  # (B, 28+2s, 28+2s)
    rows = torch.randint(0, 2 * shift + 1, (batch, 1), generator=generator) + torch.arange(28)  # (B, 28)
    cols = torch.randint(0, 2 * shift + 1, (batch, 1), generator=generator) + torch.arange(28)  # (B, 28)
    crops = padded[torch.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, 28, 28)
    return crops.reshape(batch, 784)


def fit(
    model: nn.Module,
    data: Tensors,
    train: TrainConfig,
    *,
    seed: int,
    desc: str,
    progress: bool = True,
    teacher: nn.Module | None = None,
    kd_alpha: float = 0.5,
    kd_temperature: float = 4.0,
    kl_weight: Callable[[int], float] | None = None,
) -> None:
    """Train ``model`` in place: Adam, cosine learning-rate decay to zero, shuffled mini-batches.

    The loss is the cross-entropy, mixed with distillation when a ``teacher`` is given:
    ``(1 - kd_alpha) CE + kd_alpha KD`` on the same (possibly shifted) batch. With ``kl_weight`` (step -> weight)
    the Sparse VD term ``kl_weight(step) * KL / N`` is added, which makes the loss the negative ELBO per example.

    Args:
        model: the network (any layers).
        data: the training tensors.
        train: epochs, learning rate, batch size, augmentation.
        seed: seeds the shuffling, the shifts and the layers' noise.
        desc: label of the progress bar.
        progress: show a tqdm progress bar.
        teacher: the original network, for distillation (kept in eval mode, not trained).
        kd_alpha: weight of the distillation term.
        kd_temperature: softmax temperature of the distillation term.
        kl_weight: the KL weight at each step, for Sparse VD.
    """
    n = data.x_train.shape[0]
    steps_per_epoch = math.ceil(n / train.batch_size)
    total = train.epochs * steps_per_epoch
    if total == 0:
        return
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    if teacher is not None:
        teacher.eval()
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="step", dynamic_ncols=True)
    step = 0
    model.train()
    for _ in range(train.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, train.batch_size):
            index = order[start : start + train.batch_size]
            x = data.x_train[index]  # (B, 784)
            if train.shift:
                x = random_shift(x, train.shift, generator)
            logits = model(x)  # (B, classes)
            loss = F.cross_entropy(logits, data.y_train[index])
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(x)
                loss = (1.0 - kd_alpha) * loss + kd_alpha * distillation_loss(logits, target, kd_temperature)
            if kl_weight is not None:
                loss = loss + kl_weight(step) * model_kl(model) / n
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step % 50 == 0 or step == total:
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            bar.update()
    bar.close()
    model.eval()


# ---------------------------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------------------------


def _row_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31


def _measure(
    name: str, model: nn.Module, data: Tensors, dense: MLP, seconds: float, recipe: RowRecipe, **fields: Any
) -> RowResult:
    params, nbytes = stored_params(model), stored_bytes(model)
    return RowResult(
        method=name,
        accuracy=accuracy(model, data.x_test, data.y_test),
        ratio=stored_params(dense) / params,
        params=params,
        bytes=nbytes,
        bytes_ratio=stored_bytes(dense) / nbytes,
        seconds=seconds,
        compression=recipe.method,
        layers=list(recipe.layers),
        fine_tuned=recipe.fine_tune,
        from_scratch=recipe.scratch,
        **fields,
    )


@dataclass
class _Context:
    config: MNISTStudyConfig
    data: Tensors
    original: MLP
    input_gram: torch.Tensor | None = None  # E[x x^T] of the training images, for the whitened SVD


def _compressed_point(
    ctx: _Context, name: str, recipe: RowRecipe, ratio: float, *, distill: bool, sweep: bool = False
) -> RowResult:
    cfg = ctx.config
    start = time.perf_counter()
    model, options, errors = compress_row(
        ctx.original, name, recipe, ratio, tt_fc2_rank=cfg.tt_fc2_rank, input_gram=ctx.input_gram
    )
    if recipe.fine_tune:
        fit(
            model,
            ctx.data,
            cfg.finetune.for_method(recipe.method),
            seed=_row_seed(cfg.seed, f"{name}@{ratio}"),
            desc=f"{name} @ {ratio:g}x",
            progress=cfg.progress,
            teacher=ctx.original if distill else None,
            kd_alpha=cfg.kd_alpha,
            kd_temperature=cfg.kd_temperature,
        )
    seconds = time.perf_counter() - start
    return _measure(
        name,
        model,
        ctx.data,
        ctx.original,
        seconds,
        recipe,
        target_ratio=ratio,
        distilled=distill,
        layer_options=options,
        rel_error=errors,
        sweep=sweep,
    )


def _sparse_vd(ctx: _Context, name: str, recipe: RowRecipe) -> tuple[RowResult, list[RowResult]]:
    cfg = ctx.config.sparse_vd
    start = time.perf_counter()
    model = copy.deepcopy(ctx.original)
    pattern = "^(" + "|".join(recipe.layers) + ")$"
    compress_(model, "svd-o", filter=pattern, threshold=cfg.threshold, log_sigma2_init=cfg.log_sigma2_init)
    steps_per_epoch = math.ceil(ctx.data.x_train.shape[0] / cfg.train.batch_size)
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    fit(
        model,
        ctx.data,
        cfg.train,
        seed=_row_seed(ctx.config.seed, name),
        desc=name,
        progress=ctx.config.progress,
        kl_weight=lambda step: min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0,
    )
    seconds = time.perf_counter() - start
    layers = [m for m in model.modules() if isinstance(m, SparseVDLinear)]

    def point(sweep: bool) -> RowResult:
        options = {
            n: {"threshold": m.threshold, "sparsity": round(m.sparsity, 6)}
            for n, m in model.named_modules()
            if isinstance(m, SparseVDLinear)
        }
        return _measure(
            name,
            model,
            ctx.data,
            ctx.original,
            seconds,
            recipe,
            layer_options=options,
            sweep=sweep,
            extra={"epochs": cfg.train.epochs},
        )

    row = point(sweep=False)
    curve = []
    if ctx.config.sweep:
        for threshold in SWEEP_SPARSE_VD_THRESHOLDS:
            for layer in layers:
                layer.threshold = threshold
            curve.append(point(sweep=True))
        for layer in layers:
            layer.threshold = cfg.threshold
    return row, curve


def _check_feasible(config: MNISTStudyConfig) -> None:
    """Dry-run every compression on an untrained network, so impossible options fail before any training."""
    probe = MLP(config.model)
    for name in config.rows:
        recipe = RECIPES[name]
        ratios = []
        if recipe.ratio is not None:
            ratios.append(config.target_ratio(name))
            if config.sweep:
                ratios.extend(SWEEP_RATIOS[recipe.method])
        for ratio in ratios:
            try:
                compress_row(probe, name, recipe, ratio, tt_fc2_rank=config.tt_fc2_rank)
            except ValueError:
                if ratio == config.target_ratio(name):
                    raise
    if "tt-scratch" in config.rows:
        build_tt_scratch(config.model)


def _seed_matches(rows: Sequence[RowResult]) -> dict[str, dict[str, Any]]:
    by_name = {r.method: r for r in rows}
    matches = {}
    for seed_row, point in SEED_TABLE.items():
        candidates = [by_name[n] for n in SEED_ANSWERS[seed_row] if n in by_name]
        candidates += [by_name[n + "+kd"] for n in SEED_ANSWERS[seed_row] if n + "+kd" in by_name]
        winners = [r.method for r in candidates if reaches(r.ratio, point.ratio) and r.accuracy >= point.accuracy]
        matches[seed_row] = {
            "seed_accuracy": point.accuracy,
            "seed_ratio": point.ratio,
            "answered_by": [r.method for r in candidates],
            "matched_by": winners,
            "matched": bool(winners) if candidates else None,
        }
    return matches


def _stretch(rows: Sequence[RowResult]) -> dict[str, Any]:
    by_name = {r.method: r for r in rows}
    if "original" not in by_name:
        return {}
    floor = by_name["original"].accuracy - STRETCH_DROP
    within = {}
    for seed_row, point in SEED_TABLE.items():
        if seed_row == "original":
            continue
        names = [n for n in SEED_ANSWERS[seed_row] if n in by_name]
        names += [n + "+kd" for n in SEED_ANSWERS[seed_row] if n + "+kd" in by_name]
        if names:
            within[seed_row] = [
                n for n in names if reaches(by_name[n].ratio, point.ratio) and by_name[n].accuracy >= floor
            ]
    rows_within = {
        r.method: r.accuracy >= floor and reaches(r.ratio, _seed_ratio_of(r.method))
        for r in rows
        if r.method != "original"
    }
    sparse_vd = by_name.get("svd-o")
    return {
        "accuracy_floor": floor,
        "seed_rows_within_half_point": within,
        "rows_within_half_point": rows_within,
        "sparse_vd_ratio": sparse_vd.ratio if sparse_vd else None,
        "sparse_vd_at_least_60x": bool(sparse_vd and sparse_vd.ratio >= STRETCH_SPARSE_VD_RATIO),
    }


def _seed_point_of(name: str) -> SeedPoint | None:
    """The seed row that row ``name`` answers (``None`` for rows that answer none)."""
    base = name.removesuffix("+kd")
    for seed_row, answers in SEED_ANSWERS.items():
        if base in answers:
            return SEED_TABLE[seed_row]
    return None


def _seed_ratio_of(name: str) -> float:
    point = _seed_point_of(name)
    return point.ratio if point is not None else 1.0


def save_original(path: str | os.PathLike[str], model: MLP) -> None:
    """Save the original network with its config, so that the file rebuilds it (see :func:`load_original`)."""
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict()}, path)


def load_original(path: str | os.PathLike[str], expected: MLPConfig | None = None) -> MLP:
    """Rebuild a dense network saved by :func:`save_original`.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it is not such a checkpoint or its shape differs from ``expected``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; give the original.pt written by an earlier run")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        config = MLPConfig(**checkpoint["config"])
        model = MLP(config)
        model.load_state_dict(checkpoint["state_dict"])
    except (KeyError, TypeError, RuntimeError, OSError) as error:
        raise ValueError(f"{path} is not an original.pt written by the MNIST study: {error}") from None
    if expected is not None and config != expected:
        raise ValueError(f"{path} holds a {config} network, but this run needs {expected}; match --hidden")
    model.eval()
    return model


def run_study(config: MNISTStudyConfig, data: MNIST | None = None, *, argv: Sequence[str] | None = None) -> StudyResult:
    """Train, compress, evaluate and write ``table.md``, ``results.json`` and ``pareto.png`` into ``config.out``.

    Args:
        config: the study settings.
        data: MNIST already in memory (tests); loaded from ``config.data_dir`` when omitted.
        argv: the command line recorded in ``results.json`` (``sys.argv`` when omitted).

    Returns:
        The rows, sweep points and comparisons.

    Raises:
        ValueError: for impossible options (raised before any training) or corrupt data files.
        FileNotFoundError: if the data files are missing and cannot be downloaded.
    """
    _check_feasible(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    begin = time.perf_counter()
    if data is None:
        data = load_mnist(config.data_dir, download=config.download, verify=config.verify)
    tensors = to_tensors(data, config.train_limit, config.test_limit)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)

    rows: list[RowResult] = []
    sweep: list[RowResult] = []

    # The original network: every other row starts from it.
    start = time.perf_counter()
    if config.original_checkpoint is not None:
        original = load_original(config.original_checkpoint, config.model)
    else:
        torch.manual_seed(_row_seed(config.seed, "original"))
        original = MLP(config.model)
        fit(
            original,
            tensors,
            config.original,
            seed=_row_seed(config.seed, "original"),
            desc="original",
            progress=config.progress,
        )
    rows.append(_measure("original", original, tensors, original, time.perf_counter() - start, RECIPES["original"]))
    save_original(out / "original.pt", original)
    _log(config, rows[-1])
    ctx = _Context(config, tensors, original)
    if config.svd_whiten and any(RECIPES[name].method == "svd" for name in config.rows):
        x = tensors.x_train.double()
        ctx.input_gram = x.T @ x / x.shape[0]  # (784, 784)

    for name in config.rows:
        recipe = RECIPES[name]
        if name == "original":
            continue
        torch.manual_seed(_row_seed(config.seed, name))
        if recipe.method == "svd-o":
            row, curve = _sparse_vd(ctx, name, recipe)
            rows.append(row)
            sweep.extend(curve)
        elif recipe.scratch:
            start = time.perf_counter()
            model = build_tt_scratch(config.model)
            fit(model, tensors, config.scratch, seed=_row_seed(config.seed, name), desc=name, progress=config.progress)
            rows.append(
                _measure(
                    name,
                    model,
                    tensors,
                    original,
                    time.perf_counter() - start,
                    recipe,
                    layer_options={
                        "fc1": {
                            "ranks": list(model.fc1.ranks),
                            "in_modes": model.fc1.in_modes,
                            "out_modes": model.fc1.out_modes,
                        }
                    },
                )
            )
        else:
            ratio = config.target_ratio(name)
            variants = [config.distill == "on"] if recipe.fine_tune else [False]
            if recipe.fine_tune and config.distill == "both":
                variants = [False, True]
            for distill in variants:
                label = name + "+kd" if config.distill == "both" and distill else name
                rows.append(_compressed_point(ctx, label, recipe, ratio, distill=distill))
                _log(config, rows[-1])
            if config.sweep:
                for point in SWEEP_RATIOS[recipe.method]:
                    try:
                        compress_row(original, name, recipe, point, tt_fc2_rank=config.tt_fc2_rank)
                    except ValueError:
                        continue  # out of this recipe's reach (e.g. a ratio its dense layer alone exceeds)
                    sweep.append(_compressed_point(ctx, name, recipe, point, distill=variants[-1], sweep=True))
            continue
        _log(config, rows[-1])

    result = StudyResult(rows, sweep, _seed_matches(rows), _stretch(rows), time.perf_counter() - begin, out)
    write_outputs(result, config, argv if argv is not None else sys.argv)
    return result


def _log(config: MNISTStudyConfig, row: RowResult) -> None:
    if config.progress:
        tqdm.write(f"{row.method:>12}: accuracy {row.accuracy:.4f}, ratio {row.ratio:.2f}x, {row.seconds:.1f}s")


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------


def _layers_text(row: RowResult) -> str:
    if not row.layers:
        return "-"
    return "+".join(row.layers)


def _settings_text(row: RowResult) -> str:
    parts = []
    for layer, options in row.layer_options.items():
        if "ranks" in options:
            parts.append(f"{layer} ranks {options['ranks']}")
        elif "rank" in options:
            parts.append(f"{layer} rank {options['rank']}" + (" (whitened)" if options.get("whitened") else ""))
        elif "sparsity" in options:
            parts.append(f"{layer} {100 * options['sparsity']:.1f}% zero")
    return "; ".join(parts)


def format_table(result: StudyResult) -> str:
    """The study's Markdown table: the seed's columns (method, accuracy, compression ratio) and more."""
    lines = [
        "| method | accuracy | compression ratio | params | bytes ratio | time (s) | layers | settings | kd "
        "| seed: accuracy @ ratio |",
        "|---|---:|---:|---:|---:|---:|---|---|---|---|",
    ]
    for row in result.rows:
        seed = _seed_point_of(row.method)
        seed_text = f"{seed.accuracy:.4f} @ {seed.ratio:.2f}" if seed else ""
        lines.append(
            f"| {row.method} | {row.accuracy:.4f} | {row.ratio:.2f} | {row.params:,} | {row.bytes_ratio:.2f} "
            f"| {row.seconds:.1f} | {_layers_text(row)} | {_settings_text(row)} | {'yes' if row.distilled else 'no'} "
            f"| {seed_text} |"
        )
    lines += [
        "",
        "| seed row | seed accuracy @ ratio | answered by | matched or beaten |",
        "|---|---|---|---|",
    ]
    for seed_row, match in result.seed_matches.items():
        if match["matched"] is None:
            verdict = "not run"
        else:
            verdict = ("yes: " + ", ".join(match["matched_by"])) if match["matched"] else "no"
        lines.append(
            f"| {SEED_TABLE[seed_row].label} | {match['seed_accuracy']:.4f} @ {match['seed_ratio']:.2f} "
            f"| {', '.join(match['answered_by']) or '-'} | {verdict} |"
        )
    return "\n".join(lines)


def write_outputs(result: StudyResult, config: MNISTStudyConfig, argv: Sequence[str]) -> None:
    """Write ``table.md``, ``results.json`` and ``pareto.png`` into ``result.out``."""
    out = result.out
    table = format_table(result)
    header = f"# MNIST study\n\nCommand: `{shlex.join(['compressed-transformer', *argv[1:]])}`\n\n"
    (out / "table.md").write_text(header + table + "\n")
    payload = {
        "rows": [r.to_dict() for r in result.rows],
        "sweep": [r.to_dict() for r in result.sweep],
        "seed": {name: asdict(point) for name, point in SEED_TABLE.items()},
        "seed_matches": result.seed_matches,
        "stretch": result.stretch,
        "dense_params": config.model.dense_params,
        "seconds": result.seconds,
        "config": config.to_dict(),
        "command": list(argv),
        "git_revision": git_revision(),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot_pareto(result, out / "pareto.png")


# One colour per method family; the +ft rows are drawn filled, the others hollow.
_COLOURS = {
    "dense": "black",
    "prune": "tab:blue",
    "svd": "tab:orange",
    "svd-o": "tab:green",
    "tucker": "tab:purple",
    "tt": "tab:red",
}


def plot_pareto(result: StudyResult, path: Path) -> None:
    """Test accuracy against compression ratio (log x) for every row, the sweep curves and the seed's points.

    The accuracy axis starts a little below the seed's lowest figure; points under it (rows compressed without
    fine-tuning far beyond what they tolerate) are drawn on its floor as ``v`` with their accuracy written out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    seed_low = min(point.accuracy for point in SEED_TABLE.values())
    points_low = min(r.accuracy for r in result.rows + result.sweep)
    floor = max(points_low - 0.005, math.floor((seed_low - 0.02) * 50) / 50)
    top = 1.0 + (1.0 - floor) * 0.02

    def clamp(accuracy: float) -> float:
        return max(accuracy, floor + (1.0 - floor) * 0.01)

    fig, ax = plt.subplots(figsize=(10, 6.5))
    curves: dict[tuple[str, bool], list[RowResult]] = {}
    for point in result.sweep:
        curves.setdefault((point.method, point.distilled), []).append(point)
    for points in curves.values():
        points = sorted(points, key=lambda p: p.ratio)
        first = points[0]
        trained = first.fine_tuned or first.from_scratch or first.compression == "svd-o"
        ax.plot(
            [p.ratio for p in points],
            [clamp(p.accuracy) for p in points],
            "-" if trained else ":",
            color=_COLOURS[first.compression],
            alpha=0.6,
            lw=1.2,
            marker=".",
        )
    for row in result.rows:
        colour = _COLOURS[row.compression]
        filled = row.fine_tuned or row.from_scratch or row.compression in ("svd-o", "dense")
        below = row.accuracy < floor
        marker = "v" if below else ("s" if row.from_scratch else "o")
        ax.scatter(
            row.ratio,
            clamp(row.accuracy),
            s=60,
            color=colour if filled else "white",
            edgecolors=colour,
            zorder=3,
            marker=marker,
        )
        label = f"{row.method} ({row.accuracy:.3f})" if below else row.method
        ax.annotate(label, (row.ratio, clamp(row.accuracy)), textcoords="offset points", xytext=(5, 4), fontsize=8)
    for name, point in SEED_TABLE.items():
        ax.scatter(point.ratio, point.accuracy, marker="x", s=50, color="black", zorder=4)
        ax.annotate(
            f"seed {name}",
            (point.ratio, point.accuracy),
            textcoords="offset points",
            xytext=(5, -10),
            fontsize=7,
            color="dimgray",
        )
    handles = [
        Line2D([], [], color=colour, marker="o", ls="", label=family)
        for family, colour in _COLOURS.items()
        if any(r.compression == family for r in result.rows)
    ]
    handles += [
        Line2D([], [], color="gray", marker="o", markerfacecolor="white", ls="", label="no training after compression"),
        Line2D([], [], color="gray", ls="-", label="sweep (trained)"),
        Line2D([], [], color="gray", ls=":", label="sweep (not trained)"),
        Line2D([], [], color="black", marker="x", ls="", label="seed (slides)"),
    ]
    original = next((r for r in result.rows if r.method == "original"), None)
    if original is not None:
        ax.axhline(original.accuracy - STRETCH_DROP, color="gray", ls="--", lw=0.8)
        handles.append(Line2D([], [], color="gray", ls="--", lw=0.8, label="original - 0.5 points"))
    ax.set_ylim(floor, top)
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (whole network, parameters)")
    ax.set_ylabel("test accuracy")
    ax.set_title("MNIST 784-256-10: accuracy vs compression")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_summary(result: StudyResult) -> None:
    print(format_table(result))
    stretch = result.stretch
    if stretch:
        within = [name for name, ok in stretch["rows_within_half_point"].items() if ok]
        print(f"\nrows within 0.5 points of the original at the seed's ratio or better: {', '.join(within) or 'none'}")
        if stretch["sparse_vd_ratio"] is not None:
            print(f"Sparse VD ratio: {stretch['sparse_vd_ratio']:.2f}x (stretch goal >= {STRETCH_SPARSE_VD_RATIO:g}x)")
    print(f"\ntotal time: {result.seconds:.1f}s; outputs in {result.out}/ (table.md, results.json, pareto.png)")


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _parse_ratio(text: str) -> tuple[str, float]:
    row, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return row.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROW=RATIO (e.g. tt+ft=100), got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``mnist`` subcommand."""
    parser = subparsers.add_parser(
        "mnist",
        help="train the seed's MNIST network, compress it with every method, write table.md / results.json / "
        "pareto.png",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = MNISTStudyConfig()
    parser.add_argument(
        "--data-dir",
        help=f"folder holding the four MNIST .gz files (None: ${DATA_ENV_VAR}/mnist, else data/mnist)",
    )
    parser.add_argument("--out", default=defaults.out, help="output folder")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of every row")
    parser.add_argument("--hidden", type=int, default=defaults.hidden, help="hidden width")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to build")
    parser.add_argument(
        "--ratio",
        action="append",
        type=_parse_ratio,
        default=[],
        metavar="ROW=R",
        help="target whole-network ratio of a row (repeatable), e.g. --ratio tt+ft=100",
    )
    parser.add_argument("--epochs", type=int, default=defaults.original.epochs, help="epochs of the original network")
    parser.add_argument("--lr", type=float, default=defaults.original.lr, help="learning rate of the original network")
    parser.add_argument(
        "--batch-size", type=int, default=defaults.original.batch_size, help="batch size of every phase but Sparse VD"
    )
    parser.add_argument(
        "--shift", type=int, help="random-translation augmentation in pixels for every phase (None: per phase)"
    )
    parser.add_argument("--original", help="load the original network from an original.pt instead of training it")
    parser.add_argument("--ft-epochs", type=int, help="fine-tuning epochs of every +ft row (None: per method)")
    parser.add_argument("--svdo-epochs", type=int, default=defaults.sparse_vd.train.epochs, help="Sparse VD epochs")
    parser.add_argument("--svdo-lr", type=float, default=defaults.sparse_vd.train.lr, help="Sparse VD learning rate")
    parser.add_argument(
        "--svdo-shift",
        type=int,
        help=f"Sparse VD augmentation in pixels (None: --shift, else {defaults.sparse_vd.train.shift})",
    )
    parser.add_argument(
        "--svdo-batch-size", type=int, default=defaults.sparse_vd.train.batch_size, help="Sparse VD batch size"
    )
    parser.add_argument(
        "--svdo-warmup", type=float, default=defaults.sparse_vd.warmup_epochs, help="Sparse VD KL warm-up epochs"
    )
    parser.add_argument("--scratch-epochs", type=int, default=defaults.scratch.epochs, help="epochs of tt-scratch")
    parser.add_argument(
        "--distill",
        choices=DISTILL_MODES,
        default=defaults.distill,
        help="distil the original into the +ft rows: off, on, or both (adds <row>+kd rows)",
    )
    parser.add_argument(
        "--svd-plain", action="store_true", help="plain truncated SVD in the svd rows instead of the input-whitened one"
    )
    parser.add_argument("--sweep", action="store_true", help="trace each method's curve over ranks / sparsities")
    parser.add_argument("--train-limit", type=int, help="use only the first N training images")
    parser.add_argument("--test-limit", type=int, help="use only the first N test images")
    parser.add_argument(
        "--threads", type=int, default=defaults.threads, help="torch.set_num_threads; 0 keeps PyTorch's default"
    )
    parser.add_argument("--no-download", action="store_true", help="never download missing files")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the checksums (hand-made subsets with the canonical names)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=main)


def config_from_args(args: argparse.Namespace) -> MNISTStudyConfig:
    """The study config of parsed command-line arguments.

    Raises:
        ValueError: for unknown rows or impossible values.
    """
    defaults = MNISTStudyConfig()

    def phase(cfg: TrainConfig, **changes: Any) -> TrainConfig:
        changes.setdefault("batch_size", args.batch_size)
        if changes.get("shift") is None:
            changes.pop("shift", None)
            if args.shift is not None:
                changes["shift"] = args.shift
        return replace(cfg, **changes)

    rows = tuple(dict.fromkeys(r.strip() for r in args.rows.split(",") if r.strip()))
    finetune = {
        name: phase(cfg, **({} if args.ft_epochs is None else {"epochs": args.ft_epochs}))
        for name, cfg in asdict_shallow(defaults.finetune).items()
    }
    return MNISTStudyConfig(
        out=args.out,
        data_dir=args.data_dir,
        download=not args.no_download,
        verify=not args.no_verify,
        seed=args.seed,
        hidden=args.hidden,
        rows=rows,
        ratios=tuple(args.ratio),
        original=phase(defaults.original, epochs=args.epochs, lr=args.lr),
        original_checkpoint=args.original,
        finetune=FineTuneConfig(**finetune),
        scratch=phase(defaults.scratch, epochs=args.scratch_epochs),
        sparse_vd=replace(
            defaults.sparse_vd,
            train=phase(
                defaults.sparse_vd.train,
                epochs=args.svdo_epochs,
                lr=args.svdo_lr,
                batch_size=args.svdo_batch_size,
                shift=args.svdo_shift,
            ),
            warmup_epochs=args.svdo_warmup,
        ),
        distill=args.distill,
        svd_whiten=not args.svd_plain,
        sweep=args.sweep,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
        threads=args.threads,
        progress=not args.no_progress,
    )


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    result = run_study(config)
    print_summary(result)
    return 0
