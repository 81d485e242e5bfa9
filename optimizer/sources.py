"""Resolving what the user named into an IR model: a built-in name, an .onnx file, a Hugging
Face model directory, an artifact directory, a torch module, or an ``onnx_ir.Model``.

Traced graphs are cached (``models.cache``) keyed by the source, its version, and the carve and
torch versions, so the second ``carve optimize minilm`` skips tracing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from optimizer import frontend
from optimizer.progress import Progress
from runtime.errors import ModelLoadError
from runtime.manifest import MANIFEST

DEFAULT_SIZES = {"batch": 2, "sequence": 16}


@dataclass
class Source:
    model: ir.Model
    info: dict[str, Any]
    family: str | None = None
    example_feeds: dict[str, np.ndarray] | None = None
    spec: Any = field(default=None, repr=False)  # the models.registry.ModelSpec of a built-in


def resolve(model: Any, example_inputs: Any = None, dynamic_axes=None, output_names=None,
            progress: Progress | None = None) -> Source:
    progress = progress or Progress()
    if isinstance(model, ir.Model):
        return Source(model, {"kind": "ir"}, example_feeds=_numpy(example_inputs))
    if isinstance(model, (str, Path)):
        return _resolve_named(str(model), progress)
    if hasattr(model, "forward") and hasattr(model, "parameters"):
        if example_inputs is None:
            raise ModelLoadError("a torch module needs example_inputs (a dict of tensors) to be traced; pass example_inputs=...")
        with progress.step(f"tracing {type(model).__name__}"):
            traced = frontend.trace(model, example_inputs, dynamic_axes, output_names)
        return Source(traced, {"kind": "module", "class": type(model).__qualname__}, example_feeds=_numpy(example_inputs))
    raise ModelLoadError(f"cannot optimize a {type(model).__name__}; give a path, a built-in model name, a torch module or an onnx_ir.Model.")


def _resolve_named(text: str, progress: Progress) -> Source:
    path = Path(text)
    if path.is_file():
        return _from_onnx(path, progress)
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return _from_artifact(path, progress)
        if (path / "config.json").is_file():
            from optimizer.hf import trace_hf_directory

            return trace_hf_directory(path, progress)
        raise ModelLoadError(f"{path} is a directory but neither a carve artifact nor a Hugging Face model (no config.json); give an .onnx file or a model directory.")
    if "/" in text or text.endswith(".onnx") or text.startswith("."):
        raise ModelLoadError(f"{path} does not exist; give the path of an .onnx file, a model directory, or a built-in model name.")
    return _from_builtin(text, progress)


def _from_onnx(path: Path, progress: Progress) -> Source:
    with progress.step(f"loading {path.name}"):
        model = frontend.load(path)
    info = {"kind": "onnx", "path": str(path.resolve()), "sha256": _sha256(path)}
    return Source(model, info, example_feeds=synthesize_feeds(model))


def _from_artifact(path: Path, progress: Progress) -> Source:
    from runtime.manifest import read_manifest

    manifest = read_manifest(path)
    with progress.step(f"loading artifact {path.name}"):
        model = frontend.load(path / manifest.get("model", "model.onnx"))
    return Source(model, {"kind": "artifact", "path": str(path.resolve()), "of": manifest.get("source")},
                  example_feeds=synthesize_feeds(model))


def _from_builtin(name: str, progress: Progress) -> Source:
    from models import registry
    from optimizer.trace_cache import cached_trace

    spec = registry.get(name)
    model = cached_trace(spec, progress)
    feeds = _numpy(spec.example_inputs(DEFAULT_SIZES["batch"], DEFAULT_SIZES["sequence"]))
    return Source(model, {"kind": "builtin", "name": spec.name, "version": spec.version},
                  family=spec.family, example_feeds=feeds, spec=spec)


def synthesize_feeds(model: ir.Model, sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    from optimizer.artifact import signature

    return feeds_from_signature(signature(model.graph.inputs), sizes, seed)


def feeds_from_signature(inputs: list[dict], sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the right names, dtypes and shapes: small ints for ids, ones for masks, noise otherwise."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        shape = [d if isinstance(d, int) else sizes.get(str(d), 1) for d in (spec["shape"] or [])]
        dtype = np.dtype(spec["dtype"])
        if "mask" in spec["name"]:
            feeds[spec["name"]] = np.ones(shape, dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[spec["name"]] = rng.integers(0, 100, size=shape).astype(dtype)
        else:
            feeds[spec["name"]] = rng.standard_normal(shape).astype(dtype)
    return feeds


def feeds_for(source: Source, inputs: list[dict], batch: int, seq: int) -> dict[str, np.ndarray]:
    """Feeds for timing and comparing at (batch, seq): the built-in's own inputs where known."""
    if source.spec is not None:
        return _numpy(source.spec.example_inputs(batch, seq))
    return feeds_from_signature(inputs, {"batch": batch, "sequence": seq})


def _numpy(inputs: Any) -> dict[str, np.ndarray] | None:
    if not isinstance(inputs, dict):
        return None
    return {k: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v) for k, v in inputs.items()}


def _sha256(path: Path) -> str:
    from runtime.manifest import sha256_file

    return sha256_file(path)
