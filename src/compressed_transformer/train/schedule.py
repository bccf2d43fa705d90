"""Inverse-square-root learning-rate schedule with linear warm-up (Vaswani et al. 2017, section 5.3)."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["InverseSqrtSchedule", "inverse_sqrt_lr"]


def inverse_sqrt_lr(step: int, peak_lr: float, warmup_steps: int) -> float:
    """``peak_lr * min(step / warmup, sqrt(warmup / step))``: linear warm-up to ``peak_lr``, then ``1/sqrt(step)``.

    ``step`` counts optimiser updates from 1; step 0 returns the first warm-up value.
    """
    step = max(step, 1)
    if warmup_steps <= 0:
        return peak_lr / math.sqrt(step)
    return peak_lr * min(step / warmup_steps, math.sqrt(warmup_steps / step))


class InverseSqrtSchedule:
    """Sets every parameter group's ``lr`` to :func:`inverse_sqrt_lr` of the number of updates taken.

    Args:
        optimizer: the optimiser whose learning rate is driven.
        peak_lr: learning rate at the end of warm-up.
        warmup_steps: warm-up length in optimiser updates.

    Raises:
        ValueError: for a non-positive ``peak_lr`` or negative ``warmup_steps``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, peak_lr: float, warmup_steps: int) -> None:
        if peak_lr <= 0:
            raise ValueError(f"peak learning rate must be positive, got {peak_lr}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.optimizer = optimizer
        self.peak_lr = peak_lr
        self.warmup_steps = warmup_steps
        self.step_count = 0
        self._apply()

    @property
    def lr(self) -> float:
        """The learning rate of the next update."""
        return inverse_sqrt_lr(self.step_count + 1, self.peak_lr, self.warmup_steps)

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def step(self) -> None:
        """Call after ``optimizer.step()``."""
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"peak_lr": self.peak_lr, "warmup_steps": self.warmup_steps, "step_count": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.peak_lr = state["peak_lr"]
        self.warmup_steps = state["warmup_steps"]
        self.step_count = state["step_count"]
        self._apply()
