"""Compressions the model config cannot describe: low-rank attention projections and embedding tables."""

from __future__ import annotations

from collections.abc import Callable

from ...models.transformer import Transformer
from .rows import Row

# ---------------------------------------------------------------------------------------------------------------
# Compressions the model config cannot describe: attention projections and embeddings (applied by ``prepare``)
# ---------------------------------------------------------------------------------------------------------------


def factorize_embeddings_(model: Transformer, rank: int) -> None:
    """Replace the model's embedding table(s) by :class:`~compressed_transformer.layers.LowRankEmbedding` of
    ``rank``, in place (:meth:`Transformer.compress_embeddings_ <compressed_transformer.models.transformer.
    Transformer.compress_embeddings_>`; a separate output projection becomes a rank-``rank`` ``LowRankLinear``)."""
    model.compress_embeddings_("svd", rank=rank)


def row_prepare(row: Row) -> Callable[[Transformer], None] | None:
    """The in-place change the trainer applies to ``row``'s built model (``None`` for FFN-only rows)."""
    if row.attention is None and not row.embed_rank and row.embed_tt is None:
        return None

    def prepare(model: Transformer) -> None:
        if row.attention is not None:
            model.compress_attention_(row.attention.method, **dict(row.attention.options))
        if row.embed_rank:
            factorize_embeddings_(model, row.embed_rank)
        if row.embed_tt is not None:
            model.compress_embeddings_("tt", **dict(row.embed_tt))

    return prepare
