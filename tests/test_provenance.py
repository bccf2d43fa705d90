"""The git revision stamped on every result."""

from __future__ import annotations

import re
import subprocess

from compressed_transformer import provenance


def test_revision_of_this_checkout_is_a_commit_or_none() -> None:
    revision = provenance.git_revision()
    assert revision is None or re.fullmatch(r"[0-9a-f]{40}( \(with uncommitted changes\))?", revision)


def test_no_git_gives_none(monkeypatch) -> None:
    def missing(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", missing)
    assert provenance.git_revision() is None
