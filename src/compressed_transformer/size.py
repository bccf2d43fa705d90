"""Size accounting: parameters and bytes a model stores, and compression ratios.

Conventions (documented in the README):

* **parameters** (the seed's measure): dense tensors count ``numel``; factorised layers (TT, Tucker, SVD) count the
  numels of their factors; pruned (``PrunedLinear``, ``SparseLinear``) and Sparse VD layers count their kept
  weights (Sparse VD: those kept at eval, ``log sigma^2`` is a training-only parameter); biases always count in
  full. Buffers are not counted.
* **bytes**: parameters times the element size, plus, for sparse layers, the index cost of a CSR layout:
  one column index per nonzero and ``out_features + 1`` row pointers, int32 when every index fits, else int64
  (for a ``SparseLinear``, the dtype of its index buffers: int64 for layers of ``2**31`` weights or more).
* **compression ratio** = dense size / compressed size, where the dense size counts every compressed layer as
  the ``nn.Linear`` it replaces (``in * out`` weights plus ``out`` biases), and a compressed (low-rank or TT)
  embedding as the full table. A tied output projection that shares a compressed table's factors or cores adds
  only its bias, as the tied dense projection added nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import COMPRESSED_EMBEDDINGS, COMPRESSED_LAYERS, PrunedLinear, SparseLinear, SparseVDLinear
from .layers._fast import csr_index_dtype

__all__ = ["compression_ratio", "dense_bytes", "dense_params", "stored_bytes", "stored_params"]


def _sparse_layer_bytes(module: nn.Module, nnz: int) -> int:
    """Kept weights, bias and CSR indices: those a :class:`SparseLinear` stores (its buffers' dtype), for a pruned or
    Sparse VD layer those of the CSR layout it is saved in (32-bit while every index fits)."""
    if isinstance(module, SparseLinear):
        element, index = module.values.element_size(), module.col_indices.element_size()
    else:
        element = (module.weight if isinstance(module, PrunedLinear) else module.theta).element_size()
        index = csr_index_dtype(max(module.in_features, nnz)).itemsize
    bias = module.out_features * element if module.bias is not None else 0
    return nnz * (element + index) + (module.out_features + 1) * index + bias


def _walk(
    module: nn.Module, leaf_params, leaf_bytes, dense_linear: bool, seen: set[int] | None = None
) -> tuple[int, int]:
    """Sum (params, bytes) over ``module``: compressed layers via the callbacks, everything else by numel.

    A module or parameter reachable by several paths (shared blocks, tied weights) counts once, as in
    ``sum(p.numel() for p in model.parameters())``.
    """
    seen = set() if seen is None else seen
    if id(module) in seen:
        return 0, 0
    seen.add(id(module))
    if isinstance(module, COMPRESSED_LAYERS + COMPRESSED_EMBEDDINGS):
        params = list(module.parameters())
        element = params[0].element_size()
        shared = {id(p) for p in params} & seen
        seen.update(id(p) for p in params)
        if shared:  # factors of a table counted already (a tied output projection): the rest alone counts
            n = sum(p.numel() for p in params if id(p) not in shared)
            return n, n * element
        if dense_linear:
            return _dense_numel(module), _dense_numel(module) * element
        return leaf_params(module), leaf_bytes(module)
    params = nbytes = 0
    for p in module.parameters(recurse=False):
        if id(p) not in seen:
            seen.add(id(p))
            params, nbytes = params + p.numel(), nbytes + p.numel() * p.element_size()
    for child in module.children():
        p, b = _walk(child, leaf_params, leaf_bytes, dense_linear, seen)
        params, nbytes = params + p, nbytes + b
    return params, nbytes


def _dense_numel(module: nn.Module) -> int:
    """Entries of the dense module a compressed one replaces (``nn.Linear`` weight and bias, or the table)."""
    if isinstance(module, COMPRESSED_EMBEDDINGS):
        return module.num_embeddings * module.embedding_dim
    return module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)


def _stored_layer_bytes(module: nn.Module) -> int:
    if isinstance(module, PrunedLinear | SparseLinear | SparseVDLinear):
        bias = module.out_features if module.bias is not None else 0
        return _sparse_layer_bytes(module, module.num_stored_params() - bias)
    element = next(module.parameters()).element_size()
    return module.num_stored_params() * element


def _stored_layer_params(module: nn.Module) -> int:
    return module.num_stored_params()


@torch.no_grad()
def stored_params(module: nn.Module) -> int:
    """Parameters ``module`` stores for inference (see the module docstring for the conventions)."""
    return _walk(module, _stored_layer_params, _stored_layer_bytes, dense_linear=False)[0]


@torch.no_grad()
def stored_bytes(module: nn.Module) -> int:
    """Bytes ``module`` stores for inference, CSR index cost of sparse layers included."""
    return _walk(module, _stored_layer_params, _stored_layer_bytes, dense_linear=False)[1]


@torch.no_grad()
def dense_params(module: nn.Module) -> int:
    """Parameters of ``module`` with every compressed layer counted as the ``nn.Linear`` it replaces."""
    return _walk(module, _stored_layer_params, _stored_layer_bytes, dense_linear=True)[0]


@torch.no_grad()
def dense_bytes(module: nn.Module) -> int:
    """Bytes of ``module`` with every compressed layer counted as the dense ``nn.Linear`` it replaces."""
    return _walk(module, _stored_layer_params, _stored_layer_bytes, dense_linear=True)[1]


def compression_ratio(module: nn.Module, *, by: str = "params") -> float:
    """``dense size / stored size`` of ``module``, by ``"params"`` (the seed's measure) or ``"bytes"``.

    Raises:
        ValueError: for any other ``by``.
    """
    if by == "params":
        dense, stored = dense_params(module), stored_params(module)
    elif by == "bytes":
        dense, stored = dense_bytes(module), stored_bytes(module)
    else:
        raise ValueError(f"by must be 'params' or 'bytes', got {by!r}")
    return 1.0 if dense == 0 else dense / max(stored, 1)  # a module without parameters is not compressed
