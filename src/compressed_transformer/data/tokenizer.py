"""Joint source/target subword tokenizer: a thin wrapper over sentencepiece (BPE or unigram).

Ids are fixed: ``pad=0``, ``unk=1``, ``bos=2``, ``eos=3``. The trained model is cached beside the run as
``spm.model`` together with ``spm.json`` (its settings and a digest of the training text), and its bytes travel
inside every checkpoint so that a checkpoint alone can translate.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "UNK_ID", "Tokenizer", "load_or_train_tokenizer", "train_tokenizer"]

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_DROPPED = frozenset((PAD_ID, BOS_ID, EOS_ID))  # ids that decode() leaves out


class Tokenizer:
    """Encode text to ids and decode ids to detokenised text.

    Args:
        model_proto: the serialised sentencepiece model.

    Raises:
        ValueError: for bytes that are not a sentencepiece model, or one with other special ids.
    """

    def __init__(self, model_proto: bytes) -> None:
        self.model_proto = bytes(model_proto)
        if not self.model_proto:
            raise ValueError("not a sentencepiece model (0 bytes)")
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        except RuntimeError as error:  # sentencepiece's parse error
            raise ValueError(f"not a sentencepiece model ({len(self.model_proto)} bytes): {error}") from None
        if (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id()) != (
            PAD_ID,
            UNK_ID,
            BOS_ID,
            EOS_ID,
        ):
            raise ValueError("sentencepiece model must use pad=0, unk=1, bos=2, eos=3; retrain it with train_tokenizer")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """The tokenizer saved at ``path``.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            ValueError: naming ``path``, if it is not a sentencepiece model with this class's special ids.
        """
        try:
            return cls(Path(path).read_bytes())
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.model_proto)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Subword ids of ``text``, without BOS/EOS."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        """Detokenised text of ``ids``; pad, BOS and EOS are dropped, an unknown piece (``unk``) is kept as
        sentencepiece writes it (`` ⁇ ``), as a wrong word rather than a silent gap in a scored hypothesis."""
        return self._sp.decode([i for i in ids if i not in _DROPPED])

    def decode_batch(self, batch: Iterable[Sequence[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8000, model_type: str = "bpe", seed: int = 0) -> Tokenizer:
    """Train a joint sentencepiece model on ``texts`` (source and target sentences together).

    Args:
        texts: training sentences.
        vocab_size: number of pieces, special tokens included (an upper bound: a small text may give fewer).
        model_type: ``bpe`` or ``unigram``.
        seed: unused by BPE; recorded for unigram's sampling (which sentencepiece seeds itself).

    Raises:
        ValueError: for an unknown model type, no non-empty text, or a vocabulary smaller than the special ids plus
            the distinct characters of the text.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"sentencepiece model_type must be 'bpe' or 'unigram', got {model_type!r}")
    del seed
    texts = list(texts)
    if not any(text.strip() for text in texts):
        raise ValueError(f"no text to train the tokenizer on ({len(texts)} sentences, all empty)")
    too_small = (
        f"vocab_size={vocab_size} is too small: it needs the 4 special ids plus every distinct character of the text"
    )
    if vocab_size <= 4:
        raise ValueError(too_small)
    stream = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=stream,
            vocab_size=vocab_size,
            hard_vocab_limit=False,  # small corpora get fewer pieces instead of an error
            model_type=model_type,
            character_coverage=1.0,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as error:
        if "required_chars" in str(error):
            raise ValueError(f"{too_small} (sentencepiece: {error})") from None
        raise ValueError(f"sentencepiece training failed ({error})") from error
    return Tokenizer(stream.getvalue())


def load_or_train_tokenizer(
    directory: str | Path, texts: Sequence[str], vocab_size: int, model_type: str = "bpe"
) -> Tokenizer:
    """Reuse ``directory/spm.model`` if it was trained with the same settings on the same text, else train it."""
    directory = Path(directory)
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    settings = {"vocab_size": vocab_size, "model_type": model_type, "text_sha256": digest}
    model_path, meta_path = directory / "spm.model", directory / "spm.json"
    if model_path.exists() and meta_path.exists():
        try:
            cached = json.loads(meta_path.read_text()) == settings
        except json.JSONDecodeError:  # cut short by an interrupted run: train again
            cached = False
        if cached:
            return Tokenizer.load(model_path)
    tokenizer = train_tokenizer(texts, vocab_size, model_type)
    directory.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # no spm.json may vouch for a model being replaced, if this is interrupted
    tokenizer.save(model_path)
    meta_path.write_text(json.dumps(settings, indent=1) + "\n")
    return tokenizer
