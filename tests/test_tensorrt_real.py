"""The TensorRT lowering of the real models passes the legality checker and keeps their numerics.

MiniLM, SmolLM2-135M (with the KV cache: its prefill and decode engines come from one graph)
and ViT-S, in fp16 and with int8 weights (w8a8, except weight-only w8 for ViT-S, whose w8a8
calibration took 75 s on this loaded machine). fp16 outputs are compared with the fp32 artifact on ONNX
Runtime; see tests/test_tensorrt.py for the tolerance's reasoning.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import runtime
from models import registry
from optimizer import optimize
from optimizer.lower.tensorrt_legal import check

pytestmark = pytest.mark.slow
FAST_W8A8 = "quantize:mode=w8a8,calib=example,smooth=false,outliers=0"
FAST_W8 = "quantize:mode=w8,smooth=false"
FAST_W4 = "quantize:mode=w4,block=32,smooth=false,clip=false"


def _legal(art) -> ir.Model:
    model = ir.serde.deserialize_model(onnx.load(str(art.path / "model.onnx")))  # follows external data
    assert check(model) == []
    return model


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def _close(art, reference, name: str) -> None:
    feeds = {k: np.asarray(v) for k, v in registry.get(name).example_inputs(2, 16).items()}
    got, want = runtime.load(art.path).run(feeds), runtime.load(reference.path).run(feeds)
    for key, value in want.items():
        assert np.abs(got[key] - value).max() <= 1e-2 * np.abs(value).max(), key
        assert _cosine(got[key], value) >= 0.9999, key


@pytest.mark.parametrize("name", ["minilm", "vit-s"])
def test_encoders_fp16_are_legal_and_close(name, tmp_path):
    art = optimize(name, passes=["cleanup"], target="tensorrt", output=tmp_path / "fp16")
    _legal(art)
    _close(art, optimize(name, passes=["cleanup"], output=tmp_path / "fp32"), name)


@pytest.mark.parametrize("name, spec, mode", [("minilm", FAST_W8A8, "w8a8"), ("vit-s", FAST_W8, "w8")])
def test_encoders_int8_are_legal(name, spec, mode, tmp_path):
    art = optimize(name, passes=[spec], target="tensorrt", output=tmp_path / "int8")
    model = _legal(art)
    sites = art.manifest["passes"][0]["sites"]
    assert art.manifest["lowering"]["quantization"]["sites"] == {mode: sites}
    weights = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].dtype == ir.DataType.INT8
               and n.inputs[0].is_initializer()]
    assert len(weights) == sites


def test_smollm2_cached_fp16_is_legal_with_prefill_and_decode_engines(tmp_path):
    art = optimize("smollm2-135m", passes=["kv_cache"], target="tensorrt", output=tmp_path / "fp16")
    model = _legal(art)
    engines = art.manifest["lowering"]["engines"]
    assert set(engines) == {"prefill", "decode"}
    assert engines["decode"]["profile"]["input_ids"]["max"][1] == 1
    assert engines["prefill"]["profile"]["past_key_values.0.key"]["max"][2] == 0
    float32 = art.manifest["lowering"]["precision"]["float32_nodes"]
    assert float32["Pow"] == float32["ReduceMean"] == 2 * 30 + 1  # every RMSNorm's variance
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops["Softmax"] == float32["Softmax"] == 30


def test_smollm2_cached_w8a8_is_legal(tmp_path):
    art = optimize("smollm2-135m", passes=[FAST_W8A8, "kv_cache"], target="tensorrt", output=tmp_path / "int8")
    _legal(art)
    assert art.manifest["lowering"]["quantization"]["sites"] == {"w8a8": art.manifest["passes"][0]["sites"]}


@pytest.mark.parametrize("name, passes", [("minilm", [FAST_W4]), ("vit-s", [FAST_W4]), ("smollm2-135m", [FAST_W4, "kv_cache"])])
def test_int4_weight_only_is_legal(name, passes, tmp_path):
    art = optimize(name, passes=passes, target="tensorrt", output=tmp_path / "int4")
    model = _legal(art)
    quantization = art.manifest["lowering"]["quantization"]
    int4 = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].dtype == ir.DataType.INT4]
    assert len(int4) == quantization["sites"]["w4"]
    # The pass also counts embedding tables as sites; for TensorRT they are stored dequantized.
    assert quantization["sites"]["w4"] + quantization["dequantized_tables"] == art.manifest["passes"][0]["sites"]
    assert model.opset_imports[""] >= 21
