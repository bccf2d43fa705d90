"""The cost model's calibration: NNLS, the linearity the fit relies on, the fit itself, installing a model (every
layer's decisions follow it), its files, ``compressed-transformer calibrate`` and ``bench --costs``."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from compressed_transformer import calibrate, cli
from compressed_transformer.bench import BenchConfig, run_bench
from compressed_transformer.functional import costs
from compressed_transformer.functional.costs import (
    CPU_COSTS,
    CUDA_COSTS,
    UNIT_NAMES,
    cost_features,
    cost_model_for,
    fit_cost_model,
    load_cost_models,
    model_units,
    model_with_units,
    nnls,
    save_cost_models,
    set_cost_model,
)
from compressed_transformer.functional.tt import TTPlan, tt_plan_seconds
from compressed_transformer.layers import LowRankLinear, PrunedLinear, TTLinear
from compressed_transformer.layers._fast import csr_seconds, masked_csr_train_seconds, masked_dense_train_seconds


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch: pytest.MonkeyPatch):
    """Every test starts and ends with the built-in models and no $COMPRESSED_TRANSFORMER_COSTS."""
    monkeypatch.delenv(costs.COSTS_ENV_VAR, raising=False)
    monkeypatch.setattr(costs, "_installed", {})
    monkeypatch.setitem(costs._state, "env_read", False)
    yield


# --- NNLS -----------------------------------------------------------------------------------------------------------


def brute_force_nnls(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The best least-squares solution over every support whose unconstrained solution is non-negative."""
    best, best_x = math.inf, torch.zeros(a.shape[1], dtype=torch.float64)
    for size in range(1, a.shape[1] + 1):
        for support in itertools.combinations(range(a.shape[1]), size):
            cols = list(support)
            sol = torch.linalg.lstsq(a[:, cols], b[:, None]).solution[:, 0]
            if (sol >= 0).all():
                x = torch.zeros(a.shape[1], dtype=torch.float64)
                x[cols] = sol
                residual = float((a @ x - b).norm())
                if residual < best:
                    best, best_x = residual, x
    return best_x


@pytest.mark.parametrize("seed", range(12))
def test_nnls_matches_the_best_nonnegative_support(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    m, n = 4 + seed, 1 + seed % 5
    a = torch.randn(m, n, generator=g, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64)
    x = nnls(a, b)
    assert (x >= 0).all()
    expected = brute_force_nnls(a, b)
    assert float((a @ x - b).norm()) <= float((a @ expected - b).norm()) + 1e-9
    # KKT: the gradient vanishes on the support and points outwards (<= 0) off it
    gradient = a.T @ (b - a @ x)
    assert torch.allclose(gradient[x > 0], torch.zeros_like(gradient[x > 0]), atol=1e-8)
    assert (gradient[x == 0] <= 1e-8).all()


def test_nnls_recovers_an_exact_nonnegative_solution_and_checks_shapes() -> None:
    a = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 3.0], [2.0, 1.0, 1.0]])
    truth = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(nnls(a, a.double() @ truth), truth)
    with pytest.raises(ValueError, match=r"\(m, n\) matrix"):
        nnls(a, torch.ones(3))


# --- linearity: predictions are features . per-unit costs -------------------------------------------------------


def predictors(threads: int = 2) -> list:
    """Predictions of every kind the layers make (fixed work, a function of the model)."""
    tt = ((4, 8, 8, 8), (8, 4, 4, 4), (1, 2, 2, 2, 1))
    return [
        lambda m: m.gemm_seconds(4096 * 512 * 2048, weight_bytes=4 << 20, train=False, threads=threads),
        lambda m: m.gemm_seconds(32 * 512 * 2048, weight_bytes=4 << 20, train=True, threads=threads),
        lambda m: m.steps_seconds([(4096, 64, 512, 1), (512, 16, 8, 32)], train=True, threads=threads),
        lambda m: m.copy_seconds(4 << 20, train=True, threads=threads),
        lambda m: csr_seconds(m, threads, 100_000, 300, 2048, 4),
        lambda m: masked_csr_train_seconds(m, threads, 100_000, 7, 512, 2048, 4),
        lambda m: masked_dense_train_seconds(m, threads, 7, 512, 2048, 4),
        # chunked (16384 tokens) and with core merges priced (training)
        lambda m: tt_plan_seconds(*tt, TTPlan((1, 1, 2), "rtl"), 16384, train=True, threads=threads, costs=m)[0],
        lambda m: tt_plan_seconds(*tt, TTPlan((2, 2), "ltr"), 5, costs=m, cached_factors=True)[0],
    ]


@pytest.mark.parametrize("model", [CPU_COSTS, CUDA_COSTS], ids=["cpu", "cuda"])
def test_every_prediction_is_its_features_times_the_per_unit_costs(model) -> None:
    units = model_units(model)
    for predict in predictors():
        features = cost_features(predict, model)
        assert math.fsum(f * u for f, u in zip(features, units, strict=True)) == pytest.approx(predict(model), rel=1e-9)
    rebuilt = model_with_units(model, units)  # the per-unit costs describe the model (up to rounding of 1 / (1 / x))
    assert model_units(rebuilt) == pytest.approx(units, rel=1e-12) and rebuilt.margin == model.margin
    with pytest.raises(ValueError, match="16 per-unit costs"):
        model_with_units(model, units[:-1])


def test_the_fit_recovers_the_model_that_made_the_times() -> None:
    truth = replace(
        CPU_COSTS,
        forward=replace(CPU_COSTS.forward, op_s=3e-6, macs_per_s=80e9, bytes_per_s=20e9),
        train=replace(CPU_COSTS.train, op_s=9e-5, gemm_macs_per_s=30e9),
    )
    rng = torch.Generator().manual_seed(0)
    samples = []
    for predict in predictors():
        for scale in (1.0, 1.5):  # the same work at two sizes: more rows than unknowns
            features = [
                f * scale * (1 + 0.1 * float(torch.rand((), generator=rng))) for f in cost_features(predict, CPU_COSTS)
            ]
            samples.append((features, math.fsum(f * u for f, u in zip(features, model_units(truth), strict=True))))
    fitted, report = fit_cost_model(samples, CPU_COSTS)
    assert report["relative_error_fitted"]["max"] < 1e-6 < report["relative_error_base"]["max"]
    assert "train.sparse_entry_s" in report["kept"] and fitted.train.sparse_entry_s == CPU_COSTS.train.sparse_entry_s
    for predict in predictors():
        assert predict(fitted) == pytest.approx(predict(truth), rel=1e-6)
    assert (fitted.thread_scaling, fitted.margin, fitted.chunk_bytes) == (0.9, 0.8, CPU_COSTS.chunk_bytes)
    with pytest.raises(ValueError, match="at least one"):
        fit_cost_model([], CPU_COSTS)
    with pytest.raises(ValueError, match="> 0"):
        fit_cost_model([([1.0] * len(UNIT_NAMES), 0.0)], CPU_COSTS)
    with pytest.raises(ValueError, match="16 entries"):
        fit_cost_model([([1.0], 1.0)], CPU_COSTS)


# --- installing a model -----------------------------------------------------------------------------------------


def slow_ops(model):
    """``model`` with tensor ops a second each and slow thin matmuls: factorised paths lose to one GEMM."""
    return replace(
        model,
        forward=replace(model.forward, op_s=1.0, macs_per_s=1e3),
        train=replace(model.train, op_s=1.0, macs_per_s=1e3),
    )


def free_factors(model):
    """``model`` whose factorised and sparse products cost nothing: they win wherever allowed."""
    fwd = replace(model.forward, op_s=0.0, matrix_s=0.0, macs_per_s=math.inf, sparse_macs_per_s=math.inf)
    return replace(model, forward=replace(fwd, sparse_entry_s=0.0, bytes_per_s=math.inf), min_saving_s=0.0)


def test_installed_models_drive_every_layers_decisions() -> None:
    tt = TTLinear(512, 2048, ranks=2).eval()
    low_rank = LowRankLinear(512, 2048, rank=8).eval()
    pruned = PrunedLinear.from_linear(torch.nn.Linear(256, 1024), sparsity=0.98).eval()
    x = torch.randn(4096, 512)
    before = (tt.forward_path(4096, train=False), low_rank.use_factorized(4096), pruned.use_sparse(4096))
    assert before[0] != "dense" and before[1]  # the built-in model factorises these
    reference = tt(x)  # decisions (and their cached plans) exist before the swap

    assert set_cost_model("cpu", slow_ops(CPU_COSTS)) is None
    assert cost_model_for("cpu").forward.op_s == 1.0 and cost_model_for("cuda") is CUDA_COSTS
    assert tt.forward_path(4096, train=False) == "dense" and not low_rank.use_factorized(4096)
    torch.testing.assert_close(tt(x), reference, rtol=1e-4, atol=1e-4)  # another path, the same function

    set_cost_model("cpu", free_factors(CPU_COSTS))
    assert pruned.use_sparse(1) and tt.forward_path(1, train=False) != "dense"
    assert set_cost_model("cpu", None) is not None  # back to the built-in model
    assert (tt.forward_path(4096, train=False), low_rank.use_factorized(4096), pruned.use_sparse(4096)) == before
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        set_cost_model("tpu", CPU_COSTS)
    with pytest.raises(ValueError, match="CostModel or None"):
        set_cost_model("cpu", {"op_s": 1})


def test_files_round_trip_and_the_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fitted = replace(free_factors(CPU_COSTS), chunk_bytes=None)  # unbounded throughputs are stored as null
    path = save_cost_models(tmp_path / "costs.json", {"cpu": fitted}, machine="test")
    data = json.loads(path.read_text())
    assert data["models"]["cpu"]["forward"]["macs_per_s"] is None and data["machine"] == "test"
    assert load_cost_models(path) == {"cpu": fitted}

    monkeypatch.setenv(costs.COSTS_ENV_VAR, str(path))
    version = costs.costs_version()
    assert cost_model_for("cpu") == fitted and cost_model_for("cuda") is CUDA_COSTS
    assert costs.costs_version() == version
    monkeypatch.setenv(costs.COSTS_ENV_VAR, str(tmp_path / "missing.json"))
    monkeypatch.setitem(costs._state, "env_read", False)
    for _ in range(2):  # every decision, not only the first, until the file is fixed
        with pytest.raises(FileNotFoundError, match="calibrate"):
            cost_model_for("cpu")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format="other"), "not a cost model file"),
        (lambda d: d.update(models={"tpu": d["models"]["cpu"]}), "'cpu' and/or 'cuda'"),
        (lambda d: d["models"]["cpu"]["forward"].pop("op_s"), "expected the keys"),
        (lambda d: d["models"]["cpu"]["train"].update(op_s=-1.0), r"train\.op_s must be a finite number >= 0"),
        (lambda d: d["models"]["cpu"]["train"].update(op_s=None), r"train\.op_s must be a finite number"),
        (lambda d: d["models"]["cpu"]["train"].update(op_s=math.nan), r"train\.op_s must be a finite number"),
        (lambda d: d["models"]["cpu"].update(margin=math.nan), r"margin must be a finite number"),
        (lambda d: d["models"]["cpu"]["forward"].update(macs_per_s=0), "must be > 0"),
        (lambda d: d["models"]["cpu"].update(chunk_bytes=0.5), "chunk_bytes must be a positive integer"),
        (lambda d: d["models"]["cpu"].update(speed=1), "expected the keys"),
    ],
)
def test_malformed_files_are_refused(tmp_path: Path, change, message: str) -> None:
    path = save_cost_models(tmp_path / "costs.json", {"cpu": CPU_COSTS})
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_cost_models(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_cost_models(path)
    path.write_bytes(b"\xff\xfe binary")  # not UTF-8 either: the message still names the file
    with pytest.raises(ValueError, match=f"{path} is not JSON"):
        load_cost_models(path)
    with pytest.raises(ValueError, match="'cpu' and/or 'cuda'"):
        save_cost_models(tmp_path / "x.json", {"gpu": CPU_COSTS})
    with pytest.raises(ValueError, match="sparse_entry_s must be finite"):  # saved only if it loads back
        save_cost_models(
            tmp_path / "x.json", {"cpu": replace(CPU_COSTS, train=replace(CPU_COSTS.train, sparse_entry_s=math.inf))}
        )
    with pytest.raises(ValueError, match="'format' and 'models'"):
        save_cost_models(tmp_path / "x.json", {"cpu": CPU_COSTS}, format="mine")


# --- the command and bench --costs --------------------------------------------------------------------------------


def test_calibrate_command_writes_a_model_bench_can_use(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cal"
    argv = ["calibrate", "--quick", "--out", str(out), "--threads", "1", "--tokens", "1,8"]
    assert cli.main(argv) == 0
    assert "Decisions (each layer" in capsys.readouterr().out
    result = json.loads((out / "costs.json").read_text())
    model = load_cost_models(out / "costs.json")["cpu"]
    kinds = {s["kind"] for s in result["samples"]}
    expected_kinds = {"copy", "dense", "low-rank", "low-rank-dense", "tt", "tt-dense", "csr", "masked-csr"}
    assert expected_kinds | {"masked-dense"} == kinds
    assert all(s["seconds"] > 0 for s in result["samples"])
    # nn.Linear's eval GEMM is timed once per group it is compared in (the low-rank one, each CSR one), never shared
    eval_dense = [s for s in result["samples"] if s["kind"] == "dense" and s["pass"] == "forward"]
    assert len(eval_dense) == 2 * (1 + 1)  # two token counts x (low-rank group + one sparsity)
    # per pass and token count: the low-rank, the TT (one rank) and the sparse (one sparsity) decision
    decisions = result["decisions"]
    assert decisions["before"]["cases"] == decisions["written"]["cases"] == 2 * 2 * 3
    # the written model decides the measured cases at least as well as the model in use and the time fit
    for other in ("before", "fitted"):
        assert decisions["written"]["geomean_slowdown"] <= decisions[other]["geomean_slowdown"] + 1e-12
    assert result["fit"]["samples"] == len(result["samples"]) and (out / "calibrate.md").is_file()
    # the stored predictions are the written model's
    sample = next(s for s in result["samples"] if s["kind"] == "dense" and s["pass"] == "train" and s["tokens"] == 8)
    expected = model.gemm_seconds(8 * 256 * 1024, weight_bytes=4 * 256 * 1024, train=True, threads=1)
    assert sample["predicted_written"] == pytest.approx(expected)
    assert cost_model_for("cpu") is CPU_COSTS  # calibrating installs nothing

    config = BenchConfig(
        shapes=((16, 32),), tokens=(3,), layers=("dense", "tt-r2"), repeats=3, budget_s=0.02, transformer=None,
        out=str(tmp_path / "bench"), costs=str(out / "costs.json"),
    )  # fmt: skip
    assert run_bench(config, argv=[])["meta"]["costs"] == str(out / "costs.json")
    assert cost_model_for("cpu") is CPU_COSTS  # restored after the run
    cuda_only = save_cost_models(tmp_path / "cuda.json", {"cuda": CUDA_COSTS})
    with pytest.raises(ValueError, match="not for cpu"):
        run_bench(replace(config, costs=str(cuda_only)), argv=[])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tokens", "0"], "token counts"),
        (["--tt-ranks", "0"], "tt_ranks"),
        (["--repeats", "0"], "repeats"),
        (["--tokens", "1,8,1"], "tokens must not repeat a value, got 1 more"),
        (["--tt-ranks", "2,2"], "tt_ranks must not repeat"),
    ],
)
def test_calibrate_refuses_a_bad_grid(flags: list[str], message: str) -> None:
    args = cli.build_parser().parse_args(["calibrate", "--quick", *flags])
    with pytest.raises(ValueError, match=message):
        calibrate.config_from_args(args)


@pytest.mark.parametrize("change", [{"budget_s": math.inf}, {"max_slowdown": math.inf}, {"low_rank_ratio": math.nan}])
def test_calibrate_config_refuses_what_strict_json_cannot_hold(tmp_path: Path, change: dict[str, float]) -> None:
    """Settings are written to costs.json: an infinite one would be ``Infinity``, not JSON (and an infinite budget
    overflows the round count); and the file itself is strict JSON or not written."""
    with pytest.raises(ValueError, match="finite"):
        calibrate.CalibrateConfig(**change)
    target = tmp_path / "out" / "costs.json"
    with pytest.raises(ValueError, match="Out of range float"):
        save_cost_models(target, {"cpu": CPU_COSTS}, seconds=math.nan)
    assert not target.parent.exists()


def test_calibrate_refuses_an_out_that_is_a_file_before_timing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The folder is made before minutes of timing, not after them."""

    def never(*args, **kwargs):
        raise AssertionError("timing started")

    monkeypatch.setattr(calibrate, "_measure", never)
    target = tmp_path / "file"
    target.write_text("x")
    assert cli.main(["calibrate", "--quick", "--threads", "1", "--out", str(target)]) == 2
    assert capsys.readouterr().err == f"error: --out {target} is a file, not a folder\n"


def test_tuning_on_measured_decisions_fixes_a_wrong_pick_and_never_worsens() -> None:
    def sample(kind: str, predict, seconds: float) -> calibrate.Sample:
        return calibrate.Sample(kind, (512, 2048), 64, False, lambda: None, predict, kind, seconds=seconds)

    gemm = lambda m: m.gemm_seconds(64 * 512 * 2048, weight_bytes=4 << 20, train=False)  # noqa: E731
    thin = lambda m: m.steps_seconds([(64, 64, 512, 1), (64, 2048, 64, 1)], train=False)  # noqa: E731
    slow_thin = replace(CPU_COSTS, forward=replace(CPU_COSTS.forward, macs_per_s=3e9))  # thin GEMMs look 13x too slow
    dense = sample("dense", gemm, 1e-3)
    case = calibrate.Case("low-rank", [sample("low-rank", thin, 1e-4)], dense, gemm)  # measured: low-rank wins
    decider = calibrate._Decider([case], slow_thin)
    start = model_units(slow_thin)
    assert decider.picks(start)[0] is dense and decider.score(start) == pytest.approx(math.log(10))
    tuned = calibrate.tune_for_decisions(decider, start)
    assert decider.picks(tuned)[0].kind == "low-rank" and decider.score(tuned) == 0.0
    assert decider.summary(tuned)["fastest_picked"] == 1 and decider.summary(start)["missed"][0]["slowdown"] == 10.0
    # a start that already picks right is kept as it is
    assert calibrate.tune_for_decisions(decider, tuned) == tuned


def test_a_cost_file_does_not_break_fullgraph_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is read outside any trace (at import, or at the first eager decision), never inside one."""
    path = save_cost_models(tmp_path / "costs.json", {"cpu": slow_ops(CPU_COSTS)})
    monkeypatch.setenv(costs.COSTS_ENV_VAR, str(path))
    torch._dynamo.reset()
    layer = LowRankLinear(256, 1024, rank=8).eval()
    x = torch.randn(64, 256)
    with torch.no_grad():
        y = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(y, x @ layer.to_dense().T + layer.bias, rtol=1e-4, atol=1e-4)
    assert cost_model_for("cpu") == slow_ops(CPU_COSTS)  # read by the first eager decision
    assert costs.cost_model_source("cpu").startswith(str(path))


def test_masked_csr_training_is_priced_as_it_runs() -> None:
    """Few tokens at moderate sparsity: the weight gradient is a dense outer product times the mask (see
    _MaskedCSRLinear); otherwise a third, sampled, CSR product."""
    from compressed_transformer.layers._fast import DENSE_GRAD_TOKENS

    m, weights, nnz = CPU_COSTS, 512 * 2048, 100_000  # 9.5 % density
    copy = m.copy_seconds(weights * 4, train=False, threads=1)
    for tokens in (1, DENSE_GRAD_TOKENS, DENSE_GRAD_TOKENS + 1, 64):
        product = csr_seconds(m, 1, nnz, tokens, 2048, 4)
        small = tokens <= DENSE_GRAD_TOKENS
        grad = m.gemm_seconds(tokens * weights, train=False, threads=1) if small else product
        assert masked_csr_train_seconds(m, 1, nnz, tokens, 512, 2048, 4) == pytest.approx(2 * product + grad + copy)
    # at 2 % density the sampled product is used at every token count
    product = csr_seconds(m, 1, 20_000, 1, 2048, 4)
    assert masked_csr_train_seconds(m, 1, 20_000, 1, 512, 2048, 4) == pytest.approx(3 * product + copy)
