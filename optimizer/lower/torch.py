"""Lowering for torch: the optimized IR as a ``torch.fx.GraphModule``, built node by node.

``build_graph_module(model, matmul=..., device=...)`` makes one fx ``call_function`` per ONNX
node (``optimizer.lower.torch_ops*`` hold the operators), graph inputs as placeholders in
order, outputs as a tuple in the graph's output order. Initializers and ``Constant`` nodes
become buffers on the module (``.to(device)`` moves them). Shapes are computed at run time
as Python ints (``optimizer.lower.torch_shapes``), so the module accepts any batch and
sequence length, never waits on the device for a shape, and ``torch.compile`` traces it
without graph breaks.

Quantize-pass decisions get int8 or fp8 kernels per ``matmul`` (``optimizer.lower.torch_quant``).
Refused with a ``PassError`` naming the node: an operator with no torch implementation
(including ``com.microsoft`` operators, which only ONNX Runtime's lowering emits), an
attribute the implementation does not take, ``Scan`` (``If`` and ``Loop`` run their subgraphs as
submodules: ``optimizer.lower.torch_control``), a used
output the implementation does not produce, an element type torch lacks.

``lower_torch(model)`` is the ``--target torch`` lowering: it keeps the target-neutral graph
(the artifact stores it as ``model.onnx``; the runtime rebuilds the module on load) and builds
the module once to prove every node lowers.
"""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir
import torch

from optimizer.lower import torch_quant
from optimizer.lower.torch_build import OPS, GraphBuilder

__all__ = ["OPS", "build_graph_module", "lower_torch"]



def lower_torch(model: ir.Model) -> tuple[ir.Model, dict]:
    """Check that every node lowers to torch; the artifact keeps the target-neutral graph."""
    _inline_functions(model)
    module = build_graph_module(model)
    ops = Counter(n.op_type for n in model.graph)
    decided = len(torch_quant.plan(model, "int8"))
    return model, {"torch": torch.__version__, "fx_nodes": len(module.graph.nodes), "operators": dict(sorted(ops.items())),
                   "int8_kernel_sites": decided}


def build_graph_module(model: ir.Model, matmul: str = "dequantize", device: str = "cpu") -> torch.fx.GraphModule:
    """The model as a GraphModule on the CPU (move it with ``.to(device)``); ``device`` picks ``auto`` kernels."""
    choice = torch_quant.resolve_choice(matmul, torch.device(device).type)
    _inline_functions(model)
    return GraphBuilder(model.graph, torch_quant.plan(model, choice)).build()


def _inline_functions(model: ir.Model) -> None:
    if model.functions:
        import onnx_ir.passes.common as common

        common.InlinePass()(model)
