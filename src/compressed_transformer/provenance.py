"""Where a result came from: the git revision of the code that produced it, and the software it ran on."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

__all__ = ["environment", "git_revision", "run_revision"]


def git_revision() -> str | None:
    """``HEAD``'s commit of the checkout this package runs from, with ``" (with uncommitted changes)"`` when tracked
    files differ from it; ``None`` outside a git checkout (e.g. an installed wheel) or without ``git``."""
    root = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


@functools.cache
def run_revision() -> str | None:
    """:func:`git_revision` as it read when this process first asked: the code a run loaded. The command-line entry
    points ask at start-up, so a result written hours later is stamped with that code, even when the checkout has
    moved on meanwhile (a study row trained in the background while commits land)."""
    return git_revision()


def environment() -> dict[str, Any]:
    """Python and torch versions, torch's thread count, the machine type and its CPU count (for ``results.json``)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
