"""Save and load compressed models as safetensors files.

A compressed model's ``state_dict`` fits only a model that already has the same compressed layers (TT cores of
the same ranks, a pruning mask of the same shape...). :func:`save_compressed` therefore writes, next to the
weights, the structure of every compressed layer (method, features, bias, constructor options) in the file's
header metadata; :func:`load_compressed_` gives a freshly built model of the original architecture the same
layers, then loads the weights. Other modules (embeddings, norms, ``nn.Linear`` left dense) must already match.

Example::

    model = MyModel()
    compress_(model, "tt", filter=r"ffn", ratio=10)
    ...  # fine-tune
    save_compressed(model, "model.safetensors")

    fresh = MyModel()                                  # dense, any initialisation
    load_compressed_(fresh, "model.safetensors")       # now the same compressed model

Tied parameters (e.g. a shared embedding and output projection) are stored once, with their other names in the
header (``aliases``). A pruned layer (:class:`~compressed_transformer.layers.PrunedLinear`, or a Sparse VD layer
turned into one by :func:`~compressed_transformer.compress.sparse_vd_to_pruned_`) is stored as its kept weights in
CSR form (``<name>.weight.csr_values``, ``.csr_crow``, ``.csr_col``, the narrowest integer indices) instead of the
dense ``weight`` and ``mask`` whenever that is smaller, so the file shrinks with the sparsity; loading restores the
dense weight and mask.
Files of the first format (``compressed-transformer/1``, every tensor dense) still load.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file
from torch import nn

from .compress import module_aliases, replace_module
from .functional.sparsity import csr_from_mask, masked_from_csr
from .layers import (
    COMPRESSED_EMBEDDINGS,
    COMPRESSED_LAYERS,
    METHODS,
    LowRankEmbedding,
    LowRankLinear,
    PrunedLinear,
    TTEmbedding,
    TTLinear,
    layer_options,
    method_of,
)
from .layers.embedding import tie_projection_

__all__ = [
    "EMBEDDING_METHOD",
    "EMBEDDING_METHODS",
    "FORMAT",
    "layer_spec",
    "layer_structure",
    "load_compressed_",
    "read_structure",
    "restructure_",
    "save_compressed",
    "saved_bytes",
]

FORMAT = "compressed-transformer/2"
_DENSE_FORMAT = "compressed-transformer/1"  # every tensor dense, tied ones deduplicated by safetensors.save_model
_FORMAT_KEY = "format"
_LAYERS_KEY = "compressed_layers"
_PACKED_KEY = "packed_layers"
_ALIASES_KEY = "aliases"
_CSR_PARTS = ("csr_values", "csr_crow", "csr_col")


EMBEDDING_METHOD = "svd-embedding"
# Structure method name -> compressed table class.
EMBEDDING_METHODS: dict[str, type[nn.Module]] = {EMBEDDING_METHOD: LowRankEmbedding, "tt-embedding": TTEmbedding}


def layer_spec(layer: nn.Module) -> dict[str, Any]:
    """What it takes to build a layer whose ``state_dict`` fits ``layer``'s: ``{"method", "in_features",
    "out_features", "bias", "options"}`` for a compressed linear layer, ``{"method": "svd-embedding" or
    "tt-embedding", "num_embeddings", "embedding_dim", "padding_idx", "options"}`` for a compressed table.

    Raises:
        TypeError: if ``layer`` is not one of this package's compressed layers.
    """
    if isinstance(layer, COMPRESSED_EMBEDDINGS):
        tt = isinstance(layer, TTEmbedding)
        options = (
            {"voc_modes": layer.voc_modes, "emb_modes": layer.emb_modes, "ranks": layer.ranks}
            if tt
            else {"rank": layer.rank}
        )
        return {
            "method": "tt-embedding" if tt else EMBEDDING_METHOD,
            "num_embeddings": layer.num_embeddings,
            "embedding_dim": layer.embedding_dim,
            "padding_idx": layer.padding_idx,
            "options": options,
        }
    return {
        "method": method_of(layer),
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
        "options": layer_options(layer),
    }


def layer_structure(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{qualified name: layer_spec(layer)}`` for every compressed layer and compressed table of ``model`` (a
    module shared by several parents appears under its first name). A low-rank / TT linear layer that shares its
    factors / cores with a low-rank / TT table (a tied output projection, see :func:`~compressed_transformer.
    compress.compress_embeddings_`) has ``"tied_to"``: the table's name."""
    return dict(_structure_by_module(model).values())


def _structure_by_module(model: nn.Module) -> dict[int, tuple[str, dict[str, Any]]]:
    """``{id(module): (name, spec)}`` of :func:`layer_structure`."""
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, COMPRESSED_LAYERS + COMPRESSED_EMBEDDINGS)]
    inner = {id(m.table) for _, m in named if isinstance(m, TTEmbedding)}  # a TT table's own TTLinear
    named = [(n, m) for n, m in named if id(m) not in inner]
    tables = {id(_first_factor(m)): n for n, m in named if isinstance(m, COMPRESSED_EMBEDDINGS)}
    structure = {}
    for name, module in named:
        spec = layer_spec(module)
        if isinstance(module, LowRankLinear | TTLinear) and id(_first_factor(module)) in tables:
            spec["tied_to"] = tables[id(_first_factor(module))]
        structure[id(module)] = (name, spec)
    return structure


def _first_factor(module: nn.Module) -> torch.Tensor | None:
    """The parameter a table shares with a tied projection (``left`` of a low-rank pair, the first TT core)."""
    if isinstance(module, LowRankEmbedding | LowRankLinear):
        return module.left
    if isinstance(module, TTEmbedding | TTLinear):
        return module.cores[0]
    return None


def _fields(name: str, spec: Any, keys: tuple[str, ...]) -> tuple:
    try:
        fields = (*(spec[k] for k in keys), spec["options"])
    except (KeyError, TypeError) as error:
        raise ValueError(f"invalid structure entry for layer {name!r}: {spec!r} ({error!r} missing)") from None
    if not isinstance(fields[-1], dict):
        raise ValueError(f"invalid structure entry for layer {name!r}: {spec!r} (options must be an object)")
    return (*fields[:-1], dict(fields[-1]))


def _build(name: str, module: nn.Module, what: str, build: Callable[..., nn.Module]) -> nn.Module:
    """``build(device=, dtype=)`` on ``module``'s device and dtype; its errors name the layer and ``what``."""
    first = next(module.parameters())
    try:
        return build(device=first.device, dtype=first.dtype)
    except (TypeError, ValueError) as error:
        raise ValueError(f"layer {name!r}: cannot build {what}: {error}") from None


def _new_embedding(name: str, module: nn.Module, spec: dict[str, Any]) -> nn.Module:
    num, dim, padding_idx, options = _fields(name, spec, ("num_embeddings", "embedding_dim", "padding_idx"))
    if type(module) is not nn.Embedding and not isinstance(module, COMPRESSED_EMBEDDINGS):
        raise ValueError(f"module {name!r} is a {type(module).__name__}; expected nn.Embedding or a compressed table")
    found = (module.num_embeddings, module.embedding_dim, module.padding_idx)
    if found != (num, dim, padding_idx):
        raise ValueError(
            f"module {name!r} is nn.Embedding({found[0]}, {found[1]}, padding_idx={found[2]}) but the saved table "
            f"is {num}x{dim}, padding_idx={padding_idx}"
        )
    build = functools.partial(EMBEDDING_METHODS[spec["method"]], num, dim, padding_idx=padding_idx, **options)
    return _build(name, module, f"a {spec['method']} table with {options}", build)


def _new_linear(name: str, module: nn.Module, spec: dict[str, Any]) -> nn.Module:
    in_features, out_features, bias, options = _fields(name, spec, ("in_features", "out_features", "bias"))
    method = spec["method"]
    if not isinstance(bias, bool):
        raise ValueError(f"invalid structure entry for layer {name!r}: {spec!r} (bias must be true or false)")
    if method not in METHODS:
        raise ValueError(
            f"layer {name!r}: unknown method {method!r}; known: {', '.join([*METHODS, *EMBEDDING_METHODS])}"
        )
    if not isinstance(module, (nn.Linear, *COMPRESSED_LAYERS)):
        raise ValueError(f"module {name!r} is a {type(module).__name__}; expected nn.Linear or a compressed layer")
    found = (module.in_features, module.out_features, module.bias is not None)
    if found != (in_features, out_features, bias):
        raise ValueError(
            f"module {name!r} is {type(module).__name__}(in={found[0]}, out={found[1]}, bias={found[2]}) but the "
            f"saved layer is {in_features}->{out_features}, bias={bias}"
        )
    build = functools.partial(METHODS[method], in_features, out_features, bias, **options)
    return _build(name, module, f"{method!r} with options {options}", build)


def restructure_(model: nn.Module, structure: dict[str, dict[str, Any]]) -> nn.Module:
    """Give ``model`` the compressed layers of ``structure`` (see :func:`layer_structure`), in place: the
    ``nn.Linear`` / ``nn.Embedding`` (or compressed layer of another structure) at each name becomes a freshly
    initialised layer of the recorded structure, on its device and dtype; a tied projection shares its embedding's
    new factors. A module that already has the recorded structure is kept. Every new layer is built before any is
    swapped, so a failure leaves ``model`` untouched.

    Returns:
        ``model``.

    Raises:
        ValueError: for a name that ``model`` lacks, a module there of another kind or size, an invalid
            structure entry, or a compressed layer recorded as the whole model (``""``: a module cannot replace
            itself) that ``model`` does not already have.
    """
    modules = dict(model.named_modules())
    current = _structure_by_module(model)
    built: dict[str, nn.Module] = {}  # name -> the module it will hold
    swaps = []
    ordered = sorted(structure.items(), key=lambda item: not isinstance(item[1], dict) or "tied_to" in item[1])
    for name, spec in ordered:  # tables before the projections tied to them
        if not isinstance(spec, dict) or not isinstance(spec.get("method"), str):
            raise ValueError(f"invalid structure entry for layer {name!r}: {spec!r}")
        module = modules.get(name)
        if module is None:
            raise ValueError(f"the model has no module {name!r} (the saved model's architecture differs)")
        if id(module) in current and current[id(module)][1] == spec:
            built[name] = module
            continue
        if spec["method"] in EMBEDDING_METHODS:
            layer = _new_embedding(name, module, spec)
        else:
            layer = _new_linear(name, module, spec)
        if name == "":
            raise ValueError(
                f"the saved model is itself a {spec['method']!r} layer, which this {type(module).__name__} cannot "
                f"become in place: build {_signature(layer, spec)} and load the file into it"
            )
        if "tied_to" in spec:
            if spec["tied_to"] not in built:
                raise ValueError(
                    f"layer {name!r} is recorded as tied to {spec['tied_to']!r}, which the file does not record as "
                    "a compressed table"
                )
            _tie(name, layer, built[spec["tied_to"]], spec["tied_to"])
        built[name] = layer
        swaps.append((module, layer))
    aliases = module_aliases(model)
    for module, layer in swaps:
        replace_module(model, aliases[id(module)], layer)
    return model


def _signature(layer: nn.Module, spec: dict[str, Any]) -> str:
    """The constructor call that builds ``layer`` of ``spec``, for messages."""
    if spec["method"] in EMBEDDING_METHODS:
        args = [layer.num_embeddings, layer.embedding_dim, f"padding_idx={layer.padding_idx}"]
    else:
        args = [layer.in_features, layer.out_features, f"bias={layer.bias is not None}"]
    options = [f"{key}={value!r}" for key, value in spec["options"].items()]
    return f"{type(layer).__name__}({', '.join(map(str, [*args, *options]))})"


def _tie(name: str, layer: nn.Module, table: nn.Module, table_name: str) -> None:
    """Make the projection ``layer`` share the factors / cores of ``table``."""
    try:
        tie_projection_(layer, table)
    except ValueError as error:
        raise ValueError(f"layer {name!r} cannot be tied to {table_name!r}: {error}") from None


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    metadata: dict[str, str] | None = None,
    pack_sparse: bool = True,
) -> None:
    """Write ``model``'s weights and buffers (``state_dict``) and the structure of its compressed layers to a
    safetensors file.

    Args:
        model: any module, compressed or not.
        path: the file to write.
        metadata: extra string pairs for the header (e.g. a model config as JSON); the keys ``format``,
            ``compressed_layers``, ``packed_layers`` and ``aliases`` are this function's.
        pack_sparse: store each pruned layer as its kept weights in CSR form (see the module docstring) rather
            than as a dense weight and mask, where that takes fewer bytes.

    Raises:
        ValueError: if ``metadata`` uses a reserved key or a value that is not a string.
        FileNotFoundError: if the folder of ``path`` does not exist.
    """
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {os.fspath(path)}: the folder {folder} does not exist")
    extra = dict(metadata or {})
    reserved = {_FORMAT_KEY, _LAYERS_KEY, _PACKED_KEY, _ALIASES_KEY} & set(extra)
    if reserved:
        raise ValueError(f"metadata keys {sorted(reserved)} are reserved by save_compressed")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise ValueError("safetensors metadata keys and values must be strings")
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    packed, aliases = _pack_pruned(model, state) if pack_sparse else ([], {})
    aliases |= _drop_aliases(state)
    header = {
        _FORMAT_KEY: FORMAT,
        _LAYERS_KEY: json.dumps(layer_structure(model), sort_keys=True),
        _PACKED_KEY: json.dumps(packed),
        _ALIASES_KEY: json.dumps(aliases, sort_keys=True),
        **extra,
    }
    save_file(state, os.fspath(path), metadata=header)


def saved_bytes(model: nn.Module, *, pack_sparse: bool = True) -> int:
    """The size of the file :func:`save_compressed` writes for ``model``, measured (written to a temporary folder)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.safetensors")
        save_compressed(model, path, pack_sparse=pack_sparse)
        return os.path.getsize(path)


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _pack_pruned(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], dict[str, str]]:
    """Replace the ``weight`` and ``mask`` of every pruned layer in ``state`` by its CSR arrays where they take fewer
    bytes (above ~17 % sparsity for float32). Returns the packed layers' names and ``{name: first name}`` for the
    arrays of a layer shared under several names (stored once)."""
    names, aliases, first = [], {}, {}
    for name, module in model.named_modules(remove_duplicate=False):  # a shared layer is in state under each name
        if not isinstance(module, PrunedLinear):
            continue
        prefix = _prefix(name)
        if id(module) in first:
            if first[id(module)] is not None:
                del state[f"{prefix}weight"], state[f"{prefix}mask"]
                aliases |= {f"{prefix}weight.{part}": f"{first[id(module)]}weight.{part}" for part in _CSR_PARTS}
                names.append(name)
            continue
        weight, mask = state[f"{prefix}weight"], state[f"{prefix}mask"]
        parts = csr_from_mask(weight, mask)
        if sum(_nbytes(t) for t in parts) >= _nbytes(weight) + _nbytes(mask):  # low sparsity: dense is smaller
            first[id(module)] = None
            continue
        del state[f"{prefix}weight"], state[f"{prefix}mask"]
        state.update({f"{prefix}weight.{part}": t for part, t in zip(_CSR_PARTS, parts, strict=True)})
        first[id(module)] = prefix
        names.append(name)
    return names, aliases


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _drop_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Keep one name of each tensor that ``state`` holds under several (tied parameters, shared modules) and make
    every tensor contiguous and unshared, as safetensors requires. Returns ``{dropped name: kept name}``."""
    kept: dict[tuple, str] = {}
    storages: set[int] = set()
    aliases = {}
    for name, tensor in list(state.items()):
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in kept:
            aliases[name] = kept[key]
            del state[name]
            continue
        kept[key] = name
        storage = tensor.untyped_storage().data_ptr()
        shared = tensor.numel() and storage in storages  # a view overlapping another tensor: stored on its own
        state[name] = tensor.clone() if shared else tensor.contiguous()
        storages.add(storage)
    return aliases


def read_structure(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``(structure, metadata)`` of a file written by :func:`save_compressed` (``metadata``: the whole header).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a safetensors file of this format.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is a folder, not a file" if os.path.isdir(path) else f"{path} does not exist")
    try:
        with safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"cannot read {path} as a safetensors file: {error}") from error
    if header.get(_FORMAT_KEY) not in (FORMAT, _DENSE_FORMAT):
        raise ValueError(
            f"{path} was not written by compressed_transformer.save_compressed (header format "
            f"{header.get(_FORMAT_KEY)!r}, expected {FORMAT!r} or {_DENSE_FORMAT!r}); load plain safetensors files "
            "with safetensors itself"
        )
    try:
        structure = json.loads(header[_LAYERS_KEY])
    except (KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable compressed-layer structure in the header ({error})") from None
    if not isinstance(structure, dict):
        kind = type(structure).__name__
        raise ValueError(f"{path}: the compressed-layer structure in the header must be a JSON object, got {kind}")
    return structure, header


def load_compressed_(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True, device: str | torch.device = "cpu"
) -> nn.Module:
    """Give ``model`` the compressed layers recorded in ``path`` (:func:`restructure_`) and load its weights.

    Args:
        model: the original architecture (dense where the saved model was compressed) or the same compressed model.
        path: a file written by :func:`save_compressed`.
        strict: require every tensor of the file and of ``model`` to match, as ``load_state_dict`` does (and so
            refuse a ``model`` with compressed layers that the file stores dense).
        device: where the tensors are read to before they are copied into ``model``.

    Returns:
        ``model``.

    Raises:
        FileNotFoundError, ValueError: see :func:`read_structure` and :func:`restructure_` (which leave ``model``
            untouched), as for a ``device`` the tensors cannot be read to, a header that does not describe the
            file's tensors, or (under ``strict``) compressed layers of ``model`` that the file stores dense;
            ``ValueError`` also when the weights do not fit (missing or unexpected tensors under ``strict``, other
            shapes), after ``model`` has been given its new layers.
    """
    structure, header = read_structure(path)
    path, device = os.fspath(path), _device(device)
    if strict:
        _check_recorded(model, structure, path)
    if header[_FORMAT_KEY] == _DENSE_FORMAT:
        restructure_(model, structure)
        state = None
    else:
        tensors, packed = _read_tensors(path, header, device)
        restructure_(model, structure)
        state = _unpack(model, path, tensors, packed)
    try:
        if state is None:
            load_model(model, path, strict=strict, device=str(device))
        else:
            model.load_state_dict(state, strict=strict)
    except RuntimeError as error:
        raise ValueError(f"the weights in {path} do not fit the model: {error}") from error
    return model


def _device(device: str | torch.device) -> torch.device:
    """``device``, checked to hold tensors here.

    Raises:
        ValueError: for a malformed device or one this machine lacks.
    """
    try:
        resolved = torch.device(device)
        torch.empty(0, device=resolved)
    except (RuntimeError, AssertionError, TypeError) as error:  # torch asserts a backend it was not built with
        raise ValueError(f"cannot load onto device {device!r}: {error}") from None
    return resolved


def _check_recorded(model: nn.Module, structure: dict[str, Any], path: str) -> None:
    """Refuse the compressed layers of ``model`` that ``structure`` does not record (the file stores them dense):
    their factors would be missing from the file, and its dense weights unexpected.

    Raises:
        ValueError: naming them.
    """
    modules = dict(model.named_modules())
    dense = [f"{name!r} ({type(modules[name]).__name__})" for name in layer_structure(model) if name not in structure]
    if dense:
        raise ValueError(
            f"{path}: the model's layers {', '.join(dense)} are compressed, but the file stores them dense; load "
            "into a model built dense there (or pass strict=False to leave them as they are)"
        )


def _read_tensors(path: str, header: dict[str, str], device: torch.device) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of a file of the current format, each under all its names (aliases restored), and the names of
    its packed pruned layers.

    Raises:
        ValueError: for a header that does not describe the tensors, or tensors that cannot be read to ``device``.
    """
    try:
        packed, aliases = json.loads(header[_PACKED_KEY]), json.loads(header[_ALIASES_KEY])
    except (KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable packed-layer or alias list in the header ({error})") from None
    if not isinstance(packed, list) or not all(isinstance(name, str) for name in packed):
        raise ValueError(f"{path}: the packed-layer list in the header must be a JSON list of names, got {packed!r}")
    if not isinstance(aliases, dict) or not all(isinstance(name, str) for name in aliases.values()):
        raise ValueError(f"{path}: the alias list in the header must be a JSON object of names, got {aliases!r}")
    try:
        state = load_file(path, device=str(device))
    except Exception as error:  # safetensors and the device backends raise their own error types
        raise ValueError(f"cannot read the tensors of {path} onto device {str(device)!r}: {error}") from error
    for alias, name in aliases.items():
        if name not in state:
            raise ValueError(f"{path}: {alias!r} is recorded as an alias of {name!r}, which the file lacks")
        state[alias] = state[name]
    return state, packed


def _unpack(model: nn.Module, path: str, state: dict[str, torch.Tensor], packed: list[str]) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a file of the current format with its packed pruned layers unpacked into ``model``'s."""
    modules = dict(model.named_modules(remove_duplicate=False))
    for name in packed:
        module, prefix = modules.get(name), _prefix(name)
        if not isinstance(module, PrunedLinear):
            raise ValueError(f"{path}: the packed pruned layer {name!r} is not a PrunedLinear in the model")
        try:
            parts = [state.pop(f"{prefix}weight.{part}") for part in _CSR_PARTS]
            weight, mask = masked_from_csr(*parts, (module.out_features, module.in_features))
        except (KeyError, ValueError) as error:
            raise ValueError(f"{path}: the packed pruned layer {name!r} is unreadable: {error}") from None
        state[f"{prefix}weight"], state[f"{prefix}mask"] = weight, mask
    return state
