"""The torch target: artifacts whose graph runs as a torch.fx GraphModule, against ONNX Runtime.

Structure (what the artifact holds, one fx call per ONNX node), numerics (fp32 equal to ORT on
the tiny and real models at several batch/sequence sizes, random and real inputs; quantized,
layer-skipped and KV-cached graphs equal to ORT running the same graph; the int8 and fp8
kernels within their budgets), counts (kernel sites), and refusals (bad device, bad kernel
choice, options given to an ONNX Runtime artifact, wrong feeds). Real models are marked slow.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

import runtime
from models import registry
from optimizer import optimize
from optimizer.lower.torch import build_graph_module
from optimizer.progress import Progress
from optimizer.trace_cache import cached_trace_path, load_in_memory
from runtime.errors import ArtifactError, FeedError, PassError
from runtime.torch_backend import DeviceError, TorchSession

TINY = ["tiny-llama", "tiny-bert", "tiny-vit"]
SIZES = [(1, 1), (2, 7), (4, 33)]


def _ort(path, optimized: bool = True):
    """ORT on ``path``; ``optimized=False`` keeps the graph as written (its extended fusions turn
    DequantizeLinear + MatMul into MatMulNBits, which quantizes activations too)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return lambda feeds: dict(zip(names, sess.run(names, feeds)))


def _feeds(name: str, batch: int, seq: int) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in registry.get(name).example_inputs(batch, seq).items()}


def _real_feeds(name: str) -> dict[str, np.ndarray]:
    """Tokenized held-out text (padded, so masks have zeros) or real photo crops."""
    from models import data

    spec = registry.get(name)
    if spec.family == "vit":
        size = spec.example_inputs(1, 0)["pixel_values"].shape[-1]
        return {"pixel_values": data.images("eval", size=int(size), n=3)}
    from optimizer.eval_text import encode

    return {k: v.astype(np.int64) for k, v in encode(spec.tokenizer(), data.texts("news", "eval", n=3), 48).items()}


def _assert_close(want: dict, got: dict, rel: float = 1e-5) -> None:
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape)
        scale = max(1.0, float(np.abs(w).max()))
        assert float(np.abs(g - w).max()) <= rel * scale, (name, float(np.abs(g - w).max()), scale)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    out = tmp_path_factory.mktemp("torch-target")
    return {name: optimize(name, target="torch", output=out / name) for name in TINY}


def test_artifact_holds_the_graph_and_no_code(artifacts):
    art = artifacts["tiny-bert"]
    files = {p.name for p in art.path.iterdir()}
    assert {"manifest.json", "model.onnx"} <= files
    assert not [f for f in files if f.endswith((".pt", ".pth", ".pkl", ".py", ".bin"))]  # no pickled module
    assert art.manifest["target"] == "torch"
    model = ir.load(art.path / "model.onnx")
    ops = collections.Counter(n.op_type for n in model.graph)
    assert art.manifest["lowering"]["operators"] == dict(sorted(ops.items()))
    assert not any(n.domain == "com.microsoft" for n in model.graph)  # the target-neutral graph, not ORT's
    session = runtime.load(art.path)
    assert isinstance(session, TorchSession) and session.providers == ["torch:cpu"]


def test_one_fx_call_per_onnx_node(artifacts):
    model = ir.load(artifacts["tiny-llama"].path / "model.onnx")
    module = build_graph_module(model)
    calls = [n for n in module.graph.nodes if n.op == "call_function"]
    assert len(calls) == sum(1 for n in model.graph if n.op_type != "Constant")
    placeholders = [n.name for n in module.graph.nodes if n.op == "placeholder"]
    assert placeholders == [v.name for v in model.graph.inputs]


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_equal_ort_fp32(name, artifacts):
    """The artifact (cleanup only) on the torch backend equals ORT on the plain trace."""
    reference = _ort(cached_trace_path(registry.get(name), Progress()))
    session = runtime.load(artifacts[name].path)
    for batch, seq in SIZES:
        feeds = _feeds(name, batch, seq)
        _assert_close(reference(feeds), session.run(feeds))
    feeds = _real_feeds(name)
    _assert_close(reference(feeds), session.run(feeds))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm", "vit-s", "smollm2-135m"])
def test_real_models_equal_ort_fp32(name):
    path = cached_trace_path(registry.get(name), Progress())
    module = build_graph_module(load_in_memory(path))
    reference, order = _ort(path), [v.name for v in ir.load(path).graph.inputs]
    names = [o.name for o in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_outputs()]
    sizes = [(1, 5)] if name == "smollm2-135m" else [(1, 5), (2, 24)]  # SmolLM2: keep the test under a minute
    for feeds in [_feeds(name, b, s) for b, s in sizes] + [_real_feeds(name)]:
        with torch.inference_mode():
            got = module(*[torch.from_numpy(feeds[k]) for k in order])
        # 30 fp32 layers reorder sums differently in torch and ORT: relative 1e-4 of the largest logit
        _assert_close(reference(feeds), {n: g.numpy() for n, g in zip(names, got)}, rel=1e-4)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    out = tmp_path_factory.mktemp("torch-quantized")
    arts = {}
    for name in ("tiny-bert", "tiny-llama"):
        for mode in ("dynamic", "w8", "w8a8"):
            calib = f",calib={name}" if mode == "w8a8" else ""
            arts[name, mode] = optimize(name, passes=[f"quantize:mode={mode}{calib}"], target="torch",
                                        output=out / f"{name}-{mode}")
    return arts


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("mode", ["dynamic", "w8", "w8a8"])
def test_quantized_decision_graph_equals_ort(name, mode, quantized):
    """matmul='dequantize' computes the graph as written, as ORT does without its fusions."""
    art = quantized[name, mode]
    reference = _ort(art.path / "model.onnx", optimized=False)
    session = runtime.load(art.path, matmul="dequantize")
    # w8a8: where torch and ORT round an activation's float a hair apart across a QuantizeLinear
    # step boundary, that activation moves by one step; elsewhere both compute the same numbers.
    rel = 1e-3 if mode == "w8a8" else 1e-5
    for batch, seq in [(1, 3), (3, 17)]:
        feeds = _feeds(name, batch, seq)
        _assert_close(reference(feeds), session.run(feeds), rel=rel)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_int8_kernels_count_and_numerics(name, quantized):
    """w8a8 sites in int32 arithmetic equal the float graph; dynamic sites stay within budget."""
    feeds = _feeds(name, 2, 16)
    plain = _ort(cached_trace_path(registry.get(name), Progress()))(feeds)
    for mode in ("w8a8", "dynamic", "w8"):
        art = quantized[name, mode]
        sites = art.manifest["passes"][0]["sites"]
        session = runtime.load(art.path, matmul="int8")
        kernels = collections.Counter(n.target.__name__ for n in session.module.graph.nodes if n.op == "call_function")
        expected = {"w8a8": ("int8_linear", sites), "dynamic": ("dynamic_int8_linear", sites), "w8": ("int8_linear", 0)}[mode]
        assert kernels[expected[0]] == expected[1], (mode, kernels)
        exact = runtime.load(art.path, matmul="dequantize").run(feeds)
        got = session.run(feeds)
        for out in got:
            if mode == "dynamic":
                assert _cosine(plain[out], got[out]) >= 0.999, (mode, out)
            else:
                _assert_close({out: exact[out]}, {out: got[out]}, rel=1e-5)


def test_constant_weight_dequantize_is_folded_once(quantized):
    """matmul='dequantize': each int8 weight is dequantized when the module is built, not per call."""
    art = quantized["tiny-llama", "w8"]
    model = ir.load(art.path / "model.onnx")
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph) == art.manifest["passes"][0]["sites"] > 0
    module = runtime.load(art.path, matmul="dequantize").module
    calls = collections.Counter(n.target.__name__ for n in module.graph.nodes if n.op == "call_function")
    assert calls["dequantize_linear"] == 0
    assert all(b.dtype == torch.float32 for b in module.buffers() if b.dim() == 2)


def test_fp8_kernel_stays_within_budget(quantized):
    art = quantized["tiny-bert", "dynamic"]
    session = runtime.load(art.path, matmul="fp8")
    kernels = collections.Counter(n.target.__name__ for n in session.module.graph.nodes if n.op == "call_function")
    assert kernels["fp8_linear"] == art.manifest["passes"][0]["sites"]
    feeds = _feeds("tiny-bert", 2, 16)
    plain = _ort(cached_trace_path(registry.get("tiny-bert"), Progress()))(feeds)
    got = session.run(feeds)
    assert _cosine(plain["sentence_embedding"], got["sentence_embedding"]) >= 0.99


def test_skipped_layers_equal_ort(tmp_path):
    art = optimize("tiny-bert", passes=["skip_layers:blocks=1"], target="torch", output=tmp_path / "skip")
    reference = _ort(art.path / "model.onnx")
    session = runtime.load(art.path)
    for batch, seq in [(1, 4), (2, 19)]:
        feeds = _feeds("tiny-bert", batch, seq)
        _assert_close(reference(feeds), session.run(feeds))


def _cache_feeds(step_ids, past, start, layers):
    batch = step_ids.shape[0]
    feeds = {"input_ids": step_ids, "attention_mask": np.ones((batch, start + step_ids.shape[1]), np.int64),
             "position_ids": np.tile(np.arange(start, start + step_ids.shape[1]), (batch, 1)).astype(np.int64)}
    for i in range(layers):
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
    return feeds


@pytest.mark.parametrize("name", ["tiny-llama", pytest.param("smollm2-135m", marks=pytest.mark.slow)])
def test_kv_cached_decoder_prefill_and_decode_equal_ort(name, tmp_path):
    art = optimize(name, passes=["kv_cache:max_positions=64"], target="torch", output=tmp_path / "kv")
    reference, session = _ort(art.path / "model.onnx"), runtime.load(art.path)
    keys = [s for s in art.manifest["inputs"] if s["name"].endswith(".key")]
    presents = [s["name"] for s in art.manifest["outputs"] if s["name"].startswith("present.")]
    ids = _feeds(name, 2, 8)["input_ids"]
    past = [np.zeros((2, keys[0]["shape"][1], 0, keys[0]["shape"][3]), np.float32)] * (2 * len(keys))
    start = 0
    for chunk in (ids[:, :5], ids[:, 5:6], ids[:, 6:7], ids[:, 7:8]):  # prefill, then one token at a time
        feeds = _cache_feeds(chunk, past, start, len(keys))
        want, got = reference(feeds), session.run(feeds)
        _assert_close(want, got, rel=1e-5 if name.startswith("tiny") else 1e-4)
        past, start = [got[name] for name in presents], start + chunk.shape[1]
    assert past[0].shape[2] == 8


def test_generation_runtime_gives_the_tokens_ort_gives(tmp_path):
    """runtime.generate drives a torch-target cached decoder exactly as it drives the ORT one."""
    from runtime.generate import generate

    prompts = [[5, 9, 14, 20, 7], [33, 8]]
    tokens = {}
    for target in ("ort-cpu", "torch"):
        art = optimize("tiny-llama", passes=["kv_cache:max_positions=64"], target=target, output=tmp_path / target)
        tokens[target] = generate(runtime.load(art.path), prompts, max_new_tokens=6).tokens
    assert tokens["torch"] == tokens["ort-cpu"] and len(tokens["torch"][0]) == 6


def test_compiled_module_equals_eager(artifacts):
    """Shapes are Python ints, so dynamo traces the whole module as one graph, for any batch."""
    from torch._dynamo.utils import counters

    eager = runtime.load(artifacts["tiny-vit"].path)
    compiled = runtime.load(artifacts["tiny-vit"].path, compile="aot_eager")
    counters.clear()
    for batch in (2, 3):  # dynamo specializes size-1 dims, so no batch of 1 here
        feeds = _feeds("tiny-vit", batch, 0)
        _assert_close(eager.run(feeds), compiled.run(feeds))
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1


def test_torch_tensors_in_and_out(artifacts):
    session = runtime.load(artifacts["tiny-bert"].path)
    tensors = registry.get("tiny-bert").example_inputs(2, 6)
    out = session.run_torch(tensors)
    assert isinstance(out["sentence_embedding"], torch.Tensor) and out["sentence_embedding"].shape == (2, 64)
    np.testing.assert_array_equal(out["sentence_embedding"].numpy(), session.run(tensors)["sentence_embedding"])


@pytest.mark.parametrize("device, needle", [
    ("cuda", "sees no CUDA GPU" if not torch.cuda.is_available() else None),
    ("quantum:0", "'quantum:0' is not a torch device"),
])
def test_bad_device_is_named(device, needle, artifacts):
    if needle is None:
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match=needle):
        runtime.load(artifacts["tiny-bert"].path, device=device)


def test_bad_kernel_choice_and_ort_artifact_options_are_refused(artifacts, tiny_artifact):
    with pytest.raises(PassError, match="unknown matmul kernel choice 'int3'"):
        runtime.load(artifacts["tiny-bert"].path, matmul="int3")
    with pytest.raises(ArtifactError, match="device apply only to artifacts made with --target torch"):
        runtime.load(tiny_artifact, device="cpu")


def test_wrong_feeds_are_one_sentence(artifacts):
    session = runtime.load(artifacts["tiny-bert"].path)
    feeds = _feeds("tiny-bert", 2, 5)
    with pytest.raises(FeedError, match="has dtype int32 but the model expects int64"):
        session.run({**feeds, "input_ids": feeds["input_ids"].astype(np.int32)})
    with pytest.raises(FeedError, match="the model has no output 'pooled'"):
        session.run(feeds, outputs=["pooled"])


def test_cli_optimize_and_run_with_the_torch_target(tmp_path, capsys):
    from optimizer.cli import main

    assert main(["optimize", "tiny-vit", "-o", str(tmp_path / "vit"), "--target", "torch"]) == 0
    np.save(tmp_path / "px.npy", _feeds("tiny-vit", 2, 0)["pixel_values"])
    assert main(["run", str(tmp_path / "vit"), "--input", f"pixel_values={tmp_path / 'px.npy'}"]) == 0
    assert "cls_embedding: float32 [2, 64]" in capsys.readouterr().out
    assert main(["run", str(tmp_path / "vit"), "--input", f"pixel_values={tmp_path / 'px.npy'}", "--device", "quantum"]) == 2
    assert "'quantum' is not a torch device" in capsys.readouterr().err


def test_feature_cache_stream_equals_ort(tmp_path):
    """The feature_cache pass's If runs as a submodule; a stream reuses and recomputes as ORT does."""
    from runtime.stream import StreamSession

    arts = {t: optimize("tiny-vit", passes=["feature_cache:threshold=0.05"], target=t, output=tmp_path / t)
            for t in ("ort-cpu", "torch")}
    streams = {t: StreamSession(runtime.load(a.path)) for t, a in arts.items()}
    frame = _feeds("tiny-vit", 2, 0)["pixel_values"]
    for step in range(4):  # the first call computes; near-identical frames reuse
        feeds = {"pixel_values": frame + np.float32(1e-4 * step)}
        _assert_close(streams["ort-cpu"].run(feeds), streams["torch"].run(feeds))
    assert streams["torch"].recomputed == streams["ort-cpu"].recomputed < 4


@pytest.mark.parametrize("mode", ["attention", "diverse"])
def test_pruned_tokens_equal_ort(mode, tmp_path):
    """prune_tokens' gathers (GatherND with batch dims) and, for diverse, its Loop run as ORT runs them."""
    art = optimize("tiny-vit", passes=[f"prune_tokens:mode={mode},keep=0.5"], target="torch", output=tmp_path / mode)
    ops = collections.Counter(n.op_type for n in ir.load(art.path / "model.onnx").graph)
    assert ops["GatherND"] + ops["GatherElements"] > 0 and (mode != "diverse" or ops["Loop"] > 0)
    reference, session = _ort(art.path / "model.onnx"), runtime.load(art.path)
    for batch in (1, 3):
        feeds = _feeds("tiny-vit", batch, 0)
        _assert_close(reference(feeds), session.run(feeds))


def test_carve_bench_times_a_torch_artifact(artifacts):
    """carve bench runs a torch-target artifact as its 'carve' row; outputs agree with ORT fp32."""
    from optimizer.bench import bench

    result = bench(artifacts["tiny-bert"].path, batch=2, seq=8, runs=2, peers="carve,ort-fp32", threads=1)
    carve = next(r for r in result["rows"] if r["system"] == "carve")
    assert carve["median_ms"] > 0 and carve["accuracy"]["max_abs_err"] <= 1e-4, carve


def test_static_kv_cache_scatters_like_ort(tmp_path):
    """kv_cache:static=N writes new keys into fixed buffers with ScatterElements at cache_position."""
    art = optimize("tiny-llama", passes=["kv_cache:max_positions=64,static=16"], target="torch", output=tmp_path / "s")
    reference, session = _ort(art.path / "model.onnx"), runtime.load(art.path)
    ids = _feeds("tiny-llama", 2, 7)["input_ids"]
    past = {s["name"]: np.zeros([2, *s["shape"][1:]], np.float32) for s in art.manifest["inputs"]
            if s["name"].startswith("past_key_values.")}
    start = 0
    for chunk in (ids[:, :5], ids[:, 5:6], ids[:, 6:7]):
        mask = (np.arange(16) < start + chunk.shape[1]).astype(np.int64)[None].repeat(2, 0)
        feeds = {"input_ids": chunk, "attention_mask": mask, "cache_position": np.arange(start, start + chunk.shape[1]),
                 "position_ids": np.arange(start, start + chunk.shape[1])[None].repeat(2, 0), **past}
        want, got = reference(feeds), session.run(feeds)
        _assert_close(want, got)
        past, start = {k: got[k.replace("past_key_values.", "present.")] for k in past}, start + chunk.shape[1]


def test_only_the_torch_backend_imports_torch_in_the_runtime():
    import re
    from pathlib import Path

    runtime_dir = Path(__file__).resolve().parents[1] / "runtime"
    importing = [p.name for p in runtime_dir.glob("*.py")
                 if re.search(r"^\s*(import torch|from torch)\b", p.read_text(), re.M)]
    assert importing == ["torch_backend.py"]
