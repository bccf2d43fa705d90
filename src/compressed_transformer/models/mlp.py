"""The seed's MNIST network: one hidden layer, a.k.a. the feed-forward block of a Transformer."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["MLP", "MLPConfig"]


@dataclass(frozen=True)
class MLPConfig:
    """Shape of :class:`MLP`.

    Attributes:
        in_features: input size (784 for flattened 28x28 images).
        hidden: hidden width (256 in the seed).
        out_features: number of classes.
        bias: biases in both layers.
    """

    in_features: int = 784
    hidden: int = 256
    out_features: int = 10
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("in_features", "hidden", "out_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MLPConfig.{name} must be a positive int, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def dense_params(self) -> int:
        """Parameters of the dense network: ``in*hidden + hidden*out`` weights plus biases (203,530 for the seed)."""
        weights = self.in_features * self.hidden + self.hidden * self.out_features
        biases = self.hidden + self.out_features if self.bias else 0
        return weights + biases


class MLP(nn.Module):
    """``fc2(relu(fc1(x)))``: ``in_features -> hidden -> out_features`` (784 -> 256 -> 10 in the seed).

    ``fc1`` and ``fc2`` are ``nn.Linear`` by default; any linear-like module with the same features can replace
    them (``compress_`` swaps them in place, or pass ``fc1=`` / ``fc2=`` to build a compressed net from scratch).

    Args:
        config: the shape.
        fc1: a module mapping ``(..., in_features)`` to ``(..., hidden)``; a fresh ``nn.Linear`` when omitted.
        fc2: a module mapping ``(..., hidden)`` to ``(..., out_features)``; a fresh ``nn.Linear`` when omitted.

    Shape:
        input ``(..., in_features)`` (images flattened) or ``(..., 28, 28)`` when ``in_features == 784``;
        output ``(..., out_features)`` logits.

    Raises:
        ValueError: if a given layer's ``in_features`` / ``out_features`` disagree with ``config``.
    """

    def __init__(self, config: MLPConfig | None = None, *, fc1: nn.Module | None = None, fc2: nn.Module | None = None):
        super().__init__()
        self.config = config if config is not None else MLPConfig()
        c = self.config
        for name, layer, shape in (("fc1", fc1, (c.in_features, c.hidden)), ("fc2", fc2, (c.hidden, c.out_features))):
            if layer is not None:
                got = (getattr(layer, "in_features", None), getattr(layer, "out_features", None))
                if got != shape:
                    raise ValueError(f"{name} must map {shape[0]} -> {shape[1]} features, got {got[0]} -> {got[1]}")
        self.fc1 = fc1 if fc1 is not None else nn.Linear(c.in_features, c.hidden, c.bias)
        self.act = nn.ReLU()
        self.fc2 = fc2 if fc2 is not None else nn.Linear(c.hidden, c.out_features, c.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.config.in_features:
            x = x.flatten(-2)  # (..., 28, 28) -> (..., 784)
        return self.fc2(self.act(self.fc1(x)))
