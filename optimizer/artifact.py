"""Writing an artifact directory atomically: model.onnx (+ external data) and manifest.json.

Everything is written into a hidden temporary directory beside the destination, hashed, and
then renamed into place, so an interrupted or failing run never leaves a half-written artifact.
An existing destination is replaced only if it is itself a carve artifact or an empty directory.
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


def write_artifact(model: ir.Model, out_dir: str | Path, fields: dict[str, Any],
                   extra_files: dict[str, bytes] | None = None) -> Artifact:
    """Write ``model`` and a manifest holding ``fields`` (source, target, passes...) to ``out_dir``;
    ``extra_files`` (name -> bytes: the tokenizer) go beside it and are hashed like the model."""
    import optimizer

    out = Path(out_dir)
    _check_destination(out)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        _save_model(model, tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "carve_version": optimizer.__version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "model": MODEL_FILE,
            "inputs": signature(model.graph.inputs), "outputs": signature(model.graph.outputs),
            **fields,
            "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_jsonable) + "\n")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Artifact(out, manifest)


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
