"""Lowering weight-only decisions (``w8``, ``w4``, quantized tables) to ONNX Runtime CPU kernels.

Inputs, as ``passes.quantize_rewrite`` and ``passes.quantize_embed`` write them:

- a site: ``MatMul(x, DequantizeLinear(q [K, N], scale))`` with ``carve.quantize`` mode ``w8``
  or ``w4``; scale ``[N]`` (per channel), ``[]`` (per tensor) or ``[ceil(K/B), N]`` (blocks of B
  along K). It becomes ``com.microsoft.MatMulNBits(x, B, scales, bias=...)``, a following
  constant bias ``Add`` folded in;
- a table: ``DequantizeLinear(q [R, C], scale)`` carrying ``carve.quantize`` with ``table``,
  read by ``Gather`` nodes and/or by ``Transpose`` -> head ``MatMul``. The head becomes
  ``MatMulNBits`` (N = R, K = C: the table's own layout) and each Gather becomes
  ``com.microsoft.GatherBlockQuantized`` reading the *same* packed initializer (3-D
  ``[R, blocks, bytes per block]``, quantize axis 2, its scales reshaped to ``[R, blocks, 1]``),
  so the table is stored once.

Asymmetric int4 (``sym=false``: the affine form of ``passes.quantize_asym_graph``) is lowered
to the same kernels with float zero points by ``optimizer.lower.ort_wonly_asym``.

Packing, as both kernels read it: values offset to unsigned (``q + 2^(bits-1)``, which is the
kernels' default zero point, so none is stored), rows = output channels, K padded with zeros to
whole blocks, 4-bit values two to a byte, low nibble first. A per-channel or per-tensor scale is
repeated for every block of ``PER_CHANNEL_BLOCK`` (exactly the same numbers); block sizes the
kernels take are powers of two from 16.

``ACCURACY_LEVEL`` is MatMulNBits' compute type: 4 quantizes the activations to int8 per block
inside the kernel (ORT's own default when it fuses ``DequantizeLinear`` + ``MatMul`` itself), 0/1
compute in float32 (exactly the decision's numbers). Chosen by measurement (docs/quantize.md).
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from passes.quantize_asym_graph import AFFINE
from passes.quantize_asym_graph import read as read_affine
from passes.quantize_rewrite import META, constant, first_reader

MS = "com.microsoft"
WEIGHT_ONLY = ("w8", "w4")
PER_CHANNEL_BLOCK = 128
ACCURACY_LEVEL = 4


def first_reader_of(graph: ir.Graph, value: ir.Value) -> ir.Node:
    return first_reader(graph, [use.node for use in value.uses()])


def lower_weight_only(model: ir.Model, accuracy_level: int = ACCURACY_LEVEL) -> dict:
    """Replace weight-only sites and quantized tables by ORT kernels; returns counts."""
    from optimizer.lower import ort_wonly_asym as asym  # it builds on this module's helpers

    graph = model.graph
    counts = {"MatMulNBits": 0, "GatherBlockQuantized": 0}
    block_sums: dict = {}  # asymmetric sites: per (activation, block), its block sums, shared
    for node in list(graph):
        info = _info(node)
        if info is None:
            continue
        if "table" in info and AFFINE in node.metadata_props:
            asym.lower_table(graph, node, info, counts, accuracy_level, block_sums)
        elif node.op_type == "DequantizeLinear" and "table" in info:
            _table(graph, node, info, counts, accuracy_level)
        elif node.op_type == "MatMul" and info.get("mode") in WEIGHT_ONLY and _dq_weight(node) is not None:
            _site(graph, node, info, accuracy_level)
            counts["MatMulNBits"] += 1
        elif node.op_type == "MatMul" and info.get("mode") in WEIGHT_ONLY and read_affine(node.inputs[1]) is not None:
            asym.lower_site(graph, node, read_affine(node.inputs[1]), accuracy_level, block_sums)
            counts["MatMulNBits"] += 1
    model.opset_imports.setdefault(MS, 1)
    return {k: v for k, v in counts.items() if v}


def _info(node: ir.Node) -> dict | None:
    text = node.metadata_props.get(META)
    return json.loads(text) if text else None


def _dq_weight(node: ir.Node) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(q [K, N], scale, block) of the DequantizeLinear feeding a MatMul's weight, or None."""
    dq = node.inputs[1].producer() if node.inputs[1] is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.inputs) > 2 and dq.inputs[2] is not None:
        return None
    q, scale = (ir.convenience.get_const_tensor(v) for v in dq.inputs[:2])
    if q is None or scale is None or dq.attributes.get_int("axis", 1) not in (0, 1) and scale.shape.dims:
        return None
    return q.numpy(), scale.numpy().astype(np.float32), dq.attributes.get_int("block_size", 0)


def pack(q: np.ndarray, scale: np.ndarray, block: int, bits: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(B uint8 [N, nb, blob], scales float32 [N, nb], block) of ``q`` [K, N] (module docstring)."""
    k, n = q.shape
    if not block:  # per channel [N] or per tensor []: the same scale for every block
        block = PER_CHANNEL_BLOCK
        scale = np.broadcast_to(np.broadcast_to(scale, (n,))[None], (-(-k // block), n))
    shifted = (q.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    return pack_unsigned(shifted, block, bits, 1 << (bits - 1)), np.ascontiguousarray(np.asarray(scale, np.float32).T), block


def pack_unsigned(u: np.ndarray, block: int, bits: int, padding: int = 0) -> np.ndarray:
    """uint8 [N, nb, blob] of unsigned values ``u`` [K, N] (K padded to whole blocks with ``padding``)."""
    k, n = u.shape
    nb = -(-k // block)
    unsigned = np.full((n, nb * block), padding, np.uint8)
    unsigned[:, :k] = u.T
    if bits == 4:
        unsigned = unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)
    return unsigned.reshape(n, nb, -1)


def _site(graph: ir.Graph, node: ir.Node, info: dict, accuracy_level: int) -> None:
    q, scale, block = _dq_weight(node)
    dq = node.inputs[1].producer()
    bits = int(info.get("bits", 8))
    packed, scales, block = pack(q, scale, block, bits)
    add, bias = _bias_after(node)
    name = node.name
    inputs = [node.inputs[0], constant(graph, f"{name}_nbits", packed), constant(graph, f"{name}_nbits_scale", scales)]
    if bias is not None:
        inputs += [None, None, constant(graph, f"{name}_nbits_bias", bias)]
    _replace(graph, node, add, _matmul_nbits(inputs, q.shape, bits, block, accuracy_level, name))
    _drop_dq(graph, dq)


def _drop_dq(graph: ir.Graph, dq: ir.Node) -> None:
    """Remove a DequantizeLinear nothing reads any more, and its initializers."""
    if dq.outputs[0].uses() or dq.outputs[0].is_graph_output():
        return
    inputs = list(dq.inputs)
    graph.remove(dq, safe=True)
    for value in inputs:
        if value is not None and value.is_initializer() and not value.uses() and not value.is_graph_output():
            graph.initializers.pop(value.name)


def _matmul_nbits(inputs, kn: tuple[int, int], bits: int, block: int, accuracy_level: int, name: str) -> ir.Node:
    k, n = kn
    return ir.node("MatMulNBits", inputs, domain=MS, name=f"{name}_nbits",
                   attributes={"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": accuracy_level})


def _bias_after(node: ir.Node) -> tuple[ir.Node | None, np.ndarray | None]:
    from optimizer.lower.ort_quant import _bias_after as bias_after

    return bias_after(node)


def _replace(graph: ir.Graph, node: ir.Node, add: ir.Node | None, kernel: ir.Node) -> None:
    """``kernel`` takes over the output of ``node`` (or of its folded bias ``add``)."""
    graph.insert_before(node, [kernel])
    old = (add or node).outputs[0]
    name, old.name = old.name, None
    new = kernel.outputs[0]
    new.name, new.type, new.shape = name, old.type, old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    for dead in (add, node):
        if dead is not None:
            graph.remove(dead, safe=True)


def _table(graph: ir.Graph, dq: ir.Node, info: dict, counts: dict, accuracy_level: int) -> None:
    table = dq.outputs[0]
    q = ir.convenience.get_const_tensor(dq.inputs[0]).numpy()  # [R, C]
    scale = ir.convenience.get_const_tensor(dq.inputs[1]).numpy().astype(np.float32)  # [R, nb] or [R]
    bits, block = int(info["bits"]), int(info["block"])
    packed, scales, block = pack(q.T, scale.T, block, bits)  # rows = table rows
    data = constant(graph, f"{info['table']}_nbits", packed)
    scale_value = constant(graph, f"{info['table']}_nbits_scale", scales)
    for use in list(table.uses()):
        reader = use.node
        if reader.op_type == "Gather" and use.idx == 0:
            _gather(graph, reader, data, scale_value, q.shape, bits, block)
            counts["GatherBlockQuantized"] += 1
        elif reader.op_type == "Transpose" and _head_of(reader) is not None:
            head = _head_of(reader)
            inputs = [head.inputs[0], data, scale_value]
            _replace(graph, head, None, _matmul_nbits(inputs, (q.shape[1], q.shape[0]), bits, block, accuracy_level, head.name))
            graph.remove(reader, safe=True)
            counts["MatMulNBits"] += 1
    _drop_dq(graph, dq)


def _head_of(transpose: ir.Node) -> ir.Node | None:
    uses = transpose.outputs[0].uses()
    if len(uses) == 1 and uses[0].node.op_type == "MatMul" and uses[0].idx == 1:
        return uses[0].node
    return None


def _gather(graph: ir.Graph, gather: ir.Node, data: ir.Value, scales: ir.Value, shape, bits: int, block: int,
            correction: list[ir.Node] | None = None) -> None:
    """GatherBlockQuantized on the 3-D packed table, then back to ``[..., C]``; ``correction``
    (nodes whose last output is [..., nb, 1]) is added per block first (asymmetric tables)."""
    rows, cols = shape
    nb = data.shape[1]
    name = gather.name
    scales_3d = ir.node("Reshape", [scales, constant(graph, f"{name}_scale_shape", np.array([rows, nb, 1], np.int64))],
                        name=f"{name}_scale_3d")
    gbq = ir.node("GatherBlockQuantized", [data, gather.inputs[1], scales_3d.outputs[0]], domain=MS,
                  attributes={"bits": bits, "block_size": block, "gather_axis": 0, "quantize_axis": 2}, name=f"{name}_gbq")
    blocks = [gbq]
    if correction:
        blocks = correction + [gbq, ir.node("Add", [gbq.outputs[0], correction[-1].outputs[0]], name=f"{name}_offset")]
    keep = [0] * len(gather.inputs[1].shape or (0, 0))  # Reshape's 0: keep the index dimensions
    flat = ir.node("Reshape", [blocks[-1].outputs[0], constant(graph, f"{name}_flat", np.array(keep + [nb * block], np.int64))],
                   name=f"{name}_flat")
    nodes = [scales_3d, *blocks, flat]
    if nb * block != cols:
        nodes.append(ir.node("Slice", [flat.outputs[0], constant(graph, f"{name}_s0", np.array([0], np.int64)),
                                       constant(graph, f"{name}_s1", np.array([cols], np.int64)),
                                       constant(graph, f"{name}_sa", np.array([-1], np.int64))], name=f"{name}_cut"))
    graph.insert_before(gather, nodes[:-1])
    _replace(graph, gather, None, nodes[-1])
