"""The translation study: the seed's Multi30k and IWSLT'14 tables, one training run per row.

``compressed-transformer study multi30k|iwslt14|plain --out DIR [--rows ...] [--budget small|full|tiny]
[--data-dir ...]`` trains every row with :func:`~compressed_transformer.train.trainer.train` in its own run folder
``DIR/rows/<row>/``, scores the row's best checkpoint (best validation BLEU) on the test set, and writes
``DIR/table.md``, ``DIR/results.json`` and ``DIR/bleu_vs_ratio.png`` (seed-comparable BLEU against the total
compression ratio, log x, the seed's points drawn for comparison).

* A row whose ``result.json`` exists is skipped (after checking that it was run with the same configuration); a
  row interrupted during training resumes from its ``checkpoint_last.pt`` (the trainer's ``resume``); a finished row
  whose bound was raised since (``max_minutes`` / ``max_steps``) continues from it and is scored again.
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

from ...layers import LowRankEmbedding
from ...models.transformer import ATTENTION_PROJECTIONS
from .budgets import BUDGETS, Budget, Schedule, StudyConfig
from .budgets import _budget as _budget
from .cli import config_from_args as config_from_args
from .cli import main as main
from .cli import register
from .compression import factorize_embeddings_, row_prepare
from .report import format_table, plot_bleu_vs_ratio, write_outputs
from .rows import (
    DATASETS,
    ROW_NAMES,
    SEED_POINTS,
    SEED_TT_RANKS,
    AttentionCompression,
    Row,
    SeedPoint,
    rows_for,
)
from .rows import SEED_TUCKER_RANKS as SEED_TUCKER_RANKS
from .seeds import format_merged_table, merge_studies, write_merged
from .study import (
    RowResult,
    describe_blocks,
    describe_method,
    load_row_model,
    row_model_config,
    row_train_config,
    run_study,
)
from .study import _identity as _identity
from .study import _Plan as _Plan
from .study import _plan as _plan
from .study import _to_run as _to_run

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
    "format_merged_table",
    "format_table",
    "load_row_model",
    "merge_studies",
    "plot_bleu_vs_ratio",
    "register",
    "row_model_config",
    "row_prepare",
    "row_train_config",
    "rows_for",
    "run_study",
    "write_merged",
    "write_outputs",
]
