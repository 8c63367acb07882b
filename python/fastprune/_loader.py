"""Loads the compiled extension so that ``torch.ops.fastprune.*`` exist.

Editable installs put ``_C.so`` in site-packages rather than beside this file, so the module is
found with ``importlib`` rather than by path. ``torch`` must be imported first: the library links
against libtorch and registers into its dispatcher.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch  # noqa: F401  (must precede the extension)

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
    importlib.import_module("fastprune._C")
    _loaded = True
