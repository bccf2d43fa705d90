"""A linear layer that stores only its kept weights: the compact form of a pruned layer.

:class:`~compressed_transformer.layers.PrunedLinear` keeps a dense weight and a ``bool`` mask, so that the mask can
change during pruning; in memory it holds more than ``nn.Linear`` (the weight, the mask and, for speed, the mask in
the weight's dtype), and its optimiser state is dense too. Once the mask is fixed, :class:`SparseLinear` holds the
kept weights alone, as a ``(nnz,)`` parameter at fixed CSR positions: parameters, gradients and optimiser state
shrink with the sparsity, and a training pass no longer reads or writes anything weight-sized.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.sparsity import magnitude_mask, magnitude_threshold
from ._common import check_features, check_linear, reset_bias
from ._fast import (
    _csr,
    crow_of,
    csr_index_dtype,
    csr_linear,
    csr_transpose,
    device_key,
    layer_cache,
    mask_cache,
    prepare_forward,
    represented_weight,
    sparse_is_faster,
    sparse_supported,
    tensor_attr,
    tokens_of,
    values_csr_linear,
    values_train_is_faster,
)
from .pruned import PrunedLinear

__all__ = ["SparseLinear"]


class SparseLinear(nn.Module):
    """A linear layer whose weight is stored as its kept entries: ``y = x W^T + b`` with ``W`` the sparse
    ``(out_features, in_features)`` matrix of ``values`` at the positions ``crow_indices`` / ``col_indices``
    (CSR, row-major).

    ``values`` is the only weight parameter; the positions are ``int32`` buffers of the ``state_dict`` (``int64``
    for matrices of ``2**31`` entries or more) and never change. Build one from a pruned layer
    (:meth:`from_pruned`), by magnitude from an ``nn.Linear`` (:meth:`from_linear`), or load a ``state_dict`` into
    ``SparseLinear(in_features, out_features)``: loading takes the stored positions and number of entries
    (replacing ``values`` by a new parameter when the number differs, so build optimisers after loading).

    Forward: CSR kernels where the cost model predicts them faster than one dense GEMM, with autograd too
    (:func:`~compressed_transformer.layers._fast.values_csr_linear`: the gradient of ``values`` is the product
    sampled at the stored positions); otherwise the dense weight is built from ``values`` (a scatter) and
    multiplied, and in eval mode without autograd that dense weight is cached until ``values`` change.
    :meth:`forward_path` says which. Under ``torch.compile``, and for dtypes or devices without CSR kernels, the
    dense path runs.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias.
        nnz: number of stored weights (default: all ``in_features * out_features``), at random positions until
            a ``state_dict`` is loaded.
        device: parameter device.
        dtype: parameter dtype.

    Shape:
        input ``(..., in_features)``, output ``(..., out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        nnz: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_features(in_features, out_features)
        weights = in_features * out_features
        nnz = weights if nnz is None else nnz
        if not isinstance(nnz, int) or not 0 <= nnz <= weights:
            raise ValueError(f"nnz must be an int in [0, {weights}] for {in_features}->{out_features}, got {nnz!r}")
        self.in_features, self.out_features = in_features, out_features
        if nnz in (0, weights):
            flat = torch.arange(nnz, device=device)
        else:
            flat = torch.randperm(weights, device=device)[:nnz].sort().values
        crow, col = _crow_col(flat, out_features, in_features)
        self.register_buffer("crow_indices", crow)
        self.register_buffer("col_indices", col)
        self.values = nn.Parameter(torch.empty(nnz, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default initialisation of the stored weights and the bias."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) of nn.Linear
        nn.init.uniform_(self.values, -bound, bound)
        reset_bias(self.bias, self.in_features)

    @classmethod
    def from_pruned(cls, layer: PrunedLinear) -> SparseLinear:
        """The same layer (same outputs and gradients of the kept weights) storing the kept weights only."""
        if not isinstance(layer, PrunedLinear):
            raise TypeError(f"SparseLinear.from_pruned expects a PrunedLinear, got {type(layer).__name__}")
        return cls._from_masked(layer.weight.detach(), layer.mask, layer.bias)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, sparsity: float | None = None, threshold: float | None = None
    ) -> SparseLinear:
        """Prune ``linear``'s weight by magnitude, as :meth:`PrunedLinear.from_linear` (same arguments), and keep
        the remaining weights only (``linear`` is not modified)."""
        check_linear(linear, cls.__name__)
        if (sparsity is None) == (threshold is None):
            raise ValueError("SparseLinear.from_linear needs exactly one of sparsity= or threshold=")
        weight = linear.weight.detach()
        if threshold is None:
            threshold = magnitude_threshold(weight, sparsity)
        return cls._from_masked(weight, magnitude_mask(weight, threshold), linear.bias)

    @classmethod
    def _from_masked(cls, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None) -> SparseLinear:
        out_features, in_features = weight.shape
        flat = mask.reshape(-1).nonzero().squeeze(1)
        layer = cls(in_features, out_features, bias is not None, nnz=0, device=weight.device, dtype=weight.dtype)
        layer._set_positions(flat)
        with torch.no_grad():
            layer.values = nn.Parameter(weight.reshape(-1).index_select(0, flat))
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    def _set_positions(self, flat: torch.Tensor) -> None:
        crow, col = _crow_col(flat, self.out_features, self.in_features)
        self.crow_indices, self.col_indices = crow, col

    def to_pruned(self) -> PrunedLinear:
        """The equivalent :class:`PrunedLinear` (dense weight and mask), e.g. to prune it further."""
        with torch.no_grad():
            layer = PrunedLinear(
                self.in_features,
                self.out_features,
                self.bias is not None,
                device=self.values.device,
                dtype=self.values.dtype,
            )
            layer.set_mask_(self.mask)
            layer.weight.copy_(self.to_dense())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    @property
    def nnz(self) -> int:
        """Number of stored weights."""
        return self.values.numel()

    @property
    def sparsity(self) -> float:
        """Fraction of the ``in_features * out_features`` weights not stored (zero)."""
        return 1.0 - self.nnz / (self.in_features * self.out_features)

    @property
    def mask(self) -> torch.Tensor:
        """The stored positions as a dense ``bool`` ``(out_features, in_features)`` mask (computed)."""
        mask = torch.zeros(self.out_features * self.in_features, dtype=torch.bool, device=self.values.device)
        mask[self._flat()] = True
        return mask.view(self.out_features, self.in_features)

    def _derived(self, name: str, build) -> dict[str, torch.Tensor]:
        """Index arrays derived from the stored positions, cached while they are unchanged (built lazily, part by
        part, so that inference holds none of the transpose's)."""
        crow, col = tensor_attr(self, "crow_indices"), tensor_attr(self, "col_indices")
        if torch.compiler.is_compiling():  # traced into the graph (the cache compares data pointers)
            return build(crow, col, self.out_features, self.in_features)
        return mask_cache(self).get(name, [crow, col], lambda: build(crow, col, self.out_features, self.in_features))

    def _flat(self) -> torch.Tensor:
        coords = self._derived("coords", _coords)
        return coords["rows"] * self.in_features + coords["cols"]

    def _pattern(self, tokens: int) -> dict[str, torch.Tensor]:
        """What :func:`values_csr_linear` needs (the coordinates only for one token, where they serve)."""
        crow, col = tensor_attr(self, "crow_indices"), tensor_attr(self, "col_indices")
        pattern = {"crow": crow, "col": col, **self._derived("transpose", _transpose)}
        return {**pattern, **self._derived("coords", _coords)} if tokens == 1 else pattern

    def to_dense(self) -> torch.Tensor:
        """The represented weight, ``(out_features, in_features)``, zeros where nothing is stored (differentiable
        in ``values``)."""
        values = tensor_attr(self, "values")
        dense = values.new_zeros(self.out_features * self.in_features)
        return dense.index_put((self._flat(),), values).view(self.out_features, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """The represented dense weight (computed; in eval mode without autograd, the cached copy the forward
        uses), so code reading ``.weight`` keeps working."""
        return represented_weight(self, [self.values, self.crow_indices, self.col_indices], self.to_dense)

    def num_stored_params(self) -> int:
        """Stored weights and bias (the positions are index buffers, as in any sparse format)."""
        return self.nnz + (self.out_features if self.bias is not None else 0)

    def use_sparse(self, tokens: int, *, train: bool = False) -> bool:
        """Whether the forward multiplies with CSR kernels for ``tokens`` input vectors (``train``: with autograd)."""
        return self._use_sparse(tokens, train, tensor_attr(self, "values"))

    def _use_sparse(self, tokens: int, train: bool, values: torch.Tensor) -> bool:
        if torch.compiler.is_compiling() or not sparse_supported(values) or tokens == 0:  # see PrunedLinear
            return False
        decide = values_train_is_faster if train else sparse_is_faster
        return decide(device_key(values), tokens, self.in_features, self.out_features, values.numel())

    def forward_path(self, tokens: int, *, train: bool = False) -> str:
        """``"csr"`` or ``"dense"``: the kernels a forward (``train``: with autograd) uses for ``tokens`` vectors."""
        return "csr" if self.use_sparse(tokens, train=train) else "dense"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, bias = tensor_attr(self, "values"), tensor_attr(self, "bias")
        tokens = tokens_of(x, self.in_features)
        shape = (self.out_features, self.in_features)
        if not prepare_forward(self, [values, bias]):
            if self._use_sparse(tokens, True, values):
                return values_csr_linear(x, values, bias, self._pattern(tokens), shape)
            return F.linear(x, self.to_dense(), bias)
        tensors = [values, tensor_attr(self, "crow_indices"), tensor_attr(self, "col_indices")]
        if self._use_sparse(tokens, False, values):
            build = lambda: _View(_csr(tensors[1], tensors[2], values, shape))  # noqa: E731
            return csr_linear(x, layer_cache(self).get("csr", tensors, build).tensor, bias)
        return F.linear(x, layer_cache(self).get("dense", tensors, self.to_dense), bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, *a):
        crow, col, values = (state_dict.get(prefix + name) for name in ("crow_indices", "col_indices", "values"))
        if crow is not None and col is not None and values is not None:
            _check_structure(crow, col, values, self.out_features, self.in_features, prefix)
            if values.shape != self.values.shape:  # another number of stored weights: take the loaded structure
                self.values = nn.Parameter(self.values.new_empty(values.shape), self.values.requires_grad)
                self.col_indices = self.col_indices.new_empty(col.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, *a)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"nnz={self.nnz}, sparsity={self.sparsity:.4f}"
        )


class _View:
    """A cached CSR matrix over the parameter's own storage: kept (building one costs a few microseconds, 10 % of a
    one-token product) but not counted as cached bytes, since it holds no memory of its own."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _crow_col(flat: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR ``crow`` / ``col`` of the sorted flat positions ``flat`` of a ``(rows, cols)`` matrix (32-bit whenever
    every position fits, so that the buffers' dtype depends on the shape alone)."""
    index = csr_index_dtype(rows * cols)
    if flat.is_meta:  # no data to count: a layer built on "meta", to be materialised (to_empty) and loaded
        return flat.new_empty(rows + 1, dtype=index), flat.new_empty(flat.shape, dtype=index)
    return crow_of(flat // cols, rows).to(index), (flat % cols).to(index)


def _rows_of(crow: torch.Tensor, nnz: int) -> torch.Tensor:
    rows = torch.arange(crow.numel() - 1, device=crow.device)
    return torch.repeat_interleave(rows, crow.long().diff(), output_size=nnz)


def _coords(crow: torch.Tensor, col: torch.Tensor, rows: int, cols: int) -> dict[str, torch.Tensor]:
    """Row and column of every stored entry (``int64``: the fastest gather indices)."""
    return {"rows": _rows_of(crow, col.numel()), "cols": col.long()}


def _transpose(crow: torch.Tensor, col: torch.Tensor, rows: int, cols: int) -> dict[str, torch.Tensor]:
    """CSR of the transposed matrix: ``crow_t`` / ``col_t``, and ``perm`` (its values are ``values[perm]``)."""
    return csr_transpose(_rows_of(crow, col.numel()), col.long(), rows, cols, col.dtype)


def _check_structure(crow, col, values, rows: int, cols: int, prefix: str) -> None:
    """A loaded CSR structure must describe a ``(rows, cols)`` matrix with one value per position, in row-major
    order and without repeats."""
    where = f"SparseLinear {prefix or '<root>'}"
    if crow.dim() != 1 or crow.numel() != rows + 1:
        raise ValueError(f"{where}: crow_indices must have {rows + 1} entries, got shape {tuple(crow.shape)}")
    if col.dim() != 1 or values.dim() != 1 or col.numel() != values.numel():
        raise ValueError(
            f"{where}: col_indices and values must be 1-D of the same length, got {tuple(col.shape)} and "
            f"{tuple(values.shape)}"
        )
    if crow.dtype not in (torch.int32, torch.int64) or col.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{where}: crow_indices and col_indices must be int32 or int64")
    crow, col = crow.long(), col.long()
    if int(crow[0]) != 0 or int(crow[-1]) != col.numel() or bool((crow.diff() < 0).any()):
        raise ValueError(f"{where}: crow_indices must rise from 0 to the number of values ({col.numel()})")
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= cols):
        raise ValueError(f"{where}: col_indices must lie in [0, {cols})")
    flat = _rows_of(crow, col.numel()) * cols + col
    if col.numel() > 1 and not bool((flat.diff() > 0).all()):
        raise ValueError(f"{where}: positions must be sorted within each row and appear once")
