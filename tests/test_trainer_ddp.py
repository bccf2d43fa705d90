"""Two gloo DDP processes on CPU match one process with the same global batch (accumulating two micro-batches)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from compressed_transformer.train.checkpoint import load_checkpoint

SCRIPT = textwrap.dedent(
    """
    import sys
    from compressed_transformer.models.transformer import FFNSpec, preset
    from compressed_transformer.train.trainer import TrainConfig, train

    data, out, accum, method = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    options = {"ranks": 2} if method == "tt" else {}
    model = preset("tiny", vocab_size=48, ffn=FFNSpec(method, options, "1/2"))
    train(model, TrainConfig(dataset="plain", data_dir=data, out_dir=out, max_tokens=64, accum_steps=accum,
                             max_steps=3, lr=3e-3, warmup_steps=2, eval_every=1000, save_every=1000, log_every=1,
                             progress=False, device="cpu", seed=3))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run`` with two CPU processes on a free port, one thread each."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=120)


def write_corpus(folder: Path) -> Path:
    words = [("hund", "dog"), ("katze", "cat"), ("haus", "house"), ("baum", "tree"), ("rot", "red")]
    folder.mkdir()
    src = [" ".join(words[(i + k) % 5][0] for k in range(1 + i % 4)) for i in range(40)]
    tgt = [" ".join(words[(i + k) % 5][1] for k in range(1 + i % 4)) for i in range(40)]
    for split in ("train", "valid", "test"):
        (folder / f"{split}.de").write_text("\n".join(src) + "\n")
        (folder / f"{split}.en").write_text("\n".join(tgt) + "\n")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dense", "tt"])
def test_two_process_gloo_matches_one_process(tmp_path: Path, method: str) -> None:
    data = write_corpus(tmp_path / "data")
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, str(script), str(data), str(tmp_path / "one"), "2", method],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert single.returncode == 0, single.stderr
    ddp = torchrun(str(script), str(data), str(tmp_path / "two"), "1", method)
    assert ddp.returncode == 0, ddp.stderr
    one = load_checkpoint(tmp_path / "one" / "checkpoint_last.pt")
    two = load_checkpoint(tmp_path / "two" / "checkpoint_last.pt")
    where = ("epoch", "step_in_epoch", "global_step")
    assert [one["position"][k] for k in where] == [two["position"][k] for k in where]
    batches = {run["position"]["world_size"] * run["position"]["accum_steps"] for run in (one, two)}
    assert batches == {2} and two["position"]["world_size"] == 2  # the same batches per update, either way
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, atol=2e-5, rtol=1e-4, msg=name)
    # Rank 0 alone logged, one line per step; Adam hides a wrong gradient scale, the logged norms do not.
    logs = {
        run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("one", "two")
    }
    steps = {run: [r for r in records if "loss" in r] for run, records in logs.items()}
    assert len(steps["two"]) == 3
    for a, b in zip(steps["one"], steps["two"], strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys
    from compressed_transformer.models.transformer import preset
    from compressed_transformer.train.trainer import TrainConfig, train

    data, out, steps, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "resume"
    model = preset("tiny", vocab_size=48, dropout=0.3)
    train(model, TrainConfig(dataset="plain", data_dir=data, out_dir=out, max_tokens=64, max_steps=steps, lr=3e-3,
                             warmup_steps=2, eval_every=1000, save_every=1000, log_every=1, progress=False,
                             device="cpu", seed=3), resume=resume)
    """
)


@pytest.mark.slow
def test_a_two_process_run_resumes_exactly(tmp_path: Path) -> None:
    """With dropout on, each rank draws its own masks; after a resume every rank must draw what it would have."""
    data = write_corpus(tmp_path / "data")
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)

    def launch(out: str, steps: int, resume: bool = False) -> None:
        done = torchrun(str(script), str(data), str(tmp_path / out), str(steps), "resume" if resume else "new")
        assert done.returncode == 0, done.stderr

    launch("straight", 4)
    launch("split", 2)
    launch("split", 4, resume=True)
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint_last.pt")
    resumed = load_checkpoint(tmp_path / "split" / "checkpoint_last.pt")
    assert straight["position"] == resumed["position"]
    for name, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, atol=0, rtol=0, msg=name)


MAIN_FIRST_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from compressed_transformer.train import distributed

    ctx = distributed.setup("cpu")
    out = Path(sys.argv[1])

    def write() -> str:
        if sys.argv[2] == "fail":
            raise OSError("no route to host")
        (out / "file.txt").write_text("written by rank 0")
        return "done"

    try:
        result = distributed.main_first(ctx, write)
        # the other ranks read what rank 0 wrote, and only rank 0 gets fn's result
        print(f"rank {ctx.rank}: {result} {(out / 'file.txt').read_text()}", flush=True)
    except Exception as error:
        print(f"rank {ctx.rank} raised {type(error).__name__}: {error}", flush=True)
    finally:
        distributed.cleanup()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("outcome", ["ok", "fail"])
def test_main_first_runs_on_rank_0_and_stops_every_rank_when_it_fails(tmp_path: Path, outcome: str) -> None:
    """What rank 0 writes (the downloaded data, the tokenizer) is there when the others read it; when rank 0 fails
    (no internet for a download), every rank stops with its error instead of waiting until the collective timeout."""
    script = tmp_path / "main_first.py"
    script.write_text(MAIN_FIRST_SCRIPT)
    run = torchrun(str(script), str(tmp_path), outcome)
    assert run.returncode == 0, run.stderr
    if outcome == "ok":
        assert "rank 0: done written by rank 0" in run.stdout and "rank 1: None written by rank 0" in run.stdout
    else:
        assert "rank 0 raised OSError: no route to host" in run.stdout
        assert "rank 1 raised RuntimeError: rank 0 failed, so rank 1 stops too: OSError: no route to host" in run.stdout
