"""A disk cache of traced built-in models, keyed by model, version, and carve/torch versions.

Tracing SmolLM2-135M takes about a minute on two cores; the cache makes every later run load
the graph in seconds. Entries are written to a temporary name and renamed, so a cut-off run
never leaves a broken entry.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import onnx_ir as ir

from models.cache import cache_dir, cache_key
from optimizer import frontend
from optimizer.progress import Progress


def cached_trace(spec, progress: Progress) -> ir.Model:
    """The traced graph of a built-in model, traced once and then loaded from the cache."""
    path = cached_trace_path(spec, progress)
    with progress.step(f"loading the traced {spec.name}"):
        return load_in_memory(path)


def load_in_memory(path: Path) -> ir.Model:
    """Load a graph with its external data read into memory, so it no longer depends on the file."""
    model = ir.load(path)
    ir.external_data.load_to_model(model)
    return model


def cached_trace_path(spec, progress: Progress) -> Path:
    """Where the traced graph of ``spec`` lies in the cache; traces it first if it is not there."""
    import torch

    import optimizer

    key = cache_key(spec.name, spec.version, optimizer.__version__, torch.__version__, spec.output_names, spec.dynamic_axes)
    folder = cache_dir("traces", f"{spec.name}-{key}")
    path = folder / "model.onnx"
    if not path.is_file():
        with progress.step(f"building {spec.name}"):
            module = spec.build()
            example = spec.example_inputs(2, 16)
        with progress.step(f"tracing {spec.name} (once; cached afterwards)"):
            model = frontend.trace(module, example, spec.dynamic_axes, spec.output_names)
        store(model, folder)
    return path


def store(model: ir.Model, folder) -> None:
    # The data file is written first (atomically by onnx_ir); model.onnx appears only by the
    # final rename, so a cut-off run leaves no model.onnx and the next run traces again.
    building = folder / f"building-{uuid.uuid4().hex[:8]}.onnx"
    ir.save(model, building, external_data="model.onnx.data")
    os.replace(building, folder / "model.onnx")
