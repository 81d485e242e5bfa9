"""Per-token feature reuse (prune_tokens:mode=frames,fill=cache) on tiny-vit: the state pairs and the
counter (structure), exactness when nothing is dropped and on the first call, an identical frame
returning its cached outputs (numerics), token-block counts through runtime.stream, the eval, and
the refusals (pooled outputs, a fixed K, other modes, feature_cache:per_token, wrong-shaped state)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import optimizer
import runtime
from models import registry
from optimizer.eval_stream import eval_stream
from optimizer.pipeline import PassContext, run_pipeline
from optimizer.progress import Progress
from optimizer.specs import parse_spec
from optimizer.trace_cache import cached_trace
from runtime.errors import CarveError, FeedError, PassError
from runtime.stream import STATE_PAIRS, StreamSession

SPEC = "prune_tokens:mode=frames,fill=cache,threshold=0.001"
N, HIDDEN, BLOCKS = 17, 64, 4  # tiny-vit: CLS + 4x4 patches of 8 px
FRAME, CACHE, KV = "prune_tokens_previous_frame", "prune_tokens_previous_output", "prune_tokens_previous_keys_values"


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fct")
    plain = optimizer.optimize("tiny-vit", passes=["cleanup"], output=root / "plain")
    cache = optimizer.optimize("tiny-vit", passes=[SPEC], output=root / "cache")
    return runtime.load(plain.path), runtime.load(cache.path), cache


@pytest.fixture(scope="module")
def trace():
    return ir.serde.serialize_model(cached_trace(registry.get("tiny-vit"), Progress()))


def _apply(proto, text: str):
    model, records = run_pipeline(ir.serde.deserialize_model(proto), parse_spec(text), PassContext())
    return model, records[0]


def _run_unfused(model_or_proto, feeds) -> dict[str, np.ndarray]:
    """ONNX Runtime without graph fusions (which round differently around a gather)."""
    proto = model_or_proto if not isinstance(model_or_proto, ir.Model) else ir.serde.serialize_model(model_or_proto)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, 32, 32)).astype(np.float32)


def _zeros(batch: int = 1, kv_blocks: int = BLOCKS) -> dict[str, np.ndarray]:
    state = {FRAME: np.zeros((batch, N, HIDDEN), np.float32), CACHE: np.zeros((batch, N, HIDDEN), np.float32)}
    if kv_blocks:
        state[KV] = np.zeros((batch, 2 * kv_blocks, N, HIDDEN), np.float32)
    return state


def _next(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The state the next call gets from this call's outputs."""
    return {STATE_PAIRS[name]: value for name, value in out.items() if name in STATE_PAIRS}


# --- structure and counts --------------------------------------------------------------------------

def test_state_pairs_and_counter(arts):
    _, _, art = arts
    model = ir.load(art.path / "model.onnx")
    assert [v.name for v in model.graph.inputs] == ["pixel_values", FRAME, KV, CACHE]
    outputs = [v.name for v in model.graph.outputs]
    assert outputs == ["last_hidden_state", "cls_embedding", "prune_tokens_frame_features",
                       "prune_tokens_token_blocks_saved", "prune_tokens_keys_values", "prune_tokens_output_features"]
    inputs = {v.name: v for v in model.graph.inputs}
    assert [n.op_type for n, _ in inputs[CACHE].uses()] == ["ScatterElements"]  # the restore writes into the cache
    assert [n.op_type for n, _ in inputs[KV].uses()] == ["Gather"] * 2 * BLOCKS  # each block's keys and values
    assert [d if isinstance(d, int) else str(d) for d in inputs[KV].shape] == ["batch", 2 * BLOCKS, N, HIDDEN]
    details = art.manifest["passes"][0]["details"]
    assert details["fill"] == "cache" and details["context"] == "cached" and details["proportional_attention"] is False
    assert details["state"]["cache"] == {"input": CACHE, "output": "prune_tokens_output_features"}
    assert details["state"]["keys_values"] == {"input": KV, "output": "prune_tokens_keys_values"}
    assert details["state"]["counter"] == "prune_tokens_token_blocks_saved"


def test_context_kept_has_no_key_value_state(trace):
    model, record = _apply(trace, SPEC + ",context=kept")
    assert [v.name for v in model.graph.inputs] == ["pixel_values", FRAME, CACHE]
    assert record.details["context"] == "kept" and "keys_values" not in record.details["state"]


def test_identical_frame_reuses_every_patch_token(arts):
    _, cached, _ = arts
    frame = _image(1)
    first = cached.run({"pixel_values": frame})
    assert first["prune_tokens_token_blocks_saved"].tolist() == [0]  # zero state: everything computed
    again = cached.run({"pixel_values": frame, **_next(first)})
    assert again["prune_tokens_token_blocks_saved"].tolist() == [(N - 1) * BLOCKS]  # only the CLS ran
    np.testing.assert_array_equal(again["last_hidden_state"][:, 1:], first["last_hidden_state"][:, 1:])
    np.testing.assert_array_equal(again["prune_tokens_output_features"][:, 1:],
                                  first["prune_tokens_output_features"][:, 1:])
    # the CLS was recomputed attending to every token through the cached keys and values: as before
    np.testing.assert_allclose(again["last_hidden_state"][:, 0], first["last_hidden_state"][:, 0], atol=1e-5)


def test_context_kept_recomputes_the_cls_from_itself_alone(trace):
    model, _ = _apply(trace, SPEC + ",context=kept")
    frame = _image(1)
    first = _run_unfused(model, {"pixel_values": frame, **_zeros(kv_blocks=0)})
    again = _run_unfused(model, {"pixel_values": frame, **_next(first)})
    np.testing.assert_array_equal(again["last_hidden_state"][:, 1:], first["last_hidden_state"][:, 1:])
    assert np.abs(again["last_hidden_state"][:, 0] - first["last_hidden_state"][:, 0]).max() > 0.1


def test_one_changed_patch_is_recomputed_and_counted(arts):
    _, cached, _ = arts
    stream = StreamSession(cached)
    frame = _image(2)
    moved = frame.copy()
    moved[:, :, 8:16, 16:24] += 1.5  # patch row 1, column 2: token 1 + 4 + 2
    first, second = stream.run({"pixel_values": frame}), stream.run({"pixel_values": moved})
    assert stream.token_blocks_saved == (N - 2) * BLOCKS
    assert "prune_tokens_output_features" not in second and "prune_tokens_token_blocks_saved" not in second
    changed = second["last_hidden_state"][0] != first["last_hidden_state"][0]
    assert changed[0].all() and changed[7].all()
    assert not changed[[t for t in range(N) if t not in (0, 7)]].any()  # the rest reused bit for bit


def test_refresh_drops_the_state_every_n_runs(arts):
    _, cached, _ = arts
    stream = StreamSession(cached, refresh=2)
    frame = _image(2)
    for _ in range(4):
        stream.run({"pixel_values": frame})
    assert stream.token_blocks_saved == 2 * (N - 1) * BLOCKS  # runs 1 and 3 computed everything
    with pytest.raises(CarveError, match="refresh >= 0"):
        StreamSession(cached, refresh=-1)


def test_counter_with_a_later_gather_point(trace):
    model, _ = _apply(trace, "prune_tokens:mode=frames,fill=cache,threshold=0.001,after=2")
    frame = _image(3)
    first = _run_unfused(model, {"pixel_values": frame, **_zeros(kv_blocks=BLOCKS - 2)})
    again = _run_unfused(model, {"pixel_values": frame, **_next(first)})
    assert again["prune_tokens_token_blocks_saved"].tolist() == [(N - 1) * (BLOCKS - 2)]
    assert again["prune_tokens_keys_values"].shape == (1, 2 * (BLOCKS - 2), N, HIDDEN)


def test_reused_tokens_keep_the_features_their_output_came_from(trace):
    """Drift below the threshold per frame must not creep: the frame state of a reused token stays
    at the frame its cached output was computed from."""
    model, _ = _apply(trace, "prune_tokens:mode=frames,fill=cache,threshold=0.05")
    frame = _image(4)
    first = _run_unfused(model, {"pixel_values": frame, **_zeros()})
    nudged = _run_unfused(model, {"pixel_values": frame * 1.001, **_next(first)})
    assert nudged["prune_tokens_token_blocks_saved"].tolist() == [(N - 1) * BLOCKS]
    np.testing.assert_array_equal(nudged["prune_tokens_frame_features"][:, 1:],
                                  first["prune_tokens_frame_features"][:, 1:])


# --- numerics --------------------------------------------------------------------------------------

def test_first_call_and_nothing_dropped_equal_the_original(trace):
    """Zero state (the first call) and a threshold that no changed token falls under both keep
    every token: the outputs equal the original bit for bit without ORT's fusions."""
    original = ir.serde.deserialize_model(trace)
    model, _ = _apply(trace, "prune_tokens:mode=frames,fill=cache,threshold=1e-9")
    state = _zeros(2)
    for seed in (5, 6, 7):
        frames = np.concatenate([_image(seed), _image(seed + 10)])  # batch 2: two streams
        ref = _run_unfused(original, {"pixel_values": frames})
        got = _run_unfused(model, {"pixel_values": frames, **state})
        assert got["prune_tokens_token_blocks_saved"].tolist() == [0]
        for name in ("last_hidden_state", "cls_embedding"):
            np.testing.assert_array_equal(got[name], ref[name])
        state = _next(got)


def test_plain_run_gets_zero_state_and_is_exact(arts):
    plain, cached, _ = arts
    for seed in (8, 9):
        feeds = {"pixel_values": _image(seed)}
        ref, got = plain.run(feeds), cached.run(feeds)
        for name in ("last_hidden_state", "cls_embedding"):
            np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=1e-5)


def test_eval_stream_reports_token_blocks(arts):
    _, _, art = arts
    result = eval_stream(str(art.path), 8, 4, "moving")
    assert result["pass"] == "prune_tokens" and result["fill"] == "cache" and result["tokens"] == N
    assert result["token_block_evaluations_without_reuse"] == 8 * N * BLOCKS
    assert 0 < result["saved_fraction"] < 1 and result["token_block_ratio"] > 1
    assert -1 <= result["correlation_min"] <= result["correlation_mean"] <= 1


def test_eval_stream_counts_the_feature_cache_in_token_blocks(tmp_path):
    art = optimizer.optimize("tiny-vit", passes=["feature_cache:threshold=0.05"], output=tmp_path / "fc")
    result = eval_stream(str(art.path), 8, 4)
    assert result["pass"] == "feature_cache" and result["recomputed"] == 2  # one per scene
    assert result["block_evaluations"] == 8 * 1 + 2 * (BLOCKS - 1)
    assert result["token_block_evaluations"] == result["block_evaluations"] * N
    assert result["time_ratio"] > 0 and result["seconds"] > 0


def test_eval_stream_needs_a_reuse_pass(arts):
    plain, _, _ = arts
    with pytest.raises(CarveError, match="neither feature_cache nor prune_tokens:mode=frames"):
        eval_stream(str(plain.path), 4, 2)
    with pytest.raises(CarveError, match="at least 1 frame"):
        eval_stream(str(plain.path), 0, 2)


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, needle", [
    ("prune_tokens:mode=frames,fill=cache,keep=0.5", "needs threshold=t"),
    ("prune_tokens:mode=attention,fill=cache,threshold=1", "needs mode=frames"),
    ("prune_tokens:mode=frames,fill=cache,threshold=0.01,restore=never", "restore=never contradicts"),
    ("feature_cache:per_token=true,threshold=0.1", "prune_tokens:mode=frames,fill=cache"),
    ("prune_tokens:mode=frames,threshold=0.01,context=kept", "drop context"),
])
def test_bad_options(trace, text, needle):
    with pytest.raises(PassError, match=needle):
        _apply(trace, text)


def test_pooled_outputs_have_nothing_per_token(trace):
    model = ir.serde.deserialize_model(trace)
    model.graph.outputs.pop(0)  # keep only cls_embedding, a Gather of the CLS: no per-token output
    with pytest.raises(PassError, match="nothing per token to reuse"):
        run_pipeline(model, parse_spec(SPEC), PassContext())


def test_cached_context_needs_static_key_views():
    """A text encoder's key views are built from the token count: context=cached is refused,
    context=kept works (a repeated input reuses every token but the protected CLS)."""
    proto = ir.serde.serialize_model(cached_trace(registry.get("tiny-bert"), Progress()))
    with pytest.raises(PassError, match="use context=kept"):
        _apply(proto, SPEC)
    model, _ = _apply(proto, SPEC + ",context=kept")
    feeds = {k: v.numpy() for k, v in registry.get("tiny-bert").example_inputs(2, 12).items()}
    zeros = {FRAME: np.zeros((2, 12, HIDDEN), np.float32), CACHE: np.zeros((2, 12, HIDDEN), np.float32)}
    first = _run_unfused(model, {**feeds, **zeros})
    again = _run_unfused(model, {**feeds, **_next(first)})
    assert again["prune_tokens_token_blocks_saved"].tolist() == [2 * 11 * BLOCKS]
    np.testing.assert_array_equal(again["last_hidden_state"][:, 1:], first["last_hidden_state"][:, 1:])


def test_fill_cache_is_for_onnx_runtime_only(trace):
    with pytest.raises(PassError, match="only ONNX Runtime"):
        run_pipeline(ir.serde.deserialize_model(trace), parse_spec(SPEC), PassContext(target="tensorrt"))


def test_wrong_shaped_state_is_a_clear_error(arts):
    _, cached, _ = arts
    state = _zeros()
    state[CACHE] = np.zeros((1, N - 1, HIDDEN), np.float32)
    with pytest.raises(FeedError, match=f"'{CACHE}' has size {N - 1} on axis 1 but the model expects {N}"):
        cached.run({"pixel_values": _image(0), **state})
    with pytest.raises(FeedError, match=f"'{CACHE}' is missing"):
        cached.run({"pixel_values": _image(0), FRAME: state[FRAME], KV: state[KV]})


# --- the real model --------------------------------------------------------------------------------

@pytest.mark.slow
def test_vit_s_moving_object_reuses_most_token_blocks_at_high_correlation():
    from models import data
    from optimizer import metrics

    traced = cached_trace(registry.get("vit-s"), Progress())
    original = ort.InferenceSession(ir.serde.serialize_model(traced).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
    model, _ = run_pipeline(traced, parse_spec(SPEC), PassContext())
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    frames, _ = data.frame_stream(5, seed=3)
    state = {i.name: np.zeros([1] + list(i.shape[1:]), np.float32) for i in session.get_inputs()[1:]}
    saved = 0
    for t in range(len(frames)):
        out = dict(zip(names, session.run(names, {"pixel_values": frames[t:t + 1], **state})))
        ref = original.run(["saliency"], {"pixel_values": frames[t:t + 1]})[0]
        assert metrics.saliency_correlation(ref, out["saliency"]) >= 0.98
        saved += int(out["prune_tokens_token_blocks_saved"][0])
        state = _next(out)
    assert saved / (len(frames) * 257 * 12) > 0.6  # the first frame saves nothing, the others ~87%
