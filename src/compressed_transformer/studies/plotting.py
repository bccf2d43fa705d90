"""Plot pieces shared by the studies' figures."""

from __future__ import annotations

from typing import Any

__all__ = ["mark_seed_point"]


def mark_seed_point(ax: Any, name: str, x: float, y: float, label: str | None = None) -> None:
    """Draw one of the seed's figures on ``ax`` (a matplotlib Axes): a black cross at ``(x, y)`` captioned
    ``seed <name>`` in grey, below and right of it, so that it reads apart from our own points."""
    ax.scatter(x, y, marker="x", s=50, color="black", zorder=4, label=label)
    ax.annotate(f"seed {name}", (x, y), textcoords="offset points", xytext=(5, -10), fontsize=7, color="dimgray")
