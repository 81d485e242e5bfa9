"""Quantized embedding tables: a tied table stored once, its two ORT kernels sharing one initializer.

tiny-llama ties its embedding and head like SmolLM2 (one [264, 64] table read by a Gather and,
through a Transpose, by the head MatMul); tiny-bert has three untied Gather tables.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from models import registry
from optimizer.lower.ort_wonly import lower_weight_only
from optimizer.pipeline import PassContext, run_pipeline
from optimizer.progress import Progress
from optimizer.specs import PassSpec
from optimizer.trace_cache import cached_trace
from passes import quantize_block as qb
from passes.quantize_rewrite import META

TABLE = "lm_head.weight"


def _quantize(name: str, options: dict) -> tuple[ir.Model, dict]:
    feeds = {k: v.numpy() for k, v in registry.get(name).example_inputs(2, 16).items()}
    model, records = run_pipeline(cached_trace(registry.get(name), Progress()), [PassSpec("quantize", options)],
                                  PassContext(example_feeds=feeds))
    return model, records[0]


def _run(model: ir.Model, feeds, optimize: bool = False) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _feeds(batch: int = 2, seq: int = 12) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in registry.get("tiny-llama").example_inputs(batch, seq).items()}


@pytest.mark.parametrize("mode, block, dtype", [("w4", 32, ir.DataType.INT4), ("w8", 0, ir.DataType.INT8)])
def test_tied_table_is_stored_once_quantized(mode, block, dtype):
    original = cached_trace(registry.get("tiny-llama"), Progress()).graph.initializers[TABLE].const_value.numpy()
    model, record = _quantize("tiny-llama", {"mode": mode, "block": str(block)})
    assert TABLE not in model.graph.initializers
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear" and META in n.metadata_props]
    assert len(dqs) == 1
    dq = dqs[0]
    readers = collections.Counter(use.node.op_type for use in dq.outputs[0].uses())
    assert readers == {"Gather": 1, "Transpose": 1}
    q, scale = dq.inputs[0].const_value, dq.inputs[1].const_value.numpy()
    assert q.dtype == dtype and tuple(q.shape) == original.shape
    assert scale.shape == ((264, 2) if block else (264,))
    [table] = record.details["tables"]
    assert table["roles"] == ["embeddings", "head"] and table["bits"] == (4 if mode == "w4" else 8)
    # Per row (block 0) int8 without clipping: every value within half a step of the original.
    if not block:
        assert np.all(np.abs(q.numpy().astype(np.float32) * scale[:, None] - original) <= scale[:, None] / 2 * (1 + 1e-6))
    # Exactly the numpy-dequantized table, whichever reader.
    fmt = qb.Format(4 if mode == "w4" else 8, block)
    want = qb.dequantize(q.numpy().T, scale.T, fmt).T
    reference = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    node = next(n for n in reference.graph if n.name == dq.name)
    weight = ir.Value(name="table_float", const_value=ir.tensor(want.astype(np.float32)))
    reference.graph.register_initializer(weight)
    node.outputs[0].replace_all_uses_with(weight)
    reference.graph.remove(node, safe=True)
    np.testing.assert_array_equal(_run(reference, _feeds()), _run(model, _feeds()))


def test_lowered_kernels_share_the_packed_table():
    model, _ = _quantize("tiny-llama", {"mode": "w4", "block": "32"})
    want = _run(model, _feeds())
    lower_weight_only(model, accuracy_level=1)
    gbq = next(n for n in model.graph if n.op_type == "GatherBlockQuantized")
    head = next(n for n in model.graph if n.op_type == "MatMulNBits" and n.outputs[0].name == "logits")
    assert gbq.inputs[0] is head.inputs[1]  # one stored table
    assert gbq.inputs[2].producer().inputs[0] is head.inputs[2]  # one stored set of scales
    packed = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
                 and v.const_value.dtype == ir.DataType.UINT8)
    assert packed == sum(n.inputs[1].const_value.nbytes for n in model.graph if n.op_type == "MatMulNBits")
    np.testing.assert_allclose(_run(model, _feeds(), optimize=True), want, rtol=1e-4, atol=1e-4)


def test_untied_tables_and_embed_option():
    """tiny-bert: three Gather tables; embed=8 quantizes them in dynamic mode too; embed=float keeps them."""
    model, record = _quantize("tiny-bert", {"mode": "dynamic", "embed": "8"})
    assert len(record.details["tables"]) == 3
    feeds = {k: v.numpy() for k, v in registry.get("tiny-bert").example_inputs(2, 12).items()}
    want = _run(model, feeds)
    assert lower_weight_only(model, accuracy_level=1)["GatherBlockQuantized"] == 3
    # Unoptimized: ORT would otherwise turn the (dynamic) sites' DequantizeLinear + MatMul into
    # its int8-activation kernel; only the tables were lowered here.
    np.testing.assert_allclose(_run(model, feeds), want, rtol=1e-5, atol=1e-5)
    _, kept = _quantize("tiny-bert", {"mode": "w8", "embed": "float"})
    assert "tables" not in kept.details
    _, default = _quantize("tiny-bert", {"mode": "dynamic"})
    assert "tables" not in default.details  # dynamic and w8a8 leave tables float unless asked


@pytest.mark.parametrize("skip", ["head", "embeddings"])
def test_skipping_either_reader_keeps_a_tied_table_float(skip):
    model, record = _quantize("tiny-llama", {"mode": "w4", "skip": skip})
    assert TABLE in model.graph.initializers
    assert any(f"table {TABLE} (embeddings+head) stays float: skip={skip}" in n for n in record.details["notes"])
