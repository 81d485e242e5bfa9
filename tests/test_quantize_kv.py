"""KV-cache scales: per layer and KV head, keys after RoPE and values, checked against torch.

The reference captures the key and value tensors tiny-llama's torch attention hands to its
grouped-query repeat (after RoPE, [batch, kv_heads, tokens, head_dim]) on the same
calibration batches, and takes |x| maxima over the real tokens.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
import torch

from models import registry
from models.reference import llama
from optimizer.calibrate import calibration_feeds
from optimizer.pipeline import PassContext, instantiate, run_pipeline
from optimizer.progress import Progress
from optimizer.specs import PassSpec
from optimizer.trace_cache import cached_trace
from passes.quantize_kv import KEY
from runtime.errors import PassError

SAMPLES = 8


@pytest.fixture(scope="module")
def quantized():
    model = cached_trace(registry.get("tiny-llama"), Progress())
    ctx = PassContext(calibration="tiny-llama")
    options = {"mode": "w8", "kv": "int8", "calib_samples": str(SAMPLES)}
    return run_pipeline(model, [PassSpec("quantize", options)], ctx)


def _torch_peaks() -> list[tuple[np.ndarray, np.ndarray]]:
    """(key, value) |x| max per KV head for each layer, from the torch model."""
    module = registry.get("tiny-llama").build()
    seen: list[torch.Tensor] = []
    original = llama.Attention._repeat_kv

    def capture(self, x):
        seen.append(x.detach())
        return original(self, x)

    peaks: dict[int, list[np.ndarray]] = {}
    llama.Attention._repeat_kv = capture
    try:
        for batch in calibration_feeds("tiny-llama", SAMPLES):
            seen.clear()
            with torch.no_grad():
                module(torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"]))
            real = batch["attention_mask"].astype(bool)
            for i, x in enumerate(seen):  # per layer: key, then value
                tokens = x.numpy().transpose(0, 2, 1, 3)[real]  # [tokens, heads, dim]
                peak = np.abs(tokens).max(axis=(0, 2))
                peaks[i] = peak if i not in peaks else np.maximum(peaks[i], peak)
    finally:
        llama.Attention._repeat_kv = original
    return [(peaks[2 * layer], peaks[2 * layer + 1]) for layer in range(len(peaks) // 2)]


def test_scales_match_torch_keys_after_rope_and_values(quantized):
    _, records = quantized
    scales = records[0].details["kv_scales"]
    assert scales["format"] == 1 and scales["kv"] == "int8" and len(scales["layers"]) == 2
    for layer, (key, value) in zip(scales["layers"], _torch_peaks()):
        np.testing.assert_allclose(layer["key_absmax"], key, rtol=1e-4)
        np.testing.assert_allclose(layer["value_absmax"], value, rtol=1e-4)
        np.testing.assert_allclose(layer["key_int8"], np.array(layer["key_absmax"]) / 127, rtol=1e-5)
        np.testing.assert_allclose(layer["value_fp8_e4m3"], np.array(layer["value_absmax"]) / 448, rtol=1e-5)


def test_scales_are_stored_in_model_and_node_metadata(quantized):
    model, records = quantized
    stored = json.loads(model.metadata_props[KEY])
    assert stored["layers"] == records[0].details["kv_scales"]["layers"]
    values = {v.name: v for n in model.graph for v in n.outputs}
    for layer in stored["layers"]:
        key = values[layer["key"]]
        assert list(key.shape)[1] == 2 and list(key.shape)[3] == 16  # [batch, kv_heads, tokens, head_dim]
        on_node = json.loads(key.producer().metadata_props[KEY])
        assert (on_node["layer"], on_node["kind"], on_node["int8"]) == (layer["layer"], "key", layer["key_int8"])
    # The artifact keeps the model metadata for a later cache pass or runtime.
    saved = ir.serde.serialize_model(model)
    assert any(p.key == KEY for p in saved.metadata_props)


def test_unknown_kv_format_is_refused():
    with pytest.raises(PassError, match="kv takes one of: none, int8, fp8"):
        instantiate([PassSpec("quantize", {"kv": "int4"})])


def test_model_without_attention_is_refused():
    with pytest.raises(PassError, match="kv scales need attention sites"):
        run_pipeline(_linear_model(), [PassSpec("quantize", {"mode": "w8", "kv": "int8", "calib": "example"})],
                     PassContext(example_feeds={"x": np.ones((2, 8), np.float32)}))


def _linear_model() -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", 8]))
    w = ir.Value(name="w", const_value=ir.tensor(np.eye(8, dtype=np.float32), name="w"))
    mm = ir.node("MatMul", [x, w], name="mm")
    mm.outputs[0].name, mm.outputs[0].type, mm.outputs[0].shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["batch", 8])
    graph = ir.Graph([x], [mm.outputs[0]], nodes=[mm], initializers=[w], opset_imports={"": 20}, name="g")
    return ir.Model(graph, ir_version=10)


def test_quantized_model_takes_the_kv_cache_rewrite(tmp_path):
    """quantize (w4, kv scales) then kv_cache: the cached graph's prefill gives the same logits."""
    from optimizer import optimize

    plain = optimize("tiny-llama", passes=["quantize:mode=w4,block=32,kv=int8"], output=tmp_path / "q")
    cached = optimize("tiny-llama", passes=["quantize:mode=w4,block=32,kv=int8", "kv_cache"], output=tmp_path / "qkv")
    feeds = {k: v.numpy() for k, v in registry.get("tiny-llama").example_inputs(2, 10).items()}
    want = plain.load().run(feeds)["logits"]
    past = {f"past_key_values.{i}.{kind}": np.zeros((2, 2, 0, 16), np.float32) for i in range(2) for kind in ("key", "value")}
    got = cached.load().run({**feeds, "position_ids": np.tile(np.arange(10), (2, 1)), **past})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    scales = json.loads(ir.load(cached.path / "model.onnx").metadata_props[KEY])
    assert len(scales["layers"]) == 2
