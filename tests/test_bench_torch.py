"""``carve bench --target torch``: rows, agreement with the original module, decode match, bad input.

Timings are never asserted (the machine is shared); only that the rows exist, the baseline's
ratio is 1 by construction, and the artifact's outputs agree with the original module's.
"""

from __future__ import annotations

import json

import pytest

from optimizer import optimize
from optimizer.bench import BenchError
from optimizer.bench_torch import bench_torch, format_torch
from optimizer.cli import main


@pytest.fixture(scope="module")
def torch_artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-torch")
    return {"bert": optimize("tiny-bert", passes=["cleanup"], target="torch", output=root / "bert").path,
            "bert-ort": optimize("tiny-bert", passes=["cleanup"], output=root / "bert-ort").path,
            "llama-kv": optimize("tiny-llama", passes=["kv_cache"], target="torch", output=root / "llama").path}


def by_system(result):
    return {row["system"]: row for row in result["rows"]}


def test_latency_rows_agree_with_the_module(torch_artifacts):
    result = bench_torch(torch_artifacts["bert"], device="cpu", runs=2, warmup=1, batch=2, seq=16,
                         compile_backend=None)
    rows = by_system(result)
    assert list(rows) == ["hf-eager", "carve"]
    assert rows["hf-eager"]["speedup"] == 1.0
    assert rows["carve"]["cos_min"] > 0.99999 and rows["carve"]["median_ms"] > 0
    assert result["kind"] == "latency" and result["main_output"] == "sentence_embedding"
    assert "carve" in format_torch(result) and "hf-eager" in format_torch(result)


def test_compile_rows_and_extra_artifacts(torch_artifacts):
    result = bench_torch(torch_artifacts["bert"], device="cpu", runs=1, warmup=1, batch=1, seq=8,
                         compile_backend="aot_eager", also={"carve-again": torch_artifacts["bert"]})
    rows = by_system(result)
    assert set(rows) == {"hf-eager", "hf-compile", "carve", "carve-compile", "carve-again", "carve-again-compile"}
    assert min(r["cos_min"] for r in rows.values()) > 0.99999


def test_cli_json(torch_artifacts, capsys):
    assert main(["bench", str(torch_artifacts["bert"]), "--target", "torch", "--runs", "1", "--warmup", "1",
                 "--batch", "1", "--seq", "8", "--no-compile", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["system"] for r in result["rows"]] == ["hf-eager", "carve"]


@pytest.mark.parametrize("key, extra, message", [
    ("bert-ort", [], "was made for ort-cpu"),
    ("bert", ["--device", "cuda"] , "device 'cuda'"),
    ("bert", ["--peers", "ort-quant"], "apply to the ORT bench"),
    ("bert", ["--runs", "0"], "--runs must be at least 1"),
    ("llama-kv", [], "no Hugging Face causal LM"),
])
def test_bad_input_is_one_sentence(torch_artifacts, capsys, key, extra, message):
    code = main(["bench", str(torch_artifacts[key]), "--target", "torch", "--no-compile", *extra])
    err = capsys.readouterr().err
    assert code != 0 and message in err and "Traceback" not in err


def test_not_a_builtin_model(tiny_onnx, tmp_path, capsys):
    out = tmp_path / "onnx-torch"
    assert main(["optimize", str(tiny_onnx), "-o", str(out), "--target", "torch"]) == 0
    capsys.readouterr()
    assert main(["bench", str(out), "--target", "torch", "--no-compile"]) != 0
    assert "not made from a built-in model" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_decode_matches_hugging_face(tmp_path):
    path = optimize("smollm2-135m", passes=["kv_cache"], target="torch", output=tmp_path / "smollm2").path
    result = bench_torch(path, device="cpu", runs=1, warmup=1, compile_backend=None, new_tokens=6, prompt_tokens=16)
    rows = by_system(result)
    assert result["kind"] == "decode" and result["prompt_tokens"] == 16
    assert rows["carve"]["match"] == 1.0 and rows["carve"]["decode_tokens_per_s"] > 0
    with pytest.raises(BenchError, match="was made for"):
        bench_torch(optimize("tiny-bert", output=tmp_path / "ort").path)
