"""Shared fixtures: every test starts from the same random state, on one intra-op thread."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

SEED = 0


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tests use tiny tensors: one thread is faster, and avoids LAPACK's slowdown on oversubscribed CI cores.
    Restored after each test, so that a command that sets its own thread count (``--threads``) leaks into none."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seed torch's generator before every test so random weights and inputs are reproducible."""
    torch.manual_seed(SEED)
    return SEED
