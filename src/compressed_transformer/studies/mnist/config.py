"""The MNIST study's settings, the seed's figures, the row recipes and the result records."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...models.mlp import MLPConfig

# Normalisation of the pixels (mean and std of the MNIST training images in [0, 1]).
PIXEL_MEAN, PIXEL_STD = 0.1307, 0.3081


@dataclass(frozen=True)
class SeedPoint:
    """One row of the seed's table (slides, "Results on MNIST")."""

    label: str
    accuracy: float
    ratio: float


SEED_TABLE: dict[str, SeedPoint] = {
    "original": SeedPoint("Original Model", 0.9770, 1.00),
    "prune": SeedPoint("Magnitude Pruning", 0.9546, 8.15),
    "svd": SeedPoint("SVD", 0.9669, 7.54),
    "svd+ft": SeedPoint("SVD + fine tuning", 0.9641, 12.68),
    "svd-o": SeedPoint("Variational Dropout", 0.9841, 23.39),
    "tucker": SeedPoint("Tucker", 0.9247, 28.82),
    "tt": SeedPoint("Tensor Train", 0.9643, 56.95),
    "tt+ft": SeedPoint("Tensor Train + fine tuning", 0.9620, 72.02),
}

# Which of our rows may answer each seed row (the seed's TT row was trained from scratch).
SEED_ANSWERS: dict[str, tuple[str, ...]] = {
    "original": ("original",),
    "prune": ("prune", "prune+ft"),
    "svd": ("svd",),
    "svd+ft": ("svd+ft",),
    "svd-o": ("svd-o",),
    "tucker": ("tucker", "tucker+ft"),
    "tt": ("tt", "tt-scratch"),
    "tt+ft": ("tt+ft",),
}

# Stretch goals of the study: every compressed row within this many accuracy points of the original at the seed's
# ratio or better, and Sparse VD at this ratio or more (Molchanov et al. report 68x on LeNet-300-100).
STRETCH_DROP = 0.005
STRETCH_SPARSE_VD_RATIO = 60.0


@dataclass(frozen=True)
class RowRecipe:
    """How one row of the table is built.

    Attributes:
        method: ``"dense"``, ``"prune"``, ``"svd"``, ``"tucker"``, ``"tt"`` or ``"svd-o"`` (Sparse VD).
        layers: the layers compressed (``"fc1"``, ``"fc2"``); the others stay dense.
        ratio: target compression ratio of the whole network (``None`` for rows whose size is not chosen:
            the original, Sparse VD, and the seed's fixed TT configuration).
        fine_tune: train the compressed network after compression (optionally distilling the original).
        scratch: train the compressed network from a random initialisation instead of compressing the original.
    """

    method: str
    layers: tuple[str, ...]
    ratio: float | None
    fine_tune: bool = False
    scratch: bool = False


RECIPES: dict[str, RowRecipe] = {
    "original": RowRecipe("dense", (), None),
    "prune": RowRecipe("prune", ("fc1", "fc2"), SEED_TABLE["prune"].ratio),
    "prune+ft": RowRecipe("prune", ("fc1", "fc2"), SEED_TABLE["prune"].ratio, fine_tune=True),
    "svd": RowRecipe("svd", ("fc1",), SEED_TABLE["svd"].ratio),
    "svd+ft": RowRecipe("svd", ("fc1",), SEED_TABLE["svd+ft"].ratio, fine_tune=True),
    "svd-o": RowRecipe("svd-o", ("fc1", "fc2"), None),
    "tucker": RowRecipe("tucker", ("fc1",), SEED_TABLE["tucker"].ratio),
    "tucker+ft": RowRecipe("tucker", ("fc1",), SEED_TABLE["tucker"].ratio, fine_tune=True),
    "tt": RowRecipe("tt", ("fc1", "fc2"), SEED_TABLE["tt"].ratio),
    "tt+ft": RowRecipe("tt", ("fc1", "fc2"), SEED_TABLE["tt+ft"].ratio, fine_tune=True),
    "tt-scratch": RowRecipe("tt", ("fc1",), None, scratch=True),
}
ROWS: tuple[str, ...] = tuple(RECIPES)
DISTILL_MODES = ("off", "on", "both")

# Whole-network ratios traced by --sweep for each method (the +ft rows follow the same grid).
SWEEP_RATIOS: dict[str, tuple[float, ...]] = {
    "prune": (2, 4, 8, 16, 32, 64),
    "svd": (2, 4, 8, 16, 32),
    "tucker": (4, 8, 16, 32, 64),
    "tt": (8, 16, 32, 64, 128),
}
# Sparse VD is swept over the log-alpha threshold of its trained model (no retraining).
SWEEP_SPARSE_VD_THRESHOLDS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)

# The seed's TT layer (trained from scratch): 784 = 7*4*7*4 -> 256 = 2*8*8*2, ranks [1, 2, 4, 2, 1], 748 weights.
SEED_TT = {"in_modes": (7, 4, 7, 4), "out_modes": (2, 8, 8, 2), "ranks": (1, 2, 4, 2, 1)}
# fc2 (256 -> 10) as a two-core TT-matrix, 256 = 16*16 -> 10 = 2*5; its rank is MNISTStudyConfig.tt_fc2_rank.
FC2_TT_MODES = {"in_modes": (16, 16), "out_modes": (2, 5)}


@dataclass(frozen=True)
class TrainConfig:
    """One training phase: Adam with a cosine learning-rate decay to zero.

    Attributes:
        epochs: passes over the training set.
        lr: peak learning rate.
        batch_size: examples per step.
        shift: augmentation: translate each training image by up to this many pixels per axis (0: none).
    """

    epochs: int
    lr: float
    batch_size: int = 128
    shift: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"epochs must be an int >= 0, got {self.epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if not isinstance(self.shift, int) or not 0 <= self.shift <= 14:
            raise ValueError(f"shift must be an int in [0, 14] pixels, got {self.shift!r}")


@dataclass(frozen=True)
class FineTuneConfig:
    """Fine-tuning of each compression method (the ``+ft`` rows)."""

    prune: TrainConfig = TrainConfig(epochs=5, lr=1e-3, shift=1)
    svd: TrainConfig = TrainConfig(epochs=8, lr=1e-3, shift=1)
    tucker: TrainConfig = TrainConfig(epochs=12, lr=2e-3, shift=1)
    tt: TrainConfig = TrainConfig(epochs=15, lr=3e-3)

    def for_method(self, method: str) -> TrainConfig:
        return getattr(self, method)


@dataclass(frozen=True)
class SparseVDConfig:
    """Sparse Variational Dropout (Molchanov et al. 2017) started from the trained original network.

    The loss is the negative ELBO per example, ``mean CE + kl_weight * KL / N`` (the paper's ``N * mean CE +
    KL`` divided by the training-set size ``N``), with ``kl_weight`` rising linearly from 0 to 1 over
    ``warmup_epochs``.

    Attributes:
        train: epochs, learning rate and batch size.
        warmup_epochs: epochs over which the KL weight goes from 0 to 1.
        threshold: ``log alpha`` above which a weight is dropped (3 in the paper).
        log_sigma2_init: initial ``log sigma^2`` of every weight.
    """

    train: TrainConfig = TrainConfig(epochs=120, lr=2e-3, batch_size=2048, shift=1)
    warmup_epochs: float = 5.0
    threshold: float = 3.0
    log_sigma2_init: float = -10.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise ValueError(f"Sparse VD warm-up must be a finite number of epochs >= 0, got {self.warmup_epochs}")
        if not (math.isfinite(self.threshold) and math.isfinite(self.log_sigma2_init)):
            raise ValueError(
                f"Sparse VD threshold and log_sigma2_init must be finite, got {self.threshold}, {self.log_sigma2_init}"
            )


def asdict_shallow(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


@dataclass(frozen=True)
class MNISTStudyConfig:
    """Everything the study does; written, resolved, into ``results.json``.

    Attributes:
        out: output folder.
        data_dir: folder holding the four IDX ``.gz`` files (``None``: ``$COMPRESSED_TRANSFORMER_DATA/mnist``,
            else ``data/mnist``).
        download: fetch missing files from the public mirrors.
        verify: check the files' checksums.
        seed: seeds every row's initialisation, shuffling and noise.
        hidden: hidden width of the network.
        rows: the rows to build (``original`` is always built: every other row starts from it).
        ratios: per-row overrides of the target whole-network ratio, ``((row, ratio), ...)``.
        original: training of the original network.
        original_checkpoint: load the original network from this ``original.pt`` (written by every run) instead
            of training it.
        finetune: fine-tuning per method.
        scratch: training of ``tt-scratch``.
        sparse_vd: the ``svd-o`` row.
        tt_fc2_rank: TT-rank of ``fc2`` in the ``tt`` rows (``fc1`` takes the rest of the budget).
        svd_whiten: the ``svd`` rows truncate the SVD of ``fc1`` in the metric of its training inputs
            (:func:`whitened_low_rank`, data-aware) rather than the plain Frobenius one.
        distill: knowledge distillation from the original in the ``+ft`` rows: ``"off"``, ``"on"``, or ``"both"``
            (``+ft`` rows without it plus ``<row>+kd`` rows with it).
        kd_alpha: weight of the distillation term (``1 - kd_alpha`` on the labels).
        kd_temperature: softmax temperature of the distillation term.
        sweep: also trace each method's accuracy-ratio curve.
        train_limit: use only the first N training images (``None``: all 60,000).
        test_limit: use only the first N test images (``None``: all 10,000).
        threads: ``torch.set_num_threads``; 0 keeps PyTorch's default (every core). One thread is the default
            because on a small shared machine a multi-threaded run slows down by an order of magnitude as soon as
            another process competes for the cores, while a single-threaded one barely notices.
        progress: show tqdm progress bars.
    """

    out: str = "runs/mnist"
    data_dir: str | None = None
    download: bool = True
    verify: bool = True
    seed: int = 0
    hidden: int = 256
    rows: tuple[str, ...] = ROWS
    ratios: tuple[tuple[str, float], ...] = ()
    original: TrainConfig = TrainConfig(epochs=20, lr=2e-3, shift=2)
    original_checkpoint: str | None = None
    finetune: FineTuneConfig = field(default_factory=FineTuneConfig)
    scratch: TrainConfig = TrainConfig(epochs=20, lr=3e-3)
    sparse_vd: SparseVDConfig = field(default_factory=SparseVDConfig)
    tt_fc2_rank: int = 3
    svd_whiten: bool = True
    distill: str = "on"
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    sweep: bool = False
    train_limit: int | None = None
    test_limit: int | None = None
    threads: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = [row for row in self.rows if row not in RECIPES]
        if unknown:
            raise ValueError(f"unknown row(s) {unknown}; choose from {list(ROWS)}")
        if not self.rows:
            raise ValueError(f"rows must name at least one row of {list(ROWS)}")
        for row, ratio in self.ratios:
            if row not in RECIPES:
                raise ValueError(f"--ratio names unknown row {row!r}; choose from {list(ROWS)}")
            if RECIPES[row].ratio is None:
                fixed = [name for name, recipe in RECIPES.items() if recipe.ratio is None]
                raise ValueError(f"row {row!r} has no target ratio to change (rows without one: {fixed})")
            if row not in self.rows:  # a typo in --rows or --ratio would otherwise go unnoticed
                raise ValueError(f"--ratio names row {row!r}, which is not among the rows built ({list(self.rows)})")
            if not (math.isfinite(ratio) and ratio >= 1.0):
                raise ValueError(f"the ratio of row {row!r} must be a finite number >= 1, got {ratio}")
        if self.distill not in DISTILL_MODES:
            raise ValueError(f"distill must be one of {DISTILL_MODES}, got {self.distill!r}")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ValueError(f"kd_alpha must be in [0, 1], got {self.kd_alpha}")
        if not self.kd_temperature > 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        if self.tt_fc2_rank < 1:
            raise ValueError(f"tt_fc2_rank must be >= 1, got {self.tt_fc2_rank}")
        for name in ("train_limit", "test_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or omitted), got {value}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: PyTorch's default), got {self.threads}")
        MLPConfig(hidden=self.hidden)  # validates the width

    @property
    def model(self) -> MLPConfig:
        return MLPConfig(hidden=self.hidden)

    def target_ratio(self, row: str) -> float | None:
        """The whole-network ratio row ``row`` is compressed to (its recipe's, unless overridden)."""
        return dict(self.ratios).get(row, RECIPES[row].ratio)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RowResult:
    """One point of the study: a row of the table or a point of a sweep."""

    method: str
    accuracy: float
    ratio: float
    params: int
    bytes: int
    bytes_ratio: float
    file_bytes: int  # measured: the save_compressed file of the row's model (Sparse VD in its eval form)
    file_ratio: float
    seconds: float
    compression: str
    layers: list[str]
    target_ratio: float | None = None
    fine_tuned: bool = False
    distilled: bool = False
    from_scratch: bool = False
    layer_options: dict[str, Any] = field(default_factory=dict)
    rel_error: dict[str, float] = field(default_factory=dict)
    sweep: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StudyResult:
    """The rows, the sweep points and the comparison with the seed."""

    rows: list[RowResult]
    sweep: list[RowResult]
    seed_matches: dict[str, dict[str, Any]]
    stretch: dict[str, Any]
    seconds: float
    out: Path


def _seed_point_of(name: str) -> SeedPoint | None:
    """The seed row that row ``name`` answers (``None`` for rows that answer none)."""
    base = name.removesuffix("+kd")
    for seed_row, answers in SEED_ANSWERS.items():
        if base in answers:
            return SEED_TABLE[seed_row]
    return None


def _seed_ratio_of(name: str) -> float:
    point = _seed_point_of(name)
    return point.ratio if point is not None else 1.0
