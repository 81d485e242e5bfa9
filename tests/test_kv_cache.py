"""The kv_cache pass: structure, exactness (prefill and decode against the full graph), counts, refusals."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from models import registry
from optimizer import trace
from optimizer.pipeline import PassContext, run_pipeline
from optimizer.progress import Progress
from optimizer.specs import PassSpec
from optimizer.trace_cache import cached_trace
from runtime.errors import FeedError, PassError
from runtime.kv import Kind, KVCache, KVLayout


def _plain(name: str) -> ir.Model:
    return ir.from_proto(ir.to_proto(cached_trace(registry.get(name), Progress())))


def _cached(name: str, **options) -> tuple[ir.Model, list]:
    model, records = run_pipeline(_plain(name), [PassSpec("kv_cache", options)], PassContext())
    return model, records


def _session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def llama():
    plain = _plain("tiny-llama")
    model, records = _cached("tiny-llama")
    return _session(plain), model, _session(model), records[0]


def _empty_past(session, batch: int) -> dict[str, np.ndarray]:
    feeds = {}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
    return feeds


def _decode(cached, ids: np.ndarray, prefix: int) -> list[np.ndarray]:
    """Prefill ``prefix`` tokens then feed the rest one by one; the logits of every step."""
    batch = ids.shape[0]
    past = _empty_past(cached, batch)
    names = [o.name for o in cached.get_outputs()]
    steps, start = [], 0
    for end in [prefix] + list(range(prefix + 1, ids.shape[1] + 1)):
        feeds = {"input_ids": ids[:, start:end], "attention_mask": np.ones((batch, end), np.int64),
                 "position_ids": np.tile(np.arange(start, end), (batch, 1)), **past}
        outs = dict(zip(names, cached.run(None, feeds)))
        past = {n.replace("present", "past_key_values"): v for n, v in outs.items() if n.startswith("present")}
        steps.append(outs["logits"])
        start = end
    return steps


def test_interface_follows_optimum(llama):
    _, model, _, record = llama
    inputs = [v.name for v in model.graph.inputs]
    outputs = [v.name for v in model.graph.outputs]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs[3:] == [f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
    assert outputs == ["logits"] + [f"present.{i}.{k}" for i in range(2) for k in ("key", "value")]
    past = model.graph.inputs[3]
    assert [past.shape[1], past.shape[3]] == [2, 16]  # kv_heads (GQA 4/2), not the 4 query heads


def test_structure_and_counts(llama):
    _, model, _, record = llama
    concats = [n for n in model.graph if n.op_type == "Concat" and n.name.startswith("kv_cache_concat")]
    assert len(concats) == 4 and record.sites == 2
    assert record.details["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    mask = next(v for v in model.graph.inputs if v.name == "attention_mask")
    assert all(user.name.startswith("kv_cache") for user, _ in mask.uses())
    assert sum(n.op_type in {"Cos", "Sin"} for n in model.graph) == 0  # RoPE tables became lookups


def test_prefill_equals_the_full_graph(llama):
    full, _, cached, _ = llama
    ids = np.random.default_rng(0).integers(0, 264, (3, 11)).astype(np.int64)
    ref = full.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    got = _decode(cached, ids, prefix=11)[0]
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("prefix", [1, 5])
def test_decoding_equals_the_full_graph(llama, prefix):
    full, _, cached, _ = llama
    ids = np.random.default_rng(prefix).integers(0, 264, (2, 12)).astype(np.int64)
    ref = full.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    steps = _decode(cached, ids, prefix)
    np.testing.assert_allclose(steps[0], ref[:, :prefix], atol=1e-5)
    for t, logits in enumerate(steps[1:]):
        np.testing.assert_allclose(logits[:, 0], ref[:, prefix + t], atol=1e-5)


def test_static_cache_structure_and_decoding(llama):
    full, _, _, _ = llama
    model, records = _cached("tiny-llama", static=16)
    names = {v.name: v for v in model.graph.inputs}
    assert list(names["past_key_values.0.key"].shape) == ["batch", 2, 16, 16] and "cache_position" in names
    assert sum(n.op_type == "ScatterElements" for n in model.graph) == 4 and records[0].details["static"] == 16
    session = _session(model)
    ids = np.random.default_rng(3).integers(0, 264, (2, 9)).astype(np.int64)
    ref = full.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    past = {i.name: np.zeros((2, 2, 16, 16), np.float32) for i in session.get_inputs() if i.name.startswith("past")}
    names = [o.name for o in session.get_outputs()]
    for start, end in [(0, 6), (6, 7), (7, 8), (8, 9)]:
        mask = np.zeros((2, 16), np.int64)
        mask[:, :end] = 1
        feeds = {"input_ids": ids[:, start:end], "attention_mask": mask, "cache_position": np.arange(start, end),
                 "position_ids": np.tile(np.arange(start, end), (2, 1)), **past}
        outs = dict(zip(names, session.run(None, feeds)))
        past = {n.replace("present", "past_key_values"): v for n, v in outs.items() if n.startswith("present")}
        np.testing.assert_allclose(outs["logits"], ref[:, start:end], atol=1e-5)


def test_int8_cache_structure_and_accuracy(llama):
    full, _, _, _ = llama
    model, records = _cached("tiny-llama", kv="int8")
    past = {v.name: v for v in model.graph.inputs if v.name.startswith("past")}
    assert past["past_key_values.0.key"].dtype == ir.DataType.INT8 and list(past["past_key_values.0.key_scale"].shape)[3] == 1
    assert records[0].details["kv_bytes_per_token"] == 2 * 2 * 2 * (16 + 4)  # int8 elements + one fp32 scale per head
    session = _session(model)
    ids = np.random.default_rng(4).integers(0, 264, (2, 10)).astype(np.int64)
    ref = full.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(10), (2, 1))}
    for i in session.get_inputs():
        if i.name.startswith("past"):
            feeds[i.name] = np.zeros((2, 2, 0, i.shape[3]), np.int8 if i.type == "tensor(int8)" else np.float32)
    got = session.run(["logits"], feeds)[0]
    error = np.abs(got - ref).max() / np.abs(ref).max()
    assert 0 < error < 0.02  # lossy, within 2% of the logits' range


def test_scores_output_sums_attention(tmp_path):
    model, records = _cached("tiny-llama", scores=True)
    session = _session(model)
    ids = np.arange(1, 8, dtype=np.int64)[None]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(7)[None],
             **_empty_past(session, 1)}
    outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    # every query row of every head sums to 1: 4 heads x 7 queries in all
    np.testing.assert_allclose(outs["attention.0"].sum(), 4 * 7, rtol=1e-5)
    assert records[0].details["scores"] is True


@pytest.mark.parametrize("name, message", [
    ("tiny-bert", "no causal mask"),
    ("tiny-vit", "needs a decoder with inputs input_ids and attention_mask"),
])
def test_refuses_models_that_are_not_decoders(name, message):
    with pytest.raises(PassError, match=message):
        _cached(name)


def test_refuses_a_model_already_cached(llama):
    _, model, _, _ = llama
    copy = ir.from_proto(ir.to_proto(model))
    with pytest.raises(PassError, match="already reads a KV cache"):
        run_pipeline(copy, [PassSpec("kv_cache")], PassContext())


def test_refuses_a_model_without_attention():
    class NoAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(20, 8), torch.nn.Linear(8, 20)

        def forward(self, input_ids, attention_mask):
            return self.head(self.embed(input_ids) * attention_mask[..., None])

    ids = torch.randint(0, 20, (2, 5))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    model = trace(NoAttention().eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, axes, ["logits"])
    with pytest.raises(PassError, match="no attention"):
        run_pipeline(model, [PassSpec("kv_cache")], PassContext())


def test_option_errors():
    from optimizer.pipeline import instantiate

    with pytest.raises(PassError, match="max_positions >= 2"):
        instantiate([PassSpec("kv_cache", {"max_positions": 1})])
    with pytest.raises(PassError, match="layer_masks works with a float cache that grows"):
        instantiate([PassSpec("kv_cache", {"layer_masks": True, "static": 16})])
    with pytest.raises(PassError, match="kv must be float or int8"):
        instantiate([PassSpec("kv_cache", {"kv": "fp4"})])
    with pytest.raises(PassError, match="drop static or kv=int8"):
        instantiate([PassSpec("kv_cache", {"kv": "int8", "static": 16})])
    with pytest.raises(PassError, match="static=8000 must be between"):
        instantiate([PassSpec("kv_cache", {"static": 8000})])


def test_cache_capacity_and_layout_errors():
    layout = KVLayout([2], [Kind("key", 16, np.dtype(np.float32)), Kind("value", 16, np.dtype(np.float32))])
    cache = KVCache(layout, batch=1, capacity=4)
    with pytest.raises(FeedError, match="cache holds 4"):
        cache.check_room(5)
    with pytest.raises(FeedError, match="no KV cache"):
        KVLayout.of([{"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64"}])


@pytest.mark.parametrize("passes", [
    ["quantize:mode=dynamic,calib=example", "kv_cache"],
    ["kv_cache", "quantize:mode=dynamic,calib=example"],
    ["kv_cache", "skip_layers:blocks=1"],
])
def test_composes_with_lossy_passes(tmp_path, passes):
    import optimizer
    import runtime
    from runtime.generate import generate

    art = optimizer.optimize("tiny-llama", passes=passes, output=tmp_path / "c")
    session = runtime.load(art.path)
    assert any(i["name"].startswith("past_key_values") for i in session.inputs)
    assert [p["sites"] > 0 for p in art.manifest["passes"]] == [True, True]
    assert len(generate(session, [[1, 40, 41, 42]], max_new_tokens=6).tokens[0]) == 6
