"""The BLEU helpers beyond sacreBLEU's own score: the bootstrap interval and the seed's validation protocol."""

from __future__ import annotations

import math
import random

import pytest
from sacrebleu.metrics import BLEU

from compressed_transformer.evaluate.bleu import (
    SeedProtocol,
    bleu_interval,
    paired_bootstrap_p,
    sacre_bleu,
    seed_protocol_bleu,
    seed_vocabulary,
    tokenized_bleu,
)

WORDS = [
    "a",
    "man",
    "woman",
    "dog",
    "cat",
    "runs",
    "sits",
    "on",
    "the",
    "grass",
    "street",
    "red",
    "blue",
    "with",
    "ball",
    "child",
]


def _reference_bleu(hypotheses: list[list[str]], references: list[list[str]]) -> float:
    """sacreBLEU's corpus BLEU of token lists (no smoothing, 0-1): NLTK's figure when every output has at least
    4 tokens (only shorter outputs are counted differently)."""
    assert all(len(h) >= 4 for h in hypotheses)
    metric = BLEU(tokenize="none", smooth_method="none", force=True)
    return metric.corpus_score([" ".join(h) for h in hypotheses], [[" ".join(r) for r in references]]).score / 100


def _score(hyps, src, ref, train_src, train_tgt, protocol: SeedProtocol | None = None) -> dict:
    protocol = protocol or SeedProtocol()
    return seed_protocol_bleu(hyps, src, ref, seed_vocabulary(train_src, train_tgt, protocol), protocol)


def _sentence(rng: random.Random, length: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(length))


def _corpus(rng: random.Random, pairs: int) -> tuple[list[str], list[str]]:
    return [_sentence(rng, 6) for _ in range(pairs)], [_sentence(rng, rng.randint(5, 9)) for _ in range(pairs)]


def test_protocol_bleu_is_corpus_bleu_of_the_sampled_sentences() -> None:
    rng = random.Random(0)
    train_src, train_tgt = _corpus(rng, 200)
    src, ref = _corpus(rng, 23)
    hyps = [" ".join(r.split()[: rng.randint(4, 9)]) if i % 3 else _sentence(rng, 7) for i, r in enumerate(ref)]
    protocol = SeedProtocol(batch_size=5, min_freq=1)  # every word is frequent: no <unk> here
    result = _score(hyps, src, ref, train_src, train_tgt, protocol)
    tokens = [h.split() for h in hyps], [r.split() for r in ref]
    for offset in range(5):
        expected = _reference_bleu(tokens[0][offset::5], tokens[1][offset::5])
        assert result["offsets"][offset] == pytest.approx(expected, abs=1e-9), offset
    assert result["bleu"] == result["offsets"][0] and result["sentences"] == 5  # pairs 0, 5, 10, 15, 20
    assert result["bleu_all"] == pytest.approx(_reference_bleu(*tokens), abs=1e-9)
    assert result["min"] <= result["mean"] <= result["max"] and result["std"] > 0
    assert result["kept"] == 23 and result["protocol"]["batch_size"] == 5


def test_protocol_scores_only_the_first_pair_of_each_batch() -> None:
    rng = random.Random(1)
    train_src, train_tgt = _corpus(rng, 100)
    src, ref = _corpus(rng, 10)
    hyps = [r if i % 4 == 0 else "street street street" for i, r in enumerate(ref)]  # right at 0, 4, 8 only
    result = _score(hyps, src, ref, train_src, train_tgt, SeedProtocol(batch_size=4, min_freq=1))
    assert result["bleu"] == pytest.approx(1.0) and result["sentences"] == 3
    assert result["offsets"][1:] == [0.0, 0.0, 0.0] and result["bleu_all"] < 0.5


def test_protocol_drops_long_pairs_before_batching() -> None:
    rng = random.Random(2)
    train_src, train_tgt = _corpus(rng, 100)
    src, ref = _corpus(rng, 6)
    src[0] = _sentence(rng, 60)  # over max_len: dropped, so pair 1 opens the first batch
    hyps = ["street street street street"] * 6
    hyps[1] = ref[1]
    result = _score(hyps, src, ref, train_src, train_tgt, SeedProtocol(batch_size=3, min_freq=1))
    assert result["kept"] == 5 and result["bleu_all"] < 1.0
    assert _score(hyps[1:2], src[1:2], ref[1:2], train_src, train_tgt)["bleu"] == pytest.approx(1.0)
    # the sample of offset 0 is pairs 1 and 4 (kept pairs 0 and 3): half right
    half = _reference_bleu([ref[1].split(), hyps[4].split()], [ref[1].split(), ref[4].split()])
    assert result["bleu"] == pytest.approx(half)
    with pytest.raises(ValueError, match="at most 50 tokens"):
        _score(["x"], [_sentence(rng, 51)], ["x"], train_src, train_tgt)


def test_rare_words_match_as_unk_and_long_outputs_are_cut() -> None:
    train_tgt = ["a dog runs on the grass"] * 10 + ["a cat sits"]  # "cat" is seen once
    train_src = ["x"] * len(train_tgt)
    ref, hyp = ["a cat runs on the grass"], ["a zebra runs on the grass"]
    rare = _score(hyp, ["x"], ref, train_src, train_tgt, SeedProtocol(batch_size=1, min_freq=2))
    assert rare["bleu"] == pytest.approx(1.0)  # cat and zebra are both <unk>
    known = _score(hyp, ["x"], ref, train_src, train_tgt, SeedProtocol(batch_size=1, min_freq=1))
    assert known["bleu"] < 1.0  # cat is in the vocabulary now, zebra is not
    cased = _score(["A Dog runs on the grass"], ["x"], ["a dog runs on the grass"], train_src, train_tgt)
    assert cased["bleu"] == pytest.approx(1.0)  # lowercased
    protocol = SeedProtocol(batch_size=1, min_freq=1, decode_len=6)
    cut = _score(["a dog runs on the grass"], ["x"], ["a dog runs on the"], train_src, train_tgt, protocol)
    assert cut["bleu"] == 1.0  # the output stops after decode_len - 1 = 5 tokens (and 1.0 is exact)
    whole = _score(["a dog runs on the grass"], ["x"], ["a dog runs on the"], train_src, train_tgt)
    assert whole["bleu"] < 1.0  # the length filter (max_len) does not cut outputs
    assert SeedProtocol(tokenize="13a").tokens("A dog, running.") == ["a", "dog", ",", "running", "."]
    assert SeedProtocol(tokenize="split", lower=False).tokens("A dog, running.") == ["A", "dog,", "running."]


def test_protocol_and_interval_reject_bad_input() -> None:
    for bad in ({"batch_size": 0}, {"min_freq": 0}, {"max_len": 0}, {"tokenize": "moses"}):
        with pytest.raises(ValueError, match="SeedProtocol"):
            SeedProtocol(**bad)
    with pytest.raises(ValueError, match="line-aligned"):
        _score(["a"], ["x", "y"], ["a", "b"], ["x"], ["a"])
    with pytest.raises(ValueError, match="resamples"):
        bleu_interval(["a"], ["a"], resamples=1)
    with pytest.raises(ValueError, match="line-aligned"):
        bleu_interval(["a"], ["a", "b"])
    for score in (sacre_bleu, tokenized_bleu, bleu_interval):
        with pytest.raises(ValueError, match="empty corpus"):
            score([], [])


def test_bootstrap_interval_shrinks_with_more_sentences() -> None:
    rng = random.Random(3)
    refs = [_sentence(rng, 8) for _ in range(400)]
    hyps = [" ".join(r.split()[:6]) + " dog" for r in refs]
    small, large = bleu_interval(hyps[:40], refs[:40]), bleu_interval(hyps, refs)
    assert 0.0 < large < small < sacre_bleu(hyps, refs)[0]
    assert bleu_interval(refs, refs) == pytest.approx(0.0)  # every resample is perfect


def test_paired_bootstrap_tells_a_real_difference_from_noise() -> None:
    rng = random.Random(4)
    refs = [_sentence(rng, 8) for _ in range(300)]
    good = [" ".join(r.split()[:7]) + " dog" for r in refs]
    worse = [r if i % 2 else _sentence(rng, 8) for i, r in enumerate(good)]  # half the outputs replaced by noise
    noisy = [r if i != 7 else _sentence(rng, 8) for i, r in enumerate(good)]  # one output changed
    assert paired_bootstrap_p(good, worse, refs) < 0.01
    assert paired_bootstrap_p(good, noisy, refs) > 0.2
    # equal BLEU is no difference: spacing the tokeniser undoes, one unmatched word for another
    assert paired_bootstrap_p([g + " ." for g in good], [g + "." for g in good], refs) == 1.0
    zebra = [" ".join(r.split()[:7]) + " zebra" for r in refs]
    assert paired_bootstrap_p(zebra, [z.replace("zebra", "yak") for z in zebra], refs) == 1.0
    with pytest.raises(ValueError, match="line-aligned"):
        paired_bootstrap_p(good[:2], worse, refs)
    with pytest.raises(ValueError, match="resamples"):
        paired_bootstrap_p(good, worse, refs, resamples=0)


def test_vocabulary_counts_training_pairs_within_the_length_filter() -> None:
    long = " ".join(["cat"] * 60)  # over max_len: its many cats do not count
    vocabulary = seed_vocabulary(["x", "x", "x"], ["a cat", "a cat", long], SeedProtocol(min_freq=2))
    assert vocabulary == {"a", "cat"}
    assert seed_vocabulary(["x", "x", "x"], ["a cat", "a dog", long], SeedProtocol(min_freq=2)) == {"a"}
    assert seed_vocabulary(["x", long], ["a dog", "a dog"], SeedProtocol(min_freq=2)) == set()  # source too long
    with pytest.raises(ValueError, match="line-aligned"):
        seed_vocabulary(["x"], ["a", "b"])


def test_identical_outputs_are_not_significantly_different() -> None:
    rng = random.Random(5)
    refs = [_sentence(rng, 8) for _ in range(50)]
    hyps = [" ".join(r.split()[:6]) for r in refs]
    assert paired_bootstrap_p(hyps, list(hyps), refs) == 1.0


def test_protocol_counts_short_outputs_as_nltk_does() -> None:
    # "a b c" has no 4-gram: NLTK still counts one (unmatched) 4-gram for it, so the 4-gram precision is 1/2, not 1/1
    train = ["a b c d w x y z"] * 10
    hyps, refs = ["a b c", "w x y z"], ["a b c d", "w x y z"]
    result = _score(hyps, ["s", "s"], refs, ["s"] * 10, train, SeedProtocol(batch_size=2, min_freq=1))
    expected = math.exp(1 - 8 / 7) * (1 * 1 * 1 * 0.5) ** 0.25  # 7/7, 5/5, 3/3, 1/2; 7 output tokens for 8
    assert result["bleu_all"] == pytest.approx(expected, abs=1e-12)
    assert result["offsets"] == [0.0, 1.0]  # "a b c" alone: no 4-gram match, 0 without smoothing


def test_one_string_is_not_taken_for_a_list_of_sentences() -> None:
    # a bare string would otherwise be scored as one "sentence" per character
    with pytest.raises(ValueError, match="list of sentences"):
        sacre_bleu("the cat sat", "the dog sat")
    with pytest.raises(ValueError, match="list of sentences"):
        tokenized_bleu(["the cat sat"], "the cat sat")
    with pytest.raises(ValueError, match="list of sentences"):
        seed_protocol_bleu(["a"], "x", ["a"], frozenset({"a"}))
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        SeedProtocol(batch_size=1.5)  # type: ignore[arg-type]


def test_bootstrap_seed_does_not_depend_on_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(6)
    refs = [_sentence(rng, 8) for _ in range(60)]
    good = [" ".join(r.split()[:6]) + " dog" for r in refs]
    other = [r if i % 10 else _sentence(rng, 8) for i, r in enumerate(good)]  # p about 0.01, varying with the seed
    expected = bleu_interval(good, refs), paired_bootstrap_p(good, other, refs)
    monkeypatch.setenv("SACREBLEU_SEED", "None")  # sacreBLEU would draw its seed from the OS
    assert (bleu_interval(good, refs), paired_bootstrap_p(good, other, refs)) == expected
    assert (bleu_interval(good, refs), paired_bootstrap_p(good, other, refs)) == expected


def test_bootstrap_needs_enough_resamples_and_sentences() -> None:
    refs, hyps = ["a b c d e f"] * 5, ["a b c d e g"] * 5
    with pytest.raises(ValueError, match="resamples"):
        bleu_interval(hyps, refs, resamples=39)  # fewer than 40: the interval would be the whole range
    assert bleu_interval(hyps, refs, resamples=40) == pytest.approx(0.0)
    # one sentence: every resample is that sentence, and sacreBLEU's p would be 1 / (resamples + 1)
    with pytest.raises(ValueError, match="at least 2 sentences"):
        paired_bootstrap_p(["a b c d e"], ["a b c d f g"], ["a b c d f"])


def test_tokenized_bleu_is_unsmoothed_as_fairseq_scores() -> None:
    """No 4-gram of the corpus matches: fairseq's scorer (and multi-bleu.perl, NLTK) gives 0; with a match at every
    order the figure is sacreBLEU's plain one."""
    hyps, refs = ["the cat sat here now", "a dog ran"], ["the cat sat there now", "a dog ran away"]
    score, signature = tokenized_bleu(hyps, refs, pretokenized=True)
    assert score == 0.0 and "smooth:none" in signature
    assert BLEU(tokenize="none", lowercase=True).corpus_score(hyps, [refs]).score > 0  # what exp smoothing gives
    rng = random.Random(0)
    others, refs = _corpus(rng, 200)
    hyps = [ref if i % 3 else other for i, (other, ref) in enumerate(zip(others, refs, strict=True))]
    expected = BLEU(tokenize="none", lowercase=True).corpus_score(hyps, [refs]).score
    assert tokenized_bleu(hyps, refs, pretokenized=True)[0] == pytest.approx(expected)
