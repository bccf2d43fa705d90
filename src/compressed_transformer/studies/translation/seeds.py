"""Several seeds of one study: ``study DATASET --merge DIR DIR ... --out OUT``.

Each study folder trains every row once, with one random seed (``--seed``), so differences of a few tenths of BLEU
between rows may be training noise. Run the same study with other seeds into other folders, then merge them: the
merged table gives, per row, the mean and the sample standard deviation across the seeds of its BLEU figures and
timings. The folders must hold the same study (dataset, budget, settings, row definitions) and differ in ``--seed``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...train.checkpoint import write_text_atomic

__all__ = ["format_merged_table", "merge_studies", "write_merged"]

# Study settings that may differ between the merged folders (everything else must be equal).
_FREE_KEYS = ("seed", "out", "rows", "progress", "data_dir")
# Per-row figures averaged across seeds (sizes too: a Sparse VD row's kept weights depend on its training).
_FIGURES = (
    "bleu",
    "bleu_seed",
    "bleu_tok_lc",
    "params",
    "ratio",
    "ratio_ffn",
    "steps",
    "train_seconds",
    "sentences_per_s",
    "forward_seconds",
)


def _read(folder: Path) -> dict[str, Any]:
    path = folder / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run (or --report-only) the study in {folder} first")
    return json.loads(path.read_text())


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, sample standard deviation (``None`` for a single value), range and count ``n``."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}


def merge_studies(folders: Sequence[str | Path], dataset: str, budget: str | None = None) -> dict[str, Any]:
    """The rows of the study folders ``folders`` (one seed each) merged: per row, the seeds it was run with, the mean
    and sample standard deviation of each figure (with the number of seeds that have it), and each seed's own
    figures.

    Raises:
        FileNotFoundError: for a folder without ``results.json``.
        ValueError: for fewer than two folders, folders of another dataset or ``budget`` (when given), settings
            (devices included: ``auto`` precision trains differently on CPU and GPU) or row definitions, or two
            folders of the same seed.
    """
    paths = [Path(f) for f in folders]
    if len(paths) < 2:
        raise ValueError(f"--merge needs at least two study folders (one per seed), got {len(paths)}")
    studies = [_read(p) for p in paths]
    first, seeds = studies[0], []
    reference = {k: v for k, v in first["config"].items() if k not in _FREE_KEYS}
    for path, study in zip(paths, studies, strict=True):
        if study.get("dataset") != dataset:
            raise ValueError(f"{path} holds a {study.get('dataset')} study, not {dataset}")
        if budget is not None and study.get("budget") != budget:
            raise ValueError(f"{path} holds a study at budget {study.get('budget')!r}, not {budget!r} (--budget)")
        config = {k: v for k, v in study["config"].items() if k not in _FREE_KEYS}
        if config != reference:
            changed = sorted(k for k in set(config) | set(reference) if config.get(k) != reference.get(k))
            raise ValueError(f"{path} was run with other settings than {paths[0]} ({', '.join(changed)} differ)")
        seed = study["config"]["seed"]
        if seed in seeds:
            raise ValueError(f"{path} has seed {seed}, like an earlier folder: merge one folder per seed")
        seeds.append(seed)
    definitions = {}
    for path, study in zip(paths, studies, strict=True):
        for name, definition in study.get("row_definitions", {}).items():
            if definitions.setdefault(name, definition) != definition:
                raise ValueError(f"row {name!r} of {path} is defined differently than in another folder")
    # table order: the study's row definitions, then any row only some folders' results name
    order = list(dict.fromkeys([*definitions, *(r["name"] for study in studies for r in study["rows"])]))
    rows = []
    for name in order:
        runs = [
            (seed, r) for seed, study in zip(seeds, studies, strict=True) for r in study["rows"] if r["name"] == name
        ]
        if not runs:
            continue
        merged: dict[str, Any] = {"name": name, "seeds": [seed for seed, _ in runs], "n": len(runs)}
        merged |= {key: runs[0][1].get(key) for key in ("method", "blocks", "route", "same_as")}
        for figure in _FIGURES:
            values = [r[figure] for _, r in runs if r.get(figure) is not None]
            merged[figure] = _stats(values) if values else None
        protocol = [r["seed_protocol"]["bleu"] for _, r in runs if r.get("seed_protocol")]
        merged["seed_protocol"] = _stats(protocol) if protocol else None
        merged["per_seed"] = {str(seed): {f: r.get(f) for f in ("bleu", "bleu_seed")} for seed, r in runs}
        rows.append(merged)
    return {"dataset": dataset, "budget": first.get("budget"), "sources": [str(p) for p in paths], "rows": rows}


def _cell(stats: Mapping[str, Any] | None, digits: int, seeds: int) -> str:
    """``mean ± std``; the count when fewer seeds than the row's have the figure (results scored before it
    existed)."""
    if not stats:
        return "-"
    std = stats["std"]
    spread = f" ± {std:,.{digits}f}" if std and round(std, digits) else ""  # not "± 0.000"
    count = f" (n={stats['n']})" if stats["n"] < seeds else ""
    return f"{stats['mean']:,.{digits}f}{spread}{count}"


def format_merged_table(merged: Mapping[str, Any]) -> str:
    """The Markdown table of :func:`merge_studies`: mean ± sample standard deviation across seeds."""
    iwslt = merged["dataset"] == "iwslt14"
    head = ["row", "seeds", "BLEU", "BLEU seed-style (0-1)", *(["BLEU tok lc"] if iwslt else [])]
    head += ["seed protocol (valid)", "params", "ratio", "steps", "train s", "sent/s", "test fwd s"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in merged["rows"]:
        n = r["n"]
        name = r["name"] if not r.get("same_as") else f"{r['name']} (= {r['same_as']})"
        cells = [name, ",".join(map(str, r["seeds"])), _cell(r["bleu"], 2, n), _cell(r["bleu_seed"], 3, n)]
        cells += [_cell(r["bleu_tok_lc"], 2, n)] if iwslt else []
        cells += [_cell(r["seed_protocol"], 3, n), _cell(r["params"], 0, n), _cell(r["ratio"], 3, n)]
        cells += [_cell(r["steps"], 0, n), _cell(r["train_seconds"], 1, n), _cell(r["sentences_per_s"], 1, n)]
        cells += [_cell(r["forward_seconds"], 2, n)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_merged(merged: Mapping[str, Any], out: str | Path, command: str = "") -> None:
    """Write ``table.md`` and ``results.json`` of :func:`merge_studies` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = f"# Translation study across seeds: {merged['dataset']}, budget `{merged['budget']}`\n\n"
    text += (f"Command: `{command}`\n\n" if command else "") + "Merged study folders: "
    text += ", ".join(f"`{s}`" for s in merged["sources"]) + "\n\n" + format_merged_table(merged) + "\n\n"
    text += (
        "* Each cell: mean ± sample standard deviation across the seeds the row ran with (`seeds`); one seed, or "
        "no spread: the value alone; `(n=k)`: only k of them have that figure. `(= row)`: the same model and "
        "training as that row. `seed protocol (valid)`: the seed's own validation figure (see the single-seed "
        "tables).\n"
    )
    write_text_atomic(out / "table.md", text)
    write_text_atomic(out / "results.json", json.dumps(merged, indent=1) + "\n")
