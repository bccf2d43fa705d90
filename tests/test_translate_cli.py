"""``compressed-transformer translate train|eval|translate`` end to end on a toy corpus, and its bad-input errors."""

from __future__ import annotations

import argparse
import gzip
import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from compressed_transformer import cli, translate
from compressed_transformer.data.parallel import load_dataset
from compressed_transformer.translate import build_configs, parse_option


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="compressed-transformer")
    translate.register(main.add_subparsers(dest="command", required=True))
    return main


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


def write_corpus(folder: Path) -> Path:
    pairs = [("ein hund", "a dog"), ("eine katze", "a cat"), ("ein haus", "a house"), ("ein baum", "a tree")]
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"{split}.de").write_text("".join(f"{de}\n" for de, _ in pairs * 3))
        (folder / f"{split}.en").write_text("".join(f"{en}\n" for _, en in pairs * 3))
    return folder


TRAIN = ["translate", "train", "--dataset", "plain", "--preset", "tiny", "--vocab-size", "40", "--max-tokens", "64"]


def test_translate_is_a_cli_subcommand() -> None:
    assert "compressed_transformer.translate" in cli.SUBCOMMAND_MODULES


def test_parse_option() -> None:
    assert parse_option("ranks=1,2,2,1") == ("ranks", [1, 2, 2, 1])
    assert parse_option("rank=64") == ("rank", 64)
    assert parse_option("sparsity=0.9") == ("sparsity", 0.9)
    assert parse_option("in-modes=[4, 8]") == ("in_modes", [4, 8])
    assert parse_option("name=abc") == ("name", "abc")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_option("ranks")


def test_config_file_and_flags(tmp_path: Path) -> None:
    toml = tmp_path / "exp.toml"
    toml.write_text(
        'preset = "tiny"\n[model]\nd_ff = 48\n[ffn]\nmethod = "tucker"\nblocks = "decoder"\n[ffn.options]\nranks = 2\n'
        "[train]\nlr = 0.002\nmax_steps = 7\n"
    )
    args = parser().parse_args(["translate", "train", "--config", str(toml), "--lr", "0.003", "--model", "heads=4"])
    model, train = build_configs(args)
    assert (model.d_ff, model.heads, model.ffn.method, model.ffn.blocks) == (48, 4, "tucker", "decoder")
    assert model.ffn.options == {"ranks": 2}
    assert (train.lr, train.max_steps, train.precision) == (0.003, 7, "auto")
    flags = ["--precision", "bf16", "--model", "activation_dropout=0.0"]
    model, train = build_configs(parser().parse_args(["translate", "train", "--config", str(toml), *flags]))
    assert (train.precision, model.activation_dropout, model.dropout) == ("bf16", 0.0, 0.0)  # tiny: dropout 0
    args = parser().parse_args(["translate", "train", "--config", str(toml), "--ffn", "svd", "--ffn-opt", "rank=3"])
    assert build_configs(args)[0].ffn.options == {"rank": 3}
    toml.write_text("[model]\nwidth = 3\n")
    with pytest.raises(ValueError, match="unknown model settings"):
        build_configs(parser().parse_args(["translate", "train", "--config", str(toml), "--max-steps", "1"]))


def test_train_eval_translate_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_corpus(tmp_path / "data")
    out = tmp_path / "run"
    argv = [*TRAIN, "--data-dir", str(data), "--out", str(out), "--max-steps", "4", "--no-progress"]
    svd = ["--ffn", "svd", "--ffn-opt", "rank=2", "--ffn-blocks", "encoder", "--lr", "3e-3"]
    assert run([*argv, *svd, "--eval-every", "2", "--keep-checkpoints", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["ffn"]["method"] == "svd"
    assert (out / "command.txt").read_text().strip()
    assert run([*argv[:-3], "--max-steps", "6", "--no-progress", "--resume"]) == 0  # flags may change on resume
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 6

    src = tmp_path / "src.de.gz"
    src.write_bytes(gzip.compress(b"ein hund\neine katze\n"))
    ref = tmp_path / "ref.en"
    ref.write_text("a dog\na cat\n")
    checkpoint = str(out / "checkpoint_last.pt")
    assert (
        run(["translate", "eval", "--checkpoint", checkpoint, "--src", str(src), "--ref", str(ref), "--beam", "2"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert {"bleu", "bleu_seed", "sentences", "seconds", "bleu_signature", "parameters", "compression_ratio"} <= set(
        result
    )
    assert result["sentences"] == 2 and 0.0 <= result["bleu_seed"] <= 1.0 and result["bleu_ci"] >= 0.0
    assert "seed_protocol" not in result
    protocol = ["translate", "eval", "--checkpoint", checkpoint, "--dataset", "plain", "--data-dir", str(data)]
    assert run([*protocol, "--seed-protocol", "--beam", "1"]) == 0
    seed = json.loads(capsys.readouterr().out)["seed_protocol"]
    assert seed["protocol"]["batch_size"] == 150 and seed["kept"] == len(load_dataset("plain", data, "valid"))
    with pytest.raises(ValueError, match="--seed-protocol needs --dataset"):
        run(["translate", "eval", "--checkpoint", checkpoint, "--src", str(src), "--ref", str(ref), "--seed-protocol"])
    # references already tokenised (fairseq's files): the seed-style figure is their BLEU as the study reports it,
    # not a second 13a tokenisation (which would split "dog." and score this hypothesis higher)
    tok_ref = tmp_path / "ref.tok.en"
    tok_ref.write_text("a dog. on grass\na cat. on grass\n")
    hyps = (["a dog . on grass", "a cat . on grass"], 0.1)
    monkeypatch.setattr("compressed_transformer.evaluate.decoding.translate", lambda *a, **k: hyps)
    evaluate = ["translate", "eval", "--checkpoint", checkpoint, "--src", str(src), "--ref", str(tok_ref)]
    assert run([*evaluate, "--tokenized-ref"]) == 0
    tokenized = json.loads(capsys.readouterr().out)
    assert tokenized["bleu_seed"] == round(tokenized["bleu_tok_lc"] / 100, 4) < 0.5
    monkeypatch.undo()

    monkeypatch.setattr("sys.stdin", io.StringIO("ein hund\nein baum\n"))
    assert run(["translate", "translate", "--checkpoint", checkpoint, "--beam", "1"]) == 0
    from_checkpoint = capsys.readouterr().out.splitlines()
    assert len(from_checkpoint) == 2
    # one output line per input line, as from a file: a U+2028 or a form feed inside a sentence does not cut it
    monkeypatch.setattr("sys.stdin", io.StringIO("ein\u2028hund\nein\x0cbaum\n"))
    assert run(["translate", "translate", "--checkpoint", checkpoint, "--beam", "1"]) == 0
    assert len(capsys.readouterr().out.rstrip("\n").split("\n")) == 2

    # export: the folder (or its model.safetensors) translates exactly as the checkpoint does
    exported = tmp_path / "exported"
    assert run(["translate", "export", "--checkpoint", checkpoint, "--out", str(exported)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["file_bytes"] >= report["stored_bytes"] > 0
    assert (exported / "model.safetensors").is_file() and (exported / "spm.model").is_file()
    for source in (exported, exported / "model.safetensors"):
        monkeypatch.setattr("sys.stdin", io.StringIO("ein hund\nein baum\n"))
        assert run(["translate", "translate", "--checkpoint", str(source), "--beam", "1"]) == 0
        assert capsys.readouterr().out.splitlines() == from_checkpoint
    from compressed_transformer.train.checkpoint import load_checkpoint, load_model

    original, reloaded = load_model(load_checkpoint(checkpoint)), load_model(load_checkpoint(exported))
    assert type(reloaded.encoder[0].ffn.fc1).__name__ == "LowRankLinear"
    for key, value in original.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key
    (exported / "spm.model").unlink()
    with pytest.raises(FileNotFoundError, match="needs its tokenizer"):
        load_checkpoint(exported)

    # average: the run kept its last two validation checkpoints (steps 4 and 6, across the resume)
    averaged = tmp_path / "average.pt"
    assert run(["translate", "average", str(out), "--out", str(averaged)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == [4, 6] and [Path(p).name for p in report["averaged"]] == [
        "checkpoint_step4.pt",
        "checkpoint_step6.pt",
    ]
    assert run(["translate", "average", str(out), "--last", "1", "--out", str(tmp_path / "one.pt")]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == [6]
    step6 = load_checkpoint(out / "checkpoint_step6.pt")["model"]
    assert all(torch.equal(v, load_checkpoint(tmp_path / "one.pt")["model"][k]) for k, v in step6.items())
    argv = ["translate", "eval", "--checkpoint", str(averaged), "--src", str(src), "--ref", str(ref)]
    assert run(argv) == 0 and json.loads(capsys.readouterr().out)["sentences"] == 2
    with pytest.raises(FileNotFoundError, match="has no checkpoint_step"):
        run(["translate", "average", str(data), "--out", str(tmp_path / "x.pt")])
    with pytest.raises(ValueError, match="--last must be >= 1"):
        run(["translate", "average", str(out), "--last", "0", "--out", str(tmp_path / "x.pt")])


def test_bad_input_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_corpus(tmp_path / "data")
    (tmp_path / "a.de").write_text("eins\nzwei\n")
    (tmp_path / "b.en").write_text("one\n")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(
            [
                "translate",
                "eval",
                "--checkpoint",
                str(tmp_path / "none.pt"),
                "--src",
                str(tmp_path / "a.de"),
                "--ref",
                str(tmp_path / "a.de"),
            ]
        )
    with pytest.raises(ValueError, match="aligned"):
        run(
            [
                "translate",
                "eval",
                "--checkpoint",
                "x.pt",
                "--src",
                str(tmp_path / "a.de"),
                "--ref",
                str(tmp_path / "b.en"),
            ]
        )
    with pytest.raises(ValueError, match="does not fit"):
        run(
            [
                *TRAIN,
                "--data-dir",
                str(data),
                "--out",
                str(tmp_path / "r"),
                "--max-steps",
                "1",
                "--ffn",
                "tt",
                "--ffn-opt",
                "in_modes=5,7",
                "--ffn-opt",
                "ranks=2",
            ]
        )
    with pytest.raises(ValueError, match="unknown FFN method"):
        run([*TRAIN, "--data-dir", str(data), "--out", str(tmp_path / "r"), "--max-steps", "1", "--ffn", "fft"])
    with pytest.raises(ValueError, match="FFN blocks"):
        run(
            [*TRAIN, "--data-dir", str(data), "--out", str(tmp_path / "r"), "--max-steps", "1", "--ffn-blocks", "enc:9"]
        )

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)  # as on a machine without internet
    with pytest.raises(FileNotFoundError, match="could not download"):
        run(
            [
                *TRAIN,
                "--dataset",
                "multi30k",
                "--data-dir",
                str(tmp_path / "m30k"),
                "--out",
                str(tmp_path / "r"),
                "--max-steps",
                "1",
                "--download",
            ]
        )


def test_compressed_embedding_tables_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from compressed_transformer.train.checkpoint import load_checkpoint, load_model

    data = write_corpus(tmp_path / "data")
    out = tmp_path / "run"
    argv = [*TRAIN, "--data-dir", str(data), "--out", str(out), "--no-progress"]
    compressed = ["--embed", "tt", "--embed-opt", "ranks=2", "--attn", "svd", "--attn-opt", "rank=4"]
    assert run([*argv, "--max-steps", "2", *compressed]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["compression_ratio"]["total"] > 1.0
    extra = json.loads((out / "config.json").read_text())["train"]["extra"]
    assert extra == {
        "embedding": {"method": "tt", "options": {"ranks": 2}},
        "attention": {"method": "svd", "options": {"rank": 4}},
    }
    assert run([*argv, "--max-steps", "3", "--resume"]) == 0  # the resumed run rebuilds the same layers
    model = load_model(load_checkpoint(out / "checkpoint_last.pt"))
    assert type(model.src_embed).__name__ == "TTEmbedding" and model.tgt_embed is model.src_embed
    assert model.src_embed.ranks[1] <= 2
    projections = [m for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))]
    assert projections and all(type(m).__name__ == "LowRankLinear" and m.rank == 4 for m in projections)
    bad = [*TRAIN, "--data-dir", str(data), "--out", str(tmp_path / "x"), "--max-steps", "1"]
    with pytest.raises(ValueError, match="--attn must be one of"):
        run([*bad, "--attn", "fft"])
    with pytest.raises(ValueError, match=r"different run.*extra"):
        run([*argv, "--max-steps", "4", "--resume", "--embed", "svd", "--embed-opt", "rank=2"])
    with pytest.raises(ValueError, match=r"unknown --embed-opt \['rank'\] for 'tt'"):
        run([*bad, "--embed", "tt", "--embed-opt", "rank=2"])
    with pytest.raises(ValueError, match="needs --embed-opt rank=R"):
        run([*bad, "--embed", "svd"])
    assert not (tmp_path / "x").exists()  # bad flags fail before any work


def test_a_sparse_vd_model_is_exported_as_pruned_layers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from safetensors.torch import load_file

    from compressed_transformer.train.checkpoint import load_checkpoint, load_model

    data = write_corpus(tmp_path / "data")
    out, exported = tmp_path / "run", tmp_path / "exported"
    argv = [*TRAIN, "--data-dir", str(data), "--out", str(out), "--no-progress", "--max-steps", "2"]
    assert run([*argv, "--ffn", "svd-o", "--ffn-blocks", "decoder"]) == 0
    capsys.readouterr()
    checkpoint = str(out / "checkpoint_last.pt")
    assert run(["translate", "export", "--checkpoint", checkpoint, "--out", str(exported)]) == 0
    report = json.loads(capsys.readouterr().out)
    original, reloaded = (load_model(load_checkpoint(path)).eval() for path in (checkpoint, exported))
    assert type(original.decoder[0].ffn.fc1).__name__ == "SparseVDLinear"
    assert type(reloaded.decoder[0].ffn.fc1).__name__ == "PrunedLinear"
    assert report["file_bytes"] < 1.2 * report["stored_bytes"]  # no log sigma^2 (int16 columns: can be below)
    assert not any(name.endswith("log_sigma2") for name in load_file(exported / "model.safetensors"))
    src, tgt = torch.randint(4, 40, (2, 5)), torch.randint(4, 40, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(src, tgt), original(src, tgt), atol=1e-5, rtol=1e-5)


def test_a_study_row_folder_resumes_with_translate_train(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``translate train --resume`` rebuilds a study row's low-rank attention and embeddings from its config."""
    from compressed_transformer.studies.translation.cli import register as register_study
    from compressed_transformer.train.checkpoint import load_checkpoint, load_model

    data = write_corpus(tmp_path / "data")
    main = argparse.ArgumentParser(prog="compressed-transformer")
    register_study(main.add_subparsers(dest="command", required=True))
    study = ["study", "plain", "--budget", "tiny", "--data-dir", str(data), "--out", str(tmp_path / "s")]
    args = main.parse_args([*study, "--rows", "tt-all+attn+emb,tt-all+ttemb", "--no-progress"])
    assert args.func(args) == 0
    for row, table in (("tt-all+attn+emb", "LowRankEmbedding"), ("tt-all+ttemb", "TTEmbedding")):
        folder = tmp_path / "s" / "rows" / row
        steps = json.loads((folder / "summary.json").read_text())["steps"]
        argv = ["translate", "train", "--out", str(folder), "--resume", "--max-steps", str(steps + 2)]
        assert run([*argv, "--no-progress"]) == 0
        state = load_checkpoint(folder / "checkpoint_last.pt")
        assert state["position"]["global_step"] == steps + 2
        assert type(load_model(state).src_embed).__name__ == table


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-steps", "-5"], "--max-steps must be >= 0, got -5"),
        (["--vocab-size", "0"], "--vocab-size must be >= 1, got 0"),
        (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["--max-minutes", "inf"], "--max-minutes must be a finite number >= 0, got inf"),
        (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
        (["--kl-weight", "-0.5"], "--kl-weight must be a finite number >= 0, got -0.5"),
        (["--device", "gpu0"], "--device 'gpu0' is not a device: use auto, cpu, cuda or cuda:N"),
        (["--attn-opt", "rank=3"], "--attn-opt needs --attn METHOD"),
        (["--embed-opt", "rank=3"], "--embed-opt needs --embed METHOD"),
        (["--ffn-opt", "rank=3"], "--ffn-opt needs a compressed --ffn METHOD; the FFN is dense"),
        (["--config", "."], "config file . is a folder, not a file"),
    ],
)
def test_bad_training_flags_get_one_line_errors_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, flags: list[str], message: str
) -> None:
    monkeypatch.setattr("compressed_transformer.train.trainer.train", lambda *a, **k: pytest.fail("training started"))
    data = write_corpus(tmp_path / "data")
    argv = ["translate", "train", "--dataset", "plain", "--data-dir", str(data), "--out", str(tmp_path / "r")]
    assert cli.main([*argv, "--max-steps", "1", *flags]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("action", ["eval", "translate"])
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--beam", "0"], "--beam must be >= 1, got 0"),
        (["--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
        (["--length-penalty", "nan"], "--length-penalty must be a finite number, got nan"),
        (["--device", "cuda:x"], "--device 'cuda:x' is not a device: use auto, cpu, cuda or cuda:N"),
    ],
)
def test_bad_decoding_flags_get_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture, action: str, flags: list[str], message: str
) -> None:
    text = tmp_path / "a.de"
    text.write_text("ein hund\n")
    files = ["--src", str(text), "--ref", str(text)] if action == "eval" else ["--input", str(text)]
    assert cli.main(["translate", action, "--checkpoint", str(tmp_path / "none.pt"), *files, *flags]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_the_ffn_help_lists_every_method(capsys: pytest.CaptureFixture) -> None:
    from compressed_transformer.models.transformer import FFN_METHODS

    with pytest.raises(SystemExit):
        parser().parse_args(["translate", "train", "--help"])
    assert f"--ffn FFN FFN method: {', '.join(FFN_METHODS)} " in " ".join(capsys.readouterr().out.split())
