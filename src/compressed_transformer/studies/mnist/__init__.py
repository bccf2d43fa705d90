"""The MNIST study: train the seed's 784-256-10 network, compress it with every method, compare with the seed.

``compressed-transformer mnist --data-dir DIR --out runs/mnist`` trains the original network, builds one row per
method (``original, prune, prune+ft, svd, svd+ft, svd-o, tucker, tucker+ft, tt, tt+ft, tt-scratch``) and writes
``table.md``, ``results.json`` and ``pareto.png`` (test accuracy against compression ratio, the seed's points drawn
for comparison; ``--sweep`` adds each method's curve over ranks / sparsities).

Accounting, as the seed counts it: compression ratio = parameters of the whole dense network (weights and biases,
203,530 for 784-256-10) / parameters stored by the compressed one (factor entries for TT / Tucker / SVD, nonzero
weights for pruning and Sparse VD, biases in full). Ratios are compared with the seed's at its precision (two
decimals). The bytes ratio counts CSR indices of sparse layers too (see :mod:`compressed_transformer.size`); the
file ratio is measured on the files :func:`~compressed_transformer.serialization.save_compressed` writes.
"""

from __future__ import annotations

# The names the package had as a single module, re-exported from where they now live (config <- compression,
# training <- report <- study <- cli). Tests also reach stored_params and MLPConfig through here.
from ...models.mlp import MLPConfig as MLPConfig
from ...size import stored_params as stored_params
from .cli import config_from_args as config_from_args
from .cli import main as main
from .cli import register
from .compression import build_tt_scratch as build_tt_scratch
from .compression import compress_row as compress_row
from .compression import reaches as reaches
from .compression import whitened_low_rank as whitened_low_rank
from .compression import whole_network_budget
from .config import (
    DISTILL_MODES,
    RECIPES,
    ROWS,
    SEED_ANSWERS,
    SEED_TABLE,
    FineTuneConfig,
    MNISTStudyConfig,
    RowRecipe,
    RowResult,
    SparseVDConfig,
    StudyResult,
    TrainConfig,
)
from .config import FC2_TT_MODES as FC2_TT_MODES
from .config import PIXEL_MEAN as PIXEL_MEAN
from .config import PIXEL_STD as PIXEL_STD
from .config import SEED_TT as SEED_TT
from .config import STRETCH_DROP as STRETCH_DROP
from .config import STRETCH_SPARSE_VD_RATIO as STRETCH_SPARSE_VD_RATIO
from .config import SWEEP_RATIOS as SWEEP_RATIOS
from .config import SWEEP_SPARSE_VD_THRESHOLDS as SWEEP_SPARSE_VD_THRESHOLDS
from .config import SeedPoint as SeedPoint
from .config import asdict_shallow as asdict_shallow
from .report import format_table as format_table
from .report import plot_pareto as plot_pareto
from .report import print_summary as print_summary
from .report import write_outputs as write_outputs
from .study import load_original as load_original
from .study import run_study
from .study import save_original as save_original
from .training import Tensors as Tensors
from .training import accuracy as accuracy
from .training import distillation_loss as distillation_loss
from .training import fit as fit
from .training import random_shift as random_shift
from .training import to_tensors as to_tensors

__all__ = [
    "DISTILL_MODES",
    "RECIPES",
    "ROWS",
    "SEED_ANSWERS",
    "SEED_TABLE",
    "FineTuneConfig",
    "MNISTStudyConfig",
    "RowRecipe",
    "RowResult",
    "SparseVDConfig",
    "StudyResult",
    "TrainConfig",
    "register",
    "run_study",
    "whole_network_budget",
]
