"""Outputs of the MNIST study: the Markdown table, results.json, the Pareto plot and the printed summary."""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from ...provenance import environment, run_revision
from ..plotting import mark_seed_point
from .config import (
    SEED_TABLE,
    STRETCH_DROP,
    STRETCH_SPARSE_VD_RATIO,
    MNISTStudyConfig,
    RowResult,
    StudyResult,
    _seed_point_of,
)


def _layers_text(row: RowResult) -> str:
    if not row.layers:
        return "-"
    return "+".join(row.layers)


def _settings_text(row: RowResult) -> str:
    parts = []
    for layer, options in row.layer_options.items():
        if "ranks" in options:
            parts.append(f"{layer} ranks {options['ranks']}")
        elif "rank" in options:
            parts.append(f"{layer} rank {options['rank']}" + (" (whitened)" if options.get("whitened") else ""))
        elif "sparsity" in options:
            parts.append(f"{layer} {100 * options['sparsity']:.1f}% zero")
    return "; ".join(parts)


def format_table(result: StudyResult) -> str:
    """The study's Markdown table: the seed's columns (method, accuracy, compression ratio) and more."""
    lines = [
        "| method | accuracy | compression ratio | params | bytes ratio | file ratio | time (s) | layers | settings "
        "| kd | seed: accuracy @ ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|---|",
    ]
    for row in result.rows:
        seed = _seed_point_of(row.method)
        seed_text = f"{seed.accuracy:.4f} @ {seed.ratio:.2f}" if seed else ""
        lines.append(
            f"| {row.method} | {row.accuracy:.4f} | {row.ratio:.2f} | {row.params:,} | {row.bytes_ratio:.2f} "
            f"| {row.file_ratio:.2f} | {row.seconds:.1f} | {_layers_text(row)} | {_settings_text(row)} "
            f"| {'yes' if row.distilled else 'no'} | {seed_text} |"
        )
    lines += [
        "",
        "| seed row | seed accuracy @ ratio | answered by | matched or beaten |",
        "|---|---|---|---|",
    ]
    for seed_row, match in result.seed_matches.items():
        if match["matched"] is None:
            verdict = "not run"
        else:
            verdict = ("yes: " + ", ".join(match["matched_by"])) if match["matched"] else "no"
        lines.append(
            f"| {SEED_TABLE[seed_row].label} | {match['seed_accuracy']:.4f} @ {match['seed_ratio']:.2f} "
            f"| {', '.join(match['answered_by']) or '-'} | {verdict} |"
        )
    return "\n".join(lines)


def write_outputs(result: StudyResult, config: MNISTStudyConfig, argv: Sequence[str]) -> None:
    """Write ``table.md``, ``results.json`` and ``pareto.png`` into ``result.out``."""
    out = result.out
    table = format_table(result)
    header = f"# MNIST study\n\nCommand: `{shlex.join(['compressed-transformer', *argv[1:]])}`\n\n"
    (out / "table.md").write_text(header + table + "\n")
    payload = {
        "rows": [r.to_dict() for r in result.rows],
        "sweep": [r.to_dict() for r in result.sweep],
        "seed": {name: asdict(point) for name, point in SEED_TABLE.items()},
        "seed_matches": result.seed_matches,
        "stretch": result.stretch,
        "dense_params": config.model.dense_params,
        "seconds": result.seconds,
        "config": config.to_dict(),
        "command": list(argv),
        "git_revision": run_revision(),
        "environment": environment(),
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot_pareto(result, out / "pareto.png", hidden=config.model.hidden)


# One colour per method family; the +ft rows are drawn filled, the others hollow.
_COLOURS = {
    "dense": "black",
    "prune": "tab:blue",
    "svd": "tab:orange",
    "svd-o": "tab:green",
    "tucker": "tab:purple",
    "tt": "tab:red",
}


def plot_pareto(result: StudyResult, path: Path, hidden: int = 256) -> None:
    """Test accuracy against compression ratio (log x) for every row, the sweep curves and the seed's points.

    The accuracy axis starts a little below the seed's lowest figure; points under it (rows compressed without
    fine-tuning far beyond what they tolerate) are drawn on its floor as ``v`` with their accuracy written out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    seed_low = min(point.accuracy for point in SEED_TABLE.values())
    floor = math.floor((seed_low - 0.02) * 50) / 50  # every seed point shows, whatever our rows scored
    top = 1.0 + (1.0 - floor) * 0.02

    def clamp(accuracy: float) -> float:
        return max(accuracy, floor + (1.0 - floor) * 0.01)

    fig, ax = plt.subplots(figsize=(10, 6.5))
    curves: dict[tuple[str, bool], list[RowResult]] = {}
    for point in result.sweep:
        curves.setdefault((point.method, point.distilled), []).append(point)
    for points in curves.values():
        points = sorted(points, key=lambda p: p.ratio)
        first = points[0]
        trained = first.fine_tuned or first.from_scratch or first.compression == "svd-o"
        ax.plot(
            [p.ratio for p in points],
            [clamp(p.accuracy) for p in points],
            "-" if trained else ":",
            color=_COLOURS[first.compression],
            alpha=0.6,
            lw=1.2,
            marker=".",
        )
    for row in result.rows:
        colour = _COLOURS[row.compression]
        filled = row.fine_tuned or row.from_scratch or row.compression in ("svd-o", "dense")
        below = row.accuracy < floor
        marker = "v" if below else ("s" if row.from_scratch else "o")
        ax.scatter(
            row.ratio,
            clamp(row.accuracy),
            s=60,
            color=colour if filled else "white",
            edgecolors=colour,
            zorder=3,
            marker=marker,
        )
        label = f"{row.method} ({row.accuracy:.3f})" if below else row.method
        ax.annotate(label, (row.ratio, clamp(row.accuracy)), textcoords="offset points", xytext=(5, 4), fontsize=8)
    for name, point in SEED_TABLE.items():
        mark_seed_point(ax, name, point.ratio, point.accuracy)
    handles = [
        Line2D([], [], color=colour, marker="o", ls="", label=family)
        for family, colour in _COLOURS.items()
        if any(r.compression == family for r in result.rows)
    ]
    handles += [
        Line2D([], [], color="gray", marker="o", markerfacecolor="white", ls="", label="no training after compression"),
        Line2D([], [], color="gray", ls="-", label="sweep (trained)"),
        Line2D([], [], color="gray", ls=":", label="sweep (not trained)"),
        Line2D([], [], color="black", marker="x", ls="", label="seed (slides)"),
    ]
    original = next((r for r in result.rows if r.method == "original"), None)
    if original is not None:
        ax.axhline(original.accuracy - STRETCH_DROP, color="gray", ls="--", lw=0.8)
        handles.append(Line2D([], [], color="gray", ls="--", lw=0.8, label="original - 0.5 points"))
    ax.set_ylim(floor, top)
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (whole network, parameters)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"MNIST 784-{hidden}-10: accuracy vs compression")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_summary(result: StudyResult) -> None:
    print(format_table(result))
    stretch = result.stretch
    if stretch:
        within = [name for name, ok in stretch["rows_within_half_point"].items() if ok]
        print(f"\nrows within 0.5 points of the original at the seed's ratio or better: {', '.join(within) or 'none'}")
        if stretch["sparse_vd_ratio"] is not None:
            print(f"Sparse VD ratio: {stretch['sparse_vd_ratio']:.2f}x (stretch goal >= {STRETCH_SPARSE_VD_RATIO:g}x)")
    print(f"\ntotal time: {result.seconds:.1f}s; outputs in {result.out}/ (table.md, results.json, pareto.png)")
