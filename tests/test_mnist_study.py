"""The MNIST study: budgets, compression settings, config checks and the whole pipeline on a few hundred images."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from compressed_transformer.cli import main as cli_main
from compressed_transformer.data.mnist import FILES, write_idx
from compressed_transformer.models.mlp import MLP
from compressed_transformer.studies import mnist as study
from compressed_transformer.studies.mnist import (
    RECIPES,
    ROWS,
    SEED_TABLE,
    MNISTStudyConfig,
    compress_row,
    whole_network_budget,
)

DENSE = 203_530


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def write_synthetic_mnist(directory: Path, n_train: int = 300, n_test: int = 200) -> Path:
    """Canonical file names, learnable content: digit k lights up a 6x6 patch whose place depends on k."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            row, col = 2 + 8 * (k // 4), 2 + 6 * (k % 4)
            images[i, row : row + 6, col : col + 6] = 255
        write_idx(directory / FILES[f"{split}_images"].name, images)
        write_idx(directory / FILES[f"{split}_labels"].name, labels)
    return directory


@pytest.mark.parametrize(("ratio", "budget"), [(1.0, DENSE), (56.95, 3574), (72.02, 2826), (8.15, 24988)])
def test_whole_network_budget_at_the_seeds_precision(ratio, budget):
    assert whole_network_budget(DENSE, ratio) == budget
    assert round(DENSE / budget, 2) >= ratio
    assert budget == DENSE or round(DENSE / (budget + 1), 2) < ratio


@pytest.mark.parametrize("ratio", [0.5, math.inf, math.nan])
def test_whole_network_budget_rejects_bad_ratios(ratio):
    with pytest.raises(ValueError, match="finite number >= 1"):
        whole_network_budget(DENSE, ratio)


@pytest.mark.parametrize("row", [name for name, recipe in RECIPES.items() if recipe.ratio is not None])
def test_every_row_reaches_the_seeds_ratio(row):
    model = MLP()
    compressed, options, errors = compress_row(model, row, RECIPES[row], RECIPES[row].ratio)
    params = study.stored_params(compressed)
    assert params <= whole_network_budget(DENSE, RECIPES[row].ratio)
    assert study.reaches(DENSE / params, RECIPES[row].ratio)
    assert set(options) == set(RECIPES[row].layers) == set(errors)
    assert type(model.fc1) is torch.nn.Linear  # the original is left alone
    assert compressed(torch.randn(2, 784)).shape == (2, 10)


def test_tt_rows_use_the_seeds_modes_and_balanced_ranks():
    _, options, _ = compress_row(MLP(), "tt+ft", RECIPES["tt+ft"], 72.02)
    assert options["fc1"]["in_modes"] == [7, 4, 7, 4] and options["fc1"]["out_modes"] == [2, 8, 8, 2]
    _, a, b, a2, _ = options["fc1"]["ranks"]
    assert a == a2 and a <= b <= 2 * a


def test_tt_scratch_is_the_seeds_network():
    model = study.build_tt_scratch(MNISTStudyConfig().model)
    assert model.fc1.ranks == [1, 2, 4, 2, 1] and study.stored_params(model) == 3574


def test_unreachable_ratio_is_a_clear_error():
    with pytest.raises(ValueError, match=r"row 'tucker' cannot reach 1000.0x"):
        compress_row(MLP(), "tucker", RECIPES["tucker"], 1000.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rows": ("original", "bogus")}, "unknown row"),
        ({"ratios": (("svd-o", 10.0),)}, "no target ratio"),
        ({"ratios": (("tt", 0.5),)}, "finite number >= 1"),
        ({"rows": ("svd",), "ratios": (("tt", 100.0),)}, r"--ratio names row 'tt', which is not among the rows built"),
        ({"distill": "sometimes"}, "distill must be one of"),
        ({"hidden": 0}, "positive int"),
        ({"kd_alpha": 2.0}, "kd_alpha"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MNISTStudyConfig(**kwargs)


def test_impossible_options_fail_before_training(tmp_path, capsys):
    start = time.perf_counter()
    code = cli_main(
        [
            "mnist",
            "--data-dir",
            str(tmp_path / "absent"),
            "--out",
            str(tmp_path / "o"),
            "--ratio",
            "tucker=5000",
            "--no-download",
        ]
    )
    assert code == 2 and "cannot reach 5000.0x" in capsys.readouterr().err
    assert time.perf_counter() - start < 20 and not (tmp_path / "o").exists()
    assert cli_main(["mnist", "--rows", "original,tt++", "--out", str(tmp_path / "o")]) == 2
    assert "unknown row" in capsys.readouterr().err
    (tmp_path / "o-file").write_text("x")  # refused before the data are read (or downloaded), in words
    assert (
        cli_main(["mnist", "--data-dir", str(tmp_path / "absent"), "--no-download", "--out", str(tmp_path / "o-file")])
        == 2
    )
    assert "o-file is a file, not an output folder" in capsys.readouterr().err
    # an --out that cannot be a folder: one line, no traceback
    (tmp_path / "file").write_text("x")
    assert cli_main(["bench", "--quick", "--no-transformer", "--out", str(tmp_path / "file")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --out ") and error.endswith("is a file, not a folder\n")


def test_missing_data_is_reported_with_the_folder(tmp_path, capsys):
    code = cli_main(
        [
            "mnist",
            "--data-dir",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "o"),
            "--no-download",
            "--rows",
            "original",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path / "none") in err and FILES["train_images"].name in err


def _check_outputs(out: Path, names: list[str]) -> dict:
    for filename in ("table.md", "results.json", "pareto.png"):
        assert (out / filename).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row for row in results["rows"]}
    assert list(rows) == names
    for row in results["rows"]:
        assert {"method", "accuracy", "ratio", "params", "bytes", "seconds"} <= set(row)
        assert 0.0 <= row["accuracy"] <= 1.0 and row["seconds"] >= 0
        assert row["ratio"] == pytest.approx(DENSE / row["params"])  # the seed's accounting, whole network
        if row["target_ratio"] is not None:
            assert study.reaches(row["ratio"], row["target_ratio"])
    assert rows["original"]["params"] == DENSE and rows["original"]["bytes"] == 4 * DENSE
    # Sparse layers pay for their indices: fewer bytes saved than parameters.
    assert rows["prune"]["bytes"] > 4 * rows["prune"]["params"]
    assert rows["tt"]["bytes"] == 4 * rows["tt"]["params"]
    # the measured files: within a header's kilobytes of the counted bytes (sparse rows: int16 columns, fewer)
    for name in names:
        assert rows[name]["file_bytes"] < rows[name]["bytes"] + 8192, name
        assert rows[name]["file_ratio"] == pytest.approx(rows["original"]["file_bytes"] / rows[name]["file_bytes"])
    assert rows["prune"]["file_bytes"] < 6 * rows["prune"]["params"] + 8192
    assert rows["prune"]["file_ratio"] > 2.0
    assert set(results["seed_matches"]) == set(SEED_TABLE)
    assert {"config", "command", "git_revision", "environment", "stretch"} <= set(results)
    assert results["config"]["train_limit"] == 300
    table = (out / "table.md").read_text()
    for name in names:
        assert f"| {name} |" in table
    return results


def test_whole_pipeline_on_a_few_hundred_images(tmp_path, capsys):
    data_dir = write_synthetic_mnist(tmp_path / "mnist")
    out = tmp_path / "run"
    code = cli_main(
        [
            "mnist",
            "--data-dir",
            str(data_dir),
            "--no-verify",
            "--out",
            str(out),
            "--train-limit",
            "300",
            "--epochs",
            "3",
            "--ft-epochs",
            "1",
            "--svdo-epochs",
            "1",
            "--scratch-epochs",
            "1",
            "--batch-size",
            "64",
            "--distill",
            "both",
            "--sweep",
            "--no-progress",
            "--threads",
            "1",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| seed row |" in printed and "total time" in printed
    names = [
        "original",
        "prune",
        "prune+ft",
        "prune+ft+kd",
        "svd",
        "svd+ft",
        "svd+ft+kd",
        "svd-o",
        "tucker",
        "tucker+ft",
        "tucker+ft+kd",
        "tt",
        "tt+ft",
        "tt+ft+kd",
        "tt-scratch",
    ]
    results = _check_outputs(out, names)
    rows = {row["method"]: row for row in results["rows"]}
    assert rows["original"]["accuracy"] > 0.5  # the synthetic digits are learnable
    assert rows["prune+ft+kd"]["distilled"] and not rows["prune+ft"]["distilled"]
    assert rows["tt-scratch"]["params"] == 3574
    sweep = results["sweep"]
    assert {point["compression"] for point in sweep} == {"prune", "svd", "tucker", "tt", "svd-o"}
    assert all(point["sweep"] for point in sweep)
    sparse_vd = [point for point in sweep if point["compression"] == "svd-o"]  # one point per log-alpha threshold
    assert [p["layer_options"]["fc1"]["threshold"] for p in sparse_vd] == list(study.SWEEP_SPARSE_VD_THRESHOLDS)
    ratios = [p["ratio"] for p in sparse_vd]
    assert ratios == sorted(ratios, reverse=True)  # a higher threshold keeps more weights
    assert rows["svd"]["layer_options"]["fc1"]["whitened"]

    # Every table row's network is written to models/; loaded into a fresh dense MLP it scores the row's accuracy.
    from compressed_transformer.data.mnist import load_mnist
    from compressed_transformer.serialization import load_compressed_
    from compressed_transformer.studies.mnist.training import accuracy, to_tensors

    data = to_tensors(load_mnist(data_dir, download=False, verify=False))
    assert sorted(p.stem for p in (out / "models").iterdir()) == sorted(names)
    for name in ("original", "prune+ft", "svd-o", "tucker+ft", "tt-scratch"):
        path = out / "models" / f"{name}.safetensors"
        assert path.stat().st_size == rows[name]["file_bytes"], name
        model = load_compressed_(MLP(study.MLPConfig()), path)
        assert accuracy(model, data.x_test, data.y_test) == rows[name]["accuracy"], name
    assert type(load_compressed_(MLP(study.MLPConfig()), out / "models" / "svd-o.safetensors").fc1).__name__ == (
        "PrunedLinear"
    )

    # The saved original is reused instead of retrained.
    again = tmp_path / "again"
    common = ["--data-dir", str(data_dir), "--no-verify", "--train-limit", "300", "--no-progress", "--threads", "1"]
    assert (
        cli_main(["mnist", *common, "--out", str(again), "--original", str(out / "original.pt"), "--rows", "svd"]) == 0
    )
    reused = json.loads((again / "results.json").read_text())
    assert [row["method"] for row in reused["rows"]] == ["original", "svd"]
    assert reused["rows"][0]["accuracy"] == rows["original"]["accuracy"]
    # run again into the first folder: its models/ then holds this run's networks only, as its results.json
    assert cli_main(["mnist", *common, "--out", str(out), "--original", str(out / "original.pt"), "--rows", "svd"]) == 0
    assert sorted(p.stem for p in (out / "models").iterdir()) == ["original", "svd"]


def test_rows_subset_and_default_rows():
    assert MNISTStudyConfig().rows == ROWS
    config = MNISTStudyConfig(rows=("svd",), ratios=(("svd", 20.0),))
    assert config.target_ratio("svd") == 20.0 and config.target_ratio("tt") == SEED_TABLE["tt"].ratio


def test_original_checkpoint_round_trip(tmp_path):
    model = MLP(study.MLPConfig(hidden=32))
    study.save_original(tmp_path / "original.pt", model)
    loaded = study.load_original(tmp_path / "original.pt", study.MLPConfig(hidden=32))
    x = torch.randn(3, 784)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    with pytest.raises(ValueError, match="match --hidden"):
        study.load_original(tmp_path / "original.pt", study.MLPConfig())
    with pytest.raises(FileNotFoundError, match=r"original\.pt written by an earlier run"):
        study.load_original(tmp_path / "missing.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"not an original\.pt"):
        study.load_original(tmp_path / "other.pt")
    torch.save(model, tmp_path / "module.pt")  # a pickled module: refused by weights_only loading, in one line
    with pytest.raises(ValueError, match=r"not an original\.pt"):
        study.load_original(tmp_path / "module.pt")


@pytest.mark.parametrize("changes", [{"warmup_epochs": math.nan}, {"warmup_epochs": -5.0}, {"threshold": math.inf}])
def test_sparse_vd_settings_must_be_finite(changes) -> None:
    """(an infinite warm-up would silently turn the KL term off, and NaN would reach results.json)"""
    with pytest.raises(ValueError, match="Sparse VD"):
        study.SparseVDConfig(**changes)


def test_distillation_loss_is_the_tempered_kl_divergence() -> None:
    from compressed_transformer.studies.mnist.training import distillation_loss

    logits, teacher = torch.randn(8, 10, dtype=torch.float64), torch.randn(8, 10, dtype=torch.float64)
    assert float(distillation_loss(teacher, teacher, 3.0)) == pytest.approx(0.0, abs=1e-12)
    for temperature in (1.0, 4.0):
        p = torch.softmax(teacher / temperature, -1)
        q = torch.softmax(logits / temperature, -1)
        expected = temperature**2 * (p * (p.log() - q.log())).sum(-1).mean()
        torch.testing.assert_close(distillation_loss(logits, teacher, temperature), expected)


def test_whitened_low_rank_is_the_svd_for_white_inputs_and_better_for_correlated_ones() -> None:
    from compressed_transformer.studies.mnist.compression import whitened_low_rank

    torch.manual_seed(0)
    weight = torch.randn(20, 30, dtype=torch.float64)
    left, right = whitened_low_rank(weight, torch.eye(30, dtype=torch.float64), 5, damping=0.0)
    u, s, vh = torch.linalg.svd(weight)
    torch.testing.assert_close(left @ right, (u[:, :5] * s[:5]) @ vh[:5])  # Eckart-Young: the plain SVD
    x = torch.randn(2000, 30, dtype=torch.float64) @ torch.randn(30, 30, dtype=torch.float64)  # correlated inputs
    gram = x.T @ x / len(x)
    left, right = whitened_low_rank(weight, gram, 5, damping=0.0)

    def response_error(approx: torch.Tensor) -> float:
        return float(((weight - approx) @ x.T).square().mean())

    assert response_error(left @ right) < 0.9 * response_error((u[:, :5] * s[:5]) @ vh[:5])
