"""The trainer's ``prepare`` hook of a run, read from its ``TrainConfig.extra``: the compressions that the model
config cannot describe (attention projections, embedding tables), applied to the freshly built model before its
weights are initialised, loaded or resumed.

``extra`` keys read (any may be absent):

* ``attention``: ``{"method", "options"}`` for :meth:`Transformer.compress_attention_
  <compressed_transformer.models.transformer.Transformer.compress_attention_>` (``translate train --attn``, study
  rows with compressed attention);
* ``embedding``: ``{"method", "options"}`` for :meth:`Transformer.compress_embeddings_
  <compressed_transformer.models.transformer.Transformer.compress_embeddings_>` (``translate train --embed``);
* ``embed_rank`` / ``embed_tt``: a study row's rank-``r`` (SVD) or TT table, the same call spelt the study's way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..models.transformer import Transformer

__all__ = ["prepare_from_extra"]


def prepare_from_extra(extra: Mapping[str, Any]) -> Callable[[Transformer], None] | None:
    """The in-place change ``extra`` asks of a built model; ``None`` when it compresses neither attention nor
    embeddings."""
    attention, embedding = extra.get("attention"), extra.get("embedding")
    if embedding is None and extra.get("embed_rank"):
        embedding = {"method": "svd", "options": {"rank": extra["embed_rank"]}}
    if embedding is None and extra.get("embed_tt"):
        embedding = {"method": "tt", "options": extra["embed_tt"]}
    if not attention and not embedding:
        return None

    def prepare(model: Transformer) -> None:
        if attention:
            model.compress_attention_(attention["method"], **attention["options"])
        if embedding:
            model.compress_embeddings_(embedding["method"], **embedding["options"])

    return prepare
