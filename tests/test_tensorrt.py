"""The TensorRT lowering on the tiny models: structure, numerics on ONNX Runtime, counts, user errors.

TensorRT itself is not installed here; the lowered graph is checked by the legality checker
and run by ONNX Runtime on the CPU, which executes the same typed graph (float16 values,
float32 islands, Q/DQ in int8 or float8).

fp16 tolerance: float16 keeps 11 significant bits (unit roundoff 2**-11 = 4.9e-4). Every
stored activation and weight is rounded once per layer and the rounding errors of a few
blocks add up, so the outputs are held to 20 units of roundoff relative to the output's
magnitude (1e-2 x max|y|) and a per-row cosine of at least 0.9999; the tiny models measured
2e-4 to 4e-4 x max|y|, so the bound has headroom yet fails on a real type error (a weight
rounded to the wrong type, or a LayerNorm variance overflowing, gives errors of order 1).
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
from optimizer.lower.tensorrt import parse_options
from optimizer.lower.tensorrt_legal import check
from runtime.errors import PassError

TINY = ("tiny-bert", "tiny-llama", "tiny-vit")


def _feeds(name: str) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in registry.get(name).example_inputs(2, 16).items()}


def _run(art, feeds) -> list[np.ndarray]:
    session = runtime.load(art.path)
    return list(session.run(feeds).values())


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def _graph(art) -> ir.Model:
    return ir.load(art.path / "model.onnx")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    return {name: _run(optimize(name, passes=["cleanup"], output=out / name), _feeds(name)) for name in TINY}


@pytest.mark.parametrize("name", TINY)
def test_fp16_graph_is_typed_legal_and_close_to_fp32(name, reference, tmp_path):
    art = optimize(name, passes=["cleanup"], target="tensorrt", output=tmp_path / name)
    model = _graph(art)
    assert check(model) == []
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm", "Conv"):
            assert all(v.dtype == ir.DataType.FLOAT16 for v in node.inputs if v is not None), node.name
        if node.op_type in ("LayerNormalization", "Softmax", "Pow", "ReduceMean"):
            assert node.inputs[0].dtype == ir.DataType.FLOAT, node.name
    for got, want in zip(_run(art, _feeds(name)), reference[name]):
        assert got.dtype == want.dtype
        assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()
        assert _cosine(got, want) >= 0.9999


@pytest.mark.parametrize("name", TINY)
def test_signature_is_unchanged(name, tmp_path):
    ort_art = optimize(name, passes=["cleanup"], output=tmp_path / "ort")
    trt_art = optimize(name, passes=["cleanup"], target="tensorrt", output=tmp_path / "trt")
    assert trt_art.manifest["inputs"] == ort_art.manifest["inputs"]
    assert trt_art.manifest["outputs"] == ort_art.manifest["outputs"]


def test_fp16_counts_the_float32_islands(tmp_path):
    art = optimize("tiny-llama", passes=["cleanup"], target="tensorrt", output=tmp_path / "l")
    typed = art.manifest["lowering"]["precision"]
    layers = 2
    # RMSNorm per block twice plus the final norm: Pow -> ReduceMean -> Add(eps) -> Sqrt -> Reciprocal in float32.
    norms = 2 * layers + 1
    assert typed["float32_nodes"] == {"Pow": norms, "ReduceMean": norms, "Add": norms, "Sqrt": norms,
                                      "Reciprocal": norms, "Softmax": layers}
    ops = collections.Counter(n.op_type for n in _graph(art).graph)
    trace_casts = 2
    assert ops["Cast"] == trace_casts + typed["casts_inserted"]


def test_bf16_is_legal_and_keeps_ops_without_a_bf16_schema_in_float32(tmp_path):
    art = optimize("tiny-vit", passes=["cleanup"], target="tensorrt:precision=bf16", output=tmp_path / "v")
    model = _graph(art)
    assert check(model) == []
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert conv.inputs[0].dtype == ir.DataType.FLOAT  # Conv takes bfloat16 only from opset 22
    matmuls = [n for n in model.graph if n.op_type == "MatMul"]
    assert matmuls and all(n.inputs[0].dtype == ir.DataType.BFLOAT16 for n in matmuls)


def test_fp32_leaves_types_alone(reference, tmp_path):
    art = optimize("tiny-bert", passes=["cleanup"], target="tensorrt:precision=fp32", output=tmp_path / "b")
    assert not any(v.dtype == ir.DataType.FLOAT16 for n in _graph(art).graph for v in n.outputs)
    for got, want in zip(_run(art, _feeds("tiny-bert")), reference["tiny-bert"]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_w8a8_keeps_its_qdq_and_equals_the_decision_graph(name, tmp_path):
    spec = "quantize:mode=w8a8,calib=example"
    decision = optimize(name, passes=[spec], target="tensorrt:precision=fp32", output=tmp_path / "d")
    lowered = optimize(name, passes=[spec], target="tensorrt", output=tmp_path / "t")
    sites = decision.manifest["passes"][0]["sites"]
    assert lowered.manifest["lowering"]["quantization"]["sites"] == {"w8a8": sites}
    model = _graph(lowered)
    assert check(model) == []
    ops = collections.Counter(n.op_type for n in model.graph)
    groups = len(decision.manifest["passes"][0]["details"]["groups"])
    assert ops["DequantizeLinear"] == sites + groups and ops["QuantizeLinear"] == groups
    for node in model.graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert node.inputs[1].dtype == ir.DataType.FLOAT16  # scales typed like the data they read
    for got, want in zip(_run(lowered, _feeds(name)), _run(decision, _feeds(name))):
        assert _cosine(got, want) >= 0.9999


def test_dynamic_lowers_as_weight_only_and_says_so(tmp_path):
    art = optimize("tiny-bert", passes=["quantize:mode=dynamic"], target="tensorrt", output=tmp_path / "b")
    quant = art.manifest["lowering"]["quantization"]
    assert quant["sites"] == {"w8 (from dynamic)": art.manifest["passes"][0]["sites"]}
    assert "weight-only int8" in quant["notes"][0]
    ops = collections.Counter(n.op_type for n in _graph(art).graph)
    assert ops["QuantizeLinear"] == 0 and ops["DequantizeLinear"] == art.manifest["passes"][0]["sites"]
    assert check(_graph(art)) == []


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-vit"])
def test_fp8_turns_w8a8_into_e4m3(name, reference, tmp_path):
    art = optimize(name, passes=["quantize:mode=w8a8,calib=example"], target="tensorrt:fp8=true", output=tmp_path / "f")
    model = _graph(art)
    assert check(model) == []
    quantized = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    sites = art.manifest["lowering"]["quantization"]["sites"]
    # tiny-vit's patch embedding reads the image and stays int8 (tensorrt_qdq); everything else is E4M3.
    assert sites.get("w8a8", 0) == (1 if name == "tiny-vit" else 0)
    fp8 = [q for q in quantized if q.outputs[0].dtype == ir.DataType.FLOAT8E4M3FN]
    assert fp8 and len(quantized) - len(fp8) == sites.get("w8a8", 0)
    weights = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].is_initializer()]
    assert len(weights) == sites["fp8"] + sites.get("w8a8", 0)
    assert sum(w.inputs[0].dtype == ir.DataType.FLOAT8E4M3FN for w in weights) == sites["fp8"]
    # E4M3 has 3 mantissa bits (steps of 6% to 12%) where int8 has 1/127 of the range: a looser budget.
    for got, want in zip(_run(art, _feeds(name)), reference[name]):
        assert _cosine(got, want) >= 0.995


def test_fp8_needs_w8a8_decisions(tmp_path):
    with pytest.raises(PassError, match="mode=w8a8"):
        optimize("tiny-bert", passes=["quantize:mode=w8"], target="tensorrt:fp8=true", output=tmp_path / "x")


@pytest.mark.parametrize("text, needle", [
    ("precision=fp8", "precision='fp8'"), ("fp8=maybe", "not a boolean"), ("version=9.0", "10.x or 11.x"),
    ("workspace=4", "no option"), ("shapes=batch=8:1:1", "MIN:OPT:MAX"),
])
def test_bad_options_are_one_sentence(text, needle):
    with pytest.raises(PassError, match=needle):
        parse_options(text)


def test_options_parse_shapes_joined_either_way():
    a = parse_options("precision=bf16,shapes=batch=1:2:4;sequence=1:64:256,version=10.15")
    b = parse_options("shapes=batch=1:2:4,sequence=1:64:256,precision=bf16,version=10.15")
    assert a == b and a.shapes == {"batch": (1, 2, 4), "sequence": (1, 64, 256)} and a.version == (10, 15)


def test_profiles_follow_the_shape_ranges(tmp_path):
    art = optimize("tiny-bert", passes=["cleanup"], target="tensorrt:shapes=batch=2:4:16;sequence=8:64:256",
                   output=tmp_path / "b")
    profile = art.manifest["lowering"]["engines"]["model"]["profile"]
    assert profile["input_ids"] == {"min": [2, 8], "opt": [4, 64], "max": [16, 256]}


def test_cli_writes_the_graph_and_says_engines_need_tensorrt(tmp_path, capsys):
    from optimizer.cli import main
    from optimizer.lower.tensorrt import tensorrt_available

    code = main(["optimize", "tiny-bert", "-o", str(tmp_path / "cli"), "--target", "tensorrt"])
    err = capsys.readouterr().err
    assert code == 0 and (tmp_path / "cli" / "model.onnx").is_file()
    if not tensorrt_available():
        lines = [line for line in err.splitlines() if "TensorRT is not installed" in line]
        assert len(lines) == 1


def test_unknown_target_names_the_targets(tmp_path):
    with pytest.raises(PassError, match="tensorrt"):
        optimize("tiny-bert", target="tensorrtx", output=tmp_path / "x")


@pytest.mark.parametrize("spec", ["quantize:mode=w4", "quantize:mode=w4,block=32"])
def test_w4_is_exact_in_fp32_block_quantized_over_k_and_legal(spec):
    from optimizer.lower.tensorrt import TensorRTOptions, lower_tensorrt
    from optimizer.pipeline import PassContext, instantiate, run_pipeline
    from optimizer.progress import Progress
    from optimizer.specs import parse_spec
    from optimizer.trace_cache import cached_trace

    spec_of = registry.get("tiny-llama")
    feeds = _feeds("tiny-llama")
    ctx = PassContext(example_feeds=feeds, calibration=spec_of, progress=Progress())
    decided, _ = run_pipeline(cached_trace(spec_of, Progress()), parse_spec(spec), ctx)
    assert instantiate(parse_spec(spec))
    want = _ort(decided, feeds)
    lowered, details = lower_tensorrt(ir.from_proto(ir.to_proto(decided)), TensorRTOptions(precision="fp32"))
    assert check(lowered) == [] and lowered.opset_imports[""] >= 21
    int4 = [n for n in lowered.graph if n.op_type == "DequantizeLinear" and n.inputs[0].dtype == ir.DataType.INT4]
    assert len(int4) == details["quantization"]["sites"]["w4"] > 0
    assert all(n.attributes["axis"].as_int() == 0 and n.attributes["block_size"].as_int() > 0 for n in int4)
    for got, expected in zip(_ort(lowered, feeds), want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def _ort(model: ir.Model, feeds) -> list[np.ndarray]:
    """Plain ONNX semantics: ORT's optimizer would turn a block-wise int4 DequantizeLinear + MatMul into
    its MatMulNBits kernel, whose rounding differs from the per-channel form it started as."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
