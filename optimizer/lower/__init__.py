"""Lowering the optimized IR to a target. ``ort-cpu`` is the embedded default."""

from __future__ import annotations

import onnx_ir as ir

from runtime.errors import PassError


class _Targets(tuple):
    """Target names; ``in`` also accepts a known target with options, e.g. ``tensorrt:precision=bf16``."""

    def __contains__(self, spec: object) -> bool:
        return tuple.__contains__(self, str(spec).split(":", 1)[0])


TARGETS = _Targets(("ort-cpu", "tensorrt", "torch"))


def lower(model: ir.Model, target: str) -> tuple[ir.Model, dict]:
    """Make ``model`` legal and fast for ``target``; returns the model and what lowering did."""
    if target == "ort-cpu":
        from optimizer.lower.ort import lower_ort

        return lower_ort(model)
    if target == "torch":
        from optimizer.lower.torch import lower_torch

        return lower_torch(model)
    if target.split(":", 1)[0] == "tensorrt":
        from optimizer.lower.tensorrt import lower_tensorrt, parse_options

        return lower_tensorrt(model, parse_options(target.partition(":")[2]))
    raise PassError(f"target {target!r} is not available in this version of carve; the targets are: {', '.join(TARGETS)}.")
