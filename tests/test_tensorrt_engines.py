"""TensorRT engines: profiles, the engine cache, engines in the artifact, and (where TensorRT
imports and a CUDA GPU is present) building and running them.

The tests marked ``needs_tensorrt`` run unchanged wherever ``import tensorrt`` gives the real
package and torch sees a GPU, and skip elsewhere (here: TensorRT cannot be installed).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import runtime
from models import registry
from optimizer import optimize
from optimizer.lower.tensorrt import tensorrt_available
from optimizer.lower.tensorrt_engines import BuiltEngine, EngineCache, attach, cache_key, refuse_mismatch
from optimizer.lower.tensorrt_profiles import engine_profiles, parse_shapes
from runtime.errors import ArtifactError, PassError


def _has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


needs_tensorrt = pytest.mark.skipif(not (tensorrt_available() and _has_gpu()),
                                    reason="needs the tensorrt package and a CUDA GPU")

ENCODER = [{"name": "input_ids", "shape": ["batch", "sequence"]}, {"name": "attention_mask", "shape": ["batch", "sequence"]}]
DECODER = [{"name": "input_ids", "shape": ["batch", "sequence"]},
           {"name": "attention_mask", "shape": ["batch", "total_sequence"]},
           {"name": "position_ids", "shape": ["batch", "sequence"]},
           {"name": "past_key_values.0.key", "shape": ["batch", 3, "past_sequence", 64]},
           {"name": "past_key_values.0.value", "shape": ["batch", 3, "past_sequence", 64]}]


def test_encoder_gets_one_engine_over_the_ranges():
    plan = engine_profiles({"model": ENCODER}, parse_shapes("batch=1:4:16"))
    assert list(plan) == ["model"]
    assert plan["model"]["profile"]["input_ids"] == {"min": [1, 1], "opt": [4, 128], "max": [16, 512]}


def test_decoder_gets_prefill_and_decode_engines():
    plan = engine_profiles({"model": DECODER}, parse_shapes("past_sequence=0:256:1024"))
    assert set(plan) == {"prefill", "decode"}
    prefill, decode = plan["prefill"]["profile"], plan["decode"]["profile"]
    assert prefill["past_key_values.0.key"]["max"] == [8, 3, 0, 64]
    assert prefill["attention_mask"] == prefill["input_ids"]  # no past: total = new tokens
    assert decode["input_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [8, 1]}
    assert decode["past_key_values.0.value"] == {"min": [1, 3, 0, 64], "opt": [1, 3, 256, 64], "max": [8, 3, 1024, 64]}
    assert decode["attention_mask"] == {"min": [1, 1], "opt": [1, 257], "max": [8, 1025]}


def test_a_dimension_without_a_range_is_named():
    with pytest.raises(PassError, match="'frames'"):
        engine_profiles({"model": [{"name": "video", "shape": ["batch", "frames"]}]}, {})


def test_cache_key_changes_with_each_part():
    base = cache_key("g", {"x": {"min": [1]}}, "10.13.0", "NVIDIA H100")
    others = [cache_key("h", {"x": {"min": [1]}}, "10.13.0", "NVIDIA H100"),
              cache_key("g", {"x": {"min": [2]}}, "10.13.0", "NVIDIA H100"),
              cache_key("g", {"x": {"min": [1]}}, "10.14.1", "NVIDIA H100"),
              cache_key("g", {"x": {"min": [1]}}, "10.13.0", "NVIDIA H200")]
    assert len({base, *others}) == 5 and base == cache_key("g", {"x": {"min": [1]}}, "10.13.0", "NVIDIA H100")


def test_engines_attach_to_the_artifact_and_are_verified(tmp_path):
    art = optimize("tiny-bert", passes=["cleanup"], target="tensorrt", output=tmp_path / "a")
    cache = EngineCache(tmp_path / "cache")
    assert cache.get("k1") is None
    plan = cache.put("k1", b"serialized engine bytes", {"tensorrt": "10.13.0"})
    assert cache.get("k1") == plan
    engine = BuiltEngine("model", plan, "model.onnx", {"input_ids": {}}, "10.13.0", "NVIDIA H100", "k1")
    manifest = attach(art.path, [engine])
    assert manifest["engines"]["model"]["file"] == "engines/model.plan"
    assert json.loads((art.path / "manifest.json").read_text())["engines"]["model"]["gpu"] == "NVIDIA H100"
    runtime.load(art.path)  # every file, the engine included, matches its sha256
    (art.path / "engines" / "model.plan").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        runtime.load(art.path)


def test_engines_from_another_version_or_gpu_are_refused():
    meta = {"tensorrt": "10.13.0", "gpu": "NVIDIA H100 80GB HBM3"}
    refuse_mismatch("decode", meta, "10.13.0", "NVIDIA H100 80GB HBM3")
    with pytest.raises(ArtifactError, match="TensorRT 10.13.0 but this machine has TensorRT 11.0.0"):
        refuse_mismatch("decode", meta, "11.0.0", "NVIDIA H100 80GB HBM3")
    with pytest.raises(ArtifactError, match="GPU 'NVIDIA H100 80GB HBM3' but this machine's GPU is 'NVIDIA H200'"):
        refuse_mismatch("decode", meta, "10.13.0", "NVIDIA H200")


def test_runtime_package_does_not_import_torch_or_tensorrt():
    import subprocess
    import sys

    code = "import sys, runtime, runtime.trt_backend; print('torch' in sys.modules, 'tensorrt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from optimizer.lower.tensorrt_build import build_engines

    art = optimize("tiny-bert", passes=["cleanup"], target="tensorrt:shapes=batch=1:2:4;sequence=1:16:64",
                   output=tmp_path_factory.mktemp("trt") / "bert")
    cache = EngineCache(tmp_path_factory.mktemp("engines"))
    first = build_engines(art.path, cache=cache, workspace_gib=1)
    again = build_engines(art.path, cache=cache, workspace_gib=1)
    return art, first, again


@needs_tensorrt
def test_engine_build_uses_the_cache_the_second_time(built):
    _, first, again = built
    assert [e.from_cache for e in first] == [False] and [e.from_cache for e in again] == [True]
    assert first[0].key == again[0].key


@needs_tensorrt
def test_engine_equals_onnx_runtime_and_replays_as_a_cuda_graph(built):
    from runtime.trt_backend import load

    art = built[0]
    feeds = {k: np.asarray(v) for k, v in registry.get("tiny-bert").example_inputs(2, 16).items()}
    want = runtime.load(art.path).run(feeds)
    session = load(art.path)
    got = session.run(feeds, numpy=True)
    for name, value in want.items():
        assert np.abs(got[name] - value).max() <= 1e-2 * np.abs(value).max()
    captured = session.capture(feeds)
    replayed = session.replay(feeds)
    for name in want:
        np.testing.assert_array_equal(replayed[name].cpu().numpy(), captured[name].cpu().numpy())
