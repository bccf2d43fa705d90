"""Drop-in replacements for ``nn.Linear``: TT, Tucker, low-rank (SVD), magnitude-pruned (a dense weight and a mask,
or only the kept weights) and Sparse VD layers; and
for ``nn.Embedding``: low-rank and TT tables (``from_embedding(embedding, ...)``, ``to_dense()``, ``attend(hidden)``
for tied logits, ``num_stored_params()``).

Every layer takes ``(in_features, out_features, bias=True, *, <method options>, device=None, dtype=None)``, maps
``(..., in_features)`` to ``(..., out_features)``, has ``from_linear(linear, *, ...)`` to initialise it from a
trained ``nn.Linear``, ``to_dense()`` for the ``(out_features, in_features)`` weight it represents and
``num_stored_params()`` for what it stores.
"""

from __future__ import annotations

import torch
from torch import nn

from ._fast import cache_nbytes, clear_caches
from .embedding import LowRankEmbedding, TTEmbedding
from .low_rank import LowRankLinear
from .pruned import PrunedLinear
from .sparse import SparseLinear
from .sparse_vd import SparseVDLinear, model_kl
from .tt import TTLinear
from .tucker import TuckerLinear

__all__ = [
    "COMPRESSED_EMBEDDINGS",
    "COMPRESSED_LAYERS",
    "MAGNITUDE_PRUNING",
    "METHODS",
    "LowRankEmbedding",
    "LowRankLinear",
    "PrunedLinear",
    "SparseLinear",
    "SparseVDLinear",
    "TTEmbedding",
    "TTLinear",
    "TuckerLinear",
    "build_linear",
    "cache_nbytes",
    "clear_caches",
    "layer_options",
    "method_of",
    "model_kl",
]

# Method name -> layer class; the names used by ``compress_``, the CLI and the studies.
METHODS: dict[str, type[nn.Module]] = {
    "tt": TTLinear,
    "tucker": TuckerLinear,
    "svd": LowRankLinear,
    "prune": PrunedLinear,
    "sparse": SparseLinear,
    "svd-o": SparseVDLinear,
}
COMPRESSED_LAYERS = tuple(METHODS.values())
# The methods that prune by magnitude (``sparsity=`` / ``threshold=``; ``compress_``'s ``global_sparsity=``): a dense
# weight and its mask, or the kept weights only.
MAGNITUDE_PRUNING = ("prune", "sparse")
# Replacements for ``nn.Embedding`` (``compress_embeddings_``).
COMPRESSED_EMBEDDINGS = (LowRankEmbedding, TTEmbedding)


def method_of(layer: nn.Module) -> str:
    """The method name of a compressed layer (``"tt"``, ...).

    Raises:
        TypeError: if ``layer`` is not one of :data:`COMPRESSED_LAYERS`.
    """
    for name, cls in METHODS.items():
        if type(layer) is cls:
            return name
    raise TypeError(f"{type(layer).__name__} is not a compressed layer of this package")


def layer_options(layer: nn.Module) -> dict:
    """The constructor options that give ``layer``'s structure (``METHODS[method](in, out, bias, **options)``
    builds a layer whose ``state_dict`` fits ``layer``'s): modes and ranks of TT / Tucker, the rank of SVD, the
    threshold of Sparse VD, the number of stored weights of ``sparse`` (whose positions are buffers of the
    ``state_dict``); none for pruning, whose mask is a buffer of the ``state_dict``.

    Raises:
        TypeError: if ``layer`` is not one of :data:`COMPRESSED_LAYERS`.
    """
    method = method_of(layer)
    if method in ("tt", "tucker"):
        return {"in_modes": list(layer.in_modes), "out_modes": list(layer.out_modes), "ranks": list(layer.ranks)}
    if method == "svd":
        return {"rank": layer.rank}
    if method == "svd-o":
        return {"threshold": layer.threshold}
    if method == "sparse":
        return {"nnz": layer.nnz}
    return {}


def build_linear(
    method: str,
    in_features: int,
    out_features: int,
    bias: bool = True,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **options,
) -> nn.Module:
    """A freshly initialised linear layer of the given method (``"dense"`` gives ``nn.Linear``), for training
    compressed models from scratch.

    ``prune`` and ``sparse`` accept ``sparsity=`` and prune their random initialisation by magnitude.

    Raises:
        ValueError: for an unknown method or options the method does not take.
    """
    if method == "dense":
        if options:
            raise ValueError(f"method 'dense' takes no options, got {sorted(options)}")
        return nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {['dense', *METHODS]}")
    sparsity = options.pop("sparsity", None) if method in MAGNITUDE_PRUNING else None
    if method == "sparse" and sparsity:
        if options:
            raise ValueError(f"method 'sparse' with sparsity= takes no other options, got {sorted(options)}")
        dense = nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
        return SparseLinear.from_linear(dense, sparsity=sparsity)
    try:
        layer = METHODS[method](in_features, out_features, bias, device=device, dtype=dtype, **options)
    except TypeError as error:
        raise ValueError(f"invalid options for method {method!r}: {error}") from None
    if sparsity:
        from ..functional.sparsity import magnitude_mask, magnitude_threshold

        layer.set_mask_(magnitude_mask(layer.weight, magnitude_threshold(layer.weight, sparsity)))
    return layer
