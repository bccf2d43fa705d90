"""Compressions the model config cannot describe: low-rank attention projections and embedding tables."""

from __future__ import annotations

from collections.abc import Callable

from ...compress import compress_, compress_embeddings_
from ...models.transformer import Transformer
from .rows import ATTENTION_PROJECTIONS, Row

# ---------------------------------------------------------------------------------------------------------------
# Compressions the model config cannot describe: attention projections and embeddings (applied by ``prepare``)
# ---------------------------------------------------------------------------------------------------------------


def factorize_embeddings_(model: Transformer, rank: int) -> None:
    """Replace the model's embedding table(s) by :class:`~compressed_transformer.layers.LowRankEmbedding` of
    ``rank``, in place (:func:`~compressed_transformer.compress.compress_embeddings_`).

    A shared source/target table stays shared (one module); a separate output projection (``tie_output=False``)
    becomes a rank-``rank`` ``LowRankLinear`` through ``compress_``.
    """
    compress_embeddings_(model, rank=rank, filter=r"^(src|tgt)_embed$")
    if model.output is not None:
        compress_(model, "svd", filter=r"^output$", rank=rank)


def tt_embeddings_(model: Transformer, **options) -> None:
    """Replace the model's embedding table(s) by :class:`~compressed_transformer.layers.TTEmbedding` with
    ``options`` (a tied output projection shares its cores), in place; a separate output projection
    (``tie_output=False``) becomes a ``TTLinear`` through ``compress_``."""
    compress_embeddings_(model, "tt", filter=r"^(src|tgt)_embed$", **options)
    if model.output is not None:
        tt_options = {k: v for k, v in options.items() if k in ("ranks", "eps")}
        compress_(model, "tt", filter=r"^output$", **tt_options)


def row_prepare(row: Row) -> Callable[[Transformer], None] | None:
    """The in-place change the trainer applies to ``row``'s built model (``None`` for FFN-only rows)."""
    if row.attention is None and not row.embed_rank and row.embed_tt is None:
        return None

    def prepare(model: Transformer) -> None:
        if row.attention is not None:
            compress_(model, row.attention.method, filter=ATTENTION_PROJECTIONS, **dict(row.attention.options))
        if row.embed_rank:
            factorize_embeddings_(model, row.embed_rank)
        if row.embed_tt is not None:
            tt_embeddings_(model, **dict(row.embed_tt))

    return prepare
