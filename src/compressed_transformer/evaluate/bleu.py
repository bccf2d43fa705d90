"""BLEU with sacrebleu: the standard cased, detokenised score, and the lowercased tokenised variants.

* :func:`sacre_bleu`: sacreBLEU (13a tokenisation, cased) on detokenised text, 0-100, with its signature.
* :func:`tokenized_bleu`: BLEU on lowercased, tokenised text as fairseq's IWSLT'14 papers quote it (0-100). When
  hypotheses and references are already tokenised (fairseq's prepared text) pass ``pretokenized=True`` so nothing is
  re-tokenised; otherwise 13a tokenisation stands in for Moses.
* :func:`seed_bleu`: the same lowercased tokenised corpus BLEU on a 0-1 scale, comparable with the seed's figures.
"""

from __future__ import annotations

from collections.abc import Sequence

from sacrebleu.metrics import BLEU

__all__ = ["sacre_bleu", "seed_bleu", "tokenized_bleu"]


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references; they must be line-aligned")


def sacre_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """Cased, detokenised corpus sacreBLEU (0-100) and its signature string.

    Raises:
        ValueError: if the two lists differ in length.
    """
    _check(hypotheses, references)
    metric = BLEU()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())


def tokenized_bleu(
    hypotheses: Sequence[str], references: Sequence[str], pretokenized: bool = False
) -> tuple[float, str]:
    """Lowercased corpus BLEU (0-100) on tokenised text, and its signature."""
    _check(hypotheses, references)
    metric = BLEU(lowercase=True, tokenize="none" if pretokenized else "13a")
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())


def seed_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Lowercased, 13a-tokenised corpus BLEU on a 0-1 scale."""
    return tokenized_bleu(hypotheses, references)[0] / 100.0
