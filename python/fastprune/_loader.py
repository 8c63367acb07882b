"""Loads the compiled extension so that ``torch.ops.fastprune.*`` exist.

Editable installs put ``_C.so`` in site-packages rather than beside this file, so the module is
found with ``importlib`` rather than by path. ``torch`` must be imported first: the library links
against libtorch and registers into its dispatcher.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch  # must precede the extension

_loaded = False


def load_library() -> None:
    """Import ``fastprune._C`` once; raises ImportError with a build hint if it is missing."""
    global _loaded
    if _loaded:
        return
    if importlib.util.find_spec("fastprune._C") is None:
        raise ImportError(
            "fastprune's compiled extension (fastprune._C) is not built. "
            "Run `make test` or `pip install --no-build-isolation -e .` from the repository."
        )
    try:
        ext = importlib.import_module("fastprune._C")
    except ImportError as e:  # typically undefined symbols: built against another torch
        raise ImportError(
            f"fastprune's compiled extension does not load with torch {torch.__version__} ({e}); it was most "
            "likely built against another torch: rebuild it (`pip install --no-build-isolation -e .`)"
        ) from e
    check_torch_version(tuple(ext.torch_version()), torch.__version__)
    _loaded = True


def check_torch_version(built: tuple[int, ...], running: str) -> None:
    """ImportError unless the running torch has the major.minor version the extension was built
    against (custom-op extensions link against torch's C++ ABI, which changes between minor releases)."""
    parts = running.split("+")[0].split(".")
    have = tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts[:2])
    if have != tuple(built[:2]):
        raise ImportError(
            f"fastprune was built against torch {'.'.join(map(str, built))} but torch {running} is running; "
            "rebuild fastprune against this torch, or install the torch it was built for"
        )
