"""Shared test data: a word-for-word German→English toy corpus and one small setting of each FFN method
(importable from every test module: ``pythonpath = ["tests"]`` in pyproject.toml)."""

from __future__ import annotations

import random
from pathlib import Path

DE = ["ein", "zwei", "drei", "vier", "fünf", "hund", "katze", "maus", "haus", "baum"]
EN = ["one", "two", "three", "four", "five", "dog", "cat", "mouse", "house", "tree"]

# a small setting of each FFN method, for models of the ``tiny`` preset
METHOD_OPTIONS = {
    "dense": {},
    "tt": {"ranks": 2},
    "tucker": {"ranks": 2},
    "svd": {"rank": 4},
    "prune": {"sparsity": 0.5},
    "sparse": {"sparsity": 0.5},
    "svd-o": {},
}


def write_corpus(folder: Path, pairs: int = 48, seed: int = 0) -> Path:
    """``pairs`` random 2-5 word sentences and their word-for-word translations in the ``plain`` layout
    (train = valid = test)."""
    rng = random.Random(seed)
    src, tgt = [], []
    for _ in range(pairs):
        words = [rng.randrange(len(DE)) for _ in range(rng.randint(2, 5))]
        src.append(" ".join(DE[i] for i in words))
        tgt.append(" ".join(EN[i] for i in words))
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        (folder / f"{split}.de").write_text("\n".join(src) + "\n")
        (folder / f"{split}.en").write_text("\n".join(tgt) + "\n")
    return folder
