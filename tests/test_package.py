"""The top-level package: its version and the names it re-exports."""

from __future__ import annotations

from importlib.metadata import version

import compressed_transformer
from compressed_transformer import compress, layers, serialization, size


def test_version_is_the_installed_distributions() -> None:
    assert compressed_transformer.__version__ == version("compressed-transformer")


def test_top_level_names_are_the_library_objects() -> None:
    modules = (compress, layers, serialization, size)
    for name in compressed_transformer.__all__:
        if name == "__version__":
            continue
        value = getattr(compressed_transformer, name)
        assert any(getattr(module, name, None) is value for module in modules), name
    assert {"compress_", "save_compressed", "load_compressed_", "TTLinear"} <= set(compressed_transformer.__all__)
