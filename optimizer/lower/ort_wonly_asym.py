"""Lowering asymmetric int4 decisions (``quantize:mode=w4,sym=false``) to ONNX Runtime CPU kernels.

Inputs are the affine forms of ``passes.quantize_asym_graph`` (``DequantizeLinear`` of uint4,
then a float offset per block added): a MatMul site reading one, or a table (the form's last
node carries the ``carve.quantize`` table record) read by Gathers and/or a tied head.

- a site becomes ``com.microsoft.MatMulNBits`` without zero points, which computes x (q - 8) d
  (its default zero point for 4 bits), plus the offsets' share: x W = x (q - 8) d + S(x) (m + 8 d)
  where S(x) [..., nb] sums x over each block of K (``MatMul`` by a 0/1 [K, nb] matrix, computed
  once per activation and shared by the sites reading it, such as Q, K and V), then a small
  ``MatMul`` by the [nb, N] adjusted offsets and an ``Add``. A following constant bias ``Add`` is
  folded into the kernel. Measured: the kernel's own float zero points (zp = -m / d, which it
  accepts for 4 bits) ran 45 times slower for one token (ORT 1.32 dequantizes the whole weight
  per call on that path), integer zero points 1.5 times slower, so neither is used;
- a table's head becomes the same; its Gathers become ``GatherBlockQuantized`` on the same
  packed initializer. That kernel also computes (q - 8) d, so the gathered rows get ``m + 8 d``
  per block added (a plain ``Gather`` of the [rows, blocks] adjusted offsets, then ``Add``);
- per-channel forms (one block spanning K) repeat the step and offset over blocks of
  ``PER_CHANNEL_BLOCK``, which is exact, as for symmetric weights.

Steps and offsets stored in float16 stay float16 in the artifact: the kernels read float32, so
a ``Cast`` (and the adjusted offsets' ``Mul``/``Add``/``Transpose``) sit on constants, which
ORT folds when the session loads, before the kernels pack their weights.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from optimizer.lower import ort_wonly as wonly
from passes import quantize_asym_graph as affine_form
from passes.quantize_rewrite import constant

BITS = 4
UNSIGNED_DEFAULT_ZERO = 8  # both kernels' zero point for 4-bit values when none is given


def lower_site(graph: ir.Graph, node: ir.Node, form: affine_form.Affine, accuracy_level: int, sums: dict) -> None:
    step, offset, block = _kernel_blocks(form)
    add, bias = wonly._bias_after(node)
    name = node.name
    scales, nodes = _float(graph, f"{name}_nbits_scale", step.T, form.half)
    adjusted, more = _adjusted_offsets(graph, f"{name}_nbits", offset.T, scales, form.half)
    inputs = [node.inputs[0], constant(graph, f"{name}_nbits", wonly.pack_unsigned(form.q, block, BITS)), scales]
    if bias is not None:
        inputs += [None, None, constant(graph, f"{name}_nbits_bias", bias)]
    graph.insert_before(node, nodes + more)
    kernel = wonly._matmul_nbits(inputs, form.q.shape, BITS, block, accuracy_level, name)
    _with_offset_term(graph, node, add, kernel, adjusted, form.q.shape[0], block, sums)
    affine_form.remove(graph, form)


def lower_table(graph: ir.Graph, last: ir.Node, info: dict, counts: dict, accuracy_level: int, sums: dict) -> None:
    """The head and Gathers of an asymmetric table, all reading one packed initializer."""
    form = affine_form.read(last.outputs[0])
    step, offset, block = _kernel_blocks(_as_weight(form))
    rows, cols = form.q.shape
    name = info["table"]
    data = constant(graph, f"{name}_nbits", wonly.pack_unsigned(form.q.T, block, BITS))
    scales, nodes = _float(graph, f"{name}_nbits_scale", step.T, form.half)
    adjusted, more = _adjusted_offsets(graph, name, offset.T, scales, form.half)
    graph.insert_before(wonly.first_reader_of(graph, last.outputs[0]), nodes + more)
    for use in list(last.outputs[0].uses()):
        reader = use.node
        if reader.op_type == "Gather" and use.idx == 0:
            correction = _gather_correction(graph, reader, adjusted)
            wonly._gather(graph, reader, data, scales, (rows, cols), BITS, block, correction)
            counts["GatherBlockQuantized"] += 1
        elif reader.op_type == "Transpose" and wonly._head_of(reader) is not None:
            head = wonly._head_of(reader)
            kernel = wonly._matmul_nbits([head.inputs[0], data, scales], (cols, rows), BITS, block, accuracy_level, head.name)
            _with_offset_term(graph, head, None, kernel, adjusted, cols, block, sums)
            graph.remove(reader, safe=True)
            counts["MatMulNBits"] += 1
    affine_form.remove(graph, form)


def _with_offset_term(graph: ir.Graph, node: ir.Node, add: ir.Node | None, kernel: ir.Node, adjusted: ir.Value,
                      k: int, block: int, sums: dict) -> None:
    """``kernel`` (x (q - 8) d) + block sums of x @ (m + 8 d) take over ``node`` (and its bias ``add``)."""
    x, name = node.inputs[0], node.name
    block_sums = _block_sums(graph, x, k, block, sums, node)
    offsets_kn = ir.node("Transpose", [adjusted], attributes={"perm": [1, 0]}, name=f"{name}_offsets_kn")
    term = ir.node("MatMul", [block_sums, offsets_kn.outputs[0]], name=f"{name}_offset_term")
    total = ir.node("Add", [kernel.outputs[0], term.outputs[0]], name=f"{name}_with_offsets")
    for new in (offsets_kn, term):
        new.outputs[0].name, new.outputs[0].type = new.name, ir.TensorType(ir.DataType.FLOAT)
    kernel.outputs[0].name, kernel.outputs[0].type = f"{kernel.name}_out", ir.TensorType(ir.DataType.FLOAT)
    graph.insert_before(node, [kernel, offsets_kn, term])
    wonly._replace(graph, node, add, total)


def _block_sums(graph: ir.Graph, x: ir.Value, k: int, block: int, sums: dict, before: ir.Node) -> ir.Value:
    """x [..., K] summed per block of K: ``x @ S`` with S [K, nb] of 0/1, once per (x, block)."""
    key = (id(x), block)
    if key not in sums:
        name = f"{x.name or before.name}_block_sums_{block}"
        node = ir.node("MatMul", [x, _indicator(graph, k, block, sums)], name=name)
        node.outputs[0].name, node.outputs[0].type = name, ir.TensorType(ir.DataType.FLOAT)
        graph.insert_before(before, [node])
        sums[key] = node.outputs[0]
    return sums[key]


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


def _indicator(graph: ir.Graph, k: int, block: int, sums: dict) -> ir.Value:
    """The 0/1 [K, nb] matrix summing each block of K, one per (K, block) in the graph."""
    key = ("indicator", k, block)
    if key not in sums:
        nb = -(-k // block)
        indicator = (np.arange(k)[:, None] // block == np.arange(nb)[None, :]).astype(np.float32)
        sums[key] = constant(graph, f"block_sums_{k}_by_{block}", indicator)
    return sums[key]


def _adjusted_offsets(graph, name, offset: np.ndarray, scales: ir.Value, half: bool) -> tuple[ir.Value, list[ir.Node]]:
    """m + 8 d, [N, nb] like the scales: the kernels' default zero point 8 takes 8 d off every value."""
    offset_value, nodes = _float(graph, f"{name}_offset", offset, half)
    eight = constant(graph, f"{name}_eight", np.array(UNSIGNED_DEFAULT_ZERO, np.float32))
    shift = ir.node("Mul", [scales, eight], name=f"{name}_eight_steps")
    adjusted = ir.node("Add", [offset_value, shift.outputs[0]], name=f"{name}_adjusted_offset")
    for node in (shift, adjusted):
        _typed(node, offset.shape, node.name)
    return adjusted.outputs[0], nodes + [shift, adjusted]


def _gather_correction(graph, gather: ir.Node, adjusted: ir.Value) -> list[ir.Node]:
    """Gather(m + 8 d, indices) unsqueezed to [..., nb, 1], added to GatherBlockQuantized's [..., nb, B]."""
    name = gather.name
    rows = ir.node("Gather", [adjusted, gather.inputs[1]], attributes={"axis": 0}, name=f"{name}_offset_rows")
    last = ir.node("Unsqueeze", [rows.outputs[0], constant(graph, f"{name}_last_axis", np.array([-1], np.int64))],
                   name=f"{name}_offset_rows_3d")
    for node in (rows, last):
        node.outputs[0].name, node.outputs[0].type = node.name, ir.TensorType(ir.DataType.FLOAT)
    return [rows, last]


def _typed(node: ir.Node, shape, name: str) -> None:
    node.outputs[0].name, node.outputs[0].type = name, ir.TensorType(ir.DataType.FLOAT)
    node.outputs[0].shape = ir.Shape(list(shape))
