"""Lowering for ONNX Runtime on the CPU.

Checks the graph's opsets are ones the installed ONNX Runtime implements (a newer exporter can
emit a newer opset than an older ORT runs) and records the ORT version the artifact was made
for. Graphs carrying the quantize pass's decisions get their CPU kernels and the fusions
around them from ``optimizer.lower.ort_quant``.
"""

from __future__ import annotations

import onnx_ir as ir
import onnxruntime as ort

from runtime.errors import PassError

# The highest default-domain opset each ONNX Runtime minor version implements.
_MAX_OPSET = {17: 20, 18: 21, 19: 21, 20: 21, 21: 22, 22: 23}


def lower_ort(model: ir.Model) -> tuple[ir.Model, dict]:
    minor = int(ort.__version__.split(".")[1])
    limit = _MAX_OPSET.get(minor, 23 if minor > 22 else 17)
    opset = model.opset_imports.get("", 0)
    if opset > limit:
        raise PassError(f"the graph uses ONNX opset {opset} but onnxruntime {ort.__version__} runs at most {limit}; upgrade onnxruntime.")
    details = {"onnxruntime": ort.__version__, "opset": opset}
    from optimizer.lower.ort_quant import has_decisions, lower_quantized

    if has_decisions(model):
        details["quantization"] = lower_quantized(model)
    return model, details
