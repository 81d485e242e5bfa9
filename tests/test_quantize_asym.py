"""Asymmetric int4 (``quantize:mode=w4,sym=false``): the grid search, the decision form, its lowerings.

Numerics: weights already on a 16-level affine grid per block come back exactly (the case of a
model whose weights were rounded to Q4_1 before); random weights stay within min-max's bound and
are no worse than symmetric. Structure and counts of the decision form (uint4
``DequantizeLinear`` + a float offset per block) on tiny-llama; the form on ORT equals numpy;
MatMulNBits/GatherBlockQuantized and the torch backend equal the form; TensorRT and bad options
are refused with a sentence.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from models import registry
from optimizer.lower.ort_wonly import lower_weight_only
from optimizer.pipeline import PassContext, instantiate, run_pipeline
from optimizer.progress import Progress
from optimizer.specs import PassSpec
from optimizer.trace_cache import cached_trace
from passes import quantize_asym as qa
from passes import quantize_asym_graph as form
from passes import quantize_block as qb
from passes.quantize_rewrite import META
from runtime.errors import PassError

ASYM32 = qb.Format(4, 32, sym=False)


def _grid_weight(k: int, n: int, block: int, seed: int = 0, levels=(0, 15)) -> np.ndarray:
    """m + d q per block of ``block`` rows, d and m float16 values, q drawn from ``levels``."""
    rng = np.random.default_rng(seed)
    nb = -(-k // block)
    d = rng.uniform(0.002, 0.05, (nb, n)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.4, 0.1, (nb, n)).astype(np.float16).astype(np.float32)
    q = rng.integers(levels[0], levels[1] + 1, (k, n)).astype(np.float32)
    return np.repeat(m, block, 0)[:k] + np.repeat(d, block, 0)[:k] * q


def _run(model: ir.Model, feeds, optimize: bool = False) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _feeds(batch: int = 2, seq: int = 12) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in registry.get("tiny-llama").example_inputs(batch, seq).items()}


def _quantize(options: dict, model: ir.Model | None = None):
    model = model if model is not None else cached_trace(registry.get("tiny-llama"), Progress())
    ctx = PassContext(example_feeds=_feeds())
    decided, records = run_pipeline(model, [PassSpec("quantize", options)], ctx)
    return decided, records[0]


@pytest.mark.parametrize("k, block, levels", [(64, 32, (0, 15)), (64, 32, (3, 11)), (40, 32, (0, 15)), (96, 0, (0, 15))])
def test_weights_on_an_affine_grid_round_trip_exactly(k, block, levels):
    """Full grids (min-max finds them), partial ones (the gap search does), short last blocks."""
    w = _grid_weight(k, 24, block or k, levels=levels)
    q, step, offset = qb.quantize_clipped(w, qb.Format(4, block, sym=False), None, clip=True)
    assert q.dtype == np.uint8 and q.max() <= 15 and step.dtype == offset.dtype == np.float16
    np.testing.assert_array_equal(qb.dequantize(q, step, qb.Format(4, block, sym=False), offset), w)


def test_a_finer_block_than_the_grid_is_still_exact():
    """Blocks of 16 inside a Q4_1-style grid of 32 rarely reach both ends of it: still exact."""
    w = _grid_weight(128, 16, 32, seed=3)
    q, step, offset = qa.quantize(w, 16, None, qb.CLIP_RATIOS, gap_search=True)
    np.testing.assert_array_equal(qa.dequantize(q, step, offset, 16), w)
    q, step, offset = qa.quantize(w, 16, None, (1.0,), gap_search=False)
    assert np.abs(qa.dequantize(q, step, offset, 16) - w).max() > 0  # min-max alone is not


@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_random_weights_within_min_max_bound_and_no_worse_than_symmetric(shift):
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((256, 48)) + shift).astype(np.float32)
    q, step, offset = qb.quantize_clipped(w, ASYM32, None, clip=False)
    blocks = w.reshape(8, 32, 48)
    bound = ((blocks.max(1) - blocks.min(1)) / 15 / 2 * 1.002) ** 2 * 32  # per block: (half a min-max step)^2 x 32
    err = ((qb.dequantize(q, step, ASYM32, offset) - w).reshape(8, 32, 48) ** 2).sum(1)
    assert np.all(err <= bound)
    sym = qb.Format(4, 32)
    for clip in (False, True):
        q, step, offset = qb.quantize_clipped(w, ASYM32, None, clip)
        q_s, scale_s, _ = qb.quantize_clipped(w, sym, None, clip)
        asym_err = ((qb.dequantize(q, step, ASYM32, offset) - w) ** 2).sum()
        assert asym_err <= ((qb.dequantize(q_s, scale_s, sym) - w) ** 2).sum()


def test_steps_outside_float16_stay_float32():
    w = _grid_weight(32, 4, 32) * 1e-4  # steps below float16's normal range
    q, step, offset = qa.quantize(w, 32)
    assert step.dtype == np.float32
    np.testing.assert_allclose(qa.dequantize(q, step, offset, 32), w, rtol=1e-5, atol=1e-9)


def test_decision_structure_and_counts():
    model, record = _quantize({"mode": "w4", "block": "32", "sym": "false"})
    assert record.details["weights"] == "uint4 asymmetric blocks of 32"
    sites = [n for n in model.graph if n.op_type == "MatMul" and META in n.metadata_props]
    assert record.details["quantized"] == len(sites) == 14 and record.sites == 15  # and the tied table
    for matmul in sites:
        affine = form.read(matmul.inputs[1])
        assert affine is not None and affine.axis == 0 and affine.block == 32 and affine.half
        k, n = matmul.inputs[1].shape
        cut = ["Slice"] if k % 32 else []  # the MLP's down projection: K = 176
        assert [n.op_type for n in affine.nodes] == ["Cast", "Cast", "DequantizeLinear", "Reshape", "Add", "Reshape"] + cut
        dq = affine.nodes[2]
        assert dq.inputs[0].dtype == ir.DataType.UINT4 and dq.attributes.get_int("block_size") == 32
        assert affine.step.shape == affine.offset.shape == (-(-k // 32), n)
        info = json.loads(matmul.metadata_props[META])
        assert (info["mode"], info["bits"], info["block_size"], info["sym"]) == ("w4", 4, 32, False)
    [table] = [n for n in model.graph if META in n.metadata_props and "table" in json.loads(n.metadata_props[META])]
    affine = form.read(table.outputs[0])
    assert affine.axis == 1 and affine.q.shape == (264, 64) and affine.step.shape == (264, 2)
    assert collections.Counter(u.node.op_type for u in table.outputs[0].uses()) == {"Gather": 1, "Transpose": 1}


def _numpy_weights(model: ir.Model) -> ir.Model:
    """A copy whose affine forms are replaced by their numpy-dequantized float weights."""
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    for node in list(copy.graph):
        if form.AFFINE not in node.metadata_props:
            continue
        affine = form.read(node.outputs[0])
        step, offset = (a.T if affine.axis else a for a in (affine.step, affine.offset))
        weight = qa.dequantize(affine.q.T if affine.axis else affine.q, step, offset, affine.block)
        value = ir.Value(name=f"{node.name}_float", const_value=ir.tensor(weight.T if affine.axis else weight))
        copy.graph.register_initializer(value)
        node.outputs[0].replace_all_uses_with(value)
        form.remove(copy.graph, affine)
    return copy


@pytest.mark.parametrize("options", [{"block": "32"}, {"block": "0"}, {"block": "64", "embed": "8"}])
def test_decision_equals_numpy_dequantized_weights(options):
    model, _ = _quantize({"mode": "w4", "sym": "false", **options})
    feeds = _feeds(3, 11)
    np.testing.assert_array_equal(_run(_numpy_weights(model), feeds)[0], _run(model, feeds)[0])


def test_int8_table_stays_symmetric():
    model, record = _quantize({"mode": "w4", "block": "32", "sym": "false", "embed": "8"})
    [table] = record.details["tables"]
    assert table["bits"] == 8 and "sym" not in table
    assert sum(n.op_type == "DequantizeLinear" and n.inputs[0].dtype == ir.DataType.INT8 for n in model.graph) == 1


@pytest.mark.parametrize("options", [{"block": "32"}, {"block": "0"}, {"block": "32", "embed_block": "16"}])
def test_ort_lowering_equals_the_decision(options):
    """MatMulNBits with float zero points, GatherBlockQuantized plus the gathered offsets."""
    model, record = _quantize({"mode": "w4", "sym": "false", **options})
    assert record.details["tables"][0]["block"] == int(options.get("embed_block", options["block"]))
    feeds = _feeds(2, 9)
    want = _run(model, feeds)[0]
    counts = lower_weight_only(model, accuracy_level=1)
    ops = collections.Counter(n.op_type for n in model.graph)
    assert counts == {"MatMulNBits": 15, "GatherBlockQuantized": 1} == {k: ops[k] for k in counts}
    # attention's two per layer, block sums once per activation (4 per layer and the head's), an offset term per kernel
    assert ops["DequantizeLinear"] == 0 and ops["MatMul"] == 2 * 2 + (2 * 4 + 1) + 15
    assert all(len(n.inputs) == 3 for n in model.graph if n.op_type == "MatMulNBits")  # the default zero point
    stored = [v.const_value.dtype for v in model.graph.initializers.values() if v.name.endswith("_fp16")]
    assert stored and set(stored) == {ir.DataType.FLOAT16}  # steps and offsets stay float16
    np.testing.assert_allclose(_run(model, feeds, optimize=True)[0], want, rtol=1e-4, atol=1e-4)


def _matmul_model(w: np.ndarray) -> ir.Model:
    k, n = w.shape
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", k]))
    weight = ir.Value(name="w", const_value=ir.tensor(w, name="w"))
    mm = ir.node("MatMul", [x, weight], name="mm")
    mm.outputs[0].name, mm.outputs[0].type, mm.outputs[0].shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["batch", n])
    graph = ir.Graph([x], [mm.outputs[0]], nodes=[mm], initializers=[weight], opset_imports={"": 20}, name="g")
    return ir.Model(graph, ir_version=10)


def test_grid_weight_through_the_pass_and_kernels_with_a_short_block():
    """K = 40, block 32: the form pads and slices; the decided weight is the grid weight itself."""
    w = _grid_weight(40, 8, 32, seed=5)
    model, record = run_pipeline(_matmul_model(w), [PassSpec("quantize", {"mode": "w4", "block": "32", "sym": "false"})],
                                 PassContext())
    affine = form.read(next(n for n in model.graph if n.op_type == "MatMul").inputs[1])
    assert affine.nodes[-1].op_type == "Slice"
    model.graph.outputs.append(affine.nodes[-1].outputs[0])
    feeds = {"x": np.random.default_rng(6).standard_normal((3, 40)).astype(np.float32)}
    y, weight = _run(model, feeds)
    np.testing.assert_array_equal(weight, w)
    model.graph.outputs.pop()
    assert lower_weight_only(model, accuracy_level=1) == {"MatMulNBits": 1}
    np.testing.assert_allclose(_run(model, feeds, optimize=True)[0], y, rtol=1e-5, atol=1e-5)


def test_torch_backend_runs_the_decision():
    import torch

    from optimizer.lower.torch import build_graph_module

    model, _ = _quantize({"mode": "w4", "block": "32", "sym": "false"})
    feeds = _feeds(2, 10)
    want = _run(model, feeds)
    module = build_graph_module(ir.serde.deserialize_model(ir.serde.serialize_model(model)))
    with torch.inference_mode():
        got = module(*[torch.from_numpy(feeds[v.name]) for v in model.graph.inputs])
    got = got if isinstance(got, (tuple, list)) else [got]
    np.testing.assert_allclose(got[0].numpy(), want[0], rtol=1e-5, atol=1e-5 * np.abs(want[0]).max())
    # The weights are folded when the module is built: the same calls per run as with symmetric int4.
    symmetric, _ = _quantize({"mode": "w4", "block": "32"})
    calls = [collections.Counter(n.target.__name__ for n in m.graph.nodes if n.op == "call_function")
             for m in (module, build_graph_module(symmetric))]
    assert calls[0] == calls[1] and calls[0]["dequantize_linear"] == 0


def test_end_to_end_artifact_is_closer_than_symmetric():
    from optimizer import optimize

    feeds = _feeds(2, 16)
    plain = _run(cached_trace(registry.get("tiny-llama"), Progress()), feeds)[0].ravel()
    cosines = []
    for spec in ("quantize:mode=w4,block=32", "quantize:mode=w4,block=32,sym=false"):
        got = optimize("tiny-llama", passes=[spec]).load().run(feeds)["logits"].ravel()
        cosines.append(float(got @ plain / np.linalg.norm(got) / np.linalg.norm(plain)))
    assert cosines[1] >= 0.98 and cosines[1] >= cosines[0] - 0.002


def test_tensorrt_refuses_asymmetric_weights():
    from optimizer.lower.tensorrt import TensorRTOptions, lower_tensorrt

    model, _ = _quantize({"mode": "w4", "block": "32", "sym": "false"})
    with pytest.raises(PassError, match="asymmetric int4 .* quantize with sym=true for the tensorrt target"):
        lower_tensorrt(model, TensorRTOptions(precision="fp32"))


@pytest.mark.parametrize("options, needle", [
    ({"mode": "w8", "sym": "false"}, "applies to mode w4; mode w8 is symmetric"),
    ({"mode": "dynamic", "sym": "false"}, "applies to mode w4; mode dynamic is symmetric"),
    ({"mode": "w8a8", "sym": "false"}, "applies to mode w4; mode w8a8 is symmetric"),
    ({"mode": "w4", "sym": "false", "gptq": "true"}, "gptq=true keeps symmetric int4 steps"),
    ({"mode": "w4", "sym": "maybe"}, "option sym='maybe' of pass 'quantize' is not true or false"),
    ({"mode": "w4", "embed_block": "24"}, "no embed_block=24; it takes 0"),
])
def test_bad_options(options, needle):
    with pytest.raises(PassError, match=needle):
        instantiate([PassSpec("quantize", options)])


def test_budget_measures_the_asymmetric_weights():
    """The budget's recorded degradation is what the written asymmetric graph does (tiny-bert, 1 - cosine)."""
    from optimizer.calibrate import calibration_feeds

    options = {"mode": "w4", "block": "32", "sym": "false", "embed": "float", "budget": "1", "calib_samples": "8"}
    model, records = run_pipeline(cached_trace(registry.get("tiny-bert"), Progress()), [PassSpec("quantize", options)],
                                  PassContext(calibration="tiny-bert"))
    details = records[0].details["budget"]
    batches = calibration_feeds("tiny-bert", 8)
    plain = cached_trace(registry.get("tiny-bert"), Progress())
    ref, got = ([_run(m, b)[0].reshape(len(b["input_ids"]), -1).astype(np.float64) for b in batches] for m in (plain, model))
    a, b = np.concatenate(ref), np.concatenate(got)
    measured = float(np.mean(1 - (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))
    assert details["float_blocks"] == [] and measured == pytest.approx(details["degradation"], rel=1e-3, abs=1e-6)
