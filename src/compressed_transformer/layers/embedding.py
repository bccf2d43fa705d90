"""Low-rank embedding table (the factorised embedding of ALBERT)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.matmul import low_rank_linear, matmul
from ..functional.svd import truncated_svd

__all__ = ["LowRankEmbedding"]


class LowRankEmbedding(nn.Module):
    """An embedding table of rank ``r``: ``E = left @ right`` with ``left`` ``(num_embeddings, r)`` and ``right``
    ``(r, embedding_dim)``, the factorised embedding of ALBERT (Lan et al. 2020, https://arxiv.org/abs/1909.11942).

    A lookup costs ``r * embedding_dim`` multiply-adds per token; :meth:`attend` gives the logits of a tied output
    projection through the factors, and ``weight`` rebuilds the full table for code that reads it. Stores
    ``r * (num_embeddings + embedding_dim)`` parameters instead of ``num_embeddings * embedding_dim``. Replace a
    model's tables with :func:`~compressed_transformer.compress.compress_embeddings_`.

    Args:
        num_embeddings: vocabulary size.
        embedding_dim: width of each embedding.
        rank: inner rank in ``[1, min(num_embeddings, embedding_dim)]``.
        padding_idx: this row of ``left`` gets no gradient from lookups (as in ``nn.Embedding``).
        device: parameter device.
        dtype: parameter dtype.

    Shape:
        input ``(...)`` integer ids, output ``(..., embedding_dim)``.

    Raises:
        ValueError: if ``rank`` is out of range.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        padding_idx: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        max_rank = min(num_embeddings, embedding_dim)
        if not isinstance(rank, int) or not 1 <= rank <= max_rank:
            raise ValueError(f"rank must be an int in [1, {max_rank}] for a {num_embeddings}x{embedding_dim} table")
        factory = {"device": device, "dtype": dtype}
        self.num_embeddings, self.embedding_dim, self.rank, self.padding_idx = (
            num_embeddings,
            embedding_dim,
            rank,
            padding_idx,
        )
        self.left = nn.Parameter(torch.empty(num_embeddings, rank, **factory))
        self.right = nn.Parameter(torch.empty(rank, embedding_dim, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Entries of left @ right then have the std embedding_dim ** -0.5 of the Transformer's dense table.
        std = (self.embedding_dim**-0.5 / math.sqrt(self.rank)) ** 0.5
        nn.init.normal_(self.left, 0.0, std)
        nn.init.normal_(self.right, 0.0, std)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.left[self.padding_idx].zero_()

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, *, rank: int) -> LowRankEmbedding:
        """Best rank-``rank`` approximation (truncated SVD) of ``embedding.weight``; ``embedding`` is not modified."""
        with torch.no_grad():
            weight = embedding.weight.detach()
            layer = cls(
                embedding.num_embeddings,
                embedding.embedding_dim,
                rank,
                embedding.padding_idx,
                device=weight.device,
                dtype=weight.dtype,
            )
            left, right = truncated_svd(weight.double(), rank=rank)
            layer.left.copy_(left)
            layer.right.copy_(right)
            if layer.padding_idx is not None:
                layer.left[layer.padding_idx].zero_()  # exactly, not up to the SVD's rounding
        return layer

    def to_dense(self) -> torch.Tensor:
        """The represented table, ``(num_embeddings, embedding_dim)``."""
        return matmul(self.left, self.right)

    @property
    def weight(self) -> torch.Tensor:
        """The represented table (computed, not stored), so code reading ``.weight`` (a tied output projection)
        keeps working."""
        return self.to_dense()

    def attend(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden @ E^T``, the logits of a tied output projection, through the factors: ``(hidden right^T)
        left^T`` costs ``rank (embedding_dim + num_embeddings)`` multiply-adds per vector instead of
        ``embedding_dim num_embeddings``, and never builds the table.

        Shape:
            ``(..., embedding_dim)`` -> ``(..., num_embeddings)``.
        """
        return low_rank_linear(hidden, self.left, self.right)

    def num_stored_params(self) -> int:
        """``rank * (num_embeddings + embedding_dim)``."""
        return self.left.numel() + self.right.numel()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.left, self.padding_idx) @ self.right  # (..., r) @ (r, d)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}, padding_idx={self.padding_idx}"
