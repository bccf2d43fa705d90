"""``compressed-transformer bench``: time every compressed layer against ``nn.Linear``, side by side, in one run.

For each feed-forward shape, token count and pass (``forward``: eval mode without autograd; ``train``: forward
and backward, gradients of the input and of every parameter), every layer of the grid is timed with the others
interleaved (round-robin repetitions, so that load changes on the machine hit all of them alike); each row
reports the median time, its ratio to the dense layer's median, the multiply-adds of the path taken (closed
form), the achieved GFLOP/s, the peak memory of the tensors the pass allocates and the path the layer chose.
tensorly-torch's ``FactorizedLinear`` is timed as a peer when it is installed (``pip install
'compressed-transformer[tltorch]'``). Then a whole encoder-decoder Transformer is timed (a training step with
AdamW, fixed-length greedy and beam decoding), dense against all-FFN-TT (the seed's ranks ``[1, 2, 2, 2, 2, 1]``)
and all-FFN-Tucker (rank 2).

Outputs in ``--out``: ``bench.json`` (``{"meta": ..., "rows": [...]}``), ``bench.md`` (the tables) and
``ratio.png`` (ratio to dense against token count). Runnable as ``compressed-transformer bench`` or
``python -m compressed_transformer.bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .functional.costs import COSTS_ENV_VAR, cost_model_source, device_kind, load_cost_models, set_cost_model
from .functional.tt import factorize, tt_plan_candidates, tt_plan_macs
from .functional.tucker import tucker_linear_rank
from .layers import LowRankLinear, PrunedLinear, SparseLinear, SparseVDLinear, TTLinear, TuckerLinear
from .layers._fast import DENSE_GRAD_MIN_DENSITY, DENSE_GRAD_TOKENS, cache_nbytes
from .provenance import run_revision

__all__ = ["BenchConfig", "main", "register", "run_bench"]

FULL_SHAPES = ((512, 2048), (2048, 512), (256, 1024))
FULL_TOKENS = (1, 32, 512, 4096, 16384)
FULL_LAYERS = (
    "dense",
    "tt-r2",
    "tt-r4",
    "tt-r8",
    "tucker-r2",
    "svd-r64",
    "prune-0.9",
    "prune-0.98",
    "sparse-0.9",
    "sparse-0.98",
    "svd-o-0.98",
    "tltorch-tt-r2",
    "tltorch-tucker-r2",
)
QUICK_SHAPES = ((512, 2048),)
QUICK_TOKENS = (32, 4096)
QUICK_LAYERS = ("dense", "tt-r2", "tucker-r2", "svd-r64", "prune-0.98")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Layers timed only in eval form: Sparse VD trains with a different, sampled forward (two GEMMs by design).
FORWARD_ONLY = ("svd-o",)


@dataclass(frozen=True)
class TransformerBench:
    """The whole-model part of the benchmark.

    Args:
        preset: a :data:`~compressed_transformer.models.transformer.PRESETS` name (``base``: the seed's 6+6).
        vocab_size: joint vocabulary size.
        batch: sentences per training batch.
        length: source and target tokens per sentence.
        decode_batch: sentences decoded at once.
        decode_steps: decoding steps (fixed: no early stop at EOS, so every model does the same work).
        beam: beam size of the beam pass.
        tt_ranks: TT ranks of every FFN linear (``d + 1`` entries: ``d`` balanced modes per side).
        tucker_ranks: Tucker rank of every FFN linear.
        svd_rank: rank of every FFN linear in the ``svd`` variant (``None``: ``d_model // 8``, the study's).
        prune_sparsity: fraction of every FFN weight pruned in the ``prune`` and ``sparse`` variants (the study's
            ``prune-all``).
    """

    preset: str = "base"
    vocab_size: int = 8000
    batch: int = 16
    length: int = 32
    decode_batch: int = 16
    decode_steps: int = 32
    beam: int = 4
    tt_ranks: tuple[int, ...] = (1, 2, 2, 2, 2, 1)
    tucker_ranks: int = 2
    svd_rank: int | None = None
    prune_sparsity: float = 0.9


@dataclass(frozen=True)
class BenchConfig:
    """What ``compressed-transformer bench`` measures.

    Args:
        shapes: ``(in_features, out_features)`` of the layers.
        tokens: token counts (rows of the input).
        layers: layer names (see :func:`build_layer`); ``dense`` is always included.
        passes: ``forward`` and/or ``train``.
        repeats: timed repetitions per layer (the median is reported); fewer for very slow rows.
        budget_s: rough time budget per row; repetitions are cut to stay within it (never below 3).
        device: ``cpu``, ``cuda`` or ``auto``.
        dtype: ``float32`` or ``bfloat16`` (``auto``: bf16 on CUDA, float32 on CPU).
        compile: ``torch.compile`` the layers and the model's training step: ``on``, ``off``, or ``auto`` (training
            passes on CUDA only, where it cuts launch overhead; see :func:`compile_passes`).
        compile_mode: ``torch.compile``'s ``mode``: ``default``, ``reduce-overhead`` (CUDA graphs),
            ``max-autotune`` or ``max-autotune-no-cudagraphs``.
        clock: ``wall`` (``time.perf_counter``) or ``cpu`` (``time.thread_time``: CPU seconds of the calling
            thread, which other processes on the machine do not inflate; right only when every op runs in that
            thread, i.e. on CPU with one intra-op thread). ``auto``: ``cpu`` there, ``wall`` otherwise.
        transformer: the whole-model part, or ``None`` to skip it.
        seed: random seed.
        out: output folder.
        costs: a ``compressed-transformer calibrate`` file whose cost model the layers decide their paths with
            (``None``: the one in use, built-in unless ``$COMPRESSED_TRANSFORMER_COSTS`` names a file).
    """

    shapes: tuple[tuple[int, int], ...] = FULL_SHAPES
    tokens: tuple[int, ...] = FULL_TOKENS
    layers: tuple[str, ...] = FULL_LAYERS
    passes: tuple[str, ...] = ("forward", "train")
    repeats: int = 7
    budget_s: float = 3.0
    device: str = "auto"
    dtype: str = "auto"
    compile: str = "auto"
    compile_mode: str = "default"
    clock: str = "auto"
    transformer: TransformerBench | None = field(default_factory=TransformerBench)
    seed: int = 0
    out: str = "runs/bench"
    costs: str | None = None

    def __post_init__(self) -> None:
        if not self.shapes or any(len(s) != 2 or min(s) < 1 for s in self.shapes):
            raise ValueError(f"shapes must be (in_features, out_features) pairs of positive ints, got {self.shapes}")
        if not self.tokens or min(self.tokens) < 1:
            raise ValueError(f"token counts must be >= 1, got {self.tokens}")
        if not self.passes or any(p not in ("forward", "train") for p in self.passes):
            raise ValueError(f"passes must list forward and/or train, got {self.passes}")
        if self.repeats < 1 or not 0 < self.budget_s < math.inf:
            raise ValueError(
                f"repeats must be >= 1 and budget_s > 0 and finite, got {self.repeats} and {self.budget_s}"
            )
        check_unique(shapes=self.shapes, tokens=self.tokens, layers=self.layers, passes=self.passes)


def check_unique(**grids: Iterable[Any]) -> None:
    """Refuse a grid that lists a value twice (it would time and report the same rows twice).

    Raises:
        ValueError: naming the first grid with a repeated value.
    """
    for name, values in grids.items():
        listed = list(values)
        repeated = sorted({str(v) for v in listed if listed.count(v) > 1})
        if repeated:
            raise ValueError(f"{name} must not repeat a value, got {', '.join(repeated)} more than once")


def quick_config(**changes: Any) -> BenchConfig:
    """The reduced grid of ``--quick`` (well under a minute on two CPU cores)."""
    base = BenchConfig(
        shapes=QUICK_SHAPES,
        tokens=QUICK_TOKENS,
        layers=QUICK_LAYERS,
        repeats=5,
        budget_s=1.0,
        transformer=TransformerBench(batch=4, length=16, decode_batch=4, decode_steps=8, beam=2),
    )
    return replace(base, **changes)


# --- layers ---------------------------------------------------------------------------------------------------------


def _tltorch_modes(in_features: int, out_features: int) -> tuple[list[int], list[int]]:
    return factorize(in_features, 4), factorize(out_features, 4)


def check_layer_name(name: str) -> None:
    """Refuse a name :func:`build_layer` does not know, without building anything (tltorch names included).

    Raises:
        ValueError: for an unknown name or setting.
    """
    kind, _, setting = name.rpartition("-")
    unknown = ValueError(
        f"unknown benchmark layer {name!r}; use dense, tt-r<R>, tucker-r<R>, svd-r<R>, prune-<S>, sparse-<S>, "
        "svd-o-<S>, tltorch-tt-r<R>, tltorch-tucker-r<R> (R a positive int, S a sparsity in [0, 1))"
    )
    if name == "dense":
        return
    if kind in ("tt", "tucker", "svd", "tltorch-tt", "tltorch-tucker"):
        if not re.fullmatch(r"r[1-9]\d*", setting):
            raise unknown
    elif kind in ("prune", "sparse", "svd-o"):
        try:
            sparsity = float(setting)
        except ValueError:
            raise unknown from None
        if not 0.0 <= sparsity < 1.0:
            raise unknown
    else:
        raise unknown


def build_layer(
    name: str, in_features: int, out_features: int, *, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """A freshly initialised layer of the grid.

    Names: ``dense``; ``tt-rR`` (4 balanced modes per side, inner ranks ``R``); ``tucker-rR`` (2 modes per side);
    ``svd-rR``; ``prune-S`` (a random mask of sparsity ``S``); ``sparse-S`` (the same pruning stored as its kept
    weights only: :class:`~compressed_transformer.layers.SparseLinear`); ``svd-o-S`` (Sparse VD in eval form with a
    fraction ``S`` of weights above the ``log alpha`` threshold); ``tltorch-tt-rR`` / ``tltorch-tucker-rR``
    (tensorly-torch's ``FactorizedLinear``, factorised forward, same modes).

    Raises:
        ValueError: for an unknown name; ImportError: for a tltorch layer without tensorly-torch.
    """
    check_layer_name(name)
    factory = {"device": device, "dtype": dtype}
    kind, _, setting = name.rpartition("-")
    if name == "dense":
        return nn.Linear(in_features, out_features, **factory)
    if kind == "tt" and setting.startswith("r"):
        return TTLinear(in_features, out_features, ranks=int(setting[1:]), **factory)
    if kind == "tucker" and setting.startswith("r"):
        return TuckerLinear(in_features, out_features, ranks=int(setting[1:]), **factory)
    if kind == "svd" and setting.startswith("r"):
        return LowRankLinear(in_features, out_features, rank=int(setting[1:]), **factory)
    if kind == "prune":
        layer = PrunedLinear(in_features, out_features, **factory)
        mask = torch.rand(out_features, in_features, device=device) >= float(setting)
        return layer.set_mask_(mask)
    if kind == "sparse":
        nnz = round((1.0 - float(setting)) * in_features * out_features)
        return SparseLinear(in_features, out_features, nnz=nnz, **factory)
    if kind == "svd-o":
        layer = SparseVDLinear(in_features, out_features, **factory)
        with torch.no_grad():
            drop = torch.rand(out_features, in_features, device=device) < float(setting)
            # log alpha = log sigma^2 - log theta^2: 5 above the threshold where dropped, 5 below where kept.
            offset = torch.where(drop, layer.threshold + 5.0, layer.threshold - 5.0).to(dtype)
            layer.log_sigma2.copy_(torch.log(layer.theta.float() ** 2 + 1e-8).to(dtype) + offset)
        return layer
    if kind in ("tltorch-tt", "tltorch-tucker") and setting.startswith("r"):
        import tltorch  # optional peer: pip install 'compressed-transformer[tltorch]'

        rank = int(setting[1:])
        in_modes, out_modes = _tltorch_modes(in_features, out_features)
        if kind == "tltorch-tt":
            factorization, ranks = "blocktt", rank
        else:
            in_modes, out_modes = factorize(in_features, 2), factorize(out_features, 2)
            factorization, ranks = "tucker", (rank,) * 4
        return tltorch.FactorizedLinear(
            tuple(in_modes),
            tuple(out_modes),
            factorization=factorization,
            rank=ranks,
            implementation="factorized",
            **factory,
        )
    raise AssertionError(f"check_layer_name accepted {name!r} but build_layer has no case for it")


def layer_path(layer: nn.Module, tokens: int, train: bool) -> str:
    """The forward path a layer takes (``dense`` for ``nn.Linear`` and peers)."""
    if hasattr(layer, "forward_path"):
        return layer.forward_path(tokens, train=train)
    return "dense" if isinstance(layer, nn.Linear) else "factorized"


def _sparse_nnz(layer: nn.Module) -> int:
    with torch.no_grad():
        if isinstance(layer, SparseLinear):
            return layer.nnz
        if isinstance(layer, PrunedLinear):
            return int(layer.mask.sum())
        return int(layer.mask().sum())


def layer_macs(layer: nn.Module, tokens: int, train: bool) -> tuple[int | None, int | None]:
    """Closed-form multiply-adds of one pass: ``(of the path taken, fewest of the method)`` (``None`` for peers).

    Forward: the product itself; train: three times it (the backward's two products per matmul), which is exact
    for GEMMs and the usual estimate for chains, except a pruned layer's CSR training at a few tokens, whose weight
    gradient is a dense outer product (see ``_MaskedCSRLinear``). Rebuilding a weight and elementwise work are not
    counted.
    """
    dense = layer.in_features * layer.out_features if hasattr(layer, "in_features") else 0
    factor = 3 if train else 1
    path = layer_path(layer, tokens, train)
    if isinstance(layer, TTLinear):
        candidates = tt_plan_candidates(len(layer.cores))
        fewest = min(tt_plan_macs(layer.out_modes, layer.in_modes, layer.ranks, plan) for plan in candidates)
        plan = layer.forward_plan(tokens, train=train, cached=not train)
        taken = dense if plan is None else tt_plan_macs(layer.out_modes, layer.in_modes, layer.ranks, plan)
    elif isinstance(layer, TuckerLinear | LowRankLinear):
        rank = layer.rank if isinstance(layer, LowRankLinear) else tucker_linear_rank(layer.ranks, len(layer.out_modes))
        fewest = rank * (layer.in_features + layer.out_features)
        taken = fewest if path == "low-rank" else dense
    elif isinstance(layer, PrunedLinear | SparseLinear | SparseVDLinear):
        fewest = _sparse_nnz(layer)
        taken = fewest if path == "csr" else dense
        if path == "sampled":
            taken = 2 * dense
        dense_grad = tokens <= DENSE_GRAD_TOKENS and fewest >= DENSE_GRAD_MIN_DENSITY * dense
        if train and path == "csr" and isinstance(layer, PrunedLinear) and dense_grad:
            # CSR forward and input gradient, the weight gradient a dense outer product times the mask
            return tokens * (2 * fewest + dense), factor * tokens * fewest
    elif isinstance(layer, nn.Linear):
        fewest = taken = layer.in_features * layer.out_features
    else:  # a peer: its contraction order is its own; no closed form here
        return None, None
    return factor * tokens * taken, factor * tokens * fewest


# --- timing and memory ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_clock(config: Any, device: torch.device) -> str:
    """``wall`` or ``cpu`` from ``config.clock`` (see :class:`BenchConfig`; any config with a ``clock`` works).

    Raises:
        ValueError: for an unknown clock, or ``cpu`` where ops may run outside the calling thread.
    """
    single = device.type == "cpu" and torch.get_num_threads() == 1
    if config.clock not in ("auto", "wall", "cpu"):
        raise ValueError(f"--clock must be auto, wall or cpu; got {config.clock!r}")
    if config.clock == "cpu" and not single:
        raise ValueError("--clock cpu needs --device cpu and --threads 1 (other threads' work would not be counted)")
    return "cpu" if config.clock == "cpu" or (config.clock == "auto" and single) else "wall"


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


def _calls_per_sample(
    fn: Callable[[], Any], device: torch.device, clock: Callable[[], float], target_s: float = 2e-3
) -> tuple[int, float]:
    """How many calls make one timed sample last about ``target_s``; and the time of one call."""
    _sync(device)
    start = clock()
    fn()
    _sync(device)
    once = clock() - start
    return max(1, min(1000, math.ceil(target_s / max(once, 1e-7)))), once


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    repeats: int,
    budget_s: float,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` samples each, taken round-robin.

    The functions are warmed up in ``warmup`` interleaved rounds (caches, plans, allocator: the turns of the other
    functions are part of a function's steady state), then sampled in interleaved rounds so that a change of load
    on the machine affects all of them alike. Short calls are batched so that one sample
    lasts about 2 ms. ``clock`` is read around every sample (see ``BenchConfig.clock``).
    """
    numbers, per_round = {}, 0.0
    for _ in range(warmup):  # in the same turns as the samples: what one call leaves behind can slow the next one's
        for fn in fns.values():
            fn()
    for name, fn in fns.items():
        numbers[name], once = _calls_per_sample(fn, device, clock)
        per_round += numbers[name] * once
    rounds = max(3, min(repeats, int(budget_s / max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = clock()
            for _ in range(numbers[name]):
                fn()
            _sync(device)
            samples[name].append((clock() - start) / numbers[name])
    return samples


def median(values: Iterable[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of the tensors allocated while active (CPU or any device), by watching every op's fresh outputs.

    Outputs that alias an input (views, in-place and ``out=`` ops) are not allocations and are skipped; freed
    storages are noticed at the next op. Allocator caching and library workspaces are not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self._live: dict[int, tuple[Any, int]] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        for ptr, (ref, nbytes) in list(self._live.items()):
            if ref.expired():
                del self._live[ptr]
                self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        if not any(ret.alias_info is not None for ret in func._schema.returns):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                    storage = t.untyped_storage()
                    ptr = storage.data_ptr()
                    if ptr and ptr not in self._live:
                        self._live[ptr] = (self._ref(storage), storage.nbytes())
                        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes of the tensors one call of ``fn`` allocates (inputs, parameters and caches not included)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with PeakTensorMemory() as tracker:
        fn()
    return tracker.peak


# --- layer rows -----------------------------------------------------------------------------------------------------


def _layer_pass(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, train: bool) -> Callable[[], Any]:
    if not train:

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return layer(x)

        return forward
    params = list(layer.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        layer(x).backward(grad)

    return step


def _maybe_compile(module: nn.Module, enabled: bool, mode: str = "default") -> nn.Module:
    return torch.compile(module, dynamic=False, mode=mode) if enabled else module


def _allow_recompiles(limit: int = 512) -> None:
    """Every (layer, token count, pass) of the grid is its own static-shape graph of the same ``forward``: raise
    dynamo's per-function recompile limit (default 8) so that none of them silently falls back to eager."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))


def bench_layers(
    config: BenchConfig,
    device: torch.device,
    dtype: torch.dtype,
    compiled: frozenset[str],
    clock: str = "wall",
    skipped: list[dict[str, Any]] | None = None,
) -> list[dict]:
    """Rows of the layer grid (see the module docstring); a layer that cannot run here (tensorly-torch missing)
    is appended to ``skipped`` as ``{"layer", "in", "out", "reason"}``."""
    rows = []
    names = ["dense", *[n for n in config.layers if n != "dense"]]
    for in_features, out_features in config.shapes:
        layers: dict[str, nn.Module] = {}
        for name in names:
            try:
                layers[name] = build_layer(name, in_features, out_features, device=device, dtype=dtype)
            except ImportError as error:
                print(f"  skipping {name}: {error} (pip install 'compressed-transformer[tltorch]')")
                if skipped is not None:
                    skipped.append({"layer": name, "in": in_features, "out": out_features, "reason": str(error)})
        for pass_name in config.passes:
            train = pass_name == "train"
            for tokens in config.tokens:
                fns, chosen = {}, {}
                x = torch.randn(tokens, in_features, device=device, dtype=dtype, requires_grad=train)
                grad = torch.randn(tokens, out_features, device=device, dtype=dtype)
                for name, layer in layers.items():
                    if train and name.startswith(FORWARD_ONLY):
                        continue
                    layer.train(train)
                    chosen[name] = _maybe_compile(layer, pass_name in compiled, config.compile_mode)
                    fns[name] = _layer_pass(chosen[name], x, grad, train)
                samples = time_interleaved(fns, device, config.repeats, config.budget_s, clock=CLOCKS[clock])
                dense_s = median(samples["dense"])
                for name, times in samples.items():
                    layer = layers[name]
                    seconds = median(times)
                    macs, fewest = layer_macs(layer, tokens, train)
                    dense_macs = (3 if train else 1) * tokens * in_features * out_features
                    row = {
                        "layer": name,
                        "in": in_features,
                        "out": out_features,
                        "tokens": tokens,
                        "pass": pass_name,
                        "ms": seconds * 1e3,
                        "ratio_to_dense": seconds / dense_s,
                        # the fastest sample: what the layer costs when no other process interferes
                        "ms_min": min(times) * 1e3,
                        "ratio_min": min(times) / min(samples["dense"]),
                        "macs": macs,
                        "min_macs": fewest,
                        "dense_macs": dense_macs,
                        "gflops": 2 * macs / seconds / 1e9 if macs is not None else None,
                        "peak_bytes": peak_memory(fns[name], device),
                        "cache_bytes": cache_nbytes(layer),
                        "path": layer_path(layer, tokens, train),
                        "samples": len(times),
                        "compiled": pass_name in compiled,
                    }
                    rows.append(row)
                ours = [r for r in rows[-len(samples) :] if not r["layer"].startswith("tltorch-")]
                worst = max(ours, key=lambda r: r["ratio_to_dense"])
                print(
                    f"  {in_features}->{out_features} {pass_name:7s} {tokens:6d} tokens: dense {dense_s * 1e3:9.3f} ms,"
                    f" worst {worst['layer']} {worst['ratio_to_dense']:.2f} ({worst['path']})",
                    flush=True,
                )
    return rows


# --- whole Transformer ----------------------------------------------------------------------------------------------


TRANSFORMER_VARIANTS = ("dense", "tt", "tucker", "svd", "prune", "sparse", "tt+emb", "tt+ttemb")
TT_TABLE_RANK = 16  # the ``tt+ttemb`` variant's table, as the study's ``tt-all+ttemb`` row
# Rounds of training steps of the whole models before the timed ones. The first step allocates the optimiser state;
# and while the models take turns, a TT model goes on taking fresh pages from the OS for a few more turns (glibc's
# heap, fragmented by the other models' tensors), each of them markedly slower than its steady state.
TRAIN_WARMUP = 4


def build_transformer(
    variant: str, spec: TransformerBench, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> nn.Module:
    """The benchmark Transformer with every FFN linear ``dense``, ``tt``, ``tucker``, ``svd``, ``prune`` or
    ``sparse`` (the model's own :class:`~compressed_transformer.models.transformer.FFNSpec`, as the translation
    study builds it; ``prune`` keeps the largest ``1 - prune_sparsity`` of each random weight, ``sparse`` the same
    as kept weights only); ``tt+emb``:
    TT FFNs and the shared embedding / tied output table low-rank, rank ``d_model / 4`` (the study's ``tt-all+emb``);
    ``tt+ttemb``: TT FFNs and a TT table of TT-ranks 16 (the study's ``tt-all+ttemb``).

    Raises:
        ValueError: for an unknown variant.
    """
    from .models.transformer import FFNSpec, Transformer, preset

    method, _, table = variant.partition("+")
    if variant not in TRANSFORMER_VARIANTS:
        raise ValueError(f"unknown transformer variant {variant!r}; use {', '.join(TRANSFORMER_VARIANTS)}")
    base = preset(spec.preset, vocab_size=spec.vocab_size, max_positions=max(1024, 2 * spec.length))
    options = {
        "dense": {},
        "tt": {"ranks": list(spec.tt_ranks)},
        "tucker": {"ranks": spec.tucker_ranks},
        "svd": {"rank": spec.svd_rank or max(1, base.d_model // 8)},
        "prune": {"sparsity": spec.prune_sparsity},
        "sparse": {"sparsity": spec.prune_sparsity},
    }
    torch.manual_seed(seed)
    config = base.replace(ffn=FFNSpec(method, options[method]))
    model = Transformer(config)
    if table == "emb":
        model.compress_embeddings_("svd", rank=max(1, config.d_model // 4))
    elif table == "ttemb":
        model.compress_embeddings_("tt", ranks=TT_TABLE_RANK)
    return model.to(device=device, dtype=dtype)


def _greedy(model: nn.Module, src: torch.Tensor, steps: int) -> torch.Tensor:
    memory, mask = model.encode(src)
    tokens = torch.full((src.shape[0],), model.config.bos_id, dtype=torch.long, device=src.device)
    cache = None
    for step in range(steps):
        logp, cache = model.decode_step(tokens, memory, mask, cache, step)
        tokens = logp.argmax(dim=-1)
    return tokens


def _beam(model: nn.Module, src: torch.Tensor, steps: int, beam: int) -> torch.Tensor:
    """Fixed-length beam search (no EOS handling): ``beam`` hypotheses per sentence, reordered every step."""
    batch = src.shape[0]
    memory, mask = model.encode(src)
    memory, mask = memory.repeat_interleave(beam, 0), mask.repeat_interleave(beam, 0)
    scores = torch.zeros(batch, beam, device=src.device)
    scores[:, 1:] = float("-inf")
    tokens = torch.full((batch * beam,), model.config.bos_id, dtype=torch.long, device=src.device)
    cache = None
    for step in range(steps):
        logp, cache = model.decode_step(tokens, memory, mask, cache, step)  # (B*K, V)
        vocab = logp.shape[-1]
        total = (scores.reshape(-1, 1) + logp).reshape(batch, beam * vocab)
        scores, index = total.topk(beam, dim=-1)  # (B, K)
        origin = index // vocab + torch.arange(batch, device=src.device)[:, None] * beam
        tokens = (index % vocab).reshape(-1)
        cache = model.reorder_cache(cache, origin.reshape(-1))
    return tokens


def bench_transformer(
    spec: TransformerBench,
    device: torch.device,
    dtype: torch.dtype,
    compiled: frozenset[str],
    repeats: int,
    clock: str = "wall",
    compile_mode: str = "default",
    seed: int = 0,
) -> list[dict]:
    """Rows of the whole-model part: a training step, a greedy and a beam decoding pass per variant (weights and
    inputs drawn from ``seed``)."""
    from .size import stored_params

    variants = TRANSFORMER_VARIANTS
    gen = torch.Generator().manual_seed(seed + 1)
    src = torch.randint(4, spec.vocab_size, (spec.batch, spec.length), generator=gen).to(device)
    tgt = torch.randint(4, spec.vocab_size, (spec.batch, spec.length + 1), generator=gen).to(device)
    dec_src = torch.randint(4, spec.vocab_size, (spec.decode_batch, spec.length), generator=gen).to(device)
    models = {v: build_transformer(v, spec, device, dtype, seed) for v in variants}
    fns: dict[str, dict[str, Callable[[], Any]]] = {"train": {}, "greedy": {}, "beam": {}}
    optimizers = {}
    for variant, model in models.items():
        # decoding runs eager: its shapes change every step
        runner = _maybe_compile(model, "train" in compiled, compile_mode)
        optimizer = optimizers[variant] = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train_step(model=model, runner=runner, optimizer=optimizer) -> None:
            model.train()
            optimizer.zero_grad(set_to_none=True)
            logits = runner(src, tgt[:, :-1])
            model.loss(logits, tgt[:, 1:]).backward()
            optimizer.step()

        def greedy(model=model) -> None:
            model.eval()
            with torch.no_grad():
                _greedy(model, dec_src, spec.decode_steps)

        def beam(model=model) -> None:
            model.eval()
            with torch.no_grad():
                _beam(model, dec_src, spec.decode_steps, spec.beam)

        fns["train"][variant], fns["greedy"][variant], fns["beam"][variant] = train_step, greedy, beam
    rows = []
    tokens = {"train": spec.batch * spec.length, "greedy": spec.decode_batch, "beam": spec.decode_batch * spec.beam}
    for pass_name, group in fns.items():
        warmup = TRAIN_WARMUP if pass_name == "train" else 1
        samples = time_interleaved(group, device, repeats, budget_s=60.0, warmup=warmup, clock=CLOCKS[clock])
        dense_s = median(samples["dense"])
        for variant, times in samples.items():
            seconds = median(times)
            rows.append(
                {
                    "layer": f"transformer-{variant}",
                    "model": spec.preset,
                    "ffn": variant,
                    "tokens": tokens[pass_name],
                    "pass": pass_name,
                    "ms": seconds * 1e3,
                    "ratio_to_dense": seconds / dense_s,
                    "ms_min": min(times) * 1e3,
                    "ratio_min": min(times) / min(samples["dense"]),
                    "params": stored_params(models[variant]),
                    "peak_bytes": peak_memory(group[variant], device),
                    "cache_bytes": cache_nbytes(models[variant]),
                    **(
                        {"state_bytes": training_state_bytes(models[variant], optimizers[variant])}
                        if pass_name == "train"
                        else {}
                    ),
                    "samples": len(times),
                    "compiled": pass_name == "train" and "train" in compiled,
                }
            )
        print(
            f"  transformer {pass_name:6s}: "
            + ", ".join(f"{r['ffn']} {r['ms']:.1f} ms ({r['ratio_to_dense']:.2f})" for r in rows[-len(samples) :]),
            flush=True,
        )
    return rows


def training_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes a model holds between training steps: parameters, buffers, gradients, the optimiser's state and the
    compressed layers' caches (activations, freed after each step, are the train row's ``peak_bytes``)."""

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    params = list(model.parameters())
    held = sum(nbytes(p) for p in params) + sum(nbytes(b) for b in model.buffers())
    held += sum(nbytes(p.grad) for p in params if p.grad is not None)
    state = optimizer.state
    held += sum(nbytes(v) for p in params if p in state for v in state[p].values() if torch.is_tensor(v))
    return held + cache_nbytes(model)


# --- reports --------------------------------------------------------------------------------------------------------


def machine_description(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError, AttributeError):
        info["load_average"] = os.getloadavg()
    return info


def _fmt_ratio(row: dict) -> str:
    return f"{row['ratio_to_dense']:.2f}"


def markdown(result: dict) -> str:
    """The tables of ``bench.md``: ratio to dense per layer and token count, then absolute times, then the
    Transformer."""
    meta, rows = result["meta"], result["rows"]
    lines = [
        f"`{meta['command']}` — {meta['machine']['cpu']}, {meta['machine']['threads']} threads, "
        f"torch {meta['machine']['torch']}, {meta['dtype']}, device {meta['machine']['device']}, "
        f"{meta.get('clock', 'wall')} clock"
        + (f", load average {meta['machine']['load_average'][0]:.1f}" if "load_average" in meta["machine"] else ""),
        "",
    ]
    if meta.get("skipped"):
        lines += [
            "Not run here: "
            + "; ".join(f"{s['layer']} at {s['in']}→{s['out']} ({s['reason']})" for s in meta["skipped"]),
            "",
        ]
    layer_rows = [r for r in rows if not r["layer"].startswith("transformer-")]
    tokens = sorted({r["tokens"] for r in layer_rows})
    for pass_name in ("forward", "train"):
        subset = [r for r in layer_rows if r["pass"] == pass_name]
        if not subset:
            continue
        lines += [
            f"**{pass_name}** — ratio of median time to `nn.Linear` (lower is faster; path at the largest token count)",
            "",
            "| layer | shape | "
            + " | ".join(f"{t} tok" for t in tokens)
            + " | dense ms at "
            + str(tokens[-1])
            + " | path |",
            "|---|---|" + "---:|" * len(tokens) + "---:|---|",
        ]
        keys = []
        for r in subset:
            key = (r["in"], r["out"], r["layer"])
            if key not in keys:
                keys.append(key)
        for in_features, out_features, layer in keys:
            cells = {
                r["tokens"]: r for r in subset if (r["in"], r["out"], r["layer"]) == (in_features, out_features, layer)
            }
            dense = [
                r
                for r in subset
                if (r["in"], r["out"], r["layer"], r["tokens"]) == (in_features, out_features, "dense", tokens[-1])
            ]
            last = cells.get(tokens[-1]) or cells[max(cells)]
            lines.append(
                f"| {layer} | {in_features}→{out_features} | "
                + " | ".join(_fmt_ratio(cells[t]) if t in cells else "" for t in tokens)
                + f" | {dense[0]['ms']:.2f} | {last['path']} |"
            )
        lines.append("")
    model_rows = [r for r in rows if r["layer"].startswith("transformer-")]
    if model_rows:
        lines += [
            "**Transformer** (" + meta["transformer"]["preset"] + f", batch {meta['transformer']['batch']}×"
            f"{meta['transformer']['length']} tokens; decoding {meta['transformer']['decode_batch']} sentences × "
            f"{meta['transformer']['decode_steps']} steps, beam {meta['transformer']['beam']})",
            "",
            "| FFN | params | training state MB | train step ms | ratio | greedy ms | ratio | beam ms | ratio |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for ffn in TRANSFORMER_VARIANTS:
            by_pass = {r["pass"]: r for r in model_rows if r["ffn"] == ffn}
            if not by_pass:
                continue
            cells = []
            for p in ("train", "greedy", "beam"):
                cells += [f"{by_pass[p]['ms']:.1f}", _fmt_ratio(by_pass[p])] if p in by_pass else ["", ""]
            params = next(iter(by_pass.values()))["params"]
            state = by_pass["train"].get("state_bytes") if "train" in by_pass else None
            held = "" if state is None else f"{state / 1e6:.1f}"
            lines.append(f"| {ffn} | {params:,} | {held} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """``ratio.png``: ratio to dense against token count, one panel per shape and pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if not r["layer"].startswith("transformer-")]
    panels = sorted({(r["in"], r["out"], r["pass"]) for r in rows}, key=lambda k: (k[2], k[0], k[1]))
    if not panels:
        return
    columns = min(3, len(panels))
    height = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(height, columns, figsize=(5 * columns, 3.8 * height), squeeze=False)
    for ax, (in_features, out_features, pass_name) in zip(axes.flat, panels, strict=False):
        for layer in dict.fromkeys(r["layer"] for r in rows):
            points = sorted(
                (r["tokens"], r["ratio_to_dense"])
                for r in rows
                if (r["in"], r["out"], r["pass"], r["layer"]) == (in_features, out_features, pass_name, layer)
            )
            if points and layer != "dense":
                ax.plot(*zip(*points, strict=True), marker="o", label=layer)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(1.05, color="black", linewidth=0.5, linestyle=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{in_features}→{out_features}, {pass_name}")
        ax.set_xlabel("tokens")
        ax.set_ylabel("time / nn.Linear time")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if axes.flat[0].get_legend_handles_labels()[0]:  # a dense-only grid has no compressed layer to label
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- entry points ---------------------------------------------------------------------------------------------------


def resolve_device(config: BenchConfig) -> tuple[torch.device, torch.dtype, frozenset[str]]:
    """``(device, dtype, compiled passes)`` from the ``auto`` settings (see :func:`compile_passes`).

    Raises:
        ValueError: for CUDA requested without a CUDA device, or an unknown dtype / compile setting.
    """
    device, dtype = device_and_dtype(config.device, config.dtype)
    if config.compile not in ("auto", "on", "off"):
        raise ValueError(f"--compile must be auto, on or off; got {config.compile!r}")
    return device, dtype, compile_passes(config.compile, device)


def device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``--device`` (``auto``: CUDA when available) and ``--dtype`` (``auto``: bf16 on CUDA, float32 elsewhere).

    Raises:
        ValueError: for a device other than auto / cpu / cuda[:N], CUDA requested without a CUDA device, or an
            unknown dtype.
    """
    name = device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ValueError(f"--device must be auto, cpu or cuda[:N]; got {device!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch.cuda.is_available() is False; use --device cpu")
    resolved = torch.device(name)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
    dtype_name = dtype if dtype != "auto" else ("bfloat16" if resolved.type == "cuda" else "float32")
    if dtype_name not in dtypes:
        raise ValueError(f"--dtype must be one of auto, {', '.join(dtypes)}; got {dtype!r}")
    return resolved, dtypes[dtype_name]


def compile_passes(setting: str, device: torch.device) -> frozenset[str]:
    """The passes that run under ``torch.compile``: all for ``on``, none for ``off``; ``auto``: training passes
    on CUDA only. Measured on an H200 (docs/benchmark.md): inductor cut TT / Tucker training from 4.6-8.6x / 3.4-6.2x
    dense to 1.4-2.2x / 1.4-1.9x, but raised their forward from 1.2-1.7x to 2.8-4.4x (the eval cache is off under
    compile); on CPU it made no pass faster."""
    if setting == "on":
        return frozenset({"forward", "train"})
    return frozenset({"train"}) if setting == "auto" and device.type == "cuda" else frozenset()


def run_bench(config: BenchConfig, argv: list[str] | None = None) -> dict:
    """Run the benchmark and write ``bench.json``, ``bench.md`` and ``ratio.png`` into ``config.out``.

    Returns:
        ``{"meta": ..., "rows": [...]}`` as written to ``bench.json``.
    """
    device, dtype, compiled = resolve_device(config)
    clock = resolve_clock(config, device)
    check_grid(config)
    torch.manual_seed(config.seed)
    out = output_folder(config.out)
    command = command_line(sys.argv if argv is None else argv, "bench")
    if compiled:  # any pass
        _allow_recompiles()
    start = time.perf_counter()
    skipped: list[dict[str, Any]] = []
    with using_costs(config.costs, device) as costs:
        rows = bench_layers(config, device, dtype, compiled, clock, skipped)
        if config.transformer is not None:
            repeats = max(3, config.repeats // 2)
            rows += bench_transformer(
                config.transformer, device, dtype, compiled, repeats, clock, config.compile_mode, config.seed
            )
    meta = {
        "command": command,
        "config": asdict(config),
        "dtype": str(dtype).removeprefix("torch."),
        "compiled": sorted(compiled),
        "clock": clock,
        "machine": machine_description(device),
        "costs": costs,
        "git_revision": run_revision(),
        "seconds": time.perf_counter() - start,
        "transformer": asdict(config.transformer) if config.transformer is not None else None,
        "skipped": skipped,
    }
    result = {"meta": meta, "rows": rows}
    (out / "bench.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    (out / "bench.md").write_text(markdown(result) + "\n")
    plot(result, out / "ratio.png")
    return result


def check_grid(config: BenchConfig) -> None:
    """Build every layer of the grid and the Transformer preset on the ``meta`` device (no memory, no time), so that
    a bad name or setting fails before minutes of timing rather than after.

    Raises:
        ValueError: for an unknown layer name, a setting the layer refuses at one of the shapes, or an unknown
            Transformer preset.
    """
    meta = torch.device("meta")
    for name in config.layers:
        if name.startswith("tltorch-"):
            check_layer_name(name)  # the optional peer builds on real devices only: its name is checked here
            continue
        for in_features, out_features in config.shapes:
            try:
                build_layer(name, in_features, out_features, device=meta, dtype=torch.float32)
            except ValueError as error:
                raise ValueError(f"layer {name!r} at {in_features}x{out_features}: {error}") from None
    if config.transformer is not None:
        from .models.transformer import preset

        preset(config.transformer.preset, vocab_size=config.transformer.vocab_size)


def output_folder(path: str | Path) -> Path:
    """``--out``, created if missing.

    Raises:
        ValueError: if it is a file; OSError: if it cannot be created.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def set_threads(threads: int | None) -> None:
    """``--threads``: ``torch.set_num_threads`` (``None``: leave torch's default).

    Raises:
        ValueError: for fewer than one thread.
    """
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def command_line(argv: list[str], subcommand: str) -> str:
    """The command that ran, as a user would type it: ``compressed-transformer SUBCOMMAND ...`` (the script or
    ``python -m compressed_transformer``) or ``python -m compressed_transformer.SUBCOMMAND ...``."""
    if argv and Path(argv[0]).name in ("compressed-transformer", "__main__.py"):  # the script or python -m package
        return shlex.join(["compressed-transformer", *argv[1:]])
    if argv:
        return shlex.join(["python", "-m", f"compressed_transformer.{subcommand}", *argv[1:]])
    return f"compressed-transformer {subcommand}"


@contextlib.contextmanager
def using_costs(path: str | None, device: torch.device) -> Iterator[str]:
    """Within the block, layers on ``device`` decide their paths with the cost model of a ``calibrate`` file
    (``None``: the one in use); yields what is in use, for the record.

    Raises:
        FileNotFoundError, ValueError: for a missing or malformed file, or one without a model for ``device``.
    """
    kind = device_kind(device.type)
    if path is None:
        yield cost_model_source(kind)
        return
    models = load_cost_models(path)
    if kind not in models:
        raise ValueError(f"{path} has a cost model for {', '.join(models)} only, not for {kind}")
    previous = set_cost_model(kind, models[kind])
    try:
        yield str(path)
    finally:
        set_cost_model(kind, previous)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def _shapes(text: str) -> tuple[tuple[int, int], ...]:
    try:
        return tuple(tuple(int(v) for v in part.split("x")) for part in text.split(",") if part.strip())  # type: ignore[misc]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes look like 512x2048,2048x512; got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = BenchConfig()
    parser.add_argument("--quick", action="store_true", help="reduced grid, well under a minute on 2 CPU cores")
    parser.add_argument("--out", default=defaults.out, help="output folder")
    parser.add_argument("--shapes", type=_shapes, help="comma-separated INxOUT, e.g. 512x2048,2048x512")
    parser.add_argument("--tokens", type=_ints, help="comma-separated token counts, e.g. 1,32,512,4096")
    parser.add_argument("--layers", help="comma-separated layer names (see build_layer), e.g. dense,tt-r2,prune-0.9")
    parser.add_argument("--passes", default="forward,train", help="forward and/or train")
    parser.add_argument("--repeats", type=int, help="timed repetitions per row (median reported)")
    parser.add_argument("--budget", type=float, help="rough seconds per row (cuts repetitions, min 3)")
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda or auto")
    parser.add_argument("--dtype", default=defaults.dtype, help="float32, bfloat16 or auto (bf16 on CUDA)")
    parser.add_argument(
        "--compile",
        default=defaults.compile,
        help="torch.compile: on (every pass), off, auto (training passes on CUDA)",
    )
    parser.add_argument(
        "--compile-mode",
        default=defaults.compile_mode,
        choices=COMPILE_MODES,
        help="torch.compile mode (reduce-overhead: CUDA graphs)",
    )
    parser.add_argument(
        "--clock", default=defaults.clock, help="wall, cpu (thread CPU time; CPU with --threads 1 only) or auto"
    )
    parser.add_argument("--no-transformer", action="store_true", help="skip the whole-Transformer rows")
    parser.add_argument("--transformer-preset", help="model preset of the Transformer rows (default base)")
    parser.add_argument("--transformer-batch", type=int, help="sentences per Transformer training batch (default 16)")
    parser.add_argument(
        "--transformer-length", type=int, help="tokens per sentence of the Transformer rows (default 32)"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before measuring")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--costs", help=f"cost model file of compressed-transformer calibrate (default: built-in, or ${COSTS_ENV_VAR})"
    )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    base = quick_config() if args.quick else BenchConfig()
    changes: dict[str, Any] = {"out": args.out, "device": args.device, "dtype": args.dtype, "compile": args.compile}
    changes["compile_mode"] = args.compile_mode
    changes["clock"] = args.clock
    changes["seed"] = args.seed
    changes["costs"] = args.costs
    if args.shapes is not None:
        changes["shapes"] = args.shapes
    if args.tokens is not None:
        changes["tokens"] = args.tokens
    if args.layers:
        changes["layers"] = tuple(n.strip() for n in args.layers.split(",") if n.strip())
    changes["passes"] = tuple(p.strip() for p in args.passes.split(",") if p.strip())
    if args.repeats is not None:
        changes["repeats"] = args.repeats
    if args.budget is not None:
        changes["budget_s"] = args.budget
    if args.no_transformer:
        changes["transformer"] = None
    else:
        spec = {"preset": args.transformer_preset, "batch": args.transformer_batch, "length": args.transformer_length}
        spec = {k: v for k, v in spec.items() if v is not None}
        if any(v < 1 for k, v in spec.items() if k != "preset"):
            raise ValueError(f"--transformer-batch and --transformer-length must be >= 1; got {spec}")
        changes["transformer"] = replace(base.transformer or TransformerBench(), **spec)
    config = replace(base, **changes)
    return config


def main(args: argparse.Namespace) -> int:
    """Run ``bench`` from parsed arguments; prints where the outputs went."""
    set_threads(args.threads)
    config = config_from_args(args)
    result = run_bench(config)
    print(markdown(result))
    print(f"wrote {Path(config.out) / 'bench.json'}, bench.md, ratio.png in {result['meta']['seconds']:.0f} s")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand."""
    from .cli import add_command

    add_command(
        subparsers,
        "bench",
        help="time every compressed layer and a whole Transformer against dense, write bench.json/.md and a plot",
        doc=__doc__,
        add_arguments=add_arguments,
        main=main,
    )


if __name__ == "__main__":
    from .cli import run_module

    sys.exit(run_module("compressed_transformer.bench", __doc__, add_arguments, main))
