"""Parallel German-English corpora: Multi30k (task 1) and IWSLT'14 de-en, read, checked and (when online) fetched.

Layouts under a user-chosen data directory (see ``/work/shared/data/*/SOURCES.md``):

* **Multi30k**: ``{train,val,test_2016_flickr}.{de,en}[.gz]`` (the multi30k/dataset ``data/task1/raw`` files).
* **IWSLT'14, fairseq layout**: ``{train,valid,test}.{de,en}[.gz]`` as written by fairseq's
  ``prepare-iwslt14.sh`` (Moses-tokenised, lowercased; ``@@ `` BPE markers, if any, are removed), in the data
  directory or its ``fairseq_tok/``, ``fairseq/``, ``iwslt14.tokenized.de-en/`` or ``fairseq_bpe/`` subfolder (each
  split from the first of these that holds it).
* **IWSLT'14, raw layout**: the release's ``train.tags.de-en.{de,en}`` (TED metadata tag lines skipped, title and
  description text kept, as fairseq does) and the ``IWSLT14.TED*.de-en.{de,en}.xml[.gz]`` dev/test files, in the
  data directory or its ``raw/``, ``de-en/`` or ``orig/de-en/`` subfolder. The layout holding training text wins,
  so the raw release unpacked beside fairseq's dev/test-only files (``/work/shared``'s) is used whole. Validation
  is every 23rd training pair (fairseq's rule; fairseq applies it after Moses tokenisation and its length / ratio
  cleaning, which the raw text has not had, so these are not fairseq's 7,283 pairs: use the fairseq layout for that
  split), test the concatenation dev2010, TEDX.dev2012, tst2010, tst2011, tst2012 (6,750 pairs).

Every reader checks that both sides have the same number of lines; files listed in ``SOURCES.md`` are checked against
their sha256 and line counts; empty pairs are skipped and counted, never silently.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import http.client
import io
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DATASETS",
    "ParallelCorpus",
    "download",
    "load_dataset",
    "read_lines",
    "read_pair",
    "read_ted_tags",
    "read_xml_segments",
    "split_lines",
]

MULTI30K_URL = "https://github.com/multi30k/dataset/raw/master/data/task1/raw/{name}.gz"
IWSLT14_URL = "http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"

# sha256 of the file as stored (gzip, from SOURCES.md) and of its uncompressed content (so that a file that was
# unpacked or packed again is still recognised), and line counts.
KNOWN_FILES: dict[str, tuple[set[str], int]] = {
    "train.de": (
        {
            "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
            "2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72",
        },
        29000,
    ),
    "train.en": (
        {
            "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
            "460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6",
        },
        29000,
    ),
    "val.de": (
        {
            "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
            "660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660",
        },
        1014,
    ),
    "val.en": (
        {
            "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
            "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227",
        },
        1014,
    ),
    "test_2016_flickr.de": (
        {
            "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
            "4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16",
        },
        1000,
    ),
    "test_2016_flickr.en": (
        {
            "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
            "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182",
        },
        1000,
    ),
}
IWSLT_KNOWN: dict[str, tuple[set[str], int]] = {
    "fairseq_tok/test.de": (
        {
            "fc73c9a37732d08c8f9218f1fbabe6eb0d6bae183b0d2efa5e5a8f28dbe530c8",
            "e718c783e33160b7d72af8f733756a466e0d0c016eff8ab624c1b0d1d01cbbdf",
        },
        6750,
    ),
    "fairseq_tok/test.en": (
        {
            "f4a8cd543199bc7df41caf5c0a3d359bb0db367280fdbdae6140fd53a628005f",
            "4b127beb9050511a3e6209cd837ff36f623a3a423666b32aba6e208b7330cf4c",
        },
        6750,
    ),
    "fairseq_tok/valid.de": (
        {
            "b1da9c6171df1ef72cd06dae66197e326bc63ec3d23cf6dc4340b419b6e5ac47",
            "3f051579c9d8c7281a6ea8c72ad4ae09dbaa9bb24dfd41166f2c3a3df7cd940a",
        },
        7283,
    ),
    "fairseq_tok/valid.en": (
        {
            "ac59d064bb5832c71e0c0dd28c63fb70a1dd585312db134fdcf63ab450749397",
            "e6d7317a9772cd1ed970910c611e9e7dada1f34439269b44a9d801334bff948d",
        },
        7283,
    ),
    "fairseq_bpe/test.de": (
        {
            "d67f3f60659bf522d2cf46a808a2d1370a9bb946d8b8b9417bfbe9ad25b5d310",
            "0bca28e500495a4a9694ae134b0ae35526a280cb0966abbcf3c9af3edc3dfe10",
        },
        6750,
    ),
    "fairseq_bpe/test.en": (
        {
            "349351d6bd5e73899006271c4f5dcaf6be6e93df75b585d6068206e16e23f606",
            "c2951533a0b03557599978ea1726c440bdbb8210454d1e9ef3b87c2b6228ac43",
        },
        6750,
    ),
    "fairseq_bpe/valid.de": (
        {
            "2ad0ad2b67d545a50c01bb22dee054b61cb33c59ffac423577c298515a3fa14c",
            "27660c689b99b54f0f858775527ff351c520f7581be90aac84b6d16f14624c9e",
        },
        7283,
    ),
    "fairseq_bpe/valid.en": (
        {
            "4ab6d0dbd0598c60bd7f7d84bf47c7cb0dff82fe31071c4ca1cec245847be44d",
            "1b1f2246625cc907fbd9c8195776434b24687c3fc4e068c6f3d3ec542846823f",
        },
        7283,
    ),
}
# sha256 of the release's dev/test XML files (gzipped as in SOURCES.md, and uncompressed), by set and language.
IWSLT_RAW_KNOWN: dict[str, set[str]] = {
    "TED.dev2010.de": {
        "157b184cbd3cf748439ed397e0673bd2229f33b95a9600301c996da73be45416",
        "6bb2e8272bc49a4f19df2150a482a1b856fa6a2d6b289d3a80ac6b4ff66070fe",
    },
    "TED.dev2010.en": {
        "b753294b6817474672eec2c40f6caaf327ec9c80d565840021a36ff9b0d9c2a9",
        "5c860ebb64d4ecdc65800c7ba59732d27cff8b296fa7eeafbcd4614a2c572700",
    },
    "TED.tst2010.de": {
        "0f5402387805da7959de0a525a1bc02c67a89cdb402bd23f612595cf4f67b707",
        "5648c0a3a6e5eb3ab6fbdfbdeca69a20a1637a37361e337ab47418d71972880d",
    },
    "TED.tst2010.en": {
        "02e5c2c5f67325766f4b1e81c17c05e17d707bd6fdb1321f912e59fafea843e5",
        "fa9ce190959320cb5a5a68358ad793e5863621f87a28e9f4312110ac5b842efc",
    },
    "TED.tst2011.de": {
        "0bc0efcfff455de92e6f7597425b7eea3bd33ee54071fb6234033f8ab36fcbd0",
        "a70163216273ab5622cbbb19fea6dfde42ab6d3ad70374444323e65f71837735",
    },
    "TED.tst2011.en": {
        "db687386e95a0098a3c3ae1997d9ac244910ac21d2662d771c0d554363466c3f",
        "d350eac4cb6f0cf3e787c9e82b8074bdc7e58c4ca7d650c9b97de8a677068695",
    },
    "TED.tst2012.de": {
        "9b71a34d313fc35bb7186d2daf13361dceee3fd3db7407fad885eb11cc4aeeff",
        "edf69bd9e41acd93e13d01f55a2906b7be0f69cd90a46e343294dfd3190db952",
    },
    "TED.tst2012.en": {
        "fe65e05a84ae6033343a4e21b490bc0599c9e0c7fcc256bf3974d5321c4e4861",
        "cd73e997ce078699863278daef06b9a226d1adbec4c3cac91a0894d7eab5c1f8",
    },
    "TEDX.dev2012.de": {
        "3a672acb319e45f2a9ad9509542fa1e10786197c9cc6ecfe3ff0f83991d9510c",
        "e818a77a43e18ec4726a698e5aa9c438e0cd4b82d4edd27286163bee44e85604",
    },
    "TEDX.dev2012.en": {
        "3b1d9b6e947ed64051ba7c6fb104b4b4f57c63bb3e6c402fff0499a9ae705453",
        "a5de03e0e18cf5ad4b2b4ba66f11510a8576fa1a7c172190860cabfd17bff99a",
    },
}
IWSLT_TEST_SETS = ("TED.dev2010", "TEDX.dev2012", "TED.tst2010", "TED.tst2011", "TED.tst2012")
IWSLT_SEGMENTS = {
    "TED.dev2010": 887,
    "TEDX.dev2012": 1165,
    "TED.tst2010": 1565,
    "TED.tst2011": 1433,
    "TED.tst2012": 1700,
}
# fairseq's prepare-iwslt14.sh drops these metadata lines and keeps the text inside <title> and <description>.
_TED_DROP = re.compile(r"^\s*<(url|talkid|keywords|speaker|reviewer|translator|doc|/doc|head|/head)\b")
_TED_KEEP = re.compile(r"^\s*<(title|description)>(.*?)</\1>\s*$")
_SEG = re.compile(r"<seg[^>]*>(.*?)</seg>")


@dataclass
class ParallelCorpus:
    """Aligned source/target sentences plus a record of what was skipped while reading."""

    src: list[str]
    tgt: list[str]
    name: str = ""
    skipped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.src) != len(self.tgt):
            raise ValueError(f"{self.name}: {len(self.src)} source but {len(self.tgt)} target sentences")

    def __len__(self) -> int:
        return len(self.src)

    def drop_empty(self) -> ParallelCorpus:
        """Remove pairs where either side is empty, counting them in ``skipped["empty"]``."""
        keep = [i for i, (s, t) in enumerate(zip(self.src, self.tgt, strict=True)) if s.strip() and t.strip()]
        skipped = dict(self.skipped)
        if len(keep) != len(self):
            skipped["empty"] = skipped.get("empty", 0) + len(self) - len(keep)
        return ParallelCorpus([self.src[i] for i in keep], [self.tgt[i] for i in keep], self.name, skipped)

    def describe(self) -> str:
        skipped = ", ".join(f"{v} {k}" for k, v in self.skipped.items() if v)
        return f"{self.name}: {len(self)} pairs" + (f" (skipped {skipped})" if skipped else "")


def _open_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error}") from error
    if path.suffix == ".gz":
        if not data:
            raise ValueError(f"{path} is empty (0 bytes), not a gzip file; re-download or re-compress it")
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as error:
            raise ValueError(f"{path} is not a valid gzip file ({error}); re-download or re-compress it") from error
    return data


def read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file (``.gz`` decompressed), without line endings.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not valid gzip or not UTF-8 (the message gives the line number).
    """
    path = Path(path)
    data = _open_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 text (bad byte at line {line}); convert it with iconv") from None
    return split_lines(text)


def split_lines(text: str) -> list[str]:
    """``text`` cut at ``\\n`` only (``\\r\\n`` endings and a leading byte-order mark removed): one entry per line of a
    one-sentence-per-line file, unlike ``str.splitlines``, which also cuts at form feeds, U+2028 and other
    separators that may occur inside a sentence."""
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def read_ted_tags(path: str | Path) -> list[str]:
    """Sentences of an IWSLT ``train.tags.*`` file: metadata tag lines skipped, title/description text kept."""
    out = []
    for line in read_lines(path):
        if _TED_DROP.match(line):
            continue
        keep = _TED_KEEP.match(line)
        if keep:
            out.append(keep.group(2).strip())
        elif line.lstrip().startswith("<"):
            continue  # any other metadata tag line
        else:
            out.append(line.strip())
    return out


def read_xml_segments(path: str | Path) -> list[str]:
    """The ``<seg id=..>`` texts of an IWSLT ``.xml`` dev/test file, in order, XML entities decoded."""
    segments = [html.unescape(m.group(1)).strip() for m in _SEG.finditer("\n".join(read_lines(path)))]
    if not segments:
        raise ValueError(f"{path} has no <seg> elements; is it an IWSLT .xml dev/test file?")
    return segments


def read_pair(src_path: str | Path, tgt_path: str | Path, name: str = "", reader=read_lines) -> ParallelCorpus:
    """Read aligned files and check their line counts; empty pairs are dropped and counted.

    Raises:
        ValueError: if the two sides have different numbers of lines, or no non-empty pair (or see
            :func:`read_lines`).
    """
    src, tgt = reader(src_path), reader(tgt_path)
    if len(src) != len(tgt):
        raise ValueError(
            f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; the two sides must be line-aligned"
        )
    corpus = ParallelCorpus(src, tgt, name or str(src_path)).drop_empty()
    if not len(corpus):
        raise ValueError(
            f"{src_path} and {tgt_path} hold no sentence pairs ({len(src)} lines, each empty on one side or both)"
        )
    return corpus


def _find(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _sha256(path: Path, uncompressed: bool) -> str:
    data = gzip.decompress(path.read_bytes()) if uncompressed else path.read_bytes()
    return hashlib.sha256(data).hexdigest()


def _verify(path: Path, known: tuple[set[str], int] | None, lines: int) -> None:
    if known is None:
        return
    digests, count = known
    if lines != count:
        raise ValueError(f"{path} has {lines} lines, expected {count}; the file is truncated or not the release file")
    _verify_sha256(path, digests)


def _verify_sha256(path: Path, digests: set[str]) -> None:
    if (
        digests
        and _sha256(path, False) not in digests
        and not (path.suffix == ".gz" and _sha256(path, True) in digests)
    ):
        raise ValueError(f"{path} does not match the sha256 in SOURCES.md; re-download it")


def _multi30k(data_dir: Path, split: str, src_lang: str, tgt_lang: str) -> ParallelCorpus:
    stem = {"train": "train", "valid": "val", "val": "val", "test": "test_2016_flickr"}.get(split, split)
    paths = {lang: _find(data_dir, f"{stem}.{lang}") for lang in (src_lang, tgt_lang)}
    missing = [f"{stem}.{lang}[.gz]" for lang, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(
            f"Multi30k files missing in {data_dir}: {', '.join(missing)}. Put the multi30k/dataset "
            f"data/task1/raw/*.gz files there, or pass --download to fetch them from {MULTI30K_URL.format(name='...')}"
        )
    corpus = read_pair(paths[src_lang], paths[tgt_lang], f"multi30k/{stem}")
    for lang in (src_lang, tgt_lang):
        _verify(paths[lang], KNOWN_FILES.get(f"{stem}.{lang}"), len(corpus) + corpus.skipped.get("empty", 0))
    return corpus


def _strip_bpe(lines: list[str]) -> list[str]:
    return [re.sub(r"@@( |$)", "", line) for line in lines]


_IWSLT_DIRS = {
    "fairseq": (".", "fairseq_tok", "fairseq", "iwslt14.tokenized.de-en", "fairseq_bpe"),
    "raw": (".", "raw", "de-en", "orig/de-en"),
}
_IWSLT_TRAIN = {"fairseq": "train", "raw": "train.tags.de-en"}  # each layout's training text, ``STEM.{de,en}``


def _iwslt_layout(data_dir: Path) -> tuple[str, Path]:
    """The layout (``fairseq`` or ``raw``) and its folder: the first one holding training text, else the first
    holding any IWSLT'14 file, so that training text added beside dev/test-only files of the other layout is used."""
    for layout, subs in _IWSLT_DIRS.items():
        for sub in subs:
            if _find(data_dir / sub, f"{_IWSLT_TRAIN[layout]}.de"):
                return layout, data_dir / sub
    for sub in _IWSLT_DIRS["fairseq"]:
        if any(_find(data_dir / sub, f"{split}.de") for split in ("valid", "test")):
            return "fairseq", data_dir / sub
    for sub in _IWSLT_DIRS["raw"]:
        if list((data_dir / sub).glob("IWSLT14.*.xml*")):
            return "raw", data_dir / sub
    raise FileNotFoundError(
        f"no IWSLT'14 de-en files found in {data_dir}. Put fairseq's prepared train/valid/test.{{de,en}} there "
        f"(or in {data_dir}/fairseq_tok), or the raw de-en.tgz contents (train.tags.de-en.*, IWSLT14.*.xml) in "
        f"{data_dir}/raw; pass --download to fetch {IWSLT14_URL}"
    )


def _iwslt_dir(data_dir: Path, layout: str, root: Path, stem: str) -> Path:
    """``root`` if it holds ``stem``, else the first other folder of the layout that does (else ``root``)."""
    for folder in (root, *(data_dir / sub for sub in _IWSLT_DIRS[layout])):
        if _find(folder, stem):
            return folder
    return root


def _iwslt(data_dir: Path, split: str, src_lang: str, tgt_lang: str) -> ParallelCorpus:
    layout, root = _iwslt_layout(data_dir)
    split = {"val": "valid", "dev": "valid"}.get(split, split)
    if layout == "fairseq":
        root = _iwslt_dir(data_dir, layout, root, f"{split}.{src_lang}")
        paths = {lang: _find(root, f"{split}.{lang}") for lang in (src_lang, tgt_lang)}
        missing = [f"{root / split}.{lang}" for lang, p in paths.items() if p is None]
        if missing:
            hint = (
                " (IWSLT'14's training text is not in /work/shared/data; see its SOURCES.md)"
                if split == "train"
                else ""
            )
            raise FileNotFoundError(f"IWSLT'14 files missing: {', '.join(missing)}{hint}")
        corpus = read_pair(paths[src_lang], paths[tgt_lang], f"iwslt14/{split}")
        bpe = any("@@ " in line for line in corpus.src[:100])
        if bpe:
            corpus = ParallelCorpus(_strip_bpe(corpus.src), _strip_bpe(corpus.tgt), corpus.name, corpus.skipped)
        # checked as the release file of its kind (tokenised, or tokenised and BPE'd), wherever it lies
        kind = "fairseq_bpe" if bpe else "fairseq_tok"
        for lang in (src_lang, tgt_lang):
            key = f"{kind}/{split}.{lang}"
            _verify(paths[lang], IWSLT_KNOWN.get(key), len(corpus) + corpus.skipped.get("empty", 0))
        return corpus
    if split in ("train", "valid"):
        paths = {lang: _find(root, f"train.tags.de-en.{lang}") for lang in (src_lang, tgt_lang)}
        missing = [f"{root}/train.tags.de-en.{lang}" for lang, p in paths.items() if p is None]
        if missing:
            raise FileNotFoundError(
                f"IWSLT'14 training files missing: {', '.join(missing)}; unpack {IWSLT14_URL} there "
                "(this machine's /work/shared/data/iwslt14 has only the dev/test sets)"
            )
        full = read_pair(paths[src_lang], paths[tgt_lang], f"iwslt14/{split}", reader=read_ted_tags)
        # fairseq's rule: every 23rd pair (1-based line 23, 46, ...) is held out for validation. fairseq counts the
        # lines after cleaning (clean-corpus-n: 1-175 Moses tokens, length ratio <= 1.5), so its split differs.
        keep = [i for i in range(len(full)) if (i % 23 == 22) == (split == "valid")]
        return ParallelCorpus([full.src[i] for i in keep], [full.tgt[i] for i in keep], full.name, full.skipped)
    if split != "test":
        raise ValueError(f"unknown IWSLT'14 split {split!r}; use train, valid or test")
    src: list[str] = []
    tgt: list[str] = []
    empty = 0
    for name in IWSLT_TEST_SETS:
        root = _iwslt_dir(data_dir, layout, root, f"IWSLT14.{name}.de-en.{src_lang}.xml")
        files = {lang: _find(root, f"IWSLT14.{name}.de-en.{lang}.xml") for lang in (src_lang, tgt_lang)}
        missing = [f"IWSLT14.{name}.de-en.{lang}.xml[.gz]" for lang, p in files.items() if p is None]
        if missing:
            raise FileNotFoundError(f"IWSLT'14 test files missing in {root}: {', '.join(missing)}")
        part = read_pair(files[src_lang], files[tgt_lang], name, reader=read_xml_segments)
        if len(part) + part.skipped.get("empty", 0) != IWSLT_SEGMENTS[name]:
            raise ValueError(f"{files[src_lang]} has {len(part)} segments, expected {IWSLT_SEGMENTS[name]}")
        for lang, path in files.items():
            _verify_sha256(path, IWSLT_RAW_KNOWN.get(f"{name}.{lang}", set()))
        src += part.src
        tgt += part.tgt
        empty += part.skipped.get("empty", 0)
    return ParallelCorpus(src, tgt, "iwslt14/test", {"empty": empty} if empty else {})


def _plain(data_dir: Path, split: str, src_lang: str, tgt_lang: str) -> ParallelCorpus:
    stem = {"val": "valid", "dev": "valid"}.get(split, split)
    paths = {lang: _find(data_dir, f"{stem}.{lang}") for lang in (src_lang, tgt_lang)}
    missing = [f"{data_dir / stem}.{lang}[.gz]" for lang, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(f"files missing: {', '.join(missing)} (a 'plain' dataset needs train/valid/test.LANG)")
    return read_pair(paths[src_lang], paths[tgt_lang], f"{data_dir.name}/{stem}")


# ``plain``: any folder of line-aligned ``{train,valid,test}.{de,en}[.gz]`` files, without checksums.
DATASETS = {"multi30k": _multi30k, "iwslt14": _iwslt, "plain": _plain}


def load_dataset(
    name: str, data_dir: str | Path, split: str, src_lang: str = "de", tgt_lang: str = "en"
) -> ParallelCorpus:
    """Load one split (``train``, ``valid``, ``test``) of ``multi30k`` or ``iwslt14`` from ``data_dir``.

    Raises:
        ValueError: for an unknown dataset, mismatched line counts, corrupt or non-UTF-8 files, checksum mismatch,
            or a split without a single sentence pair.
        FileNotFoundError: if files are missing (the message says which and where to put them).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} is not a directory; pass the folder holding the files")
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist (pass --download to create and fill it)")
    corpus = DATASETS[name](data_dir, split, src_lang, tgt_lang)
    if not len(corpus):
        raise ValueError(
            f"{corpus.describe()}: the {split} split in {data_dir} has no sentence pairs; are the files empty?"
        )
    return corpus


def _fetch(url: str, timeout: float = 30.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as error:
        raise FileNotFoundError(
            f"could not download {url} ({error}); this machine may be offline: fetch the file elsewhere and "
            "put it in the data directory"
        ) from error


def download(name: str, data_dir: str | Path) -> list[Path]:
    """Fetch the public files of ``name`` into ``data_dir`` (Multi30k raw ``.gz``; IWSLT'14 ``de-en.tgz``, unpacked
    into ``raw/``). Files already there are kept: Multi30k's one by one, IWSLT'14's when its training text is found.

    Returns:
        The files written.

    Raises:
        FileNotFoundError: when a download fails (e.g. no internet), naming the URL.
        ValueError: when a downloaded Multi30k file does not match its sha256 (it is not written).
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if name == "multi30k":
        for stem in ("train", "val", "test_2016_flickr"):
            for lang in ("de", "en"):
                target = data_dir / f"{stem}.{lang}.gz"
                if not target.exists():
                    url = MULTI30K_URL.format(name=f"{stem}.{lang}")
                    data = _fetch(url)
                    if hashlib.sha256(data).hexdigest() not in KNOWN_FILES[f"{stem}.{lang}"][0]:
                        raise ValueError(
                            f"{url} sent {len(data)} bytes that do not match the sha256 of {target.name} in "
                            "SOURCES.md (a proxy or login page?); nothing was written"
                        )
                    target.write_bytes(data)
                    written.append(target)
        return written
    if name != "iwslt14":
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    try:
        layout, root = _iwslt_layout(data_dir)
    except FileNotFoundError:
        layout, root = "", data_dir
    if layout and all(_find(root, f"{_IWSLT_TRAIN[layout]}.{lang}") for lang in ("de", "en")):
        return written  # the training text is there already (dev/test alone, as in /work/shared, is not enough)
    raw = data_dir / "raw"
    raw.mkdir(exist_ok=True)
    with (
        tarfile.open(fileobj=io.BytesIO(_fetch(IWSLT14_URL)), mode="r:gz") as archive,
        tempfile.TemporaryDirectory() as tmp,
    ):
        archive.extractall(tmp, filter="data")
        for path in Path(tmp).rglob("*"):
            if path.is_file() and (path.name.startswith("train.tags") or path.suffix == ".xml"):
                shutil.copy(path, raw / path.name)
                written.append(raw / path.name)
    return written
