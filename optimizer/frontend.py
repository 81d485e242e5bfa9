"""Frontends: torch modules are traced into onnx_ir, ONNX files are loaded into it.

``trace`` uses torch's own exporter (``torch.onnx.export(dynamo=True)``), whose ``ONNXProgram``
already holds an ``onnx_ir.Model`` with every node's module scope in its metadata; carve keeps
that metadata (the model map reads it) and drops the parts that only repeat the Python stack.
``load`` reads an ``.onnx`` file (with external data) and turns every way it can be broken into
one ``ModelLoadError`` sentence.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from runtime.errors import ModelLoadError

# Metadata the exporter writes that only repeats Python stack frames (and machine paths).
_DROPPED_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")

DynamicAxes = Mapping[str, Mapping[int, str]]


def trace(
    module: Any,
    example_inputs: Mapping[str, Any] | tuple,
    dynamic_axes: DynamicAxes | None = None,
    output_names: list[str] | None = None,
) -> ir.Model:
    """Trace a torch module into an ``onnx_ir.Model``.

    ``example_inputs`` is a dict of keyword tensors (names become graph input names) or a tuple
    of positional tensors. ``dynamic_axes`` maps an input name to ``{axis: dim_name}``; the
    graph's symbolic dims carry those names (``batch``, ``sequence``). The module is deep-copied
    first: exporting changes some Hugging Face models' later outputs.
    """
    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" noise
    module = copy.deepcopy(module).eval()
    args, kwargs = ((), dict(example_inputs)) if isinstance(example_inputs, Mapping) else (tuple(example_inputs), {})
    dynamic_shapes = _dynamic_shapes(kwargs, dynamic_axes) if kwargs and dynamic_axes else None
    if args and dynamic_axes:
        raise ModelLoadError("Dynamic axes need named inputs; pass example_inputs as a dict of tensors.")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, args, kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic_shapes,
                output_names=output_names, verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; the user needs one sentence
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"torch could not trace the model ({first}); check the example inputs match its forward().") from exc
    model = program.model
    _strip_metadata(model)
    return model


def _dynamic_shapes(kwargs: dict, dynamic_axes: DynamicAxes) -> dict:
    import torch

    dims: dict[str, Any] = {}
    shapes: dict[str, Any] = {}
    for name in kwargs:
        axes = dynamic_axes.get(name)
        if not axes:
            shapes[name] = None
            continue
        shapes[name] = {axis: dims.setdefault(dim, torch.export.Dim(dim)) for axis, dim in axes.items()}
    unknown = set(dynamic_axes) - set(kwargs)
    if unknown:
        raise ModelLoadError(f"dynamic_axes names inputs the model is not given ({', '.join(sorted(unknown))}); use the example_inputs' names.")
    return shapes


def _strip_metadata(model: ir.Model) -> None:
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for key in _DROPPED_METADATA:
            node.metadata_props.pop(key, None)


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file (and its external data) into an ``onnx_ir.Model``."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path} does not exist; give the path of an .onnx file or a built-in model name.")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory, not an ONNX file; give the .onnx file inside it.")
    try:
        proto = onnx.load(str(path), load_external_data=True)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(f"{path} is not a readable ONNX model ({type(exc).__name__}); re-export it or check the file is complete.") from exc
    if not proto.graph.node or not proto.opset_import or proto.ir_version == 0:
        raise ModelLoadError(f"{path} is not an ONNX model (no graph or opset found); check the file is an .onnx export and is complete.")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelLoadError(f"{path} is not a valid ONNX model ({first}); re-export it.") from exc
    return ir.serde.deserialize_model(proto)
