"""Forcing a compressed layer's forward onto one side of its factorised / dense switch (shared by the tests)."""

from __future__ import annotations

import pytest
from torch import nn

from compressed_transformer.layers import TTLinear


def force_path(monkeypatch: pytest.MonkeyPatch, layer: nn.Module, factorized: bool) -> list[int]:
    """Make ``layer`` (TT, Tucker or low-rank) take the given path; returns the token counts its forward asked
    about, so a test can check that the forward still consults the hook patched here."""
    calls: list[int] = []
    if isinstance(layer, TTLinear):
        real = layer._decision

        def decision(tokens, train, cached, cores):
            calls.append(tokens)
            _, best, shapes = real(tokens, train, cached, cores)
            return (best if factorized else None), best, shapes

        monkeypatch.setattr(layer, "_decision", decision)
    else:

        def choose(tokens, train, cached, param) -> bool:
            calls.append(tokens)
            return factorized

        monkeypatch.setattr(layer, "_factorized", choose)
    return calls
