"""MNIST from the four canonical IDX files: locate, verify, download when online, and read.

The files are the gzipped IDX files of LeCun, Cortes and Burges (``train-images-idx3-ubyte.gz`` and so on). The
data directory is, in order of precedence:

1. the ``directory`` argument (the CLI's ``--data-dir``), a folder holding the four files;
2. ``$COMPRESSED_TRANSFORMER_DATA/mnist``, where the environment variable names the parent data folder;
3. ``data/mnist`` under the current working directory.

Every file's SHA-256 is checked against the canonical distribution; missing files are downloaded from the public
mirrors when the machine is online, and otherwise the error says which files to place where.

IDX format: a big-endian header ``0x00 0x00 <type> <ndim>`` followed by ``ndim`` big-endian ``uint32`` sizes and
the data in row-major order (type ``0x08`` is ``uint8``; images have magic 2051 = ``0x00000803``, labels 2049).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import shutil
import struct
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATA_ENV_VAR",
    "DEFAULT_DATA_DIR",
    "FILES",
    "MIRRORS",
    "MNIST",
    "MNISTFile",
    "MNISTSplit",
    "download_mnist",
    "load_mnist",
    "read_idx",
    "resolve_data_dir",
    "sha256sum",
    "verify_file",
    "write_idx",
]

DATA_ENV_VAR = "COMPRESSED_TRANSFORMER_DATA"
DEFAULT_DATA_DIR = Path("data") / "mnist"

# Public mirrors of the canonical files, tried in order.
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

# IDX type byte -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_TYPE_CODES = {dtype.newbyteorder("="): code for code, dtype in _IDX_DTYPES.items()}

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


@dataclass(frozen=True)
class MNISTFile:
    """One canonical MNIST file.

    Attributes:
        name: file name, e.g. ``"train-images-idx3-ubyte.gz"``.
        size: size in bytes of the gzipped file.
        sha256: SHA-256 of the gzipped file.
        md5: MD5 of the gzipped file (the value other libraries check; informative only).
        magic: IDX magic number of the decompressed content (2051 images, 2049 labels).
        count: number of items (images or labels).
    """

    name: str
    size: int
    sha256: str
    md5: str
    magic: int
    count: int


FILES: dict[str, MNISTFile] = {
    "train_images": MNISTFile(
        "train-images-idx3-ubyte.gz",
        9912422,
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        IMAGES_MAGIC,
        60000,
    ),
    "train_labels": MNISTFile(
        "train-labels-idx1-ubyte.gz",
        28881,
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "d53e105ee54ea40749a09fcbcd1e9432",
        LABELS_MAGIC,
        60000,
    ),
    "test_images": MNISTFile(
        "t10k-images-idx3-ubyte.gz",
        1648877,
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "9fb629c4189551a2d022fa330f9573f3",
        IMAGES_MAGIC,
        10000,
    ),
    "test_labels": MNISTFile(
        "t10k-labels-idx1-ubyte.gz",
        4542,
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        "ec29112dd5afa0611ce80d1b7f02629c",
        LABELS_MAGIC,
        10000,
    ),
}


@dataclass(frozen=True)
class MNISTSplit:
    """Images and labels of one split.

    Attributes:
        images: ``(N, 28, 28)`` ``uint8`` pixels, 0 (background) to 255 (ink).
        labels: ``(N,)`` ``int64`` digits in ``[0, 9]``.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def flat_float(self) -> torch.Tensor:
        """Pixels as ``(N, 784)`` ``float32`` in ``[0, 1]``."""
        return self.images.reshape(len(self), -1).to(torch.float32) / 255.0

    def subset(self, limit: int | None) -> MNISTSplit:
        """The first ``limit`` examples (all of them for ``None``)."""
        if limit is None:
            return self
        if limit < 1:
            raise ValueError(f"a subset needs at least one example, got limit={limit}")
        return MNISTSplit(self.images[:limit], self.labels[:limit])


@dataclass(frozen=True)
class MNIST:
    """The training (60,000) and test (10,000) splits."""

    train: MNISTSplit
    test: MNISTSplit


def resolve_data_dir(directory: str | os.PathLike[str] | None = None) -> Path:
    """The folder expected to hold the four files: ``directory``, else ``$COMPRESSED_TRANSFORMER_DATA/mnist``,
    else ``data/mnist`` (relative to the working directory).

    Args:
        directory: explicit folder holding the four ``.gz`` files.

    Returns:
        The folder (not necessarily existing yet).
    """
    if directory is not None:
        return Path(directory).expanduser()
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser() / "mnist"
    return DEFAULT_DATA_DIR


def _require_file(path: Path) -> None:
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a directory, not a file; remove it and place the file there")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")


def sha256sum(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: str | os.PathLike[str], spec: MNISTFile) -> None:
    """Check a file's size and SHA-256 against the canonical values.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: naming the file, if its size or checksum differs.
    """
    path = Path(path)
    _require_file(path)
    size = path.stat().st_size
    digest = sha256sum(path)
    if digest != spec.sha256:
        hint = f" (size {size} bytes, expected {spec.size})" if size != spec.size else ""
        raise ValueError(
            f"{path} is corrupt: its sha256 is {digest}, expected {spec.sha256}{hint}. Delete it and run again to "
            f"download it, or replace it with the canonical {spec.name} (md5 {spec.md5}) from {MIRRORS[0]}"
        )


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file, gzipped (``.gz``) or raw.

    Args:
        path: the file.

    Returns:
        The array, shaped as the header says, in native byte order.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: naming the file, for a truncated or invalid gzip stream, a bad magic number, an unknown type
            code, or a length that disagrees with the header.
    """
    path = Path(path)
    _require_file(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                raw = handle.read()
        else:
            raw = path.read_bytes()
    except (EOFError, OSError, zlib.error) as error:
        raise ValueError(f"{path} is not a complete gzip file ({error}); the download was probably cut short") from None
    if len(raw) < 4:
        raise ValueError(f"{path} is too short to be an IDX file ({len(raw)} bytes)")
    zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        magic = struct.unpack(">I", raw[:4])[0]
        raise ValueError(
            f"{path} is not an IDX file: magic number {magic} (0x{magic:08x}); expected 0x0000TTDD with a type "
            f"code TT in {sorted(_IDX_DTYPES)} and DD dimensions, e.g. {IMAGES_MAGIC} for images"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated: its IDX header needs {header} bytes, the file has {len(raw)}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[type_code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path} has {len(raw)} bytes of IDX data, but its header (shape {tuple(shape)}) needs {expected}; "
            "the file is truncated or corrupt"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (gzipped when ``path`` ends with ``.gz``), e.g. to make a small subset.

    Raises:
        ValueError: for a dtype IDX cannot hold or a zero-dimensional array.
    """
    path = Path(path)
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _IDX_TYPE_CODES or array.ndim == 0:
        raise ValueError(f"IDX holds 1+-dimensional uint8/int8/int16/int32/float32/float64 arrays, got {array.dtype}")
    code = _IDX_TYPE_CODES[native]
    header = struct.pack(f">HBB{array.ndim}I", 0, code, array.ndim, *array.shape)
    payload = header + array.astype(_IDX_DTYPES[code]).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        # mtime=0 keeps the bytes reproducible.
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)
    return path


def _missing_message(directory: Path, missing: Sequence[MNISTFile], errors: Sequence[str]) -> str:
    names = ", ".join(spec.name for spec in missing)
    lines = [
        f"MNIST files missing from {directory}: {names}.",
        f"Place the four canonical files ({', '.join(spec.name for spec in FILES.values())}) in {directory}, "
        f"pass --data-dir DIR for another folder, or set {DATA_ENV_VAR} to a folder holding mnist/.",
        f"They can be downloaded from {' or '.join(MIRRORS)}.",
    ]
    if errors:
        lines.append("Download attempts failed: " + "; ".join(errors))
    return "\n".join(lines)


def download_mnist(
    directory: str | os.PathLike[str],
    *,
    mirrors: Sequence[str] = MIRRORS,
    timeout: float = 30.0,
    files: Sequence[MNISTFile] | None = None,
) -> list[Path]:
    """Download the missing canonical files into ``directory``, verifying each checksum before it is kept.

    Args:
        directory: the destination folder (created if needed).
        mirrors: base URLs tried in order for each file.
        timeout: seconds per connection attempt.
        files: which files to fetch; all four by default. Files already present are skipped.

    Returns:
        The paths downloaded.

    Raises:
        FileNotFoundError: if a file could not be fetched from any mirror (offline machine), saying which files to
            place where.
    """
    directory = Path(directory)
    specs = list(FILES.values()) if files is None else list(files)
    fetched, errors, missing = [], [], []
    for spec in specs:
        target = directory / spec.name
        if target.exists():
            continue
        for mirror in mirrors:
            url = mirror + spec.name
            print(f"MNIST: {target} is missing; downloading {url}", file=sys.stderr, flush=True)
            tmp_path = None
            try:
                directory.mkdir(parents=True, exist_ok=True)
                with (
                    urllib.request.urlopen(url, timeout=timeout) as response,
                    tempfile.NamedTemporaryFile(dir=directory, prefix=f".{spec.name}.", delete=False) as tmp,
                ):
                    tmp_path = Path(tmp.name)
                    shutil.copyfileobj(response, tmp)
                if sha256sum(tmp_path) != spec.sha256:
                    errors.append(f"{url}: checksum mismatch")
                    continue
                tmp_path.replace(target)
                tmp_path = None
                fetched.append(target)
                break
            except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
                errors.append(f"{url}: {error}")
            finally:
                if tmp_path is not None:
                    tmp_path.unlink(missing_ok=True)
        else:
            missing.append(spec)
    if missing:
        raise FileNotFoundError(_missing_message(directory, missing, errors))
    return fetched


def _load_split(directory: Path, images: MNISTFile, labels: MNISTFile, verify: bool) -> MNISTSplit:
    arrays = {}
    for spec in (images, labels):
        path = directory / spec.name
        if verify:
            verify_file(path, spec)
        array = read_idx(path)
        header_magic = (_IDX_TYPE_CODES.get(array.dtype, 0) << 8) | array.ndim
        if header_magic != spec.magic:
            kind = "images (3 dimensions)" if spec.magic == IMAGES_MAGIC else "labels (1 dimension)"
            raise ValueError(
                f"{path} has IDX magic {header_magic} ({array.dtype}, {array.ndim} dimensions); {spec.name} must hold "
                f"uint8 {kind}, magic {spec.magic}"
            )
        arrays[spec.magic] = array
    pixels, digits = arrays[IMAGES_MAGIC], arrays[LABELS_MAGIC]
    if pixels.dtype != np.uint8 or pixels.shape[1:] != (28, 28):
        raise ValueError(f"{directory / images.name} must hold uint8 28x28 images, got {pixels.dtype} {pixels.shape}")
    if pixels.shape[0] != digits.shape[0]:
        raise ValueError(
            f"{directory / images.name} has {pixels.shape[0]} images but {directory / labels.name} has "
            f"{digits.shape[0]} labels"
        )
    if verify and digits.shape[0] != labels.count:
        raise ValueError(f"{directory / labels.name} has {digits.shape[0]} labels, expected {labels.count}")
    if digits.size and digits.max() > 9:
        raise ValueError(f"{directory / labels.name} has labels above 9 (max {int(digits.max())})")
    return MNISTSplit(torch.from_numpy(pixels.copy()), torch.from_numpy(digits.astype(np.int64)))


def load_mnist(
    directory: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    verify: bool = True,
) -> MNIST:
    """Load MNIST, downloading the missing files first when ``download`` is set and the machine is online.

    Args:
        directory: folder holding the four files; see :func:`resolve_data_dir` for the fallbacks.
        download: fetch missing files from :data:`MIRRORS`.
        verify: check every file's SHA-256 against the canonical one (turn off only for hand-made subsets, which
            must still use the canonical file names).

    Returns:
        The two splits.

    Raises:
        FileNotFoundError: if files are missing and cannot be downloaded; the message names them and the folder.
        ValueError: naming the file, for a wrong checksum, a truncated gzip stream, a wrong IDX magic or
            inconsistent counts.
    """
    folder = resolve_data_dir(directory)
    for spec in FILES.values():
        if (folder / spec.name).is_dir():
            _require_file(folder / spec.name)
    missing = [spec for spec in FILES.values() if not (folder / spec.name).is_file()]
    if missing:
        if not download:
            raise FileNotFoundError(_missing_message(folder, missing, []))
        download_mnist(folder, files=missing)
    train = _load_split(folder, FILES["train_images"], FILES["train_labels"], verify)
    test = _load_split(folder, FILES["test_images"], FILES["test_labels"], verify)
    return MNIST(train=train, test=test)
