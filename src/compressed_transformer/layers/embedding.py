"""Compressed embedding tables: low-rank (the factorised embedding of ALBERT) and tensor-train (Hrinchuk et al.)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..functional._validate import _is_int
from ..functional.matmul import low_rank_linear, matmul
from ..functional.svd import truncated_svd
from ..functional.tt import (
    factorize,
    max_padding_rows,
    pad_rows,
    tt_matrix_from_dense,
    tt_matrix_rows,
)
from ._common import check_modes, padded_modes
from ._fast import layer_cache, params_of, prepare_forward, represented_weight
from .low_rank import LowRankLinear
from .tt import TTLinear

__all__ = ["LowRankEmbedding", "TTEmbedding", "tie_projection_"]


def check_plain_embedding(embedding: nn.Embedding, name: str) -> None:
    """Refuse the ``nn.Embedding`` options a factorised table does not reproduce: ``max_norm`` (renormalises the
    looked-up rows of the stored table in place), ``scale_grad_by_freq`` and ``sparse`` gradients.

    Raises:
        ValueError: naming the options set.
    """
    options = [
        option
        for option, value in (
            ("max_norm", embedding.max_norm),
            ("scale_grad_by_freq", embedding.scale_grad_by_freq),
            ("sparse", embedding.sparse),
        )
        if value
    ]
    if options:
        raise ValueError(
            f"{name}.from_embedding cannot keep nn.Embedding's {', '.join(options)}: a factorised table has no rows "
            "to renormalise or to update sparsely; build the nn.Embedding without them to compress it"
        )


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
        if not _is_int(rank) or not 1 <= rank <= max_rank:
            raise ValueError(
                f"rank must be an int in [1, {max_rank}] for a {num_embeddings}x{embedding_dim} table, got {rank!r}"
            )
        rank = int(rank)
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"padding_idx {padding_idx} is outside a vocabulary of {num_embeddings}")
        factory = {"device": device, "dtype": dtype}
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.padding_idx = None if padding_idx is None else padding_idx % num_embeddings  # as nn.Embedding
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
        """Best rank-``rank`` approximation (truncated SVD) of ``embedding.weight``; ``embedding`` is not modified.

        Raises:
            ValueError: for an ``nn.Embedding`` with ``max_norm``, ``scale_grad_by_freq`` or ``sparse`` (see
                :func:`check_plain_embedding`).
        """
        check_plain_embedding(embedding, cls.__name__)
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
            # a zero padding row stays exactly zero (not up to the SVD's rounding); a trained one (a tied output
            # projection trains it) is kept as approximated
            if layer.padding_idx is not None and not weight[layer.padding_idx].any():
                layer.left[layer.padding_idx].zero_()
        return layer

    def to_dense(self) -> torch.Tensor:
        """The represented table, ``(num_embeddings, embedding_dim)``."""
        return matmul(self.left, self.right)

    @property
    def weight(self) -> torch.Tensor:
        """The represented table (computed, not stored; cached in eval mode without autograd), so code reading
        ``.weight`` (a tied output projection) keeps working."""
        return represented_weight(self, [self.left, self.right], self.to_dense)

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


class TTEmbedding(nn.Module):
    """An embedding table stored as a TT-matrix (Hrinchuk et al. 2020, *Tensorized Embedding Layers*,
    https://arxiv.org/abs/1901.10787): the ``(V', embedding_dim)`` table, ``V' = prod(voc_modes) >= V``, has
    TT-matrix cores ``(r_{k-1}, v_k, e_k, r_k)`` over vocabulary modes ``v_k`` and embedding modes ``e_k``; rows
    ``V..V'-1`` pad a vocabulary that factorises badly and are never looked up.

    A lookup contracts the cores' slices of each id (:func:`~compressed_transformer.functional.tt.tt_matrix_rows`)
    and never builds the table, except in eval mode without autograd, where lookups and :meth:`attend` share the
    rebuilt table in ``table``'s eval cache (see :mod:`compressed_transformer.layers._fast`). The cores are held by
    ``table``, a bias-free :class:`~compressed_transformer.layers.TTLinear` from ``embedding_dim`` to ``V'``
    features, so :meth:`attend` (the logits of a tied output projection) is that layer's factorised, cost-chosen
    product, and a tied ``nn.Linear`` can become a ``TTLinear`` sharing the cores
    (:func:`~compressed_transformer.compress.compress_embeddings_`).

    Args:
        num_embeddings: vocabulary size ``V``.
        embedding_dim: width of each embedding.
        padding_idx: this id embeds to zeros and passes no gradient from lookups (as ``nn.Embedding``'s zero
            padding row). The table's row there (``to_dense``, and the tied logits of :meth:`attend`) is whatever
            the cores give: a tied output projection trains it, as it trains a dense table's padding row.
        voc_modes: vocabulary modes, product ``>= num_embeddings`` by at most :func:`~compressed_transformer.
            functional.tt.max_padding_rows` (as a ``TTLinear`` may pad its outputs); by default as many balanced
            modes as ``emb_modes`` have (3 when both are omitted), padded as a ``TTLinear``'s omitted ``out_modes``
            are where ``V`` factorises badly (a prime, say: :func:`~compressed_transformer.functional.tt.
            tt_vocab_modes`).
        emb_modes: factors of ``embedding_dim``; balanced when omitted.
        ranks: ``int`` cap or the full list of ``d + 1`` TT-ranks.
        device: parameter device.
        dtype: parameter dtype.

    Shape:
        input ``(...)`` integer ids, output ``(..., embedding_dim)``.

    Raises:
        ValueError: for modes that do not fit the table or invalid ranks.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        voc_modes: Sequence[int] | None = None,
        emb_modes: Sequence[int] | None = None,
        ranks: int | Sequence[int] = 8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(f"a table needs num_embeddings, embedding_dim >= 1, got {num_embeddings}, {embedding_dim}")
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"padding_idx {padding_idx} is outside a vocabulary of {num_embeddings}")
        for name, modes in (("voc_modes", voc_modes), ("emb_modes", emb_modes)):
            if modes is not None:
                check_modes(name, modes)
        d = len(voc_modes) if voc_modes is not None else len(emb_modes) if emb_modes is not None else 3
        default_voc = padded_modes(num_embeddings, d) or factorize(num_embeddings, d)  # padded as TTLinear's outputs
        voc_modes = [int(m) for m in voc_modes] if voc_modes is not None else default_voc
        emb_modes = [int(m) for m in emb_modes] if emb_modes is not None else factorize(embedding_dim, d)
        if len(voc_modes) != len(emb_modes):
            raise ValueError(f"voc_modes {voc_modes} and emb_modes {emb_modes} need the same length")
        if math.prod(voc_modes) < num_embeddings:
            raise ValueError(f"prod(voc_modes)={math.prod(voc_modes)} is below num_embeddings={num_embeddings}")
        if math.prod(voc_modes) - num_embeddings > max_padding_rows(num_embeddings):  # as TTLinear pads outputs
            allowed, example = max_padding_rows(num_embeddings), default_voc
            raise ValueError(
                f"voc_modes={voc_modes} pad {num_embeddings} ids to {math.prod(voc_modes)} rows; at most "
                f"{allowed} padding rows are allowed (e.g. {example})"
            )
        if math.prod(emb_modes) != embedding_dim:
            raise ValueError(f"prod(emb_modes)={math.prod(emb_modes)} must equal embedding_dim={embedding_dim}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = None if padding_idx is None else padding_idx % num_embeddings
        self.voc_modes, self.emb_modes = voc_modes, emb_modes
        self.table = TTLinear(
            embedding_dim,
            math.prod(voc_modes),
            bias=False,
            in_modes=emb_modes,
            out_modes=voc_modes,
            ranks=ranks,
            device=device,
            dtype=dtype,
        )
        self.ranks = self.table.ranks
        self.reset_parameters()

    @property
    def cores(self) -> nn.ParameterList:
        """The TT-matrix cores ``(r_{k-1}, v_k, e_k, r_k)`` (those of ``table``)."""
        return self.table.cores

    def reset_parameters(self) -> None:
        # Entries of the table get the std embedding_dim ** -0.5 of the Transformer's dense table.
        paths = math.prod(self.ranks[1:-1])
        std = (1.0 / (self.embedding_dim * paths)) ** (1.0 / (2 * len(self.cores)))
        for core in self.cores:
            nn.init.normal_(core, 0.0, std)

    @classmethod
    def from_embedding(
        cls,
        embedding: nn.Embedding,
        *,
        ranks: int | Sequence[int] | None = None,
        eps: float | None = None,
        voc_modes: Sequence[int] | None = None,
        emb_modes: Sequence[int] | None = None,
    ) -> TTEmbedding:
        """TT-SVD of ``embedding.weight`` (padded with zero rows to ``prod(voc_modes)``) with a rank cap and/or a
        relative error bound ``eps`` (:func:`~compressed_transformer.functional.tt.tt_matrix_from_dense`);
        ``embedding`` is not modified.

        Raises:
            ValueError: for modes that do not fit, neither ``ranks`` nor ``eps``, or an ``nn.Embedding`` with
                ``max_norm``, ``scale_grad_by_freq`` or ``sparse`` (see :func:`check_plain_embedding`).
        """
        check_plain_embedding(embedding, cls.__name__)
        if ranks is None and eps is None:
            raise ValueError("TTEmbedding.from_embedding needs ranks= and/or eps=")
        weight = embedding.weight.detach()
        num, dim = weight.shape
        probe = cls(num, dim, embedding.padding_idx, voc_modes=voc_modes, emb_modes=emb_modes, ranks=1, device="meta")
        with torch.no_grad():
            padded = pad_rows(weight.double(), math.prod(probe.voc_modes))
            cores = tt_matrix_from_dense(padded, probe.voc_modes, probe.emb_modes, ranks=ranks, eps=eps)
            layer = cls(
                num,
                dim,
                embedding.padding_idx,
                voc_modes=probe.voc_modes,
                emb_modes=probe.emb_modes,
                ranks=[1] + [c.shape[-1] for c in cores],
                device=weight.device,
                dtype=weight.dtype,
            )
            for param, core in zip(layer.cores, cores, strict=True):
                param.copy_(core)
        return layer

    def to_dense(self) -> torch.Tensor:
        """The represented table, ``(num_embeddings, embedding_dim)``."""
        return self.table.to_dense()[: self.num_embeddings]

    @property
    def weight(self) -> torch.Tensor:
        """The represented table (computed, not stored; in eval mode without autograd, the cached copy the forward
        looks rows up in)."""
        table = represented_weight(self.table, params_of(self.table, "cores"), self.table.to_dense)
        return table[: self.num_embeddings]

    def attend(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden @ E^T``, the logits of a tied output projection, through the cores (``table``'s forward).

        Shape:
            ``(..., embedding_dim)`` -> ``(..., num_embeddings)``.
        """
        logits = self.table(hidden)
        return logits if logits.shape[-1] == self.num_embeddings else logits[..., : self.num_embeddings]

    def num_stored_params(self) -> int:
        """``sum_k r_{k-1} v_k e_k r_k``."""
        return sum(core.numel() for core in self.cores)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"TTEmbedding takes integer ids, got {ids.dtype}")
        if torch.compiler.is_compiling():  # no data-dependent branch in a graph: an assertion the graph runs
            valid = ((ids >= 0) & (ids < self.num_embeddings)).all()
            torch._assert_async(valid, f"TTEmbedding: ids must be in [0, {self.num_embeddings})")
        elif ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < self.num_embeddings:
            raise IndexError(f"ids must be in [0, {self.num_embeddings}), got [{int(ids.min())}, {int(ids.max())}]")
        cores = params_of(self.table, "cores")
        if prepare_forward(self.table, cores):  # eval without autograd: rows of the cached table (shared with attend)
            rows = F.embedding(ids, layer_cache(self.table).get("dense", cores, self.table.to_dense))
        else:  # each distinct id once (text repeats ids: a 2048-token batch of Multi30k has ~900 distinct)
            distinct, inverse = torch.unique(ids, return_inverse=True)
            rows = F.embedding(inverse, tt_matrix_rows(cores, distinct))
        if self.padding_idx is None:
            return rows
        return rows * (ids != self.padding_idx).unsqueeze(-1).to(rows.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
            f"voc_modes={self.voc_modes}, emb_modes={self.emb_modes}, ranks={self.ranks}"
        )


def tie_projection_(projection: nn.Module, table: nn.Module) -> None:
    """Make the output projection ``projection`` (a ``LowRankLinear`` / ``TTLinear`` of ``embedding_dim ->
    num_embeddings``) use the factors / cores of the compressed ``table`` (a ``LowRankEmbedding`` / ``TTEmbedding``):
    a tied output projection, trained through both uses.

    Raises:
        ValueError: for a projection of another kind than the table, factors of other shapes, or outputs other
            than the table's ids (a TT projection may share the cores of a table padded to as many rows).
    """
    if isinstance(projection, LowRankLinear) and isinstance(table, LowRankEmbedding):
        mine, theirs = [projection.left, projection.right], [table.left, table.right]
    elif isinstance(projection, TTLinear) and isinstance(table, TTEmbedding):
        mine, theirs = list(projection.cores), list(table.cores)
    else:
        raise ValueError(f"a {type(projection).__name__} cannot be tied to a {type(table).__name__}")
    if [p.shape for p in mine] != [p.shape for p in theirs]:
        raise ValueError("the projection does not fit the factors of the table")
    if projection.out_features != table.num_embeddings:  # TT: the same cores, but another count of padding rows
        raise ValueError(
            f"the projection has {projection.out_features} outputs, the table {table.num_embeddings} ids: a tied "
            "projection gives one logit per id"
        )
    if isinstance(projection, LowRankLinear):
        projection.left, projection.right = table.left, table.right  # (vocab, r) @ (r, width)
    else:
        projection.cores = table.cores  # the same ParameterList
