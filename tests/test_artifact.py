"""The artifact: manifest contents, hashes, atomic writing, replacement, external data, and the
runtime loading it back."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

import runtime
from optimizer import artifact as artifact_mod
from optimizer import optimize
from runtime.errors import ArtifactError


def test_manifest_contents(tiny_artifact):
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    assert manifest["format"] == "carve-artifact" and manifest["format_version"] == 1
    assert manifest["target"] == "ort-cpu" and manifest["source"]["kind"] == "onnx"
    assert manifest["inputs"] == [
        {"name": "ids", "dtype": "int64", "shape": ["batch", "sequence"]},
        {"name": "features", "dtype": "float32", "shape": ["batch", "sequence", 16]},
    ]
    assert manifest["outputs"][0]["name"] == "hidden"
    assert [p["name"] for p in manifest["passes"]] == ["cleanup"]
    assert set(manifest["passes"][0]) >= {"nodes_before", "nodes_after", "param_bytes_before", "seconds", "sites", "options"}
    assert set(manifest["files"]) == {"model.onnx"} and len(manifest["files"]["model.onnx"]["sha256"]) == 64


def test_runtime_reproduces_the_source(tiny_artifact, tiny_module):
    import torch

    session = runtime.load(tiny_artifact, threads=1)
    for batch, seq in [(1, 3), (4, 11)]:
        ids = torch.randint(0, 50, (batch, seq))
        features = torch.randn(batch, seq, 16)
        expected = tiny_module(ids, features).detach().numpy()
        got = session.run({"ids": ids.numpy(), "features": features.numpy()})["hidden"]
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_failed_write_leaves_nothing(tmp_path, tiny_onnx, monkeypatch):
    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(artifact_mod.ir, "save", explode)
    with pytest.raises(OSError):
        optimize(str(tiny_onnx), output=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_artifact_is_replaced(tmp_path, tiny_onnx):
    out = tmp_path / "out"
    first = optimize(str(tiny_onnx), output=out)
    second = optimize(str(tiny_onnx), output=out, passes=["cse"])
    assert second.manifest["passes"][0]["name"] == "cse"
    assert json.loads((out / "manifest.json").read_text())["passes"][0]["name"] == "cse"
    assert first.path == second.path and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_large_models_get_external_data(tmp_path, tiny_onnx, monkeypatch):
    monkeypatch.setattr(artifact_mod, "_EXTERNAL_THRESHOLD", 100)
    art = optimize(str(tiny_onnx), output=tmp_path / "out")
    assert set(art.manifest["files"]) == {"model.onnx", "model.onnx.data"}
    session = art.load()
    feeds = {"ids": np.zeros((1, 2), np.int64), "features": np.zeros((1, 2, 16), np.float32)}
    assert session.run(feeds)["hidden"].shape == (1, 2, 16)
    (tmp_path / "out" / "model.onnx.data").write_bytes(b"\0" * 10)
    with pytest.raises(ArtifactError, match="model.onnx.data does not match"):
        runtime.load(tmp_path / "out")


def test_wrong_format_version(tmp_path, tiny_artifact):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["format_version"] = 99
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format version 99"):
        runtime.load(art)


def test_api_returns_artifact_in_a_temp_dir_by_default(tiny_onnx):
    art = optimize(str(tiny_onnx))
    assert (art.path / "manifest.json").is_file() and art.manifest["passes"][0]["name"] == "cleanup"


def test_runtime_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, runtime; runtime.load; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_signature_symbolic_and_static_dims():
    value = ir.Value(name="v", type=ir.TensorType(ir.DataType.FLOAT16), shape=ir.Shape(["batch", 3, None]))
    assert artifact_mod.signature([value]) == [{"name": "v", "dtype": "float16", "shape": ["batch", 3, None]}]
