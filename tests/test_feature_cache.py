"""The feature_cache pass and runtime.stream: structure, exactness without reuse, reuse counts, refusals."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import optimizer
import runtime
from runtime.errors import PassError
from runtime.stream import StreamSession


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    root = tmp_path_factory.mktemp("fc")
    plain = runtime.load(optimizer.optimize("tiny-vit", passes=["cleanup"], output=root / "plain").path)
    art = optimizer.optimize("tiny-vit", passes=["feature_cache:threshold=0.05"], output=root / "fc")
    return plain, runtime.load(art.path), art


def _frames(n: int, noise: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    return [base + noise * rng.standard_normal(base.shape).astype(np.float32) for _ in range(n)]


def test_structure(vit):
    _, _, art = vit
    model = ir.load(art.path / "model.onnx")
    branch = next(n for n in model.graph if n.op_type == "If")
    then = branch.attributes["then_branch"].value
    inputs = [v.name for v in model.graph.inputs]
    assert inputs[1:3] == ["feature_cache.residual", "feature_cache.previous.last_hidden_state"]
    assert [v.name for v in model.graph.outputs][-2:] == ["feature_cache.next_residual", "feature_cache.recomputed"]
    assert sum(n.op_type == "Softmax" for n in then) == 3  # blocks 1-3 moved; block 0 stays outside
    assert sum(n.op_type == "Softmax" for n in model.graph) == 1
    record = art.manifest["passes"][0]
    assert record["sites"] == 3 and record["details"]["threshold"] == 0.05


def test_first_call_and_plain_runs_are_exact(vit):
    plain, cached, _ = vit
    for frame in _frames(3, 1.0):
        feeds = {"pixel_values": frame}
        ref = plain.run(feeds)
        got = cached.run(feeds)  # no state given: zeros, which always recompute
        for name in ("last_hidden_state", "cls_embedding"):
            np.testing.assert_array_equal(got[name], ref[name])


def test_threshold_zero_always_recomputes(tmp_path, vit):
    plain, _, _ = vit
    art = optimizer.optimize("tiny-vit", passes=["feature_cache:threshold=0"], output=tmp_path / "z")
    stream = StreamSession(runtime.load(art.path))
    for frame in _frames(4, 0.0):
        np.testing.assert_array_equal(stream.run({"pixel_values": frame})["cls_embedding"],
                                      plain.run({"pixel_values": frame})["cls_embedding"])
    assert stream.recomputed == 4


def test_small_changes_reuse_and_a_cut_recomputes(vit):
    plain, cached, _ = vit
    stream = StreamSession(cached)
    still = _frames(5, 0.001)
    outputs = [stream.run({"pixel_values": f}) for f in still]
    assert stream.recomputed == 1 and stream.calls == 5
    np.testing.assert_array_equal(outputs[-1]["cls_embedding"], outputs[0]["cls_embedding"])
    cut = _frames(1, 1.0, seed=9)[0] * 3
    after = stream.run({"pixel_values": cut})
    assert stream.recomputed == 2
    np.testing.assert_array_equal(after["cls_embedding"], plain.run({"pixel_values": cut})["cls_embedding"])


def test_exact_input_cache(vit):
    plain, _, _ = vit
    stream = StreamSession(plain, exact=2)
    frame = _frames(1, 0.0)[0]
    first = stream.run({"pixel_values": frame})
    again = stream.run({"pixel_values": frame.copy()})
    assert stream.exact_hits == 1 and again is first and stream.recomputed == 1


def test_auto_threshold_is_calibrated(tmp_path):
    art = optimizer.optimize("tiny-vit", passes=["feature_cache:calib_frames=12"], output=tmp_path / "a")
    details = art.manifest["passes"][0]["details"]
    curve = details["calibration"]
    assert details["threshold"] > 0 and len(curve) == 10
    kept = [corr for change, corr in curve if change < details["threshold"]]
    assert kept and min(kept) >= 0.98


@pytest.mark.parametrize("spec, message", [
    ("feature_cache:after=3", "leaves no block to skip"),
    ("feature_cache:after=7", "Block 7 does not exist"),
    ("feature_cache:threshold=-1", "threshold must be >= 0"),
    ("feature_cache:threshold=abc", "a number or auto"),
    ("feature_cache:min_corr=0", "0 < min_corr <= 1"),
])
def test_errors(tmp_path, spec, message):
    with pytest.raises(PassError, match=message):
        optimizer.optimize("tiny-vit", passes=[spec], output=tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_auto_needs_images(tmp_path):
    with pytest.raises(PassError, match="give the threshold"):
        optimizer.optimize("tiny-bert", passes=["feature_cache"], output=tmp_path / "b")


def test_no_blocks(tmp_path, tiny_onnx):
    with pytest.raises(PassError, match="no blocks"):
        optimizer.optimize(str(tiny_onnx), passes=["feature_cache:threshold=0.1"], output=tmp_path / "n")


def test_stream_carries_the_frames_state(tmp_path):
    art = optimizer.optimize("tiny-vit", passes=["prune_tokens:mode=frames,keep=0.25,after=1"], output=tmp_path / "f")
    session = runtime.load(art.path)
    stream = StreamSession(session)
    first = _frames(1, 0.0)[0]
    second = first.copy()
    second[:, :, :8, :8] += 2.0  # one patch changes
    assert "prune_tokens_frame_features" not in stream.run({"pixel_values": first})
    got = stream.run({"pixel_values": second})["last_hidden_state"]
    previous = session.run({"pixel_values": first})["prune_tokens_frame_features"]
    direct = session.run({"pixel_values": second, "prune_tokens_previous_frame": previous})["last_hidden_state"]
    np.testing.assert_array_equal(got, direct)  # the stream fed the first frame's features
    assert not np.array_equal(got, session.run({"pixel_values": second})["last_hidden_state"])  # not zeros
