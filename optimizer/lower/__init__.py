"""Lowering the optimized IR to a target. ``ort-cpu`` is the embedded default."""

from __future__ import annotations

import onnx_ir as ir

from runtime.errors import PassError

TARGETS = ("ort-cpu",)


def lower(model: ir.Model, target: str) -> tuple[ir.Model, dict]:
    """Make ``model`` legal and fast for ``target``; returns the model and what lowering did."""
    if target == "ort-cpu":
        from optimizer.lower.ort import lower_ort

        return lower_ort(model)
    raise PassError(f"target {target!r} is not available in this version of carve; the targets are: {', '.join(TARGETS)}.")
