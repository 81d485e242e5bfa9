"""Lowering for TensorRT 10.x / 11.x: a strongly typed, Q/DQ-legal ONNX graph and its engine plan.

``--target tensorrt`` (or ``tensorrt:precision=bf16,version=10.15,shapes=batch=1:4:16;sequence=1:128:512``):

1. the quantize pass's decisions become TensorRT's Q/DQ form (``tensorrt_qdq``: weight-only
   int8, int8 GEMMs, int4 blocks, ``fp8=true`` for E4M3; ``dynamic`` lowers as weight-only);
2. TopK's K is made a build-time constant by constant folding where it can be, and must be
   at most 3840 (``tensorrt_ops.TOPK_MAX``);
3. the graph becomes strongly typed in ``precision`` (``tensorrt_types``: fp16 by default, bf16,
   or fp32) with float32 kept where it matters and float32 inputs and outputs;
4. ``tensorrt_legal`` checks the result and names every offending node; an illegal graph is an
   error, never an artifact that fails later in TensorRT's parser;
5. the engines to build and their optimization profiles are recorded (``tensorrt_profiles``).

Engines are built by ``optimizer.lower.tensorrt_build`` where ``tensorrt`` imports (never here:
this module runs everywhere); where it does not, one line says so and the artifact holds the
TensorRT-ready graph.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import onnx_ir as ir

from optimizer.lower import tensorrt_ops as ops
from optimizer.lower.tensorrt_legal import require_legal
from optimizer.lower.tensorrt_profiles import DEFAULT_RANGES, Range, engine_profiles, parse_shapes
from optimizer.lower.tensorrt_qdq import lower_qdq
from optimizer.lower.tensorrt_types import LOW, convert
from runtime.errors import PassError

PRECISIONS = ("fp16", "bf16", "fp32")


@dataclass
class TensorRTOptions:
    precision: str = "fp16"
    fp8: bool = False
    version: ops.Version = ops.DEFAULT_VERSION
    shapes: dict[str, Range] = field(default_factory=dict)


def parse_options(text: str) -> TensorRTOptions:
    """Options after ``tensorrt:``; ``shapes`` takes NAME=MIN:OPT:MAX items joined by ';' (or ',')."""
    opts = TensorRTOptions()
    shapes: list[str] = []
    key = ""
    for item in (p for p in text.split(",") if p.strip()):
        name, eq, value = item.partition("=")
        if eq and name.strip() in ("precision", "fp8", "version", "shapes"):
            key = name.strip()
            _set(opts, key, value.strip(), shapes)
        elif key == "shapes":
            shapes.append(item)  # the next NAME=MIN:OPT:MAX of a comma-joined shapes list
        else:
            raise PassError(f"the tensorrt target has no option {item.strip()!r}; its options are precision=fp16|bf16|fp32, "
                            "fp8=true|false, version=10.13, shapes=NAME=MIN:OPT:MAX;...")
    opts.shapes = parse_shapes(",".join(shapes))
    return opts


def _set(opts: TensorRTOptions, key: str, value: str, shapes: list[str]) -> None:
    if key == "precision":
        if value not in PRECISIONS:
            raise PassError(f"precision={value!r} is not one TensorRT lowering knows; use one of {', '.join(PRECISIONS)}.")
        opts.precision = value
    elif key == "fp8":
        if value.lower() not in ("true", "false", "1", "0"):
            raise PassError(f"fp8={value!r} is not a boolean; write fp8=true or fp8=false.")
        opts.fp8 = value.lower() in ("true", "1")
    elif key == "version":
        opts.version = ops.parse_version(value)
    else:
        shapes.append(value)


def lower_tensorrt(model: ir.Model, options: TensorRTOptions | None = None) -> tuple[ir.Model, dict]:
    """Make ``model`` TensorRT-ready in place; returns it and the details for the manifest."""
    opts = options or TensorRTOptions()
    quantization = lower_qdq(model, fp8=opts.fp8)
    _static_topk(model)
    typed = convert(model, opts.precision)
    require_legal(model, opts.version)
    from optimizer.artifact import signature

    inputs = signature(model.graph.inputs)
    details = {
        "tensorrt_version": f"{opts.version[0]}.{opts.version[1]}", "opset": model.opset_imports.get("", 0),
        "precision": typed, "quantization": quantization, "strongly_typed": True,
        "shape_ranges": {**{k: list(v) for k, v in DEFAULT_RANGES.items()}, **{k: list(v) for k, v in opts.shapes.items()}},
        "engines": engine_profiles({"model": inputs}, opts.shapes),
    }
    details["engine_build"] = _engine_note()
    return model, details


def _static_topk(model: ir.Model) -> None:
    """Fold constants so TopK's K is a build-time constant; refuse a K that stays dynamic or is too large."""
    topks = [n for n in model.graph if n.op_type == "TopK"]
    if any(ir.convenience.get_const_tensor(n.inputs[1]) is None for n in topks):
        import onnxscript.optimizer

        onnxscript.optimizer.fold_constants(model)
        topks = [n for n in model.graph if n.op_type == "TopK"]
    for node in topks:
        k = ir.convenience.get_const_tensor(node.inputs[1])
        if k is None:
            raise PassError(f"TopK {node.name!r} takes K from a value computed at run time; TensorRT needs a constant K "
                            f"(at most {ops.TOPK_MAX}): make K a constant in the model.")
        if int(k.numpy().reshape(-1)[0]) > ops.TOPK_MAX:
            raise PassError(f"TopK {node.name!r} has K = {int(k.numpy().reshape(-1)[0])} but TensorRT allows at most "
                            f"{ops.TOPK_MAX}; take a smaller K or split the selection.")


def tensorrt_available() -> bool:
    """Whether TensorRT's Python package (not just its type stubs) imports."""
    try:
        import tensorrt
    except ImportError:
        return False
    return hasattr(tensorrt, "Builder")


def _engine_note() -> str:
    if tensorrt_available():
        return "engines are built by `python -m optimizer.lower.tensorrt_build ARTIFACT`"
    print("carve: TensorRT is not installed here, so the artifact holds the TensorRT-ready graph; build its engines "
          "with `python -m optimizer.lower.tensorrt_build ARTIFACT` on a machine with TensorRT.", file=sys.stderr)
    return "not built: the tensorrt package is not importable where the artifact was made"


__all__ = ["LOW", "PRECISIONS", "TensorRTOptions", "lower_tensorrt", "parse_options", "tensorrt_available"]
