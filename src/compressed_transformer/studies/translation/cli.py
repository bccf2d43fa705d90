"""The ``compressed-transformer study`` subcommand: arguments, the study config they give, and ``main``."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch

from ...train.trainer import PRECISIONS
from .budgets import BUDGETS, StudyConfig
from .report import format_table
from .rows import DATASETS, ROW_NAMES
from .study import run_study

# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _default_data_dir(dataset: str) -> str:
    from ...data.mnist import DATA_ENV_VAR

    root = os.environ.get(DATA_ENV_VAR)
    return str(Path(root) / dataset) if root else f"data/{dataset}"


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    """The study config of parsed arguments.

    Raises:
        ValueError: for unknown rows or budgets, a ``--rows`` list of no row, ``--threads`` below 1, or a ``plain``
            study without ``--data-dir``.
    """
    if args.dataset == "plain" and not args.data_dir:
        raise ValueError("a 'plain' study needs --data-dir (a folder of train/valid/test.{de,en} files)")
    from ...translate import parse_option

    model = dict(parse_option(text) for text in args.model or [])
    rows: tuple[str, ...] = ()
    if args.rows not in (None, "", "all"):
        rows = tuple(dict.fromkeys(r.strip() for r in args.rows.split(",") if r.strip()))
        if not rows:  # e.g. an empty shell variable between commas: not "all" (hours of training)
            raise ValueError(f"--rows {args.rows!r} names no row; omit --rows (or give 'all') for every row")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads} (omit it for PyTorch's default)")
    return StudyConfig(
        dataset=args.dataset,
        out=args.out,
        data_dir=args.data_dir or _default_data_dir(args.dataset),
        budget=args.budget,
        rows=rows,
        device=args.device,
        precision=args.precision,
        max_minutes=args.max_minutes,
        fine_tune_minutes=args.fine_tune_minutes,
        max_steps=args.max_steps,
        beam=args.beam,
        seed=args.seed,
        progress=not args.no_progress,
        model=model,
        average=args.average or 0,
    )


_MERGE_IGNORES = ("rows", "model", "max_minutes", "fine_tune_minutes", "max_steps", "beam", "average", "threads")


def _check_merge_args(args: argparse.Namespace) -> None:
    """``--merge`` trains and decodes nothing: refuse the options that would mean something else, and an ``--out``
    that is one of the merged folders (its own table would be overwritten)."""
    given = [name for name in _MERGE_IGNORES if getattr(args, name, None)]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"--merge only reads finished study folders; {flags} would do nothing there")
    out = Path(args.out).resolve()
    if any(Path(folder).resolve() == out for folder in args.merge):
        raise ValueError(f"--out {args.out} is one of the merged folders; write the merged table elsewhere")


def main(args: argparse.Namespace) -> int:
    if args.merge:
        from .seeds import format_merged_table, merge_studies, write_merged

        _check_merge_args(args)
        merged = merge_studies(args.merge, args.dataset, args.budget)
        write_merged(merged, args.out, shlex.join(["compressed-transformer", *sys.argv[1:]]))
        print(format_merged_table(merged))
        print(f"\noutputs in {args.out}/ (table.md, results.json)")
        return 0
    study = config_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run_study(study, sys.argv[1:], report_only=args.report_only, rescore=args.rescore)
    print(format_table(rows, study.dataset))
    print(f"\noutputs in {study.out}/ (table.md, results.json, bleu_vs_ratio.png, valid_bleu_curves.png)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``study`` subcommand (the seed's translation tables)."""
    from . import __doc__ as study_doc  # the package's docstring, not this module's

    parser = subparsers.add_parser(
        "study",
        help="run the seed's translation table (Multi30k or IWSLT'14): one training run per row, then "
        "table.md / results.json / bleu_vs_ratio.png",
        description=study_doc.split("\n\n")[0],
    )
    parser.add_argument("dataset", choices=DATASETS, help="multi30k, iwslt14, or plain (Multi30k's rows, any corpus)")
    parser.add_argument(
        "--rows",
        help="comma-separated rows (default all). multi30k/plain: "
        + ", ".join(ROW_NAMES["multi30k"])
        + "; iwslt14: "
        + ", ".join(ROW_NAMES["iwslt14"]),
    )
    parser.add_argument(
        "--budget",
        choices=tuple(BUDGETS),
        default="small",
        help="full: the seed's sizes (GPU); small: the small preset, minutes-bounded rows (CPU); tiny: tests",
    )
    parser.add_argument("--out", required=True, help="study folder (rows/<row>/ run folders, table, results, plot)")
    parser.add_argument(
        "--data-dir", help="the dataset's folder (default $COMPRESSED_TRANSFORMER_DATA/<dataset>, else data/<dataset>)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="training: bf16 autocast or fp32 (auto: bf16 on CUDA)",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        help="bound of each training run (default: the budget's); raising it continues rows finished under a lower one",
    )
    parser.add_argument(
        "--max-steps", type=int, help="update bound of each from-scratch run (default: the budget's; 0: none)"
    )
    parser.add_argument("--fine-tune-minutes", type=float, help="bound of each fine-tuning run (default: the budget's)")
    parser.add_argument("--beam", type=int, help="test-set beam (default: the budget's)")
    parser.add_argument("--seed", type=int, default=1, help="seed of every row")
    parser.add_argument(
        "--model",
        action="append",
        metavar="KEY=VALUE",
        help="change the budget's model for every row, e.g. dropout=0.3 (repeatable)",
    )
    parser.add_argument(
        "--average",
        type=int,
        metavar="N",
        help="score each row with the mean weights of its last N validation checkpoints (default: its best one)",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (1 is fastest on a busy CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    once = parser.add_mutually_exclusive_group()
    once.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write table.md / results.json / bleu_vs_ratio.png from the rows finished in --out "
        "(after groups of rows ran side by side, e.g. scripts/study_parallel.sh)",
    )
    once.add_argument(
        "--rescore",
        action="store_true",
        help="train nothing: score every trained row again (test set, and the seed's validation protocol), one row "
        "after another, then write the outputs (comparable decoding times on an otherwise idle machine, after rows "
        "ran side by side; fills in the columns of results scored before they existed)",
    )
    once.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="train nothing: merge study folders that differ only in --seed into --out (each row's mean and "
        "standard deviation across seeds)",
    )
    parser.set_defaults(func=main)
