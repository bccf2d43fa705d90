"""Helpers shared by the compressed layers: argument checks, default mode factorisations, initialisation scale."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..functional.tt import _prime_factors, factorize, max_padding_rows, tt_vocab_modes


def check_features(in_features: int, out_features: int) -> None:
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_linear(linear: nn.Module, cls_name: str) -> None:
    if type(linear) is not nn.Linear:
        raise ValueError(
            f"{cls_name}.from_linear expects an nn.Linear, got {type(linear).__name__}; only fully connected layers "
            "with a (out_features, in_features) weight can be converted"
        )


def check_modes(name: str, modes: Sequence[int]) -> None:
    """Refuse modes that are not positive integers (``4.5`` is never truncated to ``4``).

    Raises:
        ValueError: naming ``name``.
    """
    if any(int(m) != m or m < 1 for m in modes):
        raise ValueError(f"{name} must be positive ints, got {list(modes)}")


def resolve_modes(
    in_features: int,
    out_features: int,
    in_modes: Sequence[int] | None,
    out_modes: Sequence[int] | None,
    default_d: int,
    *,
    exact_d: bool = False,
    pad_out: bool = False,
) -> tuple[list[int], list[int]]:
    """Validate or choose the factorisations ``in_features = prod(in_modes)``, ``out_features = prod(out_modes)``.

    When a side is omitted it is factorised into as many balanced factors as the other side has (or
    ``default_d`` when both are omitted: lowered to the number of prime factors available, unless ``exact_d``,
    e.g. for a full list of TT ranks, which fixes the number of cores; modes of 1 then fill the rest). With
    ``pad_out``, ``out_modes`` may multiply to more than ``out_features``, by at most
    :func:`~compressed_transformer.functional.tt.max_padding_rows`: the layer's last outputs are padding. Omitted
    ``out_modes`` are then padded where ``out_features`` factorises badly (:func:`padded_modes`: a prime, say, or
    any size with a mode more than twice the balanced ``out_features ** (1 / d)``), as a TT table pads a
    vocabulary (:func:`~compressed_transformer.functional.tt.tt_vocab_modes`).

    Raises:
        ValueError: if a product differs from the features (or pads them by more than allowed), the lengths
            differ, or a mode is below 1.
    """
    if in_modes is None and out_modes is None and exact_d:
        d = default_d
    elif in_modes is None and out_modes is None:
        # At most as many modes as prime factors, so that no mode is 1 unless d is forced by the caller; a padded
        # output side is not bound by its own prime factors.
        d = max(1, min(default_d, len(_prime_factors(in_features))))
        padded = padded_modes(out_features, d) if pad_out else None
        if padded is None:
            d = max(1, min(d, len(_prime_factors(out_features))))
        else:  # a padded size with fewer factors than d (7 -> 8 = 2 x 2 x 2): fewer cores, not modes of 1
            out_modes = [m for m in padded if m > 1]
            d = len(out_modes)
    else:
        d = len(in_modes if in_modes is not None else out_modes)
    if out_modes is None:
        out_modes = (pad_out and padded_modes(out_features, d)) or factorize(out_features, d)
    in_modes = list(in_modes) if in_modes is not None else factorize(in_features, d)
    out_modes = list(out_modes)
    for name, modes, features in (("in_modes", in_modes, in_features), ("out_modes", out_modes, out_features)):
        check_modes(name, modes)
        product = math.prod(modes)
        padded = name == "out_modes" and pad_out
        if product == features or (padded and 0 < product - features <= max_padding_rows(features)):
            continue
        feature_name = "in_features" if name == "in_modes" else "out_features"
        if padded:  # the modes omitted out_modes would take: padded only where that balances them
            example = padded_modes(features, len(modes)) or factorize(features, len(modes))
            wanted = f"{features} to {features + max_padding_rows(features)} (e.g. {example})"
        else:
            wanted = f"{features} (e.g. {factorize(features, len(modes))})"
        raise ValueError(
            f"{name}={modes} multiply to {product}, but {feature_name}={features}; give modes whose product is {wanted}"
        )
    if len(in_modes) != len(out_modes):
        raise ValueError(f"in_modes and out_modes need the same length, got {in_modes} and {out_modes}")
    return [int(m) for m in in_modes], [int(m) for m in out_modes]


def padded_modes(size: int, d: int) -> list[int] | None:
    """``d`` balanced modes of a padded ``size`` (:func:`~compressed_transformer.functional.tt.tt_vocab_modes`)
    when ``size``'s own ``d`` balanced factors are not balanced (a factor more than twice ``size ** (1 / d)``,
    e.g. a prime or twice a prime) and padding by at most
    :func:`~compressed_transformer.functional.tt.max_padding_rows` balances them; else ``None``."""
    if factorize(size, d)[0] <= 2 * size ** (1.0 / d):
        return None
    modes = tt_vocab_modes(size, d)
    return modes if math.prod(modes) != size else None


def product_init_std(in_features: int, n_factors: int, n_paths: int) -> float:
    """Std of i.i.d. Gaussian factors so that a product of ``n_factors`` entries summed over ``n_paths`` terms has
    the variance of ``nn.Linear``'s default init, ``1 / (3 in_features)``."""
    target = 1.0 / (3.0 * in_features)
    return (target / n_paths) ** (1.0 / (2 * n_factors))


def reset_bias(bias: torch.Tensor | None, in_features: int) -> None:
    if bias is not None:
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(bias, -bound, bound)


def copy_bias(dst: torch.Tensor | None, linear: nn.Linear) -> None:
    if dst is not None:
        dst.copy_(linear.bias)
