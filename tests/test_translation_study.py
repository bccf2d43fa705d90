"""``compressed-transformer study``: tiny end-to-end runs on a toy corpus, skipping, accounting and bad input."""

from __future__ import annotations

import argparse
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from compressed_transformer import cli
from compressed_transformer.data.parallel import load_dataset
from compressed_transformer.evaluate.bleu import paired_bootstrap_p, seed_protocol_bleu, seed_vocabulary
from compressed_transformer.evaluate.decoding import translate
from compressed_transformer.models.transformer import Transformer, parameter_report, preset
from compressed_transformer.studies import translation
from compressed_transformer.studies.translation import (
    ROW_NAMES,
    SEED_POINTS,
    LowRankEmbedding,
    StudyConfig,
    describe_blocks,
    factorize_embeddings_,
    load_row_model,
    merge_studies,
    row_model_config,
    row_train_config,
    rows_for,
)
from compressed_transformer.studies.translation.cli import config_from_args
from compressed_transformer.train.checkpoint import export_model, load_checkpoint, load_model, step_checkpoints
from toy_corpus import write_corpus


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="compressed-transformer")
    translation.register(main.add_subparsers(dest="command", required=True))
    return main


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


def study_argv(data: Path, out: Path, rows: str) -> list[str]:
    return ["study", "plain", "--budget", "tiny", "--data-dir", str(data), "--out", str(out), "--rows", rows]


def test_study_is_a_cli_subcommand() -> None:
    assert "compressed_transformer.studies.translation" in cli.SUBCOMMAND_MODULES


def test_report_only_on_a_missing_folder_is_an_error(tmp_path: Path) -> None:
    """(a mistyped --out would otherwise give an empty table and exit 0)"""
    with pytest.raises(FileNotFoundError, match=r"typo does not exist: no study to report there"):
        run([*study_argv(tmp_path / "data", tmp_path / "typo", "all"), "--report-only"])
    assert not (tmp_path / "typo").exists()


def test_precision_reaches_every_row(tmp_path: Path) -> None:
    args = parser().parse_args([*study_argv(tmp_path, tmp_path / "s", "original,tt-all"), "--precision", "fp32"])
    study = config_from_args(args)
    rows = rows_for("plain", preset("tiny"))
    assert {row_train_config(rows[n], study, tmp_path).precision for n in ("original", "tt-all")} == {"fp32"}
    assert row_train_config(rows["original"], StudyConfig("plain", "x", "y", "tiny"), tmp_path).precision == "auto"
    with pytest.raises(SystemExit):
        parser().parse_args([*study_argv(tmp_path, tmp_path / "s", "original"), "--precision", "fp16"])


def test_rows_and_blocks_of_each_budget() -> None:
    small = preset("small")
    rows = rows_for("multi30k", small)
    assert tuple(rows) == ROW_NAMES["multi30k"]
    blocks = {name: describe_blocks(row_model_config(rows[name], small)) for name in ("tt-3/4", "tt-1/2", "tt-1/4")}
    assert blocks == {
        "tt-3/4": "enc 0-1, dec 0-1 of 3+3",
        "tt-1/2": "enc 0-1, dec 0-1 of 3+3",
        "tt-1/4": "enc 0, dec 0 of 3+3",
    }
    base = preset("base")
    rows = rows_for("multi30k", base)
    assert describe_blocks(row_model_config(rows["tt-3/4"], base)) == "enc 0-3, dec 0-3 of 6+6"  # round(4.5) == 4
    assert describe_blocks(row_model_config(rows["tt-1/4"], base)) == "enc 0-1, dec 0-1 of 6+6"
    small_row = row_model_config(rows["small"], base)
    assert (small_row.enc_layers, small_row.dec_layers) == (3, 3)  # the seed's 3+3 baseline
    assert tuple(rows_for("iwslt14", preset("iwslt"))) == ("original", "tt-all", "tt-1/2", "tucker-all")


def test_each_rows_recorded_compression_rebuilds_its_structure(tmp_path: Path) -> None:
    """What a row's run records in ``TrainConfig.extra`` (read back from config.json by ``translate train --resume``
    and ``prepare_from_extra``) builds the same layers and parameters as the study's own ``row_prepare``."""
    from compressed_transformer.train.prepare import prepare_from_extra
    from compressed_transformer.train.trainer import TrainConfig

    base = preset("tiny", vocab_size=96)
    study = StudyConfig("multi30k", str(tmp_path), str(tmp_path), "tiny")
    compressed = 0
    for name, row in rows_for("multi30k", base).items():
        config = row_model_config(row, base)
        recorded = TrainConfig.from_dict(json.loads(json.dumps(row_train_config(row, study, tmp_path).to_dict())))
        hooks = (translation.row_prepare(row), prepare_from_extra(recorded.extra))
        if hooks[0] is None:
            assert hooks[1] is None, name
            continue
        compressed += 1
        models = [Transformer(config) for _ in hooks]
        for model, hook in zip(models, hooks, strict=True):
            hook(model)
        assert parameter_report(models[1]) == parameter_report(models[0]), name
        assert [type(m).__name__ for m in models[1].modules()] == [type(m).__name__ for m in models[0].modules()]
    assert compressed >= 3  # attention rows, low-rank table rows, the TT table row


def test_low_rank_embedding_matches_truncated_svd() -> None:
    embedding = nn.Embedding(20, 8, padding_idx=0)
    with torch.no_grad():
        embedding.weight[0].zero_()
    full = LowRankEmbedding.from_embedding(embedding, rank=8)
    torch.testing.assert_close(full.weight, embedding.weight, atol=1e-5, rtol=1e-5)
    ids = torch.tensor([[0, 3, 19], [5, 5, 1]])
    torch.testing.assert_close(full(ids), embedding(ids), atol=1e-5, rtol=1e-5)
    low = LowRankEmbedding.from_embedding(embedding, rank=2)
    assert sum(p.numel() for p in low.parameters()) == 2 * (20 + 8)
    assert low(ids).shape == (2, 3, 8)
    assert torch.count_nonzero(low.weight[0]) == 0  # the padding row stays zero
    with pytest.raises(ValueError, match="rank"):
        LowRankEmbedding(20, 8, rank=9)


def test_tied_logits_of_a_low_rank_table_go_through_its_factors() -> None:
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).double()
    factorize_embeddings_(model, rank=4)
    hidden = torch.randn(3, 5, model.config.d_model, dtype=torch.float64, requires_grad=True)
    logits = model.logits(hidden)
    expected = torch.nn.functional.linear(hidden, model.tgt_embed.left @ model.tgt_embed.right)
    torch.testing.assert_close(logits, expected)
    grads = torch.autograd.grad(logits.square().sum(), [hidden, model.tgt_embed.left, model.tgt_embed.right])
    want = torch.autograd.grad(expected.square().sum(), [hidden, model.tgt_embed.left, model.tgt_embed.right])
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got, ref)


def test_tiny_study_end_to_end_then_skips_finished_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_corpus(tmp_path / "data", pairs=32)
    out = tmp_path / "study"
    # tt-all-convert needs the original (run first, automatically); tt-3/4 of a 2+2 model is tt-all (round(1.5)==2)
    assert run(study_argv(data, out, "tt-all-convert,tt-3/4,tt-all+attn+emb,tt-all+ttemb")) == 0
    for name in ("table.md", "results.json", "bleu_vs_ratio.png", "valid_bleu_curves.png", "study.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert {"rows", "seed", "config", "command", "git_revision", "environment"} <= set(results)
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == ["original", "tt-all", "tt-3/4", "tt-all-convert", "tt-all+attn+emb", "tt-all+ttemb"]
    for r in rows.values():
        assert {"bleu", "bleu_seed", "params", "ratio", "ratio_ffn", "train_seconds", "infer_seconds"} <= set(r)
        assert 0.0 <= r["bleu_seed"] <= 1.0 and r["infer_seconds"] > 0 and r["sentences_per_s"] > 0
        assert r["forward_seconds"] > 0

    original = rows["original"]
    assert original["ratio"] == 1.0 and original["ratio_ffn"] == 1.0 and original["route"] == "scratch"
    assert original["seed"]["bleu"] == 0.442  # the seed's figure, for comparison
    assert rows["tt-all"]["ratio"] > 1.0 and rows["tt-all"]["ratio_ffn"] > 1.0
    assert rows["tt-all-convert"]["route"] == "convert"
    assert rows["tt-all-convert"]["params"] == rows["tt-all"]["params"]
    assert rows["tt-3/4"]["same_as"] == "tt-all" and rows["tt-3/4"]["bleu"] == rows["tt-all"]["bleu"]
    assert rows["tt-3/4"]["seed"]["label"] == SEED_POINTS["multi30k"]["tt-3/4"].label  # its own seed figure
    assert not (out / "rows" / "tt-3_4" / "checkpoint_last.pt").exists()  # not trained twice
    emb = rows["tt-all+attn+emb"]
    assert emb["ratio"] > rows["tt-all"]["ratio"]
    assert emb["params_embeddings"] < original["params_embeddings"]
    assert emb["params_attention"] < original["params_attention"]
    ttemb = rows["tt-all+ttemb"]
    assert "emb tt ranks=16" in ttemb["method"]
    tt_model = load_model(load_checkpoint(out / "rows" / "tt-all+ttemb" / "checkpoint_best.pt"))
    assert type(tt_model.src_embed).__name__ == "TTEmbedding" and tt_model.tgt_embed is tt_model.src_embed
    assert ttemb["params_embeddings"] == tt_model.src_embed.num_stored_params()  # (rank 16 is no saving at tiny size)
    assert parameter_report(tt_model)["total"] == ttemb["params"]

    # parameters agree with parameter_report of the checkpoints' models (and the dense total with the original)
    study = StudyConfig("plain", str(out), str(data), "tiny")
    for name in ("tt-all", "tt-all+attn+emb"):
        model, _ = load_row_model(study, name)
        assert parameter_report(model)["total"] == rows[name]["params"]
    # the checkpoint carries its compressed layers, so the generic loader (translate eval / export) rebuilds the
    # attention + embedding row without the study's help, and export round-trips it
    checkpoint = out / "rows" / "tt-all+attn+emb" / "checkpoint_best.pt"
    generic = load_model(load_checkpoint(checkpoint)).eval()
    exported = load_model(load_checkpoint(export_model(load_checkpoint(checkpoint), tmp_path / "exported"))).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(generic.state_dict()[key], value) and torch.equal(exported.state_dict()[key], value), key
    assert type(exported.src_embed).__name__ == "LowRankEmbedding" and exported.tgt_embed is exported.src_embed
    assert original["params"] / rows["tt-all"]["params"] == pytest.approx(rows["tt-all"]["ratio"])
    with torch.device("meta"):
        dense = Transformer(preset("tiny", vocab_size=model.config.vocab_size))
    assert parameter_report(dense)["total"] == original["params"]

    table = (out / "table.md").read_text()
    assert "| tt-3/4 (= tt-all) |" in table and "all 2+2" in table and "seed BLEU" in table
    # every row is also scored the seed's way, from the greedy validation outputs it keeps
    valid, train_pairs = (load_dataset("plain", str(data), split) for split in ("valid", "train"))
    vocabulary = seed_vocabulary(train_pairs.src, train_pairs.tgt)
    for name in ("original", "tt-all+attn+emb"):
        hyps = (out / "rows" / name / "valid.greedy.hyp").read_text(encoding="utf-8").splitlines()
        model, tokenizer = load_row_model(
            StudyConfig("plain", str(out), str(data), "tiny"), name, rows[name]["checkpoint"]
        )
        assert hyps == translate(model, tokenizer, valid.src, beam=1)[0]  # the greedy outputs of the validation split
        again = seed_protocol_bleu(hyps, valid.src, valid.tgt, vocabulary)
        assert rows[name]["seed_protocol"] == again and 0.0 <= again["bleu"] <= 1.0
        assert rows[name]["bleu_ci"] >= 0.0
    # the paired test of every row against the original, from the outputs each row kept
    test = load_dataset("plain", str(data), "test")
    outputs = {n: (Path(rows[n]["run_dir"]) / "test.hyp").read_text(encoding="utf-8").splitlines() for n in rows}
    assert rows["original"]["p_vs_original"] is None
    for name in ("tt-all", "tt-all-convert", "tt-all+ttemb"):
        assert rows[name]["p_vs_original"] == paired_bootstrap_p(outputs["original"], outputs[name], test.tgt)
    assert (
        "test fwd s" in table
        and "seed protocol (valid)" in table
        and f"({rows['original']['seed_protocol']['sentences']} sentences)" in table
    )

    # a second invocation trains nothing: finished rows are read back, their files untouched
    watched = [out / "rows" / name / "result.json" for name in ("original", "tt-all")]
    watched.append(out / "rows" / "original" / "checkpoint_last.pt")
    before = {path: path.stat().st_mtime_ns for path in watched}
    capsys.readouterr()
    assert run(study_argv(data, out, "tt-all,original")) == 0
    assert "finished earlier, skipped" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in watched} == before
    again = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in again["rows"]] == list(rows)  # the table keeps every finished row

    # a study folder copied elsewhere (another machine, another data path) is still itself: nothing retrains
    moved, moved_data = tmp_path / "moved", tmp_path / "moved-data"
    shutil.copytree(out, moved)
    shutil.copytree(data, moved_data)
    capsys.readouterr()
    assert run(study_argv(moved_data, moved, "tt-all-convert,original")) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2
    # --report-only writes the outputs from the finished rows and trains none of the others
    (moved / "table.md").unlink()
    assert run([*study_argv(moved_data, moved, "all"), "--report-only"]) == 0
    assert "training" not in capsys.readouterr().out
    reported = {r["name"]: r for r in json.loads((moved / "results.json").read_text())["rows"]}
    assert list(reported) == list(rows) and reported["tt-3/4"]["seed"] == rows["tt-3/4"]["seed"]
    assert (moved / "table.md").is_file() and not (moved / "rows" / "tucker-all").exists()
    # a row trained but never scored (killed while decoding) is left out of the table, and the report says so
    (moved / "rows" / "original" / "result.json").unlink()
    assert run([*study_argv(moved_data, moved, "all"), "--report-only"]) == 0
    assert "not in the table (trained, not scored yet: run the study again): original" in capsys.readouterr().out
    assert "original" not in {r["name"] for r in json.loads((moved / "results.json").read_text())["rows"]}

    # another --beam (or --average) scores a finished row again, without training it again
    last = out / "rows" / "original" / "checkpoint_last.pt"
    trained = last.stat().st_mtime_ns
    assert run([*study_argv(data, out, "original"), "--beam", "2"]) == 0
    assert "scoring it again" in capsys.readouterr().out and last.stat().st_mtime_ns == trained
    assert json.loads((out / "rows" / "original" / "result.json").read_text())["beam"] == 2

    with pytest.raises(ValueError, match="budget 'tiny'"):
        run([*study_argv(data, out, "original")[:3], "small", *study_argv(data, out, "original")[4:]])
    stored = out / "rows" / "tt-all" / "result.json"
    stored.write_text(json.dumps({**rows["tt-all"], "train": {**rows["tt-all"]["train"], "lr": 0.5}}))
    with pytest.raises(ValueError, match=r"different training config.*lr"):
        run(study_argv(data, out, "tt-all"))
    with pytest.raises(ValueError, match=r"different training config.*lr"):  # one table, one configuration
        run([*study_argv(data, out, "original"), "--report-only"])


def test_interrupted_row_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_corpus(tmp_path / "data", pairs=16)
    out = tmp_path / "study"
    calls: list[bool] = []
    real_train = translation.study.train

    def interrupted(model, cfg, *, resume=False, prepare=None):
        calls.append(resume)
        if not resume:  # stop after a checkpoint, as if the process were killed
            cfg = type(cfg).from_dict({**cfg.to_dict(), "max_steps": 2})
            real_train(model, cfg, prepare=prepare)
            (Path(cfg.out_dir) / "summary.json").unlink()
            raise KeyboardInterrupt
        return real_train(model, cfg, resume=True, prepare=prepare)

    monkeypatch.setattr(translation.study, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(study_argv(data, out, "original"))
    assert run(study_argv(data, out, "original")) == 0
    assert calls == [False, True]
    result = json.loads((out / "rows" / "original" / "result.json").read_text())
    assert result["steps"] == 4  # the tiny budget's max_steps, reached across the resume


def test_raised_budget_continues_finished_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_corpus(tmp_path / "data", pairs=16)
    out = tmp_path / "study"
    folder = out / "rows" / "original"
    assert run(study_argv(data, out, "original")) == 0  # the tiny budget: 4 updates
    first = json.loads((folder / "result.json").read_text())
    assert first["steps"] == 4
    capsys.readouterr()
    assert run([*study_argv(data, out, "original"), "--max-steps", "6"]) == 0
    assert "original: continuing (budget raised)" in capsys.readouterr().out
    raised = json.loads((folder / "result.json").read_text())
    assert raised["steps"] == 6 and json.loads((folder / "summary.json").read_text())["steps"] == 6
    assert raised["train"]["max_steps"] == 6 and raised["train_seconds"] >= first["train_seconds"]
    assert [json.loads(line).get("step") for line in (folder / "metrics.jsonl").read_text().splitlines()][-1] == 6
    # the same budget again, or a lower one, trains nothing
    for steps in ("6", "5"):
        assert run([*study_argv(data, out, "original"), "--max-steps", steps]) == 0
        assert "original: finished earlier, skipped" in capsys.readouterr().out
        assert json.loads((folder / "result.json").read_text())["steps"] == 6
    with pytest.raises(ValueError, match="max_steps must be >= 0"):
        run([*study_argv(data, out, "original"), "--max-steps", "-1"])


def test_rescore_decodes_trained_rows_again_and_trains_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_corpus(tmp_path / "data", pairs=16)
    out = tmp_path / "study"
    assert run(study_argv(data, out, "original,tt-3/4")) == 0  # tt-3/4 of the 2+2 tiny model is tt-all
    folder = out / "rows" / "original"
    first = json.loads((folder / "result.json").read_text())
    last = folder / "checkpoint_last.pt"
    trained = last.stat().st_mtime_ns
    (folder / "test.hyp").unlink()
    for path in (folder / "result.json", out / "rows" / "tt-all" / "result.json"):  # scored before the new columns
        old = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("bleu_ci", "seed_protocol")}
        path.write_text(json.dumps(old | {"outputs_sha256": None, "p_vs_original": None}))
    assert run([*study_argv(data, out, "original,tt-all"), "--report-only"]) == 0
    stale = {r["name"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert stale["tt-all"]["p_vs_original"] is None and stale["original"]["seed_protocol"] is None
    assert "| - |" in (out / "table.md").read_text()
    monkeypatch.setattr(translation.study, "train", lambda *a, **k: pytest.fail("--rescore trained a row"))
    capsys.readouterr()
    # a raised budget would continue the row in a normal run; --rescore only decodes what is there
    assert run([*study_argv(data, out, "all"), "--rescore", "--max-steps", "8"]) == 0
    printed = capsys.readouterr().out
    assert "original: decoding the test set again" in printed and "tt-all: decoding the test set again" in printed
    assert "tucker-all: not trained" in printed and not (out / "rows" / "tucker-all" / "result.json").exists()
    again = json.loads((folder / "result.json").read_text())
    assert (folder / "test.hyp").is_file() and last.stat().st_mtime_ns == trained
    assert again["bleu"] == first["bleu"] and again["steps"] == first["steps"] == 4
    assert again["train"]["max_steps"] == 4  # the budget it was trained under
    assert again["infer_seconds"] > 0 and again["infer_seconds"] != first["infer_seconds"]
    rescored = {r["name"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert again["bleu_ci"] >= 0 and again["seed_protocol"]["kept"] > 0 and rescored["tt-all"]["seed_protocol"]
    assert isinstance(rescored["tt-all"]["p_vs_original"], float)  # the new columns filled in
    rows = [r["name"] for r in json.loads((out / "results.json").read_text())["rows"]]
    assert rows == ["original", "tt-all", "tt-3/4", "tt-1/4"]  # tt-1/4 of 2+2 blocks: none, the original
    # a row that cannot be decoded again (no step checkpoints to average) keeps its result; the table is written
    (out / "table.md").unlink()
    assert run([*study_argv(data, out, "original"), "--rescore", "--average", "2"]) == 0
    assert "original: could not decode it again" in capsys.readouterr().out and (out / "table.md").is_file()
    assert json.loads((folder / "result.json").read_text())["infer_seconds"] == again["infer_seconds"]
    with pytest.raises(SystemExit):
        parser().parse_args([*study_argv(data, out, "all"), "--rescore", "--report-only"])
    with pytest.raises(ValueError, match="exclude each other"):
        translation.run_study(StudyConfig("plain", str(out), str(data), "tiny"), report_only=True, rescore=True)


def test_budget_left_compares_every_limit_with_the_run() -> None:
    from compressed_transformer.train.trainer import TrainConfig, budget_left

    summary = {"steps": 100, "epochs": 2.5, "train_seconds": 600.4}
    assert not budget_left(TrainConfig(max_steps=100), summary)
    assert budget_left(TrainConfig(max_steps=101), summary)
    assert not budget_left(TrainConfig(max_minutes=10), summary) and budget_left(TrainConfig(max_minutes=11), summary)
    assert budget_left(TrainConfig(max_epochs=3), summary) and not budget_left(TrainConfig(max_epochs=2), summary)
    # training stops at the first limit reached: every limit set must lie ahead
    assert not budget_left(TrainConfig(max_steps=200, max_minutes=10), summary)
    assert budget_left(TrainConfig(max_steps=200, max_minutes=20, max_epochs=0), summary)


def test_unknown_rows_fail_before_any_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_corpus(tmp_path / "data", pairs=8)
    monkeypatch.setattr(translation.study, "train", lambda *a, **k: pytest.fail("trained despite bad input"))
    with pytest.raises(ValueError, match=r"unknown row\(s\) \['tt-all-tucker'\] for plain; choose from original"):
        run(study_argv(data, tmp_path / "out", "original,tt-all-tucker"))
    with pytest.raises(ValueError, match=r"unknown row\(s\) \['small'\] for iwslt14"):
        run(["study", "iwslt14", "--rows", "small", "--data-dir", str(data), "--out", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="needs --data-dir"):
        run(["study", "plain", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_bad_out_rows_and_threads_fail_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(translation.study, "train", lambda *a, **k: pytest.fail("trained despite bad input"))
    data = tmp_path / "no-data"  # never read: every error comes first
    (tmp_path / "file").write_text("x")
    for extra in ([], ["--report-only"], ["--rescore"]):
        with pytest.raises(NotADirectoryError, match=r"--out .*file is a file, not a study folder"):
            run([*study_argv(data, tmp_path / "file", "original"), *extra])
    # a mistyped --out is no study to score again either (it would be created, with an empty table)
    with pytest.raises(FileNotFoundError, match=r"typo does not exist: no study to score again there"):
        run([*study_argv(data, tmp_path / "typo", "all"), "--rescore"])
    assert not (tmp_path / "typo").exists()
    with pytest.raises(ValueError, match=r"--rows ' , ' names no row"):  # not every row of the study
        run(study_argv(data, tmp_path / "out", " , "))
    for threads in ("0", "-1"):  # -1 was a RuntimeError traceback from torch, 0 silently ignored
        with pytest.raises(ValueError, match=f"--threads must be >= 1, got {threads}"):
            run([*study_argv(data, tmp_path / "out", "original"), "--threads", threads])
    assert not (tmp_path / "out").exists()


def test_row_files_are_checked_before_a_row_is_scored(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_corpus(tmp_path / "data", pairs=16)
    out = tmp_path / "study"
    assert run(study_argv(data, out, "original")) == 0
    folder = out / "rows" / "original"
    result = folder / "result.json"
    good = result.read_text()
    # trained, not yet scored (killed while decoding), then asked for with another seed: refused, not scored under
    # the new config's name
    result.unlink()
    with pytest.raises(
        ValueError, match=r"config\.json was run with a different training config \(seed: 1 != 2\); delete .*original"
    ):
        run([*study_argv(data, out, "original"), "--seed", "2"])
    assert not result.exists()
    # files that are not what the study wrote: named, not a bare JSON error or a traceback
    result.write_text(good)
    for path, text, problem in (
        (result, '{"bleu": ', "not valid JSON"),
        (result, "{}", "lacks 'name'"),
        (result, json.dumps({k: v for k, v in json.loads(good).items() if k != "train"}), "lacks 'train'"),
        (out / "study.json", "[1]", "holds a list"),
        (folder / "summary.json", '{"steps": 4}', "lacks 'epochs'"),
    ):
        saved = path.read_text()
        path.write_text(text)
        with pytest.raises(ValueError, match=rf"{path.name} is not a readable .*: {problem}.*; delete it"):
            run(study_argv(data, out, "original"))
        if path.name != "summary.json":  # --report-only reads no summary
            with pytest.raises(ValueError, match=rf"{path.name} is not a readable .*: {problem}"):
                run([*study_argv(data, out, "original"), "--report-only"])
        path.write_text(saved)
    capsys.readouterr()
    assert run(study_argv(data, out, "original")) == 0 and "finished earlier, skipped" in capsys.readouterr().out


def test_iwslt_without_training_text_fails_early(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fairseq's prepared layout with the valid/test sets only, as in /work/shared/data/iwslt14
    prepared = tmp_path / "iwslt14" / "fairseq_tok"
    prepared.mkdir(parents=True)
    for split in ("valid", "test"):
        for lang in ("de", "en"):
            (prepared / f"{split}.{lang}").write_text("hallo welt\n")
    monkeypatch.setattr(translation.study, "train", lambda *a, **k: pytest.fail("trained without training data"))
    out = tmp_path / "out"
    argv = ["study", "iwslt14", "--budget", "tiny", "--data-dir", str(tmp_path / "iwslt14"), "--out", str(out)]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert "IWSLT'14 files missing" in error and "train.de" in error
    assert not out.exists()


def test_a_row_runs_in_one_process_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Study invocations side by side (scripts/study_parallel.sh) wait for a row another one is running."""
    folder, events = tmp_path / "rows" / "tt-all", []

    def second() -> None:
        with translation.study._row_lock(folder):
            events.append("second")

    with translation.study._row_lock(folder):
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive() and events == []
        events.append("first")
    thread.join(10)
    assert events == ["first", "second"]

    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's ranks run each row together: no lock
    with translation.study._row_lock(folder):
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(10)
        assert not thread.is_alive() and events[-1] == "second"


@pytest.mark.slow
def test_study_parallel_script(tmp_path: Path) -> None:
    """scripts/study_parallel.sh: groups side by side, a conversion row after the original, one joint table."""
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "study_parallel.sh"
    data = write_corpus(tmp_path / "data", pairs=16)
    out = tmp_path / "study"
    env = os.environ | {
        "STUDY": f"{sys.executable} -m compressed_transformer study",
        "SCRATCH_GROUPS": "original;tt-all,tt-3/4",  # tt-3/4 of the tiny 2+2 model is tt-all: one group
        "CONVERT_ROWS": "tt-all-convert",
        "OMP_NUM_THREADS": "1",
    }
    args = ["bash", str(script), "plain", str(out), "--budget", "tiny", "--data-dir", str(data), "--threads", "1"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [r["name"] for r in json.loads((out / "results.json").read_text())["rows"]]
    # the last step (--rescore, every row) also lists tt-1/4, which on 2+2 blocks is the trained original
    assert rows == ["original", "tt-all", "tt-3/4", "tt-1/4", "tt-all-convert"]
    convert_log = (out / "logs" / "tt-all-convert.log").read_text()
    assert "original: finished earlier, skipped" in convert_log  # started after the original, never retrained it
    assert "tt-all-convert: decoding the test set again" in done.stdout  # the last step: every row timed alone
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["original.log", "tt-all-convert.log", "tt-all.log"]

    bad = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert bad.returncode == 2 and "study_parallel.sh DATASET OUT" in bad.stderr


def test_model_changes_and_checkpoint_averaging(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_corpus(tmp_path / "data", pairs=16)
    out = tmp_path / "study"
    argv = [*study_argv(data, out, "original"), "--model", "dropout=0.2", "--model", "d_ff=48", "--average", "2"]
    assert run(argv) == 0
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["model"]["dropout"] == 0.2 and row["model"]["d_ff"] == 48
    assert row["checkpoint"].endswith("checkpoint_average.pt") and row["train"]["keep_checkpoints"] == 2
    notes = (out / "table.md").read_text()
    assert "d_ff 48; d_ff=48, dropout=0.2" in notes and "the average of its last 2 validation checkpoints" in notes
    folder = out / "rows" / "original"
    kept = [load_checkpoint(p) for p in step_checkpoints(folder)]
    assert len(kept) == 2
    average = load_checkpoint(folder / "checkpoint_average.pt")
    assert average["averaged_steps"] == [s["position"]["global_step"] for s in kept]
    name = "tgt_embed.weight"
    torch.testing.assert_close(average["model"][name], (kept[0]["model"][name] + kept[1]["model"][name]) / 2)
    # an average of 3 when the run kept 2 is refused (the result would say 3); --rescore keeps the stored result
    capsys.readouterr()
    assert run([*argv[:-1], "3", "--rescore"]) == 0
    assert "kept only 2 validation checkpoint(s)" in capsys.readouterr().out
    assert json.loads((folder / "result.json").read_text())["average"] == 2
    # the same folder with another model is another study
    with pytest.raises(ValueError, match=r"different model config.*dropout"):
        run([*study_argv(data, out, "original"), "--model", "dropout=0.1", "--model", "d_ff=48"])
    with pytest.raises(ValueError, match=r"unknown model settings \['drop'\]"):
        run([*study_argv(data, out, "original"), "--model", "drop=0.1"])
    with pytest.raises(ValueError, match="average must be >= 0"):
        StudyConfig("plain", "x", "y", "tiny", average=-1)


def test_validation_curve_reads_the_runs_validation_records(tmp_path: Path) -> None:
    from compressed_transformer.studies.translation.report import validation_curve

    lines = [
        {"step": 50, "loss": 3.0, "wall": 10.0},
        {"valid_bleu": 12.5, "step": 100, "wall": 20.0},
        {"step": 150, "loss": 2.0, "wall": 30.0},
        {"valid_bleu": 20.0, "step": 200, "wall": 41.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + "\n")
    assert [(c["step"], c["valid_bleu"]) for c in validation_curve(tmp_path)] == [(100, 12.5), (200, 20.0)]
    assert validation_curve(tmp_path / "not-run-yet") == []


def test_merge_seeds_gives_each_rows_mean_and_spread(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import statistics

    data = write_corpus(tmp_path / "data", pairs=16)
    folders = {seed: tmp_path / f"seed{seed}" for seed in (1, 2, 3)}
    for seed, folder in folders.items():
        rows = "original,tt-all,tt-3/4" if seed < 3 else "original"  # tt-all ran with two seeds only
        assert run([*study_argv(data, folder, rows), "--seed", str(seed)]) == 0
    merged_dir = tmp_path / "merged"
    merge = ["study", "plain", "--budget", "tiny", "--merge", *map(str, folders.values())]
    assert run([*merge, "--out", str(merged_dir)]) == 0
    assert "| original | 1,2,3 |" in capsys.readouterr().out
    merged = {r["name"]: r for r in json.loads((merged_dir / "results.json").read_text())["rows"]}
    per_seed = {
        seed: {r["name"]: r for r in json.loads((folder / "results.json").read_text())["rows"]}
        for seed, folder in folders.items()
    }
    bleus = [per_seed[seed]["original"]["bleu"] for seed in (1, 2, 3)]
    assert merged["original"]["bleu"]["mean"] == pytest.approx(statistics.mean(bleus))
    assert merged["original"]["bleu"]["std"] == pytest.approx(statistics.stdev(bleus))
    assert merged["tt-all"]["seeds"] == [1, 2] and merged["tt-all"]["n"] == 2
    steps = [per_seed[seed]["tt-all"]["steps"] for seed in (1, 2)]
    assert merged["tt-all"]["steps"]["mean"] == pytest.approx(statistics.mean(steps))
    assert merged["tt-all"]["ratio"]["mean"] == pytest.approx(per_seed[1]["tt-all"]["ratio"])
    table = (merged_dir / "table.md").read_text()
    assert "| tt-all | 1,2 |" in table and "| tt-3/4 (= tt-all) | 1,2 |" in table and "seed1" in table
    with pytest.raises(ValueError, match="one of the merged folders"):
        run([*merge, "--out", str(folders[2])])
    with pytest.raises(ValueError, match="--rows, --beam would do nothing"):
        run([*merge, "--out", str(merged_dir), "--rows", "tt-all", "--beam", "2"])
    with pytest.raises(ValueError, match="budget 'tiny', not 'small'"):
        run(["study", "plain", "--merge", *map(str, folders.values()), "--out", str(merged_dir)])

    # what cannot be merged
    with pytest.raises(ValueError, match="at least two"):
        merge_studies([folders[1]], "plain")
    with pytest.raises(ValueError, match="seed 1, like an earlier folder"):
        merge_studies([folders[1], folders[1]], "plain")
    with pytest.raises(ValueError, match="not multi30k"):
        merge_studies([folders[1], folders[2]], "multi30k")
    with pytest.raises(FileNotFoundError, match="run \\(or --report-only\\) the study"):
        merge_studies([folders[1], tmp_path / "nothing"], "plain")
    other = tmp_path / "beam2"
    assert run([*study_argv(data, other, "original"), "--seed", "4", "--beam", "2"]) == 0
    with pytest.raises(ValueError, match="beam differ"):
        merge_studies([folders[1], other], "plain")


def test_rows_are_paired_with_the_original_only_when_decoded_the_same_way(tmp_path: Path) -> None:
    import dataclasses
    import hashlib

    from compressed_transformer.data.parallel import ParallelCorpus
    from compressed_transformer.studies.translation.study import RowResult, _pair_with_original

    refs = [f"a dog runs on the grass number {i}" for i in range(40)]
    test = ParallelCorpus(["x"] * len(refs), refs)

    def result(name: str, outputs: list[str], **changes) -> RowResult:
        folder = tmp_path / name
        folder.mkdir()
        text = "".join(line + "\n" for line in outputs)
        (folder / "test.hyp").write_text(text, encoding="utf-8")
        fields = {f.name: None for f in dataclasses.fields(RowResult) if f.default is dataclasses.MISSING}
        fields |= {"name": name, "beam": 5, "average": 0, "checkpoint": str(folder / "checkpoint_best.pt")}
        fields |= {"run_dir": str(folder), "outputs_sha256": hashlib.sha256(text.encode()).hexdigest()}
        return RowResult(**(fields | changes))

    worse = [" ".join(r.split()[:4]) for r in refs]
    rows = [
        result("original", refs),
        result("same", list(refs)),
        result("worse", worse),
        result("beam1", worse, beam=1),  # decoded another way: not paired
        result("edited", worse),
    ]
    (tmp_path / "edited" / "test.hyp").write_text("changed\n" * len(refs))  # no longer what was scored
    _pair_with_original(rows, test)
    p = {r.name: r.p_vs_original for r in rows}
    assert p["original"] is None and p["same"] == 1.0 and p["worse"] < 0.01
    assert p["beam1"] is None and p["edited"] is None


def test_merged_cells_show_a_spread_only_where_one_shows_at_the_printed_digits() -> None:
    from compressed_transformer.studies.translation.seeds import _cell

    assert _cell({"mean": 1.354, "std": 1e-17, "n": 3}, 3, 3) == "1.354"  # equal up to float rounding
    assert _cell({"mean": 1.354, "std": 0.0004, "n": 3}, 3, 3) == "1.354"
    assert _cell({"mean": 30.67, "std": 2.2213, "n": 3}, 2, 3) == "30.67 ± 2.22"
    assert _cell({"mean": 1234.5, "std": 78.9, "n": 2}, 0, 3) == "1,234 ± 79 (n=2)"
    assert _cell({"mean": 34.35, "std": None, "n": 1}, 2, 3) == "34.35 (n=1)"  # one seed: no spread
    assert _cell(None, 2, 3) == "-"
