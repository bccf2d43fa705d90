"""Compressions the model config cannot describe: attention projections and embedding tables."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...models.transformer import ATTENTION_PROJECTIONS, Transformer
from ...train.prepare import prepare_from_extra
from .rows import Row

# ---------------------------------------------------------------------------------------------------------------
# Compressions the model config cannot describe: attention projections and embeddings (applied by ``prepare``)
# ---------------------------------------------------------------------------------------------------------------


def factorize_embeddings_(model: Transformer, rank: int) -> None:
    """Replace the model's embedding table(s) by :class:`~compressed_transformer.layers.LowRankEmbedding` of
    ``rank``, in place (:meth:`Transformer.compress_embeddings_ <compressed_transformer.models.transformer.
    Transformer.compress_embeddings_>`; a separate output projection becomes a rank-``rank`` ``LowRankLinear``)."""
    model.compress_embeddings_("svd", rank=rank)


def row_compression(row: Row) -> dict[str, Any]:
    """``row``'s attention / embedding compression as recorded in its run's ``TrainConfig.extra`` (read back by
    :func:`~compressed_transformer.train.prepare.prepare_from_extra`, so ``translate train --resume`` continues the
    row); empty for FFN-only rows."""
    extra: dict[str, Any] = {}
    if row.attention is not None:
        extra["attention"] = row.attention.to_dict() | {"filter": ATTENTION_PROJECTIONS}
    if row.embed_rank:
        extra["embed_rank"] = row.embed_rank
    if row.embed_tt is not None:
        extra["embed_tt"] = dict(row.embed_tt)
    return extra


def row_prepare(row: Row) -> Callable[[Transformer], None] | None:
    """The in-place change the trainer applies to ``row``'s built model (``None`` for FFN-only rows)."""
    return prepare_from_extra(row_compression(row))
