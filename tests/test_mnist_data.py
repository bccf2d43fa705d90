"""The MNIST IDX reader, checksums, download and error messages, on files written by the tests."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from compressed_transformer.data import mnist
from compressed_transformer.data.mnist import FILES, MNISTFile, load_mnist, read_idx, resolve_data_dir, write_idx

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """IDX bytes written by hand (independently of ``write_idx``)."""
    header = struct.pack(f">HBB{array.ndim}I", 0, type_code, array.ndim, *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_gz(path: Path, payload: bytes) -> Path:
    path.write_bytes(gzip.compress(payload))
    return path


def write_fake_mnist(directory: Path, n_train: int = 40, n_test: int = 20, seed: int = 0) -> Path:
    """Four files with the canonical names holding small random splits."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_gz(directory / FILES[f"{split}_images"].name, idx_bytes(images))
        write_gz(directory / FILES[f"{split}_labels"].name, idx_bytes(labels))
    return directory


def test_read_idx_images_and_labels(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28).astype(np.uint8)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    gz = write_gz(tmp_path / "images.gz", idx_bytes(images))
    raw = tmp_path / "labels.idx"
    raw.write_bytes(idx_bytes(labels))
    np.testing.assert_array_equal(read_idx(gz), images)
    np.testing.assert_array_equal(read_idx(raw), labels)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_write_idx_round_trip(tmp_path, dtype):
    array = np.arange(24).reshape(2, 3, 4).astype(dtype)
    for name in ("a.idx", "a.idx.gz"):
        path = write_idx(tmp_path / name, array)
        out = read_idx(path)
        assert out.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(out, array)


def test_write_idx_matches_hand_written_bytes(tmp_path):
    labels = np.array([1, 2, 3], dtype=np.uint8)
    assert write_idx(tmp_path / "l.idx", labels).read_bytes() == idx_bytes(labels)


def test_bad_magic_names_the_file(tmp_path):
    path = write_gz(tmp_path / "bad.gz", struct.pack(">I", 0x12345678) + bytes(16))
    with pytest.raises(ValueError, match=r"bad\.gz.*not an IDX file"):
        read_idx(path)


def test_truncated_gzip_names_the_file(tmp_path):
    data = gzip.compress(idx_bytes(np.zeros((5, 28, 28), dtype=np.uint8)))
    path = tmp_path / "cut.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.gz.*gzip"):
        read_idx(path)


def test_length_disagreeing_with_header(tmp_path):
    payload = idx_bytes(np.zeros((5, 28, 28), dtype=np.uint8))
    path = write_gz(tmp_path / "short.gz", payload[:-10])
    with pytest.raises(ValueError, match=r"short\.gz.*truncated or corrupt"):
        read_idx(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_idx(tmp_path / "nope.gz")


def test_load_small_files_without_checksums(tmp_path):
    write_fake_mnist(tmp_path, n_train=40, n_test=20)
    data = load_mnist(tmp_path, download=False, verify=False)
    assert data.train.images.shape == (40, 28, 28) and data.train.images.dtype == torch.uint8
    assert data.test.labels.shape == (20,) and data.test.labels.dtype == torch.int64
    flat = data.train.flat_float()
    assert flat.shape == (40, 784) and float(flat.min()) >= 0.0 and float(flat.max()) <= 1.0
    assert len(data.train.subset(7)) == 7


def test_checksum_mismatch_names_the_file(tmp_path):
    write_fake_mnist(tmp_path)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz is corrupt: its sha256"):
        load_mnist(tmp_path, download=False, verify=True)


def test_labels_file_in_place_of_images(tmp_path):
    write_fake_mnist(tmp_path)
    labels = (tmp_path / FILES["test_labels"].name).read_bytes()
    (tmp_path / FILES["test_images"].name).write_bytes(labels)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz has IDX magic 2049.*magic 2051"):
        load_mnist(tmp_path, download=False, verify=False)


def test_count_mismatch_and_bad_labels(tmp_path):
    write_fake_mnist(tmp_path, n_train=40)
    write_gz(tmp_path / FILES["train_labels"].name, idx_bytes(np.zeros(39, dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"40 images but .* 39 labels"):
        load_mnist(tmp_path, download=False, verify=False)
    write_gz(tmp_path / FILES["train_labels"].name, idx_bytes(np.full(40, 12, dtype=np.uint8)))
    with pytest.raises(ValueError, match="labels above 9"):
        load_mnist(tmp_path, download=False, verify=False)


def test_missing_files_offline_say_what_to_place_where(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(mnist.urllib.request, "urlopen", offline)
    (tmp_path / FILES["train_labels"].name).write_bytes(b"x")  # present: not reported as missing
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "no network" in message
    for key in ("train_images", "test_images", "test_labels"):
        assert FILES[key].name in message
    assert "missing from" in message and "train-labels-idx1-ubyte.gz," not in message.split("\n")[0]
    with pytest.raises(FileNotFoundError, match="COMPRESSED_TRANSFORMER_DATA"):
        load_mnist(tmp_path, download=False)


def test_download_verifies_and_keeps_good_files(tmp_path, monkeypatch):
    payload = gzip.compress(idx_bytes(np.array([3, 1, 4], dtype=np.uint8)))
    spec = MNISTFile("tiny-labels.gz", len(payload), hashlib.sha256(payload).hexdigest(), "", 2049, 3)
    urls = []

    def fake_urlopen(url, timeout):
        urls.append(url)
        if "first" in url:
            return io.BytesIO(b"not the right bytes")
        return io.BytesIO(payload)

    monkeypatch.setattr(mnist.urllib.request, "urlopen", fake_urlopen)
    fetched = mnist.download_mnist(tmp_path, mirrors=("http://first/", "http://second/"), files=[spec])
    assert fetched == [tmp_path / "tiny-labels.gz"]
    assert urls == ["http://first/tiny-labels.gz", "http://second/tiny-labels.gz"]
    np.testing.assert_array_equal(read_idx(fetched[0]), [3, 1, 4])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-labels.gz"]  # no temporary file left behind


def test_download_cut_short_is_reported_and_cleaned_up(tmp_path, monkeypatch, capsys):
    """A connection dropped mid-transfer (http.client.IncompleteRead, no OSError) tries the next mirror, leaves no
    temporary file, and ends in the usual 'place the files' message; each attempt is announced on stderr."""

    class CutShort(io.BytesIO):
        def read(self, *args):
            raise http.client.IncompleteRead(b"abc", 100)

    monkeypatch.setattr(mnist.urllib.request, "urlopen", lambda url, timeout: CutShort())
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\.gz.*IncompleteRead"):
        mnist.download_mnist(tmp_path, mirrors=("http://first/", "http://second/"), files=[FILES["test_labels"]])
    assert list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err
    assert "http://first/t10k-labels-idx1-ubyte.gz" in err and "http://second/t10k-labels-idx1-ubyte.gz" in err


def test_a_directory_in_place_of_a_file_is_named_as_such(tmp_path):
    write_fake_mnist(tmp_path)
    (tmp_path / FILES["train_images"].name).unlink()
    (tmp_path / FILES["train_images"].name).mkdir()
    for verify in (True, False):
        with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\.gz is a directory, not a file"):
            load_mnist(tmp_path, download=True, verify=verify)
    with pytest.raises(FileNotFoundError, match="is a directory, not a file"):
        read_idx(tmp_path / FILES["train_images"].name)


def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv(mnist.DATA_ENV_VAR, str(tmp_path))
    assert resolve_data_dir("somewhere") == Path("somewhere")
    assert resolve_data_dir() == tmp_path / "mnist"
    monkeypatch.delenv(mnist.DATA_ENV_VAR)
    assert resolve_data_dir() == Path("data") / "mnist"


@pytest.mark.skipif(not (SHARED_MNIST / FILES["test_labels"].name).is_file(), reason="canonical MNIST not present")
def test_canonical_files_verify_and_load():
    data = load_mnist(SHARED_MNIST, download=False)
    assert data.train.images.shape == (60000, 28, 28) and data.test.images.shape == (10000, 28, 28)
    assert data.train.labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert torch.bincount(data.test.labels).tolist()[:3] == [980, 1135, 1032]
