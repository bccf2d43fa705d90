"""Checks of rank arguments shared by the decompositions (clear errors instead of failures deep inside)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_rank(rank: object, name: str = "rank") -> int:
    """``rank`` as an ``int``.

    Raises:
        ValueError: if it is not an integer (a float such as ``2.0`` included: ranks count factors).
    """
    if not _is_int(rank):
        raise ValueError(f"{name} must be an int, got {rank!r}")
    return int(rank)


def check_ranks(ranks: object, name: str = "ranks") -> int | list[int]:
    """``ranks`` as an ``int`` or a list of ``int`` (range checks are the caller's).

    Raises:
        ValueError: if it is neither an integer nor a sequence of integers.
    """
    if _is_int(ranks):
        return int(ranks)
    if isinstance(ranks, Sequence) and not isinstance(ranks, str) and all(_is_int(r) for r in ranks):
        return [int(r) for r in ranks]
    raise ValueError(f"{name} must be an int or a list of ints, got {ranks!r}")
