"""Writing an artifact directory atomically: model.onnx (+ external data) and manifest.json.

Everything is written into a hidden temporary directory beside the destination, hashed, and
then renamed into place, so an interrupted or failing run never leaves a half-written artifact.
An existing destination is replaced only if it is itself a carve artifact or an empty directory.

A self-draft (``skip_layers:draft=true``) is a complete artifact of its own in ``draft/``, written
inside the same temporary directory; the main manifest's ``draft`` entry holds the sha256 of the
draft's manifest, which in turn hashes the draft's files (docs/artifact.md).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from runtime.errors import ArtifactError
from runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST, read_manifest, sha256_file

MODEL_FILE = "model.onnx"
EXTERNAL_DATA = "model.onnx.data"
DRAFT_DIR = "draft"
_EXTERNAL_THRESHOLD = 64 << 20  # keep small models in one file; large ones get external data


@dataclass
class Artifact:
    """A written artifact: its directory and manifest; ``load()`` opens it in the runtime."""

    path: Path
    manifest: dict[str, Any]

    def load(self, threads: int | None = None):
        import runtime

        return runtime.load(self.path, threads=threads)

    @classmethod
    def open(cls, path: str | Path) -> "Artifact":
        return cls(Path(path), read_manifest(path))


def signature(values) -> list[dict[str, Any]]:
    """Names, dtypes and shapes (ints for static dims, names for symbolic ones) of graph values."""
    return [{"name": v.name, "dtype": dtype_name(v.dtype), "shape": shape_list(v.shape)} for v in values]


def dtype_name(dtype: ir.DataType | None) -> str:
    if dtype is None:
        return "unknown"
    try:
        return np.dtype(dtype.numpy()).name
    except (TypeError, ValueError):
        return dtype.name.lower()


def shape_list(shape: ir.Shape | None) -> list[int | str | None] | None:
    if shape is None:
        return None
    return [d if isinstance(d, int) else (d.value if d.value is not None else None) for d in shape]


@dataclass
class DraftPart:
    """A self-draft to write into ``draft/``: its graph, its manifest fields, the units it skips."""

    model: ir.Model
    fields: dict[str, Any]
    skipped: list[str]


def write_artifact(model: ir.Model, out_dir: str | Path, fields: dict[str, Any],
                   extra_files: dict[str, bytes] | None = None, draft: DraftPart | None = None) -> Artifact:
    """Write ``model`` and a manifest holding ``fields`` (source, target, passes...) to ``out_dir``;
    ``extra_files`` (name -> bytes: the tokenizer) go beside it and are hashed like the model;
    ``draft`` becomes a complete artifact in ``draft/`` with the same extra files."""
    out = Path(out_dir)
    _check_destination(out)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        more = {}
        if draft is not None:
            (tmp / DRAFT_DIR).mkdir()
            _write_contents(draft.model, tmp / DRAFT_DIR, draft.fields, extra_files)
            more["draft"] = _draft_entry(tmp / DRAFT_DIR, draft)
        manifest = _write_contents(model, tmp, {**fields, **more}, extra_files)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Artifact(out, manifest)


def _write_contents(model: ir.Model, directory: Path, fields: dict[str, Any],
                    extra_files: dict[str, bytes] | None) -> dict[str, Any]:
    """The model, the extra files and a manifest hashing every file directly in ``directory``."""
    import optimizer

    _save_model(model, directory)
    for name, data in (extra_files or {}).items():
        (directory / name).write_bytes(data)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "carve_version": optimizer.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": MODEL_FILE,
        "inputs": signature(model.graph.inputs), "outputs": signature(model.graph.outputs),
        **fields,
        "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                  for p in sorted(directory.iterdir()) if p.is_file()},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_jsonable) + "\n")
    return manifest


def _draft_entry(directory: Path, draft: DraftPart) -> dict[str, Any]:
    """The main manifest's pointer to the draft: hashing the draft's manifest covers its files."""
    size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    return {"path": DRAFT_DIR, "manifest_sha256": sha256_file(directory / MANIFEST), "skipped": draft.skipped,
            "bytes": size}


def _save_model(model: ir.Model, directory: Path) -> None:
    big = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    external = EXTERNAL_DATA if big > _EXTERNAL_THRESHOLD else None
    ir.save(model, directory / MODEL_FILE, external_data=external)


def _check_destination(out: Path) -> None:
    if not out.exists():
        if out.parent.exists() and not out.parent.is_dir():
            raise ArtifactError(f"cannot create {out}: {out.parent} is a file; choose another -o directory.")
        return
    if not out.is_dir():
        raise ArtifactError(f"{out} exists and is a file; choose another -o directory.")
    if any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ArtifactError(f"{out} exists and is not a carve artifact; choose an empty or new -o directory.")


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)
