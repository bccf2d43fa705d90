"""Planning, running (or skipping, or resuming) and scoring the translation study's rows."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

try:  # POSIX: rows locked while they run (see _row_lock)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from ...data.parallel import ParallelCorpus, load_dataset
from ...data.tokenizer import Tokenizer
from ...evaluate.bleu import (
    SeedProtocol,
    bleu_interval,
    paired_bootstrap_p,
    sacre_bleu,
    seed_bleu,
    seed_protocol_bleu,
    seed_vocabulary,
    tokenized_bleu,
)
from ...evaluate.decoding import forward_seconds, translate
from ...models.transformer import (
    FeedForward,
    FFNSpec,
    Transformer,
    TransformerConfig,
    parameter_report,
    resolve_blocks,
)
from ...size import stored_params
from ...train.checkpoint import (
    average_checkpoints,
    load_checkpoint,
    save_checkpoint,
    step_checkpoints,
    write_text_atomic,
)
from ...train.distributed import resolve_device
from ...train.trainer import RESUMABLE_KEYS, TrainConfig, budget_left, train
from .budgets import StudyConfig
from .compression import row_compression, row_prepare
from .report import write_outputs
from .rows import SEED_POINTS, Row, rows_for

# ---------------------------------------------------------------------------------------------------------------
# Planning: each row's model and training config
# ---------------------------------------------------------------------------------------------------------------


def _slug(name: str) -> str:
    return name.replace("/", "_")


def row_model_config(row: Row, base: TransformerConfig) -> TransformerConfig:
    """``row``'s model: ``base`` with the row's FFN spec (and half its layers for the ``small`` row)."""
    config = base.replace(ffn=row.ffn)
    if row.half_layers:
        config = config.replace(enc_layers=math.ceil(base.enc_layers / 2), dec_layers=math.ceil(base.dec_layers / 2))
    return config


def row_train_config(row: Row, study: StudyConfig, out: Path) -> TrainConfig:
    """``row``'s training run in ``out / "rows" / <row>``."""
    budget = study.resolved_budget
    schedule = asdict(budget.train if row.schedule == "train" else budget.fine_tune)
    minutes = study.max_minutes if row.schedule == "train" else study.fine_tune_minutes
    if minutes is not None:
        schedule["max_minutes"] = minutes
    if study.max_steps is not None and row.schedule == "train":
        schedule["max_steps"] = study.max_steps
    extra = {"study": study.dataset, "budget": study.budget, "row": row.name, **row_compression(row)}
    return TrainConfig(
        dataset=study.dataset,
        data_dir=study.data_dir,
        out_dir=str(out / "rows" / _slug(row.name)),
        seed=study.seed,
        init_from=str(out / "rows" / "original" / "checkpoint_best.pt") if row.route == "convert" else "",
        device=study.device,
        precision=study.precision,
        progress=study.progress,
        keep_checkpoints=study.average,
        extra=extra,
        **schedule,
    )


def _identity(model: TransformerConfig, cfg: TrainConfig) -> str:
    """What a row trains, independent of its name: equal for rows that would train the same model the same way."""
    enc, dec = resolve_blocks(model.ffn.blocks, model.enc_layers, model.dec_layers)
    if model.ffn.method == "dense" or not (enc or dec):
        ffn = FFNSpec()
    else:
        ffn = FFNSpec(
            model.ffn.method, model.ffn.options, f"enc:{','.join(map(str, enc))};dec:{','.join(map(str, dec))}"
        )
    train_dict = {k: v for k, v in cfg.to_dict().items() if k not in ("out_dir", "progress", "device")}
    train_dict["extra"] = {k: v for k, v in cfg.extra.items() if k != "row"}
    return json.dumps({"model": model.replace(ffn=ffn).to_dict(), "train": train_dict}, sort_keys=True)


@dataclass(frozen=True)
class _Plan:
    row: Row
    model: TransformerConfig
    train: TrainConfig
    same_as: str | None

    @property
    def folder(self) -> Path:
        return Path(self.train.out_dir)


def _plan(study: StudyConfig, out: Path) -> dict[str, _Plan]:
    """Every row of the dataset, with the earlier row it duplicates (if any)."""
    base = study.base_model
    plans: dict[str, _Plan] = {}
    seen: dict[str, str] = {}
    for name, row in rows_for(study.dataset, base).items():
        model, cfg = row_model_config(row, base), row_train_config(row, study, out)
        if model.ffn.method != "dense":  # a spec that does not fit the model fails here, before any training
            FeedForward(model.d_model, model.d_ff, 0.0, model.ffn.method, model.ffn.options)
        key = _identity(model, cfg)
        plans[name] = _Plan(row, model, cfg, seen.get(key))
        seen.setdefault(key, name)
    return plans


def _to_run(study: StudyConfig, plans: dict[str, _Plan], rescore: bool = False) -> list[str]:
    """The requested rows plus what they need (the original for conversions, unless only decoding again; the
    row a duplicate copies)."""
    wanted = set(study.rows or plans)
    for name in list(wanted):
        plan = plans[name]
        if plan.row.route == "convert" and not rescore:
            wanted.add("original")
        if plan.same_as is not None:
            wanted.add(plan.same_as)
    return [name for name in plans if name in wanted]


# ---------------------------------------------------------------------------------------------------------------
# Running and scoring one row
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RowResult:
    """One line of the table (and of ``results.json``), measured from the row's own run."""

    name: str
    method: str
    blocks: str
    route: str
    note: str
    bleu: float
    bleu_seed: float
    bleu_tok_lc: float
    params: int
    params_ffn: int
    params_attention: int
    params_embeddings: int
    ratio: float
    ratio_ffn: float
    train_seconds: float
    steps: int
    epochs: float
    best_valid_bleu: float
    infer_seconds: float
    sentences: int
    sentences_per_s: float
    beam: int  # the test set's beam size; ``checkpoint`` (and ``average``, when > 0) what was decoded
    bleu_signature: str
    bleu_tok_lc_signature: str
    run_dir: str
    checkpoint: str
    same_as: str | None = None
    average: int = 0  # checkpoints averaged into ``checkpoint`` (0: the best one)
    seed: dict[str, Any] | None = None
    row: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    bleu_ci: float | None = None  # half-width of the test sacreBLEU's 95 % bootstrap interval
    seed_protocol: dict[str, Any] | None = None  # the seed's own validation BLEU (evaluate.bleu.seed_protocol_bleu)
    p_vs_original: float | None = None  # paired bootstrap p-value against the original, set when the table is written
    outputs_sha256: str | None = None  # of the test outputs scored (test.hyp), to pair them with the original's
    forward_seconds: float | None = None  # teacher-forced forward over the test pairs (evaluate.decoding)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RowResult:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def _ranges(indices: Sequence[int]) -> str:
    parts: list[list[int]] = []
    for i in indices:
        if parts and parts[-1][1] == i - 1:
            parts[-1][1] = i
        else:
            parts.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def describe_blocks(model: TransformerConfig) -> str:
    """Which FFN blocks the row compresses, e.g. ``enc 0-1, dec 0-1 of 3+3``."""
    size = f"{model.enc_layers}+{model.dec_layers}"
    enc, dec = resolve_blocks(model.ffn.blocks, model.enc_layers, model.dec_layers)
    if model.ffn.method == "dense" or not (enc or dec):
        return f"none of {size}"
    if len(enc) == model.enc_layers and len(dec) == model.dec_layers:
        return f"all {size}"
    parts = [f"enc {_ranges(enc)}" if enc else "", f"dec {_ranges(dec)}" if dec else ""]
    return ", ".join(p for p in parts if p) + f" of {size}"


def describe_method(row: Row) -> str:
    """The row's compression in a few words, e.g. ``TT r=1-2-2-2-2-1 + attn svd rank=64``."""
    options = row.ffn.options

    def opts(values: Mapping[str, Any]) -> str:
        return " ".join(
            f"{k}={'-'.join(map(str, v)) if isinstance(v, list | tuple) else v}" for k, v in sorted(values.items())
        )

    text = "dense" if row.ffn.method == "dense" else f"{row.ffn.method} {opts(options)}".strip()
    if row.half_layers:
        text += ", half the layers"
    if row.attention is not None:
        text += f" + attn {row.attention.method} {opts(row.attention.options)}"
    if row.embed_rank:
        text += f" + emb rank={row.embed_rank}"
    if row.embed_tt is not None:
        text += f" + emb tt {opts(row.embed_tt)}"
    return text


def _attention_params(model: Transformer) -> int:
    layers = [*model.encoder, *model.decoder]
    return sum(
        stored_params(getattr(layer, name))
        for layer in layers
        for name in ("self_attn", "cross_attn")
        if hasattr(layer, name)
    )


def _reference_params(base: TransformerConfig, vocab_size: int) -> dict[str, int]:
    """Parameters of the dense ``original`` model with the trained vocabulary."""
    with torch.device("meta"):
        dense = Transformer(base.replace(vocab_size=vocab_size, ffn=FFNSpec()))
    return parameter_report(dense)


def _uses_tokenized_refs(study: StudyConfig) -> bool:
    """IWSLT'14 in fairseq's prepared layout: hypotheses and references are already tokenised, lowercased text."""
    if study.dataset != "iwslt14":
        return False
    from ...data.parallel import _iwslt_layout  # the loader's own layout detection

    return _iwslt_layout(Path(study.data_dir))[0] == "fairseq"


def _load_row_model(row: Row, state: dict[str, Any], device: torch.device | str = "cpu") -> Transformer:
    model = Transformer(TransformerConfig.from_dict(state["model_config"]))
    prepare = row_prepare(row)
    if prepare is not None:
        prepare(model)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def load_row_model(study: StudyConfig, row: str, checkpoint: str | Path | None = None) -> tuple[Transformer, Tokenizer]:
    """Rebuild a row's trained model (in eval mode) and tokenizer from its checkpoint (default: its best).

    Works for every checkpoint of the study; checkpoints without a ``structure`` entry (written before it existed)
    need it for rows that compress attention projections or embeddings, which the model config does not describe.

    Raises:
        ValueError: for a row the study does not have.
        FileNotFoundError: if the checkpoint does not exist.
    """
    rows = rows_for(study.dataset, study.base_model)
    if row not in rows:
        raise ValueError(f"unknown row {row!r} for {study.dataset}; choose from {', '.join(rows)}")
    path = Path(checkpoint) if checkpoint else Path(study.out) / "rows" / _slug(row) / "checkpoint_best.pt"
    state = load_checkpoint(path)
    return _load_row_model(rows[row], state), Tokenizer(state["tokenizer"])


@dataclass(frozen=True)
class _Data:
    """What scoring a row reads: the test set, the validation pairs, whether the references are already tokenised
    (IWSLT'14 prepared by fairseq), and the seed's vocabulary for its validation protocol (``None``: not scored)."""

    test: ParallelCorpus
    valid: ParallelCorpus
    tokenized_refs: bool
    seed_vocabulary: frozenset[str] | None


def _load_data(study: StudyConfig) -> _Data:
    """Every split, read before any training, so that missing data (e.g. IWSLT'14's training text) fails first.

    The seed's validation protocol re-enacts how its code scored Multi30k, and applies to corpora laid out like it
    (``plain``); not to IWSLT'14, which that code never loaded.
    """
    train, valid, test = (load_dataset(study.dataset, study.data_dir, split) for split in ("train", "valid", "test"))
    vocabulary = None if study.dataset == "iwslt14" else seed_vocabulary(train.src, train.tgt)
    return _Data(test, valid, _uses_tokenized_refs(study), vocabulary)


def _seed_protocol(
    model: Transformer, tokenizer: Tokenizer, data: _Data, folder: Path, device
) -> dict[str, Any] | None:
    """The seed's validation BLEU of ``model`` (greedy outputs kept in ``folder/valid.greedy.hyp``), or ``None``
    (with a message) where it does not apply."""
    if data.seed_vocabulary is None:
        return None
    hyps, _ = translate(model, tokenizer, data.valid.src, beam=1, device=device)
    write_text_atomic(folder / "valid.greedy.hyp", _outputs_text(hyps))
    try:
        return seed_protocol_bleu(hyps, data.valid.src, data.valid.tgt, data.seed_vocabulary, SeedProtocol())
    except ValueError as error:  # e.g. no validation pair short enough
        _log(f"{folder.name}: the seed's validation protocol does not apply ({error})")
        return None


def _outputs_text(hyps: Sequence[str]) -> str:
    return "".join(h + "\n" for h in hyps)


def _read_outputs(result: RowResult, sentences: int) -> list[str] | None:
    """The test outputs ``result`` was scored from (its run's ``test.hyp``), if that file still holds them."""
    path = Path(result.run_dir) / "test.hyp"
    if result.outputs_sha256 is None or not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    if hashlib.sha256(text.encode()).hexdigest() != result.outputs_sha256:
        return None
    lines = text.splitlines()
    return lines if len(lines) == sentences else None


def _pair_with_original(table: Sequence[RowResult], test: ParallelCorpus) -> None:
    """Set every row's ``p_vs_original`` from its and the original's test outputs, when both were decoded the same
    way (beam, checkpoint choice); ``None`` where they cannot be paired."""
    original = next((r for r in table if r.name == "original"), None)
    baseline = None if original is None else _read_outputs(original, len(test))
    for result in table:
        result.p_vs_original = None
        if result is original or baseline is None:
            continue
        same = (result.beam, result.average, Path(result.checkpoint).name)
        if same != (original.beam, original.average, Path(original.checkpoint).name):
            continue
        outputs = _read_outputs(result, len(test))
        if outputs is not None:
            result.p_vs_original = paired_bootstrap_p(baseline, outputs, test.tgt)


def _score_row(plan: _Plan, study: StudyConfig, data: _Data, device: torch.device) -> RowResult:
    """Decode the test set with the row's best checkpoint (or the average of its last ``study.average``); sizes,
    ratios, BLEU (with its bootstrap interval, and the seed's own validation protocol) and timings."""
    folder = plan.folder
    summary = _read_json(folder / "summary.json", "training summary", _SUMMARY_KEYS)
    if study.average:
        kept = step_checkpoints(folder)[-study.average :]
        if not kept:
            raise FileNotFoundError(f"{folder} has no checkpoint_step<N>.pt to average (it ran without --average)")
        if len(kept) < study.average:  # the result would claim an average of N
            raise ValueError(
                f"--average {study.average}: {folder} kept only {len(kept)} validation checkpoint(s) "
                f"({', '.join(p.name for p in kept)}); train it with --average {study.average} or score it with "
                f"--average {len(kept)}"
            )
        checkpoint = folder / "checkpoint_average.pt"
        state = average_checkpoints([load_checkpoint(path) for path in kept])
        save_checkpoint(checkpoint, state)
    else:
        checkpoint = folder / "checkpoint_best.pt"
        state = load_checkpoint(checkpoint)
    model = _load_row_model(plan.row, state, device)
    tokenizer = Tokenizer(state["tokenizer"])
    beam = study.beam or study.resolved_budget.beam
    test, tokenized_refs = data.test, data.tokenized_refs
    hyps, seconds = translate(model, tokenizer, test.src, beam=beam, device=device)
    bleu, signature = sacre_bleu(hyps, test.tgt)
    tok_bleu, tok_signature = tokenized_bleu(hyps, test.tgt, pretokenized=tokenized_refs)
    seed_protocol = _seed_protocol(model, tokenizer, data, folder, device)  # after the timed test decoding
    forward = forward_seconds(model, tokenizer, test.src, test.tgt, device=device)
    outputs = _outputs_text(hyps)
    write_text_atomic(folder / "test.hyp", outputs)  # its hash in the result pairs it with the original's
    report = parameter_report(model)
    reference = _reference_params(study.base_model, model.config.vocab_size)
    return RowResult(
        name=plan.row.name,
        method=describe_method(plan.row),
        blocks=describe_blocks(plan.model),
        route=plan.row.route,
        note=plan.row.note,
        bleu=bleu,
        bleu_seed=tok_bleu / 100.0 if tokenized_refs else seed_bleu(hyps, test.tgt),
        bleu_tok_lc=tok_bleu,
        params=report["total"],
        params_ffn=report["ffn"],
        params_attention=_attention_params(model),
        params_embeddings=report["embeddings"],
        ratio=reference["total"] / max(report["total"], 1),
        ratio_ffn=reference["ffn"] / max(report["ffn"], 1),
        train_seconds=summary["train_seconds"],
        steps=summary["steps"],
        epochs=summary["epochs"],
        best_valid_bleu=summary["best_valid_bleu"],
        infer_seconds=seconds,
        sentences=len(test),
        sentences_per_s=len(test) / max(seconds, 1e-9),
        beam=beam,
        average=study.average,
        bleu_signature=signature,
        bleu_tok_lc_signature=tok_signature,
        run_dir=str(folder),
        checkpoint=str(checkpoint),
        row=plan.row.to_dict(),
        model=state["model_config"],
        train=plan.train.to_dict(),
        bleu_ci=bleu_interval(hyps, test.tgt),
        seed_protocol=seed_protocol,
        outputs_sha256=hashlib.sha256(outputs.encode()).hexdigest(),
        forward_seconds=forward,
    )


def _read_json(path: Path, what: str, keys: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON object in ``path`` (one of the study's own files), with at least ``keys``.

    Raises:
        ValueError: naming the file, when it is not such an object (hand-edited, cut short, of another version).
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        problem = f"not valid JSON ({error})"
    else:
        missing = [key for key in keys if key not in data] if isinstance(data, dict) else None
        if missing == []:
            return data
        problem = f"lacks {', '.join(map(repr, missing))}" if missing else f"holds a {type(data).__name__}"
    raise ValueError(f"{path} is not a readable {what}: {problem}; delete it and run again")


_SUMMARY_KEYS = ("steps", "epochs", "train_seconds", "best_valid_bleu")  # what a row's result takes from its run
# what reading a result back needs: RowResult's fields without a default, and the configuration it was run with
_RESULT_KEYS = (
    *(f.name for f in fields(RowResult) if f.default is MISSING and f.default_factory is MISSING),
    "model",
    "train",
)


def _read_result(path: Path) -> dict[str, Any]:
    """A row's ``result.json``: its stored figures and the configuration they were measured with."""
    return _read_json(path, "row result", _RESULT_KEYS)


def _check_same_run(plan: _Plan, saved: Mapping[str, Any], path: Path) -> None:
    """A row's folder is reused (skipped, resumed or scored) only when it holds what this invocation would run.

    Raises:
        ValueError: naming the file, the settings that differ and what to do.
    """
    # Paths are not part of a run's identity: a study folder copied to another machine (or renamed) is still itself.
    checks = (
        ("model", saved["model"], plan.model.to_dict(), ("vocab_size",)),
        ("training", saved["train"], plan.train.to_dict(), (*RESUMABLE_KEYS, "init_from")),
    )
    for kind, stored, current, ignore in checks:
        keys = sorted((set(stored) | set(current)) - set(ignore))
        diff = [f"{k}: {stored.get(k)!r} != {current.get(k)!r}" for k in keys if stored.get(k) != current.get(k)]
        if diff:
            raise ValueError(
                f"{path} was run with a different {kind} config ({'; '.join(diff)}); delete {path.parent} to rerun "
                "it, or choose another --out"
            )


def _copy_result(source: RowResult, plan: _Plan, dataset: str) -> RowResult:
    """The result of a row that trains exactly what ``source`` trained (kept current with the source's result),
    with its own name, description and seed figure."""
    result = RowResult.from_dict(source.to_dict())
    result.name, result.note, result.same_as = plan.row.name, plan.row.note, source.name
    result.method, result.row = describe_method(plan.row), plan.row.to_dict()
    result.seed = _seed_reference(dataset, plan.row.name)
    return result


def _scored_as_asked(stored: Mapping[str, Any], study: StudyConfig) -> bool:
    """Whether a stored result was decoded with this invocation's beam and checkpoint choice (``--average``)."""
    beam = study.beam or study.resolved_budget.beam
    checkpoint = "checkpoint_average.pt" if study.average else "checkpoint_best.pt"
    same_average = stored.get("average", study.average) == study.average  # results before the field: as asked
    return stored.get("beam") == beam and Path(stored.get("checkpoint", "")).name == checkpoint and same_average


def _log(message: str) -> None:
    print(f"[study] {message}", flush=True)


def _run_row(
    plan: _Plan,
    results: Mapping[str, RowResult],
    study: StudyConfig,
    data: _Data,
    device: torch.device,
    rescore: bool = False,
) -> RowResult | None:
    """Copy a duplicate's source, skip a finished row, or train (resuming if interrupted, continuing if its budget was
    raised) and score the row. With ``rescore``, train nothing: decode a trained row's test set again (``None`` for
    a row not trained yet)."""
    folder = plan.folder
    result_path = folder / "result.json"
    name = plan.row.name
    if plan.same_as is not None:
        if rescore and plan.same_as not in results:  # its source is not trained (or could not be decoded)
            return None
        _log(f"{name}: same model and training as {plan.same_as}; its result is reused")
        result = _copy_result(results[plan.same_as], plan, study.dataset)
        return _save_result(result, study, result_path)
    with _row_lock(folder):
        summary_path = folder / "summary.json"
        if rescore:
            return _rescore_row(plan, study, data, device)
        # a finished row whose budget was raised since (--max-minutes / --max-steps) trains on from its last checkpoint
        summary = _read_json(summary_path, "training summary", _SUMMARY_KEYS) if summary_path.exists() else None
        extend = summary is not None and budget_left(plan.train, summary)
        if result_path.exists():
            stored = _read_result(result_path)
            _check_same_run(plan, stored, result_path)
            if not extend and _scored_as_asked(stored, study):
                _log(f"{name}: finished earlier, skipped ({result_path})")
                return RowResult.from_dict(stored)
            if not extend:
                _log(f"{name}: finished earlier; scoring it again with this invocation's --beam / --average")
        config_path = folder / "config.json"  # written before the first checkpoint: what is there to resume or score
        if config_path.exists():
            _check_same_run(plan, _read_json(config_path, "run config", ("model", "train")), config_path)
        if extend or summary is None:
            resume = (folder / "checkpoint_last.pt").exists()
            how = "continuing (budget raised)" if extend else "resuming" if resume else "training"
            _log(f"{name}: {how} in {folder}")
            train(plan.model, plan.train, resume=resume, prepare=row_prepare(plan.row))
        _log(f"{name}: decoding the test set ({len(data.test)} sentences)")
        return _save_result(_score_row(plan, study, data, device), study, result_path)


def _rescore_row(plan: _Plan, study: StudyConfig, data: _Data, device: torch.device) -> RowResult | None:
    """``--rescore``: decode a trained row's test set again (``None`` for a row not trained). A row that cannot be
    decoded (e.g. ``--average`` on a run kept without step checkpoints) keeps its stored result, with a message."""
    folder, name = plan.folder, plan.row.name
    result_path = folder / "result.json"
    if not (folder / "summary.json").exists():
        _log(f"{name}: not trained (or not finished) in {folder}; skipped (--rescore trains nothing)")
        return None
    config = _read_json(folder / "config.json", "run config", ("model", "train"))
    _check_same_run(plan, config, folder / "config.json")
    _log(f"{name}: decoding the test set again ({len(data.test)} sentences)")
    try:
        result = _score_row(plan, study, data, device)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        kept = result_path.exists()
        _log(f"{name}: could not decode it again ({error}); {'its stored result is kept' if kept else 'left out'}")
        return RowResult.from_dict(_read_result(result_path)) if kept else None
    result.train = config["train"]  # the budget it was trained under, not this invocation's
    return _save_result(result, study, result_path)


def _save_result(result: RowResult, study: StudyConfig, path: Path) -> RowResult:
    result.seed = _seed_reference(study.dataset, result.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(result.to_dict(), indent=1) + "\n")  # other processes may read it now
    return result


@contextmanager
def _row_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` while a row is trained and scored, so that study invocations running side by side on
    one machine (``scripts/study_parallel.sh``) never train one row twice: a second one waits for the first, then
    finds the row finished. Not under torchrun, whose ranks train each row together."""
    if fcntl is None or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"{folder.name}: another study process is running this row; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _seed_reference(dataset: str, name: str) -> dict[str, Any] | None:
    point = SEED_POINTS["iwslt14" if dataset == "iwslt14" else "multi30k"].get(name)
    return None if point is None else asdict(point)


def _test_split_if_present(study: StudyConfig) -> ParallelCorpus | None:
    """The test split for ``--report-only`` (which needs no data otherwise), for the p-values: ``None`` when it cannot
    be read, and the table has none."""
    try:
        return load_dataset(study.dataset, study.data_dir, "test")
    except (FileNotFoundError, ValueError):
        return None


def run_study(
    study: StudyConfig, argv: Sequence[str] = (), *, report_only: bool = False, rescore: bool = False
) -> list[RowResult]:
    """Run (or skip, or resume) the requested rows; write ``table.md``, ``results.json``, ``bleu_vs_ratio.png`` and
    ``valid_bleu_curves.png``.

    With ``report_only`` nothing is trained or decoded: the outputs are written from the rows finished so far
    (e.g. after several invocations ran groups of rows side by side on one machine). With ``rescore`` nothing is
    trained either, but every requested row trained so far decodes the test set again, one row after another in
    this process: on an otherwise idle machine, the decoding times of rows trained side by side become comparable.

    Returns:
        The table's rows: every row of the dataset with a result in ``study.out``, in table order.

    Raises:
        ValueError: for a study folder of another dataset or budget, a row folder of another configuration.
        FileNotFoundError: when the dataset's train, valid or test files are missing (before any training), or when
            ``report_only`` finds no study folder.
    """
    if report_only and rescore:
        raise ValueError("report_only and rescore exclude each other (report_only decodes nothing)")
    out = Path(study.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a study folder; choose another --out")
    marker = out / "study.json"
    identity = {"dataset": study.dataset, "budget": study.budget}
    if marker.exists():
        saved = _read_json(marker, "study marker", tuple(identity))
        if {k: saved.get(k) for k in identity} != identity:
            raise ValueError(
                f"{out} holds a {saved.get('dataset')} study at budget {saved.get('budget')!r}, not "
                f"{study.dataset} at {study.budget!r}; choose another --out"
            )
    plans = _plan(study, out.resolve())  # absolute paths: a conversion row's init_from must not depend on the cwd
    if (report_only or rescore) and not out.is_dir():
        what = "report" if report_only else "score again"
        raise FileNotFoundError(f"{out} does not exist: no study to {what} there (check --out)")
    if not report_only:
        data = _load_data(study)
        device = resolve_device(study.device)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(marker, json.dumps(identity, indent=1) + "\n")

    start = time.perf_counter()
    results: dict[str, RowResult] = {}
    if not report_only:
        for name in _to_run(study, plans, rescore):
            result = _run_row(plans[name], results, study, data, device, rescore)
            if result is not None:
                results[name] = result
    table: list[RowResult] = []
    for name, plan in plans.items():  # rows finished by earlier invocations belong to the table too
        if name not in results and (plan.folder / "result.json").exists():
            saved = _read_result(plan.folder / "result.json")
            if plan.same_as is None:  # one table, one configuration (a duplicate holds its source's result)
                _check_same_run(plan, saved, plan.folder / "result.json")
            if plan.same_as in results:
                results[name] = _copy_result(results[plan.same_as], plan, study.dataset)
            else:
                results[name] = RowResult.from_dict(saved)
        if name in results:
            table.append(results[name])
    unscored = [name for name, plan in plans.items() if name not in results and (plan.folder / "summary.json").exists()]
    if report_only and unscored:  # trained (or training) but never scored: not in the table, and said so
        print(f"[study] not in the table (trained, not scored yet: run the study again): {', '.join(unscored)}")
    test = _test_split_if_present(study) if report_only else data.test
    if test is not None:
        _pair_with_original(table, test)
    write_outputs(table, study, plans, argv, time.perf_counter() - start)
    return table
