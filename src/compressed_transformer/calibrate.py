"""``compressed-transformer calibrate``: fit the cost model that picks each compressed layer's path, on this machine.

Every compressed layer chooses how to compute ``x @ W.T`` (which TT contraction order, factorised or one GEMM
with the rebuilt weight, CSR or dense) by predicted time: :mod:`compressed_transformer.functional.costs`. Its
built-in CPU constants were fitted on one machine, its CUDA constants are guesses. This command times the same
kinds of work here (``nn.Linear``'s GEMM, the weight transposes of a rebuild, every TT contraction order of TT
layers at several ranks and token counts, two-GEMM low-rank products, CSR products, the masked products of
pruned training; forward without autograd and forward+backward), fits every constant at once by non-negative
least squares on relative errors (:func:`~compressed_transformer.functional.costs.fit_cost_model`), and reports
how well the built-in and the fitted model pick the fastest measured TT path of each case.

Outputs in ``--out``: ``costs.json`` (the fitted model with the machine, the fit's errors, the decisions check
and every sample) and ``calibrate.md``. Use the model with ``export COMPRESSED_TRANSFORMER_COSTS=OUT/costs.json``
(read when the package is imported) or ``set_cost_model(device_type, load_cost_models(path)[device_type])``; ``bench
--costs OUT/costs.json`` benchmarks with it. Runnable as ``compressed-transformer calibrate`` or ``python -m
compressed_transformer.calibrate``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .bench import (
    CLOCKS,
    _ints,
    _shapes,
    check_unique,
    command_line,
    device_and_dtype,
    machine_description,
    median,
    output_folder,
    resolve_clock,
    set_threads,
    time_interleaved,
)
from .functional.costs import (
    COSTS_ENV_VAR,
    UNIT_NAMES,
    CostModel,
    cost_features,
    cost_model_for,
    device_kind,
    fit_cost_model,
    model_units,
    model_with_units,
    relative_errors,
    save_cost_models,
)
from .functional.sparsity import magnitude_mask, magnitude_threshold
from .functional.tt import (
    TTPlan,
    tt_apply_matrices,
    tt_matrix_rebuild,
    tt_plan_candidates,
    tt_plan_chunk,
    tt_plan_matrices,
    tt_plan_seconds,
    tt_plan_shapes,
)
from .layers import TTLinear
from .layers._fast import (
    csr_linear,
    csr_pattern,
    csr_seconds,
    masked_csr_linear,
    masked_csr_train_seconds,
    masked_dense_train_seconds,
    sparse_supported,
    to_csr,
)
from .layers.tt import _rebuild_seconds
from .provenance import run_revision

__all__ = ["CalibrateConfig", "main", "register", "run_calibration"]

FULL_SHAPES = ((512, 2048), (2048, 512), (256, 1024), (1024, 256))
FULL_TOKENS = (1, 32, 256)
QUICK_SHAPES = ((256, 1024),)
QUICK_TOKENS = (1, 32)


@dataclass(frozen=True)
class CalibrateConfig:
    """What ``compressed-transformer calibrate`` times.

    Args:
        shapes: ``(in_features, out_features)`` of the layers.
        tokens: token counts.
        tt_ranks: uniform TT ranks of the TT layers (every contraction order of each is timed).
        sparsities: sparsities of the CSR samples (CPU / float32 and float64 only).
        low_rank_ratio: the low-rank samples' rank stores ``1 / low_rank_ratio`` of the weight.
        max_slowdown: TT orders the current model predicts this many times slower than its best are not timed
            (they would take long and never be chosen).
        repeats: timed repetitions per sample (the median is used).
        budget_s: rough seconds per group of samples timed together.
        device: ``cpu``, ``cuda`` or ``auto``.
        dtype: ``float32``, ``bfloat16``, ``float64`` or ``auto`` (bf16 on CUDA).
        clock: as ``bench --clock``.
        seed: random seed.
        out: output folder.
    """

    shapes: tuple[tuple[int, int], ...] = FULL_SHAPES
    tokens: tuple[int, ...] = FULL_TOKENS
    tt_ranks: tuple[int, ...] = (2, 4, 8)
    sparsities: tuple[float, ...] = (0.9, 0.98)
    low_rank_ratio: float = 8.0
    max_slowdown: float = 20.0
    repeats: int = 7
    budget_s: float = 0.2
    device: str = "auto"
    dtype: str = "auto"
    clock: str = "auto"
    seed: int = 0
    out: str = "runs/calibrate"

    def __post_init__(self) -> None:
        if not self.shapes or any(len(s) != 2 or min(s) < 1 for s in self.shapes):
            raise ValueError(f"shapes must be (in_features, out_features) pairs of positive ints, got {self.shapes}")
        if not self.tokens or min(self.tokens) < 1:
            raise ValueError(f"token counts must be >= 1, got {self.tokens}")
        if not self.tt_ranks or min(self.tt_ranks) < 1:
            raise ValueError(f"tt_ranks must be >= 1, got {self.tt_ranks}")
        if any(not 0.0 < s < 1.0 for s in self.sparsities):
            raise ValueError(f"sparsities must lie in (0, 1), got {self.sparsities}")
        if not (1 <= self.low_rank_ratio < math.inf and 1 <= self.max_slowdown < math.inf):
            raise ValueError(
                f"low_rank_ratio and max_slowdown must be >= 1 and finite, got {self.low_rank_ratio} and "
                f"{self.max_slowdown}"
            )
        if self.repeats < 1 or not 0 < self.budget_s < math.inf:
            raise ValueError(
                f"repeats must be >= 1 and budget_s > 0 and finite, got {self.repeats} and {self.budget_s}"
            )
        check_unique(shapes=self.shapes, tokens=self.tokens, tt_ranks=self.tt_ranks, sparsities=self.sparsities)


def quick_config(**changes: Any) -> CalibrateConfig:
    """The reduced grid of ``--quick`` (seconds; a smoke test, too few samples for a trustworthy fit)."""
    base = CalibrateConfig(
        shapes=QUICK_SHAPES, tokens=QUICK_TOKENS, tt_ranks=(2,), sparsities=(0.9,), repeats=3, budget_s=0.02
    )
    return replace(base, **changes)


@dataclass
class Sample:
    """One timed piece of work and the prediction of its time (a function of the cost model)."""

    kind: str
    shape: tuple[int, int]
    tokens: int
    train: bool
    run: Callable[[], Any] | None
    predict: Callable[[CostModel], float]
    detail: str = ""
    timed: bool = True  # False: an option the decision check knows of but which was not run (see _tt_samples)
    seconds: float = math.nan


@dataclass
class Case:
    """One decision a layer makes, as the layer makes it: the cheapest predicted ``candidates`` (factorised or
    sparse paths) replace ``dense`` when ``model.prefers(candidate, dense_gemm, dense - dense_gemm)``."""

    name: str
    candidates: list[Sample]
    dense: Sample
    dense_gemm: Callable[[CostModel], float]  # the part of dense.predict the margin applies to (the rest: extra)


@dataclass
class Grid:
    groups: list[list[Sample]]  # timed together (interleaved)
    cases: list[Case]


def _timed(fn: Callable[[], torch.Tensor], train: bool, grad: torch.Tensor, leaves: list[torch.Tensor]):
    """What one timed call runs: ``fn`` without autograd, or ``fn`` and its backward (gradients reset first, as
    a training step with ``zero_grad(set_to_none=True)`` has them)."""
    if not train:

        def forward() -> None:
            with torch.no_grad():
                fn()

        return forward

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        fn().backward(grad)

    return step


def _leaf(t: torch.Tensor, train: bool) -> torch.Tensor:
    return t.detach().clone().requires_grad_(train)


def build_grid(config: CalibrateConfig, device: torch.device, dtype: torch.dtype, threads: int) -> Grid:
    """The work to time and the decisions to check, for every shape of ``config``."""
    grid = Grid([], [])
    for n_in, n_out in config.shapes:
        _add_shape(grid, config, n_in, n_out, device, dtype, threads)
    return grid


def _add_shape(
    grid: Grid, config: CalibrateConfig, n_in: int, n_out: int, device: torch.device, dtype: torch.dtype, threads: int
) -> None:
    es = torch.empty((), dtype=dtype).element_size()
    current = cost_model_for(device.type)
    kw = {"device": device, "dtype": dtype}
    shape, weights = (n_in, n_out), n_in * n_out
    weight = torch.randn(n_out, n_in, **kw) / math.sqrt(n_in)
    rank = max(1, int(weights / (config.low_rank_ratio * (n_in + n_out))))
    right, left = torch.randn(rank, n_in, **kw) / math.sqrt(n_in), torch.randn(n_out, rank, **kw) / math.sqrt(rank)
    tts = [TTLinear(n_in, n_out, ranks=r, **kw) for r in config.tt_ranks]
    masks = []
    if sparse_supported(weight):
        masks = [(s, magnitude_mask(weight, magnitude_threshold(weight, s))) for s in config.sparsities]

    def gemm(tokens: int, train: bool) -> Callable[[CostModel], float]:
        return lambda m: m.gemm_seconds(tokens * weights, weight_bytes=weights * es, train=train, threads=threads)

    for train in (False, True):
        w, b = _leaf(weight, train), _leaf(torch.zeros(n_out, **kw), train)
        r_, l_ = _leaf(right, train), _leaf(left, train)
        copy = Sample(
            "copy",
            shape,
            0,
            train,
            _timed(lambda w=w: w.t().contiguous(), train, torch.ones(n_in, n_out, **kw), [w]),
            lambda m, train=train: m.copy_seconds(weights * es, train=train, threads=threads),
            "weight transpose",
        )
        grid.groups.append([copy])
        for tokens in config.tokens:
            where = f"{n_in}x{n_out} tokens {tokens} {'train' if train else 'forward'}"
            x = _leaf(torch.randn(tokens, n_in, **kw), train)
            g = torch.randn(tokens, n_out, **kw)
            dense = Sample(
                "dense",
                shape,
                tokens,
                train,
                _timed(lambda x=x, w=w, b=b: F.linear(x, w, b), train, g, [x, w, b]),
                gemm(tokens, train),
                "nn.Linear",
            )
            steps = [(tokens, rank, n_in, 1), (tokens, n_out, rank, 1)]
            low_rank = Sample(
                "low-rank",
                shape,
                tokens,
                train,
                _timed(lambda x=x, r_=r_, l_=l_, b=b: F.linear(F.linear(x, r_), l_, b), train, g, [x, r_, l_, b]),
                lambda m, steps=steps, train=train: m.steps_seconds(steps, train=train, threads=threads),
                f"rank {rank}",
            )
            group = [dense, low_rank]
            low_rank_dense = dense  # inference: one GEMM with the cached W
            if train:  # rebuild W = left @ right, then one GEMM
                rebuild = [(n_out, n_in, rank, 1)]
                low_rank_dense = Sample(
                    "low-rank-dense",
                    shape,
                    tokens,
                    True,
                    _timed(lambda x=x, r_=r_, l_=l_, b=b: F.linear(x, l_ @ r_, b), True, g, [x, r_, l_, b]),
                    lambda m, t=tokens, rb=rebuild: gemm(t, True)(m) + m.steps_seconds(rb, train=True, threads=threads),
                    f"rank {rank}: rebuilt W, one GEMM",
                )
                group.append(low_rank_dense)
            grid.groups.append(group)
            grid.cases.append(Case(f"low-rank {where}", [low_rank], low_rank_dense, gemm(tokens, train)))
            for tt in tts:
                timed, untimed, tt_dense = _tt_samples(
                    tt, x, g, train, tokens, current, es, threads, config.max_slowdown
                )
                grid.groups.append([*timed, tt_dense])
                name = f"tt ranks {'-'.join(map(str, tt.ranks))} {where}"
                grid.cases.append(Case(name, [*timed, *untimed], tt_dense, gemm(tokens, train)))
            for sparsity, mask in masks:
                nnz, label = int(mask.sum()), f"sparsity {sparsity}"
                if not train:  # eval: the CSR copy against the cached dense weight
                    matrix = to_csr(weight * mask)
                    run = _timed(lambda x=x, mx=matrix, b=b: csr_linear(x, mx, b), False, g, [])
                    predict = lambda m, t=tokens, nnz=nnz: csr_seconds(m, threads, nnz, t, n_out, es)  # noqa: E731
                    csr = Sample("csr", shape, tokens, False, run, predict, label)
                    own = replace(dense, seconds=math.nan)  # timed again beside this CSR product, counted once each
                    grid.groups.append([csr, own])
                    grid.cases.append(Case(f"csr {label} {where}", [csr], own, own.predict))
                    continue
                pattern, dense_mask = csr_pattern(mask), mask.to(dtype)
                csr = Sample(
                    "masked-csr",
                    shape,
                    tokens,
                    True,
                    _timed(
                        lambda x=x, w=w, b=b, p=pattern, dm=dense_mask: masked_csr_linear(x, w, b, p, lambda: dm),
                        True,
                        g,
                        [x, w, b],
                    ),
                    lambda m, t=tokens, nnz=nnz: masked_csr_train_seconds(m, threads, nnz, t, n_in, n_out, es),
                    label,
                )
                masked = Sample(
                    "masked-dense",
                    shape,
                    tokens,
                    True,
                    _timed(lambda x=x, w=w, b=b, dm=dense_mask: F.linear(x, w * dm, b), True, g, [x, w, b]),
                    lambda m, t=tokens: masked_dense_train_seconds(m, threads, t, n_in, n_out, es),
                    label,
                )
                grid.groups.append([csr, masked])
                grid.cases.append(Case(f"masked {label} {where}", [csr], masked, masked.predict))


def _tt_samples(
    tt: TTLinear,
    x: torch.Tensor,
    g: torch.Tensor,
    train: bool,
    tokens: int,
    current: CostModel,
    es: int,
    threads: int,
    max_slowdown: float,
) -> tuple[list[Sample], list[Sample], Sample]:
    """Every TT contraction order the current model does not rule out (predicted within ``max_slowdown`` of its
    best), the others (not timed), and the dense path (training: rebuild ``W`` and one GEMM; inference: one GEMM
    with the cached ``W``), as the layer runs them."""
    modes = (tuple(tt.out_modes), tuple(tt.in_modes), tuple(tt.ranks))
    cores = [_leaf(c, train) for c in tt.cores]
    bias = _leaf(tt.bias, train)
    leaves = [x, *cores, bias]
    shape = (tt.in_features, tt.out_features)
    label = f"tt ranks {'-'.join(map(str, tt.ranks))}"

    def predicted(plan: TTPlan, m: CostModel) -> float:
        kw = {"train": train, "threads": threads, "costs": m, "element_size": es, "cached_factors": not train}
        return tt_plan_seconds(*modes, plan, tokens, **kw)[0]

    plans = tt_plan_candidates(len(cores))
    estimates = [predicted(plan, current) for plan in plans]
    samples, untimed = [], []
    for plan, estimate in zip(plans, estimates, strict=True):
        if estimate > max_slowdown * min(estimates):  # not timed; scored as max_slowdown x the case's fastest
            detail = f"{label}: {plan.direction}({','.join(map(str, plan.groups))}) (not timed)"
            predict = lambda m, plan=plan: predicted(plan, m)  # noqa: E731
            untimed.append(Sample("tt", shape, tokens, train, None, predict, detail, timed=False))
            continue
        chunk = tt_plan_chunk(*modes, plan, tokens, chunk_bytes=current.chunk_bytes, element_size=es)
        run_plan, shapes = TTPlan(plan.groups, plan.direction, chunk), tt_plan_shapes(*modes, plan.groups)
        if train:
            fn = lambda p=run_plan, sh=shapes: tt_apply_matrices(x, tt_plan_matrices(cores, p), sh, p, bias)  # noqa: E731
        else:
            with torch.no_grad():
                matrices = tt_plan_matrices(cores, run_plan)
            fn = lambda p=run_plan, sh=shapes, mx=matrices: tt_apply_matrices(x, mx, sh, p, bias)  # noqa: E731
        detail = f"{label}: {plan.direction}({','.join(map(str, plan.groups))})"
        predict = lambda m, plan=plan: predicted(plan, m)  # noqa: E731
        samples.append(Sample("tt", shape, tokens, train, _timed(fn, train, g, leaves), predict, detail))
    weights = shape[0] * shape[1]

    def dense(m: CostModel) -> float:
        gemm = m.gemm_seconds(tokens * weights, weight_bytes=weights * es, train=train, threads=threads)
        return gemm + (_rebuild_seconds(*modes, m, train, threads, es) if train else 0.0)

    if train:
        fn = lambda: F.linear(x, tt_matrix_rebuild(cores), bias)  # noqa: E731
    else:
        with torch.no_grad():
            cached = tt_matrix_rebuild(cores)
        fn = lambda: F.linear(x, cached, bias)  # noqa: E731
    detail = f"{label}: {'rebuilt' if train else 'cached'} W, one GEMM"
    return samples, untimed, Sample("tt-dense", shape, tokens, train, _timed(fn, train, g, leaves), dense, detail)


# --- timing, fit, decisions -----------------------------------------------------------------------------------------


def _measure(grid: Grid, config: CalibrateConfig, device: torch.device, clock: str) -> None:
    for group in grid.groups:
        fns = {str(i): s.run for i, s in enumerate(group)}
        times = time_interleaved(fns, device, config.repeats, config.budget_s, clock=CLOCKS[clock])
        for i, s in enumerate(group):
            s.seconds = median(times[str(i)])
    for case in grid.cases:  # options left untimed: predicted >= max_slowdown x the best, scored so
        options = [s for s in (*case.candidates, case.dense) if s.timed]
        for s in case.candidates:
            if not s.timed:
                s.seconds = config.max_slowdown * min(o.seconds for o in options)


class _Decider:
    """Every case's decision under per-unit costs, vectorised: predictions are features times units.

    Args:
        cases: the decisions.
        base: the model whose margin and chunking the decisions use.
        features: :func:`cost_features` of samples already computed, by ``id`` (the others are computed here).
    """

    def __init__(self, cases: list[Case], base: CostModel, features: dict[int, list[float]] | None = None) -> None:
        self.cases, self.base = cases, base
        known = features or {}
        samples = {id(s): s for case in cases for s in (*case.candidates, case.dense)}
        self.index = {key: i for i, key in enumerate(samples)}
        rows = [known[key] if key in known else cost_features(s.predict, base) for key, s in samples.items()]
        self.features = torch.tensor(rows, dtype=torch.float64)
        self.gemm = torch.tensor([cost_features(c.dense_gemm, base) for c in cases], dtype=torch.float64)

    def picks(self, units: Sequence[float]) -> list[Sample]:
        u = torch.tensor(list(units), dtype=torch.float64)
        predicted, gemm = (self.features @ u).tolist(), (self.gemm @ u).tolist()
        model = model_with_units(self.base, list(units))
        picks = []
        for case, dense_gemm in zip(self.cases, gemm, strict=True):
            dense = predicted[self.index[id(case.dense)]]
            best = min(case.candidates, key=lambda s: predicted[self.index[id(s)]], default=None)
            use = best is not None and model.prefers(predicted[self.index[id(best)]], dense_gemm, dense - dense_gemm)
            picks.append(best if use else case.dense)
        return picks

    def slowdowns(self, picks: Sequence[Sample]) -> list[float]:
        """Measured time of each case's pick over the fastest measured option of the case."""
        return [
            pick.seconds / min(s.seconds for s in (*case.candidates, case.dense))
            for case, pick in zip(self.cases, picks, strict=True)
        ]

    def score(self, units: Sequence[float]) -> float:
        """Mean log slowdown (0: every case picks its fastest option)."""
        values = self.slowdowns(self.picks(units))
        return sum(math.log(v) for v in values) / max(len(values), 1)

    def summary(self, units: Sequence[float]) -> dict[str, Any]:
        picks = self.picks(units)
        values = self.slowdowns(picks)
        if not values:
            return {"cases": 0}
        ordered = sorted(values)
        missed = [
            {"case": case.name, "picked": pick.detail or pick.kind, "slowdown": round(v, 3)}
            for case, pick, v in zip(self.cases, picks, values, strict=True)
            if v > 1.1
        ]
        return {
            "cases": len(values),
            "fastest_picked": sum(v <= 1.0 + 1e-9 for v in values),
            "within_10_percent": sum(v <= 1.1 for v in values),
            "median_slowdown": ordered[len(ordered) // 2],
            "worst_slowdown": ordered[-1],
            "geomean_slowdown": math.exp(sum(math.log(v) for v in values) / len(values)),
            "missed": missed,
        }


TUNE_FACTORS = (0.25, 0.5, 0.7, 0.85, 1 / 0.85, 1 / 0.7, 2.0, 4.0)


def tune_for_decisions(decider: _Decider, units: Sequence[float], sweeps: int = 4) -> list[float]:
    """Coordinate search on the per-unit costs (each scaled by :data:`TUNE_FACTORS` in turn, a change kept only
    when it lowers the mean log slowdown of the measured decisions): the time fit's least-squares compromise
    between all samples need not rank the alternatives of each decision right."""
    best, best_score = list(units), decider.score(units)
    for _ in range(sweeps):
        improved = False
        for k in range(len(best)):
            if best[k] == 0:
                continue
            for factor in TUNE_FACTORS:
                trial = list(best)
                trial[k] *= factor
                score = decider.score(trial)
                if score < best_score - 1e-12:
                    best, best_score, improved = trial, score, True
        if not improved:
            break
    return best


def run_calibration(config: CalibrateConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Time the work, fit the model, tune it on the measured decisions; write ``costs.json`` and ``calibrate.md``
    into ``config.out``.

    The model written is the per-unit costs of the least-squares time fit, or the model in use if that decides
    better, refined by :func:`tune_for_decisions`: on the measured cases it decides at least as well as both.

    Returns:
        what ``costs.json`` holds, with the written :class:`CostModel` under ``"model"``.
    """
    device, dtype = device_and_dtype(config.device, config.dtype)
    clock = resolve_clock(config, device)
    out = output_folder(config.out)  # before the timing: an --out that cannot be written fails now
    torch.manual_seed(config.seed)
    threads = 1 if device.type == "cuda" else torch.get_num_threads()
    start = time.perf_counter()
    grid = build_grid(config, device, dtype, threads)
    _measure(grid, config, device, clock)
    samples = [s for group in grid.groups for s in group]
    base = cost_model_for(device.type)
    features = {id(s): cost_features(s.predict, base) for s in samples}
    measured = [(features[id(s)], s.seconds) for s in samples]
    fitted, report = fit_cost_model(measured, base)
    decider = _Decider(grid.cases, base, features)
    start_units = min((model_units(fitted), model_units(base)), key=decider.score)
    model = model_with_units(base, tune_for_decisions(decider, start_units))
    kind = device_kind(device.type)
    argv = sys.argv if argv is None else argv
    relative = {
        "before": report["relative_error_base"],
        "fitted": report["relative_error_fitted"],
        "written": relative_errors(measured, model_units(model)),
    }
    meta = {
        "device_type": kind,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": threads,
        "clock": clock,
        "command": command_line(argv, "calibrate"),
        "config": asdict(config),
        "machine": machine_description(device),
        "git_revision": run_revision(),
        "seconds": time.perf_counter() - start,
        "fit": {**report, "relative_error": relative},
        "decisions": {
            "before": decider.summary(model_units(base)),
            "fitted": decider.summary(model_units(fitted)),
            "written": decider.summary(model_units(model)),
        },
        "units_before": model_units(base),
        "units_fitted": model_units(fitted),
        "samples": [
            {
                "kind": s.kind,
                "shape": list(s.shape),
                "tokens": s.tokens,
                "pass": "train" if s.train else "forward",
                "detail": s.detail,
                "seconds": s.seconds,
                "predicted_before": s.predict(base),
                "predicted_written": s.predict(model),
            }
            for s in samples
        ],
    }
    save_cost_models(out / "costs.json", {kind: model}, **meta)
    result = {**json.loads((out / "costs.json").read_text()), "model": model}
    (out / "calibrate.md").write_text(markdown(result) + "\n")
    return result


# --- report and command line ----------------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return "unbounded" if math.isinf(value) else f"{value:.3g}"


def markdown(result: dict[str, Any]) -> str:
    """The summary ``calibrate.md`` holds: the written constants beside the ones used before, the errors of the
    time predictions and the decisions check."""
    model: CostModel = result["model"]
    before = dict(zip(UNIT_NAMES, result["units_before"], strict=True))
    fit, decisions = result["fit"], result["decisions"]
    lines = [
        f"# Cost model calibration ({result['device_type']}, {result['dtype']}, {result['threads']} thread(s))",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine'].get('gpu') or result['machine'].get('cpu')}; git {result['git_revision']}; "
        f"{len(result['samples'])} samples in {result['seconds']:.0f} s ({result['clock']} clock)",
        "",
        "| constant | before | written |",
        "|---|---:|---:|",
    ]
    for name in UNIT_NAMES:
        pass_name, field_name = name.split(".")
        value = getattr(getattr(model, pass_name), field_name)
        old = before[name]
        old_value = (math.inf if old == 0 else 1 / old) if field_name.endswith("_per_s") else old
        kept = " (no sample has this work)" if name in fit["kept"] else ""
        lines.append(f"| {name} | {_fmt(old_value)} | {_fmt(value)}{kept} |")
    labels = {"before": "before", "fitted": "least-squares time fit", "written": "written (fit or before, tuned)"}
    lines += ["", "| model | median relative time error | max |", "|---|---:|---:|"]
    lines += [f"| {labels[k]} | {v['median']:.3f} | {v['max']:.3f} |" for k, v in fit["relative_error"].items()]
    lines += [
        "",
        "Decisions (each layer's choice between its factorised or sparse paths and its dense path, checked against",
        "the measured times of every option; slowdown: the pick's time over the fastest option's):",
        "",
        "| model | cases | fastest picked | within 10 % | geomean slowdown | worst slowdown |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in labels.items():
        d = decisions[key]
        if d.get("cases"):
            lines.append(
                f"| {label} | {d['cases']} | {d['fastest_picked']} | {d['within_10_percent']} | "
                f"{d['geomean_slowdown']:.3f} | {d['worst_slowdown']:.3f} |"
            )
    lines += [
        "",
        f"Use it: `export {COSTS_ENV_VAR}={Path(result['config']['out']) / 'costs.json'}` (or `bench --costs ...`).",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = CalibrateConfig()
    parser.add_argument("--quick", action="store_true", help="tiny grid in seconds (a smoke test, not a real fit)")
    parser.add_argument("--out", default=defaults.out, help="output folder (costs.json, calibrate.md)")
    parser.add_argument("--shapes", type=_shapes, help="comma-separated INxOUT (default 512x2048,2048x512,...)")
    parser.add_argument("--tokens", type=_ints, help="comma-separated token counts (default 1,32,256)")
    parser.add_argument("--tt-ranks", type=_ints, help="comma-separated uniform TT ranks (default 2,4,8)")
    parser.add_argument("--repeats", type=int, help="timed repetitions per sample (median used)")
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda or auto")
    parser.add_argument("--dtype", default=defaults.dtype, help="float32, bfloat16, float64 or auto (bf16 on CUDA)")
    parser.add_argument(
        "--clock", default=defaults.clock, help="wall, cpu (thread CPU time; CPU with --threads 1 only) or auto"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before measuring")
    parser.add_argument("--seed", type=int, default=defaults.seed)


def config_from_args(args: argparse.Namespace) -> CalibrateConfig:
    base = quick_config() if args.quick else CalibrateConfig()
    changes: dict[str, Any] = {"out": args.out, "device": args.device, "dtype": args.dtype, "clock": args.clock}
    changes["seed"] = args.seed
    for key in ("shapes", "tokens", "tt_ranks", "repeats"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    return replace(base, **changes)


def main(args: argparse.Namespace) -> int:
    """Run ``calibrate`` from parsed arguments; prints the summary and where the model went."""
    set_threads(args.threads)
    result = run_calibration(config_from_args(args))
    print(markdown(result))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``calibrate`` subcommand."""
    from .cli import add_command

    add_command(
        subparsers,
        "calibrate",
        help="time the work behind each compressed layer's path choice here and fit the cost model to it",
        doc=__doc__,
        add_arguments=add_arguments,
        main=main,
    )


if __name__ == "__main__":
    from .cli import run_module

    sys.exit(run_module("compressed_transformer.calibrate", __doc__, add_arguments, main))
