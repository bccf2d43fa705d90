"""The translation study's budgets (model size, schedules, decoding) and its :class:`StudyConfig`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ...models.transformer import TransformerConfig, preset
from .rows import DATASETS, ROW_NAMES

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
    # This 2-core CPU: the `small` preset, every row bounded in minutes (Multi30k: 12 x 20 + 4 x 8 min + decoding).
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
        precision: of training (see :class:`~compressed_transformer.train.trainer.TrainConfig`).
        max_minutes / fine_tune_minutes: override the budget's per-row bound of from-scratch / fine-tuning runs.
        max_steps: override the budget's step bound of from-scratch runs (0: none). Raising a bound continues the
            rows that finished under the lower one.
        beam: override the budget's test-set beam.
        seed: seeds every row.
        progress: tqdm bars while training.
        model: changes to the budget's model for every row (``TransformerConfig`` fields other than ``ffn``,
            e.g. ``{"dropout": 0.3}``).
        average: score each row with the mean weights of its last ``average`` validation checkpoints
            (``TrainConfig.keep_checkpoints``) instead of its best one; 0: the best one.
    """

    dataset: str
    out: str
    data_dir: str
    budget: str = "small"
    rows: tuple[str, ...] = ()
    device: str = "auto"
    precision: str = "auto"
    max_minutes: float | None = None
    fine_tune_minutes: float | None = None
    max_steps: int | None = None
    beam: int | None = None
    seed: int = 1
    progress: bool = True
    model: dict[str, Any] = field(default_factory=dict)
    average: int = 0

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
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0 (0: no step bound), got {self.max_steps}")
        if self.beam is not None and self.beam < 1:
            raise ValueError(f"beam must be >= 1, got {self.beam}")
        if self.average < 0:
            raise ValueError(f"average must be >= 0 checkpoints, got {self.average}")
        known = set(TransformerConfig.__dataclass_fields__) - {"ffn"}
        unknown = sorted(set(self.model) - known)
        if unknown:
            raise ValueError(f"unknown model settings {unknown}; known: {sorted(known)}")
        self.base_model  # noqa: B018 (bad values fail here, before any row runs)

    @property
    def resolved_budget(self) -> Budget:
        return _budget(self.dataset, self.budget)

    @property
    def base_model(self) -> TransformerConfig:
        """The ``original`` row's model."""
        budget = self.resolved_budget
        return preset(budget.preset, **{"vocab_size": budget.vocab_size, **self.model})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"resolved_budget": asdict(self.resolved_budget)}
