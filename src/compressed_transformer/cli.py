"""The ``compressed-transformer`` command: thin argparse front-end over the studies, the engine and the benchmark.

Each subcommand lives in its own module, which exposes ``register(subparsers)``; that function adds its parser
and sets ``func`` (called with the parsed namespace, returning an exit code or ``None``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

# (module, ...) each with ``register(subparsers)``; imported when the parser is built, never at package import.
SUBCOMMAND_MODULES = (
    "compressed_transformer.studies.mnist",
    "compressed_transformer.translate",
    "compressed_transformer.studies.translation",
    "compressed_transformer.bench",
    "compressed_transformer.calibrate",
)


def add_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    *,
    help: str,
    doc: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    main: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """A subcommand whose options come from ``add_arguments`` and whose description is ``doc``'s first paragraph
    (with defaults shown), run by ``main``."""
    parser = subparsers.add_parser(
        name, help=help, description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_arguments(parser)
    parser.set_defaults(func=main)
    return parser


def run_module(
    module: str,
    doc: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    main: Callable[[argparse.Namespace], int],
) -> int:
    """``python -m <module>`` for a module that is also a subcommand."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
    add_arguments(parser)
    return run_reporting_errors(main, parser.parse_args())


def run_reporting_errors(main: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """``main(args)``, with bad input (``ValueError``) and file-system errors (``OSError``: missing files, an
    ``--out`` that cannot be a folder, ...) reported in one line on stderr and exit status 2."""
    from .provenance import run_revision

    run_revision()  # the code this process loaded, stamped on what it writes however long it runs
    try:
        code = main(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return int(code or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compressed-transformer",
        description="Compress feed-forward blocks with TT, Tucker, SVD, pruning and Sparse VD; run the studies.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting_errors(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
