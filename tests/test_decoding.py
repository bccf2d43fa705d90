"""Greedy and beam search, and the BLEU helpers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from compressed_transformer.evaluate.bleu import sacre_bleu, seed_bleu, tokenized_bleu
from compressed_transformer.evaluate.decoding import beam_search, forward_seconds, greedy_decode
from compressed_transformer.models.transformer import Transformer, preset


@pytest.fixture
def model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(preset("tiny", norm_first=True))
    # A few steps on a copy task, so that decodes end with EOS at varied lengths (an untrained model never stops).
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        src = torch.randint(4, 64, (16, 6), generator=generator)
        src[:8, 3:] = 0
        eos = torch.full((16, 1), 3)
        tgt_out = torch.cat([src, eos], dim=1)
        tgt_out[:8, 3] = 3
        tgt_out[:8, 4:] = 0
        tgt_in = torch.cat([torch.full((16, 1), 2), src], dim=1)
        loss = model.loss(model(src, tgt_in), tgt_out) / 100
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def sources() -> torch.Tensor:
    src = torch.randint(4, 64, (5, 7), generator=torch.Generator().manual_seed(1))
    src[1, 5:] = 0
    src[3, 2:] = 0
    return src


def naive_greedy(model: Transformer, src: torch.Tensor, limit: int) -> list[int]:
    """Greedy decoding by re-running the whole decoder each step (no cache), one sentence."""
    out = [model.config.bos_id]
    memory, mask = model.encode(src[None])
    for _ in range(limit):
        token = int(model.decode(torch.tensor([out]), memory, mask)[0, -1].argmax())
        if token == model.config.eos_id:
            break
        out.append(token)
    return out[1:]


def test_greedy_matches_uncached_greedy(model: Transformer) -> None:
    src = sources()
    hyps = greedy_decode(model, src, max_len_a=1.0, max_len_b=3)
    for row, hyp in zip(src, hyps, strict=True):
        real = row[row != 0]
        assert hyp == naive_greedy(model, real, len(real) + 3)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_one_equals_greedy(model: Transformer, length_penalty: float) -> None:
    src = sources()
    assert beam_search(model, src, beam=1, length_penalty=length_penalty) == greedy_decode(model, src)


def test_beam_search_scores_at_least_greedy(model: Transformer) -> None:
    src = sources()

    @torch.no_grad()
    def score(row: torch.Tensor, hyp: list[int]) -> float:
        memory, mask = model.encode(row[None])
        tokens = torch.tensor([[model.config.bos_id, *hyp]])
        logp = torch.log_softmax(model.decode(tokens, memory, mask)[0], dim=-1)
        target = [*hyp, model.config.eos_id]
        return float(logp[torch.arange(len(target)), target].sum())

    greedy = greedy_decode(model, src, max_len_a=3.0, max_len_b=20)
    beam = beam_search(model, src, beam=5, length_penalty=0.0, max_len_a=3.0, max_len_b=20)
    assert len(beam) == len(src)
    for row, g, b in zip(src, greedy, beam, strict=True):
        row = row[row != 0]
        assert score(row, b) >= score(row, g) - 1e-4
    with pytest.raises(ValueError, match="beam size"):
        beam_search(model, src, beam=0)


def test_batched_beam_equals_one_by_one(model: Transformer) -> None:
    src = sources()
    batched = beam_search(model, src, beam=3)
    for row, hyp in zip(src, batched, strict=True):
        assert beam_search(model, row[row != 0][None], beam=3)[0] == hyp


class _ScriptedModel:
    """A decoder whose next-token distribution is a function of the prefix (``table``), for exact tests of the
    search: ``encode`` and ``decode_step`` have the shapes ``greedy_decode`` / ``beam_search`` use."""

    config = SimpleNamespace(pad_id=0, bos_id=2, eos_id=3, max_positions=64)

    def __init__(self, table) -> None:
        self.table = table

    def encode(self, src: torch.Tensor):
        return src.float()[:, :, None], (src != 0)[:, None, None, :]

    def decode_step(self, tokens, memory, mask, cache, step):
        history = tokens[:, None] if cache is None else torch.cat([cache, tokens[:, None]], dim=1)
        rows = [torch.log(self.table(row[1:].tolist())) for row in history]
        return torch.stack(rows), history

    @staticmethod
    def reorder_cache(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return cache.index_select(0, index)


def _distribution(**probabilities: float) -> torch.Tensor:
    p = torch.full((7,), 1e-4)
    for token, value in probabilities.items():
        p[int(token[1:])] = value
    return p / p.sum()


def test_a_hypothesis_cut_at_the_length_limit_pays_for_ending() -> None:
    """A run-on (token 4 forever, EOS nearly impossible) must not beat a short finished translation (5, EOS) by
    escaping the cost of EOS: at its limit it is ended with EOS and pays for it, as in fairseq."""

    def table(prefix: list[int]) -> torch.Tensor:
        if not prefix:
            return _distribution(t4=0.5, t5=0.45)
        if prefix == [5]:
            return _distribution(t3=0.95)
        if prefix[0] == 5:
            return _distribution(t1=0.9)
        return _distribution(t4=0.97, t1=0.02, t3=1e-6)

    model, src = _ScriptedModel(table), torch.tensor([[6, 3]])
    for limit in (2, 3, 5, 8):
        assert beam_search(model, src, beam=2, max_len_a=0.0, max_len_b=limit) == [[5]]
    # a sentence that only runs on still ends at its limit, with as many tokens as greedy gives it
    run_on = _ScriptedModel(lambda prefix: _distribution(t4=0.99))
    assert beam_search(run_on, src, beam=3, max_len_a=0.0, max_len_b=4) == [[4, 4, 4, 4]]
    assert greedy_decode(run_on, src, max_len_a=0.0, max_len_b=4) == [[4, 4, 4, 4]]


def test_decoders_never_emit_padding_or_bos() -> None:
    """PAD and BOS are never generated, even when the model prefers them (a tied PAD row's logit is 0): greedy and
    beam size 1 give the same ids."""
    model = _ScriptedModel(
        lambda prefix: _distribution(t0=0.5, t2=0.3, t5=0.15) if len(prefix) < 2 else _distribution(t3=0.9)
    )
    src = torch.tensor([[6, 3]])
    assert greedy_decode(model, src) == beam_search(model, src, beam=1) == [[5, 5]]
    assert beam_search(model, src, beam=3) == [[5, 5]]


def test_bleu_helpers() -> None:
    refs = ["The cat sat on the mat.", "A dog runs in the park."]
    score, signature = sacre_bleu(refs, refs)
    assert score == pytest.approx(100.0) and "nrefs:1" in signature and "case:mixed" in signature
    assert seed_bleu([r.lower() for r in refs], refs) == pytest.approx(1.0)
    assert sacre_bleu([r.lower() for r in refs], refs)[0] < 100.0
    assert tokenized_bleu(["the cat sat ."], ["the cat sat ."], pretokenized=True)[0] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="line-aligned"):
        sacre_bleu(["a"], ["a", "b"])


class _Letters:
    """A tokenizer of the shape ``forward_seconds`` needs: one id per letter."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[4 + (ord(c) % 20) for c in text] for text in texts]


def test_forward_seconds_runs_every_pair_teacher_forced(model: Transformer, monkeypatch: pytest.MonkeyPatch) -> None:
    sources, references = ["abc", "de", "fghij", "k"], ["xy", "zzz", "a", "bcdefg"]
    seen: list[tuple[int, int]] = []
    forward = model.forward

    def recording(src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled()
        seen.extend(zip((src != 0).sum(1).tolist(), (tgt_in != 0).sum(1).tolist(), strict=True))
        return forward(src, tgt_in)

    monkeypatch.setattr(model, "forward", recording)
    seconds = forward_seconds(model, _Letters(), sources, references, max_tokens=16, repeats=2)
    assert seconds > 0
    # each pair twice: its source with EOS, its target with BOS
    expected = sorted((len(s) + 1, len(t) + 1) for s, t in zip(sources, references, strict=True))
    assert sorted(seen) == sorted(expected * 2)
    with pytest.raises(ValueError, match="as many references"):
        forward_seconds(model, _Letters(), sources, references[:2])
    with pytest.raises(ValueError, match="repeats"):
        forward_seconds(model, _Letters(), sources, references, repeats=0)
