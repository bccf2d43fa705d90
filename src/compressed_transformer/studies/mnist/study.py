"""The MNIST study itself: train the original, build every row and sweep point, compare with the seed."""

from __future__ import annotations

import copy
import math
import os
import pickle
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ...compress import compress_, sparse_vd_to_pruned_
from ...data.mnist import MNIST, load_mnist
from ...layers import SparseVDLinear
from ...models.mlp import MLP, MLPConfig
from ...serialization import save_compressed, saved_bytes
from ...size import stored_bytes, stored_params
from .compression import build_tt_scratch, compress_row, reaches
from .config import (
    RECIPES,
    SEED_ANSWERS,
    SEED_TABLE,
    STRETCH_DROP,
    STRETCH_SPARSE_VD_RATIO,
    SWEEP_RATIOS,
    SWEEP_SPARSE_VD_THRESHOLDS,
    MNISTStudyConfig,
    RowRecipe,
    RowResult,
    StudyResult,
    _seed_ratio_of,
)
from .report import write_outputs
from .training import Tensors, accuracy, fit, to_tensors

MODELS_DIR = "models"  # <out>/models/<row>.safetensors: each table row's network (save_compressed)


def _row_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31


@dataclass(frozen=True)
class _Reference:
    """The original network's sizes, measured once, that every row's ratios divide."""

    params: int
    bytes: int
    file_bytes: int

    @classmethod
    def of(cls, dense: MLP) -> _Reference:
        return cls(stored_params(dense), stored_bytes(dense), saved_bytes(dense))


def _measure(
    name: str,
    model: nn.Module,
    data: Tensors,
    dense: _Reference,
    seconds: float,
    recipe: RowRecipe,
    *,
    models: Path | None = None,
    **fields: Any,
) -> RowResult:
    """The row's figures; with ``models``, its network is also written there as ``<name>.safetensors``."""
    path = None if models is None else models / f"{name}.safetensors"
    params, nbytes, file_bytes = stored_params(model), stored_bytes(model), _shipped_bytes(model, path)
    return RowResult(
        method=name,
        accuracy=accuracy(model, data.x_test, data.y_test),
        ratio=dense.params / params,
        params=params,
        bytes=nbytes,
        bytes_ratio=dense.bytes / nbytes,
        file_bytes=file_bytes,
        file_ratio=dense.file_bytes / file_bytes,
        seconds=seconds,
        compression=recipe.method,
        layers=list(recipe.layers),
        fine_tuned=recipe.fine_tune,
        from_scratch=recipe.scratch,
        **fields,
    )


def _shipped_bytes(model: nn.Module, path: Path | None) -> int:
    """Bytes of the model's ``save_compressed`` file (written to ``path`` when given), Sparse VD layers in their
    eval form (as pruned layers)."""
    if any(isinstance(m, SparseVDLinear) for m in model.modules()):
        model = copy.deepcopy(model)
        sparse_vd_to_pruned_(model)
    if path is None:
        return saved_bytes(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_compressed(model, path)
    return path.stat().st_size


@dataclass
class _Context:
    config: MNISTStudyConfig
    data: Tensors
    original: MLP
    reference: _Reference
    input_gram: torch.Tensor | None = None  # E[x x^T] of the training images, for the whitened SVD

    def models(self, sweep: bool) -> Path | None:
        """Where a table row's network is written (sweep points are not)."""
        return None if sweep else Path(self.config.out) / MODELS_DIR


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
        ctx.reference,
        seconds,
        recipe,
        target_ratio=ratio,
        distilled=distill,
        layer_options=options,
        rel_error=errors,
        sweep=sweep,
        models=ctx.models(sweep),
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
            ctx.reference,
            seconds,
            recipe,
            layer_options=options,
            sweep=sweep,
            extra={"epochs": cfg.train.epochs},
            models=ctx.models(sweep),
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
    except (KeyError, TypeError, RuntimeError, OSError, pickle.UnpicklingError) as error:
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
    out = Path(config.out)
    if out.exists() and not out.is_dir():  # before the data are read (or downloaded)
        raise NotADirectoryError(f"--out {out} is a file, not an output folder; choose another --out")
    _check_feasible(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    begin = time.perf_counter()
    if data is None:
        data = load_mnist(config.data_dir, download=config.download, verify=config.verify)
    tensors = to_tensors(data, config.train_limit, config.test_limit)
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
    models = out / MODELS_DIR
    seconds = time.perf_counter() - start
    reference = _Reference.of(original)
    rows.append(_measure("original", original, tensors, reference, seconds, RECIPES["original"], models=models))
    save_original(out / "original.pt", original)
    _log(config, rows[-1])
    ctx = _Context(config, tensors, original, reference)
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
                    reference,
                    time.perf_counter() - start,
                    recipe,
                    models=models,
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

    _drop_stale_models(models, {row.method for row in rows})
    result = StudyResult(rows, sweep, _seed_matches(rows), _stretch(rows), time.perf_counter() - begin, out)
    write_outputs(result, config, argv if argv is not None else sys.argv)
    return result


def _drop_stale_models(models: Path, rows: set[str]) -> None:
    """Remove the networks an earlier run into the same folder left for rows this run has not (the folder's
    ``results.json`` and ``table.md`` describe this run only, and such a file may not even fit its network)."""
    for path in sorted(models.glob("*.safetensors")):
        if path.stem not in rows:
            path.unlink()
            print(f"removed {path}: a network of an earlier run, not a row of this one", file=sys.stderr)


def _log(config: MNISTStudyConfig, row: RowResult) -> None:
    if config.progress:
        tqdm.write(f"{row.method:>12}: accuracy {row.accuracy:.4f}, ratio {row.ratio:.2f}x, {row.seconds:.1f}s")
