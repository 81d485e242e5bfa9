"""prune_tokens on the small models: structure (stages, gathers, rerouted blocks), numerics (keep=1.0
is exact; dropping only padding is exact; merging duplicates is exact), counts (stages, side
values, FLOPs), frames across calls, and the cases that must fail with a PassError."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from models import data, registry
from optimizer.pipeline import PassContext, run_pipeline
from optimizer.progress import Progress
from optimizer.specs import PassSpec, parse_spec
from optimizer.structure import build_map
from optimizer.trace_cache import cached_trace
from runtime.errors import PassError


@pytest.fixture(scope="module")
def traced():
    """Serialized traces of the small built-ins (each test deserializes a fresh copy)."""
    names = ("tiny-bert", "tiny-vit", "tiny-llama")
    return {name: ir.serde.serialize_model(cached_trace(registry.get(name), Progress())) for name in names}


def _prune(proto, text: str, target: str = "ort-cpu"):
    model, records = run_pipeline(ir.serde.deserialize_model(proto), parse_spec(text), PassContext(target=target))
    return model, records[0]


def _run(model_or_proto, feeds, extra_outputs=(), optimize: bool = True) -> dict[str, np.ndarray]:
    proto = model_or_proto if isinstance(model_or_proto, onnx.ModelProto) else ir.serde.serialize_model(model_or_proto)
    for name in extra_outputs:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    if not optimize:  # the same arithmetic, without ORT's fusions (which differ around a gather)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _text_feeds(batch: int = 3, seq: int = 24) -> dict[str, np.ndarray]:
    feeds = {k: v.numpy() for k, v in registry.get("tiny-bert").example_inputs(batch, seq).items()}
    feeds["attention_mask"][1:, seq // 2:] = 0  # rows 1.. are half padding
    return feeds


def _image_feeds() -> dict[str, np.ndarray]:
    return {"pixel_values": data.images("eval", size=32, n=3)}


# --- structure and counts --------------------------------------------------------------------------

def test_stage_structure_and_record(traced):
    model, record = _prune(traced["tiny-bert"], "prune_tokens:keep=0.5,after=2")
    ops = [n.op_type for n in model.graph]
    assert record.sites == 1 and ops.count("TopK") == 2  # choose K, then sort the kept indices
    assert ops.count("GatherND") == 2  # the stream, and the restore from the nearest kept tokens
    stage = record.details["stages"][0]
    assert stage["block"] == 2 and stage["keep"] == 0.5 and stage["side_values_rewritten"] >= 3
    assert record.details["restored"] is True  # last_hidden_state is per token
    # block 2's Q, K, V projections and its residual Add read the gathered stream, not block 1's output
    old_map = build_map(ir.serde.deserialize_model(traced["tiny-bert"]))
    gathered = next(n for n in model.graph if n.op_type == "GatherND").outputs[0]
    readers = [node.op_type for node, _ in gathered.uses()]
    assert readers.count("MatMul") == 3 and "Add" in readers
    block_input = next(v for n in model.graph for v in n.outputs if v.name == old_map.blocks[2].input)
    assert {node.op_type for node, _ in block_input.uses()} >= {"GatherND", "ReduceL2"}  # the gather and nearest-fill
    flops = record.details["flops"]
    assert flops["reference_length"] is True and [b["tokens_after"] for b in flops["blocks"]] == [128, 128, 64, 64]
    # per block: 2 * (4 * 64 * 64 + 2 * 64 * 256) per token and 4 * 4 * 16 per token pair, at 128 tokens
    assert flops["gflops_before"] == round(4 * (98304 * 128 + 256 * 128**2) / 1e9, 4)
    assert flops["gflops_after"] == round((2 * (98304 * 128 + 256 * 128**2) + 2 * (98304 * 64 + 256 * 64**2)) / 1e9, 4)


def test_schedule_places_a_stage_wherever_the_ratio_drops(traced):
    _, record = _prune(traced["tiny-vit"], "prune_tokens:schedule=1+0.75+0.75+0.5")
    assert record.sites == 2 and [s["block"] for s in record.details["stages"]] == [1, 3]
    assert [s["tokens"] for s in record.details["stages"]] == [13, 9]  # ceil(r * 17), static for TensorRT


def test_merge_on_short_text_merges_what_it_can(traced):
    """A symbolic length: r is clamped at run time, so 6 tokens with r=8 still run (1 merge left)."""
    model, _ = _prune(traced["tiny-bert"], "prune_tokens:mode=merge,r=8")
    out = _run(model, _text_feeds(batch=2, seq=6))
    assert out["last_hidden_state"].shape == (2, 6, 64) and np.isfinite(out["sentence_embedding"]).all()


def test_merge_counts(traced):
    _, record = _prune(traced["tiny-vit"], "prune_tokens:mode=merge,r=2,after=1")
    assert record.sites == 3 and [s["tokens"] for s in record.details["stages"]] == [15, 13, 11]
    assert record.details["proportional_attention"] is True


# --- numerics --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, text", [
    ("tiny-bert", "prune_tokens:keep=1.0,after=1"),
    ("tiny-bert", "prune_tokens:keep=1.0,after=2,mode=pagerank"),
    ("tiny-bert", "prune_tokens:keep=1.0,after=2,mode=diverse,fill=last"),
    ("tiny-vit", "prune_tokens:keep=1.0,after=1,source=cls"),
    ("tiny-vit", "prune_tokens:keep=1.0,after=0,mode=diverse"),
    ("tiny-llama", "prune_tokens:keep=1.0,after=1"),  # RoPE tables and the causal mask are gathered too
])
def test_keep_everything_is_exact(traced, name, text):
    feeds = {"tiny-bert": _text_feeds, "tiny-vit": _image_feeds, "tiny-llama": _text_feeds}[name]()
    before = _run(ir.serde.deserialize_model(traced[name]), feeds, optimize=False)
    model, record = _prune(traced[name], text)
    assert record.sites == 1
    after = _run(model, feeds, optimize=False)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    after_fused = _run(model, feeds)  # with ORT's fusions: the same up to float reassociation
    for key in before:
        np.testing.assert_allclose(before[key], after_fused[key], atol=1e-5)


@pytest.mark.parametrize("text", ["prune_tokens:keep=0.5,after=1", "prune_tokens:keep=0.5,after=1,mode=pagerank",
                                  "prune_tokens:keep=0.5,after=1,mode=diverse"])
def test_padding_goes_first(traced, text):
    """Rows with half padding keep every real token at keep=0.5: their outputs do not move."""
    feeds = _text_feeds()
    before = _run(ir.serde.deserialize_model(traced["tiny-bert"]), feeds)
    model, _ = _prune(traced["tiny-bert"], text)
    after = _run(model, feeds)
    np.testing.assert_allclose(after["sentence_embedding"][1:], before["sentence_embedding"][1:], atol=1e-5)
    real = feeds["attention_mask"][1:].astype(bool)
    np.testing.assert_allclose(after["last_hidden_state"][1:][real], before["last_hidden_state"][1:][real], atol=1e-4)
    assert np.abs(after["sentence_embedding"][0] - before["sentence_embedding"][0]).max() > 1e-3  # row 0 was pruned


def test_threshold_keeps_what_passes_and_never_padding(traced):
    """Every row is half padding and a tiny threshold passes every real token: K is the real count."""
    feeds = _text_feeds()
    feeds["attention_mask"][0, 12:] = 0
    model, record = _prune(traced["tiny-bert"], "prune_tokens:threshold=0.000001,after=2")
    assert record.details["static_shapes"] is False and record.details["stages"][0]["tokens"] == "threshold"
    indices = record.details["stages"][0]["indices"]
    before = _run(ir.serde.deserialize_model(traced["tiny-bert"]), feeds)
    after = _run(model, feeds, extra_outputs=(indices,))
    np.testing.assert_array_equal(after[indices], np.tile(np.arange(12), (3, 1)))
    np.testing.assert_allclose(after["sentence_embedding"], before["sentence_embedding"], atol=1e-5)


def test_schedule_of_ones_changes_nothing(traced):
    model, record = _prune(traced["tiny-bert"], "prune_tokens:schedule=1+1+1+1")
    assert record.sites == 0 and record.nodes_after == record.nodes_before


def test_merging_duplicate_tokens_is_exact():
    """A ViT without position embeddings on a flat image has identical patch tokens: ToMe merges
    them, proportional attention weighs each merged token by its size, and the restore hands every
    patch its representative's value, so nothing moves."""
    import torch

    from models.reference import vit
    from optimizer import trace

    module = vit.build()
    with torch.no_grad():
        module.embeddings.position_embeddings.zero_()
    model = trace(module, {"pixel_values": torch.zeros(2, 3, 32, 32)}, {"pixel_values": {0: "batch"}},
                  output_names=["last_hidden_state", "cls_embedding"])
    proto = ir.serde.serialize_model(model)
    feeds = {"pixel_values": np.full((2, 3, 32, 32), 0.3, dtype=np.float32)}
    feeds["pixel_values"][1] = -0.7
    before = _run(proto, feeds)
    merged, record = _prune(proto, "prune_tokens:mode=merge,r=3")
    assert record.sites == 4
    after = _run(merged, feeds)
    for key in before:
        np.testing.assert_allclose(after[key], before[key], atol=1e-4)


def test_frames_drop_unchanged_tokens_and_keep_the_moving_one(traced):
    model, record = _prune(traced["tiny-vit"], "prune_tokens:mode=frames,threshold=0.001")
    assert record.details["state"]["input"] == "prune_tokens_previous_frame"
    assert [v.name for v in model.graph.outputs][-2:] == ["prune_tokens_frame_features", "prune_tokens_token_blocks_saved"]
    positions = record.details["stages"][0]["indices"]
    frames, masks = data.frame_stream(5, size=32, seed=2)
    state = np.zeros((1, 17, 64), dtype=np.float32)
    for t in range(len(frames)):
        out = _run(ir.serde.serialize_model(model), {"pixel_values": frames[t:t + 1],
                                                     "prune_tokens_previous_frame": state}, extra_outputs=(positions,))
        state, kept = out["prune_tokens_frame_features"], set(out[positions][0].tolist())
        if t == 0:
            assert len(kept) == 17  # a zero previous frame: everything is new
            continue
        moving = masks[t] | masks[t - 1]
        cells = {1 + (r // 8) * 4 + c // 8 for r, c in zip(*np.nonzero(moving))}
        assert cells <= kept and len(kept) <= 1 + len(cells)  # the moving region, the CLS, nothing else
    again = _run(ir.serde.serialize_model(model), {"pixel_values": frames[-1:], "prune_tokens_previous_frame": state},
                 extra_outputs=(positions,))
    assert again[positions].tolist() == [[0]]  # an unchanged frame keeps only the protected CLS


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, needle", [
    ({"keep": "0"}, "keep ratio"),
    ({"keep": "1.5"}, "keep ratio"),
    ({"schedule": "1+0.5+0.7+0.5"}, "must not grow"),
    ({"mode": "diverse", "threshold": "0.5"}, "threshold needs mode"),
    ({"mode": "merge"}, "needs r >= 1"),
    ({"mode": "frames", "schedule": "1+1+0.5+0.5"}, "use after=k"),
    ({"schedule": "1+1+0.5+0.5", "after": "1"}, "not both"),
])
def test_bad_options(traced, options, needle):
    with pytest.raises(PassError, match=needle):
        run_pipeline(ir.serde.deserialize_model(traced["tiny-bert"]), [PassSpec("prune_tokens", options)], PassContext())


@pytest.mark.parametrize("text, needle", [
    ("prune_tokens:keep=0.5,after=0", "block 0 has none"),
    ("prune_tokens:keep=0.5,after=9", "Block 9 does not exist"),
    ("prune_tokens:schedule=1+0.5", "one keep ratio per block"),
    ("prune_tokens:keep=0.5,after=1,restore=never", "would change the model's outputs"),
])
def test_cannot_apply(traced, text, needle):
    with pytest.raises(PassError, match=needle):
        _prune(traced["tiny-vit"], text)


def test_threshold_is_for_onnx_runtime_only(traced):
    with pytest.raises(PassError, match="only ONNX Runtime"):
        _prune(traced["tiny-bert"], "prune_tokens:threshold=1.0,after=1", target="tensorrt")


def test_model_without_attention(tiny_onnx):
    model = ir.load(tiny_onnx)
    with pytest.raises(PassError, match="needs transformer blocks"):
        run_pipeline(model, [PassSpec("prune_tokens", {})], PassContext())
