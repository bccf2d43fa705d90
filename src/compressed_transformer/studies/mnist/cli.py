"""The ``mnist`` subcommand: its arguments, the study config they give, and the entry point."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any

from ...data.mnist import DATA_ENV_VAR
from .config import DISTILL_MODES, ROWS, FineTuneConfig, MNISTStudyConfig, TrainConfig, asdict_shallow
from .report import print_summary
from .study import run_study


def _parse_ratio(text: str) -> tuple[str, float]:
    row, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return row.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROW=RATIO (e.g. tt+ft=100), got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``mnist`` subcommand."""
    parser = subparsers.add_parser(
        "mnist",
        help="train the seed's MNIST network, compress it with every method, write table.md / results.json / "
        "pareto.png",
        description=sys.modules[__package__].__doc__.split("\n\n")[0],  # the package docstring
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = MNISTStudyConfig()
    parser.add_argument(
        "--data-dir",
        help=f"folder holding the four MNIST .gz files (None: ${DATA_ENV_VAR}/mnist, else data/mnist)",
    )
    parser.add_argument("--out", default=defaults.out, help="output folder")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of every row")
    parser.add_argument("--hidden", type=int, default=defaults.hidden, help="hidden width")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to build")
    parser.add_argument(
        "--ratio",
        action="append",
        type=_parse_ratio,
        default=[],
        metavar="ROW=R",
        help="target whole-network ratio of a row (repeatable), e.g. --ratio tt+ft=100",
    )
    parser.add_argument("--epochs", type=int, default=defaults.original.epochs, help="epochs of the original network")
    parser.add_argument("--lr", type=float, default=defaults.original.lr, help="learning rate of the original network")
    parser.add_argument(
        "--batch-size", type=int, default=defaults.original.batch_size, help="batch size of every phase but Sparse VD"
    )
    parser.add_argument(
        "--shift", type=int, help="random-translation augmentation in pixels for every phase (None: per phase)"
    )
    parser.add_argument("--original", help="load the original network from an original.pt instead of training it")
    parser.add_argument("--ft-epochs", type=int, help="fine-tuning epochs of every +ft row (None: per method)")
    parser.add_argument("--svdo-epochs", type=int, default=defaults.sparse_vd.train.epochs, help="Sparse VD epochs")
    parser.add_argument("--svdo-lr", type=float, default=defaults.sparse_vd.train.lr, help="Sparse VD learning rate")
    parser.add_argument(
        "--svdo-shift",
        type=int,
        help=f"Sparse VD augmentation in pixels (None: --shift, else {defaults.sparse_vd.train.shift})",
    )
    parser.add_argument(
        "--svdo-batch-size", type=int, default=defaults.sparse_vd.train.batch_size, help="Sparse VD batch size"
    )
    parser.add_argument(
        "--svdo-warmup", type=float, default=defaults.sparse_vd.warmup_epochs, help="Sparse VD KL warm-up epochs"
    )
    parser.add_argument("--scratch-epochs", type=int, default=defaults.scratch.epochs, help="epochs of tt-scratch")
    parser.add_argument(
        "--distill",
        choices=DISTILL_MODES,
        default=defaults.distill,
        help="distil the original into the +ft rows: off, on, or both (adds <row>+kd rows)",
    )
    parser.add_argument(
        "--svd-plain", action="store_true", help="plain truncated SVD in the svd rows instead of the input-whitened one"
    )
    parser.add_argument("--sweep", action="store_true", help="trace each method's curve over ranks / sparsities")
    parser.add_argument("--train-limit", type=int, help="use only the first N training images")
    parser.add_argument("--test-limit", type=int, help="use only the first N test images")
    parser.add_argument(
        "--threads", type=int, default=defaults.threads, help="torch.set_num_threads; 0 keeps PyTorch's default"
    )
    parser.add_argument("--no-download", action="store_true", help="never download missing files")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the checksums (hand-made subsets with the canonical names)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=main)


def config_from_args(args: argparse.Namespace) -> MNISTStudyConfig:
    """The study config of parsed command-line arguments.

    Raises:
        ValueError: for unknown rows or impossible values.
    """
    defaults = MNISTStudyConfig()

    def phase(cfg: TrainConfig, **changes: Any) -> TrainConfig:
        changes.setdefault("batch_size", args.batch_size)
        if changes.get("shift") is None:
            changes.pop("shift", None)
            if args.shift is not None:
                changes["shift"] = args.shift
        return replace(cfg, **changes)

    rows = tuple(dict.fromkeys(r.strip() for r in args.rows.split(",") if r.strip()))
    finetune = {
        name: phase(cfg, **({} if args.ft_epochs is None else {"epochs": args.ft_epochs}))
        for name, cfg in asdict_shallow(defaults.finetune).items()
    }
    return MNISTStudyConfig(
        out=args.out,
        data_dir=args.data_dir,
        download=not args.no_download,
        verify=not args.no_verify,
        seed=args.seed,
        hidden=args.hidden,
        rows=rows,
        ratios=tuple(args.ratio),
        original=phase(defaults.original, epochs=args.epochs, lr=args.lr),
        original_checkpoint=args.original,
        finetune=FineTuneConfig(**finetune),
        scratch=phase(defaults.scratch, epochs=args.scratch_epochs),
        sparse_vd=replace(
            defaults.sparse_vd,
            train=phase(
                defaults.sparse_vd.train,
                epochs=args.svdo_epochs,
                lr=args.svdo_lr,
                batch_size=args.svdo_batch_size,
                shift=args.svdo_shift,
            ),
            warmup_epochs=args.svdo_warmup,
        ),
        distill=args.distill,
        svd_whiten=not args.svd_plain,
        sweep=args.sweep,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
        threads=args.threads,
        progress=not args.no_progress,
    )


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    result = run_study(config)
    print_summary(result)
    return 0
