"""Batched greedy and beam-search decoding with a key/value cache, and a sentence-level ``translate`` helper.

Beam search keeps ``beam`` live hypotheses per sentence. At each step the ``2 * beam`` best expansions are taken;
those ending in EOS become finished (scored ``logp / len^length_penalty``, fairseq's convention, ``len`` counting EOS),
the best non-EOS ones stay live. A sentence stops when it has ``beam`` finished hypotheses or its live hypotheses
reach its length limit ``max_len_a * src_len + max_len_b`` tokens; then, as in fairseq, each is ended with EOS and pays
its log-probability, so a run-on hypothesis does not escape the cost of ending. Neither decoder ever emits PAD or BOS.
With ``beam == 1`` this is exactly greedy decoding.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from compressed_transformer.data.batching import TokenBatcher, collate
from compressed_transformer.models.transformer import Transformer

__all__ = ["beam_search", "forward_seconds", "greedy_decode", "translate"]


def _max_lengths(src: torch.Tensor, pad_id: int, max_len_a: float, max_len_b: int, limit: int) -> torch.Tensor:
    src_len = (src != pad_id).sum(dim=1)
    return (src_len.float() * max_len_a + max_len_b).long().clamp(min=1, max=limit)


def _never_special(logp: torch.Tensor, cfg) -> torch.Tensor:
    """``logp`` ``(N, V)`` with PAD and BOS ruled out (in place): a decoder emits neither (fairseq rules out PAD)."""
    logp[:, [cfg.pad_id, cfg.bos_id]] = float("-inf")
    return logp


@torch.no_grad()
def greedy_decode(
    model: Transformer, src: torch.Tensor, max_len_a: float = 1.5, max_len_b: int = 10
) -> list[list[int]]:
    """Greedy decoding of source ids ``(B, S)``; returns the target ids of each sentence (no BOS/EOS)."""
    cfg = model.config
    memory, mask = model.encode(src)
    limits = _max_lengths(src, cfg.pad_id, max_len_a, max_len_b, cfg.max_positions - 1)
    batch = src.shape[0]
    tokens = torch.full((batch,), cfg.bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(batch, dtype=torch.bool, device=src.device)
    out: list[torch.Tensor] = []
    cache = None
    for step in range(int(limits.max())):
        logp, cache = model.decode_step(tokens, memory, mask, cache, step)
        tokens = _never_special(logp, cfg).argmax(dim=-1)
        tokens = torch.where(done, torch.full_like(tokens, cfg.pad_id), tokens)
        out.append(tokens)
        done |= (tokens == cfg.eos_id) | (step + 1 >= limits)
        if bool(done.all()):
            break
    ids = torch.stack(out, dim=1).tolist()  # (B, T)
    results = []
    for row, limit in zip(ids, limits.tolist(), strict=True):
        row = row[:limit]
        results.append(row[: row.index(cfg.eos_id)] if cfg.eos_id in row else [t for t in row if t != cfg.pad_id])
    return results


@torch.no_grad()
def beam_search(
    model: Transformer,
    src: torch.Tensor,
    beam: int = 5,
    length_penalty: float = 1.0,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
) -> list[list[int]]:
    """Batched beam search over source ids ``(B, S)``; returns the best target ids per sentence (no BOS/EOS).

    Raises:
        ValueError: if ``beam < 1``.
    """
    if beam < 1:
        raise ValueError(f"beam size must be >= 1, got {beam}")
    cfg = model.config
    batch, device = src.shape[0], src.device
    memory, mask = model.encode(src)
    memory = memory.repeat_interleave(beam, dim=0)  # (B*K, S, d)
    mask = mask.repeat_interleave(beam, dim=0)  # (B*K, 1, 1, S)
    limits = _max_lengths(src, cfg.pad_id, max_len_a, max_len_b, cfg.max_positions - 1).tolist()
    scores = torch.full((batch, beam), float("-inf"), device=device)
    scores[:, 0] = 0.0  # only the first copy of each sentence is live at the start
    tokens = torch.full((batch * beam,), cfg.bos_id, dtype=torch.long, device=device)
    history = [[[] for _ in range(beam)] for _ in range(batch)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch
    cache = None
    for step in range(max(limits) + 1):  # the step after a sentence's limit only ends its hypotheses
        logp, cache = model.decode_step(tokens, memory, mask, cache, step)
        logp = _never_special(logp, cfg)
        vocab = logp.shape[-1]
        ending = [b for b in range(batch) if not done[b] and step == limits[b]]
        if ending:  # EOS after each live hypothesis: (B, K) log-probabilities
            eos_logp = logp.view(batch, beam, vocab)[..., cfg.eos_id].tolist()
            current = scores.tolist()
            for b in ending:
                for k, hyp in enumerate(history[b]):
                    if current[b][k] != float("-inf"):
                        finished[b].append(((current[b][k] + eos_logp[b][k]) / (len(hyp) + 1) ** length_penalty, hyp))
                done[b] = True
            if all(done):
                break
        candidates = scores.unsqueeze(-1) + logp.view(batch, beam, vocab)  # (B, K, V)
        top_scores, top_index = candidates.view(batch, -1).topk(2 * beam, dim=-1)  # (B, 2K)
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        # The bookkeeping runs on Python lists and goes to the device once per step: element-wise writes into
        # device tensors would cost a kernel launch each (thousands per step on a GPU).
        new_scores = scores.tolist()
        new_tokens = tokens.view(batch, beam).tolist()
        reorder = [[b * beam + k for k in range(beam)] for b in range(batch)]
        new_history = list(history)
        for b in range(batch):
            if done[b]:
                continue
            live: list[tuple[float, int, int]] = []
            for rank, (score, index) in enumerate(zip(top_scores[b], top_index[b], strict=True)):
                origin, token = divmod(index, vocab)
                if score == float("-inf"):
                    break
                if token == cfg.eos_id:
                    # as in fairseq, EOS only counts among the best ``beam`` candidates
                    if rank < beam and len(finished[b]) < beam:
                        hyp = history[b][origin]
                        finished[b].append((score / (len(hyp) + 1) ** length_penalty, hyp))
                elif len(live) < beam:
                    live.append((score, origin, token))
            if len(finished[b]) >= beam or not live:
                done[b] = True
                continue
            rows = []
            for k, (score, origin, token) in enumerate(live):
                new_scores[b][k] = score
                new_tokens[b][k] = token
                reorder[b][k] = b * beam + origin
                rows.append([*history[b][origin], token])
            for k in range(len(live), beam):
                new_scores[b][k] = float("-inf")
                rows.append([])
            new_history[b] = rows
        if all(done):
            break
        history = new_history
        scores = torch.tensor(new_scores, dtype=scores.dtype, device=device)
        tokens = torch.tensor(new_tokens, dtype=tokens.dtype, device=device).view(-1)
        cache = model.reorder_cache(cache, torch.tensor(reorder, device=device).view(-1))
    return [max(hyps, key=lambda item: item[0])[1] if hyps else [] for hyps in finished]


@torch.no_grad()
def translate(
    model: Transformer,
    tokenizer,
    sentences: Sequence[str],
    *,
    beam: int = 1,
    length_penalty: float = 1.0,
    max_tokens: int = 4000,
    device: torch.device | str = "cpu",
    max_len_a: float = 1.5,
    max_len_b: int = 10,
) -> tuple[list[str], float]:
    """Translate ``sentences`` in length-sorted token batches; returns detokenised outputs (input order) and seconds.

    Source sentences longer than the model's ``max_positions`` are truncated to fit.
    """
    model.eval()
    cfg = model.config
    start = time.perf_counter()
    if not sentences:
        return [], 0.0
    limit = max(1, cfg.max_positions // 2 - 1)
    ids = [s[:limit] for s in tokenizer.encode_batch(list(sentences))]
    batcher = TokenBatcher([(s, []) for s in ids], max(max_tokens, limit + 1), shuffle=False)
    outputs: list[str] = [""] * len(ids)
    for indices in batcher.batches():
        src = collate([(ids[i], []) for i in indices], cfg.pad_id, cfg.bos_id, cfg.eos_id).src.to(device)
        if beam == 1:
            hyps = greedy_decode(model, src, max_len_a, max_len_b)
        else:
            hyps = beam_search(model, src, beam, length_penalty, max_len_a, max_len_b)
        for i, hyp in zip(indices, hyps, strict=True):
            outputs[i] = tokenizer.decode(hyp)
    return outputs, time.perf_counter() - start


def forward_seconds(
    model: Transformer,
    tokenizer,
    sources: Sequence[str],
    references: Sequence[str],
    *,
    max_tokens: int = 4000,
    device: torch.device | str = "cpu",
    repeats: int = 3,
) -> float:
    """Seconds of one teacher-forced forward pass over ``sources`` / ``references`` (the fastest of ``repeats``),
    in length-sorted token batches of the pairs (``max_tokens`` each, as :func:`translate` batches sources),
    without autograd.

    Unlike a decoding time, it does not depend on what the model generates (an undertrained model's run-on outputs
    hold up a whole decoding batch), so it compares the speed of models on exactly the same tokens.

    Raises:
        ValueError: if the two lists differ in length, are empty, or ``repeats < 1``.
    """
    if len(sources) != len(references) or not sources:
        raise ValueError(f"need as many references as sources, and some: got {len(sources)} and {len(references)}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    model.eval()
    cfg = model.config
    limit = max(1, cfg.max_positions // 2 - 1)
    pairs = [
        (s[:limit], t[:limit])
        for s, t in zip(tokenizer.encode_batch(list(sources)), tokenizer.encode_batch(list(references)), strict=True)
    ]
    batcher = TokenBatcher(pairs, max(max_tokens, limit + 1), shuffle=False)
    batches = [collate([pairs[i] for i in b], cfg.pad_id, cfg.bos_id, cfg.eos_id) for b in batcher.batches()]
    batches = [(b.src.to(device), b.tgt_in.to(device)) for b in batches]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            for src, tgt_in in batches:
                model(src, tgt_in)
            if str(device).startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return best
