"""The translation training loop: setup, train, cleanup, written out in full.

One process or ``torchrun --nproc_per_node=N`` (DDP from the environment, see :mod:`.distributed`). Rank 0 alone
logs, evaluates and saves. The run folder (``TrainConfig.out_dir``) receives:

* ``config.json`` (resolved model and training config), ``command.txt``, ``git_rev.txt``;
* ``spm.model`` / ``spm.json`` (the cached tokenizer);
* ``metrics.jsonl``: one JSON object per log line or evaluation (loss, lr, tokens/s, valid loss/BLEU, wall time);
* ``checkpoint_last.pt`` (every ``save_every`` steps and at the end) and ``checkpoint_best.pt`` (best valid BLEU);
* ``summary.json``: parameters, compression ratio against the dense config, training time, best BLEU.
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from compressed_transformer.data.batching import TokenBatcher, encode_pairs
from compressed_transformer.data.parallel import download, load_dataset
from compressed_transformer.data.tokenizer import Tokenizer, load_or_train_tokenizer
from compressed_transformer.evaluate.bleu import sacre_bleu, seed_bleu
from compressed_transformer.evaluate.decoding import translate
from compressed_transformer.models.transformer import (
    FeedForward,
    FFNSpec,
    MultiHeadAttention,
    Transformer,
    TransformerConfig,
    fc2_options,
    ffn_module_names,
    parameter_report,
)
from compressed_transformer.provenance import run_revision
from compressed_transformer.serialization import layer_structure
from compressed_transformer.train import distributed
from compressed_transformer.train.checkpoint import (
    RESUMABLE_KEYS,
    STEP_CHECKPOINT,
    capture_rng,
    check_same_config,
    load_checkpoint,
    load_model,
    restore_rng,
    save_checkpoint,
    step_checkpoints,
    write_text_atomic,
)
from compressed_transformer.train.schedule import InverseSqrtSchedule

__all__ = ["TrainConfig", "TrainingDiverged", "budget_left", "compression_ratio", "train"]

PRECISIONS = ("auto", "bf16", "fp32")
# Model settings a conversion run may change from its dense checkpoint's (FFN spec and regularisation).
CONVERSION_MAY_CHANGE = ("ffn", "dropout", "attn_dropout", "activation_dropout")


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of update ``step`` on process ``rank``. Every update reseeds from it (as fairseq reseeds
    with ``seed + updates``), so dropout depends on ``(seed, rank, step)`` only: a resumed run draws exactly what
    the uninterrupted one drew, on every rank, whatever was saved with the checkpoint."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Everything about a training run that is not the model.

    Args:
        dataset: ``multi30k``, ``iwslt14`` or ``plain`` (see :mod:`compressed_transformer.data.parallel`).
        data_dir: the dataset's folder.
        out_dir: the run folder.
        src_lang / tgt_lang: language suffixes.
        spm_type: sentencepiece model type (``bpe`` or ``unigram``); the vocabulary size is the model's.
        max_len: longest sentence kept for training, in subwords per side (longer pairs are skipped and counted).
        max_tokens: token budget of one micro-batch per process.
        accum_steps: micro-batches per optimiser step (per process).
        lr: peak learning rate; warmup_steps: its linear warm-up; then inverse square root decay.
        betas / eps / weight_decay: Adam's.
        clip_norm: gradient clipping max norm (0 disables clipping).
        max_steps / max_epochs / max_minutes: stop at the first one reached (0 = no limit; one must be set).
        seed: seeds the model, dropout and the batch order.
        log_every / eval_every / save_every: in optimiser steps (``eval_every = 0``: at each epoch's end).
        eval_beam: beam used for validation BLEU (1 = greedy).
        eval_max_sentences: validate BLEU on at most this many sentences (0 = all).
        keep_checkpoints: at every validation also write ``checkpoint_step<N>.pt`` (the model, without optimiser
            state) and keep the newest this many of them, for :func:`~compressed_transformer.train.checkpoint.
            average_checkpoints` (``translate average``). 0: none.
        kl_weight: weight of the Sparse VD KL term (per training target token).
        init_from: a trained dense checkpoint to convert (``compress_``) and fine-tune instead of training from
            scratch.
        device: ``auto``, ``cpu``, ``cuda``.
        precision: of the training forward and backward: ``bf16`` (``torch.autocast`` to bfloat16; parameters,
            optimiser state and validation stay float32), ``fp32``, or ``auto`` (``bf16`` on CUDA, ``fp32`` on CPU).
        download: fetch missing data files (needs internet).
        progress: show a tqdm bar (rank 0).
    """

    dataset: str = "multi30k"
    data_dir: str = "data/multi30k"
    out_dir: str = "runs/translate"
    src_lang: str = "de"
    tgt_lang: str = "en"
    spm_type: str = "bpe"
    max_len: int = 128
    max_tokens: int = 4096
    accum_steps: int = 1
    lr: float = 1e-3
    warmup_steps: int = 1000
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-9
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    max_steps: int = 0
    max_epochs: int = 0
    max_minutes: float = 0.0
    seed: int = 1
    log_every: int = 50
    eval_every: int = 0
    save_every: int = 500
    eval_beam: int = 1
    eval_max_sentences: int = 0
    keep_checkpoints: int = 0
    kl_weight: float = 1.0
    init_from: str = ""
    device: str = "auto"
    precision: str = "auto"
    download: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if not (self.max_steps or self.max_epochs or self.max_minutes):
            raise ValueError("set at least one of max_steps, max_epochs, max_minutes so that training ends")
        for name in ("max_tokens", "accum_steps", "max_len", "log_every", "save_every", "eval_beam"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "keep_checkpoints",
            "max_steps",
            "max_epochs",
            "max_minutes",
            "warmup_steps",
            "eval_every",
            "eval_max_sentences",
            "kl_weight",
            "weight_decay",
            "clip_norm",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):  # nan, inf or negative: never a setting
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {value}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"learning rate must be a finite number > 0, got {self.lr}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def compression_ratio(config: TransformerConfig, model: nn.Module) -> dict[str, float]:
    """Stored parameters of the dense version of ``config`` over those of ``model``: total and FFN-only."""
    with torch.device("meta"):
        dense = Transformer(config.replace(ffn=FFNSpec()))
    dense_report, report = parameter_report(dense), parameter_report(model)
    return {
        "total": dense_report["total"] / max(report["total"], 1),
        "ffn": dense_report["ffn"] / max(report["ffn"], 1),
    }


def _keep_metrics_until(path: Path, step: int) -> None:
    """Drop the records of ``metrics.jsonl`` past update ``step`` (all of them for a fresh run, ``step`` 0): what
    a killed run logged after its last checkpoint is logged again by the resumed one."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if _logged_step(line) <= step] if step > 0 else []
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def _logged_step(line: str) -> float:
    """The update a ``metrics.jsonl`` line records; infinity for a line cut short by a kill (dropped)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _check_run_folder(out: Path, resolved: dict[str, Any], resume: bool) -> None:
    saved_path = out / "config.json"
    if not resume:
        if (out / "checkpoint_last.pt").exists():
            raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        stale = sorted(p.name for p in out.glob("checkpoint_*.pt"))
        if stale:  # a run that stopped before its first checkpoint_last: averaging would mix its files with ours
            named = ", ".join(stale[:3]) + (", ..." if len(stale) > 3 else "")
            raise ValueError(
                f"{out} holds checkpoints of an earlier run ({named}) but no checkpoint_last.pt to resume from; "
                "delete them or choose another --out"
            )
        return
    if not (out / "checkpoint_last.pt").exists() or not saved_path.exists():
        raise ValueError(f"--resume: {out} has no checkpoint_last.pt/config.json to resume from")
    saved = json.loads(saved_path.read_text())
    check_same_config(
        saved["model"], resolved["model"], f"--resume: {out} is a different run: model config", ignore=("vocab_size",)
    )
    check_same_config(
        saved["train"], resolved["train"], f"--resume: {out} is a different run: training config", ignore=RESUMABLE_KEYS
    )


def _convert_from_dense(model_config: TransformerConfig, state: dict[str, Any]) -> Transformer:
    """The conversion route: load a trained dense model, ``compress_`` the chosen FFN linears in place."""
    dense_config = TransformerConfig.from_dict(state["model_config"])
    check_same_config(
        {k: v for k, v in dense_config.to_dict().items() if k not in CONVERSION_MAY_CHANGE},
        {k: v for k, v in model_config.to_dict().items() if k not in CONVERSION_MAY_CHANGE},
        "--init-from checkpoint does not fit this model: its config",
    )
    if dense_config.ffn.method != "dense" and dense_config.ffn.blocks != "none":
        raise ValueError(f"--init-from needs a dense checkpoint (its FFN method is {dense_config.ffn.method!r})")
    model = load_model(state)
    model.config = model_config
    if model_config.ffn.method != "dense":
        from compressed_transformer.compress import compress_

        names = ffn_module_names(model_config)
        fc1 = {n for n in names if n.endswith("fc1")}
        fc2 = {n for n in names if n.endswith("fc2")}
        options = model_config.ffn.options
        if fc1:
            compress_(model, model_config.ffn.method, filter=lambda name, _: name in fc1, **options)
            compress_(model, model_config.ffn.method, filter=lambda name, _: name in fc2, **fc2_options(options))
    for module in model.modules():  # dropout rates may differ from the dense run's (CONVERSION_MAY_CHANGE)
        if isinstance(module, MultiHeadAttention):
            module.dropout = model_config.attn_dropout
        elif hasattr(module, "dropout") and isinstance(module.dropout, nn.Dropout):
            ffn = isinstance(module, FeedForward)
            module.dropout.p = model_config.ffn_dropout if ffn else model_config.dropout
    return model


def training_autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The context the training forward runs in for a :attr:`TrainConfig.precision` on ``device``."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _validate(
    model: Transformer, tokenizer: Tokenizer, batcher: TokenBatcher, src: list[str], refs: list[str], cfg: TrainConfig
) -> dict[str, float]:
    model.eval()
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for indices in batcher.batches():
            batch = batcher.collate(indices, model.config.pad_id, model.config.bos_id, model.config.eos_id).to(device)
            logits = model(batch.src, batch.tgt_in)
            nll += float(
                nn.functional.cross_entropy(
                    logits.float().flatten(0, 1),
                    batch.tgt_out.flatten(),
                    ignore_index=model.config.pad_id,
                    reduction="sum",
                )
            )
            tokens += batch.tokens
        limit = cfg.eval_max_sentences or len(src)
        hyps, seconds = translate(model, tokenizer, src[:limit], beam=cfg.eval_beam, device=device)
    model.train()
    bleu, _ = sacre_bleu(hyps, refs[:limit])
    return {
        "valid_nll": nll / max(tokens, 1),
        "valid_ppl": math.exp(min(nll / max(tokens, 1), 50.0)),
        "valid_bleu": bleu,
        "valid_bleu_seed": seed_bleu(hyps, refs[:limit]),
        "valid_seconds": seconds,
    }


def budget_left(cfg: TrainConfig, summary: Mapping[str, Any]) -> bool:
    """Whether resuming the run that wrote ``summary`` (its ``summary.json``) under ``cfg`` would train further:
    every limit ``cfg`` sets (``max_steps``, ``max_epochs``, ``max_minutes``) lies beyond what the run reached.
    A run stopped by its own limits gives ``False`` under the same config, ``True`` once a limit is raised."""
    reached = {
        "max_steps": float(summary["steps"]),
        "max_epochs": float(summary["epochs"]),
        "max_minutes": float(summary["train_seconds"]) / 60,
    }
    return all(reached[name] < getattr(cfg, name) for name in reached if getattr(cfg, name))


def reset_new_modules(model: nn.Module, known: Sequence[nn.Module], kinds: tuple[type, ...]) -> list[str]:
    """Call ``reset_parameters`` on every module of ``model`` that is an instance of ``kinds`` and not one of
    ``known`` (the modules before a change; kept as objects so that their ids stay theirs); returns the names.

    Only the root of a new subtree is reset (a ``TTEmbedding``'s own init, not its inner ``TTLinear``'s over it),
    and a module shared under several names once.
    """
    names, seen = [], {id(module) for module in known}
    for name, module in model.named_modules():
        if id(module) in seen:
            continue
        if isinstance(module, kinds):
            module.reset_parameters()
            names.append(name)
            seen.update(id(inner) for inner in module.modules())
        seen.add(id(module))
    return names


def _factorised_kinds() -> tuple[type, ...]:
    """The layers whose factorisation of random weights is smaller than those weights (a truncated SVD / TT-SVD /
    HOSVD keeps part of their energy): a run from scratch gives them their own init instead."""
    from compressed_transformer.layers import LowRankEmbedding, LowRankLinear, TTEmbedding, TTLinear, TuckerLinear

    return (LowRankLinear, TTLinear, TuckerLinear, LowRankEmbedding, TTEmbedding)


def train(
    model_config: TransformerConfig,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    prepare: Callable[[Transformer], None] | None = None,
) -> dict[str, Any]:
    """Train a translation model; returns the run summary (also written to ``summary.json``).

    Args:
        model_config: the model to train (its ``vocab_size`` is an upper bound for the trained tokenizer's).
        cfg: the run's :class:`TrainConfig`.
        resume: continue the run in ``cfg.out_dir`` from its ``checkpoint_last.pt``.
        prepare: changes the model in place once it is built (or converted from ``cfg.init_from``), before a resumed
            state is loaded and before training: for compressions ``model_config`` cannot describe, e.g.
            ``compress_`` on the attention projections. Its checkpoints then rebuild only through the same
            ``prepare``; describe it in ``cfg.extra`` so that the run folder records it. On a run from scratch the
            factorised layers ``prepare`` puts in (low-rank, TT, Tucker linears and tables) start from their own
            initialisation, as compressed FFN layers do: tables at the dense table's scale, linears at
            ``nn.Linear``'s default variance with its random bias. Not from a factorisation of the random weights
            they replace, which keeps only part of them (a rank-16 TT-SVD of a random embedding table about 3 % of
            its energy). Pruned and Sparse VD layers keep what ``prepare`` made of the random weights.

    Raises:
        ValueError: for bad configs, data, or a resume folder from another run (before any training).
        FileNotFoundError: for missing data.
        TrainingDiverged: when the loss becomes NaN/inf (the last good checkpoint is kept).
    """
    # ---- setup -------------------------------------------------------------------------------------------------
    ctx = distributed.setup(cfg.device)
    try:
        return _train(model_config, cfg, ctx, resume, prepare)
    finally:
        distributed.cleanup()


def _train(
    model_config: TransformerConfig,
    cfg: TrainConfig,
    ctx: distributed.DistContext,
    resume: bool,
    prepare: Callable[[Transformer], None] | None,
):
    out = Path(cfg.out_dir)
    if model_config.ffn.method != "dense":  # a bad FFN spec fails here, before any data is read
        FeedForward(model_config.d_model, model_config.d_ff, 0.0, model_config.ffn.method, model_config.ffn.options)
    init_state = load_checkpoint(cfg.init_from) if cfg.init_from else None
    resume_state = None
    if resume:
        _check_run_folder(out, {"model": model_config.to_dict(), "train": cfg.to_dict()}, resume=True)
        resume_state = load_checkpoint(out / "checkpoint_last.pt")
    else:
        _check_run_folder(out, {}, resume=False)
    log = print if ctx.is_main else (lambda *a, **k: None)

    if cfg.download:  # rank 0 fetches, the others wait for the files
        distributed.main_first(ctx, lambda: download(cfg.dataset, cfg.data_dir))
    train_corpus = load_dataset(cfg.dataset, cfg.data_dir, "train", cfg.src_lang, cfg.tgt_lang)
    valid_corpus = load_dataset(cfg.dataset, cfg.data_dir, "valid", cfg.src_lang, cfg.tgt_lang)
    log(train_corpus.describe())
    log(valid_corpus.describe())

    if resume_state is not None:
        tokenizer = Tokenizer(resume_state["tokenizer"])
    elif init_state is not None:
        tokenizer = Tokenizer(init_state["tokenizer"])
    else:
        tokenizer = distributed.main_first(
            ctx,
            lambda: load_or_train_tokenizer(
                out, train_corpus.src + train_corpus.tgt, model_config.vocab_size, cfg.spm_type
            ),
        )
        if not ctx.is_main:
            tokenizer = Tokenizer.load(out / "spm.model")
    model_config = model_config.replace(vocab_size=tokenizer.vocab_size)

    pairs, too_long = encode_pairs(tokenizer, train_corpus.src, train_corpus.tgt, cfg.max_len)
    if too_long:
        log(f"skipped {too_long} training pairs longer than max_len={cfg.max_len} subwords")
    valid_pairs, _ = encode_pairs(tokenizer, valid_corpus.src, valid_corpus.tgt, model_config.max_positions // 2)
    batcher = TokenBatcher(pairs, cfg.max_tokens, seed=cfg.seed)
    longest_valid = max((max(len(s), len(t)) + 1 for s, t in valid_pairs), default=0)  # TokenBatcher's measure
    valid_batcher = TokenBatcher(valid_pairs, max(cfg.max_tokens, longest_valid), shuffle=False)  # kept whole
    steps_per_epoch = batcher.steps_per_epoch(ctx.world_size, cfg.accum_steps)
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training set gives fewer than world_size*accum_steps={ctx.world_size * cfg.accum_steps} batches; "
            "lower --max-tokens or --accum-steps"
        )

    torch.manual_seed(cfg.seed + ctx.rank)
    model = Transformer(model_config) if init_state is None else _convert_from_dense(model_config, init_state)
    if prepare is not None:
        built = list(model.modules())
        prepare(model)
        if init_state is None:  # from scratch: nothing to keep of the random weights the new modules replaced
            reset_new_modules(model, built, _factorised_kinds())
    model.to(ctx.device)
    train_model: nn.Module = model
    if ctx.distributed:
        train_model = DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    optimizer = torch.optim.Adam(
        model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    schedule = InverseSqrtSchedule(optimizer, cfg.lr, cfg.warmup_steps)
    n_train_tokens = sum(len(t) + 1 for _, t in pairs)
    kl_fn = None
    if model_config.ffn.method == "svd-o" and model_config.ffn.blocks != "none":
        from compressed_transformer.layers import model_kl as kl_fn

    epoch, step_in_epoch, global_step, best_bleu, trained_seconds = 0, 0, 0, float("-inf"), 0.0
    resumed_eval_step = -1
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        schedule.load_state_dict(resume_state["scheduler"])
        restore_rng(resume_state["rng"])
        position = resume_state["position"]
        epoch, step_in_epoch, global_step = position["epoch"], position["step_in_epoch"], position["global_step"]
        saved_world = position.get("world_size")  # (checkpoints before the field: not checked)
        if saved_world is not None and saved_world * position.get("accum_steps", 1) != ctx.world_size * cfg.accum_steps:
            raise ValueError(
                f"--resume: {out} was trained with {saved_world} process(es) x {position.get('accum_steps', 1)} "
                f"accumulation steps per update; resume it with the same number of batches per update (now "
                f"{ctx.world_size} x {cfg.accum_steps}), or the data order and batch size change mid-run"
            )
        best_bleu = resume_state.get("best_bleu", best_bleu)
        trained_seconds = resume_state.get("trained_seconds", 0.0)
        resumed_eval_step = resume_state.get("last_eval_step", -1)
        log(f"resumed {out} at epoch {epoch}, step {global_step}")

    resolved = {"model": model_config.to_dict(), "train": cfg.to_dict()}
    metrics_path = out / "metrics.jsonl"
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _keep_metrics_until(metrics_path, global_step)  # a killed run's records past its checkpoint are replayed
        write_text_atomic(out / "config.json", json.dumps(resolved, indent=1) + "\n")
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
        with open(out / "command.txt", "a", encoding="utf-8") as handle:
            handle.write(("# resumed\n" if resume else "") + command + "\n")
        (out / "git_rev.txt").write_text((run_revision() or "unknown") + "\n")
        report = parameter_report(model)
        log(f"parameters: {report}; compression ratio vs dense: {compression_ratio(model_config, model)}")

    structure = layer_structure(model)

    def model_state(position: dict[str, int]) -> dict[str, Any]:
        return {
            "model_config": model_config.to_dict(),
            "train_config": cfg.to_dict(),
            "model": model.state_dict(),
            "structure": structure,  # compressed layers the config does not describe (attention, embeddings)
            "tokenizer": tokenizer.model_proto,
            "position": position,
        }

    def state(position: dict[str, int]) -> dict[str, Any]:
        return model_state(position) | {
            "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(),
            "rng": capture_rng(),
            "best_bleu": best_bleu,
            # the clock the budget is checked against (validations included) as it reads now, so a resumed run
            # goes on from exactly where the saved one stood
            "trained_seconds": time.perf_counter() - run_start,
            "last_eval_step": last_eval_step,
        }

    total_steps = cfg.max_steps or (cfg.max_epochs * steps_per_epoch if cfg.max_epochs else None)
    progress = None
    if ctx.is_main and cfg.progress:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=global_step, unit="step", dynamic_ncols=True, mininterval=2.0)
    autocast = training_autocast(cfg.precision, ctx.device)

    # ---- train -------------------------------------------------------------------------------------------------
    model.train()
    window_tokens, window_loss, window_start = 0, 0.0, time.perf_counter()
    run_start = time.perf_counter() - trained_seconds
    last_eval_step = resumed_eval_step  # a finished run resumed as it was is not validated again

    def where() -> dict[str, int]:
        """The position a checkpoint records (with the batches per update, which a resume must keep)."""
        return {
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "world_size": ctx.world_size,
            "accum_steps": cfg.accum_steps,
        }

    def stop_now() -> bool:
        if cfg.max_steps and global_step >= cfg.max_steps:
            return True
        if cfg.max_epochs and epoch >= cfg.max_epochs:
            return True
        if cfg.max_minutes:
            over = torch.tensor(float(time.perf_counter() - run_start > 60 * cfg.max_minutes), device=ctx.device)
            if ctx.distributed:
                dist.broadcast(over, src=0)  # rank 0's clock decides, so every rank stops at the same step
            return bool(over)
        return False

    def evaluate_and_save(position: dict[str, int]) -> None:
        nonlocal best_bleu, last_eval_step
        last_eval_step = global_step
        if not ctx.is_main:
            return
        result = _validate(model, tokenizer, valid_batcher, valid_corpus.src, valid_corpus.tgt, cfg)
        result.update(step=global_step, epoch=epoch, wall=round(time.perf_counter() - run_start, 1))
        _append_jsonl(metrics_path, result)
        message = (
            f"step {global_step} epoch {epoch}: valid nll {result['valid_nll']:.3f} "
            f"ppl {result['valid_ppl']:.2f} BLEU {result['valid_bleu']:.2f}"
        )
        (progress.write if progress else print)(message)
        if result["valid_bleu"] > best_bleu:
            best_bleu = result["valid_bleu"]
            save_checkpoint(out / "checkpoint_best.pt", state(position))
        if cfg.keep_checkpoints:
            save_checkpoint(out / STEP_CHECKPOINT.format(step=global_step), model_state(position))
            for old in step_checkpoints(out)[: -cfg.keep_checkpoints]:
                old.unlink()

    while not stop_now():
        if step_in_epoch >= steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
            if cfg.eval_every == 0:
                evaluate_and_save(where())
            continue
        torch.manual_seed(step_seed(cfg.seed, ctx.rank, global_step))  # dropout of this update, on this rank
        micro = batcher.step_batches(epoch, step_in_epoch, ctx.rank, ctx.world_size, cfg.accum_steps)
        global_tokens = batcher.global_tokens(epoch, step_in_epoch, ctx.world_size, cfg.accum_steps)
        step_loss = 0.0
        for i, indices in enumerate(micro):
            batch = batcher.collate(indices, model_config.pad_id, model_config.bos_id, model_config.eos_id)
            batch = batch.to(ctx.device)
            sync = i == len(micro) - 1 or not ctx.distributed
            with nullcontext() if sync else train_model.no_sync(), autocast:
                logits = train_model(batch.src, batch.tgt_in)
                loss_sum = model.loss(logits, batch.tgt_out)
                # DDP averages gradients over ranks, hence the world_size factor: the update is the mean loss per
                # target token of the whole global batch.
                loss = loss_sum * (ctx.world_size / global_tokens)
                if kl_fn is not None:
                    loss = loss + cfg.kl_weight * kl_fn(model) / (n_train_tokens * cfg.accum_steps)
            loss.backward()
            step_loss += float(loss_sum.detach())
            window_tokens += batch.tokens
        if cfg.clip_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        if not (math.isfinite(step_loss) and bool(torch.isfinite(grad_norm))):
            optimizer.zero_grad(set_to_none=True)
            kept = out / "checkpoint_last.pt"
            raise TrainingDiverged(
                f"non-finite loss/gradient at step {global_step + 1} (loss {step_loss}, grad norm {float(grad_norm)}); "
                f"training stopped. The last good checkpoint is {kept if kept.exists() else 'none yet'}; "
                "lower --lr or raise --warmup and resume"
            )
        step_lr = optimizer.param_groups[0]["lr"]  # the rate this update used (logged below)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        global_step += 1
        step_in_epoch += 1
        window_loss += step_loss
        trained_seconds = time.perf_counter() - run_start
        if progress is not None:
            progress.update(1)
        if global_step % cfg.log_every == 0:
            counts = torch.tensor([window_loss, float(window_tokens)], dtype=torch.float64, device=ctx.device)
            if ctx.distributed:
                dist.all_reduce(counts)
            elapsed = time.perf_counter() - window_start
            record = {
                "step": global_step,
                "epoch": epoch,
                "loss": float(counts[0] / max(counts[1], 1)),
                "lr": step_lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": float(counts[1]) / max(elapsed, 1e-9),
                "wall": round(trained_seconds, 1),
            }
            if kl_fn is not None:
                record["kl"] = float(kl_fn(model).detach())
            if ctx.is_main:
                _append_jsonl(metrics_path, record)
                if progress is not None:
                    progress.set_postfix(
                        loss=f"{record['loss']:.3f}",
                        tok_s=f"{record['tokens_per_s']:.0f}",
                        lr=f"{record['lr']:.2e}",
                        epoch=epoch,
                    )
                else:
                    print(json.dumps(record), flush=True)
            window_tokens, window_loss, window_start = 0, 0.0, time.perf_counter()
        position = where()
        if cfg.eval_every and global_step % cfg.eval_every == 0:
            evaluate_and_save(position)
        if global_step % cfg.save_every == 0 and ctx.is_main:
            save_checkpoint(out / "checkpoint_last.pt", state(position))

    # ---- cleanup -----------------------------------------------------------------------------------------------
    position = where()
    if last_eval_step != global_step:
        evaluate_and_save(position)
    if progress is not None:
        progress.close()
    summary: dict[str, Any] = {}
    trained_seconds = time.perf_counter() - run_start  # the clock that stopped the run, final validation included
    if ctx.is_main:
        save_checkpoint(out / "checkpoint_last.pt", state(position))
        summary = {
            "out_dir": str(out),
            "steps": global_step,
            "epochs": epoch + step_in_epoch / steps_per_epoch,
            "train_seconds": round(trained_seconds, 1),
            "best_valid_bleu": best_bleu,
            "bleu_signature": sacre_bleu(["."], ["."])[1],
            "parameters": parameter_report(model),
            "compression_ratio": compression_ratio(model_config, model),
            "ffn": model_config.ffn.to_dict(),
            "skipped_train_pairs": {**train_corpus.skipped, "over_long": too_long},
        }
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    if ctx.distributed:
        dist.barrier()
    return summary
