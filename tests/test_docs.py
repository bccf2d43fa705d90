"""docs/library.md runs as written: its Python blocks, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parents[1] / "docs" / "library.md"


def test_the_library_guide_runs(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)  # it writes encoder.safetensors
    blocks = re.findall(r"```python\n(.*?)```", LIBRARY.read_text(), re.S)
    assert len(blocks) >= 6
    namespace: dict = {}
    for index, block in enumerate(blocks):
        exec(compile(block, f"docs/library.md, block {index + 1}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "selects no nn.Linear" in printed and "out of reach" in printed and "bytes as pruned layers" in printed
    assert (tmp_path / "encoder.safetensors").is_file()
    assert type(namespace["fresh"].layers[1].linear2).__name__ == "TTLinear"
