"""BLEU with sacrebleu: the standard cased, detokenised score, and the lowercased tokenised variants.

* :func:`sacre_bleu`: sacreBLEU (13a tokenisation, cased) on detokenised text, 0-100, with its signature.
* :func:`tokenized_bleu`: BLEU on lowercased, tokenised text as fairseq's IWSLT'14 papers quote it (0-100). When
  hypotheses and references are already tokenised (fairseq's prepared text) pass ``pretokenized=True`` so nothing is
  re-tokenised; otherwise 13a tokenisation stands in for Moses.
* :func:`seed_bleu`: the same lowercased tokenised corpus BLEU on a 0-1 scale, comparable with the seed's figures.
* :func:`bleu_interval`: a bootstrap confidence interval of sacreBLEU (how much a test set's BLEU varies by chance).
* :func:`paired_bootstrap_p`: whether two systems' sacreBLEU on the same test set differ by more than chance.
* :func:`seed_protocol_bleu`: the seed's own evaluation re-enacted (:class:`SeedProtocol`): greedy translations of
  one validation sentence per batch, words outside a frequency-cut vocabulary counted as matching ``<unk>``.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

__all__ = [
    "SEED",
    "SeedProtocol",
    "bleu_interval",
    "paired_bootstrap_p",
    "sacre_bleu",
    "seed_bleu",
    "seed_protocol_bleu",
    "seed_vocabulary",
    "tokenized_bleu",
]


SEED = 12345
"""Seed of every bootstrap here: sacreBLEU's default, pinned whatever ``SACREBLEU_SEED`` says."""


@contextmanager
def _fixed_seed() -> Iterator[None]:
    """sacreBLEU reads its bootstrap seed from ``SACREBLEU_SEED`` on each call; pin it to :data:`SEED` meanwhile."""
    before = os.environ.get("SACREBLEU_SEED")
    os.environ["SACREBLEU_SEED"] = str(SEED)
    try:
        yield
    finally:
        if before is None:
            del os.environ["SACREBLEU_SEED"]
        else:
            os.environ["SACREBLEU_SEED"] = before


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise ValueError("expected a list of sentences, got one string")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references; they must be line-aligned")
    if not references:
        raise ValueError("no sentences to score: BLEU of an empty corpus is undefined")


def sacre_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """Cased, detokenised corpus sacreBLEU (0-100) and its signature string.

    Raises:
        ValueError: if the two lists differ in length or are empty.
    """
    _check(hypotheses, references)
    metric = BLEU()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())


def tokenized_bleu(
    hypotheses: Sequence[str], references: Sequence[str], pretokenized: bool = False
) -> tuple[float, str]:
    """Lowercased corpus BLEU (0-100) on tokenised text, and its signature: unsmoothed, as fairseq's scorer,
    ``multi-bleu.perl`` and the seed's NLTK ``corpus_bleu`` compute it (0 when some n-gram order has no match in the
    whole corpus; sacreBLEU's default ``exp`` smoothing would give a positive figure there, and the same one
    otherwise)."""
    _check(hypotheses, references)
    metric = BLEU(lowercase=True, tokenize="none" if pretokenized else "13a", smooth_method="none")
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())


def seed_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Lowercased, 13a-tokenised corpus BLEU on a 0-1 scale."""
    return tokenized_bleu(hypotheses, references)[0] / 100.0


def bleu_interval(hypotheses: Sequence[str], references: Sequence[str], resamples: int = 1000) -> float:
    """Half-width of sacreBLEU's 95 % bootstrap confidence interval (0-100): the test sentences are resampled with
    replacement ``resamples`` times (sacrebleu's ``n_bootstrap``, seed :data:`SEED`); the interval runs from the 2.5th
    to the 97.5th percentile of the resampled BLEUs (``sacrebleu --confidence``). It says how much this one system's
    BLEU depends on the choice of test sentences; to compare two systems on the same sentences use the far more
    sensitive :func:`paired_bootstrap_p`.

    Raises:
        ValueError: if the two lists differ in length or ``resamples < 40`` (too few for the 2.5th percentile: the
            interval would be the whole range).
    """
    _check(hypotheses, references)
    if resamples < 40:
        raise ValueError(f"resamples must be >= 40 for a 95 % interval, got {resamples}")
    with _fixed_seed():
        score = BLEU().corpus_score(list(hypotheses), [list(references)], n_bootstrap=resamples)
    return float(score._ci)


def paired_bootstrap_p(
    baseline: Sequence[str], system: Sequence[str], references: Sequence[str], resamples: int = 1000
) -> float:
    """p-value of ``system``'s sacreBLEU differing from ``baseline``'s by chance: Koehn's (2004) paired bootstrap
    resampling of the test sentences, as sacreBLEU's ``--paired-bs`` runs it (seed :data:`SEED`). Two-sided:
    ``(c + 1) / (resamples + 1)``, ``c`` the resamples whose absolute BLEU difference, less its mean over the
    resamples, exceeds the observed absolute difference. Small values (e.g. < 0.05) mean the difference is unlikely
    to come from which sentences happen to be in the test set. Outputs of equal BLEU (identical ones, or ones that
    differ only in what BLEU does not see: spacing its tokeniser undoes, one unmatched word for another) give 1.0:
    there is no difference to explain (sacreBLEU's test would report ``1 / (resamples + 1)`` for them).

    Raises:
        ValueError: if the lists differ in length, hold fewer than 2 sentences (every resample would be the same
            one, and any difference would look significant), or ``resamples < 2``.
    """
    from sacrebleu.significance import PairedTest

    _check(baseline, references)
    _check(system, references)
    if resamples < 2:
        raise ValueError(f"resamples must be >= 2, got {resamples}")
    if len(references) < 2:
        raise ValueError("a paired bootstrap needs at least 2 sentences to resample")
    if sacre_bleu(baseline, references)[0] == sacre_bleu(system, references)[0]:  # identical outputs among them
        return 1.0
    with _fixed_seed():
        test = PairedTest(
            [("baseline", list(baseline)), ("system", list(system))],
            {"BLEU": BLEU()},
            [list(references)],
            test_type="bs",
            n_samples=resamples,
        )
        return float(test()[1]["BLEU"][1].p_value)


@dataclass(frozen=True)
class SeedProtocol:
    """How the seed's public code scores a translation model (khakhulin/compressed-transformer at 00518c0:
    ``nmt/utils/prepare_data.py``, ``nmt/utils/train_utils.py``: ``valid`` / ``evaluate_bleu``; read for its
    protocol only).

    * Every split keeps only the pairs whose source and target have at most ``max_len`` tokens.
    * The target vocabulary holds the training targets' tokens seen at least ``min_freq`` times; every other token,
      in references and outputs alike, is ``<unk>`` (BLEU is taken on vocabulary ids, so ``<unk>`` matches ``<unk>``).
    * The validation set is cut, in file order, into batches of ``batch_size`` pairs, and only the *first* pair of
      each batch is translated (``batch.src.transpose(0, 1)[:1]``), greedily, at most ``decode_len - 1`` tokens
      (``greedy_decode(..., max_len=50)``, whatever the length filter).
    * Score: corpus BLEU (NLTK's ``corpus_bleu``: 4-grams, uniform weights, no smoothing), 0-1.

    Defaults are the settings next to the seed's 0.442 (its ``results.md``: batch size 150, which leaves 7 of the
    1014 validation sentences; the README's command: ``--lower --tokenize --min_freq 10``, where ``arguments.py``
    defaults to 5). The seed tokenised with NLTK's toktok tokeniser; ``tokenize="13a"`` (sacreBLEU's) stands in for
    it, ``"split"`` is the seed's whitespace default. Earlier versions of the seed's ``valid`` differed (e.g. one
    sentence of the first batch only, smoothed BLEU); its ``results.md`` calls the column "test, bleu" although
    ``train.py`` decodes the validation split only.

    Raises:
        ValueError: for a size that is not a positive integer, or an unknown tokeniser.
    """

    batch_size: int = 150
    min_freq: int = 10
    max_len: int = 50
    decode_len: int = 50
    lower: bool = True
    tokenize: str = "13a"

    def __post_init__(self) -> None:
        for name in ("batch_size", "min_freq", "max_len", "decode_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SeedProtocol.{name} must be an integer >= 1, got {value!r}")
        if self.tokenize not in ("13a", "split"):
            raise ValueError(f"SeedProtocol.tokenize must be '13a' or 'split', got {self.tokenize!r}")

    def tokens(self, text: str) -> list[str]:
        """``text`` as the protocol's tokens (lowercased when ``lower``)."""
        text = text.lower() if self.lower else text
        return (Tokenizer13a()(text) if self.tokenize == "13a" else text).split()


def _keep_short(protocol: SeedProtocol, src: Sequence[str], tgt: Sequence[str]) -> list[tuple[int, list[str]]]:
    """``(index, target tokens)`` of the pairs within ``max_len`` tokens on both sides (the seed's ``filter_pred``)."""
    kept = []
    for index, (source, target) in enumerate(zip(src, tgt, strict=True)):
        words = protocol.tokens(target)
        if len(protocol.tokens(source)) <= protocol.max_len and len(words) <= protocol.max_len:
            kept.append((index, words))
    return kept


def _ids_bleu(hypotheses: list[list[str]], references: list[list[str]]) -> float:
    """NLTK's ``corpus_bleu`` (one reference each, 4-grams, uniform weights, no smoothing; 0-1) of token lists.

    Written out rather than taken from sacreBLEU, whose counts differ in one place: NLTK counts an output shorter
    than ``n`` tokens as one unmatched ``n``-gram (``max(1, len - n + 1)``), sacreBLEU as none.
    """
    matches, totals = [0] * 4, [0] * 4
    for hyp, ref in zip(hypotheses, references, strict=True):
        for n in range(1, 5):
            grams = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
            ref_grams = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
            matches[n - 1] += sum(min(count, ref_grams[gram]) for gram, count in grams.items())
            totals[n - 1] += max(1, len(hyp) - n + 1)
    if min(matches) == 0:
        return 0.0
    length, ref_length = sum(map(len, hypotheses)), sum(map(len, references))
    penalty = 1.0 if length > ref_length else math.exp(1 - ref_length / length)
    return min(1.0, penalty * math.exp(sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / 4))


def seed_vocabulary(
    train_sources: Sequence[str], train_references: Sequence[str], protocol: SeedProtocol = SeedProtocol()
) -> frozenset[str]:
    """The seed's target vocabulary: tokens of the training targets, after the length filter, seen at least
    ``min_freq`` times (every other word is ``<unk>``).

    Raises:
        ValueError: if the two lists differ in length.
    """
    _check(train_sources, train_references)
    counts = Counter(word for _, words in _keep_short(protocol, train_sources, train_references) for word in words)
    return frozenset(word for word, count in counts.items() if count >= protocol.min_freq)


def seed_protocol_bleu(
    hypotheses: Sequence[str],
    sources: Sequence[str],
    references: Sequence[str],
    vocabulary: frozenset[str] | set[str],
    protocol: SeedProtocol = SeedProtocol(),
) -> dict[str, Any]:
    """The seed's validation BLEU (:class:`SeedProtocol`) of greedy ``hypotheses`` of the validation ``sources``.

    Because the seed scores one pair in ``batch_size``, its figure depends on which pairs happen to open a batch;
    the result gives that figure and what it would have been for every other offset into the batches (when the
    kept pairs are not a multiple of ``batch_size``, the later offsets' samples are one sentence shorter).

    Args:
        hypotheses: translations of every validation source, line-aligned with ``sources`` / ``references``
            (greedy decoding, as the seed's).
        sources, references: the validation pairs.
        vocabulary: :func:`seed_vocabulary` of the training pairs.
        protocol: the protocol's settings.

    Returns:
        ``bleu``: the seed's figure (the first pair of each batch); ``sentences``: how many pairs it scores;
        ``offsets``: the figure for every offset ``0 .. batch_size - 1`` into the batches (offsets past the last
        kept pair are left out) with their ``mean``, ``std``, ``min`` and ``max``; ``bleu_all``: the same BLEU over
        every kept validation pair (the protocol without the sampling); ``kept``: pairs within ``max_len``;
        ``protocol``: the settings.

    Raises:
        ValueError: if the lists are not line-aligned, or no validation pair is within ``max_len``.
    """
    _check(hypotheses, references)
    _check(sources, references)
    kept = _keep_short(protocol, sources, references)
    if not kept:
        raise ValueError(f"no validation pair has at most {protocol.max_len} tokens on both sides")

    def ids(words: list[str]) -> list[str]:
        return [word if word in vocabulary else "<unk>" for word in words]

    hyps = [ids(protocol.tokens(hypotheses[index])[: protocol.decode_len - 1]) for index, _ in kept]
    refs = [ids(words) for _, words in kept]
    offsets = [
        _ids_bleu(hyps[offset :: protocol.batch_size], refs[offset :: protocol.batch_size])
        for offset in range(min(protocol.batch_size, len(kept)))
    ]
    mean = sum(offsets) / len(offsets)
    return {
        "bleu": offsets[0],
        "sentences": len(hyps[:: protocol.batch_size]),
        "offsets": offsets,
        "mean": mean,
        "std": math.sqrt(sum((b - mean) ** 2 for b in offsets) / len(offsets)),
        "min": min(offsets),
        "max": max(offsets),
        "bleu_all": _ids_bleu(hyps, refs),
        "kept": len(kept),
        "protocol": asdict(protocol),
    }
