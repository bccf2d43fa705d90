"""Atomic checkpoints that carry everything needed to rebuild the model and resume the run.

A checkpoint is a ``torch.save`` dict with ``model_config`` (a :class:`TransformerConfig` as a dict, FFN spec included),
``model`` (state dict of the unwrapped model), ``structure`` (its compressed layers, see
:func:`compressed_transformer.serialization.layer_structure`: what the config cannot describe, such as low-rank
attention projections or embeddings), ``tokenizer`` (sentencepiece model bytes), and, for training
checkpoints, ``train_config``, ``optimizer``, ``scheduler``, ``rng`` and ``position`` (epoch, step in epoch, global
step) plus ``best_bleu``. ``checkpoint_step<N>.pt`` files (``TrainConfig.keep_checkpoints``) hold the model part
only; :func:`average_checkpoints` averages several of them.

:func:`export_model` writes a trained model for sharing: a folder with ``model.safetensors`` (weights, the structure
of every compressed layer and the model config in its header, see :mod:`compressed_transformer.serialization`) and
``spm.model``. :func:`load_checkpoint` and :func:`load_model` read such a folder (or its ``model.safetensors``) as
they read a checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

from compressed_transformer.models.transformer import Transformer, TransformerConfig

__all__ = [
    "EXPORT_WEIGHTS",
    "RESUMABLE_KEYS",
    "STEP_CHECKPOINT",
    "average_checkpoints",
    "capture_rng",
    "check_same_config",
    "export_model",
    "load_checkpoint",
    "load_model",
    "restore_rng",
    "save_checkpoint",
    "step_checkpoints",
    "write_atomic",
    "write_text_atomic",
]


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically with ``write(handle)``: a temporary file in the same folder, fsync, ``os.replace``.

    Readers (another process of a study running side by side, say) see the old file or the new one, never a part.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """:func:`write_atomic` of UTF-8 ``text``."""
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (see :func:`write_atomic`)."""
    write_atomic(path, lambda handle: torch.save(state, handle))


STEP_CHECKPOINT = "checkpoint_step{step}.pt"  # the model at a validation step (``TrainConfig.keep_checkpoints``)


# Training settings that may change between a run and its resumption (and between checkpoints of one run that
# :func:`average_checkpoints` may average): where things are, how long it runs, how it logs and checkpoints.
RESUMABLE_KEYS = (
    "out_dir",
    "data_dir",
    "max_steps",
    "max_epochs",
    "max_minutes",
    "device",
    "progress",
    "log_every",
    "eval_every",
    "save_every",
    "download",
    "precision",
    "keep_checkpoints",
)


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run folder's ``checkpoint_step<N>.pt`` files, oldest (lowest ``N``) first."""
    prefix, suffix = STEP_CHECKPOINT.split("{step}")
    found = []
    for path in Path(run_dir).glob(f"{prefix}*{suffix}"):
        step = path.name[len(prefix) : -len(suffix)]
        if step.isdigit():
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def average_checkpoints(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The element-wise mean of the model weights of ``states`` (checkpoints of one run), as a checkpoint that
    :func:`load_model` reads. Averaging the last few checkpoints is Vaswani et al.'s (2017) and fairseq's
    ``average_checkpoints``; it usually gains a fraction of a BLEU point over the last one.

    Floating-point tensors are averaged in float64 and cast back; other tensors (pruning masks, integer buffers)
    must be equal in every state. Optimiser and training state are left out; ``averaged_steps`` records the steps.

    Raises:
        ValueError: for no states, or states of different models (config, compressed structure, tokenizer,
            parameter names, shapes, or unequal non-float tensors) or of different runs (training settings other
            than :data:`RESUMABLE_KEYS`, e.g. another seed or learning rate).
    """
    if not states:
        raise ValueError("average_checkpoints needs at least one checkpoint")
    first = states[0]
    for i, other in enumerate(states[1:], start=1):
        for key in ("model_config", "structure", "tokenizer"):
            if other.get(key) != first.get(key):
                raise ValueError(f"checkpoint {i} has a different {key} from checkpoint 0: not the same model")
        ours, theirs = (
            {k: v for k, v in (state.get("train_config") or {}).items() if k not in RESUMABLE_KEYS}
            for state in (first, other)
        )
        if ours != theirs:
            differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            raise ValueError(
                f"checkpoint {i} comes from another run than checkpoint 0 (training settings {differ} differ): "
                "average checkpoints of one run"
            )
        if other["model"].keys() != first["model"].keys():
            missing = sorted(set(first["model"]) ^ set(other["model"]))
            raise ValueError(f"checkpoint {i} has different parameters from checkpoint 0 (e.g. {missing[:3]})")
    averaged = {}
    for name, value in first["model"].items():
        values = [state["model"][name] for state in states]
        if any(v.shape != value.shape for v in values):
            raise ValueError(f"{name!r} has different shapes across checkpoints: {[tuple(v.shape) for v in values]}")
        if value.is_floating_point():
            averaged[name] = (sum(v.double() for v in values) / len(values)).to(value.dtype)
        elif all(torch.equal(v, value) for v in values):
            averaged[name] = value.clone()
        else:
            raise ValueError(f"{name!r} ({value.dtype}) differs across checkpoints and cannot be averaged")
    keep = ("model_config", "train_config", "structure", "tokenizer")
    steps = [state.get("position", {}).get("global_step") for state in states]
    return {k: first[k] for k in keep if k in first} | {"model": averaged, "averaged_steps": steps}


EXPORT_WEIGHTS = "model.safetensors"
EXPORT_TOKENIZER = "spm.model"


def export_model(state: dict[str, Any], out_dir: str | Path, model: Transformer | None = None) -> Path:
    """Write the model of checkpoint ``state`` to ``out_dir``: ``model.safetensors`` (weights, compressed-layer
    structure, model config as JSON under the header key ``model_config``) and ``spm.model``. Optimiser and
    training state are left out, and Sparse VD layers are written in their eval form, as pruned layers that store
    only their kept weights (:func:`~compressed_transformer.compress.sparse_vd_to_pruned_`, applied to ``model``).
    Returns the weights file. ``model``: ``load_model(state)`` if the caller has built it already.

    Raises:
        ValueError: if the weights do not fit the checkpoint's model config.
    """
    from compressed_transformer.compress import sparse_vd_to_pruned_
    from compressed_transformer.serialization import save_compressed

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(state) if model is None else model
    sparse_vd_to_pruned_(model)
    weights = out / EXPORT_WEIGHTS
    save_compressed(model, weights, metadata={"model_config": json.dumps(state["model_config"], sort_keys=True)})
    (out / EXPORT_TOKENIZER).write_bytes(bytes(state["tokenizer"]))
    return weights


def _load_export(path: Path) -> dict[str, Any]:
    from compressed_transformer.serialization import read_structure

    weights = path / EXPORT_WEIGHTS if path.is_dir() else path
    _, header = read_structure(weights)
    if "model_config" not in header:
        raise ValueError(f"{weights} has no model config in its header; it was not written by export_model")
    tokenizer = weights.parent / EXPORT_TOKENIZER
    if not tokenizer.is_file():
        raise FileNotFoundError(f"{tokenizer} is missing: an exported model needs its tokenizer beside its weights")
    return {
        "model_config": json.loads(header["model_config"]),
        "tokenizer": tokenizer.read_bytes(),
        "weights_file": str(weights),
    }


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, or a model written by :func:`export_model` (its
    folder or its ``model.safetensors``: the state then has ``model_config``, ``tokenizer`` and ``weights_file``,
    which :func:`load_model` reads).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a checkpoint of this package.
    """
    path = Path(path)
    if (path.is_dir() and (path / EXPORT_WEIGHTS).is_file()) or (path.suffix == ".safetensors" and path.is_file()):
        return _load_export(path)
    if path.is_dir():
        raise FileNotFoundError(
            f"{path} is a folder without {EXPORT_WEIGHTS}: pass a checkpoint in it (checkpoint_best.pt, "
            "checkpoint_last.pt) or a folder written by translate export"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # torch raises many types for corrupt files
        raise ValueError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(state, dict) or "model_config" not in state or "model" not in state:
        raise ValueError(f"{path} is not a compressed_transformer translation checkpoint")
    return state


def load_model(state: dict[str, Any], device: str | torch.device = "cpu") -> Transformer:
    """Rebuild the model a checkpoint (or an exported model) describes and load its weights.

    Raises:
        ValueError: if the weights do not fit the stored config.
    """
    config = TransformerConfig.from_dict(state["model_config"])
    model = Transformer(config)
    if "weights_file" in state:  # an exported model
        from compressed_transformer.serialization import load_compressed_

        return load_compressed_(model, state["weights_file"]).to(device)
    if state.get("structure"):  # compressed layers beyond the config's FFN spec (e.g. attention, embeddings)
        from compressed_transformer.serialization import restructure_

        restructure_(model, state["structure"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        hint = (
            ""
            if "structure" in state
            else " (a study row with low-rank attention or embeddings, saved before checkpoints recorded their "
            "compressed layers, loads with compressed_transformer.studies.translation.load_row_model)"
        )
        raise ValueError(f"checkpoint weights do not match its model config{hint}: {error}") from error
    return model.to(device)


def check_same_config(saved: dict[str, Any], current: dict[str, Any], what: str, ignore: tuple[str, ...] = ()) -> None:
    """Raise ``ValueError`` listing the keys whose values differ between ``saved`` and ``current``."""
    keys = sorted((set(saved) | set(current)) - set(ignore))
    diff = [f"{k}: {saved.get(k)!r} != {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    if diff:
        raise ValueError(f"{what} differs ({'; '.join(diff)})")


def capture_rng() -> dict[str, Any]:
    """RNG states of Python, torch CPU and (when present) CUDA."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore :func:`capture_rng`'s states (CUDA: of the devices this process sees, which may be fewer)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
