"""The git revision stamped on every result."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch

from compressed_transformer import provenance


def test_revision_of_this_checkout_is_its_head_commit() -> None:
    root = Path(provenance.__file__).resolve().parent
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the package does not run from a git checkout here")
    revision = provenance.git_revision()
    assert revision is not None and re.fullmatch(r"[0-9a-f]{40}( \(with uncommitted changes\))?", revision)
    assert revision.split()[0] == head.stdout.strip()


def test_no_git_gives_none(monkeypatch) -> None:
    def missing(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", missing)
    assert provenance.git_revision() is None


def test_a_run_is_stamped_with_the_revision_it_started_from(monkeypatch) -> None:
    """Commits landing while a long run trains do not change the revision stamped on its results."""
    revisions = iter(["a" * 40, "b" * 40])
    monkeypatch.setattr(provenance, "git_revision", lambda: next(revisions))
    provenance.run_revision.cache_clear()
    try:
        assert provenance.run_revision() == provenance.run_revision() == "a" * 40
    finally:
        provenance.run_revision.cache_clear()


def test_environment_names_the_software() -> None:
    from compressed_transformer.provenance import environment

    env = environment()
    assert set(env) == {"python", "torch", "threads", "machine", "cpus"}
    assert env["torch"] == torch.__version__ and env["threads"] >= 1
