"""Lowering the quantize pass's convolution decisions to ONNX Runtime CPU's int8 convolution.

Input: ``Conv``/``ConvTranspose`` nodes with ``carve.quantize`` metadata reading
``DequantizeLinear(QuantizeLinear(x, s))`` and a ``DequantizeLinear``'d int8 weight
(``passes.quantize_conv``). ``QLinearConv`` needs its output's scale, so a site runs in int8
when its output (after at most one ``Relu``) is read only by other decided convolutions'
input quantization, all with one scale: then it becomes ``QLinearConv`` to uint8 at that scale
(zero point 0 when a ``Relu`` follows, which the uint8 range then applies for free; else 128,
the symmetric int8 grid), and the next site reads that uint8 tensor directly. Other sites run
in float with the decision's dequantized int8 weights and an unquantized input (ORT CPU has no
int8 convolution with a float output; quantizing the input there would cost accuracy and time
for nothing), e.g. a ViT's patch embedding, whose output goes on to an Add.

A ``ConvTranspose`` whose kernel is a multiple of its stride (the common 4x4 stride 2 pad 1
upsampler) runs as stride x stride sub-pixel phases: phase (a, b) of the output is an ordinary
convolution of the input with the kernel taps that land on it (kernel/stride taps per axis,
its own padding), the phases are concatenated and ``DepthToSpace`` (DCR) interleaves them.
Measured on the ViT-S decoder's three layers, batch 8, two threads: 134 ms float
``ConvTranspose``, 75 ms one int8 3x3 convolution giving all phases, 49 ms the 2x2 phase
convolutions. Other ``ConvTranspose`` geometries (output_padding, output_shape, auto_pad,
unequal strides, a kernel not a multiple of the stride) keep the float form.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes.quantize_rewrite import constant, decision


class _U8:
    """A lowered site's uint8 output: value, scale value, zero-point value."""

    def __init__(self, value: ir.Value, scale: ir.Value, zero: ir.Value):
        self.value, self.scale, self.zero = value, scale, zero


def lower_convs(model: ir.Model) -> dict[str, int]:
    """Lower every decided convolution in graph order; kernel counts."""
    graph, lowered, counts = model.graph, {}, {"QLinearConv": 0, "float conv (int8 weights, float input)": 0}
    for node in [n for n in graph if n.op_type in ("Conv", "ConvTranspose") and _decided(n)]:
        out = _output_plan(node)
        phases = _phases(node) if node.op_type == "ConvTranspose" else [(_conv_attributes(node), None)]
        if out is None or phases is None:
            _float_input(node)
            counts["float conv (int8 weights, float input)"] += 1
            continue
        held, float_view = _emit(graph, node, _input_u8(graph, node, lowered), out, phases)
        lowered[id(float_view)] = held
        counts["QLinearConv"] += 1
    return {k: v for k, v in counts.items() if v}


def _decided(node: ir.Node) -> bool:
    info = decision(node)
    return bool(info) and info.get("mode") == "w8a8" and _act_qdq(node) is not None and _weight(node) is not None


def _act_qdq(node: ir.Node) -> tuple[ir.Value, ir.Value] | None:
    """(x, scale) of the input's static Q/DQ pair."""
    dq = node.inputs[0].producer()
    q = dq.inputs[0].producer() if dq is not None and dq.op_type == "DequantizeLinear" else None
    if q is None or q.op_type != "QuantizeLinear" or ir.convenience.get_const_tensor(q.inputs[1]) is None:
        return None
    return q.inputs[0], q.inputs[1]


def _weight(node: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 weight, per-output-channel scale) behind the weight's DequantizeLinear."""
    dq = node.inputs[1].producer()
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q, scale = (ir.convenience.get_const_tensor(v) for v in dq.inputs[:2])
    if q is None or scale is None or q.dtype != ir.DataType.INT8:
        return None
    return q.numpy(), scale.numpy().astype(np.float32)


def _input_u8(graph: ir.Graph, node: ir.Node, lowered: dict) -> _U8:
    """The site's input as uint8: a lowered site's output when the scales agree, else a new QuantizeLinear."""
    x, scale = _act_qdq(node)
    source = x.producer()
    if source is not None and source.op_type == "DequantizeLinear" and id(x) in lowered:
        held = lowered[id(x)]
        if _same(held.scale, scale):
            return held
    zero = constant(graph, f"{x.name}_u8_zero", np.array(128, np.uint8))
    quant = ir.node("QuantizeLinear", [x, scale, zero], name=f"{node.name}_x_u8")
    quant.outputs[0].name = f"{node.name}_x_u8"
    graph.insert_before(node, [quant])
    return _U8(quant.outputs[0], scale, zero)


def _output_plan(node: ir.Node) -> tuple[ir.Value, ir.Value, bool] | None:
    """(float value the site finally produces, the scale its readers quantize it with, Relu folded) or None."""
    out, relu = node.outputs[0], False
    uses = out.uses()
    if len(uses) == 1 and uses[0].node.op_type == "Relu" and not out.is_graph_output():
        out, relu = uses[0].node.outputs[0], True
    readers = [u.node for u in out.uses()]
    if out.is_graph_output() or not readers or any(not _feeds_conv_site(r) for r in readers):
        return None
    scales = [r.inputs[1] for r in readers]
    if not all(_same(scales[0], s) for s in scales[1:]):
        return None
    return out, scales[0], relu


def _feeds_conv_site(node: ir.Node) -> bool:
    """A QuantizeLinear whose DequantizeLinear feeds only decided convolutions' inputs."""
    if node.op_type != "QuantizeLinear" or ir.convenience.get_const_tensor(node.inputs[1]) is None:
        return False
    dqs = [u.node for u in node.outputs[0].uses()]
    return bool(dqs) and all(
        dq.op_type == "DequantizeLinear" and dq.outputs[0].uses() and all(
            u.node.op_type in ("Conv", "ConvTranspose") and u.idx == 0 and _decided(u.node) for u in dq.outputs[0].uses())
        for dq in dqs)


def _same(a: ir.Value, b: ir.Value) -> bool:
    if a is b:
        return True
    ta, tb = ir.convenience.get_const_tensor(a), ir.convenience.get_const_tensor(b)
    return ta is not None and tb is not None and np.array_equal(ta.numpy(), tb.numpy())


def _conv_attributes(node: ir.Node) -> dict:
    keep = ("kernel_shape", "strides", "pads", "auto_pad", "dilations")
    return {name: attr.value for name, attr in node.attributes.items() if name in keep}


def _phases(node: ir.Node) -> list[tuple[dict, tuple]] | None:
    """Per output phase (a, b): (Conv attributes, (rows, cols) of the kernel taps, flipped), or None."""
    attrs = node.attributes
    kernel = list(ir.convenience.get_const_tensor(node.inputs[1].producer().inputs[0]).shape)[2:]
    strides = attrs.get_ints("strides", [1, 1])
    pads = attrs.get_ints("pads", [0, 0, 0, 0])
    if (any(attrs.get_ints("output_padding", [0, 0])) or "output_shape" in attrs
            or attrs.get_string("auto_pad", "NOTSET") != "NOTSET" or strides[0] != strides[1] or strides[0] < 2):
        return None
    axes = [_axis_phases(kernel[i], strides[i], pads[i], pads[i + 2]) for i in range(2)]
    if any(p is None for p in axes):
        return None
    taps = len(axes[0][0][0])
    return [({"kernel_shape": [taps, taps], "pads": [rows[1], cols[1], rows[2], cols[2]]}, (rows[0], cols[0]))
            for rows in axes[0] for cols in axes[1]]


def _axis_phases(k: int, s: int, begin: int, end: int) -> list[tuple[list[int], int, int]] | None:
    """Per phase a of one axis: (kernel taps in input order, pad before, pad after), or None.

    Output ``s*m + a`` sums ``x[m + q - t] * w[s*t + r]`` over ``t < k/s`` with ``a + begin = s*q + r``;
    as a stride-1 convolution its window starts ``k/s - 1 - q`` before ``m``. Needs ``s | k`` and
    ``s | (k - begin - end)`` (every phase then has ``len(x) - 1 + (k - begin - end)/s`` outputs)
    and paddings that are not negative.
    """
    if k % s or (k - begin - end) % s:
        return None
    taps, phases = k // s, []
    for a in range(s):
        q, r = divmod(a + begin, s)
        before = taps - 1 - q
        after = (k - begin - end) // s + q - 1  # how far the last window reaches past the input
        if before < 0 or after < 0:
            return None
        phases.append(([s * (taps - 1 - j) + r for j in range(taps)], before, after))
    return phases


def _emit(graph: ir.Graph, node: ir.Node, x: _U8, out: tuple, phases: list) -> tuple[_U8, ir.Value]:
    """QLinearConv (one per phase, then Concat + DepthToSpace) into uint8 at the readers' scale;
    the uint8 output and the float value (its DequantizeLinear) that replaces the site's output."""
    value, y_scale, relu = out
    q, w_scale = _weight(node)
    if node.op_type == "ConvTranspose":
        q = q.transpose(1, 0, 2, 3)  # [out, in, kh, kw]
    bias = ir.convenience.get_const_tensor(node.inputs[2]).numpy() if len(node.inputs) > 2 and node.inputs[2] is not None else 0
    x_scale = float(ir.convenience.get_const_tensor(x.scale).numpy())
    b32 = np.rint(np.broadcast_to(bias, w_scale.shape) / (x_scale * w_scale)).astype(np.int32)
    y_zero = constant(graph, f"{node.name}_y_zero", np.array(0 if relu else 128, np.uint8))
    w_zero = constant(graph, f"{node.name}_w_zero", np.zeros(len(w_scale), np.int8))
    ws, b = constant(graph, f"{node.name}_w_scale", w_scale), constant(graph, f"{node.name}_b32", b32)
    new, outs = [], []
    for i, (attrs, taps) in enumerate(phases):
        kernel = q if taps is None else np.ascontiguousarray(q[:, :, taps[0]][:, :, :, taps[1]])
        w = constant(graph, f"{node.name}_w{i}", kernel)
        conv = ir.node("QLinearConv", [x.value, x.scale, x.zero, w, ws, w_zero, y_scale, y_zero, b],
                       attributes=attrs, name=f"{node.name}_qconv{i}")
        new.append(conv)
        outs.append(conv.outputs[0])
    if len(outs) > 1:
        new.append(ir.node("Concat", outs, attributes={"axis": 1}, name=f"{node.name}_phases"))
        stride = node.attributes.get_ints("strides")[0]
        new.append(ir.node("DepthToSpace", [new[-1].outputs[0]], attributes={"blocksize": stride, "mode": "DCR"},
                           name=f"{node.name}_interleave"))
    y_u8 = new[-1].outputs[0]
    y_u8.name = f"{value.name}_u8"
    float_view = ir.node("DequantizeLinear", [y_u8, y_scale, y_zero], name=f"{value.name}_from_u8")
    graph.insert_before(node, [*new, float_view])
    name, value.name = value.name, None
    float_view.outputs[0].name, float_view.outputs[0].type, float_view.outputs[0].shape = name, value.type, value.shape
    value.replace_all_uses_with(float_view.outputs[0])
    return _U8(y_u8, y_scale, y_zero), float_view.outputs[0]


def _float_input(node: ir.Node) -> None:
    """Run the site in float: its input unquantized (ORT CPU has no int8 convolution with a float
    output, so quantizing the input would cost accuracy and a pass over it for nothing); the weight
    stays the decision's dequantized int8."""
    node.replace_input_with(0, _act_qdq(node)[0])
