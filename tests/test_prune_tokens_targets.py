"""prune_tokens for TensorRT: the pruned graphs pass the TensorRT legality checks and lowering
(static K, typed new values, no float16 scatter-add), and ONNX Runtime runs the float16 graph
the lowering writes with keep=1.0 as closely as the unpruned float16 graph."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from models import data
from optimizer import optimize
from runtime.errors import PassError


def _run_onnx(path, feeds):
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("spec, target", [
    ("prune_tokens:keep=0.5,after=1", "tensorrt"),
    ("prune_tokens:keep=0.5,after=1,mode=pagerank", "tensorrt"),
    ("prune_tokens:mode=merge,r=2", "tensorrt"),
    ("prune_tokens:mode=frames,keep=0.3", "tensorrt"),
    ("prune_tokens:keep=0.5,mode=diverse", "tensorrt:precision=fp32"),  # a Loop: float32 only
])
def test_pruned_vit_is_legal_for_tensorrt(spec, target, tmp_path):
    art = optimize("tiny-vit", passes=[spec], target=target, output=tmp_path / "a")
    assert art.manifest["passes"][0]["sites"] >= 1


def test_fp16_lowering_of_keep_everything_matches_the_plain_lowering(tmp_path):
    feeds = {"pixel_values": data.images("eval", size=32, n=3)}
    plain = optimize("tiny-vit", passes=["cleanup"], target="tensorrt", output=tmp_path / "plain")
    pruned = optimize("tiny-vit", passes=["prune_tokens:keep=1.0,after=1"], target="tensorrt", output=tmp_path / "p")
    for a, b in zip(_run_onnx(plain.path, feeds), _run_onnx(pruned.path, feeds)):
        np.testing.assert_allclose(a, b, atol=1e-2)  # float16 rounding along different op orders


def test_symbolic_length_is_refused_for_tensorrt(tmp_path):
    with pytest.raises(PassError, match="needs a constant K"):
        optimize("tiny-bert", passes=["prune_tokens:keep=0.5,after=1"], target="tensorrt", output=tmp_path / "b")
