"""``carve bench``: the rows, the baseline ratio, accuracy next to speed, JSON, the plot, bad input.

Timings are never asserted (the machine is shared and noisy); only that they exist and that
the baseline's ratio is exactly 1 by construction.
"""

from __future__ import annotations

import json

import pytest

from optimizer import optimize
from optimizer.bench import bench
from optimizer.bench_report import format_bench
from optimizer.cli import main

ENCODER_ROWS = ["carve", "ort-fp32", "ort-quant", "ort-opt+quant", "torch-eager"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return {name: optimize(name, passes=["cleanup"], output=root / name).path
            for name in ("tiny-bert", "tiny-llama", "tiny-vit")}


@pytest.fixture(scope="module")
def encoder_result(artifacts):
    return bench(artifacts["tiny-bert"], batch=2, seq=16, runs=2)


def rows_by_name(result):
    return {row["system"]: row for row in result["rows"]}


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_encoder_table_has_every_peer(encoder_result):
    assert [row["system"] for row in encoder_result["rows"]] == ENCODER_ROWS
    for row in encoder_result["rows"]:
        assert not row.get("skipped"), row
        assert row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"] * 0.999
        assert row["size_mb"] > 0 and row["peak_mem_mb"] is not None
    text = format_bench(encoder_result)
    assert all(name in text for name in ENCODER_ROWS)


def test_baseline_ratio_is_exactly_one(encoder_result):
    assert rows_by_name(encoder_result)["ort-fp32"]["speedup"] == 1.0


def test_exact_cleanup_artifact_agrees_with_ort_fp32(encoder_result):
    accuracy = rows_by_name(encoder_result)["carve"]["accuracy"]
    assert encoder_result["main_output"] == "sentence_embedding"
    assert accuracy["cosine_mean"] > 0.99999 and accuracy["cosine_min"] > 0.99999


def test_ort_quant_row_for_an_encoder(encoder_result):
    row = rows_by_name(encoder_result)["ort-quant"]
    assert "quantize_dynamic" in row["note"]
    assert 0.9 < row["accuracy"]["cosine_mean"] <= 1.0
    assert row["size_mb"] < rows_by_name(encoder_result)["ort-fp32"]["size_mb"]


def test_decoder_reports_top1_and_generation(artifacts):
    result = bench(artifacts["tiny-llama"], seq=16, runs=1)
    rows = rows_by_name(result)
    assert result["batch"] == 1 and result["main_output"] == "logits"
    assert rows["carve"]["accuracy"]["top1_agreement"] == 1.0
    gen = {row["system"]: row for row in result["generation"]["rows"]}
    assert list(gen) == ["carve", "ort-fp32", "hf-generate"]
    assert gen["carve"]["token_match"] == 1.0 and gen["carve"]["tokens_per_s"] > 0
    assert "generate()" in gen["hf-generate"]["skipped"]  # the reference decoder has none
    assert "no KV cache" in gen["carve"]["note"]


def test_vit_uses_images(artifacts):
    result = bench(artifacts["tiny-vit"], batch=2, runs=1, peers="ort-quant")
    assert [row["system"] for row in result["rows"]] == ["carve", "ort-fp32", "ort-quant"]
    assert "photo crops" in result["inputs"] and result["main_output"] == "cls_embedding"
    assert rows_by_name(result)["carve"]["accuracy"]["cosine_mean"] > 0.99999


def test_json_is_parseable_and_plot_is_png(capsys, artifacts, tmp_path):
    plot = tmp_path / "bench.png"
    code, out, err = run_cli(capsys, "bench", artifacts["tiny-bert"], "--json", "--runs", "1", "--batch", "2",
                             "--seq", "16", "--peers", "ort-quant,torch-eager", "--plot", plot)
    assert code == 0, err
    result = json.loads(out)
    assert [row["system"] for row in result["rows"]] == ["carve", "ort-fp32", "ort-quant", "torch-eager"]
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_table_output(capsys, artifacts):
    code, out, err = run_cli(capsys, "bench", artifacts["tiny-bert"], "--runs", "1", "--batch", "2", "--seq", "16",
                             "--peers", "ort-fp32,hf-generate")
    assert code == 0, err
    assert "speed-up" in out and "1.00x" in out
    assert "hf-generate" in out and "only decoders" in out


def test_error_for_a_non_artifact_dir(capsys, tmp_path):
    code, out, err = run_cli(capsys, "bench", tmp_path / "missing")
    assert code == 2 and out == ""
    assert err.startswith("carve: error: ") and "not an artifact directory" in err
    assert len(err.strip().splitlines()) == 1
    (tmp_path / "plain").mkdir()
    code, _, err = run_cli(capsys, "bench", tmp_path / "plain")
    assert code == 2 and "no manifest.json" in err and "Traceback" not in err


@pytest.mark.parametrize("args, needle", [
    (("--peers", "ort-fp32,tensorrt"), "unknown peer 'tensorrt'"),
    (("--batch", "0"), "--batch must be at least 1"),
    (("--runs", "0"), "--runs must be at least 1"),
    (("--plot", "out.jpg"), "must name a .png file"),
])
def test_bad_arguments_are_one_line(capsys, artifacts, args, needle):
    code, out, err = run_cli(capsys, "bench", artifacts["tiny-bert"], *args)
    assert code == 2 and out == ""
    assert err.startswith("carve: error: ") and needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_minilm_bench(capsys, tmp_path):
    art = optimize("minilm", output=tmp_path / "minilm").path
    code, out, err = run_cli(capsys, "bench", art, "--runs", "3", "--json")
    assert code == 0, err
    rows = rows_by_name(json.loads(out))
    assert list(rows) == ENCODER_ROWS
    assert rows["ort-fp32"]["speedup"] == 1.0
    assert rows["carve"]["accuracy"]["cosine_mean"] > 0.99999
    assert rows["ort-quant"]["accuracy"]["cosine_mean"] > 0.95
    assert rows["ort-quant"]["size_mb"] < rows["ort-fp32"]["size_mb"] / 3


def test_peers_are_built_once_and_keep_stdout_clean(capsys, monkeypatch, artifacts, tmp_path):
    import optimizer.peers as peers

    def fresh_cache(*parts):
        folder = tmp_path.joinpath(*parts)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    monkeypatch.setattr(peers, "cache_dir", fresh_cache)
    argv = ("bench", artifacts["tiny-bert"], "--json", "--runs", "1", "--batch", "2", "--seq", "16",
            "--peers", "ort-opt+quant")
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    row = rows_by_name(json.loads(out))["ort-opt+quant"]  # ORT's tools printed nothing into the JSON
    assert "optimize_model(model_type='bert')" in row["note"]
    (built,) = (tmp_path / "peers").glob("ort-opt-quant-*/model.onnx")
    stamp = built.stat().st_mtime_ns
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0 and built.stat().st_mtime_ns == stamp
    assert rows_by_name(json.loads(out))["ort-opt+quant"]["note"] == row["note"]


def test_damaged_artifact_is_one_line(capsys, tmp_path):
    art = optimize("tiny-bert", output=tmp_path / "art").path
    with open(art / "model.onnx", "ab") as handle:
        handle.write(b"tampered")
    code, out, err = run_cli(capsys, "bench", art)
    assert code == 2 and out == "" and "sha256" in err and len(err.strip().splitlines()) == 1


def test_cached_decoder_generates_through_its_cache(tmp_path):
    import optimizer

    art = optimizer.optimize("tiny-llama", passes=["kv_cache"], output=tmp_path / "kv")
    result = bench(art.path, seq=16, runs=1, peers="carve", new_tokens=6, prompt_tokens=12)
    gen = {row["system"]: row for row in result["generation"]["rows"]}
    assert result["generation"]["prompt_tokens"] == 12 and result["generation"]["new_tokens"] == 6
    assert gen["carve"]["token_match"] == 1.0 and "KV cache" in gen["carve"]["note"]
    assert rows_by_name(result)["carve"]["accuracy"]["top1_agreement"] == 1.0  # the prefill equals the trace
