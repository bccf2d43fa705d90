"""An execution-time model for choosing how a compressed layer computes ``x @ W.T``.

Multiply-add counts alone pick the wrong path: a factorised product is a chain of thin GEMMs and batched matmuls
of small matrices, which run at a fraction of the GFLOP/s of the one large GEMM the dense path makes, and every
extra tensor op has a fixed cost. :class:`CostModel` adds those terms up (a roofline-like sum, in seconds)::

    step  = op_s + matrices * matrix_s + macs / macs_per_s          (one matmul of a factorised path)
    dense = op_s + macs / gemm_macs_per_s + weight_bytes / weight_bytes_per_s    (one GEMM; few tokens: a GEMV
                                                                    that streams the weight from memory)
    csr   = 3 op_s + nnz * tokens / sparse_macs_per_s + nnz * sparse_entry_s       (CSR times dense)
    copy  = bytes / bytes_per_s                                     (rebuilding a weight, transposing an output)

A step is described by ``(batch, m, k, n)``: ``batch`` matrices of shape ``(m, k)`` times ``(k, n)``; ``n == 1``
means one plain 2-D GEMM of ``(batch, k) @ (k, m)`` (no per-matrix cost). Forward and training (forward plus
backward) have separate constants because a backward pass has its own overheads.

The CPU constants were fitted by non-negative least squares to single-thread timings (thread CPU time, which
ignores other processes) of every contiguous core grouping and sweep direction of TT layers 512↔2048 and
256↔1024 at ranks 2/4/8 and 1/32/256 tokens on an AMD EPYC (family 26, AVX-512, 2 cores) with MKL; the sparse
CSR constants from ``torch.sparse.addmm`` / ``addmv`` at 90 % and 98 % sparsity on the same machine. The CUDA
constants are conservative guesses (kernel launch cost dominates small steps), not a calibration. The model only
has to rank the candidates; layers additionally require a margin before leaving the dense path.

On another machine the constants can be refitted: ``compressed-transformer calibrate`` times the same kinds of
steps there and fits every constant at once (:func:`fit_cost_model`: each prediction is linear in the per-unit
costs, so a calibration is a non-negative least-squares problem); :func:`set_cost_model` installs the result, or
the environment variable ``COMPRESSED_TRANSFORMER_COSTS`` names its JSON file (read when this module is imported,
or, if that failed, at every decision until the file is fixed).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "COSTS_ENV_VAR",
    "CPU_COSTS",
    "CUDA_COSTS",
    "CostModel",
    "PassCosts",
    "cost_features",
    "cost_model_for",
    "cost_model_source",
    "costs_version",
    "device_kind",
    "fit_cost_model",
    "load_cost_models",
    "nnls",
    "relative_errors",
    "save_cost_models",
    "set_cost_model",
]


@dataclass(frozen=True)
class PassCosts:
    """Constants of one kind of pass (forward only, or forward plus backward).

    Args:
        op_s: fixed seconds per tensor op (dispatch, Python, autograd bookkeeping).
        matrix_s: extra seconds per matrix of a batched matmul.
        macs_per_s: multiply-adds per second of the thin GEMMs / batched matmuls of a factorised path (one thread).
        gemm_macs_per_s: multiply-adds per second of one large GEMM (one thread).
        sparse_macs_per_s: multiply-adds per second of a CSR times dense product (one thread).
        bytes_per_s: bytes per second of an elementwise pass or copy (one thread).
        weight_bytes_per_s: bytes per second at which a GEMM streams its weight (what bounds it at few tokens).
        sparse_entry_s: seconds per stored entry of a CSR product, paid once per call whatever the token count
            (index decoding: what bounds it at few tokens).
    """

    op_s: float
    matrix_s: float
    macs_per_s: float
    gemm_macs_per_s: float
    sparse_macs_per_s: float
    bytes_per_s: float
    weight_bytes_per_s: float
    sparse_entry_s: float


@dataclass(frozen=True)
class CostModel:
    """Seconds of the steps of a forward (``train=False``) or forward+backward (``train=True``) pass.

    Args:
        forward: constants of an inference pass.
        train: constants of a training pass (forward and backward together).
        thread_scaling: exponent ``a`` in ``threads ** a``, the speed-up of the throughput terms on ``threads``
            threads (fixed costs do not scale).
        margin: a factorised or sparse path is used only when it is predicted to take at most ``margin`` times
            the dense path, so that errors of the model do not make a layer slower than ``nn.Linear``.
        min_saving_s: ... and to save at least this many seconds: at a handful of tokens both paths take a few
            microseconds, where fixed costs the model leaves out (Python, views) decide.
        chunk_bytes: split the tokens of a factorised product into chunks whose largest intermediate has at most
            this many bytes, so that it stays in cache (``None``: never split; right for GPUs).
    """

    forward: PassCosts
    train: PassCosts
    thread_scaling: float = 0.9
    margin: float = 0.8
    min_saving_s: float = 6e-6
    chunk_bytes: int | None = 4 << 20

    def prefers(self, candidate_s: float, dense_s: float, dense_extra_s: float = 0.0) -> bool:
        """Whether a path predicted to take ``candidate_s`` should replace the dense one, which takes ``dense_s``
        for its GEMM plus ``dense_extra_s`` for anything else (e.g. rebuilding ``W``): the margin applies to the
        GEMM, and the saving must be at least ``min_saving_s``."""
        return candidate_s <= self.margin * dense_s + dense_extra_s - self.min_saving_s

    def _pass(self, train: bool) -> PassCosts:
        return self.train if train else self.forward

    def steps_seconds(self, steps: Sequence[tuple[int, int, int, int]], *, train: bool, threads: int = 1) -> float:
        """Seconds of a chain of matmul steps ``(batch, m, k, n)`` (see the module docstring)."""
        c, speed = self._pass(train), max(threads, 1) ** self.thread_scaling
        total = 0.0
        for batch, m, k, n in steps:
            matrices = batch if n > 1 else 0
            total += c.op_s + (matrices * c.matrix_s + batch * m * k * n / c.macs_per_s) / speed
        return total

    def gemm_seconds(self, macs: int, *, weight_bytes: int = 0, train: bool, threads: int = 1) -> float:
        """Seconds of one GEMM of ``macs`` multiply-adds with a weight of ``weight_bytes`` (``nn.Linear``'s
        forward; with its backward if ``train``)."""
        c = self._pass(train)
        streamed = macs / c.gemm_macs_per_s + weight_bytes / c.weight_bytes_per_s
        return c.op_s + streamed / max(threads, 1) ** self.thread_scaling

    def sparse_seconds(self, nnz: int, tokens: int, *, threads: int = 1) -> float:
        """Seconds of one CSR ``(out, in)`` with ``nnz`` entries times dense ``(in, tokens)`` product (three ops:
        transpose, product, copy back); forward only."""
        c = self.forward
        streamed = nnz * tokens / c.sparse_macs_per_s + nnz * c.sparse_entry_s
        return 3 * c.op_s + streamed / max(threads, 1) ** self.thread_scaling

    def copy_seconds(self, nbytes: int, *, train: bool, threads: int = 1) -> float:
        """Seconds of one elementwise pass over ``nbytes`` bytes (three passes' worth when ``train``)."""
        c = self._pass(train)
        return c.op_s + nbytes / c.bytes_per_s / max(threads, 1) ** self.thread_scaling


CPU_COSTS = CostModel(
    forward=PassCosts(
        op_s=7.5e-6,
        matrix_s=1.7e-7,
        macs_per_s=39e9,
        gemm_macs_per_s=43e9,
        sparse_macs_per_s=10e9,
        bytes_per_s=8e9,
        weight_bytes_per_s=50e9,
        sparse_entry_s=0.3e-9,
    ),
    train=PassCosts(
        op_s=5.0e-5,
        matrix_s=4.8e-7,
        macs_per_s=8.9e9,
        gemm_macs_per_s=14e9,
        sparse_macs_per_s=3e9,
        bytes_per_s=2.7e9,
        weight_bytes_per_s=17e9,
        sparse_entry_s=1e-9,
    ),
)

CUDA_COSTS = CostModel(
    forward=PassCosts(
        op_s=1.0e-5,
        matrix_s=2.0e-9,
        macs_per_s=5e12,
        gemm_macs_per_s=2e14,
        sparse_macs_per_s=2e12,
        bytes_per_s=2e12,
        weight_bytes_per_s=4e12,
        sparse_entry_s=2e-12,
    ),
    train=PassCosts(
        op_s=4.0e-5,
        matrix_s=6.0e-9,
        macs_per_s=1.7e12,
        gemm_macs_per_s=6.6e13,
        sparse_macs_per_s=7e11,
        bytes_per_s=7e11,
        weight_bytes_per_s=1.3e12,
        sparse_entry_s=6e-12,
    ),
    thread_scaling=0.0,
    min_saving_s=1e-5,
    chunk_bytes=None,
)


# ---------------------------------------------------------------------------------------------------------------
# The models in use: built-in, installed with set_cost_model, or read from $COMPRESSED_TRANSFORMER_COSTS
# ---------------------------------------------------------------------------------------------------------------

COSTS_ENV_VAR = "COMPRESSED_TRANSFORMER_COSTS"
BUILT_IN: dict[str, CostModel] = {"cpu": CPU_COSTS, "cuda": CUDA_COSTS}
_installed: dict[str, tuple[CostModel, str]] = {}  # device kind -> (model, where it came from)
_state = {"version": 0, "env_read": False}


def device_kind(device_type: str) -> str:
    """``"cuda"`` or ``"cpu"``: the cost model a device type uses (any device but CUDA gets the CPU model)."""
    return "cuda" if device_type == "cuda" else "cpu"


def _read_env() -> None:
    # Never while torch.compile traces (it cannot trace file access); the module reads it at import already.
    if _state["env_read"] or torch.compiler.is_compiling():
        return
    path = os.environ.get(COSTS_ENV_VAR)
    if path:  # a missing or malformed file raises at every decision until it is fixed, never silently ignored
        for kind, model in load_cost_models(path).items():
            _installed.setdefault(kind, (model, f"{path} (${COSTS_ENV_VAR})"))  # set_cost_model's win
        _state["version"] += 1
    _state["env_read"] = True


def cost_model_for(device_type: str) -> CostModel:
    """The cost model in use for a device type (``"cuda"``, or anything else: the CPU model): the one installed by
    :func:`set_cost_model`, else the one in the file named by ``$COMPRESSED_TRANSFORMER_COSTS``, else the
    built-in :data:`CPU_COSTS` / :data:`CUDA_COSTS`.

    Raises:
        FileNotFoundError, ValueError: when ``$COMPRESSED_TRANSFORMER_COSTS`` names a missing or malformed file.
    """
    _read_env()
    kind = device_kind(device_type)
    return _installed[kind][0] if kind in _installed else BUILT_IN[kind]


def cost_model_source(device_type: str) -> str:
    """Where the model :func:`cost_model_for` returns came from: ``"built-in"``, ``"set_cost_model"`` or the file
    named by ``$COMPRESSED_TRANSFORMER_COSTS``."""
    _read_env()
    kind = device_kind(device_type)
    return _installed[kind][1] if kind in _installed else "built-in"


def costs_version() -> int:
    """A number that changes whenever the models in use change (a key for cached path decisions)."""
    _read_env()
    return _state["version"]


def set_cost_model(device_type: str, model: CostModel | None) -> CostModel | None:
    """Install ``model`` for ``"cpu"`` or ``"cuda"`` (``None``: back to the built-in one); every layer decides
    its paths with it from its next forward on. Returns the model installed before (``None``: the built-in).

    Raises:
        ValueError: for another device type, or a ``model`` that is not a :class:`CostModel`.
    """
    if device_type not in BUILT_IN:
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    if model is not None and not isinstance(model, CostModel):
        raise ValueError(f"model must be a CostModel or None, got {type(model).__name__}")
    before = _installed.pop(device_type, None)
    if model is not None:
        _installed[device_type] = (model, "set_cost_model")
    _state["version"] += 1
    return None if before is None else before[0]


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------

COSTS_FORMAT = "compressed-transformer-costs/1"
_MODEL_KEYS = ("thread_scaling", "margin", "min_saving_s", "chunk_bytes")


def _pass_to_dict(costs: PassCosts, where: str) -> dict[str, float | None]:
    data: dict[str, float | None] = {}
    for name, value in asdict(costs).items():
        if math.isinf(value) and name.endswith("_per_s"):
            data[name] = None  # null: unbounded throughput
        elif not math.isfinite(value) or value < 0:
            raise ValueError(f"{where}.{name} must be finite and >= 0 to be saved, got {value}")
        else:
            data[name] = value
    return data


def _pass_from_dict(data: Any, where: str) -> PassCosts:
    names = [f.name for f in fields(PassCosts)]
    if not isinstance(data, Mapping) or set(data) != set(names):
        got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(f"{where}: expected the keys {names}, got {got}")
    values = {}
    for name in names:
        value = data[name]
        unbounded = value is None and name.endswith("_per_s")
        if not unbounded and not _is_number(value):
            raise ValueError(f"{where}.{name} must be a finite number >= 0, got {value!r}")
        if name.endswith("_per_s") and value == 0:
            raise ValueError(f"{where}.{name} must be > 0 (null: unbounded), got 0")
        values[name] = math.inf if unbounded else float(value)
    return PassCosts(**values)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def cost_model_to_dict(model: CostModel) -> dict[str, Any]:
    """A JSON-ready dict of ``model`` (throughputs fitted as unbounded are ``None``).

    Raises:
        ValueError: for a negative, NaN or infinite constant (other than an unbounded throughput).
    """
    data: dict[str, Any] = {
        "forward": _pass_to_dict(model.forward, "forward"),
        "train": _pass_to_dict(model.train, "train"),
    }
    data.update({k: getattr(model, k) for k in _MODEL_KEYS})
    _check_scalars(data, "cost model")
    return data


def _check_scalars(data: Mapping[str, Any], where: str) -> None:
    for key in ("thread_scaling", "margin", "min_saving_s"):
        if not _is_number(data[key]):
            raise ValueError(f"{where}.{key} must be a finite number >= 0, got {data[key]!r}")


def cost_model_from_dict(data: Any, where: str = "cost model") -> CostModel:
    """The :class:`CostModel` of :func:`cost_model_to_dict`'s output.

    Raises:
        ValueError: for missing or unknown keys, negative or non-numeric values.
    """
    expected = {"forward", "train", *_MODEL_KEYS}
    if not isinstance(data, Mapping) or set(data) != expected:
        got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(f"{where}: expected the keys {sorted(expected)}, got {got}")
    chunk = data["chunk_bytes"]
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"{where}.chunk_bytes must be a positive integer or null, got {chunk!r}")
    _check_scalars(data, where)
    return CostModel(
        forward=_pass_from_dict(data["forward"], f"{where}.forward"),
        train=_pass_from_dict(data["train"], f"{where}.train"),
        thread_scaling=float(data["thread_scaling"]),
        margin=float(data["margin"]),
        min_saving_s=float(data["min_saving_s"]),
        chunk_bytes=chunk,
    )


def save_cost_models(path: str | Path, models: Mapping[str, CostModel], **meta: Any) -> Path:
    """Write ``{"cpu": model, "cuda": model}`` (either or both) to a JSON file :func:`load_cost_models` reads;
    ``meta`` (e.g. the machine, the fit's errors) is stored beside them."""
    unknown = set(models) - set(BUILT_IN)
    if unknown or not models:
        raise ValueError(f"models must be keyed by 'cpu' and/or 'cuda', got {sorted(models)}")
    if {"format", "models"} & set(meta):
        raise ValueError("meta cannot hold the keys 'format' and 'models'")
    data = {"format": COSTS_FORMAT, "models": {k: cost_model_to_dict(m) for k, m in models.items()}, **meta}
    text = json.dumps(data, indent=1, allow_nan=False)  # strict JSON: no NaN / Infinity (raises ValueError)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path


def load_cost_models(path: str | Path) -> dict[str, CostModel]:
    """The models of a file written by :func:`save_cost_models` (``compressed-transformer calibrate``).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: for a file that is not such a JSON file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"cost model file {path} does not exist (write one with compressed-transformer calibrate)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not JSON: {error}") from None
    if not isinstance(data, Mapping) or data.get("format") != COSTS_FORMAT:
        raise ValueError(f"{path} is not a cost model file (format {COSTS_FORMAT!r})")
    models = data.get("models")
    if not isinstance(models, Mapping) or not models or set(models) - set(BUILT_IN):
        raise ValueError(f"{path}: 'models' must map 'cpu' and/or 'cuda' to a cost model")
    return {kind: cost_model_from_dict(value, f"{path}: models.{kind}") for kind, value in models.items()}


# ---------------------------------------------------------------------------------------------------------------
# Fitting: every prediction is linear in the per-unit costs (op_s, matrix_s, 1 / throughputs, sparse_entry_s)
# ---------------------------------------------------------------------------------------------------------------

_PASS_FIELDS = tuple(f.name for f in fields(PassCosts))
UNIT_NAMES = tuple(f"{p}.{name}" for p in ("forward", "train") for name in _PASS_FIELDS)


def _unit(name: str, unit: float) -> float:
    """The field value whose per-unit cost is ``unit`` (throughputs are 1 / cost)."""
    if name.endswith("_per_s"):
        return math.inf if unit == 0 else 1.0 / unit
    return unit


def _per_unit(name: str, value: float) -> float:
    return 1.0 / value if name.endswith("_per_s") else value


def _pass_with(units: Sequence[float]) -> PassCosts:
    return PassCosts(**{name: _unit(name, u) for name, u in zip(_PASS_FIELDS, units, strict=True)})


def model_units(model: CostModel) -> list[float]:
    """The 16 per-unit costs of ``model`` (forward then train, in :data:`UNIT_NAMES` order)."""
    return [_per_unit(n, getattr(getattr(model, p), n)) for p in ("forward", "train") for n in _PASS_FIELDS]


def model_with_units(base: CostModel, units: Sequence[float]) -> CostModel:
    """``base`` with its 16 per-unit costs replaced (its thread scaling, margin and chunking kept)."""
    if len(units) != len(UNIT_NAMES):
        raise ValueError(f"expected {len(UNIT_NAMES)} per-unit costs, got {len(units)}")
    half = len(_PASS_FIELDS)
    return replace(base, forward=_pass_with(units[:half]), train=_pass_with(units[half:]))


def cost_features(predict: Callable[[CostModel], float], base: CostModel) -> list[float]:
    """The amounts of work behind a prediction: ``predict(model)`` equals the dot product of these with
    :func:`model_units` of any ``model`` that shares ``base``'s thread scaling and chunking. Each amount is the
    prediction under the model that charges one second per unit of that term and nothing for the others."""
    out = []
    for k in range(len(UNIT_NAMES)):
        units = [0.0] * len(UNIT_NAMES)
        units[k] = 1.0
        out.append(float(predict(model_with_units(base, units))))
    return out


def nnls(a: torch.Tensor, b: torch.Tensor, *, tol: float = 1e-10, max_iter: int | None = None) -> torch.Tensor:
    """``argmin_{x >= 0} ||a x - b||`` (Lawson and Hanson's active-set method), in float64.

    Args:
        a: ``(m, n)``.
        b: ``(m,)``.
        tol: gradients up to this (relative to the largest column norm times ``||b||``) count as zero.
        max_iter: bound on the outer iterations (default ``3 n``).

    Raises:
        ValueError: for mismatched shapes.
    """
    a, b = a.double(), b.double()
    if a.dim() != 2 or b.shape != (a.shape[0],):
        raise ValueError(f"nnls needs a (m, n) matrix and an (m,) vector, got {tuple(a.shape)} and {tuple(b.shape)}")
    n = a.shape[1]
    x = torch.zeros(n, dtype=torch.float64)
    passive = torch.zeros(n, dtype=torch.bool)
    scale = float(a.norm(dim=0).max()) * float(b.norm()) + 1e-300
    for _ in range(max_iter or 3 * n):
        gradient = a.T @ (b - a @ x)
        free = ~passive & (gradient > tol * scale)
        if not free.any():
            break
        passive[torch.where(free, gradient, torch.full_like(gradient, -math.inf)).argmax()] = True
        while True:
            trial = torch.zeros(n, dtype=torch.float64)
            if not passive.any():
                break
            trial[passive] = torch.linalg.lstsq(a[:, passive], b[:, None]).solution[:, 0]
            if bool((trial[passive] > 0).all()):
                break
            blocked = passive & (trial <= 0)
            step = float((x[blocked] / (x[blocked] - trial[blocked])).nan_to_num(0.0).min())
            x = x + step * (trial - x)
            passive &= x > tol * float(x.abs().max() + 1e-300)
            x[~passive] = 0.0
        x = trial
    return x


def fit_cost_model(
    samples: Sequence[tuple[Sequence[float], float]], base: CostModel
) -> tuple[CostModel, dict[str, Any]]:
    """The per-unit costs that best predict measured times, by non-negative least squares on relative errors.

    Args:
        samples: ``(features, seconds)`` pairs: the :func:`cost_features` of a prediction and the time measured
            for what it predicts.
        base: the model whose thread scaling, margin and chunking are kept, and whose costs stay where no sample
            has any of that work.

    Returns:
        ``(model, report)``; the report names the costs the samples determined (``fitted``) and left to ``base``
        (``kept``), and the median / maximum relative error of ``base`` and of the fitted model on the samples.

    Raises:
        ValueError: for no samples, non-positive times or feature vectors of the wrong length.
    """
    if not samples:
        raise ValueError("fit_cost_model needs at least one (features, seconds) sample")
    if any(len(f) != len(UNIT_NAMES) for f, _ in samples):
        raise ValueError(f"every feature vector must have {len(UNIT_NAMES)} entries")
    times = torch.tensor([t for _, t in samples], dtype=torch.float64)
    if not bool((times > 0).all()):
        raise ValueError("measured seconds must be > 0")
    features = torch.tensor([list(f) for f, _ in samples], dtype=torch.float64)
    used = features.abs().sum(0) > 0
    units = torch.tensor(model_units(base), dtype=torch.float64)
    weighted = features[:, used] / times[:, None]  # rows in units of their own time: relative errors
    norms = weighted.norm(dim=0)
    solution = nnls(weighted / norms, torch.ones_like(times)) / norms
    fitted = units.clone()
    fitted[used] = solution
    model = model_with_units(base, fitted.tolist())

    report = {
        "samples": len(samples),
        "fitted": [n for n, u in zip(UNIT_NAMES, used.tolist(), strict=True) if u],
        "kept": [n for n, u in zip(UNIT_NAMES, used.tolist(), strict=True) if not u],
        "relative_error_base": relative_errors(samples, model_units(base)),
        "relative_error_fitted": relative_errors(samples, fitted.tolist()),
    }
    return model, report


def relative_errors(samples: Sequence[tuple[Sequence[float], float]], units: Sequence[float]) -> dict[str, float]:
    """Median and maximum of ``|predicted / measured - 1|`` over ``(features, seconds)`` samples, predicting with
    the per-unit costs ``units``."""
    features = torch.tensor([list(f) for f, _ in samples], dtype=torch.float64)
    times = torch.tensor([t for _, t in samples], dtype=torch.float64)
    relative = ((features @ torch.tensor(list(units), dtype=torch.float64)) / times - 1.0).abs()
    return {"median": float(relative.median()), "max": float(relative.max())}


# $COMPRESSED_TRANSFORMER_COSTS is read now, outside any torch.compile trace; a bad file raises again, with its
# message, at the first decision
with contextlib.suppress(OSError, ValueError):
    _read_env()
