"""The encoder-decoder Transformer of Vaswani et al. (2017), with compressible feed-forward blocks.

"Attention Is All You Need" (NeurIPS 2017, https://arxiv.org/abs/1706.03762). Each of the ``enc_layers + dec_layers``
blocks holds one position-wise feed-forward network ``FFN(x) = fc2(dropout(relu(fc1(x))))`` with
``fc1: d_model -> d_ff`` and ``fc2: d_ff -> d_model``. An :class:`FFNSpec` says which compression method builds those
two linears (``dense``, ``tt``, ``tucker``, ``svd``, ``prune``, ``svd-o``) and in which blocks; every other linear
(attention projections, output projection) stays dense.

Block numbering: encoder blocks are ``0 .. enc_layers - 1`` counted from the input embedding upwards, decoder blocks
likewise. Attention uses :func:`torch.nn.functional.scaled_dot_product_attention` (fused kernels where available).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ATTENTION_PROJECTIONS",
    "FFN_METHODS",
    "PRESETS",
    "FFNSpec",
    "FeedForward",
    "KVCache",
    "MultiHeadAttention",
    "Transformer",
    "TransformerConfig",
    "fc2_options",
    "ffn_module_names",
    "parameter_report",
    "preset",
    "resolve_blocks",
]

FFN_METHODS = ("dense", "tt", "tucker", "svd", "prune", "sparse", "svd-o")

KVCache = list[dict[str, torch.Tensor]]


@dataclass(frozen=True)
class FFNSpec:
    """Which compression method builds the feed-forward blocks, with what options, and in which blocks.

    Args:
        method: one of ``dense``, ``tt``, ``tucker``, ``svd``, ``prune``, ``svd-o``.
        options: keyword options for the method's layer, e.g. ``{"ranks": [1, 2, 2, 2, 2, 1]}`` for ``tt``,
            ``{"ranks": 2}`` for ``tucker``, ``{"rank": 64}`` for ``svd``, ``{"sparsity": 0.9}`` for ``prune``.
        blocks: which FFN blocks use ``method`` (the others stay dense):

            * ``"all"``, ``"none"``, ``"encoder"``, ``"decoder"``;
            * a fraction ``"1/2"``, ``"0.25"``, ``"1.0"``, ...: in *each* stack, the lowest ``round(f * layers)``
              blocks (those nearest the embeddings), so ``"1/2"`` of a 6+6 model is encoder 0-2 and decoder 0-2
              (a fraction has a ``/`` or a decimal point: ``"1"`` is block 1);
            * explicit indices ``"enc:0,2;dec:1"`` (either part optional), or plain ``"0,1,7"`` counting the
              encoder blocks first and the decoder blocks after them.
    """

    method: str = "dense"
    options: Mapping[str, Any] = field(default_factory=dict)
    blocks: str = "all"

    def __post_init__(self) -> None:
        if self.method not in FFN_METHODS:
            raise ValueError(f"unknown FFN method {self.method!r}; choose one of {', '.join(FFN_METHODS)}")
        object.__setattr__(self, "options", dict(self.options))
        object.__setattr__(self, "blocks", str(self.blocks).strip().lower())

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "options": dict(self.options), "blocks": self.blocks}


def resolve_blocks(blocks: str, enc_layers: int, dec_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Turn a block selection (see :class:`FFNSpec`) into sorted ``(encoder_indices, decoder_indices)``.

    Raises:
        ValueError: if ``blocks`` cannot be parsed or names a block that does not exist.
    """
    text = blocks.strip().lower()
    all_enc, all_dec = tuple(range(enc_layers)), tuple(range(dec_layers))
    named = {"all": (all_enc, all_dec), "none": ((), ()), "encoder": (all_enc, ()), "decoder": ((), all_dec)}
    if text in named:
        return named[text]
    fraction = None
    if re.fullmatch(r"\d+\s*/\s*\d+", text):
        num, den = (int(part) for part in text.split("/"))
        fraction = num / den if den else None
    elif re.fullmatch(r"0?\.\d+|1\.0*", text):  # a decimal point: a bare "0" or "1" is a block index
        fraction = float(text)
    if fraction is not None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"FFN block fraction must be in [0, 1], got {blocks!r}")
        return tuple(range(round(fraction * enc_layers))), tuple(range(round(fraction * dec_layers)))
    enc: set[int] = set()
    dec: set[int] = set()
    try:
        if re.search(r"[a-z]", text):
            for part in filter(None, (p.strip() for p in text.split(";"))):
                stack, _, indices = part.partition(":")
                target = {"enc": enc, "encoder": enc, "dec": dec, "decoder": dec}[stack.strip()]
                target.update(int(i) for i in indices.split(",") if i.strip())
        else:
            for i in (int(i) for i in text.split(",") if i.strip()):
                (enc if i < enc_layers else dec).add(i if i < enc_layers else i - enc_layers)
    except (KeyError, ValueError):
        raise ValueError(
            f"cannot parse FFN blocks {blocks!r}; use all, none, encoder, decoder, a fraction such as 1/2, "
            "'enc:0,1;dec:2' or global indices such as '0,1,7'"
        ) from None
    bad = [f"enc:{i}" for i in enc if not 0 <= i < enc_layers] + [f"dec:{i}" for i in dec if not 0 <= i < dec_layers]
    if bad:
        raise ValueError(
            f"FFN blocks {blocks!r} name blocks that do not exist ({', '.join(bad)}) in a "
            f"{enc_layers}+{dec_layers}-layer model"
        )
    return tuple(sorted(enc)), tuple(sorted(dec))


@dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of the encoder-decoder Transformer; a checkpoint stores this to rebuild its model.

    Args:
        vocab_size: size of the joint source/target subword vocabulary.
        d_model: model width.
        heads: attention heads (``d_model`` must be divisible by it).
        enc_layers: encoder blocks.
        dec_layers: decoder blocks.
        d_ff: inner width of the feed-forward blocks.
        dropout: dropout on sub-layer outputs and embeddings (Vaswani et al.'s residual dropout).
        attn_dropout: dropout on attention weights.
        activation_dropout: dropout on the FFN hidden activation (fairseq's ``--activation-dropout``; Vaswani et
            al. use none). ``None``: the same as ``dropout``, this project's behaviour before the setting existed.
            With a rank-bottlenecked ``fc2`` (Tucker rank 2 is rank 4) hidden dropout can make the block's output
            mostly noise, and a post-norm model can come to depend on that noise (see ``docs/results.md``).
        norm_first: pre-norm (``True``, LayerNorm before each sub-layer, plus a final one) or post-norm (the paper).
        share_embeddings: one embedding table for source and target (joint vocabulary).
        tie_output: the output projection reuses the target embedding (Press & Wolf 2017).
        label_smoothing: the loss's label smoothing (stored here so a checkpoint knows how it was trained).
        max_positions: longest sequence the sinusoidal table covers.
        pad_id / bos_id / eos_id: special token ids of the tokenizer.
        ffn: the :class:`FFNSpec` of the feed-forward blocks.
    """

    vocab_size: int = 8000
    d_model: int = 512
    heads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1
    attn_dropout: float = 0.0
    activation_dropout: float | None = None
    norm_first: bool = False
    share_embeddings: bool = True
    tie_output: bool = True
    label_smoothing: float = 0.1
    max_positions: int = 1024
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3
    ffn: FFNSpec = field(default_factory=FFNSpec)

    def __post_init__(self) -> None:
        if isinstance(self.ffn, Mapping):
            object.__setattr__(self, "ffn", FFNSpec(**self.ffn))
        for name in ("vocab_size", "d_model", "heads", "enc_layers", "dec_layers", "d_ff", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"TransformerConfig.{name} must be an int, got {value!r}")
            if value < (0 if name.endswith("layers") else 1):
                raise ValueError(f"TransformerConfig.{name} must be positive, got {value}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by heads={self.heads}")
        if self.d_model % 2:
            raise ValueError(f"d_model={self.d_model} must be even (the sinusoidal positions pair sines and cosines)")
        for name in ("dropout", "attn_dropout", "label_smoothing", "activation_dropout"):
            if getattr(self, name) is not None and not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TransformerConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if len({self.pad_id, self.bos_id, self.eos_id}) != 3:
            raise ValueError("pad_id, bos_id and eos_id must differ")
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"TransformerConfig.{name} must be a token id in [0, vocab_size={self.vocab_size}), got {value!r}"
                )
        resolve_blocks(self.ffn.blocks, self.enc_layers, self.dec_layers)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ffn"] = self.ffn.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TransformerConfig:
        """Rebuild a config from :meth:`to_dict` output; unknown keys are an error (a config from elsewhere)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"not a TransformerConfig: unknown keys {unknown}")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> TransformerConfig:
        return replace(self, **changes)

    @property
    def ffn_dropout(self) -> float:
        """The dropout applied to the FFN hidden activation (``activation_dropout``, else ``dropout``)."""
        return self.dropout if self.activation_dropout is None else self.activation_dropout


PRESETS: dict[str, TransformerConfig] = {
    # Vaswani et al. (2017) base model, the seed's 6+6 configuration (no dropout on the FFN hidden layer, as there).
    "base": TransformerConfig(
        d_model=512, heads=8, enc_layers=6, dec_layers=6, d_ff=2048, dropout=0.1, activation_dropout=0.0
    ),
    # fairseq transformer_iwslt_de_en (activation_dropout 0, fairseq's default).
    "iwslt": TransformerConfig(
        d_model=512, heads=4, enc_layers=6, dec_layers=6, d_ff=1024, dropout=0.3, activation_dropout=0.0
    ),
    # Multi30k on a 2-core CPU in about an hour.
    "small": TransformerConfig(
        d_model=256, heads=4, enc_layers=3, dec_layers=3, d_ff=512, dropout=0.1, norm_first=True
    ),
    # Unit tests.
    "tiny": TransformerConfig(
        vocab_size=64, d_model=32, heads=2, enc_layers=2, dec_layers=2, d_ff=64, dropout=0.0, max_positions=128
    ),
}


def preset(name: str, **changes: Any) -> TransformerConfig:
    """A preset config (``base``, ``small``, ``iwslt``, ``tiny``) with ``changes`` applied.

    Raises:
        ValueError: for an unknown preset name.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **changes)


def _build_linear(method: str, in_features: int, out_features: int, options: Mapping[str, Any], device=None):
    if method == "dense":
        return nn.Linear(in_features, out_features, device=device)
    from compressed_transformer.layers import build_linear  # the compression library, imported only when needed

    try:
        return build_linear(method, in_features, out_features, True, device=device, **dict(options))
    except (ValueError, TypeError, RuntimeError) as error:
        raise ValueError(
            f"FFN method {method!r} with options {dict(options)} does not fit a {in_features} -> {out_features} "
            f"linear layer: {error}"
        ) from error


def fc2_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """FFN options for ``fc2`` (``d_ff -> d_model``): ``in_modes`` and ``out_modes``, given for ``fc1``, swapped."""
    out = {k: v for k, v in options.items() if k not in ("in_modes", "out_modes")}
    if "out_modes" in options:
        out["in_modes"] = options["out_modes"]
    if "in_modes" in options:
        out["out_modes"] = options["in_modes"]
    return out


class FeedForward(nn.Module):
    """Position-wise feed-forward block ``fc2(dropout(relu(fc1(x))))``; ``fc1`` and ``fc2`` may be compressed.

    Args:
        d_model: input and output width.
        d_ff: hidden width.
        dropout: dropout on the hidden activation.
        method: compression method of both linears (see :data:`FFN_METHODS`).
        options: keyword options for the method's layer. ``in_modes`` / ``out_modes`` describe ``fc1``
            (``d_model -> d_ff``); ``fc2`` gets them swapped.

    Raises:
        ValueError: if the method or its options do not fit ``d_model`` / ``d_ff``.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        dropout: float = 0.0,
        method: str = "dense",
        options: Mapping[str, Any] | None = None,
        *,
        device=None,
    ) -> None:
        super().__init__()
        options = dict(options or {})
        self.method = method
        self.fc1 = _build_linear(method, d_model, d_ff, options, device)
        self.fc2 = _build_linear(method, d_ff, d_model, fc2_options(options), device)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., d_model) -> (..., d_model)``."""
        return self.fc2(self.dropout(F.relu(self.fc1(x))))

    def extra_repr(self) -> str:
        return f"method={self.method}"


class MultiHeadAttention(nn.Module):
    """Multi-head attention with fused ``scaled_dot_product_attention`` and an optional key/value cache.

    Args:
        d_model: model width.
        heads: number of heads.
        dropout: dropout on the attention weights (training only).
    """

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.heads, width // self.heads).transpose(1, 2)  # (B, h, L, hd)

    def project_kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``source`` ``(B, S, d_model)``, each ``(B, h, S, hd)``."""
        return self._split(self.k_proj(source)), self._split(self.v_proj(source))

    def forward(
        self,
        query: torch.Tensor,
        key_value: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attend from ``query`` ``(B, T, d)`` to ``key_value`` ``(B, S, d)`` (or precomputed ``kv``).

        Args:
            query: ``(B, T, d_model)``.
            key_value: ``(B, S, d_model)``; ``None`` with ``kv`` given.
            mask: boolean ``(B, 1, 1 or T, S)``, ``True`` where attention is allowed.
            causal: position ``t`` sees only keys ``<= t`` (needs ``T == S``).
            kv: precomputed keys and values ``(B, h, S, hd)``.

        Returns:
            ``(B, T, d_model)``.
        """
        q = self._split(self.q_proj(query))  # (B, h, T, hd)
        k, v = kv if kv is not None else self.project_kv(key_value)  # (B, h, S, hd)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal
        )  # (B, h, T, hd)
        batch, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))  # (B, T, d)


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each wrapped in dropout, residual and LayerNorm (pre or post)."""

    def __init__(self, config: TransformerConfig, ffn_method: str, ffn_options: Mapping[str, Any]) -> None:
        super().__init__()
        self.norm_first = config.norm_first
        self.self_attn = MultiHeadAttention(config.d_model, config.heads, config.attn_dropout)
        self.ffn = FeedForward(config.d_model, config.d_ff, config.ffn_dropout, ffn_method, ffn_options)
        self.norm1 = nn.LayerNorm(config.d_model)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, S, d)``; ``mask``: ``(B, 1, 1, S)`` True at real tokens."""
        if self.norm_first:
            h = self.norm1(x)
            x = x + self.dropout(self.self_attn(h, h, mask=mask))
            return x + self.dropout(self.ffn(self.norm2(x)))
        x = self.norm1(x + self.dropout(self.self_attn(x, x, mask=mask)))
        return self.norm2(x + self.dropout(self.ffn(x)))


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder output, feed-forward."""

    def __init__(self, config: TransformerConfig, ffn_method: str, ffn_options: Mapping[str, Any]) -> None:
        super().__init__()
        self.norm_first = config.norm_first
        self.self_attn = MultiHeadAttention(config.d_model, config.heads, config.attn_dropout)
        self.cross_attn = MultiHeadAttention(config.d_model, config.heads, config.attn_dropout)
        self.ffn = FeedForward(config.d_model, config.d_ff, config.ffn_dropout, ffn_method, ffn_options)
        self.norm1 = nn.LayerNorm(config.d_model)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.norm3 = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def _self_attn(self, h: torch.Tensor, cache: dict[str, torch.Tensor] | None) -> torch.Tensor:
        if cache is None:
            return self.self_attn(h, h, causal=True)
        # Incremental decoding: h holds only the newest position, which may see every cached one.
        k, v = self.self_attn.project_kv(h)  # (B, h, 1, hd)
        if "self_k" in cache:
            k, v = torch.cat([cache["self_k"], k], dim=2), torch.cat([cache["self_v"], v], dim=2)
        cache["self_k"], cache["self_v"] = k, v
        return self.self_attn(h, kv=(k, v))

    def _cross_attn(self, h: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        if cache is None:
            return self.cross_attn(h, memory, mask=mask)
        if "cross_k" not in cache:
            cache["cross_k"], cache["cross_v"] = self.cross_attn.project_kv(memory)
        return self.cross_attn(h, mask=mask, kv=(cache["cross_k"], cache["cross_v"]))

    def forward(
        self,
        y: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        cache: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``y``: ``(B, T, d)``; ``memory``: ``(B, S, d)``; ``memory_mask``: ``(B, 1, 1, S)``."""
        if self.norm_first:
            y = y + self.dropout(self._self_attn(self.norm1(y), cache))
            y = y + self.dropout(self._cross_attn(self.norm2(y), memory, memory_mask, cache))
            return y + self.dropout(self.ffn(self.norm3(y)))
        y = self.norm1(y + self.dropout(self._self_attn(y, cache)))
        y = self.norm2(y + self.dropout(self._cross_attn(y, memory, memory_mask, cache)))
        return self.norm3(y + self.dropout(self.ffn(y)))


def sinusoidal_positions(length: int, width: int) -> torch.Tensor:
    """The ``(length, width)`` table ``PE[p, 2i] = sin(p / 10000^(2i/width))``, ``PE[p, 2i+1] = cos(...)``."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


# The attention projections' qualified names (a ``compress_`` filter).
ATTENTION_PROJECTIONS = r"(self_attn|cross_attn)\.(q|k|v|out)_proj$"


class Transformer(nn.Module):
    """Encoder-decoder Transformer for translation.

    Args:
        config: the :class:`TransformerConfig`; its ``ffn`` spec decides how each FFN block is built.

    Raises:
        ValueError: if the FFN spec does not fit ``d_model`` / ``d_ff`` or names blocks that do not exist.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        enc_blocks, dec_blocks = resolve_blocks(config.ffn.blocks, config.enc_layers, config.dec_layers)
        spec = config.ffn

        def ffn_args(index: int, chosen: tuple[int, ...]) -> tuple[str, Mapping[str, Any]]:
            return (spec.method, spec.options) if index in chosen else ("dense", {})

        self.src_embed = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_id)
        self.tgt_embed = (
            self.src_embed
            if config.share_embeddings
            else nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_id)
        )
        self.register_buffer("positions", sinusoidal_positions(config.max_positions, config.d_model), persistent=False)
        self.encoder = nn.ModuleList(EncoderLayer(config, *ffn_args(i, enc_blocks)) for i in range(config.enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(config, *ffn_args(i, dec_blocks)) for i in range(config.dec_layers))
        self.enc_norm = nn.LayerNorm(config.d_model) if config.norm_first else nn.Identity()
        self.dec_norm = nn.LayerNorm(config.d_model) if config.norm_first else nn.Identity()
        self.output = None if config.tie_output else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform dense linears, ``N(0, d_model^-1/2)`` embeddings; compressed layers keep their own init."""
        for module in self.modules():
            if type(module) is nn.Linear:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for embed in {id(e): e for e in (self.src_embed, self.tgt_embed)}.values():
            nn.init.normal_(embed.weight, std=self.config.d_model**-0.5)
            with torch.no_grad():
                embed.weight[self.config.pad_id].zero_()

    def compress_attention_(self, method: str, **options: Any) -> Transformer:
        """Compress every attention projection (``q``, ``k``, ``v``, ``out`` of self- and cross-attention, the
        modules :data:`ATTENTION_PROJECTIONS` selects) with :func:`~compressed_transformer.compress.compress_`
        (any method, e.g. ``"svd"`` with ``rank=``, or ``ratio=``), in place. Returns ``self``.

        Raises:
            ValueError: for an unknown method or bad options (the model is then unchanged).
        """
        from compressed_transformer.compress import compress_  # the library, when needed

        compress_(self, method, filter=ATTENTION_PROJECTIONS, **options)
        return self

    def compress_embeddings_(self, method: str, **options: Any) -> Transformer:
        """Replace the embedding table(s) by compressed ones, in place (:func:`~compressed_transformer.compress.
        compress_embeddings_`: ``"svd"`` with ``rank=``, ``"tt"`` with ``ranks=`` / ``eps=``): a shared source /
        target table stays one module, the tied logits go through its factors or cores (``attend``), and a separate
        output projection (``tie_output=False``) gets the same method (``svd`` of ``rank``, ``tt`` of ``ranks`` /
        ``eps`` over the target table's modes, or either at ``ratio=``). Returns ``self``.

        Raises:
            ValueError: for an unknown method or bad options (the model is then unchanged).
        """
        from compressed_transformer.compress import compress_, compress_embeddings_  # the library, when needed

        tables = self.src_embed, self.tgt_embed
        compress_embeddings_(self, method, filter=r"^(src|tgt)_embed$", **options)
        if self.output is not None:
            linear = {k: v for k, v in options.items() if k in ("rank", "ranks", "eps", "ratio")}
            if method == "tt":  # the target table's modes (a vocabulary that factorises badly is padded the same way)
                linear |= {"in_modes": self.tgt_embed.emb_modes, "out_modes": self.tgt_embed.voc_modes}
            try:
                compress_(self, method, filter=r"^output$", **linear)
            except ValueError:
                self.src_embed, self.tgt_embed = tables  # compress_ left the output alone: undo the tables too
                raise
        return self

    def _embed(self, embed: nn.Embedding, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"expected token ids of shape (batch, length) with length >= 1, got {tuple(tokens.shape)}")
        length = tokens.shape[1]
        if offset + length > self.config.max_positions:
            raise ValueError(f"sequence of {offset + length} tokens exceeds max_positions={self.config.max_positions}")
        x = embed(tokens) * math.sqrt(self.config.d_model) + self.positions[offset : offset + length]
        return self.dropout(x)  # (B, L, d)

    def padding_mask(self, src: torch.Tensor) -> torch.Tensor:
        """Boolean ``(B, 1, 1, S)``, ``True`` at real (non-pad) source tokens."""
        return (src != self.config.pad_id)[:, None, None, :]

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode source ids ``(B, S)``; returns ``memory`` ``(B, S, d)`` and its mask ``(B, 1, 1, S)``."""
        x = self._embed(self.src_embed, src)
        mask = self.padding_mask(src)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.enc_norm(x), mask

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., d) -> (..., vocab)``."""
        if self.output is None and hasattr(self.tgt_embed, "attend"):  # a compressed table: through its factors
            return self.tgt_embed.attend(hidden)
        if self.output is None:
            return F.linear(hidden, self.tgt_embed.weight)
        return self.output(hidden)

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        """Teacher-forced decoding: ``tgt_in`` ``(B, T)`` -> logits ``(B, T, vocab)``."""
        y = self._embed(self.tgt_embed, tgt_in)
        for layer in self.decoder:
            y = layer(y, memory, memory_mask)
        return self.logits(self.dec_norm(y))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Source ids ``(B, S)`` and shifted target ids ``(B, T)`` (starting with BOS) -> logits ``(B, T, vocab)``."""
        memory, mask = self.encode(src)
        return self.decode(tgt_in, memory, mask)

    def decode_step(
        self,
        tokens: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        cache: KVCache | None,
        step: int,
    ) -> tuple[torch.Tensor, KVCache]:
        """One incremental decoding step with a key/value cache.

        Args:
            tokens: the newest target ids ``(B,)`` (BOS at ``step == 0``).
            memory: encoder output ``(B, S, d)``.
            memory_mask: ``(B, 1, 1, S)``.
            cache: ``None`` at step 0, then what the previous call returned.
            step: position of ``tokens``.

        Returns:
            Log-probabilities ``(B, vocab)`` of the next token, and the updated cache.
        """
        if cache is None:
            cache = [{} for _ in self.decoder]
        y = self._embed(self.tgt_embed, tokens[:, None], offset=step)  # (B, 1, d)
        for layer, layer_cache in zip(self.decoder, cache, strict=True):
            y = layer(y, memory, memory_mask, layer_cache)
        return F.log_softmax(self.logits(self.dec_norm(y[:, -1])).float(), dim=-1), cache

    @staticmethod
    def reorder_cache(cache: KVCache, index: torch.Tensor) -> KVCache:
        """Select rows ``index`` ``(B',)`` of every cached tensor (beam search reordering)."""
        return [{name: t.index_select(0, index) for name, t in layer.items()} for layer in cache]

    def loss(self, logits: torch.Tensor, target: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """Label-smoothed cross-entropy of ``logits`` ``(B, T, V)`` against ``target`` ``(B, T)``, pads ignored."""
        return F.cross_entropy(
            logits.float().flatten(0, 1),
            target.flatten(),
            ignore_index=self.config.pad_id,
            label_smoothing=self.config.label_smoothing,
            reduction=reduction,
        )


def ffn_module_names(config: TransformerConfig) -> list[str]:
    """Qualified names of the FFN linears that ``config.ffn.blocks`` selects, e.g. ``encoder.0.ffn.fc1``."""
    enc, dec = resolve_blocks(config.ffn.blocks, config.enc_layers, config.dec_layers)
    names = [f"encoder.{i}.ffn.{fc}" for i in enc for fc in ("fc1", "fc2")]
    return names + [f"decoder.{i}.ffn.{fc}" for i in dec for fc in ("fc1", "fc2")]


def _stored(module: nn.Module) -> int:
    try:
        from compressed_transformer.size import stored_params
    except ImportError:
        return sum(p.numel() for p in module.parameters())
    return int(stored_params(module))


def parameter_report(model: Transformer) -> dict[str, int]:
    """Stored parameter counts: ``total``, ``ffn`` (all FFN blocks), ``embeddings`` and ``other``.

    Compressed layers count what they store (factor entries, non-zeros), via ``compressed_transformer.size``.
    """
    total = _stored(model)
    ffn = sum(_stored(layer.ffn) for layer in [*model.encoder, *model.decoder])
    embeddings = sum(_stored(e) for e in {id(e): e for e in (model.src_embed, model.tgt_embed)}.values())
    return {"total": total, "ffn": ffn, "embeddings": embeddings, "other": total - ffn - embeddings}
