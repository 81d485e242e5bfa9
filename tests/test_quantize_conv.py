"""The quantize pass's convolution sites (w8a8) and their ORT CPU lowering to QLinearConv chains."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torch import nn

from optimizer import optimize
from optimizer.lower import lower
from optimizer.lower.ort_conv import _axis_phases, _phases
from optimizer.pipeline import PassContext, run_pipeline
from optimizer.sources import resolve
from optimizer.specs import PassSpec
from optimizer.progress import Progress
from passes.quantize_rewrite import META
from runtime.errors import PassError


class Decoder(nn.Module):
    """A stem conv, a linear, then upsamplers: two that lower to int8 phases, one (3x3 stride 2) that cannot."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, groups=1)
        self.lin = nn.Linear(16, 16)
        self.up1 = nn.ConvTranspose2d(16, 12, 4, stride=2, padding=1, groups=groups)
        self.up2 = nn.ConvTranspose2d(12, 8, 4, stride=2, padding=1)
        self.up3 = nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1)
        self.final = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        h = self.lin(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        h = self.up2(torch.relu(self.up1(h)))
        return torch.sigmoid(self.final(torch.relu(self.up3(h))))


def _source(groups: int = 1):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    return resolve(Decoder(groups).eval(), {"x": x}, None, None, Progress()), x.numpy()


def _decided(options: dict, groups: int = 1):
    source, x = _source(groups)
    ctx = PassContext(example_feeds=source.example_feeds)
    model, records = run_pipeline(source.model, [PassSpec("quantize", options)], ctx)
    return model, records[0], x


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    data = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _weight_axes(model: ir.Model) -> dict[str, int]:
    return {n.op_type + ":" + n.name: n.inputs[1].producer().attributes.get_int("axis")
            for n in model.graph if n.op_type in ("Conv", "ConvTranspose") and META in n.metadata_props}


W8A8 = {"mode": "w8a8", "calib": "example"}


def test_every_convolution_gets_an_int8_decision():
    model, record, _ = _decided(W8A8)
    axes = _weight_axes(model)
    assert sorted(axes.values()) == [0, 0, 1, 1, 1]  # Conv weights [out, in, ..], ConvTranspose [in, out, ..]
    assert record.sites == 6 and record.details["by_role"] == {"outside": 6}
    for node in model.graph:
        if node.op_type in ("Conv", "ConvTranspose"):
            assert node.inputs[0].producer().op_type == "DequantizeLinear"
            assert json.loads(node.metadata_props[META])["role"] == "conv"
            assert node.inputs[1].producer().inputs[0].const_value.dtype == ir.DataType.INT8


def test_lowering_runs_the_upsamplers_as_int8_phases_and_matches_the_decision():
    model, _, x = _decided(W8A8)
    decided = _run(model, x)
    lowered, info = lower(model, "ort-cpu")
    kernels = info["quantization"]["kernels"]
    # up1 (then Relu) and up2 feed quantized convolutions; the stem feeds a Linear, up3's 3x3 stride 2
    # kernel is not a multiple of its stride, the final conv's output is not quantized.
    assert kernels["QLinearConv"] == 2 and kernels["float conv (int8 weights, float input)"] == 3
    ops = collections.Counter(n.op_type for n in lowered.graph)
    assert ops["QLinearConv"] == 8 and ops["DepthToSpace"] == 2 and ops["ConvTranspose"] == 1
    out = _run(lowered, x)
    # Differences: the phases' outputs requantized (uint8, not clipped at 127 steps), the int32 bias
    # rounded, and the three float sites reading their input unquantized.
    assert np.abs(out - decided).max() < 2e-3


def test_quantized_convolutions_stay_close_to_float():
    source, x = _source()
    art = optimize(source.model, {"x": x}, passes=["quantize:mode=w8a8,calib=example"])
    reference = _run(source.model, x)
    got = next(iter(art.load().run({"x": x}).values()))
    assert np.corrcoef(got.ravel(), reference.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("kernel,stride,pad", [(4, 2, 1), (2, 2, 0), (6, 3, 0), (4, 2, 2), (8, 4, 2), (6, 2, 2)])
def test_phase_decomposition_equals_conv_transpose(kernel, stride, pad):
    torch.manual_seed(1)
    conv = nn.ConvTranspose2d(5, 3, kernel, stride=stride, padding=pad).eval()
    x = torch.randn(2, 5, 7, 6)
    node = _conv_transpose_node(conv)
    phases = _phases(node)
    assert phases is not None and len(phases) == stride * stride
    weight = conv.weight.detach().transpose(0, 1)  # [out, in, kh, kw]
    expected = conv(x)
    got = torch.full_like(expected, float("nan"))
    for i, (attrs, (rows, cols)) in enumerate(phases):  # phase (a, b) fills rows a::stride, columns b::stride
        top, left, bottom, right = attrs["pads"]
        padded = nn.functional.pad(x, (left, right, top, bottom))
        got[:, :, i // stride::stride, i % stride::stride] = nn.functional.conv2d(padded, weight[:, :, rows][:, :, :, cols], conv.bias)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)


def test_geometries_without_equal_phases_keep_the_float_form():
    assert _axis_phases(3, 2, 1, 1) is None  # kernel not a multiple of the stride
    assert _axis_phases(4, 2, 1, 0) is None  # phases of unequal length
    assert _axis_phases(4, 2, 4, 0) is None  # a phase would need a negative pad


def test_dynamic_and_weight_only_modes_leave_convolutions_float():
    for options in ({"mode": "dynamic"}, {"mode": "w8"}):
        model, record, _ = _decided(options)
        assert not _weight_axes(model)
        assert record.sites == 1


def test_skip_outside_and_grouped_convolutions():
    # every site of this map-less model is `outside`: skipping them leaves nothing, which is an error
    with pytest.raises(PassError, match="leaves no MatMul to quantize"):
        _decided({**W8A8, "skip": ("outside",)})
    model, record, _ = _decided(W8A8, groups=2)  # up1 grouped: not a site
    assert len(_weight_axes(model)) == 4


def test_a_model_with_only_grouped_convolutions_is_refused():
    class Depthwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, groups=4)

        def forward(self, x):
            return self.conv(x)

    source = resolve(Depthwise().eval(), {"x": torch.randn(1, 4, 6, 6)}, None, None, Progress())
    with pytest.raises(PassError, match="no MatMul with constant weights"):
        run_pipeline(source.model, [PassSpec("quantize", W8A8)], PassContext(example_feeds=source.example_feeds))


def _conv_transpose_node(conv: nn.ConvTranspose2d) -> ir.Node:
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    w = ir.Value(name="w", const_value=ir.tensor(np.zeros((conv.in_channels, conv.out_channels, k, k), np.int8)))
    dq = ir.node("DequantizeLinear", [w, ir.Value(name="s", const_value=ir.tensor(np.ones(conv.out_channels, np.float32)))])
    x = ir.Value(name="x")
    return ir.node("ConvTranspose", [x, dq.outputs[0]], attributes={"kernel_shape": [k, k], "strides": [s, s], "pads": [p, p, p, p]})


def test_tensorrt_legality_accepts_the_convolution_decisions():
    from optimizer.lower.tensorrt_legal import check

    model, _, _ = _decided(W8A8)
    assert [o for o in check(model) if "conv" in str(o).lower()] == []


@pytest.mark.slow
def test_vit_s_decoder_runs_int8_and_keeps_its_saliency(tmp_path):
    """The three 4x4 stride-2 upsamplers become QLinearConv phase chains; the patch embedding and
    the final 1x1 conv run float; the saliency map stays close (2.55x over ORT fp32 measured,
    docs/quantize.md)."""
    from models import data, registry
    from optimizer import metrics
    from optimizer.trace_cache import cached_trace

    art = optimize("vit-s", passes=["quantize:mode=w8a8,calib_samples=8"], output=tmp_path / "v")
    kernels = art.manifest["lowering"]["quantization"]["kernels"]
    assert kernels["QLinearConv"] == 3 and kernels["float conv (int8 weights, float input)"] == 2
    assert kernels["MatMulIntegerToFloat"] == 72
    images = {"pixel_values": data.images("eval", n=8)}
    reference = _run_named(cached_trace(registry.get("vit-s"), Progress()), images)
    got = art.load().run(images)["saliency"]
    assert metrics.saliency_correlation(reference, got) > 0.98  # measured 0.996 (32 images, 32 calibration samples)


def _run_named(model: ir.Model, feeds: dict) -> np.ndarray:
    data = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(["saliency"], feeds)[0]


def test_skip_embeddings_leaves_a_vit_patch_embedding_float():
    from models import registry
    from optimizer.trace_cache import cached_trace

    spec = registry.get("tiny-vit")
    feeds = {k: v.numpy() for k, v in spec.example_inputs(2, 0).items()}
    model, records = run_pipeline(cached_trace(spec, Progress()), [PassSpec("quantize", {**W8A8, "skip": ("embeddings",)})],
                                  PassContext(example_feeds=feeds))
    assert not _weight_axes(model) and records[0].details["skipped"] == ["embeddings:" + next(
        n.name for n in model.graph if n.op_type == "Conv")]
    assert records[0].sites > 0  # the matmuls are still quantized
