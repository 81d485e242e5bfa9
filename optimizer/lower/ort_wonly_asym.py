"""Lowering asymmetric int4 decisions (``quantize:mode=w4,sym=false``) to ONNX Runtime CPU kernels.

Inputs are the affine forms of ``passes.quantize_asym_graph`` (``DequantizeLinear`` of uint4,
then a float offset per block added): a MatMul site reading one, or a table (the form's last
node carries the ``carve.quantize`` table record) read by Gathers and/or a tied head.

- a site becomes ``com.microsoft.MatMulNBits`` with a **float zero point** per block: the kernel
  computes (q - zp) d, so zp = -m / d gives d q + m (4 bits only: ORT's CPU kernel refuses float
  zero points for 8 bits). A following constant bias ``Add`` is folded in;
- a table's head becomes the same; its Gathers become ``GatherBlockQuantized`` on the same
  packed initializer. That kernel takes only integer zero points, and with none it computes
  (q - 8) d, so the gathered rows get ``m + 8 d`` per block added (a plain ``Gather`` of a
  [rows, blocks] tensor, then ``Add`` over the blocks);
- per-channel forms (one block spanning K) repeat the step and offset over blocks of
  ``PER_CHANNEL_BLOCK``, which is exact, as for symmetric weights.

Steps and offsets stored in float16 stay float16 in the artifact: the kernels read float32, so
a ``Cast`` (and the zero point's ``Neg``/``Div``, the offset correction's ``Mul``/``Add``) sit
on constants, which ORT folds when the session loads, before the kernels pack their weights.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from optimizer.lower import ort_wonly as wonly
from passes import quantize_asym_graph as affine_form
from passes.quantize_rewrite import constant

BITS = 4
UNSIGNED_DEFAULT_ZERO = 8  # GatherBlockQuantized's zero point for 4-bit values held in uint8


def lower_site(graph: ir.Graph, node: ir.Node, form: affine_form.Affine, accuracy_level: int) -> None:
    step, offset, block = _kernel_blocks(form)
    packed = wonly.pack_unsigned(form.q, block, BITS)
    add, bias = wonly._bias_after(node)
    name = node.name
    scales, prelude = _float(graph, f"{name}_nbits_scale", step.T, form.half)
    zero, more = _zero_point(graph, name, scales, offset.T, form.half)
    inputs = [node.inputs[0], constant(graph, f"{name}_nbits", packed), scales, zero]
    if bias is not None:
        inputs += [None, constant(graph, f"{name}_nbits_bias", bias)]
    graph.insert_before(node, prelude + more)
    wonly._replace(graph, node, add, wonly._matmul_nbits(inputs, form.q.shape, BITS, block, accuracy_level, name))
    affine_form.remove(graph, form)


def lower_table(graph: ir.Graph, last: ir.Node, info: dict, counts: dict, accuracy_level: int) -> None:
    """The head and Gathers of an asymmetric table, all reading one packed initializer."""
    form = affine_form.read(last.outputs[0])
    step, offset, block = _kernel_blocks(_as_weight(form))
    rows, cols = form.q.shape
    name = info["table"]
    data = constant(graph, f"{name}_nbits", wonly.pack_unsigned(form.q.T, block, BITS))
    scales, prelude = _float(graph, f"{name}_nbits_scale", step.T, form.half)
    graph.insert_before(wonly.first_reader_of(graph, last.outputs[0]), prelude)
    for use in list(last.outputs[0].uses()):
        reader = use.node
        if reader.op_type == "Gather" and use.idx == 0:
            correction = _gather_correction(graph, reader, scales, offset.T, form.half)
            wonly._gather(graph, reader, data, scales, (rows, cols), BITS, block, correction)
            counts["GatherBlockQuantized"] += 1
        elif reader.op_type == "Transpose" and wonly._head_of(reader) is not None:
            head = wonly._head_of(reader)
            zero, more = _zero_point(graph, head.name, scales, offset.T, form.half)
            graph.insert_before(head, more)
            inputs = [head.inputs[0], data, scales, zero]
            kernel = wonly._matmul_nbits(inputs, (cols, rows), BITS, block, accuracy_level, head.name)
            wonly._replace(graph, head, None, kernel)
            graph.remove(reader, safe=True)
            counts["MatMulNBits"] += 1
    affine_form.remove(graph, form)


def _as_weight(form: affine_form.Affine) -> affine_form.Affine:
    """A table form (blocks along its columns) seen as the [C, R] weight the head multiplies by."""
    return affine_form.Affine(form.q.T, form.step.T, form.offset.T, form.block, 0, form.nodes, form.half)


def _kernel_blocks(form: affine_form.Affine) -> tuple[np.ndarray, np.ndarray, int]:
    """(step [nb, N], offset [nb, N], block) as the kernels take them: one block spanning K
    (per channel) becomes blocks of PER_CHANNEL_BLOCK with the same step and offset."""
    k = form.q.shape[0]
    if not (form.step.shape[0] == 1 and form.block == k):
        return form.step, form.offset, form.block
    blocks = -(-k // wonly.PER_CHANNEL_BLOCK)
    return np.repeat(form.step, blocks, 0), np.repeat(form.offset, blocks, 0), wonly.PER_CHANNEL_BLOCK


def _float(graph: ir.Graph, name: str, array: np.ndarray, half: bool) -> tuple[ir.Value, list[ir.Node]]:
    """A float32 value of ``array``: stored as float16 behind a Cast when it was float16 (exact)."""
    array = np.ascontiguousarray(array)
    if not half:
        return constant(graph, name, array.astype(np.float32)), []
    cast = ir.node("Cast", [constant(graph, f"{name}_fp16", array.astype(np.float16))],
                   attributes={"to": ir.DataType.FLOAT}, name=f"{name}_cast")
    _typed(cast, array.shape, name)
    return cast.outputs[0], [cast]


def _zero_point(graph, name, scales: ir.Value, offset: np.ndarray, half: bool) -> tuple[ir.Value, list[ir.Node]]:
    """zp = -m / d, [N, nb], computed on constants (folded by ORT at load)."""
    offset_value, nodes = _float(graph, f"{name}_nbits_offset", offset, half)
    neg = ir.node("Neg", [offset_value], name=f"{name}_nbits_neg_offset")
    _typed(neg, offset.shape, f"{name}_nbits_neg_offset")
    div = ir.node("Div", [neg.outputs[0], scales], name=f"{name}_nbits_zero")
    _typed(div, offset.shape, f"{name}_nbits_zero")
    return div.outputs[0], nodes + [neg, div]


def _gather_correction(graph, gather: ir.Node, scales: ir.Value, offset: np.ndarray, half: bool) -> list[ir.Node]:
    """Nodes computing Gather(m + 8 d, indices) unsqueezed to [..., nb, 1]; the last one's output
    is added to GatherBlockQuantized's [..., nb, B] result."""
    name = gather.name
    offset_value, nodes = _float(graph, f"{name}_offset", offset, half)
    eight = constant(graph, f"{name}_eight", np.array(UNSIGNED_DEFAULT_ZERO, np.float32))
    shift = ir.node("Mul", [scales, eight], name=f"{name}_shift")
    adjusted = ir.node("Add", [offset_value, shift.outputs[0]], name=f"{name}_adjusted_offset")
    rows = ir.node("Gather", [adjusted.outputs[0], gather.inputs[1]], attributes={"axis": 0}, name=f"{name}_offset_rows")
    last = ir.node("Unsqueeze", [rows.outputs[0], constant(graph, f"{name}_last_axis", np.array([-1], np.int64))],
                   name=f"{name}_offset_rows_3d")
    for node in (shift, adjusted, rows, last):
        node.outputs[0].name, node.outputs[0].type = node.name, ir.TensorType(ir.DataType.FLOAT)
    return nodes + [shift, adjusted, rows, last]


def _typed(node: ir.Node, shape, name: str) -> None:
    node.outputs[0].name, node.outputs[0].type = name, ir.TensorType(ir.DataType.FLOAT)
    node.outputs[0].shape = ir.Shape(list(shape))
