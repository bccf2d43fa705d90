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

Tied parameters (e.g. a shared embedding and output projection) are stored once, by safetensors' ``save_model``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from .compress import module_aliases, replace_module
from .layers import COMPRESSED_LAYERS, METHODS, layer_options, method_of

__all__ = [
    "FORMAT",
    "layer_spec",
    "layer_structure",
    "load_compressed_",
    "read_structure",
    "restructure_",
    "save_compressed",
]

FORMAT = "compressed-transformer/1"
_FORMAT_KEY = "format"
_LAYERS_KEY = "compressed_layers"


def layer_spec(layer: nn.Module) -> dict[str, Any]:
    """``{"method", "in_features", "out_features", "bias", "options"}`` of a compressed layer: what it takes to
    build a layer whose ``state_dict`` fits ``layer``'s.

    Raises:
        TypeError: if ``layer`` is not one of this package's compressed layers.
    """
    return {
        "method": method_of(layer),
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
        "options": layer_options(layer),
    }


def layer_structure(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{qualified name: layer_spec(layer)}`` for every compressed layer of ``model`` (a layer shared by several
    parents appears under its first name)."""
    return {name: layer_spec(m) for name, m in model.named_modules() if isinstance(m, COMPRESSED_LAYERS)}


def restructure_(model: nn.Module, structure: dict[str, dict[str, Any]]) -> nn.Module:
    """Replace the ``nn.Linear`` at each name of ``structure`` (see :func:`layer_structure`) by a freshly
    initialised compressed layer of that structure, on the linear's device and dtype, in place. A module that
    already has the recorded structure is kept. Every new layer is built before any is swapped, so a failure
    leaves ``model`` untouched.

    Returns:
        ``model``.

    Raises:
        ValueError: for a name that ``model`` lacks, a module there that is neither an ``nn.Linear`` nor a layer
            of the recorded structure, a linear of other features or bias, or an invalid structure entry.
    """
    modules = dict(model.named_modules())
    swaps = []
    for name, spec in structure.items():
        try:
            method, options = spec["method"], dict(spec["options"])
            in_features, out_features, bias = spec["in_features"], spec["out_features"], bool(spec["bias"])
        except (KeyError, TypeError) as error:
            raise ValueError(f"invalid structure entry for layer {name!r}: {spec!r} ({error!r} missing)") from None
        if method not in METHODS:
            raise ValueError(f"layer {name!r}: unknown method {method!r}; known: {', '.join(METHODS)}")
        module = modules.get(name)
        if module is None:
            raise ValueError(f"the model has no module {name!r} (the saved model's architecture differs)")
        if isinstance(module, COMPRESSED_LAYERS) and layer_spec(module) == spec:
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"module {name!r} is a {type(module).__name__}; expected nn.Linear or a {method!r} layer like the "
                "saved one"
            )
        found = (module.in_features, module.out_features, module.bias is not None)
        if found != (in_features, out_features, bias):
            raise ValueError(
                f"module {name!r} is nn.Linear(in={found[0]}, out={found[1]}, bias={found[2]}) but the saved layer "
                f"is {in_features}->{out_features}, bias={bias}"
            )
        factory = {"device": module.weight.device, "dtype": module.weight.dtype}
        try:
            layer = METHODS[method](in_features, out_features, bias, **factory, **options)
        except (TypeError, ValueError) as error:
            raise ValueError(f"layer {name!r}: cannot build {method!r} with options {options}: {error}") from None
        swaps.append((module, layer))
    aliases = module_aliases(model)
    for module, layer in swaps:
        replace_module(model, aliases[id(module)], layer)
    return model


def save_compressed(model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> None:
    """Write ``model``'s weights and buffers (``state_dict``) and the structure of its compressed layers to a
    safetensors file.

    Args:
        model: any module, compressed or not.
        path: the file to write.
        metadata: extra string pairs for the header (e.g. a model config as JSON); the keys ``format`` and
            ``compressed_layers`` are this function's.

    Raises:
        ValueError: if ``metadata`` uses a reserved key or a value that is not a string.
    """
    extra = dict(metadata or {})
    reserved = {_FORMAT_KEY, _LAYERS_KEY} & set(extra)
    if reserved:
        raise ValueError(f"metadata keys {sorted(reserved)} are reserved by save_compressed")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise ValueError("safetensors metadata keys and values must be strings")
    header = {_FORMAT_KEY: FORMAT, _LAYERS_KEY: json.dumps(layer_structure(model), sort_keys=True), **extra}
    save_model(model, os.fspath(path), metadata=header)


def read_structure(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``(structure, metadata)`` of a file written by :func:`save_compressed` (``metadata``: the whole header).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a safetensors file of this format.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"cannot read {path} as a safetensors file: {error}") from error
    if header.get(_FORMAT_KEY) != FORMAT:
        raise ValueError(
            f"{path} was not written by compressed_transformer.save_compressed (header format "
            f"{header.get(_FORMAT_KEY)!r}, expected {FORMAT!r}); load plain safetensors files with safetensors itself"
        )
    try:
        structure = json.loads(header[_LAYERS_KEY])
    except (KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable compressed-layer structure in the header ({error})") from None
    return structure, header


def load_compressed_(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True, device: str | torch.device = "cpu"
) -> nn.Module:
    """Give ``model`` the compressed layers recorded in ``path`` (:func:`restructure_`) and load its weights.

    Args:
        model: the original architecture (dense where the saved model was compressed) or the same compressed model.
        path: a file written by :func:`save_compressed`.
        strict: require every tensor of the file and of ``model`` to match, as ``load_state_dict`` does.
        device: where the tensors are read to before they are copied into ``model``.

    Returns:
        ``model``.

    Raises:
        FileNotFoundError, ValueError: see :func:`read_structure` and :func:`restructure_` (which leave ``model``
            untouched); ``ValueError`` also when the weights do not fit (missing or unexpected tensors under
            ``strict``, other shapes), after ``model`` has been given its new layers.
    """
    structure, _ = read_structure(path)
    restructure_(model, structure)
    try:
        load_model(model, os.fspath(path), strict=strict, device=str(device))
    except RuntimeError as error:
        raise ValueError(f"the weights in {os.fspath(path)} do not fit the model: {error}") from error
    return model
