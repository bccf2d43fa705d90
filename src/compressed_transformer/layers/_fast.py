"""Forward-path machinery shared by the compressed layers: the eval-mode cache, the path decision, CSR products.

**Eval-mode cache.** In eval mode, when no gradient is needed, a layer keeps what it derives from its parameters
(the rebuilt dense weight, the merged factor matrices of its contraction plan, a CSR copy of a sparse weight) in an
:class:`EvalCache` instead of rebuilding it on every call. Each entry is keyed by the identity, data pointer,
dtype, device, shape and ``_version`` counter of every tensor it was derived from: an optimiser step,
``load_state_dict``, ``.to()`` or any in-place change made through the parameter itself (``p.copy_``, ``p.add_``,
``p.mul_``...) bumps ``_version`` or replaces the tensor, so the next forward rebuilds the entry. Changes made
through ``p.data`` bypass the version counter, and so do the steps of PyTorch's fused optimisers
(``fused=True``): call :func:`clear_caches` after those when a no-grad eval forward ran before them (any forward
that needs gradients drops the cache anyway). Entering training mode, or
running any forward that needs gradients, drops the cache to free its memory; under ``torch.compile`` the cache
is not used (the compiled graph rebuilds what it needs). :func:`cache_nbytes` reports the memory held.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..functional.costs import CostModel, cost_model_for, costs_version

__all__ = ["EvalCache", "cache_nbytes", "clear_caches", "csr_linear", "grad_needed", "resolve_mode", "use_cache"]


def _key(tensors: Iterable[torch.Tensor]) -> tuple:
    # A new tensor (``.to()``, ``load_state_dict(assign=True)``, re-registration) has a new id or data pointer; an
    # in-place change bumps ``_version``.
    return tuple([(id(t), t._version, t.data_ptr()) for t in tensors])


def params_of(module: nn.Module, name: str) -> list[torch.Tensor]:
    """The parameters of the ``ParameterList`` ``module.<name>`` in order (iterating the container itself costs
    ~2 µs per parameter, which matters at one token)."""
    return list(module._modules[name]._parameters.values())


def tensor_attr(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module.<name>`` for a parameter or buffer: read from ``_parameters`` / ``_buffers`` when it is a plain one
    (``nn.Module.__getattr__`` costs ~0.4 µs a read, a few % of a one-token forward), else through ``getattr``
    (``torch.nn.utils.parametrize`` and ``torch.nn.utils.prune`` move it out of ``_parameters``)."""
    params = module._parameters
    if name in params:
        return params[name]
    buffers = module._buffers
    if name in buffers:
        return buffers[name]
    return getattr(module, name)


def tokens_of(x: torch.Tensor, in_features: int) -> int:
    """Number of input vectors in ``x`` ``(..., in_features)`` (symbolic under ``torch.compile`` with dynamic
    shapes; see :func:`pick`).

    Raises:
        ValueError: if the last dimension of ``x`` is not ``in_features`` (as ``nn.Linear`` refuses it, also where
            a sparse or factorised kernel would reshape the input without looking).
    """
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"expected an input of shape (..., {in_features}), got {tuple(x.shape)}")
    return x.numel() // in_features


def memo(module: nn.Module) -> dict:
    """A per-module dict of path decisions (keyed by tokens, mode and device), for forwards with little overhead."""
    table = module.__dict__.get("_path_memo")
    if table is None:
        table = module.__dict__["_path_memo"] = {}
    return table


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        if value.layout == torch.sparse_csr:
            parts = (value.values(), value.crow_indices(), value.col_indices())
            return sum(p.numel() * p.element_size() for p in parts)
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


class EvalCache:
    """Values derived from parameters, reused while those parameters are unchanged (see the module docstring)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, Any]] = {}

    def get(self, name: str, tensors: Iterable[torch.Tensor], build: Callable[[], Any], extra: tuple = ()) -> Any:
        """The entry ``name`` if it was built from the current ``tensors`` (and the same ``extra`` key), else
        ``build()`` run without autograd, stored and returned. Entries are ordinary tensors even when built under
        ``torch.inference_mode()`` (an inference tensor could not be used by a later training forward), and in the
        parameters' dtype even when built under ``torch.autocast`` (a forward outside autocast gets them too; under
        autocast the products cast them, as they cast ``nn.Linear``'s weight)."""
        tensors = list(tensors)
        key = (_key(tensors), extra)
        hit = self._entries.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        self._entries.pop(name, None)  # free the stale value before building the new one
        with torch.inference_mode(False), torch.no_grad(), contextlib.ExitStack() as stack:
            for device_type in {t.device.type for t in tensors}:
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            value = build()
        self._entries[name] = (key, value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        return sum(_nbytes(value) for _, value in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __deepcopy__(self, memo_: dict) -> EvalCache:
        return EvalCache()  # a copied module has new parameters; never share or copy derived tensors

    def __getstate__(self) -> dict:
        return {"_entries": {}}


def grad_needed(params: Iterable[torch.Tensor | None]) -> bool:
    """Whether a forward now will differentiate these parameters: autograd is on and one of them requires grad.

    (An input that requires grad alone does not count: derived weights can then be cached and reused.)
    """
    return torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)


def resolve_mode(module: nn.Module, params: list, train: bool | None, cached: bool | None) -> tuple[bool, bool]:
    """``(train, cached)`` with ``None`` meaning "as a forward would run now" (see :func:`grad_needed`,
    :func:`use_cache`)."""
    train = grad_needed(params) if train is None else train
    cached = use_cache(module, train) if cached is None else cached
    return train, cached


def use_cache(module: nn.Module, train: bool) -> bool:
    """Whether ``module`` may serve derived tensors from its :class:`EvalCache` in this forward."""
    return not module.training and not train and not torch.compiler.is_compiling() and not func_transforming()


def func_transforming() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ``jacrev``, ...) is running: its tensors
    wrap the real ones, so they fit neither the CSR kernels (no strides) nor the eval cache (a cached tensor would
    not depend on the wrapped parameters), and the layers take their dense or factorised paths."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def prepare_forward(module: nn.Module, params: list | None = None, *, train: bool | None = None) -> bool:
    """Start a forward: returns whether the eval cache may be used (and drops the cache if not). ``train``:
    :func:`grad_needed` of the parameters when the caller has it already, else computed from ``params``."""
    if torch.compiler.is_compiling():
        return False
    cached = use_cache(module, grad_needed(params or []) if train is None else train)
    if not cached:
        drop_cache(module)
    return cached


def represented_weight(
    module: nn.Module, tensors: list[torch.Tensor], build: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """The dense weight a layer represents, for code that reads ``.weight`` (a tied projection, or
    ``nn.TransformerEncoderLayer``'s inference fast path, which multiplies with its linear layers' ``.weight``):
    the eval cache's copy (the forward's own) when a forward now could use the cache, so it is rebuilt only when
    ``tensors`` change; ``build()`` otherwise. Treat the cached copy as read-only."""
    if use_cache(module, grad_needed(tensors)):
        return layer_cache(module).get("dense", tensors, build)
    return build()


def layer_cache(module: nn.Module) -> EvalCache:
    """The :class:`EvalCache` of ``module``, created on first use."""
    cache = module.__dict__.get("_eval_cache")
    if cache is None:
        cache = EvalCache()
        module.__dict__["_eval_cache"] = cache
    return cache


def drop_cache(module: nn.Module) -> None:
    cache = module.__dict__.get("_eval_cache")
    if cache is not None and len(cache):
        cache.clear()


def cache_nbytes(model: nn.Module) -> int:
    """Bytes held by the caches of every compressed layer in ``model`` (eval-mode cache and mask patterns)."""
    return sum(
        m.__dict__[name].nbytes()
        for m in model.modules()
        for name in ("_eval_cache", "_mask_cache")
        if name in m.__dict__
    )


def clear_caches(model: nn.Module) -> None:
    """Drop the eval-mode caches of every compressed layer in ``model`` (needed only after changes made through
    ``param.data``, which do not bump version counters)."""
    for m in model.modules():
        drop_cache(m)
        if "_mask_cache" in m.__dict__:
            m.__dict__["_mask_cache"].clear()


DeviceKey = tuple[str, int, int, int]  # see device_key
_threads = [1]  # the intra-op thread count last seen outside torch.compile (which cannot trace the query)


def device_key(param: torch.Tensor) -> DeviceKey:
    """``(device type, element size, threads, cost model version)`` of a computation on ``param``'s device and
    dtype: what the cost model needs, as plain values (so that decisions can be made while ``torch.compile``
    traces); the version (:func:`~compressed_transformer.functional.costs.costs_version`) makes cached decisions
    expire when another cost model is installed."""
    if param.device.type == "cuda":
        return "cuda", param.element_size(), 1, costs_version()
    if not torch.compiler.is_compiling():
        _threads[0] = torch.get_num_threads()
    return param.device.type, param.element_size(), _threads[0], costs_version()


# torch.sparse CSR products run on these dtypes on every backend we use.
CSR_DTYPES = (torch.float32, torch.float64)
CSR_CHUNK = 256  # tokens per CSR product: beyond this the dense operand falls out of cache


def csr_seconds(costs: CostModel, threads: int, nnz: int, tokens: int, out_features: int, element_size: int) -> float:
    """Predicted seconds of :func:`csr_linear` for ``tokens`` vectors."""
    if tokens <= 1:  # addmv: one op, no transposes
        return costs.sparse_seconds(nnz, 1, threads=threads) - 2 * costs.forward.op_s
    blocks = math.ceil(tokens / CSR_CHUNK)
    rows = min(tokens, CSR_CHUNK)
    product = blocks * costs.sparse_seconds(nnz, rows, threads=threads)
    transpose = costs.copy_seconds(tokens * out_features * element_size, train=False, threads=threads)
    return product + transpose


def csr_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` a sparse CSR ``(out, in)`` tensor, as ``(W @ x.T).T`` in blocks of tokens.

    No autograd: the CSR copy is an eval-mode cache of the layer's weight.

    Args:
        x: ``(..., in_features)``.
        weight: CSR ``(out_features, in_features)``.
        bias: ``(out_features,)`` or ``None``.

    Returns:
        ``(..., out_features)``, contiguous.
    """
    out_features, in_features = weight.shape
    lead = x.shape[:-1]
    n = math.prod(lead)
    flat = x.reshape(n, in_features)
    if n == 1:  # one vector: a sparse matrix-vector product, no transposes
        vector = flat[0]
        y = torch.addmv(bias, weight, vector) if bias is not None else torch.mv(weight, vector)
        return y.reshape(*lead, out_features)
    y = flat.new_empty(n, out_features)
    column = bias[:, None] if bias is not None else None
    for s in range(0, n, CSR_CHUNK):
        part = flat[s : s + CSR_CHUNK].t()  # (in, rows)
        # (out, rows)
        product = torch.sparse.addmm(column, weight, part) if column is not None else torch.sparse.mm(weight, part)
        y[s : s + CSR_CHUNK].copy_(product.t())
    return y.reshape(*lead, out_features)


@functools.lru_cache(maxsize=4096)
def _low_rank_is_faster(
    device: DeviceKey,
    tokens: int,
    in_features: int,
    out_features: int,
    rank: int,
    train: bool,
    cached: bool,
) -> bool:
    """Whether ``(x @ right.T) @ left.T`` (two GEMMs through rank ``rank``) beats one GEMM with ``W = left @ right``.

    Args:
        device: :func:`device_key` of the computation.
        tokens: input vectors.
        in_features, out_features, rank: the shapes.
        train: price forward+backward.
        cached: ``W`` comes from the eval cache (no rebuild cost on the dense path).
        (Building ``left`` / ``right``, e.g. Tucker's Kronecker products, costs both paths the same.)
    """
    device_type, element_size, threads, _ = device
    costs = cost_model_for(device_type)
    steps = [(tokens, rank, in_features, 1), (tokens, out_features, rank, 1)]
    factorized = costs.steps_seconds(steps, train=train, threads=threads)
    weights = in_features * out_features
    dense = costs.gemm_seconds(tokens * weights, weight_bytes=weights * element_size, train=train, threads=threads)
    rebuild = 0.0
    if not cached:  # both paths build left / right; the dense path also multiplies them
        rebuild = costs.steps_seconds([(out_features, in_features, rank, 1)], train=train, threads=threads)
    return costs.prefers(factorized, dense, rebuild)


# Under torch.compile a token count may be symbolic (dynamic shapes), so decisions are tabulated per bucket of
# token counts by a function the compiler calls once at trace time, and picked with comparisons it can guard on.
TOKEN_BUCKETS = tuple(1 << k for k in range(25))


def pick(table: tuple, tokens: Any) -> Any:
    """The value of the first ``(bound, value)`` of ``table`` with ``tokens <= bound`` (the last one otherwise)."""
    for bound, value in table[:-1]:
        if tokens <= bound:
            return value
    return table[-1][1]


@torch.compiler.assume_constant_result
def _low_rank_table(device, in_features, out_features, rank, train, cached) -> tuple:
    return tuple(
        [(b, _low_rank_is_faster(device, b, in_features, out_features, rank, train, cached)) for b in TOKEN_BUCKETS]
    )


def low_rank_is_faster(
    device: DeviceKey,
    tokens: int,
    in_features: int,
    out_features: int,
    rank: int,
    train: bool,
    cached: bool,
) -> bool:
    """See :func:`_low_rank_is_faster`; under ``torch.compile``, decided per bucket of token counts."""
    if torch.compiler.is_compiling():
        table = _low_rank_table(device, in_features, out_features, rank, train, cached)
        return pick(table, tokens)
    return _low_rank_is_faster(device, tokens, in_features, out_features, rank, train, cached)


@functools.lru_cache(maxsize=4096)
def sparse_is_faster(device: DeviceKey, tokens: int, in_features: int, out_features: int, nnz: int) -> bool:
    """Whether :func:`csr_linear` with ``nnz`` stored weights is predicted faster than one dense GEMM (eval mode,
    dense weight cached)."""
    device_type, element_size, threads, _ = device
    costs = cost_model_for(device_type)
    weights = in_features * out_features
    dense = costs.gemm_seconds(tokens * weights, weight_bytes=weights * element_size, train=False, threads=threads)
    sparse = csr_seconds(costs, threads, nnz, tokens, out_features, element_size)
    return costs.prefers(sparse, dense)


def sparse_supported(param: torch.Tensor) -> bool:
    """Whether a CSR copy of a weight like ``param`` can be multiplied here: its dtype and device, and no autocast
    on that device (the CSR kernels take no part in autocast; the dense path's ``F.linear`` does)."""
    device = param.device.type
    return (
        param.dtype in CSR_DTYPES
        and device in ("cpu", "cuda")
        and not torch.is_autocast_enabled(device)
        and not torch.compiler.is_compiling()
        and not func_transforming()
    )


def to_csr(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as a sparse CSR tensor (32-bit indices where they fit), without the beta-API warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        csr = weight.to_sparse_csr()
        if csr_index_dtype(csr.values().numel()) == torch.int32:
            csr = torch.sparse_csr_tensor(
                csr.crow_indices().int(), csr.col_indices().int(), csr.values(), csr.shape, check_invariants=False
            )
        return csr


def mask_cache(module: nn.Module) -> EvalCache:
    """A second :class:`EvalCache` for what depends only on a mask buffer (kept in training mode too)."""
    cache = module.__dict__.get("_mask_cache")
    if cache is None:
        cache = EvalCache()
        module.__dict__["_mask_cache"] = cache
    return cache


def csr_pattern(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The CSR index arrays of a ``bool`` mask ``(out, in)`` and of its transpose.

    Returns:
        ``flat`` (positions of the kept entries in the flattened weight, row-major), ``crow`` / ``col`` (CSR of the
        mask), ``crow_t`` / ``col_t`` / ``perm`` (CSR of the transposed mask; ``values[perm]`` are its values).
    """
    rows, cols = mask.shape
    flat = mask.reshape(-1).nonzero().squeeze(1)  # row-major: CSR order
    row, col = flat // cols, flat % cols
    index = csr_index_dtype(flat.numel())
    return {
        "flat": flat,
        "crow": crow_of(row, rows).to(index),
        "col": col.to(index),
        **csr_transpose(row, col, rows, cols, index),
    }


def csr_index_dtype(largest: int) -> torch.dtype:
    """``int32`` for CSR indices up to ``largest`` where they fit (less to stream, ~30 % faster products), else
    ``int64``."""
    return torch.int32 if largest < 2**31 - 1 else torch.int64


def crow_of(row: torch.Tensor, rows: int) -> torch.Tensor:
    """CSR row pointers (``int64``, ``rows + 1``) of entries whose rows, in row-major order, are ``row``."""
    crow = torch.zeros(rows + 1, dtype=torch.int64, device=row.device)
    crow[1:] = torch.cumsum(torch.bincount(row, minlength=rows), 0)
    return crow


def csr_transpose(
    row: torch.Tensor, col: torch.Tensor, rows: int, cols: int, index: torch.dtype
) -> dict[str, torch.Tensor]:
    """CSR of the transpose of the ``(rows, cols)`` matrix with entries at ``row`` / ``col`` (``int64``, row-major):
    ``crow_t`` / ``col_t`` (of dtype ``index``) and ``perm``, with which the transpose's values are
    ``values[perm]``."""
    perm = torch.argsort(col * rows + row, stable=True)
    return {"crow_t": crow_of(col, cols).to(index), "col_t": row[perm].to(index), "perm": perm}


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


# For at most this many tokens, and at least this density, the weight gradient of a masked CSR product is the
# dense outer product times the mask: there ``torch.sparse.sampled_addmm`` plus the scatter into a zero tensor cost
# more (2x at 1 token, 4x at 4 tokens at 512x2048 and 10 % density, one thread). From 16 tokens up, or at 2 %
# density, the sampled product is as fast or faster.
DENSE_GRAD_TOKENS = 8
DENSE_GRAD_MIN_DENSITY = 0.05


def _csr_input_grad(
    grad: torch.Tensor, values: torch.Tensor, pattern: dict[str, torch.Tensor], shape: tuple[int, int]
) -> torch.Tensor:
    """``grad @ W`` ``(tokens, in)`` for ``W`` ``(out, in)`` the CSR matrix of ``values`` at ``pattern``'s positions:
    the product with its transpose (``pattern``'s ``crow_t`` / ``col_t`` / ``perm``)."""
    out_features, in_features = shape
    values_t = values.index_select(0, pattern["perm"])
    return csr_linear(grad, _csr(pattern["crow_t"], pattern["col_t"], values_t, (in_features, out_features)), None)


def _sampled_grad(
    grad: torch.Tensor,
    flat_x: torch.Tensor,
    values: torch.Tensor,
    pattern: dict[str, torch.Tensor],
    shape: tuple[int, int],
) -> torch.Tensor:
    """``grad^T x`` ``(out, in)`` at ``pattern``'s positions only, in CSR order (``torch.sparse.sampled_addmm``)."""
    empty = _csr(pattern["crow"], pattern["col"], torch.zeros_like(values), shape)
    return torch.sparse.sampled_addmm(empty, grad.t(), flat_x, beta=0.0).values()


class _MaskedCSRLinear(torch.autograd.Function):
    """``y = x (mask * W)^T + b`` with CSR kernels: the forward and the input gradient multiply with the kept
    weights only, and the weight gradient is computed at the kept positions only (``torch.sparse.sampled_addmm``)
    and scattered into a dense zero tensor, so pruned entries get exactly zero gradient as in the dense path. For
    a few tokens at moderate sparsity (:data:`DENSE_GRAD_TOKENS`, :data:`DENSE_GRAD_MIN_DENSITY`) the weight
    gradient is ``(grad^T x) * mask`` instead (the same values)."""

    @staticmethod
    def forward(ctx, x, weight, bias, pattern, dense_mask):
        out_features, in_features = weight.shape
        values = weight.reshape(-1).index_select(0, pattern["flat"])
        matrix = _csr(pattern["crow"], pattern["col"], values, (out_features, in_features))
        ctx.save_for_backward(x, values)
        ctx.pattern, ctx.shape, ctx.dense_mask = pattern, (out_features, in_features), dense_mask
        return csr_linear(x, matrix, bias)

    @staticmethod
    def backward(ctx, grad):
        x, values = ctx.saved_tensors
        pattern, (out_features, in_features) = ctx.pattern, ctx.shape
        grad = grad.reshape(-1, out_features)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _csr_input_grad(grad, values, pattern, ctx.shape).reshape(x.shape)
        weights = out_features * in_features
        small = grad.shape[0] <= DENSE_GRAD_TOKENS and values.numel() >= DENSE_GRAD_MIN_DENSITY * weights
        if ctx.needs_input_grad[1] and small:
            grad_w = (grad.t() @ x.reshape(-1, in_features)).mul_(ctx.dense_mask())
        elif ctx.needs_input_grad[1]:
            sampled = _sampled_grad(grad, x.reshape(-1, in_features), values, pattern, ctx.shape)
            grad_w = values.new_zeros(weights).scatter_(0, pattern["flat"], sampled)  # faster than index_copy_
            grad_w = grad_w.view(out_features, in_features)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b, None, None


def masked_csr_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pattern: dict[str, torch.Tensor],
    dense_mask: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """``x @ (mask * weight).T + bias`` through CSR kernels, differentiable (see :class:`_MaskedCSRLinear`).

    Args:
        x: ``(..., in_features)``.
        weight: dense ``(out_features, in_features)``; entries outside the mask are ignored.
        bias: ``(out_features,)`` or ``None``.
        pattern: :func:`csr_pattern` of the mask.
        dense_mask: returns the mask as a dense tensor of ``weight``'s dtype (called by the backward of small
            batches only).
    """
    return _MaskedCSRLinear.apply(x, weight, bias, pattern, dense_mask)


@functools.lru_cache(maxsize=4096)
def sparse_train_is_faster(device: DeviceKey, tokens: int, in_features: int, out_features: int, nnz: int) -> bool:
    """Whether :func:`masked_csr_linear` forward+backward is predicted faster than the dense masked product's."""
    device_type, element_size, threads, _ = device
    costs = cost_model_for(device_type)
    dense = masked_dense_train_seconds(costs, threads, tokens, in_features, out_features, element_size)
    sparse = masked_csr_train_seconds(costs, threads, nnz, tokens, in_features, out_features, element_size)
    return costs.prefers(sparse, dense)


def masked_dense_train_seconds(
    costs: CostModel, threads: int, tokens: int, in_features: int, out_features: int, element_size: int
) -> float:
    """Predicted seconds of ``F.linear(x, weight * mask, bias)`` forward and backward."""
    weights = in_features * out_features
    wbytes = weights * element_size
    gemm = costs.gemm_seconds(tokens * weights, weight_bytes=wbytes, train=True, threads=threads)
    return gemm + costs.copy_seconds(wbytes, train=True, threads=threads)  # the mask product and its backward


def masked_csr_train_seconds(
    costs: CostModel, threads: int, nnz: int, tokens: int, in_features: int, out_features: int, element_size: int
) -> float:
    """Predicted seconds of :func:`masked_csr_linear` forward and backward: two CSR products (forward, input
    gradient) and the weight gradient, a third (sampled) one and a zero-filled weight, or for a few tokens at
    moderate sparsity (:data:`DENSE_GRAD_TOKENS`, :data:`DENSE_GRAD_MIN_DENSITY`) a dense outer product times the
    mask."""
    weights = in_features * out_features
    wbytes = weights * element_size
    product = csr_seconds(costs, threads, nnz, tokens, max(in_features, out_features), element_size)
    if tokens <= DENSE_GRAD_TOKENS and nnz >= DENSE_GRAD_MIN_DENSITY * weights:
        weight_grad = costs.gemm_seconds(tokens * weights, train=False, threads=threads)
    else:
        weight_grad = product
    return 2 * product + weight_grad + costs.copy_seconds(wbytes, train=False, threads=threads)


class _ValuesCSRLinear(torch.autograd.Function):
    """``y = x W^T + b`` with ``W`` the CSR matrix of ``values`` at the fixed positions of ``pattern``: the forward
    and the input gradient are CSR products, and the gradient of ``values`` is the product sampled at those
    positions (``g[row] * x[col]`` for one token, ``torch.sparse.sampled_addmm`` for more); nothing weight-sized is
    read or written (compare :class:`_MaskedCSRLinear`, whose parameter is a dense weight)."""

    @staticmethod
    def forward(ctx, x, values, bias, pattern, shape):
        ctx.save_for_backward(x, values)
        ctx.pattern, ctx.shape = pattern, shape
        return csr_linear(x, _csr(pattern["crow"], pattern["col"], values, shape), bias)

    @staticmethod
    def backward(ctx, grad):
        x, values = ctx.saved_tensors
        pattern, (out_features, in_features) = ctx.pattern, ctx.shape
        grad = grad.reshape(-1, out_features).to(values.dtype)
        flat_x = x.reshape(-1, in_features)
        grad_x = grad_values = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _csr_input_grad(grad, values, pattern, ctx.shape).reshape(x.shape)
        if ctx.needs_input_grad[1] and grad.shape[0] == 1 and "rows" in pattern:
            grad_values = grad[0].index_select(0, pattern["rows"]) * flat_x[0].index_select(0, pattern["cols"])
        elif ctx.needs_input_grad[1]:
            grad_values = _sampled_grad(grad, flat_x, values, pattern, ctx.shape)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_values, grad_b, None, None


def values_csr_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    pattern: dict[str, torch.Tensor],
    shape: tuple[int, int],
) -> torch.Tensor:
    """``x @ W.T + bias`` for ``W`` ``(out, in)`` given by its stored ``values`` (in CSR order) at the positions of
    ``pattern``, differentiable in ``x``, ``values`` and ``bias`` (see :class:`_ValuesCSRLinear`).

    ``pattern`` holds ``crow`` / ``col`` (the CSR positions), ``crow_t`` / ``col_t`` / ``perm`` (the transpose's,
    as :func:`csr_pattern` gives them) and, optionally, ``rows`` / ``cols``: the 64-bit row and column of every
    entry, with which the gradient of the values for one token is two gathers instead of a sampled product."""
    return _ValuesCSRLinear.apply(x, values, bias, pattern, shape)


@functools.lru_cache(maxsize=4096)
def values_train_is_faster(device: DeviceKey, tokens: int, in_features: int, out_features: int, nnz: int) -> bool:
    """Whether :func:`values_csr_linear` forward+backward is predicted faster than building the dense weight from
    the values (a weight-sized scatter, and its gather in the backward) and one GEMM."""
    device_type, element_size, threads, _ = device
    costs = cost_model_for(device_type)
    dense = masked_dense_train_seconds(costs, threads, tokens, in_features, out_features, element_size)
    product = csr_seconds(costs, threads, nnz, tokens, max(in_features, out_features), element_size)
    return costs.prefers(3 * product, dense)
