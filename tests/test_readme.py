"""The README's API tour runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def api_tour() -> str:
    text = README.read_text()
    section = text[text.index("## API tour") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no python block in the README's API tour"
    return match.group(1)


def test_the_readme_api_tour_runs(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)  # it writes layer.safetensors
    namespace: dict = {}
    exec(compile(api_tour(), "README.md", "exec"), namespace)  # the README's own example
    assert (tmp_path / "layer.safetensors").is_file()
    fresh, model = namespace["fresh"], namespace["model"]
    assert type(fresh.linear1) is type(model.linear1) and "TTLinear" in type(model.linear1).__name__
    assert "ratio" in capsys.readouterr().out
