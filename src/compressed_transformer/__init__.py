"""compressed-transformer: compress the feed-forward blocks of Transformers, and any PyTorch ``nn.Linear`` or
``nn.Embedding``, with tensor-train, Tucker, truncated SVD, magnitude pruning and Sparse Variational Dropout.

The library in one import::

    from compressed_transformer import compress_, save_compressed, compression_ratio

Subpackages: :mod:`~compressed_transformer.layers` (the layers), :mod:`~compressed_transformer.functional` (the
pure maths), :mod:`~compressed_transformer.models`, :mod:`~compressed_transformer.train`,
:mod:`~compressed_transformer.evaluate`, :mod:`~compressed_transformer.data` and
:mod:`~compressed_transformer.studies` (the seed's tables); ``compressed-transformer --help`` for the commands.
"""

from importlib.metadata import PackageNotFoundError, version

from .compress import compress_, compress_embeddings_, pruned_to_sparse_, sparse_vd_to_pruned_
from .layers import (
    METHODS,
    LowRankEmbedding,
    LowRankLinear,
    PrunedLinear,
    SparseLinear,
    SparseVDLinear,
    TTEmbedding,
    TTLinear,
    TuckerLinear,
    model_kl,
)
from .serialization import load_compressed_, save_compressed
from .size import compression_ratio, dense_params, stored_bytes, stored_params

try:
    __version__ = version("compressed-transformer")
except PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "METHODS",
    "LowRankEmbedding",
    "LowRankLinear",
    "PrunedLinear",
    "SparseLinear",
    "SparseVDLinear",
    "TTEmbedding",
    "TTLinear",
    "TuckerLinear",
    "__version__",
    "compress_",
    "compress_embeddings_",
    "compression_ratio",
    "dense_params",
    "load_compressed_",
    "model_kl",
    "pruned_to_sparse_",
    "save_compressed",
    "sparse_vd_to_pruned_",
    "stored_bytes",
    "stored_params",
]
