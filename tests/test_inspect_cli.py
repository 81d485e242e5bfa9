"""`carve inspect` through the CLI: traced built-ins, legacy-exported files, JSON output."""

from __future__ import annotations

import json

import pytest
import torch

from optimizer.cli import main


def inspect_json(capsys, model) -> dict:
    assert main(["inspect", str(model), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def assert_blocks(data, count):
    blocks = data["map"]["blocks"]
    assert len(blocks) == count
    for i, block in enumerate(blocks):
        assert block["attention"] and block["attention"]["probs"] and block["attention"]["q"]
        if i + 1 < count:
            assert block["output"] == blocks[i + 1]["input"]


def test_inspect_text_output(capsys):
    assert main(["inspect", "tiny-llama"]) == 0
    out = capsys.readouterr().out
    assert "2 blocks" in out and "token axis 1 (sequence)" in out and "attention probs=" in out


def test_inspect_json_traced(capsys):
    data = inspect_json(capsys, "tiny-bert")
    assert data["source"]["kind"] == "builtin" and data["family"] == "encoder"
    assert data["map"]["source"] == "scopes" and data["map"]["token_dim"] == "sequence"
    assert_blocks(data, 4)
    assert data["nodes"] > 0 and data["op_types"]["Softmax"] == 4


def test_inspect_legacy_export(capsys, tmp_path):
    """A file from torch's legacy exporter has no scopes: the map comes from patterns."""
    from models import registry

    spec = registry.get("tiny-bert")
    module, feeds = spec.build(), spec.example_inputs(2, 9)
    path = tmp_path / "legacy.onnx"
    torch.onnx.export(module, (feeds["input_ids"], feeds["attention_mask"]), str(path), dynamo=False,
                      input_names=["input_ids", "attention_mask"], output_names=spec.output_names,
                      dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}})
    data = inspect_json(capsys, path)
    assert data["source"]["kind"] == "onnx" and data["map"]["source"] == "patterns"
    assert_blocks(data, 4)


def test_inspect_model_without_blocks(capsys, tiny_onnx):
    data = inspect_json(capsys, tiny_onnx)
    assert data["map"]["blocks"] == []


@pytest.mark.slow
def test_inspect_minilm(capsys):
    data = inspect_json(capsys, "minilm")
    assert_blocks(data, 6)
    assert data["map"]["hidden_size"] == 384 and data["map"]["token_axis"] == 1


@pytest.mark.slow
def test_inspect_smollm2(capsys):
    """SmolLM2-135M: 30 Llama blocks with grouped-query attention (traced once, then cached)."""
    data = inspect_json(capsys, "smollm2-135m")
    assert_blocks(data, 30)
    attention = data["map"]["blocks"][0]["attention"]
    assert (attention["heads"], attention["kv_heads"], attention["head_dim"]) == (9, 3, 64)
    assert data["map"]["head"] is not None
