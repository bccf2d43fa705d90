"""The training loop: overfitting, resume, NaN handling, run-folder checks, every FFN method, the conversion route."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compressed_transformer.data.tokenizer import Tokenizer
from compressed_transformer.evaluate.bleu import sacre_bleu
from compressed_transformer.evaluate.decoding import translate
from compressed_transformer.models.transformer import FFNSpec, Transformer, preset
from compressed_transformer.train.checkpoint import load_checkpoint, load_model, save_checkpoint
from compressed_transformer.train.schedule import InverseSqrtSchedule, inverse_sqrt_lr
from compressed_transformer.train.trainer import TrainConfig, TrainingDiverged, train, training_autocast
from toy_corpus import METHOD_OPTIONS, write_corpus


def config(data: Path, out: Path, **changes) -> TrainConfig:
    settings = {
        "dataset": "plain",
        "data_dir": str(data),
        "out_dir": str(out),
        "max_tokens": 128,
        "lr": 3e-3,
        "warmup_steps": 10,
        "eval_every": 1000,
        "save_every": 1000,
        "log_every": 2,
        "progress": False,
        "device": "cpu",
        "seed": 5,
    }
    settings.update(changes)
    return TrainConfig(**settings)


def model_config(**changes):
    return preset("tiny", vocab_size=48, **changes)


def test_schedule() -> None:
    assert inverse_sqrt_lr(5, 1.0, 10) == pytest.approx(0.5)
    assert inverse_sqrt_lr(10, 1.0, 10) == pytest.approx(1.0)
    assert inverse_sqrt_lr(40, 1.0, 10) == pytest.approx(0.5)
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    schedule = InverseSqrtSchedule(optimizer, 1.0, 10)
    for _ in range(3):
        schedule.step()
    restored = InverseSqrtSchedule(optimizer, 2.0, 1)
    restored.load_state_dict(schedule.state_dict())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="peak learning rate must be positive"):
        InverseSqrtSchedule(optimizer, 0.0, 10)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        InverseSqrtSchedule(optimizer, 1.0, -1)


def test_train_config_needs_a_stopping_rule() -> None:
    with pytest.raises(ValueError, match="training ends"):
        TrainConfig()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"lr": float("nan")}, "learning rate must be a finite number > 0, got nan"),
        ({"lr": 0.0}, "learning rate must be a finite number > 0"),
        ({"max_minutes": float("inf")}, "max_minutes must be a finite number >= 0, got inf"),
        ({"warmup_steps": -1}, "warmup_steps must be a finite number >= 0, got -1"),
        ({"kl_weight": -0.5}, "kl_weight must be"),
        ({"eval_every": -1}, "eval_every must be"),
        ({"clip_norm": float("nan")}, "clip_norm must be"),
    ],
)
def test_train_config_refuses_values_that_are_never_settings(setting: dict, message: str) -> None:
    """As the command line does (a ``[train]`` table of a config file reaches ``TrainConfig`` directly)."""
    with pytest.raises(ValueError, match=message):
        TrainConfig(max_steps=1, **setting)


def test_precision_setting() -> None:
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(max_steps=1, precision="fp16")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with training_autocast("bf16", cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    for precision, device in (("auto", cpu), ("fp32", cpu), ("fp32", cuda)):
        with training_autocast(precision, device):
            assert not torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda"), precision


def test_bf16_training_on_cpu_trains_float32_parameters(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "data", pairs=16)
    states = {}
    for precision in ("fp32", "bf16"):
        train(model_config(), config(data, tmp_path / precision, max_steps=3, precision=precision))
        states[precision] = load_checkpoint(tmp_path / precision / "checkpoint_last.pt")["model"]
    assert all(v.dtype == torch.float32 for v in states["bf16"].values() if v.is_floating_point())
    # Same seed, same batches: the runs differ only by the forward's rounding, a little but not nothing.
    diffs = [float((states["bf16"][k] - v).abs().max()) for k, v in states["fp32"].items() if v.is_floating_point()]
    assert 0.0 < max(diffs) < 0.05


def test_tiny_model_overfits_tiny_corpus(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "data")
    summary = train(model_config(label_smoothing=0.0), config(data, tmp_path / "run", max_tokens=1024, max_steps=150))
    state = load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")
    model, tokenizer = load_model(state), Tokenizer(state["tokenizer"])
    src = (data / "test.de").read_text().splitlines()
    refs = (data / "test.en").read_text().splitlines()
    hyps, _ = translate(model, tokenizer, src, beam=1)
    assert sacre_bleu(hyps, refs)[0] > 90.0
    assert summary["best_valid_bleu"] > 90.0
    run = tmp_path / "run"
    for name in ("config.json", "command.txt", "git_rev.txt", "metrics.jsonl", "summary.json", "spm.model"):
        assert (run / name).exists(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "tokens_per_s", "wall"} <= set(records[0])
    assert any("valid_bleu" in r for r in records)


def test_resume_gives_the_same_parameters(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "data")
    model = model_config(dropout=0.1)
    train(model, config(data, tmp_path / "straight", max_steps=8))
    train(model, config(data, tmp_path / "split", max_steps=3))  # "killed" after its step-3 checkpoint
    train(model, config(data, tmp_path / "split", max_steps=8), resume=True)
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint_last.pt")
    resumed = load_checkpoint(tmp_path / "split" / "checkpoint_last.pt")
    assert straight["position"] == resumed["position"]
    assert straight["position"]["epoch"] >= 1  # the runs cross an epoch boundary
    for name, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, msg=name)


def test_run_folder_checks(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "data")
    train(model_config(), config(data, tmp_path / "run", max_steps=2))
    with pytest.raises(ValueError, match="already holds a run"):
        train(model_config(), config(data, tmp_path / "run", max_steps=2))
    with pytest.raises(ValueError, match=r"different run.*d_ff"):
        train(model_config(d_ff=48), config(data, tmp_path / "run", max_steps=4), resume=True)
    with pytest.raises(ValueError, match=r"different run.*lr"):
        train(model_config(), config(data, tmp_path / "run", max_steps=4, lr=1e-4), resume=True)
    with pytest.raises(ValueError, match=r"nothing to resume|no checkpoint_last"):
        train(model_config(), config(data, tmp_path / "empty", max_steps=4), resume=True)
    # validating on another subset would compare BLEU with the best checkpoint's on other sentences
    with pytest.raises(ValueError, match=r"different run.*eval_max_sentences"):
        train(model_config(), config(data, tmp_path / "run", max_steps=4, eval_max_sentences=2), resume=True)
    # another number of processes would replay or skip batches and change the batch size mid-run (a run of two
    # torchrun processes, as its checkpoint records it, resumed by one)
    last = load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")
    assert last["position"]["world_size"] == 1 and last["position"]["accum_steps"] == 1
    last["position"]["world_size"] = 2
    save_checkpoint(tmp_path / "run" / "checkpoint_last.pt", last)
    with pytest.raises(ValueError, match=r"2 process\(es\) x 1 accumulation steps per update.*now 1 x 1"):
        train(model_config(), config(data, tmp_path / "run", max_steps=4), resume=True)
    # a fresh run refuses a folder holding another run's checkpoints without a checkpoint_last.pt (killed early):
    # averaging its last checkpoints would mix the two runs
    stale = tmp_path / "stale"
    train(model_config(), config(data, stale, max_steps=4, eval_every=2, keep_checkpoints=2))
    (stale / "checkpoint_last.pt").unlink()
    with pytest.raises(ValueError, match=r"checkpoints of an earlier run \(checkpoint_best.pt, checkpoint_step2.pt"):
        train(model_config(), config(data, stale, max_steps=4, eval_every=2, keep_checkpoints=2))


def test_a_time_budget_spent_in_validation_counts_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The saved training time is the clock the budget was checked against, validations included: a run whose
    budget ran out during a validation is finished under the same budget (not trained further), and a resumed run
    goes on from where the saved one stood."""
    import time

    from compressed_transformer.train import trainer

    validate = trainer._validate

    def slow(*args, **kwargs):
        time.sleep(0.6)
        return validate(*args, **kwargs)

    monkeypatch.setattr(trainer, "_validate", slow)
    data = write_corpus(tmp_path / "data")
    cfg = config(data, tmp_path / "run", max_minutes=0.01, eval_every=2)  # 0.6 s: the first validation spends it
    summary = train(model_config(), cfg)
    assert summary["train_seconds"] >= 0.6 and not trainer.budget_left(cfg, summary)
    last = load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")
    assert last["trained_seconds"] >= 0.6 and last["last_eval_step"] == summary["steps"]
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    again = train(model_config(), cfg, resume=True)  # resumed as it is: no update, no validation again
    assert again["steps"] == summary["steps"]
    assert (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() == records


def test_resume_drops_the_records_a_killed_run_logged_after_its_checkpoint(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "data")
    run = tmp_path / "run"
    train(model_config(), config(data, run, max_steps=4, eval_every=2, log_every=1))
    metrics = run / "metrics.jsonl"
    logged = metrics.read_text()
    # what a process killed after update 4's checkpoint had logged before dying (the last line cut short)
    metrics.write_text(logged + json.dumps({"step": 5, "loss": 1.0}) + "\n" + '{"step": 6, "lo')
    train(model_config(), config(data, run, max_steps=6, eval_every=2, log_every=1), resume=True)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "loss" in line]
    validated = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "valid_bleu" in line]
    assert steps == [1, 2, 3, 4, 5, 6] and validated == [2, 4, 6]
    fresh = tmp_path / "fresh"  # a fresh run in a folder a killed run left records in starts a new log
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text(json.dumps({"step": 9, "loss": 1.0}) + "\n")
    train(model_config(), config(data, fresh, max_steps=2, log_every=1))
    assert [json.loads(line)["step"] for line in (fresh / "metrics.jsonl").read_text().splitlines()] == [1, 2, 2]


def test_checkpoint_from_another_config_is_rejected(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "data")
    train(model_config(), config(data, tmp_path / "run", max_steps=1))
    state = load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")
    state["model_config"] = {**state["model_config"], "d_ff": 128}
    with pytest.raises(ValueError, match="do not match"):
        load_model(state)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_checkpoint(tmp_path / "junk.pt")
    save_checkpoint(tmp_path / "other.pt", {"weights": 1})
    with pytest.raises(ValueError, match="not a compressed_transformer"):
        load_checkpoint(tmp_path / "other.pt")


def test_bad_ffn_spec_fails_before_work(tmp_path: Path) -> None:
    bad = model_config(ffn=FFNSpec("tt", {"ranks": [1, 2, 1], "in_modes": [3, 11]}))
    with pytest.raises(ValueError, match="does not fit"):
        train(bad, config(tmp_path / "no-data-needed", tmp_path / "run", max_steps=1))
    assert not (tmp_path / "run").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_corpus(tmp_path / "data")
    calls = {"n": 0}
    original = Transformer.loss

    def poisoned(self, logits, target, reduction="sum"):
        calls["n"] += 1
        loss = original(self, logits, target, reduction)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(Transformer, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss.*checkpoint_last.pt"):
        train(model_config(), config(data, tmp_path / "run", max_steps=10, save_every=2))
    kept = load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")
    assert kept["position"]["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_every_ffn_method_trains_a_few_steps(tmp_path: Path, method: str) -> None:
    data = write_corpus(tmp_path / "data", pairs=16)
    spec = FFNSpec(method, METHOD_OPTIONS[method], "1/2")
    summary = train(model_config(ffn=spec), config(data, tmp_path / "run", max_steps=3, kl_weight=0.1))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    assert ("kl" in records[0]) == (method == "svd-o")
    if method in ("tt", "tucker", "svd"):
        assert summary["compression_ratio"]["ffn"] > 1.0
    state = load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")
    assert state["model_config"]["ffn"]["method"] == method
    load_model(state)  # the checkpoint rebuilds its compressed model


def test_convert_dense_checkpoint_then_fine_tune(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "data", pairs=16)
    train(model_config(), config(data, tmp_path / "dense", max_steps=3))
    dense = str(tmp_path / "dense" / "checkpoint_last.pt")
    spec = FFNSpec("svd", {"rank": 4}, "encoder")
    summary = train(model_config(ffn=spec), config(data, tmp_path / "svd", max_steps=2, init_from=dense))
    assert summary["compression_ratio"]["ffn"] > 1.0
    model = load_model(load_checkpoint(tmp_path / "svd" / "checkpoint_last.pt"))
    assert type(model.encoder[0].ffn.fc1).__name__ == "LowRankLinear"
    assert type(model.decoder[0].ffn.fc1) is torch.nn.Linear
    tt = FFNSpec("tt", {"ranks": [1, 2, 2, 1], "in_modes": [4, 4, 2], "out_modes": [4, 4, 4]}, "dec:1")
    train(model_config(ffn=tt), config(data, tmp_path / "tt", max_steps=1, init_from=dense))
    model = load_model(load_checkpoint(tmp_path / "tt" / "checkpoint_last.pt"))  # rebuilt from config alone
    assert type(model.decoder[1].ffn.fc2).__name__ == "TTLinear"
    with pytest.raises(ValueError, match="does not fit this model"):
        train(model_config(d_model=16, ffn=spec), config(data, tmp_path / "bad", max_steps=1, init_from=dense))
    # the dropout rates of the new config replace the dense run's, attention weights included
    from compressed_transformer.models.transformer import FeedForward, MultiHeadAttention
    from compressed_transformer.train.trainer import _convert_from_dense

    rates = {"dropout": 0.3, "attn_dropout": 0.2, "activation_dropout": 0.1}
    converted = _convert_from_dense(model_config(ffn=spec, **rates), load_checkpoint(dense))
    attention = [m for m in converted.modules() if isinstance(m, MultiHeadAttention)]
    assert attention and all(m.dropout == 0.2 for m in attention)
    assert all(m.dropout.p == 0.1 for m in converted.modules() if isinstance(m, FeedForward))
    assert converted.dropout.p == 0.3


def test_logged_learning_rate_is_the_one_each_update_used(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "data", pairs=16)
    train(model_config(), config(data, tmp_path / "run", max_steps=3, log_every=1))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    logged = {r["step"]: r["lr"] for r in map(json.loads, lines) if "lr" in r}
    assert logged == {step: pytest.approx(inverse_sqrt_lr(step, 3e-3, 10)) for step in (1, 2, 3)}


def test_write_atomic_replaces_whole_files_only(tmp_path: Path) -> None:
    from compressed_transformer.train.checkpoint import write_atomic, write_text_atomic

    path = tmp_path / "sub" / "result.json"
    write_text_atomic(path, "old")
    assert path.read_text() == "old"

    def broken(handle) -> None:
        handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, broken)
    assert path.read_text() == "old"  # readers never see a partial file
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary left behind
    write_text_atomic(path, "new ü")
    assert path.read_text(encoding="utf-8") == "new ü"


def test_keep_checkpoints_and_their_average(tmp_path: Path) -> None:
    from compressed_transformer.train.checkpoint import average_checkpoints, step_checkpoints

    data = write_corpus(tmp_path / "data")
    run = tmp_path / "run"
    train(model_config(), config(data, run, max_steps=10, eval_every=2, keep_checkpoints=3))
    kept = step_checkpoints(run)
    assert [p.name for p in kept] == ["checkpoint_step6.pt", "checkpoint_step8.pt", "checkpoint_step10.pt"]
    states = [load_checkpoint(p) for p in kept]
    assert "optimizer" not in states[0] and states[-1]["position"]["global_step"] == 10
    last = load_checkpoint(run / "checkpoint_last.pt")
    for name, value in last["model"].items():  # the step-10 file holds the final weights
        torch.testing.assert_close(states[-1]["model"][name], value, rtol=0, atol=0, msg=name)

    average = average_checkpoints(states)
    assert average["averaged_steps"] == [6, 8, 10]
    for name, value in average["model"].items():
        expected = sum(s["model"][name].double() for s in states) / 3
        torch.testing.assert_close(value, expected.to(value.dtype), msg=name)
    assert not torch.equal(average["model"]["tgt_embed.weight"], states[-1]["model"]["tgt_embed.weight"])
    model = load_model(average)  # loads as the run's model and translates
    translate(model, Tokenizer(average["tokenizer"]), ["ein hund"], beam=1)
    single = average_checkpoints(states[-1:])
    for name, value in single["model"].items():
        torch.testing.assert_close(value, states[-1]["model"][name], rtol=0, atol=0)


def test_average_checkpoints_rejects_different_models(tmp_path: Path) -> None:
    from compressed_transformer.train.checkpoint import average_checkpoints

    data = write_corpus(tmp_path / "data")
    train(model_config(), config(data, tmp_path / "a", max_steps=2))
    train(model_config(d_ff=48), config(data, tmp_path / "b", max_steps=2))
    a, b = (load_checkpoint(tmp_path / run / "checkpoint_last.pt") for run in ("a", "b"))
    with pytest.raises(ValueError, match="at least one"):
        average_checkpoints([])
    with pytest.raises(ValueError, match="different model_config"):
        average_checkpoints([a, b])
    train(model_config(), config(data, tmp_path / "seed", max_steps=2, seed=6))  # the same model, another run
    with pytest.raises(ValueError, match=r"another run than checkpoint 0 \(training settings \['out_dir'|\['seed'\]"):
        average_checkpoints([a, load_checkpoint(tmp_path / "seed" / "checkpoint_last.pt")])
    changed = {**a, "model": {**a["model"], "extra.weight": torch.zeros(2)}}
    with pytest.raises(ValueError, match="different parameters"):
        average_checkpoints([a, changed])
    mask = {**a, "model": {**a["model"], "mask": torch.tensor([1, 0])}}
    other = {**a, "model": {**a["model"], "mask": torch.tensor([0, 1])}}
    with pytest.raises(ValueError, match=r"'mask'.*cannot be averaged"):
        average_checkpoints([mask, other])
    same = average_checkpoints([mask, mask])
    assert torch.equal(same["model"]["mask"], torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="keep_checkpoints must be a finite number >= 0"):
        config(data, tmp_path / "c", max_steps=2, keep_checkpoints=-1)


def test_process_group_backend_serves_cpu_tensors_on_gpus_too() -> None:
    from torch.distributed.distributed_c10d import BackendConfig

    from compressed_transformer.train.distributed import process_group_backend

    assert process_group_backend(torch.device("cpu")) == "gloo"
    backends = BackendConfig(process_group_backend(torch.device("cuda", 0))).get_device_backend_map()
    assert backends == {"cpu": "gloo", "cuda": "nccl"}  # NCCL alone refuses the trainer's host-side flags


def test_a_validation_pair_longer_than_max_tokens_is_validated_whole(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "data", pairs=16)
    for side, word in (("de", "hund"), ("en", "dog")):  # a validation pair of ~50 subwords (max_positions // 2: 64)
        path = data / f"valid.{side}"
        path.write_text(path.read_text() + " ".join([word] * 12) + "\n")
    summary = train(model_config(), config(data, tmp_path / "run", max_steps=2, max_tokens=24))
    assert summary["steps"] == 2 and summary["best_valid_bleu"] >= 0.0


def test_modules_added_by_prepare_start_from_their_own_init_from_scratch(tmp_path: Path) -> None:
    from compressed_transformer.layers import TTEmbedding
    from compressed_transformer.train.prepare import prepare_from_extra

    data = write_corpus(tmp_path / "data", pairs=16)
    prepare = prepare_from_extra({"embed_tt": {"ranks": 2}})
    frozen = {"lr": 1e-12, "max_steps": 1}  # one update that moves nothing: the checkpoint shows the initial weights
    train(model_config(), config(data, tmp_path / "scratch", **frozen), prepare=prepare)
    state = load_checkpoint(tmp_path / "scratch" / "checkpoint_last.pt")
    table = load_model(state).src_embed
    assert isinstance(table, TTEmbedding)
    # the table's own init gives its entries the dense table's std d_model^-1/2 (a rank-2 TT-SVD of the random
    # dense table would keep a few % of its energy)
    scale = model_config().d_model ** 0.5
    assert 0.5 < float(table.to_dense().detach()[: table.num_embeddings].std()) * scale < 2.0
    untouched = Transformer(model_config().replace(vocab_size=state["model_config"]["vocab_size"]))
    prepare(untouched)  # what the trainer used to leave: the factorised random table
    assert float(untouched.src_embed.to_dense().detach()[: table.num_embeddings].std()) * scale < 0.5

    # converted from a trained dense model, the same prepare factorises the trained table instead
    train(model_config(), config(data, tmp_path / "dense", max_steps=2))
    dense = load_checkpoint(tmp_path / "dense" / "checkpoint_last.pt")
    cfg = config(data, tmp_path / "convert", init_from=str(tmp_path / "dense" / "checkpoint_last.pt"), **frozen)
    train(model_config(), cfg, prepare=prepare)
    converted = load_model(load_checkpoint(tmp_path / "convert" / "checkpoint_last.pt")).src_embed
    expected = TTEmbedding.from_embedding(load_model(dense).src_embed, ranks=2)
    torch.testing.assert_close(converted.to_dense(), expected.to_dense(), atol=1e-6, rtol=1e-5)


def test_reset_new_modules_resets_each_new_subtree_once_at_its_root(monkeypatch: pytest.MonkeyPatch) -> None:
    from compressed_transformer.layers import LowRankLinear, TTEmbedding, TTLinear
    from compressed_transformer.train.trainer import reset_new_modules

    model = torch.nn.ModuleDict({"old": torch.nn.Linear(2, 2), "kept": LowRankLinear(4, 4, rank=2)})
    known = list(model.modules())
    shared = LowRankLinear(4, 4, rank=2)
    model["a"], model["b"] = shared, shared
    model["table"] = TTEmbedding(64, 16, ranks=2)
    model["dense"] = torch.nn.Linear(3, 3)  # not a factorised kind: left as it is
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    calls: list[str] = []
    for cls in (LowRankLinear, TTLinear, TTEmbedding):
        monkeypatch.setattr(
            cls,
            "reset_parameters",
            lambda self, real=cls.reset_parameters: calls.append(type(self).__name__) or real(self),
        )
    assert reset_new_modules(model, known, (LowRankLinear, TTLinear, TTEmbedding)) == ["a", "table"]
    # the shared layer once; the TT table by its own init only, not its inner TTLinear's over it as well
    assert calls == ["LowRankLinear", "TTEmbedding"]
    for name, p in model.named_parameters():
        assert (not torch.equal(p, before[name])) == name.startswith(("a.", "table.")), name
