"""``compressed-transformer translate train|eval|translate``: the translation engine's command line.

Examples::

    compressed-transformer translate train --config configs/translation/multi30k_small.toml \\
        --data-dir /work/shared/data/multi30k --out runs/m30k-small-dense
    compressed-transformer translate train --preset small --ffn tt --ffn-opt ranks=1,2,2,2,2,1 --ffn-blocks 1/2 ...
    compressed-transformer translate eval --checkpoint runs/m30k-small-dense/checkpoint_best.pt \\
        --src test_2016_flickr.de.gz --ref test_2016_flickr.en.gz --beam 5
    echo "Ein Hund läuft." | compressed-transformer translate translate --checkpoint CKPT
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

__all__ = ["build_configs", "model_prepare", "parse_option", "register"]


def parse_option(text: str) -> tuple[str, Any]:
    """Parse ``key=value``; the value as JSON when possible, ``a,b,c`` as a list, else a string.

    Raises:
        ValueError: if there is no ``=``.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected KEY=VALUE, got {text!r}")

    def one(value: str) -> Any:
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value

    raw = raw.strip()
    value = (
        [one(v.strip()) for v in raw.split(",") if v.strip()] if "," in raw and not raw.startswith("[") else one(raw)
    )
    return key.strip().replace("-", "_"), value


# Numeric flags of ``translate train`` and of the decoding actions -> the least value each takes.
_TRAIN_BOUNDS = {
    "--vocab-size": 1,
    "--max-steps": 0,
    "--max-epochs": 0,
    "--max-minutes": 0,
    "--max-tokens": 1,
    "--accum-steps": 1,
    "--warmup": 0,
    "--kl-weight": 0,
    "--eval-every": 0,
    "--save-every": 1,
    "--log-every": 1,
    "--keep-checkpoints": 0,
}
_DECODING_BOUNDS = {"--beam": 1, "--max-tokens": 1}


def _check_flags(args: argparse.Namespace, bounds: dict[str, int]) -> None:
    """Check the numeric flags of ``bounds`` (those given) and ``--device``, ``--lr``, ``--length-penalty`` where the
    action has them, so that bad values fail in one line before any work.

    Raises:
        ValueError: naming the first bad flag.
    """
    for flag, least in bounds.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        if isinstance(value, float) and not (math.isfinite(value) and value >= least):
            raise ValueError(f"{flag} must be a finite number >= {least}, got {value}")
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    lr = getattr(args, "lr", None)
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {lr}")
    penalty = getattr(args, "length_penalty", None)
    if penalty is not None and not math.isfinite(penalty):
        raise ValueError(f"--length-penalty must be a finite number, got {penalty}")
    device = getattr(args, "device", None)
    if device not in (None, "auto"):
        import torch

        try:
            torch.device(device)
        except RuntimeError:
            raise ValueError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N") from None


def build_configs(args: argparse.Namespace):
    """Resolve preset < ``--config`` file < command-line flags into ``(TransformerConfig, TrainConfig)``.

    With ``--resume``, the run folder's ``config.json`` is the base instead of the preset.

    Raises:
        ValueError: for unknown keys, presets or bad values.
        FileNotFoundError: for a ``--config`` file that does not exist.
    """
    from compressed_transformer.models.transformer import FFNSpec, TransformerConfig, preset
    from compressed_transformer.train.trainer import TrainConfig

    _check_flags(args, _TRAIN_BOUNDS)
    file: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if path.is_dir():
            raise FileNotFoundError(f"config file {path} is a folder, not a file")
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            file = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path} is not valid TOML: {error}") from error
        unknown = set(file) - {"preset", "model", "ffn", "train"}
        if unknown:
            raise ValueError(f"{path}: unknown sections/keys {sorted(unknown)}; use preset, [model], [ffn], [train]")
    saved = None
    if getattr(args, "resume", False) and args.out and (Path(args.out) / "config.json").is_file():
        # Resuming: the run folder's resolved config is the base, so only what changes needs repeating.
        saved = json.loads((Path(args.out) / "config.json").read_text())
    preset_name = args.preset or file.get("preset")
    if saved is None:
        base = preset(preset_name or "small").to_dict()
    else:  # a named preset still applies (so a conflicting one is reported), but not its FFN or vocabulary
        named = {} if preset_name is None else preset(preset_name).to_dict()
        named = {k: v for k, v in named.items() if k not in ("ffn", "vocab_size")}
        base = {**saved["model"], **named}
    model_changes = dict(file.get("model", {}))
    for text in args.model or []:
        key, value = parse_option(text)
        model_changes[key] = value
    if args.vocab_size is not None:
        model_changes["vocab_size"] = args.vocab_size
    ffn = dict(base.pop("ffn"))
    if "ffn" in file:
        ffn = {"method": "dense", "options": {}, "blocks": "all", **file["ffn"]}
    ffn["options"] = dict(ffn.get("options", {}))
    if args.ffn:
        if args.ffn != ffn.get("method"):
            ffn["options"] = {}
        ffn["method"] = args.ffn
    if args.ffn_opt and ffn.get("method") == "dense":  # a dense FFN would ignore them
        raise ValueError("--ffn-opt needs a compressed --ffn METHOD; the FFN is dense")
    for text in args.ffn_opt or []:
        key, value = parse_option(text)
        ffn["options"][key] = value
    if args.ffn_blocks:
        ffn["blocks"] = args.ffn_blocks
    known_model = set(TransformerConfig.__dataclass_fields__) - {"ffn"}
    unknown = set(model_changes) - known_model
    if unknown:
        raise ValueError(f"unknown model settings {sorted(unknown)}; known: {sorted(known_model)}")
    model_config = TransformerConfig(**{**base, **model_changes, "ffn": FFNSpec(**ffn)})

    train = {**(saved["train"] if saved is not None else {}), **file.get("train", {})}
    flags = {
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "out_dir": args.out,
        "max_steps": args.max_steps,
        "max_epochs": args.max_epochs,
        "max_minutes": args.max_minutes,
        "device": args.device,
        "max_tokens": args.max_tokens,
        "accum_steps": args.accum_steps,
        "lr": args.lr,
        "warmup_steps": args.warmup,
        "seed": args.seed,
        "eval_every": args.eval_every,
        "save_every": args.save_every,
        "log_every": args.log_every,
        "init_from": args.init_from,
        "kl_weight": args.kl_weight,
        "spm_type": args.spm_type,
        "precision": args.precision,
        "keep_checkpoints": args.keep_checkpoints,
    }
    train.update({k: v for k, v in flags.items() if v is not None})
    if args.embed or args.embed_opt:
        train["extra"] = {**train.get("extra", {}), "embedding": _embedding_spec(args, train.get("extra", {}))}
    if args.attn or args.attn_opt:
        from compressed_transformer.layers import METHODS

        saved_attention = train.get("extra", {}).get("attention") or {}
        attention = _compression_spec("attn", args.attn, args.attn_opt, saved_attention, METHODS)
        train["extra"] = {**train.get("extra", {}), "attention": attention}
    if args.download:
        train["download"] = True
    if args.no_progress:
        train["progress"] = False
    known_train = set(TrainConfig.__dataclass_fields__)
    unknown = set(train) - known_train
    if unknown:
        raise ValueError(f"unknown training settings {sorted(unknown)}; known: {sorted(known_train)}")
    return model_config, TrainConfig(**train)


def _compression_spec(flag: str, method: str | None, texts: list[str] | None, saved: dict, known) -> dict[str, Any]:
    """``{"method", "options"}`` of ``--<flag>`` / ``--<flag>-opt`` over a resumed run's ``saved`` spec (whose
    options carry over while the method stays the same).

    Raises:
        ValueError: for a method not in ``known``.
    """
    method = method or saved.get("method")
    if method is None:
        raise ValueError(f"--{flag}-opt needs --{flag} METHOD")
    if method not in known:
        raise ValueError(f"--{flag} must be one of {', '.join(known)}, got {method!r}")
    options = dict(saved.get("options", {})) if method == saved.get("method") else {}
    options.update(parse_option(text) for text in texts or [])
    return {"method": method, "options": options}


def _embedding_spec(args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    """The spec of ``--embed`` / ``--embed-opt``, checked before any work.

    Raises:
        ValueError: for an unknown method or option.
    """
    from compressed_transformer.compress import EMBEDDING_OPTIONS

    spec = _compression_spec("embed", args.embed, args.embed_opt, extra.get("embedding") or {}, EMBEDDING_OPTIONS)
    method, options = spec["method"], spec["options"]
    unknown = sorted(set(options) - set(EMBEDDING_OPTIONS[method]))
    if unknown:
        raise ValueError(f"unknown --embed-opt {unknown} for {method!r}; known: {list(EMBEDDING_OPTIONS[method])}")
    if method == "svd" and "rank" not in options:
        raise ValueError("--embed svd needs --embed-opt rank=R")
    if method == "tt" and not {"ranks", "eps"} & set(options):
        raise ValueError("--embed tt needs --embed-opt ranks=R (and/or eps=E)")
    return spec


def model_prepare(train_config) -> Any:
    """The trainer's ``prepare`` for a run whose ``extra`` compresses the attention projections and/or the embedding
    table(s) (:func:`~compressed_transformer.train.prepare.prepare_from_extra`; a study row's ``embed_rank`` /
    ``embed_tt`` too, so ``translate train --resume`` continues any study row); ``None`` when it compresses neither."""
    from compressed_transformer.train.prepare import prepare_from_extra

    return prepare_from_extra(train_config.extra)


def _train(args: argparse.Namespace) -> int:
    from compressed_transformer.train.trainer import TrainingDiverged, train

    model_config, train_config = build_configs(args)
    try:
        summary = train(model_config, train_config, resume=args.resume, prepare=model_prepare(train_config))
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if summary:
        print(json.dumps(summary))
    return 0


def _load(args: argparse.Namespace):
    from compressed_transformer.data.tokenizer import Tokenizer
    from compressed_transformer.train.checkpoint import load_checkpoint, load_model
    from compressed_transformer.train.distributed import resolve_device

    device = resolve_device(args.device)
    state = load_checkpoint(args.checkpoint)
    model = load_model(state, device).eval()
    return model, Tokenizer(state["tokenizer"]), device


def _eval(args: argparse.Namespace) -> int:
    from compressed_transformer.data.parallel import load_dataset, read_lines
    from compressed_transformer.evaluate.bleu import bleu_interval, sacre_bleu, seed_bleu, tokenized_bleu
    from compressed_transformer.evaluate.decoding import translate
    from compressed_transformer.models.transformer import parameter_report
    from compressed_transformer.train.trainer import compression_ratio

    _check_flags(args, _DECODING_BOUNDS)
    if args.src and args.ref:
        src, ref = read_lines(args.src), read_lines(args.ref)
        if len(src) != len(ref):
            raise ValueError(f"{args.src} has {len(src)} lines but {args.ref} has {len(ref)}; they must be aligned")
    elif args.dataset and args.data_dir:
        corpus = load_dataset(args.dataset, args.data_dir, args.split)
        src, ref = corpus.src, corpus.tgt
    else:
        raise ValueError("give --src FILE --ref FILE, or --dataset NAME --data-dir DIR [--split test]")
    if args.seed_protocol and not (args.dataset and args.data_dir):
        raise ValueError("--seed-protocol needs --dataset NAME --data-dir DIR (it reads the train and valid splits)")
    protocol_data = _seed_protocol_data(args) if args.seed_protocol else None  # missing splits fail before decoding
    model, tokenizer, device = _load(args)
    start = time.perf_counter()
    hyps, seconds = translate(
        model,
        tokenizer,
        src,
        beam=args.beam,
        length_penalty=args.length_penalty,
        max_tokens=args.max_tokens,
        device=device,
    )
    if args.output:
        Path(args.output).write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    bleu, signature = sacre_bleu(hyps, ref)
    tok_bleu, tok_signature = tokenized_bleu(hyps, ref, pretokenized=args.tokenized_ref)
    result = {
        "bleu": round(bleu, 2),
        "bleu_signature": signature,
        "bleu_ci": round(bleu_interval(hyps, ref), 2),
        # as the study scores it: references already tokenised are BLEU'd as they are (fairseq's figure)
        "bleu_seed": round(tok_bleu / 100.0 if args.tokenized_ref else seed_bleu(hyps, ref), 4),
        "bleu_tok_lc": round(tok_bleu, 2),
        "bleu_tok_lc_signature": tok_signature,
        "sentences": len(src),
        "seconds": round(seconds, 2),
        "sentences_per_s": round(len(src) / max(seconds, 1e-9), 2),
        "wall_seconds": round(time.perf_counter() - start, 2),
        "beam": args.beam,
        "checkpoint": str(args.checkpoint),
        "parameters": parameter_report(model),
        "compression_ratio": compression_ratio(model.config, model),
        "ffn": model.config.ffn.to_dict(),
    }
    if protocol_data is not None:
        result["seed_protocol"] = _seed_protocol(protocol_data, model, tokenizer, args.max_tokens, device)
    print(json.dumps(result))
    return 0


def _seed_protocol_data(args: argparse.Namespace) -> tuple[Any, frozenset[str]]:
    """The valid split and the seed's vocabulary of the train split, for ``--seed-protocol``."""
    from compressed_transformer.data.parallel import load_dataset
    from compressed_transformer.evaluate.bleu import seed_vocabulary

    train, valid = (load_dataset(args.dataset, args.data_dir, split) for split in ("train", "valid"))
    return valid, seed_vocabulary(train.src, train.tgt)


def _seed_protocol(data: tuple[Any, frozenset[str]], model, tokenizer, max_tokens: int, device) -> dict[str, Any]:
    """The seed's own validation BLEU (``evaluate.bleu.SeedProtocol``) of ``model``: greedy, on the valid split."""
    from compressed_transformer.evaluate.bleu import seed_protocol_bleu
    from compressed_transformer.evaluate.decoding import translate

    valid, vocabulary = data
    hyps, _ = translate(model, tokenizer, valid.src, beam=1, max_tokens=max_tokens, device=device)
    return seed_protocol_bleu(hyps, valid.src, valid.tgt, vocabulary)


def _translate(args: argparse.Namespace) -> int:
    from compressed_transformer.data.parallel import read_lines, split_lines
    from compressed_transformer.evaluate.decoding import translate

    _check_flags(args, _DECODING_BOUNDS)
    lines = split_lines(sys.stdin.read()) if args.input in (None, "-") else read_lines(args.input)
    model, tokenizer, device = _load(args)
    hyps, _ = translate(
        model,
        tokenizer,
        lines,
        beam=args.beam,
        length_penalty=args.length_penalty,
        max_tokens=args.max_tokens,
        device=device,
    )
    text = "".join(h + "\n" for h in hyps)
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
    return 0


def _export(args: argparse.Namespace) -> int:
    from compressed_transformer.size import compression_ratio, stored_bytes
    from compressed_transformer.train.checkpoint import export_model, load_checkpoint, load_model

    state = load_checkpoint(args.checkpoint)
    model = load_model(state)
    weights = export_model(state, args.out, model)
    print(
        json.dumps(
            {
                "weights": str(weights),
                "file_bytes": weights.stat().st_size,
                "stored_bytes": stored_bytes(model),
                "compression_ratio": round(compression_ratio(model), 4),
            }
        )
    )
    return 0


def _average(args: argparse.Namespace) -> int:
    from compressed_transformer.train.checkpoint import (
        average_checkpoints,
        load_checkpoint,
        load_model,
        save_checkpoint,
        step_checkpoints,
    )

    paths: list[Path] = []
    for item in map(Path, args.checkpoints):
        if item.is_dir():
            found = step_checkpoints(item)
            if not found:
                raise FileNotFoundError(f"{item} has no checkpoint_step<N>.pt files (train with --keep-checkpoints N)")
            paths.extend(found)
        else:
            paths.append(item)
    if args.last is not None:
        if args.last < 1:
            raise ValueError(f"--last must be >= 1, got {args.last}")
        paths = paths[-args.last :]
    state = average_checkpoints([load_checkpoint(path) for path in paths])
    load_model(state)  # the average must load as the model it claims to be before it is written
    save_checkpoint(args.out, state)
    print(json.dumps({"out": args.out, "averaged": [str(p) for p in paths], "steps": state["averaged_steps"]}))
    return 0


def _decoding_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint_best.pt / checkpoint_last.pt of a run, or an exported folder"
    )
    parser.add_argument("--beam", type=int, default=5, help="beam size (1 = greedy; default 5)")
    parser.add_argument("--length-penalty", type=float, default=1.0, help="score / length**penalty (default 1.0)")
    parser.add_argument("--max-tokens", type=int, default=4000, help="source tokens per decoding batch")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``translate`` subcommand (with ``train``, ``eval``, ``translate``) to the main parser."""
    from compressed_transformer.models.transformer import FFN_METHODS
    from compressed_transformer.train.trainer import PRECISIONS  # the trainer itself loads only when training

    parser = subparsers.add_parser("translate", help="train / evaluate / run the German-English Transformer")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    train = actions.add_parser("train", help="train a model (torchrun --nproc_per_node=N for DDP)")
    train.add_argument("--config", help="TOML file with preset, [model], [ffn], [train] (flags override it)")
    train.add_argument("--dataset", help="multi30k, iwslt14 or plain (train/valid/test.{de,en} files)")
    train.add_argument("--data-dir", help="folder holding the dataset's files")
    train.add_argument("--preset", help="base, small, iwslt or tiny (default small)")
    train.add_argument("--model", action="append", metavar="KEY=VALUE", help="override a model setting, e.g. d_ff=512")
    train.add_argument("--vocab-size", type=int, help="sentencepiece vocabulary size (upper bound)")
    train.add_argument("--spm-type", choices=("bpe", "unigram"), help="sentencepiece model type (default bpe)")
    train.add_argument("--ffn", help=f"FFN method: {', '.join(FFN_METHODS)}")
    train.add_argument("--ffn-opt", action="append", metavar="KEY=VALUE", help="FFN option, e.g. ranks=1,2,2,2,2,1")
    train.add_argument("--ffn-blocks", help="all, none, encoder, decoder, 1/2, 'enc:0,1;dec:2' or '0,1,7'")
    train.add_argument(
        "--embed",
        choices=("svd", "tt"),
        help="also compress the embedding table(s) and tied output: svd (--embed-opt rank=64) or tt (ranks=16)",
    )
    train.add_argument("--embed-opt", action="append", metavar="KEY=VALUE", help="embedding option, e.g. ranks=16")
    train.add_argument(
        "--attn", help="also compress every attention projection: any FFN method, e.g. svd (--attn-opt rank=64)"
    )
    train.add_argument("--attn-opt", action="append", metavar="KEY=VALUE", help="attention option, e.g. rank=64")
    train.add_argument("--out", help="run folder (config, metrics, checkpoints)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoint_last.pt")
    train.add_argument("--init-from", help="trained dense checkpoint to compress and fine-tune")
    train.add_argument("--max-steps", type=int)
    train.add_argument("--max-epochs", type=int)
    train.add_argument("--max-minutes", type=float, help="stop after this much training time (counts across resumes)")
    train.add_argument("--max-tokens", type=int, help="tokens per micro-batch per process")
    train.add_argument("--accum-steps", type=int, help="gradient accumulation steps")
    train.add_argument("--lr", type=float, help="peak learning rate")
    train.add_argument("--warmup", type=int, help="warm-up steps")
    train.add_argument("--seed", type=int)
    train.add_argument("--kl-weight", type=float, help="Sparse VD KL weight (svd-o)")
    train.add_argument("--eval-every", type=int, help="validate every N steps (0 = each epoch)")
    train.add_argument("--save-every", type=int)
    train.add_argument("--log-every", type=int)
    train.add_argument("--device", help="auto, cpu, cuda")
    train.add_argument("--precision", choices=PRECISIONS, help="bf16 autocast or fp32 (auto: bf16 on CUDA)")
    train.add_argument(
        "--keep-checkpoints",
        type=int,
        metavar="N",
        help="also keep the model of the last N validations as checkpoint_step<N>.pt (for translate average)",
    )
    train.add_argument("--download", action="store_true", help="download missing data files (needs internet)")
    train.add_argument("--no-progress", action="store_true", help="print JSON log lines instead of a tqdm bar")
    train.set_defaults(func=_train)

    evaluate = actions.add_parser("eval", help="score a checkpoint on a test pair; prints one JSON object")
    _decoding_flags(evaluate)
    evaluate.add_argument("--src", help="source file (plain text or .gz)")
    evaluate.add_argument("--ref", help="reference file (plain text or .gz)")
    evaluate.add_argument("--dataset", help="instead of --src/--ref: multi30k, iwslt14 or plain")
    evaluate.add_argument("--data-dir")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--output", help="write the hypotheses here")
    evaluate.add_argument(
        "--tokenized-ref", action="store_true", help="references are already tokenised (fairseq's text)"
    )
    evaluate.add_argument(
        "--seed-protocol",
        action="store_true",
        help="also score the valid split the way the seed's code does (greedy, one sentence per batch; needs "
        "--dataset and --data-dir)",
    )
    evaluate.set_defaults(func=_eval)

    run = actions.add_parser("translate", help="translate a file or stdin, one sentence per line")
    _decoding_flags(run)
    run.add_argument("--input", default="-", help="input file (default stdin)")
    run.add_argument("--output", default="-", help="output file (default stdout)")
    run.set_defaults(func=_translate)

    export = actions.add_parser(
        "export", help="write a checkpoint's model as model.safetensors + spm.model (no optimiser state)"
    )
    export.add_argument("--checkpoint", required=True, help="checkpoint_best.pt / checkpoint_last.pt of a run")
    export.add_argument("--out", required=True, help="folder to write (eval / translate --checkpoint read it)")
    export.set_defaults(func=_export)

    average = actions.add_parser(
        "average", help="average the weights of several checkpoints of one run into one checkpoint"
    )
    average.add_argument(
        "checkpoints", nargs="+", help="checkpoint files, or run folders (their checkpoint_step<N>.pt, oldest first)"
    )
    average.add_argument("--last", type=int, help="average only the last N of them")
    average.add_argument("--out", required=True, help="checkpoint to write (eval / translate / export read it)")
    average.set_defaults(func=_average)
