"""The translation study's outputs: ``table.md``, ``results.json``, ``bleu_vs_ratio.png`` and
``valid_bleu_curves.png``."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...evaluate.bleu import SeedProtocol
from ...provenance import environment, run_revision
from ...train.checkpoint import write_atomic, write_text_atomic
from ..plotting import mark_seed_point
from .budgets import StudyConfig
from .rows import SEED_POINTS

if TYPE_CHECKING:  # study.py imports this module (write_outputs): its names are needed for annotations only
    from .study import RowResult, _Plan

# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _protocol_cell(result: Mapping[str, Any] | None) -> str:
    """The seed's validation figure, then the range it takes over every other choice of its sampled sentences."""
    if not result:
        return "-"
    return f"{result['bleu']:.3f} ({result['min']:.2f}-{result['max']:.2f})"


def format_table(rows: Sequence[RowResult], dataset: str) -> str:
    """The Markdown table: our measurements, then the seed's figures for the same row (labelled as the seed's)."""
    iwslt = dataset == "iwslt14"
    head = ["row", "compression", "FFN blocks compressed", "route", "BLEU", "± 95%", "p vs original"]
    head += ["BLEU seed-style (0-1)"]
    head += ["BLEU tok lc"] if iwslt else []
    head += ["params", "ratio", "ratio FFN", "train s", "steps", "test decode s", "sent/s", "test fwd s"]
    head += ["seed protocol (valid)"]
    head += ["seed BLEU", "seed time"] if iwslt else ["seed BLEU", "seed ratio", "seed time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|"]
    for r in rows:
        seed = r.seed or {}
        name = r.name if r.same_as is None else f"{r.name} (= {r.same_as})"
        cells = [name, r.method, r.blocks, r.route, f"{r.bleu:.2f}", _fmt(r.bleu_ci, 2), _fmt(r.p_vs_original, 3)]
        cells += [f"{r.bleu_seed:.3f}"]
        cells += [f"{r.bleu_tok_lc:.2f}"] if iwslt else []
        cells += [
            f"{r.params:,}",
            f"{r.ratio:.3f}",
            f"{r.ratio_ffn:.2f}",
            f"{r.train_seconds:.1f}",
            str(r.steps),
            f"{r.infer_seconds:.2f}",
            f"{r.sentences_per_s:.1f}",
            _fmt(r.forward_seconds, 2),
            _protocol_cell(r.seed_protocol),
            _fmt(seed.get("bleu"), 3),
        ]
        cells += [] if iwslt else [_fmt(seed.get("ratio"), 3)]
        cells += [_fmt(seed.get("time"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _protocol_sentences(rows: Sequence[RowResult]) -> str:
    counts = sorted({r.seed_protocol["sentences"] for r in rows if r.seed_protocol})
    return "/".join(map(str, counts)) or "no"


def _table_notes(rows: Sequence[RowResult], study: StudyConfig) -> str:
    budget = study.resolved_budget
    base = study.base_model
    scored = (
        f"the average of its last {study.average} validation checkpoints"
        if study.average
        else "its best-validation checkpoint"
    )
    changes = ", ".join(f"{k}={v}" for k, v in sorted(study.model.items()))
    notes = [
        f"* Model: the `{budget.preset}` preset ({base.d_model} wide, {base.enc_layers}+{base.dec_layers} layers, "
        f"d_ff {base.d_ff}{'; ' + changes if changes else ''}); every row is its own training run (random seed "
        f"{study.seed}), scored with {scored} on the test set ({rows[0].sentences if rows else 0} sentences, beam "
        f"{study.beam or budget.beam}).",
        "* `ratio`: parameters of the dense `original` / the row's (whole model; `ratio FFN`: FFN blocks only). "
        "Parameters count stored factors, non-zeros and biases; the shared embedding table once.",
        "* `BLEU` is sacreBLEU (cased, detokenised); `BLEU seed-style` is lowercased tokenised BLEU on the seed's 0-1 "
        "scale (unsmoothed, as fairseq and NLTK compute it). `train s` is wall-clock training time including periodic "
        "validation; `test decode s` decodes the "
        "whole test set (wall clock on a possibly busy machine; it also depends on what the model generates: one "
        "run-on output holds up its whole batch); `test fwd s` is one teacher-forced forward pass over the test "
        "pairs (fastest of 3), the same tokens for every row: the like-for-like speed of the models.",
        "* Fraction rows compress the lowest `round(f * L)` FFN blocks of each stack (Python's round: halves go to "
        "even); a row that resolves to the same model as an earlier one shows that row's run, marked `(= row)`.",
        "* `± 95%`: half-width of the test BLEU's 95 % bootstrap interval (1000 resamples of the test sentences); "
        "`p vs original`: p-value of the row's BLEU differing from the dense original's by chance (paired bootstrap, "
        "Koehn 2004, as sacreBLEU's `--paired-bs`), from both rows' test outputs when they were decoded the same way.",
        "* `seed protocol (valid)`: our model scored the way the seed's public code scores its models "
        "(`evaluate.bleu.SeedProtocol`): greedy translations of the first validation pair of every batch of "
        f"{SeedProtocol().batch_size} ({_protocol_sentences(rows)} sentences), BLEU on vocabulary ids with words "
        f"seen fewer than {SeedProtocol().min_freq} times in training counted as a matching `<unk>`, 0-1; in "
        "brackets the range of that figure over every other offset into the batches, i.e. the spread that the choice "
        "of sentences alone gives it. On Multi30k this, not the `BLEU seed-style` column, is how the `seed BLEU` "
        "figures were measured (not scored on IWSLT'14, which the seed's code never loaded).",
        "* `seed ...` columns are the seed's figures (slides), not ours; the seed's time unit is not stated.",
    ]
    return "\n".join(notes)


def write_outputs(
    rows: Sequence[RowResult], study: StudyConfig, plans: Mapping[str, _Plan], argv: Sequence[str], seconds: float
) -> None:
    """Write ``table.md``, ``results.json``, ``bleu_vs_ratio.png`` and ``valid_bleu_curves.png`` into
    ``study.out``."""
    out = Path(study.out)
    command = shlex.join(["compressed-transformer", *argv]) if argv else ""
    title = {"multi30k": "Multi30k de→en (test_2016_flickr)", "iwslt14": "IWSLT'14 de→en", "plain": "plain corpus"}
    text = f"# Translation study: {title[study.dataset]}, budget `{study.budget}`\n\n"
    text += (f"Command: `{command}`\n\n" if command else "") + f"Git revision: {run_revision() or 'unknown'}\n\n"
    text += format_table(rows, study.dataset) + "\n\n" + _table_notes(rows, study) + "\n"
    write_text_atomic(out / "table.md", text)
    seed_key = "iwslt14" if study.dataset == "iwslt14" else "multi30k"
    payload = {
        "dataset": study.dataset,
        "budget": study.budget,
        "rows": [r.to_dict() for r in rows],
        "seed": {
            "source": "the seed's slides (Khakhulin et al., 'Compressed Transformer'); BLEU on a 0-1 scale",
            "rows": {name: asdict(point) for name, point in SEED_POINTS[seed_key].items()},
        },
        "config": study.to_dict(),
        "base_model": study.base_model.to_dict(),
        "row_definitions": {name: plan.row.to_dict() | {"same_as": plan.same_as} for name, plan in plans.items()},
        "command": list(argv),
        "git_revision": run_revision(),
        "seconds": seconds,
        "environment": environment(),
    }
    write_text_atomic(out / "results.json", json.dumps(payload, indent=1) + "\n")
    plot_bleu_vs_ratio(rows, study.dataset, out / "bleu_vs_ratio.png")
    plot_validation_curves(rows, study.dataset, out / "valid_bleu_curves.png")


def validation_curve(run_dir: str | Path) -> list[dict[str, float]]:
    """The validation records of a training run (``metrics.jsonl``: ``step``, ``wall`` seconds of training so far,
    ``valid_bleu``...), in order; empty when the run has none yet."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [r for r in records if "valid_bleu" in r]


def plot_validation_curves(rows: Sequence[RowResult], dataset: str, path: Path) -> None:
    """Validation BLEU (greedy) of every trained row against training time and against updates: the comparison at
    equal time and at equal updates that a final score alone does not show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_step) = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for r in rows:
        curve = [] if r.same_as is not None else validation_curve(r.run_dir)
        if not curve:
            continue
        bleu = [c["valid_bleu"] for c in curve]
        by_time.plot([c["wall"] / 60 for c in curve], bleu, lw=1.2, label=f"{r.name} ({r.ratio:.2f}x)")
        by_step.plot([c["step"] for c in curve], bleu, lw=1.2)
    by_time.set_xlabel("training time (minutes, wall clock)")
    by_step.set_xlabel("updates")
    by_time.set_ylabel("validation sacreBLEU (greedy)")
    for ax in (by_time, by_step):
        ax.grid(True, alpha=0.3)
    if by_time.lines:  # no run has validation records yet (a fresh study folder): no legend to draw
        by_time.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{dataset}: validation BLEU during training")
    fig.tight_layout()
    write_atomic(path, lambda handle: fig.savefig(handle, dpi=120, format=Path(path).suffix.lstrip(".") or "png"))
    plt.close(fig)


def plot_bleu_vs_ratio(rows: Sequence[RowResult], dataset: str, path: Path) -> None:
    """Seed-style BLEU (0-1) against the whole-model compression ratio (log x), with the seed's points and, where
    scored, each row's figure under the seed's own protocol (the seed's figures' protocol) with its spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(8, 5.5))
    aliases: dict[str, list[str]] = {}
    for r in rows:
        if r.same_as is not None:  # the same point as its source row: one marker, both names
            aliases.setdefault(r.same_as, []).append(r.name)
    for r in rows:
        if r.same_as is not None:
            continue
        marker = "s" if r.route == "convert" else "o"
        label = " = ".join([r.name, *aliases.get(r.name, [])])
        ax.scatter(r.ratio, r.bleu_seed, s=50, marker=marker, color="tab:blue", zorder=3)
        ax.annotate(label, (r.ratio, r.bleu_seed), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if r.seed_protocol:
            protocol = r.seed_protocol
            ax.errorbar(
                r.ratio,
                protocol["bleu"],
                yerr=protocol["std"],
                fmt="D",
                mfc="none",
                ms=6,
                capsize=3,
                color="tab:orange",
                alpha=0.8,
                zorder=2,
            )
    seed_key = "iwslt14" if dataset == "iwslt14" else "multi30k"
    first = True
    for name, point in SEED_POINTS[seed_key].items():
        label = "seed (slides)" if first else None
        first = False
        if point.ratio is None:  # the IWSLT'14 slide gives no ratios: draw its BLEU as a level
            ax.axhline(point.bleu, color="dimgray", ls=":", lw=0.8, label=label)
            ax.annotate(
                f"seed {name}",
                (1.0, point.bleu),
                fontsize=7,
                color="dimgray",
                xytext=(2, 2),
                textcoords="offset points",
            )
            continue
        mark_seed_point(ax, name, point.ratio, point.bleu, label=label)
    ax.scatter([], [], marker="o", color="tab:blue", label="ours, from scratch")
    ax.scatter([], [], marker="s", color="tab:blue", label="ours, converted from the original")
    if any(r.seed_protocol for r in rows):
        ax.errorbar(
            [],
            [],
            yerr=[],
            fmt="D",
            mfc="none",
            color="tab:orange",
            label="ours, the seed's protocol (valid sample; bar: ±1 std over samples)",
        )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("compression ratio (whole model, parameters)")
    ax.set_ylabel("BLEU, lowercased tokenised, 0-1 (seed's scale)")
    ax.set_title(f"{dataset}: BLEU vs compression")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    write_atomic(path, lambda handle: fig.savefig(handle, dpi=120, format=Path(path).suffix.lstrip(".") or "png"))
    plt.close(fig)
