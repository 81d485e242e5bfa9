"""Calibration: streaming statistics against numpy on the same data, feeds, and bad inputs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from optimizer.calibrate import Histogram, TensorStats, calibration_feeds, collect, zero_channels
from runtime.errors import PassError


def _model() -> ir.Model:
    """y = relu(x @ W); h (= x @ W) is the intermediate value calibrated."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", "sequence", 4]))
    mask = ir.Value(name="attention_mask", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "sequence"]))
    weight = np.arange(12, dtype=np.float32).reshape(4, 3) / 10 - 0.5
    w = ir.Value(name="w", const_value=ir.tensor(weight, name="w"), shape=ir.Shape([4, 3]),
                 type=ir.TensorType(ir.DataType.FLOAT))
    mm = ir.node("MatMul", [x, w], name="mm")
    mm.outputs[0].name = "h"
    relu = ir.node("Relu", [mm.outputs[0]], name="relu")
    cast = ir.node("Cast", [mask], attributes={"to": ir.DataType.FLOAT}, name="cast")
    unsq = ir.node("Unsqueeze", [cast.outputs[0], ir.Value(name="axes", const_value=ir.tensor(np.array([-1], np.int64), name="axes"),
                                                           shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64))], name="unsq")
    out = ir.node("Mul", [relu.outputs[0], unsq.outputs[0]], name="out")
    out.outputs[0].name, out.outputs[0].type = "y", ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x, mask], [out.outputs[0]], nodes=[mm, relu, cast, unsq, out], opset_imports={"": 20},
                     initializers=[w, unsq.inputs[1]])
    return ir.Model(graph, ir_version=10)


def _batches(rng, n=3):
    out = []
    for i in range(n):
        x = (rng.standard_normal((2, 5, 4)) * (i + 1)).astype(np.float32)
        mask = np.ones((2, 5), np.int64)
        mask[1, 3:] = 0
        out.append({"x": x, "attention_mask": mask})
    return out


def test_streaming_histogram_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    hist, seen = Histogram(), []
    for scale in (0.1, 1.0, 10.0, 100.0):  # the range doubles several times while streaming
        chunk = np.abs(rng.standard_normal(20_000) * scale)
        hist.add(chunk)
        seen.append(chunk)
    everything = np.concatenate(seen)
    for p in (50.0, 99.0, 99.9):
        want = np.percentile(everything, p)
        assert abs(hist.percentile(p) - want) <= hist.top / 2048 * 2 + 1e-9, p


def test_collect_matches_numpy_and_skips_padding():
    rng = np.random.default_rng(1)
    batches = _batches(rng)
    weight = np.arange(12, dtype=np.float32).reshape(4, 3) / 10 - 0.5
    rows = np.concatenate([(b["x"] @ weight)[b["attention_mask"].astype(bool)] for b in batches])
    stats = collect(_model(), ["h", "x", "h"], batches, keep_rows=6)
    h = stats["h"]
    assert h.rows == len(rows) == 3 * 8
    np.testing.assert_allclose(h.channel_absmax, np.abs(rows).max(0), rtol=1e-6)
    np.testing.assert_allclose(h.channel_mean_abs, np.abs(rows).mean(0), rtol=1e-5)
    assert h.minimum == pytest.approx(rows.min()) and h.maximum == pytest.approx(rows.max())
    assert h.absmax == pytest.approx(np.abs(rows).max())
    assert h.sample.shape == (6, 3)
    assert stats["x"].channel_absmax.shape == (4,)


def test_collect_in_groups_gives_the_same_statistics():
    batches = _batches(np.random.default_rng(2))
    one = collect(_model(), ["h", "y"], batches)
    split = collect(_model(), ["h", "y"], batches, max_bytes=1)  # one value per pass
    for name in ("h", "y"):
        np.testing.assert_array_equal(one[name].channel_absmax, split[name].channel_absmax)


def test_zeroed_channels_leave_the_statistics():
    stats = TensorStats("v")
    stats.update(np.array([[1.0, -5.0, 2.0], [0.5, 3.0, -4.0]], np.float32), keep=2)
    rest = zero_channels(stats, np.array([1]))
    np.testing.assert_array_equal(rest.channel_absmax, [1.0, 0.0, 4.0])
    assert rest.absmax == 4.0 and rest.sample.shape == (2, 3) and not rest.sample[:, 1].any()
    assert stats.channel_absmax[1] == 5.0  # the original is untouched


def test_text_and_image_feeds_for_builtins():
    text = calibration_feeds("tiny-bert", n=10, batch=4, seq=32)
    assert [len(b["input_ids"]) for b in text] == [4, 4, 2]
    assert all(b["input_ids"].shape[1] <= 32 and b["input_ids"].dtype == np.int64 for b in text)
    images = calibration_feeds("tiny-vit", n=3, batch=2)
    assert images[0]["pixel_values"].shape == (2, 3, 32, 32)


def test_given_feeds_are_cut_to_n():
    feeds = calibration_feeds([{"x": np.zeros((4, 2))}, {"x": np.ones((4, 2))}], n=6)
    assert [len(b["x"]) for b in feeds] == [4, 2]


@pytest.mark.parametrize("feeds, needle", [
    ({"x": np.zeros((2, 5), np.float32), "attention_mask": np.ones((2, 5), np.int64)}, "has shape \\[2, 5\\]"),
    ({"x": np.zeros((2, 5, 4), np.float64), "attention_mask": np.ones((2, 5), np.int64)}, "has dtype float64"),
    ({"x": np.zeros((2, 5, 4), np.float32)}, "give one array per model input"),
    ({"x": np.zeros((2, 5, 3), np.float32), "attention_mask": np.ones((2, 5), np.int64)}, "shaped like the model's inputs"),
])
def test_wrong_calibration_data_is_a_pass_error(feeds, needle):
    with pytest.raises(PassError, match=needle):
        collect(_model(), ["h"], [feeds])


def test_unusable_sources_are_pass_errors():
    with pytest.raises(PassError, match="cannot make calibration data"):
        calibration_feeds(42)
    with pytest.raises(PassError, match="no calibration data was given"):
        collect(_model(), ["h"], [])
