"""The translation study's rows: the seed's figures, the row definitions and each dataset's table."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...models.transformer import FFNSpec, TransformerConfig

DATASETS = ("multi30k", "iwslt14", "plain")

# The seed's feed-forward block: "2xTTLayer(ranks=[1, 2, 2, 2, 2, 1]), Tucker ranks equal to 2".
SEED_TT_RANKS = (1, 2, 2, 2, 2, 1)
SEED_TUCKER_RANKS = 2


# ---------------------------------------------------------------------------------------------------------------
# The seed's figures (slides "Results: Multi30k" and "Results: IWSLT'14"), for comparison only
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedPoint:
    """One row of a seed table.

    Attributes:
        label: the row's name on the slide.
        bleu: the seed's BLEU, 0-1 scale.
        ratio: the seed's compression ratio (``None``: the IWSLT'14 slide gives none).
        time: the seed's "Time" column (unit not stated on the slides; ``None`` where it shows "-").
    """

    label: str
    bleu: float
    ratio: float | None
    time: float | None


SEED_POINTS: dict[str, dict[str, SeedPoint]] = {
    # The slide's text renders the 3/4 and 1/4 rows' fractions as "%"; which is which follows from their ratios
    # (more TT blocks, higher ratio): 1.484 is 3/4, 1.069 is 1/4.
    "multi30k": {
        "original": SeedPoint("original model", 0.442, 1.0, 41.38),
        "tt-all": SeedPoint("all tt-compressed", 0.434, 1.64, 76.89),
        "small": SeedPoint("small-transformer", 0.403, 1.6, None),
        "tt-3/4": SeedPoint("3/4 tt-compressed", 0.489, 1.484, 75.24),
        "tt-1/2": SeedPoint("1/2 tt-compressed", 0.412, 1.243, 71.36),
        "tt-1/4": SeedPoint("1/4 tt-compressed", 0.414, 1.069, 40.97),
        "tucker-all": SeedPoint("all Tucker-compressed", 0.447, 1.64, 43.83),
    },
    "iwslt14": {
        "original": SeedPoint("transformer", 0.291, None, 154.23),
        "tt-all": SeedPoint("all tt-compressed", 0.292, None, 241.24),
        "tt-1/2": SeedPoint("1/2 tt-compressed", 0.297, None, 180.81),
        "tucker-all": SeedPoint("Tucker-compressed", 0.283, None, 198.3),
    },
}


# ---------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionCompression:
    """``Transformer.compress_attention_(method, **options)``: ``compress_`` on every attention projection
    (:data:`~compressed_transformer.models.transformer.ATTENTION_PROJECTIONS`)."""

    method: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "options": dict(self.options)}


@dataclass(frozen=True)
class Row:
    """How one row of a study table is built.

    Attributes:
        name: the row's name (``--rows``).
        ffn: the FFN blocks' method, options and block selection (see :class:`FFNSpec`).
        route: ``"scratch"`` (train the compressed model from a random initialisation) or ``"convert"``
            (``compress_`` the trained ``original`` row's best checkpoint, then fine-tune).
        schedule: ``"train"`` (the budget's full training schedule) or ``"fine_tune"`` (its short one).
        half_layers: the seed's size-matched baseline: ``ceil(layers / 2)`` encoder and decoder layers.
        attention: also compress every attention projection (``None``: they stay dense).
        embed_rank: also factorise the embedding table (and so the tied output projection) to this rank
            (0: full table).
        embed_tt: instead, make the table a TT-matrix with these :class:`~compressed_transformer.layers.TTEmbedding`
            options (e.g. ``{"ranks": 16}``); ``None``: no TT table.
        note: what the row is, for the table.
    """

    name: str
    ffn: FFNSpec = field(default_factory=FFNSpec)
    route: str = "scratch"
    schedule: str = "train"
    half_layers: bool = False
    attention: AttentionCompression | None = None
    embed_rank: int = 0
    embed_tt: Mapping[str, Any] | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.route not in ("scratch", "convert"):
            raise ValueError(f"route must be 'scratch' or 'convert', got {self.route!r}")
        if self.schedule not in ("train", "fine_tune"):
            raise ValueError(f"schedule must be 'train' or 'fine_tune', got {self.schedule!r}")
        if self.embed_rank < 0:
            raise ValueError(f"embed_rank must be >= 0, got {self.embed_rank}")
        if self.embed_rank and self.embed_tt is not None:
            raise ValueError("a row compresses its embedding table one way: embed_rank or embed_tt, not both")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ffn": self.ffn.to_dict(),
            "route": self.route,
            "schedule": self.schedule,
            "half_layers": self.half_layers,
            "attention": None if self.attention is None else self.attention.to_dict(),
            "embed_rank": self.embed_rank,
            "embed_tt": None if self.embed_tt is None else dict(self.embed_tt),
            "note": self.note,
        }


ROW_NAMES: dict[str, tuple[str, ...]] = {
    "multi30k": (
        "original",
        "tt-all",
        "tt-3/4",
        "tt-1/2",
        "tt-1/4",
        "small",
        "tucker-all",
        "svd-all",
        "svd-all-convert",
        "prune-all",
        "sparse-all",
        "svd-o-all",
        "tt-all-convert",
        "tt-all+attn",
        "tt-all+emb",
        "tt-all+attn+emb",
        "tt-all+ttemb",
    ),
    "iwslt14": ("original", "tt-all", "tt-1/2", "tucker-all"),
}
ROW_NAMES["plain"] = ROW_NAMES["multi30k"]


TT_EMBEDDING_RANK = 16  # TT-ranks of the ``tt-all+ttemb`` table (Hrinchuk et al. 2020 use 16-64 for translation)


def rows_for(dataset: str, base: TransformerConfig) -> dict[str, Row]:
    """The rows of ``dataset``'s table for the ``original`` model ``base``, in table order.

    Sizes that depend on the model: SVD rank ``d_model // 8`` in the FFN blocks, ``d_model // 4`` for the
    attention projections and the embedding table.

    Raises:
        ValueError: for an unknown dataset.
    """
    if dataset not in ROW_NAMES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    tt = {"ranks": list(SEED_TT_RANKS)}
    svd_rank = max(1, base.d_model // 8)
    side_rank = max(1, base.d_model // 4)
    attention = AttentionCompression("svd", {"rank": side_rank})
    rows = [
        Row("original", note="dense"),
        Row("tt-all", FFNSpec("tt", tt, "all"), note="the seed's TT FFNs, from scratch"),
        Row("tt-3/4", FFNSpec("tt", tt, "3/4"), note="TT in the lowest round(3/4 L) blocks of each stack"),
        Row("tt-1/2", FFNSpec("tt", tt, "1/2"), note="TT in the lowest round(1/2 L) blocks of each stack"),
        Row("tt-1/4", FFNSpec("tt", tt, "1/4"), note="TT in the lowest round(1/4 L) blocks of each stack"),
        Row("small", half_layers=True, note="dense, half the layers: the seed's size-matched baseline"),
        Row("tucker-all", FFNSpec("tucker", {"ranks": SEED_TUCKER_RANKS}, "all"), note="Tucker FFNs, from scratch"),
        Row("svd-all", FFNSpec("svd", {"rank": svd_rank}, "all"), note="low-rank FFNs, from scratch"),
        Row(
            "svd-all-convert",
            FFNSpec("svd", {"rank": svd_rank}, "all"),
            route="convert",
            schedule="fine_tune",
            note="truncated SVD of the trained original, fine-tuned",
        ),
        Row(
            "prune-all",
            FFNSpec("prune", {"sparsity": 0.9}, "all"),
            route="convert",
            schedule="fine_tune",
            note="90% magnitude pruning of the trained original, fine-tuned with the mask fixed",
        ),
        Row(
            "sparse-all",
            FFNSpec("sparse", {"sparsity": 0.9}, "all"),
            route="convert",
            schedule="fine_tune",
            note="prune-all with only the kept weights stored (SparseLinear): the same model, compact training",
        ),
        Row(
            "svd-o-all",
            FFNSpec("svd-o", {}, "all"),
            route="convert",
            schedule="train",
            note="Sparse VD started from the trained original (KL term, full schedule)",
        ),
        Row(
            "tt-all-convert",
            FFNSpec("tt", tt, "all"),
            route="convert",
            schedule="fine_tune",
            note="TT-SVD of the trained original, fine-tuned",
        ),
        Row(
            "tt-all+attn",
            FFNSpec("tt", tt, "all"),
            attention=attention,
            note="TT FFNs and low-rank attention projections, from scratch",
        ),
        Row(
            "tt-all+emb",
            FFNSpec("tt", tt, "all"),
            embed_rank=side_rank,
            note="TT FFNs and a low-rank embedding/output table (attention dense), from scratch",
        ),
        Row(
            "tt-all+attn+emb",
            FFNSpec("tt", tt, "all"),
            attention=attention,
            embed_rank=side_rank,
            note="TT FFNs, low-rank attention projections and embedding/output table, from scratch",
        ),
        Row(
            "tt-all+ttemb",
            FFNSpec("tt", tt, "all"),
            embed_tt={"ranks": TT_EMBEDDING_RANK},
            note="TT FFNs and a TT embedding/output table (Hrinchuk et al. 2020; attention dense), from scratch",
        ),
    ]
    by_name = {row.name: row for row in rows}
    return {name: by_name[name] for name in ROW_NAMES[dataset]}
