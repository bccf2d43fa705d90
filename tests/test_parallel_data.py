"""Corpus readers (fixtures in both IWSLT'14 layouts, Multi30k, corrupt files), tokenizer and token batching."""

from __future__ import annotations

import gzip
import io
import urllib.error
from pathlib import Path

import pytest

from compressed_transformer.data import parallel
from compressed_transformer.data.batching import TokenBatcher, collate, encode_pairs
from compressed_transformer.data.parallel import (
    download,
    load_dataset,
    read_lines,
    read_pair,
    read_ted_tags,
    read_xml_segments,
)
from compressed_transformer.data.tokenizer import Tokenizer, load_or_train_tokenizer, train_tokenizer

SHARED = Path("/work/shared/data")
needs_multi30k = pytest.mark.skipif(not (SHARED / "multi30k/train.de.gz").exists(), reason="Multi30k not present")
needs_iwslt = pytest.mark.skipif(not (SHARED / "iwslt14/raw").exists(), reason="IWSLT'14 dev/test not present")

TED_DE = """<url>http://www.ted.com/talks/lang/de/x.html</url>
<keywords>talks, culture</keywords>
<speaker>Jane Doe</speaker>
<talkid>1</talkid>
<title>Ein Titel</title>
<description>Eine Beschreibung.</description>
Erster Satz.
Zweiter Satz.
<reviewer></reviewer>
<translator></translator>
Dritter Satz.
"""
TED_EN = """<url>http://www.ted.com/talks/x.html</url>
<keywords>talks, culture</keywords>
<speaker>Jane Doe</speaker>
<talkid>1</talkid>
<title>A title</title>
<description>A description.</description>
First sentence.
Second sentence.
<reviewer></reviewer>
<translator></translator>
Third sentence.
"""
XML = """<?xml version="1.0" encoding="UTF-8"?>
<mteval>
<srcset setid="iwslt2014-dev2010" srclang="german">
<doc docid="69" genre="lectures">
<url>http://www.ted.com/talks/x.html</url>
<title>Titel</title>
<seg id="1"> Erster &amp; Satz. </seg>
<seg id="2"> Zweiter Satz. </seg>
</doc>
</srcset>
</mteval>
"""


def write(path: Path, text: str | bytes, compress: bool = False) -> Path:
    data = text.encode() if isinstance(text, str) else text
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def test_read_lines_plain_and_gzip(tmp_path: Path) -> None:
    assert read_lines(write(tmp_path / "a.txt", "x\r\ny\n")) == ["x", "y"]
    assert read_lines(write(tmp_path / "b.txt", "\ufeffä\nö", compress=True)) == ["ä", "ö"]


def test_read_lines_rejects_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"not UTF-8.*line 2"):
        read_lines(write(tmp_path / "latin1.txt", b"ok\n" + "Grüße\n".encode("latin-1")))
    with pytest.raises(ValueError, match="not a valid gzip"):
        read_lines(write(tmp_path / "bad.gz", b"not gzip at all"))
    with pytest.raises(FileNotFoundError):
        read_lines(tmp_path / "missing.txt")


def test_corrupt_deflate_data_names_the_file(tmp_path: Path) -> None:
    """A gzip file damaged inside its compressed data (not just cut short) raises zlib.error, which is no OSError."""
    data = bytearray(gzip.compress(("ein satz\n" * 2000).encode()))
    data[30:60] = bytes(b ^ 0xFF for b in data[30:60])
    with pytest.raises(ValueError, match=r"damaged\.de\.gz is not a valid gzip file"):
        read_lines(write(tmp_path / "damaged.de.gz", bytes(data)))


def test_empty_files_and_a_file_for_the_data_dir(tmp_path: Path) -> None:
    """A zero-byte .gz (an interrupted download) is no gzip file; a split without a single pair is an error naming
    it, not an empty corpus that fails later; a file given as the data directory is not said not to exist."""
    with pytest.raises(ValueError, match=r"train\.de\.gz is empty"):
        read_lines(write(tmp_path / "train.de.gz", b""))
    (tmp_path / "train.de.gz").unlink()
    write(tmp_path / "train.de", "\n \n")
    write(tmp_path / "train.en", "\n\n")
    with pytest.raises(ValueError, match=r"train\.de and .*hold no sentence pairs"):
        load_dataset("plain", tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_dataset("plain", tmp_path / "train.de", "train")


def test_read_pair_checks_counts_and_counts_empty_pairs(tmp_path: Path) -> None:
    src = write(tmp_path / "s.de", "a\n\nc\nd\n")
    tgt = write(tmp_path / "s.en", "A\nB\nC\n \n")
    corpus = read_pair(src, tgt)
    assert corpus.src == ["a", "c"] and corpus.skipped == {"empty": 2}
    assert "skipped 2 empty" in corpus.describe()
    with pytest.raises(ValueError, match="line-aligned"):
        read_pair(src, write(tmp_path / "short.en", "A\n"))


def test_ted_tags_and_xml_readers(tmp_path: Path) -> None:
    assert read_ted_tags(write(tmp_path / "train.tags.de-en.de", TED_DE)) == [
        "Ein Titel",
        "Eine Beschreibung.",
        "Erster Satz.",
        "Zweiter Satz.",
        "Dritter Satz.",
    ]
    assert read_xml_segments(write(tmp_path / "x.xml", XML)) == ["Erster & Satz.", "Zweiter Satz."]
    with pytest.raises(ValueError, match="no <seg>"):
        read_xml_segments(write(tmp_path / "y.xml", "<mteval></mteval>\n"))


def test_iwslt_raw_layout_fixture(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    # 30 segments so that fairseq's every-23rd-line validation split is not empty.
    write(raw / "train.tags.de-en.de", TED_DE + "".join(f"Satz {i}.\n" for i in range(25)), compress=True)
    write(raw / "train.tags.de-en.en", TED_EN + "".join(f"Sentence {i}.\n" for i in range(25)), compress=True)
    train = load_dataset("iwslt14", tmp_path, "train")
    valid = load_dataset("iwslt14", tmp_path, "valid")
    assert len(train) + len(valid) == 30 and len(valid) == 1
    assert valid.src == ["Satz 17."] and train.tgt[0] == "A title"


def test_iwslt_raw_test_split_counts_its_empty_segments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pairs skipped in the raw XML test sets are reported in the concatenated test split."""
    monkeypatch.setattr(parallel, "IWSLT_SEGMENTS", dict.fromkeys(parallel.IWSLT_SEGMENTS, 2))
    monkeypatch.setattr(parallel, "IWSLT_RAW_KNOWN", {})
    empty_seg = XML.replace(" Zweiter Satz. ", " ")
    for name in parallel.IWSLT_TEST_SETS:
        write(tmp_path / f"IWSLT14.{name}.de-en.de.xml", empty_seg if name == "TED.tst2011" else XML)
        write(tmp_path / f"IWSLT14.{name}.de-en.en.xml", XML)
    test = load_dataset("iwslt14", tmp_path, "test")
    assert len(test) == 9 and test.skipped == {"empty": 1}


def test_iwslt_fairseq_layout_fixture(tmp_path: Path) -> None:
    folder = tmp_path / "fairseq_tok"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        write(folder / f"{split}.de", "ein sat@@ z .\nnoch einer .\n")
        write(folder / f"{split}.en", "a sent@@ ence .\none more .\n")
    train = load_dataset("iwslt14", tmp_path, "train")
    assert train.src == ["ein satz .", "noch einer ."] and train.tgt[0] == "a sentence ."
    write(folder / "train.en", "only one line\n")
    with pytest.raises(ValueError, match="line-aligned"):
        load_dataset("iwslt14", tmp_path, "train")


def test_iwslt_training_text_added_beside_dev_test_only_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/work/shared's layout (fairseq_tok/ with valid and test only) plus the missing training text: fairseq's
    train.{de,en} put in the data directory, or the raw release unpacked into raw/ (what --download does)."""
    monkeypatch.setattr(parallel, "IWSLT_KNOWN", {})  # one-line stand-ins for the release's valid/test files
    tok = tmp_path / "fairseq_tok"
    tok.mkdir()
    for split in ("valid", "test"):
        write(tok / f"{split}.de", f"{split} satz .\n")
        write(tok / f"{split}.en", f"{split} sentence .\n")
    write(tmp_path / "train.de", "ein satz .\n")
    write(tmp_path / "train.en", "a sentence .\n")
    assert [load_dataset("iwslt14", tmp_path, split).src for split in ("train", "valid", "test")] == [
        ["ein satz ."],
        ["valid satz ."],
        ["test satz ."],
    ]
    for lang in ("de", "en"):
        (tmp_path / f"train.{lang}").unlink()
    raw = tmp_path / "raw"
    raw.mkdir()
    write(raw / "train.tags.de-en.de", TED_DE + "".join(f"Satz {i}.\n" for i in range(25)))
    write(raw / "train.tags.de-en.en", TED_EN + "".join(f"Sentence {i}.\n" for i in range(25)))
    train = load_dataset("iwslt14", tmp_path, "train")
    assert train.src[0] == "Ein Titel" and load_dataset("iwslt14", tmp_path, "valid").src == ["Satz 17."]


def test_missing_files_say_where_to_put_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Multi30k files missing.*--download"):
        load_dataset("multi30k", tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="no IWSLT'14"):
        load_dataset("iwslt14", tmp_path, "train")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("wmt", tmp_path, "train")


def test_download_fails_clearly_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(parallel.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match=r"could not download .*multi30k"):
        download("multi30k", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"could not download .*de-en.tgz"):
        download("iwslt14", tmp_path)


def test_download_skips_iwslt_files_already_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--download with the data already in place must not need the network (multi30k skips present files too)."""

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(parallel.urllib.request, "urlopen", offline)
    raw = tmp_path / "raw"
    raw.mkdir()
    write(raw / "train.tags.de-en.de", TED_DE, compress=True)
    write(raw / "train.tags.de-en.en", TED_EN, compress=True)
    assert download("iwslt14", tmp_path) == []
    fairseq = tmp_path / "fairseq"
    fairseq.mkdir()
    for lang in ("de", "en"):
        write(fairseq / f"train.{lang}", "x\n")
    assert download("iwslt14", fairseq) == []


def test_download_refuses_a_wrong_multi30k_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A captive portal's page (or any wrong bytes) is not kept: it would never be fetched again."""

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *args) -> None:
            pass

    monkeypatch.setattr(parallel.urllib.request, "urlopen", lambda *a, **k: Response(b"<html>login</html>"))
    with pytest.raises(ValueError, match=r"train\.de\.gz.*sha256"):
        download("multi30k", tmp_path)
    assert list(tmp_path.iterdir()) == []


@needs_multi30k
def test_real_multi30k_loads_and_verifies(tmp_path: Path) -> None:
    test = load_dataset("multi30k", SHARED / "multi30k", "test")
    assert len(test) == 1000 and test.src[0]
    # A truncated copy fails the line-count check from SOURCES.md.
    lines = read_lines(SHARED / "multi30k/val.de.gz")
    write(tmp_path / "val.de", "\n".join(lines[:-1]) + "\n")
    write(tmp_path / "val.en", "\n".join(read_lines(SHARED / "multi30k/val.en.gz")[:-1]) + "\n")
    with pytest.raises(ValueError, match="expected 1014"):
        load_dataset("multi30k", tmp_path, "valid")


@needs_multi30k
def test_multi30k_files_unpacked_or_packed_again_still_verify(tmp_path: Path) -> None:
    """The check is on the content: unpacked, or gzipped again (other compressed bytes), the release files load;
    a file edited in place (same line count) does not."""
    for name, data in (("val.de", "de"), ("val.en", "en")):
        content = gzip.decompress((SHARED / f"multi30k/val.{data}.gz").read_bytes())
        (tmp_path / "plain").mkdir(exist_ok=True)
        (tmp_path / "plain" / name).write_bytes(content)
        (tmp_path / "packed").mkdir(exist_ok=True)
        (tmp_path / "packed" / f"{name}.gz").write_bytes(gzip.compress(content, mtime=1))
        edited = content.replace(b" ", b"  ", 1) if data == "en" else content
        (tmp_path / "edited").mkdir(exist_ok=True)
        (tmp_path / "edited" / name).write_bytes(edited)
    for layout in ("plain", "packed"):
        assert len(load_dataset("multi30k", tmp_path / layout, "valid")) == 1014
    with pytest.raises(ValueError, match=r"val\.en does not match the sha256"):
        load_dataset("multi30k", tmp_path / "edited", "valid")


@needs_iwslt
@pytest.mark.parametrize("kind", ["fairseq_tok", "fairseq_bpe"])
def test_fairseq_iwslt_files_are_verified_in_every_layout(tmp_path: Path, kind: str) -> None:
    """fairseq's test files, placed directly in the data folder, load when they are the release files, and an
    edited or truncated copy is refused (the check follows the files' kind, not the folder's name)."""
    files = {lang: read_lines(SHARED / f"iwslt14/{kind}/test.{lang}.gz") for lang in ("de", "en")}
    for lang, lines in files.items():
        write(tmp_path / f"test.{lang}", "\n".join(lines) + "\n")
    assert len(load_dataset("iwslt14", tmp_path, "test")) == 6750
    write(tmp_path / "test.en", "\n".join(["x" + files["en"][0], *files["en"][1:]]) + "\n")
    with pytest.raises(ValueError, match=r"test\.en does not match the sha256"):
        load_dataset("iwslt14", tmp_path, "test")
    for lang, lines in files.items():
        write(tmp_path / f"test.{lang}", "\n".join(lines[:3000]) + "\n")
    with pytest.raises(ValueError, match="has 3000 lines, expected 6750"):
        load_dataset("iwslt14", tmp_path, "test")


@needs_iwslt
def test_raw_iwslt_xml_files_are_verified(tmp_path: Path) -> None:
    """The release's dev/test XML files are checked against SOURCES.md too, unpacked or not: an edited segment (same
    number of segments) is refused."""
    for path in (SHARED / "iwslt14/raw").glob("IWSLT14.*.xml.gz"):
        (tmp_path / path.name.removesuffix(".gz")).write_bytes(gzip.decompress(path.read_bytes()))
    assert len(load_dataset("iwslt14", tmp_path, "test")) == 6750
    edited = tmp_path / "IWSLT14.TED.tst2011.de-en.en.xml"
    edited.write_text(edited.read_text().replace("</seg>", " </seg>", 1))
    with pytest.raises(ValueError, match=r"tst2011\.de-en\.en\.xml does not match the sha256"):
        load_dataset("iwslt14", tmp_path, "test")


@needs_iwslt
def test_real_iwslt_dev_test_files() -> None:
    raw_test = load_dataset("iwslt14", SHARED / "iwslt14/raw", "test")
    assert len(raw_test) == 6750
    tok_test = load_dataset("iwslt14", SHARED / "iwslt14", "test")
    assert len(tok_test) == 6750 and tok_test.src[0] == tok_test.src[0].lower()
    assert len(load_dataset("iwslt14", SHARED / "iwslt14", "valid")) == 7283
    bpe_valid = load_dataset("iwslt14", SHARED / "iwslt14/fairseq_bpe", "valid")
    assert not any("@@" in line for line in bpe_valid.src[:200])
    with pytest.raises(FileNotFoundError, match="train"):
        load_dataset("iwslt14", SHARED / "iwslt14", "train")


CORPUS = [f"ein hund {w} läuft über die wiese" for w in ("rot", "blau", "grün")] + ["a dog runs", "two cats sleep"]


def test_tokenizer_round_trip_and_cache(tmp_path: Path) -> None:
    tokenizer = train_tokenizer(CORPUS * 4, vocab_size=60)
    assert tokenizer.vocab_size <= 60
    ids = tokenizer.encode("ein hund läuft")
    assert all(i > 3 for i in ids) and tokenizer.decode([2, *ids, 3, 0]) == "ein hund läuft"
    assert tokenizer.decode([*ids[:2], 1, 3]).endswith(" ⁇ ")  # an unknown piece shows, as sentencepiece writes it
    cached = load_or_train_tokenizer(tmp_path, CORPUS * 4, 60)
    assert (tmp_path / "spm.model").exists()
    again = load_or_train_tokenizer(tmp_path, CORPUS * 4, 60)
    assert again.model_proto == cached.model_proto
    assert Tokenizer.load(tmp_path / "spm.model").encode("a dog") == cached.encode("a dog")
    with pytest.raises(ValueError, match="bpe"):
        train_tokenizer(CORPUS, model_type="word-ish")
    (tmp_path / "spm.model").write_bytes(cached.model_proto[:40])  # a truncated (damaged) model file
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer.load(tmp_path / "spm.model")


def test_tokenizer_errors_say_what_is_wrong(tmp_path: Path) -> None:
    """sentencepiece's failures get advice that fits them (the old hint, a smaller vocabulary, never did: training
    with hard_vocab_limit=False does not fail for a large one); a bad model file is named."""
    for texts in ([], ["", "  "]):
        with pytest.raises(ValueError, match="no text to train"):
            train_tokenizer(texts, vocab_size=60)
    with pytest.raises(ValueError, match=r"vocab_size=8 is too small.*distinct character") as info:
        train_tokenizer(CORPUS, vocab_size=8)
    assert "try a smaller" not in str(info.value)
    with pytest.raises(ValueError, match="vocab_size=3 is too small"):
        train_tokenizer(CORPUS, vocab_size=3)
    with pytest.raises(ValueError, match=r"not a sentencepiece model \(0 bytes\)"):
        Tokenizer(b"")
    (tmp_path / "spm.model").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"spm\.model: not a sentencepiece model"):
        Tokenizer.load(tmp_path / "spm.model")


def test_tokenizer_cache_survives_an_interrupted_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed while caching its tokenizer neither breaks the next run (a cut spm.json) nor leaves a model
    that an older spm.json vouches for (a new spm.model beside the settings of the one it replaced)."""
    first = load_or_train_tokenizer(tmp_path, CORPUS * 4, 60)
    (tmp_path / "spm.json").write_text('{"vocab_size": 6')
    assert load_or_train_tokenizer(tmp_path, CORPUS * 4, 60).model_proto == first.model_proto
    from compressed_transformer.data import tokenizer as tokenizer_module

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(tokenizer_module.json, "dumps", killed)
        with pytest.raises(KeyboardInterrupt):
            load_or_train_tokenizer(tmp_path, CORPUS * 4, 40)  # other settings: a new spm.model, then killed
    assert load_or_train_tokenizer(tmp_path, CORPUS * 4, 60).model_proto == first.model_proto


def make_pairs(n: int) -> list[tuple[list[int], list[int]]]:
    return [([4 + i % 7] * (1 + i % 9), [5 + i % 5] * (1 + (i * 3) % 11)) for i in range(n)]


def test_batches_respect_budget_cover_everything_and_are_deterministic() -> None:
    pairs = make_pairs(200)
    batcher = TokenBatcher(pairs, max_tokens=40, seed=3)
    batches = batcher.batches(epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(200))
    for b in batches:
        assert len(b) * max(batcher.lengths[i] for i in b) <= 40
    assert TokenBatcher(pairs, max_tokens=40, seed=3).batches(0) == batches
    assert batcher.batches(1) != batches
    assert TokenBatcher(pairs, max_tokens=40, seed=4).batches(0) != batches


def test_rank_sharding_gives_the_same_global_batch() -> None:
    batcher = TokenBatcher(make_pairs(120), max_tokens=30, seed=1)
    one = batcher.step_batches(0, 2, rank=0, world_size=1, accum=2)
    two = [batcher.step_batches(0, 2, rank=r, world_size=2, accum=1)[0] for r in range(2)]
    assert one == two
    assert batcher.global_tokens(0, 2, 1, 2) == batcher.global_tokens(0, 2, 2, 1)
    assert batcher.steps_per_epoch(2, 1) == len(batcher.batches(0)) // 2


def test_collate_and_over_long_pairs() -> None:
    batch = collate([([5, 6], [7]), ([8], [9, 10, 11])], pad_id=0, bos_id=2, eos_id=3)
    assert batch.src.tolist() == [[5, 6, 3], [8, 3, 0]]
    assert batch.tgt_in.tolist() == [[2, 7, 0, 0], [2, 9, 10, 11]]
    assert batch.tgt_out.tolist() == [[7, 3, 0, 0], [9, 10, 11, 3]]
    assert batch.tokens == 6
    tokenizer = train_tokenizer(CORPUS * 4, vocab_size=60)
    pairs, dropped = encode_pairs(tokenizer, ["ein hund", "ein hund " * 30], ["a dog", "a dog"], max_len=20)
    assert len(pairs) == 1 and dropped == 1
    with pytest.raises(ValueError, match="longest pair"):
        TokenBatcher(make_pairs(20), max_tokens=5)
