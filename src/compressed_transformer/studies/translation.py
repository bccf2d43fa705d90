"""The translation study: the seed's Multi30k and IWSLT'14 tables, one training run per row.

``compressed-transformer study multi30k|iwslt14|plain --out DIR [--rows ...] [--budget small|full|tiny]
[--data-dir ...]`` trains every row with :func:`~compressed_transformer.train.trainer.train` in its own run folder
``DIR/rows/<row>/``, scores the row's best checkpoint (best validation BLEU) on the test set, and writes
``DIR/table.md``, ``DIR/results.json`` and ``DIR/bleu_vs_ratio.png`` (seed-comparable BLEU against the total
compression ratio, log x, the seed's points drawn for comparison).

* A row whose ``result.json`` exists is skipped (after checking that it was run with the same configuration); a
  row interrupted during training resumes from its ``checkpoint_last.pt`` (the trainer's ``resume``).
* Rows that convert the trained ``original`` (``route = "convert"``) run it first; a row that resolves to exactly
  the model and training of an earlier row (e.g. ``tt-1/2`` and ``tt-3/4`` of a 3+3 model: ``round(0.5 * 3) ==
  round(0.75 * 3) == 2``) is not trained again: its result is that row's, marked ``same_as``.
* ``plain`` runs Multi30k's rows on any folder of line-aligned ``{train,valid,test}.{de,en}`` files (tests, smoke
  runs), compared with the seed's Multi30k figures.

Accounting: ``params`` is what :func:`~compressed_transformer.models.transformer.parameter_report` counts (factor
entries, non-zeros, biases; embeddings once when shared). ``ratio`` = parameters of the dense ``original`` model of
this budget (same vocabulary) / parameters of the row, so the size-matched ``small`` row has a ratio too;
``ratio_ffn`` compares the FFN blocks alone. BLEU: ``bleu`` is sacreBLEU (cased, detokenised), ``bleu_seed`` is
lowercased 13a-tokenised BLEU on a 0-1 scale, comparable with the seed's figures, ``bleu_tok_lc`` the same on 0-100
(for IWSLT'14 in fairseq's prepared layout the references are already tokenised and are not re-tokenised).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..compress import compress_
from ..data.parallel import ParallelCorpus, load_dataset
from ..data.tokenizer import Tokenizer
from ..evaluate.bleu import sacre_bleu, seed_bleu, tokenized_bleu
from ..evaluate.decoding import translate
from ..functional.svd import truncated_svd
from ..models.transformer import (
    FeedForward,
    FFNSpec,
    Transformer,
    TransformerConfig,
    parameter_report,
    preset,
    resolve_blocks,
)
from ..provenance import git_revision
from ..size import stored_params
from ..train.checkpoint import check_same_config, load_checkpoint
from ..train.distributed import resolve_device
from ..train.trainer import RESUMABLE_KEYS, TrainConfig, train

__all__ = [
    "ATTENTION_PROJECTIONS",
    "BUDGETS",
    "DATASETS",
    "ROW_NAMES",
    "SEED_POINTS",
    "SEED_TT_RANKS",
    "AttentionCompression",
    "Budget",
    "LowRankEmbedding",
    "Row",
    "RowResult",
    "Schedule",
    "SeedPoint",
    "StudyConfig",
    "describe_blocks",
    "describe_method",
    "factorize_embeddings_",
    "format_table",
    "load_row_model",
    "plot_bleu_vs_ratio",
    "register",
    "row_model_config",
    "row_prepare",
    "row_train_config",
    "rows_for",
    "run_study",
    "write_outputs",
]

DATASETS = ("multi30k", "iwslt14", "plain")

# The seed's feed-forward block: "2xTTLayer(ranks=[1, 2, 2, 2, 2, 1]), Tucker ranks equal to 2".
SEED_TT_RANKS = (1, 2, 2, 2, 2, 1)
SEED_TUCKER_RANKS = 2

# Qualified names of the attention projections (all nn.Linear) of every encoder and decoder layer.
ATTENTION_PROJECTIONS = r"(self_attn|cross_attn)\.(q|k|v|out)_proj$"


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
    """``compress_(model, method, filter=ATTENTION_PROJECTIONS, **options)`` on every attention projection."""

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
        note: what the row is, for the table.
    """

    name: str
    ffn: FFNSpec = field(default_factory=FFNSpec)
    route: str = "scratch"
    schedule: str = "train"
    half_layers: bool = False
    attention: AttentionCompression | None = None
    embed_rank: int = 0
    note: str = ""

    def __post_init__(self) -> None:
        if self.route not in ("scratch", "convert"):
            raise ValueError(f"route must be 'scratch' or 'convert', got {self.route!r}")
        if self.schedule not in ("train", "fine_tune"):
            raise ValueError(f"schedule must be 'train' or 'fine_tune', got {self.schedule!r}")
        if self.embed_rank < 0:
            raise ValueError(f"embed_rank must be >= 0, got {self.embed_rank}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ffn": self.ffn.to_dict(),
            "route": self.route,
            "schedule": self.schedule,
            "half_layers": self.half_layers,
            "attention": None if self.attention is None else self.attention.to_dict(),
            "embed_rank": self.embed_rank,
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
        "svd-o-all",
        "tt-all-convert",
        "tt-all+attn",
        "tt-all+attn+emb",
    ),
    "iwslt14": ("original", "tt-all", "tt-1/2", "tucker-all"),
}
ROW_NAMES["plain"] = ROW_NAMES["multi30k"]


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
            "tt-all+attn+emb",
            FFNSpec("tt", tt, "all"),
            attention=attention,
            embed_rank=side_rank,
            note="TT FFNs, low-rank attention projections and embedding/output table, from scratch",
        ),
    ]
    by_name = {row.name: row for row in rows}
    return {name: by_name[name] for name in ROW_NAMES[dataset]}


# ---------------------------------------------------------------------------------------------------------------
# Compressions the model config cannot describe: attention projections and embeddings (applied by ``prepare``)
# ---------------------------------------------------------------------------------------------------------------


class LowRankEmbedding(nn.Module):
    """An embedding table of rank ``r``: ``E = left @ right`` with ``left`` ``(num_embeddings, r)`` and ``right``
    ``(r, embedding_dim)``, the factorised embedding of ALBERT (Lan et al. 2020, https://arxiv.org/abs/1909.11942).

    A lookup costs ``r * embedding_dim`` multiply-adds per token; ``weight`` rebuilds the full table (for a tied
    output projection). Stores ``r * (num_embeddings + embedding_dim)`` parameters instead of
    ``num_embeddings * embedding_dim``.

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

    @property
    def weight(self) -> torch.Tensor:
        """The represented table, ``(num_embeddings, embedding_dim)``."""
        return self.left @ self.right

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.left, self.padding_idx) @ self.right  # (..., r) @ (r, d)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}, padding_idx={self.padding_idx}"


def factorize_embeddings_(model: Transformer, rank: int) -> None:
    """Replace the model's embedding table(s) by :class:`LowRankEmbedding` of ``rank``, in place.

    A shared source/target table stays shared (one module); a separate output projection (``tie_output=False``)
    becomes a rank-``rank`` ``LowRankLinear`` through ``compress_``.
    """
    src = LowRankEmbedding.from_embedding(model.src_embed, rank=rank)
    shared = model.tgt_embed is model.src_embed
    tgt = src if shared else LowRankEmbedding.from_embedding(model.tgt_embed, rank=rank)
    model.src_embed, model.tgt_embed = src, tgt
    if model.output is not None:
        compress_(model, "svd", filter=r"^output$", rank=rank)


def row_prepare(row: Row) -> Callable[[Transformer], None] | None:
    """The in-place change the trainer applies to ``row``'s built model (``None`` for FFN-only rows)."""
    if row.attention is None and not row.embed_rank:
        return None

    def prepare(model: Transformer) -> None:
        if row.attention is not None:
            compress_(model, row.attention.method, filter=ATTENTION_PROJECTIONS, **dict(row.attention.options))
        if row.embed_rank:
            factorize_embeddings_(model, row.embed_rank)

    return prepare


# ---------------------------------------------------------------------------------------------------------------
# Budgets and the study config
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """The :class:`TrainConfig` settings a budget chooses (see there); every other setting keeps its default."""

    max_tokens: int
    lr: float
    warmup_steps: int
    clip_norm: float = 1.0
    max_steps: int = 0
    max_epochs: int = 0
    max_minutes: float = 0.0
    eval_every: int = 0
    save_every: int = 500
    log_every: int = 50
    eval_max_sentences: int = 0


@dataclass(frozen=True)
class Budget:
    """Model size, training schedules and decoding of one budget for one dataset.

    Attributes:
        preset: the ``original`` model's preset (:data:`~compressed_transformer.models.transformer.PRESETS`).
        vocab_size: joint sentencepiece vocabulary (an upper bound: small corpora give fewer pieces).
        train: schedule of from-scratch rows (and of conversion rows with ``schedule="train"``).
        fine_tune: schedule of the conversion rows' fine-tuning.
        beam: beam size of the test-set decoding (1 = greedy).
    """

    preset: str
    vocab_size: int
    train: Schedule
    fine_tune: Schedule
    beam: int


_M30K_SMALL = Schedule(max_tokens=2048, lr=1e-3, warmup_steps=600, max_minutes=20, eval_every=250, save_every=100)
_TINY = Schedule(
    max_tokens=256, lr=3e-3, warmup_steps=10, max_steps=4, save_every=1000, log_every=2, eval_max_sentences=16
)
BUDGETS: dict[str, dict[str, Budget]] = {
    # The seed's sizes, for a GPU: Vaswani et al.'s base model on Multi30k, fairseq's IWSLT'14 shape.
    "full": {
        "multi30k": Budget(
            "base",
            8000,
            Schedule(max_tokens=4096, lr=5e-4, warmup_steps=1000, max_epochs=40, eval_every=500),
            Schedule(max_tokens=4096, lr=1e-4, warmup_steps=100, max_epochs=5, eval_every=250),
            beam=5,
        ),
        "iwslt14": Budget(
            "iwslt",
            10000,
            Schedule(max_tokens=4096, lr=5e-4, warmup_steps=4000, clip_norm=0.0, max_epochs=60, eval_every=2000),
            Schedule(max_tokens=4096, lr=1e-4, warmup_steps=400, clip_norm=0.0, max_epochs=5, eval_every=1000),
            beam=5,
        ),
    },
    # This 2-core CPU: the `small` preset, every row bounded in minutes (Multi30k: 10 x 20 + 3 x 8 min + decoding).
    "small": {
        "multi30k": Budget(
            "small",
            8000,
            _M30K_SMALL,
            Schedule(max_tokens=2048, lr=3e-4, warmup_steps=100, max_minutes=8, eval_every=100, save_every=100),
            beam=5,
        ),
        "iwslt14": Budget(
            "small",
            10000,
            Schedule(max_tokens=2048, lr=1e-3, warmup_steps=1000, max_minutes=40, eval_every=500, save_every=100),
            Schedule(max_tokens=2048, lr=3e-4, warmup_steps=100, max_minutes=10, eval_every=200, save_every=100),
            beam=5,
        ),
    },
    # Tests: the tiny preset, a few steps.
    "tiny": {
        "multi30k": Budget("tiny", 64, _TINY, replace(_TINY, max_steps=2), beam=1),
        "iwslt14": Budget("tiny", 64, _TINY, replace(_TINY, max_steps=2), beam=1),
    },
}


def _budget(dataset: str, name: str) -> Budget:
    if name not in BUDGETS:
        raise ValueError(f"unknown budget {name!r}; choose one of {', '.join(BUDGETS)}")
    return BUDGETS[name]["iwslt14" if dataset == "iwslt14" else "multi30k"]


@dataclass(frozen=True)
class StudyConfig:
    """What one ``study`` invocation does; written, resolved, into ``results.json``.

    Attributes:
        dataset: ``multi30k``, ``iwslt14`` or ``plain`` (Multi30k's rows on any aligned corpus).
        out: the study folder.
        data_dir: the dataset's folder.
        budget: ``full``, ``small`` or ``tiny``.
        rows: the rows to run, in any order (``()``: all of the dataset's rows).
        device: ``auto``, ``cpu``, ``cuda``.
        max_minutes / fine_tune_minutes: override the budget's per-row bound of from-scratch / fine-tuning runs.
        beam: override the budget's test-set beam.
        seed: seeds every row.
        progress: tqdm bars while training.
    """

    dataset: str
    out: str
    data_dir: str
    budget: str = "small"
    rows: tuple[str, ...] = ()
    device: str = "auto"
    max_minutes: float | None = None
    fine_tune_minutes: float | None = None
    beam: int | None = None
    seed: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        _budget(self.dataset, self.budget)
        unknown = [row for row in self.rows if row not in ROW_NAMES[self.dataset]]
        if unknown:
            raise ValueError(
                f"unknown row(s) {unknown} for {self.dataset}; choose from {', '.join(ROW_NAMES[self.dataset])}"
            )
        for name in ("max_minutes", "fine_tune_minutes"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 minutes, got {value}")
        if self.beam is not None and self.beam < 1:
            raise ValueError(f"beam must be >= 1, got {self.beam}")

    @property
    def resolved_budget(self) -> Budget:
        return _budget(self.dataset, self.budget)

    @property
    def base_model(self) -> TransformerConfig:
        """The ``original`` row's model."""
        budget = self.resolved_budget
        return preset(budget.preset, vocab_size=budget.vocab_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"resolved_budget": asdict(self.resolved_budget)}


# ---------------------------------------------------------------------------------------------------------------
# Planning: each row's model and training config
# ---------------------------------------------------------------------------------------------------------------


def _slug(name: str) -> str:
    return name.replace("/", "_")


def row_model_config(row: Row, base: TransformerConfig) -> TransformerConfig:
    """``row``'s model: ``base`` with the row's FFN spec (and half its layers for the ``small`` row)."""
    config = base.replace(ffn=row.ffn)
    if row.half_layers:
        config = config.replace(enc_layers=math.ceil(base.enc_layers / 2), dec_layers=math.ceil(base.dec_layers / 2))
    return config


def row_train_config(row: Row, study: StudyConfig, out: Path) -> TrainConfig:
    """``row``'s training run in ``out / "rows" / <row>``."""
    budget = study.resolved_budget
    schedule = asdict(budget.train if row.schedule == "train" else budget.fine_tune)
    minutes = study.max_minutes if row.schedule == "train" else study.fine_tune_minutes
    if minutes is not None:
        schedule["max_minutes"] = minutes
    extra: dict[str, Any] = {"study": study.dataset, "budget": study.budget, "row": row.name}
    if row.attention is not None:
        extra["attention"] = row.attention.to_dict() | {"filter": ATTENTION_PROJECTIONS}
    if row.embed_rank:
        extra["embed_rank"] = row.embed_rank
    return TrainConfig(
        dataset=study.dataset,
        data_dir=study.data_dir,
        out_dir=str(out / "rows" / _slug(row.name)),
        seed=study.seed,
        init_from=str(out / "rows" / "original" / "checkpoint_best.pt") if row.route == "convert" else "",
        device=study.device,
        progress=study.progress,
        extra=extra,
        **schedule,
    )


def _identity(model: TransformerConfig, cfg: TrainConfig) -> str:
    """What a row trains, independent of its name: equal for rows that would train the same model the same way."""
    enc, dec = resolve_blocks(model.ffn.blocks, model.enc_layers, model.dec_layers)
    if model.ffn.method == "dense" or not (enc or dec):
        ffn = FFNSpec()
    else:
        ffn = FFNSpec(
            model.ffn.method, model.ffn.options, f"enc:{','.join(map(str, enc))};dec:{','.join(map(str, dec))}"
        )
    train_dict = {k: v for k, v in cfg.to_dict().items() if k not in ("out_dir", "progress", "device")}
    train_dict["extra"] = {k: v for k, v in cfg.extra.items() if k != "row"}
    return json.dumps({"model": model.replace(ffn=ffn).to_dict(), "train": train_dict}, sort_keys=True)


@dataclass(frozen=True)
class _Plan:
    row: Row
    model: TransformerConfig
    train: TrainConfig
    same_as: str | None

    @property
    def folder(self) -> Path:
        return Path(self.train.out_dir)


def _plan(study: StudyConfig, out: Path) -> dict[str, _Plan]:
    """Every row of the dataset, with the earlier row it duplicates (if any)."""
    base = study.base_model
    plans: dict[str, _Plan] = {}
    seen: dict[str, str] = {}
    for name, row in rows_for(study.dataset, base).items():
        model, cfg = row_model_config(row, base), row_train_config(row, study, out)
        if model.ffn.method != "dense":  # a spec that does not fit the model fails here, before any training
            FeedForward(model.d_model, model.d_ff, 0.0, model.ffn.method, model.ffn.options)
        key = _identity(model, cfg)
        plans[name] = _Plan(row, model, cfg, seen.get(key))
        seen.setdefault(key, name)
    return plans


def _to_run(study: StudyConfig, plans: dict[str, _Plan]) -> list[str]:
    """The requested rows plus what they need (the original for conversions, the row a duplicate copies)."""
    wanted = set(study.rows or plans)
    for name in list(wanted):
        plan = plans[name]
        if plan.row.route == "convert":
            wanted.add("original")
        if plan.same_as is not None:
            wanted.add(plan.same_as)
    return [name for name in plans if name in wanted]


# ---------------------------------------------------------------------------------------------------------------
# Running and scoring one row
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RowResult:
    """One line of the table (and of ``results.json``), measured from the row's own run."""

    name: str
    method: str
    blocks: str
    route: str
    note: str
    bleu: float
    bleu_seed: float
    bleu_tok_lc: float
    params: int
    params_ffn: int
    params_attention: int
    params_embeddings: int
    ratio: float
    ratio_ffn: float
    train_seconds: float
    steps: int
    epochs: float
    best_valid_bleu: float
    infer_seconds: float
    sentences: int
    sentences_per_s: float
    beam: int
    bleu_signature: str
    bleu_tok_lc_signature: str
    run_dir: str
    checkpoint: str
    same_as: str | None = None
    seed: dict[str, Any] | None = None
    row: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RowResult:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def _ranges(indices: Sequence[int]) -> str:
    parts: list[list[int]] = []
    for i in indices:
        if parts and parts[-1][1] == i - 1:
            parts[-1][1] = i
        else:
            parts.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def describe_blocks(model: TransformerConfig) -> str:
    """Which FFN blocks the row compresses, e.g. ``enc 0-1, dec 0-1 of 3+3``."""
    size = f"{model.enc_layers}+{model.dec_layers}"
    enc, dec = resolve_blocks(model.ffn.blocks, model.enc_layers, model.dec_layers)
    if model.ffn.method == "dense" or not (enc or dec):
        return f"none of {size}"
    if len(enc) == model.enc_layers and len(dec) == model.dec_layers:
        return f"all {size}"
    parts = [f"enc {_ranges(enc)}" if enc else "", f"dec {_ranges(dec)}" if dec else ""]
    return ", ".join(p for p in parts if p) + f" of {size}"


def describe_method(row: Row) -> str:
    """The row's compression in a few words, e.g. ``TT r=1-2-2-2-2-1 + attn svd rank=64``."""
    options = row.ffn.options

    def opts(values: Mapping[str, Any]) -> str:
        return " ".join(
            f"{k}={'-'.join(map(str, v)) if isinstance(v, list | tuple) else v}" for k, v in sorted(values.items())
        )

    text = "dense" if row.ffn.method == "dense" else f"{row.ffn.method} {opts(options)}".strip()
    if row.half_layers:
        text += ", half the layers"
    if row.attention is not None:
        text += f" + attn {row.attention.method} {opts(row.attention.options)}"
    if row.embed_rank:
        text += f" + emb rank={row.embed_rank}"
    return text


def _attention_params(model: Transformer) -> int:
    layers = [*model.encoder, *model.decoder]
    return sum(
        stored_params(getattr(layer, name))
        for layer in layers
        for name in ("self_attn", "cross_attn")
        if hasattr(layer, name)
    )


def _reference_params(base: TransformerConfig, vocab_size: int) -> dict[str, int]:
    """Parameters of the dense ``original`` model with the trained vocabulary."""
    with torch.device("meta"):
        dense = Transformer(base.replace(vocab_size=vocab_size, ffn=FFNSpec()))
    return parameter_report(dense)


def _uses_tokenized_refs(study: StudyConfig) -> bool:
    """IWSLT'14 in fairseq's prepared layout: hypotheses and references are already tokenised, lowercased text."""
    if study.dataset != "iwslt14":
        return False
    from ..data.parallel import _iwslt_layout  # the loader's own layout detection

    return _iwslt_layout(Path(study.data_dir))[0] == "fairseq"


def _load_row_model(row: Row, state: dict[str, Any], device: torch.device | str = "cpu") -> Transformer:
    model = Transformer(TransformerConfig.from_dict(state["model_config"]))
    prepare = row_prepare(row)
    if prepare is not None:
        prepare(model)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def load_row_model(study: StudyConfig, row: str, checkpoint: str | Path | None = None) -> tuple[Transformer, Tokenizer]:
    """Rebuild a row's trained model (in eval mode) and tokenizer from its checkpoint (default: its best).

    Rows that compress attention projections or embeddings need this (``translate eval`` rebuilds a checkpoint from
    its model config alone, which describes only the FFN blocks).

    Raises:
        ValueError: for a row the study does not have.
        FileNotFoundError: if the checkpoint does not exist.
    """
    rows = rows_for(study.dataset, study.base_model)
    if row not in rows:
        raise ValueError(f"unknown row {row!r} for {study.dataset}; choose from {', '.join(rows)}")
    path = Path(checkpoint) if checkpoint else Path(study.out) / "rows" / _slug(row) / "checkpoint_best.pt"
    state = load_checkpoint(path)
    return _load_row_model(rows[row], state), Tokenizer(state["tokenizer"])


def _score_row(
    plan: _Plan, study: StudyConfig, test: ParallelCorpus, tokenized_refs: bool, device: torch.device
) -> RowResult:
    """Decode the test set with the row's best checkpoint; sizes, ratios, BLEU and timings."""
    folder = plan.folder
    summary = json.loads((folder / "summary.json").read_text())
    checkpoint = folder / "checkpoint_best.pt"
    state = load_checkpoint(checkpoint)
    model = _load_row_model(plan.row, state, device)
    tokenizer = Tokenizer(state["tokenizer"])
    beam = study.beam or study.resolved_budget.beam
    hyps, seconds = translate(model, tokenizer, test.src, beam=beam, device=device)
    (folder / "test.hyp").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    bleu, signature = sacre_bleu(hyps, test.tgt)
    tok_bleu, tok_signature = tokenized_bleu(hyps, test.tgt, pretokenized=tokenized_refs)
    report = parameter_report(model)
    reference = _reference_params(study.base_model, model.config.vocab_size)
    return RowResult(
        name=plan.row.name,
        method=describe_method(plan.row),
        blocks=describe_blocks(plan.model),
        route=plan.row.route,
        note=plan.row.note,
        bleu=bleu,
        bleu_seed=tok_bleu / 100.0 if tokenized_refs else seed_bleu(hyps, test.tgt),
        bleu_tok_lc=tok_bleu,
        params=report["total"],
        params_ffn=report["ffn"],
        params_attention=_attention_params(model),
        params_embeddings=report["embeddings"],
        ratio=reference["total"] / max(report["total"], 1),
        ratio_ffn=reference["ffn"] / max(report["ffn"], 1),
        train_seconds=summary["train_seconds"],
        steps=summary["steps"],
        epochs=summary["epochs"],
        best_valid_bleu=summary["best_valid_bleu"],
        infer_seconds=seconds,
        sentences=len(test),
        sentences_per_s=len(test) / max(seconds, 1e-9),
        beam=beam,
        bleu_signature=signature,
        bleu_tok_lc_signature=tok_signature,
        run_dir=str(folder),
        checkpoint=str(checkpoint),
        row=plan.row.to_dict(),
        model=state["model_config"],
        train=plan.train.to_dict(),
    )


def _check_same_run(plan: _Plan, saved: Mapping[str, Any], path: Path) -> None:
    """A row's folder is reused (skipped or resumed) only when it holds what this invocation would run."""
    what, hint = f"{path} was run with a different", f"; delete {path.parent} to rerun it, or choose another --out"
    check_same_config(saved["model"], plan.model.to_dict(), f"{what} model config{hint}", ignore=("vocab_size",))
    check_same_config(saved["train"], plan.train.to_dict(), f"{what} training config{hint}", ignore=RESUMABLE_KEYS)


def _copy_result(source: RowResult, plan: _Plan) -> RowResult:
    """The result of a row that trains exactly what ``source`` trained (kept current with the source's result)."""
    result = RowResult.from_dict(source.to_dict())
    result.name, result.note, result.same_as = plan.row.name, plan.row.note, source.name
    result.method, result.row = describe_method(plan.row), plan.row.to_dict()
    return result


def _log(message: str) -> None:
    print(f"[study] {message}", flush=True)


def _run_row(
    plan: _Plan,
    results: Mapping[str, RowResult],
    study: StudyConfig,
    test: ParallelCorpus,
    tokenized_refs: bool,
    device: torch.device,
) -> RowResult:
    """Copy a duplicate's source, skip a finished row, or train (resuming if interrupted) and score the row."""
    folder = plan.folder
    result_path = folder / "result.json"
    name = plan.row.name
    if plan.same_as is not None:
        _log(f"{name}: same model and training as {plan.same_as}; its result is reused")
        result = _copy_result(results[plan.same_as], plan)
    elif result_path.exists():
        stored = json.loads(result_path.read_text())
        _check_same_run(plan, stored, result_path)
        _log(f"{name}: finished earlier, skipped ({result_path})")
        return RowResult.from_dict(stored)
    else:
        if not (folder / "summary.json").exists():
            if (folder / "config.json").exists():  # written before the first checkpoint: a clear message now
                _check_same_run(plan, json.loads((folder / "config.json").read_text()), folder / "config.json")
            resume = (folder / "checkpoint_last.pt").exists()
            _log(f"{name}: {'resuming' if resume else 'training'} in {folder}")
            train(plan.model, plan.train, resume=resume, prepare=row_prepare(plan.row))
        _log(f"{name}: decoding the test set ({len(test)} sentences)")
        result = _score_row(plan, study, test, tokenized_refs, device)
    result.seed = _seed_reference(study.dataset, name)
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    return result


def _seed_reference(dataset: str, name: str) -> dict[str, Any] | None:
    point = SEED_POINTS["iwslt14" if dataset == "iwslt14" else "multi30k"].get(name)
    return None if point is None else asdict(point)


def run_study(study: StudyConfig, argv: Sequence[str] = ()) -> list[RowResult]:
    """Run (or skip, or resume) the requested rows; write ``table.md``, ``results.json``, ``bleu_vs_ratio.png``.

    Returns:
        The table's rows: every row of the dataset with a result in ``study.out``, in table order.

    Raises:
        ValueError: for a study folder of another dataset or budget, a row folder of another configuration.
        FileNotFoundError: when the dataset's train, valid or test files are missing (before any training).
    """
    out = Path(study.out)
    marker = out / "study.json"
    identity = {"dataset": study.dataset, "budget": study.budget}
    if marker.exists():
        saved = json.loads(marker.read_text())
        if {k: saved.get(k) for k in identity} != identity:
            raise ValueError(
                f"{out} holds a {saved.get('dataset')} study at budget {saved.get('budget')!r}, not "
                f"{study.dataset} at {study.budget!r}; choose another --out"
            )
    plans = _plan(study, out.resolve())  # absolute paths: a conversion row's init_from must not depend on the cwd
    to_run = _to_run(study, plans)
    # Every split is read before any training, so missing data (e.g. IWSLT'14's training text) fails first.
    for split in ("train", "valid"):
        load_dataset(study.dataset, study.data_dir, split)
    test = load_dataset(study.dataset, study.data_dir, "test")
    tokenized_refs = _uses_tokenized_refs(study)
    device = resolve_device(study.device)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(identity, indent=1) + "\n")

    start = time.perf_counter()
    results: dict[str, RowResult] = {}
    for name in to_run:
        results[name] = _run_row(plans[name], results, study, test, tokenized_refs, device)
    table: list[RowResult] = []
    for name, plan in plans.items():  # rows finished by earlier invocations belong to the table too
        if name not in results and (plan.folder / "result.json").exists():
            stored = RowResult.from_dict(json.loads((plan.folder / "result.json").read_text()))
            results[name] = _copy_result(results[plan.same_as], plan) if plan.same_as in results else stored
        if name in results:
            table.append(results[name])
    write_outputs(table, study, plans, argv, time.perf_counter() - start)
    return table


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(rows: Sequence[RowResult], dataset: str) -> str:
    """The Markdown table: our measurements, then the seed's figures for the same row (labelled as the seed's)."""
    iwslt = dataset == "iwslt14"
    head = ["row", "compression", "FFN blocks compressed", "route", "BLEU", "BLEU seed-style (0-1)"]
    head += ["BLEU tok lc"] if iwslt else []
    head += ["params", "ratio", "ratio FFN", "train s", "steps", "test decode s", "sent/s"]
    head += ["seed BLEU", "seed time"] if iwslt else ["seed BLEU", "seed ratio", "seed time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|"]
    for r in rows:
        seed = r.seed or {}
        name = r.name if r.same_as is None else f"{r.name} (= {r.same_as})"
        cells = [name, r.method, r.blocks, r.route, f"{r.bleu:.2f}", f"{r.bleu_seed:.3f}"]
        cells += [f"{r.bleu_tok_lc:.2f}"] if iwslt else []
        cells += [
            f"{r.params:,}",
            f"{r.ratio:.3f}",
            f"{r.ratio_ffn:.2f}",
            f"{r.train_seconds:.1f}",
            str(r.steps),
            f"{r.infer_seconds:.2f}",
            f"{r.sentences_per_s:.1f}",
            _fmt(seed.get("bleu"), 3),
        ]
        cells += [] if iwslt else [_fmt(seed.get("ratio"), 3)]
        cells += [_fmt(seed.get("time"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _table_notes(rows: Sequence[RowResult], study: StudyConfig) -> str:
    budget = study.resolved_budget
    base = study.base_model
    notes = [
        f"* Model: the `{budget.preset}` preset ({base.d_model} wide, {base.enc_layers}+{base.dec_layers} layers, "
        f"d_ff {base.d_ff}); every row is its own training run (random seed {study.seed}), scored with its "
        f"best-validation checkpoint on the test set ({rows[0].sentences if rows else 0} sentences, beam "
        f"{study.beam or budget.beam}).",
        "* `ratio`: parameters of the dense `original` / the row's (whole model; `ratio FFN`: FFN blocks only). "
        "Parameters count stored factors, non-zeros and biases; the shared embedding table once.",
        "* `BLEU` is sacreBLEU (cased, detokenised); `BLEU seed-style` is lowercased tokenised BLEU on the seed's 0-1 "
        "scale. `train s` is wall-clock training time including periodic validation; `test decode s` decodes the "
        "whole test set (wall clock on a possibly busy machine).",
        "* Fraction rows compress the lowest `round(f * L)` FFN blocks of each stack (Python's round: halves go to "
        "even); a row that resolves to the same model as an earlier one shows that row's run, marked `(= row)`.",
        "* `seed ...` columns are the seed's figures (slides), not ours; the seed's time unit is not stated.",
    ]
    return "\n".join(notes)


def write_outputs(
    rows: Sequence[RowResult], study: StudyConfig, plans: Mapping[str, _Plan], argv: Sequence[str], seconds: float
) -> None:
    """Write ``table.md``, ``results.json`` and ``bleu_vs_ratio.png`` into ``study.out``."""
    out = Path(study.out)
    command = shlex.join(["compressed-transformer", *argv]) if argv else ""
    title = {"multi30k": "Multi30k de→en (test_2016_flickr)", "iwslt14": "IWSLT'14 de→en", "plain": "plain corpus"}
    text = f"# Translation study: {title[study.dataset]}, budget `{study.budget}`\n\n"
    text += (f"Command: `{command}`\n\n" if command else "") + f"Git revision: {git_revision() or 'unknown'}\n\n"
    text += format_table(rows, study.dataset) + "\n\n" + _table_notes(rows, study) + "\n"
    (out / "table.md").write_text(text, encoding="utf-8")
    seed_key = "iwslt14" if study.dataset == "iwslt14" else "multi30k"
    payload = {
        "dataset": study.dataset,
        "budget": study.budget,
        "rows": [r.to_dict() for r in rows],
        "seed": {
            "source": "the seed's slides (Khakhulin et al., 'Compressed Transformer'); BLEU on a 0-1 scale",
            "rows": {name: asdict(point) for name, point in SEED_POINTS[seed_key].items()},
        },
        "config": study.to_dict(),
        "base_model": study.base_model.to_dict(),
        "row_definitions": {name: plan.row.to_dict() | {"same_as": plan.same_as} for name, plan in plans.items()},
        "command": list(argv),
        "git_revision": git_revision(),
        "seconds": seconds,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
    }
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    plot_bleu_vs_ratio(rows, study.dataset, out / "bleu_vs_ratio.png")


def plot_bleu_vs_ratio(rows: Sequence[RowResult], dataset: str, path: Path) -> None:
    """Seed-style BLEU (0-1) against the whole-model compression ratio (log x), with the seed's points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(8, 5.5))
    aliases: dict[str, list[str]] = {}
    for r in rows:
        if r.same_as is not None:  # the same point as its source row: one marker, both names
            aliases.setdefault(r.same_as, []).append(r.name)
    for r in rows:
        if r.same_as is not None:
            continue
        marker = "s" if r.route == "convert" else "o"
        label = " = ".join([r.name, *aliases.get(r.name, [])])
        ax.scatter(r.ratio, r.bleu_seed, s=50, marker=marker, color="tab:blue", zorder=3)
        ax.annotate(label, (r.ratio, r.bleu_seed), textcoords="offset points", xytext=(5, 4), fontsize=8)
    seed_key = "iwslt14" if dataset == "iwslt14" else "multi30k"
    first = True
    for name, point in SEED_POINTS[seed_key].items():
        label = "seed (slides)" if first else None
        first = False
        if point.ratio is None:  # the IWSLT'14 slide gives no ratios: draw its BLEU as a level
            ax.axhline(point.bleu, color="dimgray", ls=":", lw=0.8, label=label)
            ax.annotate(
                f"seed {name}",
                (1.0, point.bleu),
                fontsize=7,
                color="dimgray",
                xytext=(2, 2),
                textcoords="offset points",
            )
            continue
        ax.scatter(point.ratio, point.bleu, marker="x", s=50, color="black", zorder=4, label=label)
        ax.annotate(
            f"seed {name}",
            (point.ratio, point.bleu),
            textcoords="offset points",
            xytext=(5, -10),
            fontsize=7,
            color="dimgray",
        )
    ax.scatter([], [], marker="o", color="tab:blue", label="ours, from scratch")
    ax.scatter([], [], marker="s", color="tab:blue", label="ours, converted from the original")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("compression ratio (whole model, parameters)")
    ax.set_ylabel("BLEU, lowercased tokenised, 0-1 (seed's scale)")
    ax.set_title(f"{dataset}: BLEU vs compression")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _default_data_dir(dataset: str) -> str:
    from ..data.mnist import DATA_ENV_VAR

    root = os.environ.get(DATA_ENV_VAR)
    return str(Path(root) / dataset) if root else f"data/{dataset}"


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    """The study config of parsed arguments.

    Raises:
        ValueError: for unknown rows or budgets, or a ``plain`` study without ``--data-dir``.
    """
    if args.dataset == "plain" and not args.data_dir:
        raise ValueError("a 'plain' study needs --data-dir (a folder of train/valid/test.{de,en} files)")
    rows = () if args.rows in (None, "", "all") else tuple(dict.fromkeys(r.strip() for r in args.rows.split(",")))
    return StudyConfig(
        dataset=args.dataset,
        out=args.out,
        data_dir=args.data_dir or _default_data_dir(args.dataset),
        budget=args.budget,
        rows=tuple(r for r in rows if r),
        device=args.device,
        max_minutes=args.max_minutes,
        fine_tune_minutes=args.fine_tune_minutes,
        beam=args.beam,
        seed=args.seed,
        progress=not args.no_progress,
    )


def main(args: argparse.Namespace) -> int:
    study = config_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run_study(study, sys.argv[1:])
    print(format_table(rows, study.dataset))
    print(f"\noutputs in {study.out}/ (table.md, results.json, bleu_vs_ratio.png)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``study`` subcommand (the seed's translation tables)."""
    parser = subparsers.add_parser(
        "study",
        help="run the seed's translation table (Multi30k or IWSLT'14): one training run per row, then "
        "table.md / results.json / bleu_vs_ratio.png",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("dataset", choices=DATASETS, help="multi30k, iwslt14, or plain (Multi30k's rows, any corpus)")
    parser.add_argument(
        "--rows",
        help="comma-separated rows (default all). multi30k/plain: "
        + ", ".join(ROW_NAMES["multi30k"])
        + "; iwslt14: "
        + ", ".join(ROW_NAMES["iwslt14"]),
    )
    parser.add_argument(
        "--budget",
        choices=tuple(BUDGETS),
        default="small",
        help="full: the seed's sizes (GPU); small: the small preset, minutes-bounded rows (CPU); tiny: tests",
    )
    parser.add_argument("--out", required=True, help="study folder (rows/<row>/ run folders, table, results, plot)")
    parser.add_argument(
        "--data-dir", help="the dataset's folder (default $COMPRESSED_TRANSFORMER_DATA/<dataset>, else data/<dataset>)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--max-minutes", type=float, help="bound of each training run (default: the budget's)")
    parser.add_argument("--fine-tune-minutes", type=float, help="bound of each fine-tuning run (default: the budget's)")
    parser.add_argument("--beam", type=int, help="test-set beam (default: the budget's)")
    parser.add_argument("--seed", type=int, default=1, help="seed of every row")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (1 is fastest on a busy CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.set_defaults(func=main)
