"""Passes compose in one pipeline: each keeps its effect when run after another."""

from __future__ import annotations

import numpy as np
import pytest
import onnx

from models import registry
from optimizer import optimize


def test_skip_then_quantize(tmp_path):
    spec = registry.get("tiny-bert")
    feeds = {k: v.numpy() for k, v in spec.example_inputs(4, 24).items()}
    plain = optimize("tiny-bert", output=tmp_path / "plain").load()
    skipped = optimize("tiny-bert", passes=["skip_layers:blocks=1"], output=tmp_path / "skip")
    both = optimize("tiny-bert", passes=["skip_layers:blocks=1", "quantize:mode=dynamic"], output=tmp_path / "both")

    records = both.manifest["passes"]
    assert [r["name"] for r in records] == ["skip_layers", "quantize"]
    assert records[0]["sites"] == 1
    # the quantize pass sees one block fewer: 6 weight matmuls per BERT block remain for 3 blocks
    alone = optimize("tiny-bert", passes=["quantize:mode=dynamic"], output=tmp_path / "q").manifest["passes"][0]["sites"]
    assert records[1]["sites"] == alone - 6

    out_plain = plain.run(feeds)["sentence_embedding"]
    out_skip = skipped.load().run(feeds)["sentence_embedding"]
    out_both = both.load().run(feeds)["sentence_embedding"]
    cos = lambda a, b: float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))  # noqa: E731
    assert cos(out_skip, out_both) > 0.99          # quantization's own loss stays small after skipping
    assert np.abs(out_plain - out_skip).max() > 1e-3   # the skip took effect
    assert np.abs(out_skip - out_both).max() < np.abs(out_plain - out_both).max()  # and survives quantizing


@pytest.mark.parametrize("source, cloned", [("", 0), (",source=next", 2)])  # next: Q and K projections cloned
def test_prune_tokens_then_quantize(tmp_path, source, cloned):
    spec = registry.get("tiny-bert")
    feeds = {k: v.numpy() for k, v in spec.example_inputs(4, 24).items()}
    prune = "prune_tokens:keep=0.5,after=2" + source
    plain = optimize("tiny-bert", output=tmp_path / "plain").load()
    pruned = optimize("tiny-bert", passes=[prune], output=tmp_path / "prune")
    both = optimize("tiny-bert", passes=[prune, "quantize:mode=dynamic"], output=tmp_path / "both")

    records = both.manifest["passes"]
    assert [r["name"] for r in records] == ["prune_tokens", "quantize"]
    assert records[0]["sites"] == 1 and records[0]["details"]["stages"][0]["block"] == 2
    alone = optimize("tiny-bert", passes=["quantize:mode=dynamic"], output=tmp_path / "q").manifest["passes"][0]["sites"]
    assert records[1]["sites"] == alone + cloned  # pruning keeps every weight matmul; all are still quantized

    out_plain = plain.run(feeds)["sentence_embedding"]
    out_pruned = pruned.load().run(feeds)["sentence_embedding"]
    out_both = both.load().run(feeds)["sentence_embedding"]
    cos = lambda a, b: float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))  # noqa: E731
    assert cos(out_pruned, out_both) > 0.98  # quantization's own loss stays small after pruning
    assert np.abs(out_plain - out_pruned).max() > 1e-2  # the pruning took effect
    graph = onnx.load(str(both.path / "model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert "TopK" in ops and "GatherND" in ops and ops & {"DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat"}


def test_skip_prune_and_quantize_in_one_pipeline(tmp_path):
    """All three lossy families at once: each record shows its sites, and the output stays close to
    the pruned-and-skipped float model (quantization's own loss only)."""
    spec = registry.get("tiny-bert")
    feeds = {k: v.numpy() for k, v in spec.example_inputs(4, 24).items()}
    shape = ["skip_layers:blocks=1", "prune_tokens:keep=0.5,after=2"]
    floats = optimize("tiny-bert", passes=shape, output=tmp_path / "float")
    three = optimize("tiny-bert", passes=[*shape, "quantize:mode=dynamic"], output=tmp_path / "three")
    records = three.manifest["passes"]
    assert [r["name"] for r in records] == ["skip_layers", "prune_tokens", "quantize"]
    assert records[0]["sites"] == 1 and records[1]["sites"] >= 1 and records[2]["sites"] == 18  # 3 blocks x 6 matmuls
    graph = onnx.load(str(three.path / "model.onnx"), load_external_data=False).graph
    assert any(n.op_type == "TopK" for n in graph.node)  # the static keep count survives quantizing
    a = floats.load().run(feeds)["sentence_embedding"]
    b = three.load().run(feeds)["sentence_embedding"]
    assert float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))) > 0.99
