"""Token-count batching with length bucketing, deterministic given the seed, sharded across DDP ranks.

A batch holds sentence pairs of similar length such that ``pairs * longest_side <= max_tokens``. The batches of
epoch ``e`` depend only on ``(seed, e)``; optimiser step ``s`` of the epoch consumes the ``world * accum``
consecutive batches ``[s * world * accum, (s + 1) * world * accum)``, rank ``r`` taking micro-batch ``a`` at index
``s * world * accum + a * world + r``. So one process with ``accum = N`` sees the same global batch as ``N`` processes
with ``accum = 1``, and a run resumed at ``(epoch, step)`` sees exactly the batches it would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Batch", "TokenBatcher", "collate", "encode_pairs"]


@dataclass
class Batch:
    """Padded tensors of one batch.

    Attributes:
        src: source ids ending in EOS, ``(B, S)``.
        tgt_in: BOS followed by the target ids, ``(B, T)``.
        tgt_out: the target ids followed by EOS, ``(B, T)``.
        tokens: number of target tokens (non-pad entries of ``tgt_out``).
    """

    src: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    tokens: int

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.src.to(device), self.tgt_in.to(device), self.tgt_out.to(device), self.tokens)


def encode_pairs(
    tokenizer, src: Sequence[str], tgt: Sequence[str], max_len: int
) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Tokenise sentence pairs, dropping those with a side longer than ``max_len`` subwords (EOS included).

    Returns:
        The kept ``(src_ids, tgt_ids)`` pairs (without BOS/EOS) and the number dropped as over-long.
    """
    src_ids, tgt_ids = tokenizer.encode_batch(src), tokenizer.encode_batch(tgt)
    pairs = [(s, t) for s, t in zip(src_ids, tgt_ids, strict=True) if len(s) < max_len and len(t) < max_len]
    return pairs, len(src_ids) - len(pairs)


def collate(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, bos_id: int, eos_id: int) -> Batch:
    """Pad ``(src_ids, tgt_ids)`` pairs into a :class:`Batch`."""
    src_len = max(len(s) for s, _ in pairs) + 1
    tgt_len = max(len(t) for _, t in pairs) + 1
    src = torch.full((len(pairs), src_len), pad_id, dtype=torch.long)
    tgt_in = torch.full((len(pairs), tgt_len), pad_id, dtype=torch.long)
    tgt_out = torch.full((len(pairs), tgt_len), pad_id, dtype=torch.long)
    for row, (s, t) in enumerate(pairs):
        src[row, : len(s) + 1] = torch.tensor([*s, eos_id])
        tgt_in[row, : len(t) + 1] = torch.tensor([bos_id, *t])
        tgt_out[row, : len(t) + 1] = torch.tensor([*t, eos_id])
    return Batch(src, tgt_in, tgt_out, sum(len(t) + 1 for _, t in pairs))


class TokenBatcher:
    """Deterministic token-budget batches of a tokenised corpus.

    Args:
        pairs: ``(src_ids, tgt_ids)`` pairs without BOS/EOS.
        max_tokens: budget per batch, counted as ``pairs * (longest side + 1)``.
        seed: seed of the shuffling.
        shuffle: shuffle pairs within length buckets and the batch order (off for evaluation).

    Raises:
        ValueError: if ``max_tokens`` cannot hold the longest pair.
    """

    def __init__(
        self, pairs: Sequence[tuple[list[int], list[int]]], max_tokens: int, seed: int = 0, shuffle: bool = True
    ) -> None:
        if not pairs:
            raise ValueError("no sentence pairs to batch (all empty or over-long?)")
        self.pairs = pairs
        self.max_tokens = max_tokens
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = [max(len(s), len(t)) + 1 for s, t in pairs]
        if max(self.lengths) > max_tokens:
            raise ValueError(f"max_tokens={max_tokens} is smaller than the longest pair ({max(self.lengths)} tokens)")
        self._cached: tuple[int, list[list[int]]] | None = None

    def batches(self, epoch: int = 0) -> list[list[int]]:
        """Index lists of the batches of ``epoch``, in the order they are consumed."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        order = list(range(len(self.pairs)))
        rng = random.Random(self.seed * 100_003 + epoch)
        if self.shuffle:
            rng.shuffle(order)  # random order inside each length bucket
        order.sort(key=lambda i: (self.lengths[i], len(self.pairs[i][1])))
        batches, current, longest = [], [], 0
        for i in order:
            longest_if_added = max(longest, self.lengths[i])
            if current and longest_if_added * (len(current) + 1) > self.max_tokens:
                batches.append(current)
                current, longest_if_added = [], self.lengths[i]
            current.append(i)
            longest = longest_if_added
        batches.append(current)
        if self.shuffle:
            rng.shuffle(batches)
        self._cached = (epoch, batches)
        return batches

    def steps_per_epoch(self, world_size: int = 1, accum: int = 1, epoch: int = 0) -> int:
        """Optimiser steps in ``epoch``; the last ``len(batches) % (world * accum)`` batches are dropped."""
        return len(self.batches(epoch)) // (world_size * accum)

    def step_batches(self, epoch: int, step: int, rank: int, world_size: int, accum: int) -> list[list[int]]:
        """The ``accum`` micro-batches rank ``rank`` consumes at optimiser ``step`` of ``epoch``."""
        batches = self.batches(epoch)
        base = step * world_size * accum
        return [batches[base + a * world_size + rank] for a in range(accum)]

    def global_tokens(self, epoch: int, step: int, world_size: int, accum: int) -> int:
        """Target tokens (EOS included) in the whole global batch of ``step``, summed over ranks."""
        batches = self.batches(epoch)
        base = step * world_size * accum
        return sum(len(self.pairs[i][1]) + 1 for b in batches[base : base + world_size * accum] for i in b)

    def collate(self, indices: Sequence[int], pad_id: int, bos_id: int, eos_id: int) -> Batch:
        return collate([self.pairs[i] for i in indices], pad_id, bos_id, eos_id)
