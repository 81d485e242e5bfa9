"""A cache entry for weights converted once from a shipped file (a GGUF, an ONNX graph).

Converting SmolLM2's GGUF to fp32 takes ~20 s and re-reading ViT-S's ONNX graph a second or
two; loading the converted safetensors takes well under a second. An entry lives in
``cache_dir("weights", name)`` and is valid while its stamp (source file size and mtime, loader
version) matches. Files are written under temporary names and moved into place, and the stamp
is written last, so a run cut off mid-way leaves no entry that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from models.cache import cache_dir

STAMP = "carve-converted.json"


def converted(name: str, source: Path, version: str, convert: Callable[[Path], None]) -> Path:
    """The folder holding ``convert``'s output for ``source``; runs ``convert(tmp_dir)`` if stale."""
    root = cache_dir("weights", name)
    stamp = _stamp(source, version)
    if _read_stamp(root) == stamp:
        return root
    (root / STAMP).unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".converting-"))
    try:
        convert(tmp)
        for item in tmp.iterdir():
            os.replace(item, root / item.name)
        _write_json(root / STAMP, stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _stamp(source: Path, version: str) -> dict:
    info = source.stat()
    return {"source": source.name, "size": info.st_size, "mtime_ns": info.st_mtime_ns, "version": version}


def _read_stamp(root: Path) -> dict | None:
    try:
        return json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)
