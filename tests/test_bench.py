"""Smoke test of the benchmark command on a tiny grid, and of its parts (layer names, memory tracker, CLI)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compressed_transformer import bench
from compressed_transformer.bench import BenchConfig, PeakTensorMemory, TransformerBench, build_layer, run_bench
from compressed_transformer.cli import build_parser
from compressed_transformer.functional.tt import TTPlan, tt_plan_macs
from compressed_transformer.layers import LowRankLinear, PrunedLinear, SparseLinear, TTLinear

TINY_LAYERS = ("dense", "tt-r2", "tucker-r2", "svd-r4", "prune-0.9", "svd-o-0.9")


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def strict_json(constant: str) -> None:
    raise AssertionError(f"{constant} is not JSON")


def test_bench_writes_rows_table_and_plot(tmp_path) -> None:
    config = BenchConfig(
        shapes=((16, 32),),
        tokens=(1, 5),
        layers=TINY_LAYERS,
        repeats=3,
        budget_s=0.05,
        transformer=TransformerBench(
            preset="tiny", vocab_size=64, batch=2, length=4, decode_batch=2, decode_steps=3, beam=2, tt_ranks=(1, 2, 1)
        ),
        out=str(tmp_path),
    )
    result = run_bench(config, argv=["compressed-transformer", "bench", "--quick"])
    assert result["meta"]["command"] == "compressed-transformer bench --quick"
    saved = json.loads((tmp_path / "bench.json").read_text(), parse_constant=strict_json)
    assert saved["rows"] == result["rows"]
    assert (tmp_path / "bench.md").read_text().count("|") > 10
    assert (tmp_path / "ratio.png").stat().st_size > 0
    layer_rows = [r for r in saved["rows"] if not r["layer"].startswith("transformer-")]
    expected = {"layer", "in", "out", "tokens", "pass", "ms", "ratio_to_dense", "macs", "gflops", "peak_bytes", "path"}
    assert all(expected <= set(r) for r in layer_rows)
    # every layer in both passes at both token counts, except Sparse VD, timed in eval form only
    assert len(layer_rows) == 2 * 2 * len(TINY_LAYERS) - 2
    for r in layer_rows:
        assert r["ms"] > 0 and r["macs"] >= 0
        if r["layer"] == "dense":
            assert r["ratio_to_dense"] == 1.0 and r["macs"] == (3 if r["pass"] == "train" else 1) * r["tokens"] * 512
    model_rows = [r for r in saved["rows"] if r["layer"].startswith("transformer-")]
    assert {(r["ffn"], r["pass"]) for r in model_rows} == {
        (f, p) for f in bench.TRANSFORMER_VARIANTS for p in ("train", "greedy", "beam")
    }
    held = {r["ffn"]: r["state_bytes"] for r in model_rows if r["pass"] == "train"}
    assert held["sparse"] < held["dense"] < held["prune"]  # kept weights only; dense weight + mask + caches


def test_training_state_bytes_counts_what_a_model_holds_between_steps() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    optimizer = torch.optim.AdamW(model.parameters())
    params = 4 * 3 + 3 + 3 + 3  # linear weight + bias, norm weight + bias (float32)
    buffers = 4 * (3 + 3) + 8  # running mean / var (float32), batches seen (int64)
    assert bench.training_state_bytes(model, optimizer) == 4 * params + buffers
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    # + gradients, + AdamW's two moments per parameter and a step count (a float32 scalar) per parameter tensor
    assert bench.training_state_bytes(model, optimizer) == 4 * params + buffers + 4 * params + 8 * params + 4 * 4


@pytest.mark.parametrize("name", [*TINY_LAYERS, "tt-r8", "prune-0.98", "sparse-0.9", "svd-o-0.98"])
def test_build_layer_names(name: str) -> None:
    layer = build_layer(name, 16, 32, device=torch.device("cpu"), dtype=torch.float32)
    assert layer(torch.randn(3, 16)).shape == (3, 32)
    if name.startswith(("prune-", "sparse-")):
        assert abs(layer.sparsity - float(name.split("-")[1])) < 0.1
    if name.startswith("svd-o-"):
        assert abs(layer.sparsity - float(name.rsplit("-", 1)[1])) < 0.1


def test_unknown_layer_name() -> None:
    with pytest.raises(ValueError, match="unknown benchmark layer"):
        build_layer("cp-r2", 16, 32, device=torch.device("cpu"), dtype=torch.float32)


def test_peak_memory_counts_fresh_tensors_only() -> None:
    x = torch.randn(256, 256)

    def fn() -> None:
        a = x * 2  # 256 KiB
        b = a + 1  # another 256 KiB, both alive
        b.mul_(3)  # in place: no allocation
        del a, b
        x.t()  # a view: no allocation

    with PeakTensorMemory() as tracker:
        fn()
    assert tracker.peak == 2 * 256 * 256 * 4


def test_cli_has_bench_and_parses_quick() -> None:
    args = build_parser().parse_args(["bench", "--quick", "--no-transformer", "--tokens", "1,7", "--out", "x"])
    config = bench.config_from_args(args)
    assert config.tokens == (1, 7) and config.transformer is None and config.layers == bench.QUICK_LAYERS
    assert args.func is bench.main


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tokens", "0"], "token counts must be >= 1"),
        (["--tokens", ","], "token counts must be >= 1"),
        (["--shapes", "0x5"], "positive ints"),
        (["--shapes", "512"], "positive ints"),
        (["--repeats", "0"], "repeats must be >= 1"),
        (["--budget", "0"], "budget_s > 0"),
        (["--passes", "backward"], "forward and/or train"),
        (["--budget", "inf"], "budget_s > 0 and finite"),
        (["--tokens", "1,4,1"], "tokens must not repeat a value, got 1 more"),
        (["--shapes", "16x32,16x32"], r"shapes must not repeat a value, got \(16, 32\)"),
        (["--layers", "tt-r2,dense,tt-r2"], "layers must not repeat a value, got tt-r2"),
        (["--passes", "train,train"], "passes must not repeat"),
    ],
)
def test_cli_refuses_an_empty_or_bad_grid_before_measuring(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bench.config_from_args(build_parser().parse_args(["bench", "--quick", *flags]))


def test_cli_sets_the_transformer_batch_and_compile_mode() -> None:
    argv = ["bench", "--transformer-batch", "128", "--transformer-length", "24", "--compile-mode", "reduce-overhead"]
    config = bench.config_from_args(build_parser().parse_args(argv))
    assert (config.transformer.batch, config.transformer.length, config.transformer.preset) == (128, 24, "base")
    assert config.compile_mode == "reduce-overhead"
    with pytest.raises(ValueError, match="transformer-batch"):
        bench.config_from_args(build_parser().parse_args(["bench", "--transformer-batch", "0"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--compile-mode", "fastest"])


def spec_d_model(spec: TransformerBench) -> int:
    from compressed_transformer.models.transformer import preset

    return preset(spec.preset).d_model


def test_transformer_variants_swap_every_ffn_linear() -> None:
    spec = TransformerBench(preset="tiny", vocab_size=64, tt_ranks=(1, 2, 1))
    variants = (
        ("tt", "TTLinear"),
        ("tucker", "TuckerLinear"),
        ("svd", "LowRankLinear"),
        ("prune", "PrunedLinear"),
        ("sparse", "SparseLinear"),
    )
    for variant, cls in (*variants, ("dense", "Linear")):
        model = bench.build_transformer(variant, spec, torch.device("cpu"), torch.float32)
        kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith(("ffn.fc1", "ffn.fc2"))}
        assert kinds == {cls}
        assert isinstance(model, nn.Module)
    model = bench.build_transformer("tt+emb", spec, torch.device("cpu"), torch.float32)
    assert type(model.src_embed).__name__ == "LowRankEmbedding" and model.tgt_embed is model.src_embed
    model = bench.build_transformer("tt+ttemb", spec, torch.device("cpu"), torch.float32)
    assert type(model.src_embed).__name__ == "TTEmbedding" and model.tgt_embed is model.src_embed
    assert set(bench.TRANSFORMER_VARIANTS) == {"dense", "tt", "tucker", "svd", "prune", "sparse", "tt+emb", "tt+ttemb"}
    svd = bench.build_transformer("svd", spec, torch.device("cpu"), torch.float32)
    assert svd.encoder[0].ffn.fc1.rank == spec_d_model(spec) // 8
    pruned = bench.build_transformer("prune", spec, torch.device("cpu"), torch.float32)
    assert pruned.decoder[1].ffn.fc2.sparsity == pytest.approx(0.9, abs=0.01)
    sparse = bench.build_transformer("sparse", spec, torch.device("cpu"), torch.float32)
    assert sparse.decoder[1].ffn.fc2.sparsity == pytest.approx(0.9, abs=0.01)
    with pytest.raises(ValueError, match="unknown transformer variant 'tucker\\+emb'"):
        bench.build_transformer("tucker+emb", spec, torch.device("cpu"), torch.float32)


def test_clock_choice_follows_device_and_threads(monkeypatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert bench.resolve_clock(BenchConfig(), cpu) == "cpu"
    assert bench.resolve_clock(BenchConfig(clock="wall"), cpu) == "wall"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert bench.resolve_clock(BenchConfig(), cpu) == "wall"
    with pytest.raises(ValueError, match="--threads 1"):
        bench.resolve_clock(BenchConfig(clock="cpu"), cpu)
    with pytest.raises(ValueError, match="auto, wall or cpu"):
        bench.resolve_clock(BenchConfig(clock="gpu"), cpu)


def test_cpu_clock_ignores_time_spent_waiting() -> None:
    import time

    samples = bench.time_interleaved(
        {"sleep": lambda: time.sleep(0.002)}, torch.device("cpu"), 3, 0.1, warmup=0, clock=bench.CLOCKS["cpu"]
    )
    assert max(samples["sleep"]) < 0.001  # sleeping costs no CPU time; the wall clock would say 2 ms


def test_time_interleaved_warms_up_in_turns() -> None:
    """Warm-up calls take turns as the samples do (a function's steady state includes what the others leave behind),
    then every function is sampled ``rounds`` times, round-robin."""
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    samples = bench.time_interleaved(fns, torch.device("cpu"), 3, 10.0, warmup=2, clock=bench.CLOCKS["cpu"])
    assert calls[:6] == ["a", "b", "c"] * 2
    assert {name: len(times) for name, times in samples.items()} == {"a": 3, "b": 3, "c": 3}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "bogus"], "--device must be auto, cpu or cuda"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--layers", "prune-1.5"], "unknown benchmark layer 'prune-1.5'"),
        (["--layers", "tt-rX"], "unknown benchmark layer 'tt-rX'"),
        (["--layers", "svd-r300", "--shapes", "2048x512,256x1024"], "'svd-r300' at 256x1024: rank must be"),
        (["--transformer-preset", "bogus"], "unknown preset 'bogus'"),
        (["--layers", "tltorch-cp-r2"], "unknown benchmark layer 'tltorch-cp-r2'"),
        (["--layers", "tltorch-tt-rX"], "unknown benchmark layer 'tltorch-tt-rX'"),
    ],
)
def test_bad_options_fail_in_one_line_before_any_timing(tmp_path, capsys, monkeypatch, argv, message) -> None:
    from compressed_transformer.cli import main

    def never(*args, **kwargs):
        raise AssertionError("timing started")

    monkeypatch.setattr(bench, "bench_layers", never)
    out = tmp_path / "out"
    assert main(["bench", "--quick", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (out / "bench.json").exists()


def test_module_entry_points_report_bad_options_in_one_line() -> None:
    """``python -m compressed_transformer.calibrate`` / ``.bench`` answer as the subcommands do."""
    import subprocess
    import sys

    for module in ("compressed_transformer.calibrate", "compressed_transformer.bench"):
        done = subprocess.run(
            [sys.executable, "-m", module, "--quick", "--tokens", "0"], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2 and done.stderr.strip() == "error: token counts must be >= 1, got (0,)", module


def test_compile_passes() -> None:
    """``auto`` compiles training passes on CUDA only (measured: compiled forwards lose their eval cache)."""
    from compressed_transformer.bench import compile_passes

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert compile_passes("auto", cuda) == {"train"}
    assert compile_passes("auto", cpu) == set()
    assert compile_passes("on", cpu) == {"forward", "train"}
    assert compile_passes("off", cuda) == set()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shape", "512"], "--shape looks like 512x2048"),
        (["--layer", "svd-r9999"], "rank must be an int in"),
        (["--layer", "tltorch-cp-r2"], "unknown benchmark layer 'tltorch-cp-r2'"),
    ],
)
def test_profile_layer_script_refuses_bad_options_before_profiling(tmp_path, argv, message) -> None:
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "profile_layer.py"
    done = subprocess.run(
        [sys.executable, str(script), *argv, "--out", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not any(tmp_path.iterdir())


def test_profile_layer_script_writes_both_tables(tmp_path) -> None:
    """scripts/profile_layer.py: the per-op tables of dense and the layer, and a Chrome trace (tiny CPU case)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "profile_layer.py"
    argv = [sys.executable, str(script), "--layer", "tt-r2", "--shape", "16x32", "--tokens", "3", "--steps", "2"]
    done = subprocess.run(
        [*argv, "--out", str(tmp_path)], env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "tt-r2-train-3.txt").read_text()
    assert "## dense (dense)" in text and "## tt-r2 (" in text and "aten::" in text
    assert json.loads((tmp_path / "tt-r2-train-3.trace.json").read_text())["traceEvents"]
    bad = subprocess.run([*argv[:-2], "--steps", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--steps must be >= 1" in bad.stderr


def test_closed_form_multiply_adds_of_each_layer() -> None:
    linear = nn.Linear(512, 2048)
    low_rank = LowRankLinear.from_linear(linear, rank=64)
    assert bench.layer_macs(low_rank, 10, train=False) == (10 * 64 * 2560, 10 * 64 * 2560)  # factorised at 10 tokens
    pruned = PrunedLinear.from_linear(linear, sparsity=0.9)
    nnz = int(pruned.mask.sum())
    taken, fewest = bench.layer_macs(pruned, 100, train=True)
    assert fewest == 3 * 100 * nnz and taken in (3 * 100 * nnz, 3 * 100 * 512 * 2048)
    sparse = SparseLinear.from_pruned(pruned)
    taken, fewest = bench.layer_macs(sparse, 100, train=True)
    assert fewest == 3 * 100 * nnz and taken in (3 * 100 * nnz, 3 * 100 * 512 * 2048)
    tt = TTLinear.from_linear(linear, ranks=2)
    _, fewest = bench.layer_macs(tt, 1, train=False)
    core_by_core = min(
        tt_plan_macs(tt.out_modes, tt.in_modes, tt.ranks, TTPlan((1,) * len(tt.cores), direction))
        for direction in ("ltr", "rtl")
    )
    assert fewest <= core_by_core < 512 * 2048 // 10  # ~14x fewer than dense
    assert bench.layer_macs(linear, 7, train=True) == (3 * 7 * 512 * 2048,) * 2


def test_a_layer_that_cannot_run_is_reported_in_the_json_and_the_table(tmp_path, monkeypatch) -> None:
    """A layer that cannot be built here (tensorly-torch missing) is listed in ``meta["skipped"]`` and named in
    bench.md, not silently left out."""
    real = bench.build_layer

    def without_tltorch(name: str, *args, **kwargs) -> nn.Module:
        if name.startswith("tltorch-"):
            raise ImportError("No module named 'tltorch'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(bench, "build_layer", without_tltorch)
    config = BenchConfig(
        shapes=((16, 32),), tokens=(1,), layers=("dense", "tltorch-tt-r2"), passes=("forward",), repeats=1,
        budget_s=0.01, transformer=None, out=str(tmp_path),
    )  # fmt: skip
    result = run_bench(config, argv=[])
    assert {r["layer"] for r in result["rows"]} == {"dense"}
    skipped = json.loads((tmp_path / "bench.json").read_text())["meta"]["skipped"]
    assert skipped == [{"layer": "tltorch-tt-r2", "in": 16, "out": 32, "reason": "No module named 'tltorch'"}]
    assert "Not run here: tltorch-tt-r2 at 16→32 (No module named 'tltorch')" in (tmp_path / "bench.md").read_text()


def test_pruned_training_at_a_few_tokens_counts_the_dense_weight_gradient() -> None:
    """At most DENSE_GRAD_TOKENS tokens and a density of at least 5 %, a pruned layer's CSR training computes its
    weight gradient as a dense outer product times the mask: CSR forward and input gradient (nnz each) + the
    dense product (in x out), not three CSR products."""
    from compressed_transformer.layers._fast import DENSE_GRAD_TOKENS

    pruned = PrunedLinear.from_linear(nn.Linear(512, 2048), sparsity=0.9)
    nnz, dense = int(pruned.mask.sum()), 512 * 2048
    for tokens in (1, DENSE_GRAD_TOKENS, DENSE_GRAD_TOKENS + 1):
        assert pruned.forward_path(tokens, train=True) == "csr"
        taken, fewest = bench.layer_macs(pruned, tokens, train=True)
        small = tokens <= DENSE_GRAD_TOKENS
        assert taken == tokens * ((2 * nnz + dense) if small else 3 * nnz) and fewest == 3 * tokens * nnz
    assert bench.layer_macs(pruned, 1, train=False)[0] in (nnz, dense)  # forward: no weight gradient
    sparse = SparseLinear.from_pruned(pruned)  # its value gradient is sampled at every token count
    assert bench.layer_macs(sparse, 1, train=True)[0] in (3 * nnz, 3 * dense)
    very_sparse = PrunedLinear.from_linear(nn.Linear(512, 2048), sparsity=0.98)  # below 5 % density: sampled
    nnz = int(very_sparse.mask.sum())
    if very_sparse.forward_path(1, train=True) == "csr":
        assert bench.layer_macs(very_sparse, 1, train=True)[0] == 3 * nnz


def test_out_as_a_file_fails_in_one_line_before_any_timing(tmp_path, capsys, monkeypatch) -> None:
    from compressed_transformer.cli import main

    def never(*args, **kwargs):
        raise AssertionError("timing started")

    monkeypatch.setattr(bench, "bench_layers", never)
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["bench", "--quick", "--no-transformer", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {target} is a file, not a folder\n"
