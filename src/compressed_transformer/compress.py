"""``compress_``: swap a model's ``nn.Linear`` modules for compressed layers, in place, by qualified name."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .functional.sparsity import global_magnitude_threshold
from .functional.tt import (
    max_tt_ranks,
    pad_rows,
    resolve_tt_ranks,
    tt_matrix_from_dense,
    tt_matrix_params,
    tt_matrix_to_dense,
)
from .functional.tucker import hosvd, resolve_tucker_ranks, tucker_params, tucker_to_dense
from .layers import (
    MAGNITUDE_PRUNING,
    METHODS,
    LowRankEmbedding,
    LowRankLinear,
    PrunedLinear,
    SparseLinear,
    SparseVDLinear,
    TTEmbedding,
    TTLinear,
    layer_options,
)
from .layers._common import copy_bias, resolve_modes
from .layers.embedding import tie_projection_

__all__ = [
    "EMBEDDING_METHODS",
    "EMBEDDING_OPTIONS",
    "CompressionReport",
    "LayerReport",
    "compress_",
    "compress_embeddings_",
    "pruned_to_sparse_",
    "select_linears",
    "sparse_vd_to_pruned_",
]

Filter = str | Callable[[str, nn.Module], bool] | None

# Options that fix a layer's size: they cannot be combined with ``ratio=``, which chooses them.
_SIZE_OPTIONS = {
    "tt": {"ranks", "eps"},
    "tucker": {"ranks"},
    "svd": {"rank", "energy"},
    "prune": {"sparsity", "threshold", "global_sparsity"},
    "sparse": {"sparsity", "threshold", "global_sparsity"},
    "svd-o": set(),
}


@dataclass(frozen=True)
class LayerReport:
    """What ``compress_`` did to one layer."""

    name: str
    method: str
    in_features: int
    out_features: int
    options: dict[str, Any]
    params_before: int
    params_after: int
    rel_error: float  # ||W - W_hat||_F / ||W||_F

    @property
    def ratio(self) -> float:
        return self.params_before / max(self.params_after, 1)


@dataclass
class CompressionReport:
    """Per-layer results of one ``compress_`` call; parameter counts include biases."""

    method: str
    rows: list[LayerReport] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.rows)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.rows)

    @property
    def ratio(self) -> float:
        """Compression ratio of the compressed layers together (not of the whole model)."""
        return self.params_before / max(self.params_after, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "ratio": self.ratio,
            "layers": [asdict(r) | {"ratio": r.ratio} for r in self.rows],
        }

    def __str__(self) -> str:
        lines = [
            "| layer | method | shape | options | params before | params after | ratio | rel. error |",
            "|---|---|---|---|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            opts = ", ".join(f"{k}={v}" for k, v in r.options.items())
            lines.append(
                f"| {r.name} | {r.method} | {r.in_features}→{r.out_features} | {opts} | {r.params_before:,} | "
                f"{r.params_after:,} | {r.ratio:.2f} | {r.rel_error:.4f} |"
            )
        lines.append(
            f"| **total** | {self.method} | | | {self.params_before:,} | {self.params_after:,} | {self.ratio:.2f} | |"
        )
        return "\n".join(lines)


def _linear_params(linear: nn.Linear) -> int:
    return linear.in_features * linear.out_features + (linear.out_features if linear.bias is not None else 0)


def select_linears(model: nn.Module, filter: Filter = None) -> list[tuple[str, nn.Linear]]:
    """The ``(qualified name, module)`` pairs of the plain ``nn.Linear`` modules that ``filter`` selects.

    Only modules whose type is exactly ``nn.Linear`` are candidates (subclasses such as
    ``nn.MultiheadAttention``'s ``out_proj``, whose weight the parent reads directly, are left alone).

    Args:
        model: the model to search.
        filter: ``None`` (every ``nn.Linear``), a regular expression searched in the qualified name, or a
            callable ``(name, module) -> bool``.

    Raises:
        ValueError: if the model has no ``nn.Linear``, the filter is malformed, or it selects nothing.
    """
    return _select(model, filter, nn.Linear)


def _select(model: nn.Module, filter: Filter, kind: type[nn.Module]) -> list[tuple[str, nn.Module]]:
    what = f"nn.{kind.__name__}"
    candidates = [(n, m) for n, m in model.named_modules() if type(m) is kind]
    if not candidates:
        raise ValueError(f"the model ({type(model).__name__}) has no {what} module to compress")
    if filter is None:
        return candidates
    # A module shared by several parents is selected by any of its names (and reported under its first one).
    aliases = module_aliases(model)
    if isinstance(filter, str):
        try:
            pattern = re.compile(filter)
        except re.error as error:
            raise ValueError(f"filter {filter!r} is not a valid regular expression: {error}") from None
        chosen = [(n, m) for n, m in candidates if any(pattern.search(a) for a in aliases[id(m)])]
        others = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if n and pattern.search(n)]
    elif callable(filter):
        chosen = [(n, m) for n, m in candidates if any(filter(a, m) for a in aliases[id(m)])]
        others = []
    else:
        raise ValueError(f"filter must be None, a regex string or a callable (name, module) -> bool, got {filter!r}")
    if not chosen:
        names = ", ".join(n for n, _ in candidates[:12]) + (" ..." if len(candidates) > 12 else "")
        hint = f"; it matches only modules that are not {what}: {', '.join(others[:8])}" if others else ""
        raise ValueError(f"filter {filter!r} selects no {what}{hint}. The {what} modules are: {names}")
    return chosen


def _check_untied(model: nn.Module, linears: list[tuple[str, nn.Linear]]) -> None:
    """Refuse a selected layer whose weight or bias another module also holds (a tied output projection):
    replacing the layer would untie them and keep the shared tensor, so the model would grow."""
    holders: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), []).append(f"{module_name}.{param_name}" if module_name else param_name)
    for name, linear in linears:
        for param in (linear.weight, linear.bias):
            others = [] if param is None else [h for h in holders[id(param)] if h.rpartition(".")[0] != name]
            if others:
                raise ValueError(
                    f"layer {name!r} shares a parameter with {', '.join(others)} (tied weights): replacing it would "
                    "untie them and keep the shared tensor. Compress the table with compress_embeddings_ (a tied "
                    "projection stays tied) or leave this layer out with filter="
                )


def _check_materialised(modules: list[tuple[str, nn.Module]], caller: str) -> None:
    """Refuse selected modules whose weight has no data (the meta device): their factors come from that data.

    Raises:
        ValueError: naming the modules.
    """
    meta = [name for name, module in modules if module.weight.is_meta]
    if meta:
        raise ValueError(
            f"{caller} computes the compressed layers from the trained weights, but {', '.join(meta[:8])}"
            f"{' ...' if len(meta) > 8 else ''} {'has its weight' if len(meta) == 1 else 'have their weights'} on the "
            "meta device (no data): load or initialise the weights first (to build untrained compressed layers, use "
            "compressed_transformer.layers.build_linear)"
        )


def _check_ratio(ratio: object) -> None:
    if not (isinstance(ratio, int | float) and math.isfinite(ratio) and ratio >= 1.0):
        raise ValueError(f"ratio must be a finite number >= 1, got {ratio!r}")


def _check_options(method: str, options: dict[str, Any], ratio: float | None) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if ratio is None:
        return
    if method == "svd-o":
        raise ValueError(
            "ratio= is not available for 'svd-o' (Sparse VD): its sparsity comes from training with the KL term; "
            "compress with 'svd-o', train, then read the ratio (or prune the trained model with method='prune')"
        )
    _check_ratio(ratio)
    clash = _SIZE_OPTIONS[method] & set(options)
    if clash:
        raise ValueError(f"give either ratio= or {sorted(clash)} for method {method!r}, not both")


def _budget(linears: list[tuple[str, nn.Linear]], ratio: float) -> int:
    return math.floor(sum(_linear_params(m) for _, m in linears) / ratio)


def _bias(linear: nn.Linear) -> int:
    return linear.out_features if linear.bias is not None else 0


def _too_small(ratio: float, smallest: int, budget: int) -> ValueError:
    return ValueError(
        f"ratio={ratio} is out of reach: even the smallest setting of every layer stores {smallest:,} parameters, "
        f"above the budget of {budget:,}"
    )


def _allocate_prune(linears, ratio: float) -> list[dict[str, Any]]:
    """Keep the weights with the largest magnitude relative to their layer's Frobenius norm, across all layers.

    Ranking by ``|w| / ||W||_F`` removes the least total relative squared error (the criterion of the other
    allocators) and, unlike one raw magnitude threshold, never empties a layer just because its weights live on
    a smaller scale than another layer's.
    """
    budget = _budget(linears, ratio)
    keep = budget - sum(_bias(m) for _, m in linears)
    if keep < 1:
        raise _too_small(ratio, sum(_bias(m) for _, m in linears) + 1, budget)
    magnitudes = [m.weight.detach().abs().flatten().double().cpu() for _, m in linears]
    scores = torch.cat([a / torch.linalg.vector_norm(a).clamp_min(1e-300) for a in magnitudes])
    if keep >= scores.numel():
        return [{"threshold": -1.0} for _ in linears]
    cut = torch.kthvalue(scores, scores.numel() - keep).values
    options, start = [], 0
    for a in magnitudes:
        kept = int((scores[start : start + a.numel()] > cut).sum())
        start += a.numel()
        # The layer's own threshold in weight units: keeps exactly its `kept` largest magnitudes (fewer on ties).
        threshold = -1.0 if kept == a.numel() else float(torch.kthvalue(a, a.numel() - kept).values)
        options.append({"threshold": threshold})
    return options


def _allocate_svd(linears, ratio: float) -> list[dict[str, Any]]:
    """Greedy over all singular components: most relative squared error removed per stored parameter first."""
    budget = _budget(linears, ratio)
    spectra = [torch.linalg.svdvals(m.weight.detach().double()).cpu() for _, m in linears]
    ranks = [1] * len(linears)
    used = sum(m.in_features + m.out_features + _bias(m) for _, m in linears)
    if used > budget:
        raise _too_small(ratio, used, budget)
    gains = []
    for index, ((_, m), s) in enumerate(zip(linears, spectra, strict=True)):
        power = (s * s) / (s * s).sum().clamp_min(1e-300)
        cost = m.in_features + m.out_features
        gains += [(float(power[j]) / cost, j, index) for j in range(1, s.numel())]
    for _, j, index in sorted(gains, reverse=True):
        m = linears[index][1]
        cost = m.in_features + m.out_features
        within_dense = (j + 1) * cost <= m.in_features * m.out_features  # never store more than the dense weight
        if ranks[index] == j and within_dense and used + cost <= budget:  # a layer's components go in order
            ranks[index] += 1
            used += cost
    return [{"rank": r} for r in ranks]


def _greedy_ranks(linears, ratio: float, params_of, error_of, max_rank_of) -> list[int]:
    """Grow one uniform rank per layer, always where it removes the most squared relative error per parameter."""
    budget = _budget(linears, ratio)
    ranks = [1] * len(linears)
    used = sum(params_of(i, 1) + _bias(m) for i, (_, m) in enumerate(linears))
    if used > budget:
        raise _too_small(ratio, used, budget)
    errors: dict[tuple[int, int], float] = {}

    def err(i: int, r: int) -> float:
        if (i, r) not in errors:
            errors[i, r] = error_of(i, r)
        return errors[i, r]

    while True:
        best = None
        for i in range(len(linears)):
            r, p = ranks[i], params_of(i, ranks[i])
            nxt = r + 1
            while nxt <= max_rank_of(i) and params_of(i, nxt) == p:
                nxt += 1
            weights = linears[i][1].in_features * linears[i][1].out_features
            if nxt > max_rank_of(i) or params_of(i, nxt) > weights:  # never store more than the dense weight
                continue
            extra = params_of(i, nxt) - p
            if used + extra > budget:
                continue
            score = (err(i, r) ** 2 - err(i, nxt) ** 2) / extra
            if best is None or score > best[0]:
                best = (score, i, nxt, extra)
        if best is None:
            return ranks
        _, i, nxt, extra = best
        ranks[i], used = nxt, used + extra


def _relative(weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(weight - approx) / torch.linalg.matrix_norm(weight).clamp_min(1e-300))


def _modes_of(method: str, linears, options: dict[str, Any], default_d: int) -> list[tuple[list[int], list[int]]]:
    """``(in_modes, out_modes)`` of each selected linear under ``options`` (TT outputs may be padded).

    Raises:
        ValueError: naming the first layer the modes do not fit.
    """
    given = (options.get("in_modes"), options.get("out_modes"))
    modes = []
    for name, linear in linears:
        try:
            modes.append(
                resolve_modes(linear.in_features, linear.out_features, *given, default_d, pad_out=method == "tt")
            )
        except ValueError as error:
            raise _on_layer(method, name, error) from None
    return modes


def _on_layer(method: str, name: str, error: Exception) -> ValueError:
    """The error of options of ``method`` that do not fit the layer ``name``."""
    return ValueError(f"invalid options for method {method!r} on layer {name!r}: {error}")


def _allocate_tt(linears, ratio: float, options: dict[str, Any]) -> list[dict[str, Any]]:
    """One relative error bound ``eps`` for every layer (t3f's ``to_tt_matrix`` semantics), found by bisection:
    the smallest ``eps`` whose TT-SVD ranks fit the budget. Ranks adapt per bond and per layer, and the worst
    layer's relative error is as small as the budget allows."""
    biases = sum(_bias(m) for _, m in linears)
    budget = _budget(linears, ratio) - biases  # for the cores
    modes = _modes_of("tt", linears, options, 4)
    # out_modes may pad a layer's outputs: its TT-matrix has zero rows there (as TTLinear.from_linear gives it)
    weights = [
        pad_rows(m.weight.detach().double(), math.prod(om)) for (_, m), (_, om) in zip(linears, modes, strict=True)
    ]

    def ranks_at(eps: float) -> list[list[int]]:
        out = []
        for weight, (im, om) in zip(weights, modes, strict=True):
            cores = tt_matrix_from_dense(weight, om, im, eps=eps)
            out.append([1] + [c.shape[-1] for c in cores])
        return out

    def size(all_ranks: list[list[int]]) -> int:
        return sum(tt_matrix_params(om, im, r) for (im, om), r in zip(modes, all_ranks, strict=True))

    smallest = [[1] * (len(im) + 1) for im, _ in modes]
    if size(smallest) > budget:
        raise _too_small(ratio, size(smallest) + biases, budget + biases)
    lo, hi, by_eps = 0.0, 1.0, smallest
    for _ in range(30):
        mid = (lo + hi) / 2
        ranks = ranks_at(mid)
        if size(ranks) <= budget:
            hi, by_eps = mid, ranks
        else:
            lo = mid
        if hi - lo < 1e-4:
            break
    # The eps split of TT-SVD is conservative and can undershoot the budget badly (nearly incompressible
    # weights); a uniform rank cap is the other candidate, and the one with the smaller error wins.
    shapes = [[o * i for o, i in zip(om, im, strict=True)] for im, om in modes]

    def uniform(r: int) -> list[list[int]]:
        return [resolve_tt_ranks(r, shape) for shape in shapes]

    lo_r, hi_r = 1, max(max(max_tt_ranks(shape)) for shape in shapes)
    while lo_r < hi_r:
        mid = (lo_r + hi_r + 1) // 2
        lo_r, hi_r = (mid, hi_r) if size(uniform(mid)) <= budget else (lo_r, mid - 1)
    by_rank = uniform(lo_r)

    def total_error(all_ranks: list[list[int]]) -> float:
        total = 0.0
        for (_, linear), weight, (im, om), r in zip(linears, weights, modes, all_ranks, strict=True):
            approx = tt_matrix_to_dense(tt_matrix_from_dense(weight, om, im, ranks=r))
            rows = linear.out_features  # the error of the outputs, not of the padding rows
            total += _relative(weight[:rows], approx[:rows]) ** 2
        return total

    best = min((by_eps, by_rank), key=total_error)
    return [{"ranks": r} for r in best]


def _allocate_tucker(linears, ratio: float, options: dict[str, Any]) -> list[dict[str, Any]]:
    modes = _modes_of("tucker", linears, options, 2)
    shapes = [om + im for im, om in modes]

    def params_of(i: int, r: int) -> int:
        return tucker_params(shapes[i], resolve_tucker_ranks(r, shapes[i]))

    def error_of(i: int, r: int) -> float:
        weight = linears[i][1].weight.detach().double()
        core, factors = hosvd(weight.reshape(shapes[i]), r)
        return _relative(weight, tucker_to_dense(core, factors).reshape(weight.shape))

    ranks = _greedy_ranks(linears, ratio, params_of, error_of, lambda i: max(shapes[i]))
    return [{"ranks": r} for r in ranks]


def _layer_options(layer: nn.Module) -> dict[str, Any]:
    if isinstance(layer, PrunedLinear | SparseLinear):
        return {"sparsity": round(layer.sparsity, 6)}
    return layer_options(layer)


def compress_(
    model: nn.Module,
    method: str,
    *,
    filter: Filter = None,
    ratio: float | None = None,
    **options: Any,
) -> CompressionReport:
    """Replace the selected ``nn.Linear`` modules of ``model`` by compressed layers, in place.

    Each selected layer is converted with ``METHODS[method].from_linear(linear, **options)``; every new layer is
    built before any is swapped, so a failure leaves ``model`` untouched. With ``ratio=R`` the method's size
    options are chosen so that the selected layers together store at most ``1/R`` of their dense parameters
    (biases included), with the least reconstruction error the allocator finds: for ``prune`` one ranking of
    every weight's magnitude relative to its layer's Frobenius norm (a threshold per layer); for ``svd`` a greedy
    split of singular components; for ``tt`` the better of a bisection on the TT-SVD tolerance ``eps`` and a
    uniform rank cap; for ``tucker`` greedy per-layer uniform ranks.

    The new layers hold new parameters: create optimisers (and register hooks on the layers) afterwards. Hooks
    registered on a replaced ``nn.Linear`` stay on it and no longer run (a warning names such layers).

    Args:
        model: any ``nn.Module``; its submodules are replaced.
        method: ``"tt"``, ``"tucker"``, ``"svd"``, ``"prune"``, ``"sparse"`` (pruned as ``prune``, storing the
            kept weights only: :class:`~compressed_transformer.layers.SparseLinear`) or ``"svd-o"`` (Sparse
            Variational Dropout).
        filter: which ``nn.Linear`` modules: ``None`` for all, a regex searched in the qualified name, or a
            callable ``(name, module) -> bool`` (a module shared by several parents is selected by any of its names).
        ratio: target compression ratio of the selected layers together (``>= 1``), instead of size options.
        **options: forwarded to ``from_linear`` (e.g. ``ranks=``, ``eps=``, ``rank=``, ``energy=``,
            ``sparsity=``, ``threshold=``, ``in_modes=``, ``out_modes=``, ``n_iter=``). For ``prune`` and ``sparse``,
            ``global_sparsity=s`` prunes the fraction ``s`` of all selected weights with one global magnitude
            threshold (instead of ``sparsity=s`` in every layer).

    Returns:
        a :class:`CompressionReport` with one row per replaced layer.

    Raises:
        ValueError: for an unknown method, options the method does not take, options that clash with
            ``ratio``, an unreachable ratio, a filter that selects nothing, or a selected layer on the meta device.
    """
    _check_options(method, options, ratio)
    linears = select_linears(model, filter)
    _check_untied(model, linears)
    _check_materialised(linears, "compress_")
    if any(name == "" for name, _ in linears):
        raise ValueError(
            "compress_ replaces submodules, but the model itself is an nn.Linear; "
            f"use {METHODS[method].__name__}.from_linear(linear, ...) instead"
        )
    with torch.no_grad():
        if ratio is None and method in MAGNITUDE_PRUNING and "global_sparsity" in options:
            rest = {k: v for k, v in options.items() if k != "global_sparsity"}
            threshold = global_magnitude_threshold([m.weight for _, m in linears], options["global_sparsity"])
            per_layer = [rest | {"threshold": threshold} for _ in linears]
        elif ratio is None:
            per_layer = [dict(options) for _ in linears]
        elif method in MAGNITUDE_PRUNING:
            per_layer = _allocate_prune(linears, ratio)
        elif method == "svd":
            per_layer = _allocate_svd(linears, ratio)
        elif method == "tt":
            per_layer = [options | o for o in _allocate_tt(linears, ratio, options)]
        else:
            per_layer = [options | o for o in _allocate_tucker(linears, ratio, options)]
        cls = METHODS[method]
        new_layers = []
        for (name, linear), layer_options in zip(linears, per_layer, strict=True):
            try:
                layer = cls.from_linear(linear, **layer_options)
            except (TypeError, ValueError) as error:
                raise _on_layer(method, name, error) from None
            new_layers.append(_keep_frozen(linear, layer))
        aliases = module_aliases(model)
        report = CompressionReport(method)
        _warn_about_hooks(linears)
        for (name, linear), layer in zip(linears, new_layers, strict=True):
            weight = linear.weight.detach()
            report.rows.append(
                LayerReport(
                    name=name,
                    method=method,
                    in_features=linear.in_features,
                    out_features=linear.out_features,
                    options=_layer_options(layer),
                    params_before=_linear_params(linear),
                    params_after=layer.num_stored_params(),
                    rel_error=_relative(weight.double(), layer.to_dense().detach().double()),
                )
            )
            replace_module(model, aliases[id(linear)], layer)
    return report


def _warn_about_hooks(linears: list[tuple[str, nn.Linear]]) -> None:
    """Warn that the hooks registered on the replaced layers stop running (they stay on the old modules)."""
    kinds = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
    hooked = [name for name, linear in linears if any(getattr(linear, kind, None) for kind in kinds)]
    if hooked:
        warnings.warn(
            f"compress_ replaces {', '.join(hooked[:8])}{' ...' if len(hooked) > 8 else ''}, which "
            f"{'has' if len(hooked) == 1 else 'have'} hooks registered: they stay on the replaced nn.Linear and no "
            "longer run; register them on the new layers",
            UserWarning,
            stacklevel=3,
        )


def _keep_frozen(linear: nn.Linear, layer: nn.Module) -> nn.Module:
    """``layer`` with the weight's factors (or kept values) frozen where ``linear.weight`` was, and its bias where
    ``linear.bias`` was."""
    for name, param in layer.named_parameters():
        source = linear.bias if name == "bias" else linear.weight
        param.requires_grad_(source.requires_grad)
    return layer


def module_aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every qualified name of each submodule of ``model``, keyed by ``id`` (a module shared by several parents
    has several)."""
    aliases: dict[int, list[str]] = {}
    for qualified, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(qualified)
    return aliases


def replace_module(model: nn.Module, names: list[str], new: nn.Module) -> None:
    """Put ``new`` at each qualified name of ``names`` (the aliases of one module, see :func:`module_aliases`), in
    the train / eval mode of the module it replaces."""
    new.train(model.get_submodule(names[0]).training)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)


def sparse_vd_to_pruned_(model: nn.Module) -> list[str]:
    """Replace every :class:`~compressed_transformer.layers.SparseVDLinear` of ``model`` by the
    :class:`~compressed_transformer.layers.PrunedLinear` with its eval-mode output (kept weights ``theta``, the
    mask ``log alpha <= threshold``), in place, in each layer's train / eval mode.

    ``log sigma^2`` is needed only for variational training, so this is the form to ship a Sparse VD model in:
    :func:`~compressed_transformer.serialization.save_compressed` then stores only the kept weights. Training
    afterwards fine-tunes those weights with the mask fixed.

    Returns:
        The qualified names of the replaced layers (a shared layer under its first name).

    Raises:
        ValueError: if ``model`` is itself a ``SparseVDLinear`` (call its ``to_pruned()``).
    """
    return _convert_layers_(
        model,
        lambda m: isinstance(m, SparseVDLinear),
        SparseVDLinear.to_pruned,
        "sparse_vd_to_pruned_",
        "layer.to_pruned()",
    )


def pruned_to_sparse_(model: nn.Module) -> list[str]:
    """Replace every :class:`~compressed_transformer.layers.PrunedLinear` of ``model`` by the
    :class:`~compressed_transformer.layers.SparseLinear` that stores only its kept weights (same outputs, same
    gradients for the kept weights), in place, in each layer's train / eval mode: the form to fine-tune or ship a
    pruned model in once its masks are final. Create optimisers afterwards (the parameters are new).

    Returns:
        The qualified names of the replaced layers (a shared layer under its first name).

    Raises:
        ValueError: if ``model`` is itself a ``PrunedLinear`` (use ``SparseLinear.from_pruned``).
    """
    return _convert_layers_(
        model,
        lambda m: type(m) is PrunedLinear,
        SparseLinear.from_pruned,
        "pruned_to_sparse_",
        "SparseLinear.from_pruned(layer)",
    )


def _convert_layers_(
    model: nn.Module,
    selects: Callable[[nn.Module], bool],
    convert: Callable[[nn.Module], nn.Module],
    caller: str,
    instead: str,
) -> list[str]:
    """Replace every module of ``model`` that ``selects`` by ``convert(module)``, in place (a shared module once,
    at all its names); the qualified names of the replaced ones.

    Raises:
        ValueError: if ``model`` itself is selected (it cannot replace itself; ``instead`` says what to call).
    """
    if selects(model):
        raise ValueError(
            f"{caller} replaces submodules, but the model itself is a {type(model).__name__}; use {instead} instead"
        )
    aliases = module_aliases(model)
    replaced = []
    for name, module in list(model.named_modules()):
        if selects(module):
            replace_module(model, aliases[id(module)], convert(module))
            replaced.append(name)
    return replaced


# Embedding compression method -> its options (``compress_embeddings_``).
EMBEDDING_OPTIONS: dict[str, tuple[str, ...]] = {"svd": ("rank",), "tt": ("ranks", "eps", "voc_modes", "emb_modes")}
EMBEDDING_METHODS = tuple(EMBEDDING_OPTIONS)


def _tied_projection(method: str, layer: nn.Module, linear: nn.Linear, name: str) -> nn.Module:
    """The compressed layer that replaces ``linear``, an output projection tied to the table ``layer`` replaces:
    it shares ``layer``'s factors (``svd``) or cores (``tt``) and keeps ``linear``'s bias."""
    factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
    bias = linear.bias is not None
    if method == "svd":
        projection = LowRankLinear(linear.in_features, linear.out_features, bias, rank=layer.rank, **factory)
    else:
        projection = TTLinear(  # voc_modes that pad the vocabulary pad its outputs (within the same bound)
            linear.in_features,
            linear.out_features,
            bias,
            in_modes=layer.emb_modes,
            out_modes=layer.voc_modes,
            ranks=layer.ranks,
            **factory,
        )
    tie_projection_(projection, layer)
    copy_bias(projection.bias, linear)
    return projection


def _embedding_budget(method: str, table: nn.Embedding, ratio: float, options: dict[str, Any]) -> dict[str, Any]:
    """The largest ``rank`` (``svd``) or uniform TT-rank (``tt``) that stores ``table`` at least ``ratio`` times
    smaller.

    Raises:
        ValueError: if even rank 1 is too large.
    """
    num, dim = table.num_embeddings, table.embedding_dim
    budget = num * dim / ratio
    if method == "svd":
        rank = min(int(budget // (num + dim)), num, dim)
        if rank < 1:
            raise _too_small(ratio, num + dim, int(budget))
        return {"rank": rank}
    probe = TTEmbedding(num, dim, voc_modes=options.get("voc_modes"), emb_modes=options.get("emb_modes"), device="meta")
    shape = [v * e for v, e in zip(probe.voc_modes, probe.emb_modes, strict=True)]
    chosen = None
    for rank in range(1, max(max_tt_ranks(shape)) + 1):
        if tt_matrix_params(probe.voc_modes, probe.emb_modes, resolve_tt_ranks(rank, shape)) > budget:
            break
        chosen = rank
    if chosen is None:
        raise _too_small(ratio, tt_matrix_params(probe.voc_modes, probe.emb_modes, [1] * (len(shape) + 1)), int(budget))
    return {"ranks": chosen, "voc_modes": probe.voc_modes, "emb_modes": probe.emb_modes}


def compress_embeddings_(
    model: nn.Module, method: str = "svd", *, filter: Filter = None, ratio: float | None = None, **options: Any
) -> CompressionReport:
    """Replace the selected ``nn.Embedding`` modules of ``model`` by compressed tables, in place:

    * ``"svd"`` (``rank=``): :class:`~compressed_transformer.layers.LowRankEmbedding`, the truncated SVD of the
      trained table (ALBERT's factorised embedding);
    * ``"tt"`` (``ranks=`` and/or ``eps=``, optional ``voc_modes=`` / ``emb_modes=``):
      :class:`~compressed_transformer.layers.TTEmbedding`, the TT-SVD of the table (Hrinchuk et al. 2020).

    An ``nn.Linear`` whose weight *is* a selected table (a tied output projection) becomes a
    :class:`~compressed_transformer.layers.LowRankLinear` / :class:`~compressed_transformer.layers.TTLinear` that
    shares the new table's factors / cores, so the tie holds through training and they are stored once (its bias,
    if any, is kept). A table shared by several parents is replaced everywhere, and so is every other
    ``nn.Embedding`` holding the same weight (``options["shared"]`` of its row names them). A frozen table's
    factors / cores are created frozen.

    Args:
        model: any ``nn.Module``; its submodules are replaced.
        method: ``"svd"`` or ``"tt"``.
        filter: which ``nn.Embedding`` modules, as in :func:`compress_`.
        ratio: instead of ``rank`` / ``ranks`` / ``eps``: the largest rank (``svd``) or uniform TT-rank (``tt``)
            that stores every selected table at least ``ratio`` times smaller.
        **options: the method's options (above).

    Returns:
        a :class:`CompressionReport` with one row per table (``in_features`` = vocabulary size, ``out_features`` =
        width; ``options["tied"]`` names the tied projections, whose parameters are the table's).

    Raises:
        ValueError: for an unknown method or options, options out of range, a malformed filter or one that selects
            nothing, a model without ``nn.Embedding``, a table on the meta device, or tables sharing a weight with
            different ``padding_idx`` (or other lookup settings); a failure leaves ``model`` untouched.
    """
    if method not in EMBEDDING_METHODS:
        raise ValueError(f"unknown embedding method {method!r}; choose one of {', '.join(EMBEDDING_METHODS)}")
    known = set(EMBEDDING_OPTIONS[method])
    if set(options) - known:
        raise ValueError(f"unknown options {sorted(set(options) - known)} for {method!r}; known: {sorted(known)}")
    if ratio is not None:
        _check_ratio(ratio)
        if {"rank", "ranks", "eps"} & set(options):
            raise ValueError("ratio= chooses the rank: pass it instead of rank= / ranks= / eps=")
    elif method == "svd" and "rank" not in options:
        raise ValueError("compress_embeddings_(model, 'svd') needs rank= or ratio=")
    embeddings = _select(model, filter, nn.Embedding)
    if any(name == "" for name, _ in embeddings):
        raise ValueError(
            "compress_embeddings_ replaces submodules, but the model itself is an nn.Embedding; "
            "use LowRankEmbedding.from_embedding / TTEmbedding.from_embedding instead"
        )
    _check_materialised(embeddings, "compress_embeddings_")
    aliases = module_aliases(model)
    # A selected table's weight may be held by other nn.Embedding modules too (an encoder's and a decoder's table
    # sharing one tensor): the table is compressed once and the one new module replaces all of them.
    unique: dict[int, tuple[str, nn.Embedding]] = {}
    for name, table in embeddings:
        unique.setdefault(id(table.weight), (name, table))
    embeddings = list(unique.values())
    sharing = {id(table): _sharing_tables(model, name, table) for name, table in embeddings}
    tied = {
        id(table): [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and m.weight is table.weight]
        for _, table in embeddings
    }
    build = LowRankEmbedding.from_embedding if method == "svd" else TTEmbedding.from_embedding
    with torch.no_grad():
        plan = []
        for name, table in embeddings:
            picked = _embedding_budget(method, table, ratio, options) if ratio is not None else {}
            layer = build(table, **{**options, **picked})
            for param in layer.parameters():  # a frozen table stays frozen (its tied projections share these)
                param.requires_grad_(table.weight.requires_grad)
            projections = [(n, linear, _tied_projection(method, layer, linear, n)) for n, linear in tied[id(table)]]
            for _, linear, projection in projections:
                if linear.bias is not None:
                    projection.bias.requires_grad_(linear.bias.requires_grad)
            plan.append((name, table, layer, projections))
        report = CompressionReport(f"{method}-embedding")
        for name, table, layer, projections in plan:
            chosen = {"rank": layer.rank} if method == "svd" else {"ranks": layer.ranks, "voc_modes": layer.voc_modes}
            shared = {"shared": [n for n, _ in sharing[id(table)]]} if sharing[id(table)] else {}
            report.rows.append(
                LayerReport(
                    name=name,
                    method=f"{method}-embedding",
                    in_features=table.num_embeddings,
                    out_features=table.embedding_dim,
                    options={**chosen, "tied": [n for n, _, _ in projections], **shared},
                    params_before=table.weight.numel(),
                    params_after=layer.num_stored_params(),
                    rel_error=_relative(table.weight.detach().double(), layer.to_dense().detach().double()),
                )
            )
            for module in (table, *(other for _, other in sharing[id(table)])):
                replace_module(model, aliases[id(module)], layer)
            for _, linear, projection in projections:
                replace_module(model, aliases[id(linear)], projection)
    return report


def _sharing_tables(model: nn.Module, name: str, table: nn.Embedding) -> list[tuple[str, nn.Embedding]]:
    """The other ``nn.Embedding`` modules of ``model`` that hold ``table``'s weight (one compressed table will
    replace them all).

    Raises:
        ValueError: if one of them looks up differently (``padding_idx``, ``max_norm``, ...), which one compressed
            table cannot reproduce for both.
    """
    keys = ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
    others = [
        (n, m)
        for n, m in model.named_modules()
        if type(m) is nn.Embedding and m is not table and m.weight is table.weight
    ]
    for other_name, other in others:
        differ = [k for k in keys if getattr(other, k) != getattr(table, k)]
        if differ:
            settings = ", ".join(f"{k}={getattr(table, k)!r} vs {getattr(other, k)!r}" for k in differ)
            raise ValueError(
                f"{name!r} and {other_name!r} share one weight but differ in {settings}: one compressed table "
                "cannot replace both; give them the same settings first"
            )
    return others
