"""skip_layers: structure (the skipped blocks' nodes are gone), numerics (an empty set is exact; a
skipped block equals torch with that layer deleted), counts and the record, determinism, the
evolutionary search against the exhaustive optimum, the fast evaluator against rewritten
graphs, and the cases that must fail with a PassError."""

from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from models import registry
from models.reference import llama
from optimizer import trace
from optimizer.pipeline import PassContext, run_pipeline
from optimizer.progress import Progress
from optimizer.specs import PassSpec
from optimizer.structure import build_map
from optimizer.trace_cache import cached_trace
from passes.skip_layers_data import spec_batches, use_calibration
from passes.skip_layers_eval import GraphEvaluator, evaluator
from passes.skip_layers_rewrite import units_of
from runtime.errors import PassError

TEXT_AXES = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}


def _llama(layers: int, seed: int = 0):
    """A reference Llama whose next-token distributions are broad enough for KL to rank skip sets.

    With tied embeddings the seeded model predicts its own input token with probability ~1, so
    every skip set's KL is ~1e-12; a smaller final-norm gain (0.1) spreads the distributions.
    """
    module = llama.build(llama.LlamaConfig(num_layers=layers, seed=seed))
    with torch.no_grad():
        module.norm.weight.mul_(0.1)
    model = trace(module, registry.get("tiny-llama").example_inputs(2, 16), TEXT_AXES, output_names=["logits"])
    return module, ir.serde.serialize_model(model), spec_batches(registry.get("tiny-llama"), 8)


@pytest.fixture(scope="module")
def llama6():
    """A 6-layer reference Llama (12 sub-blocks), its trace, and calibration batches of real text."""
    return _llama(6, seed=3)


@pytest.fixture(scope="module")
def builtin():
    """Traced built-ins (serialized, so each test gets a fresh copy) and their modules."""
    out = {}
    for name in ("tiny-bert", "tiny-vit"):
        spec = registry.get(name)
        out[name] = (spec.build(), ir.serde.serialize_model(cached_trace(spec, Progress())), spec)
    return out


def _fresh(proto) -> ir.Model:
    return ir.serde.deserialize_model(proto)


def _skip(model: ir.Model, calibration, **options):
    with use_calibration(calibration):
        model, records = run_pipeline(model, [PassSpec("skip_layers", options)], PassContext())
    return model, records[0]


def _ort(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _torch(module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def _without(module, layers_attr: str, drop: list[int]):
    """A copy of ``module`` with the listed layers deleted from its ModuleList."""
    module = copy.deepcopy(module)
    holder, _, name = layers_attr.rpartition(".")
    owner = module.get_submodule(holder) if holder else module
    layers = getattr(owner, name)
    setattr(owner, name, torch.nn.ModuleList(layer for i, layer in enumerate(layers) if i not in drop))
    return module


# --- structure and numerics ---------------------------------------------------------------------

def test_skipped_block_nodes_are_gone(builtin):
    _, proto, spec = builtin["tiny-bert"]
    model = _fresh(proto)
    block = build_map(model).blocks[1]
    model, record = _skip(model, spec, blocks=(1,))
    names = {n.name for n in model.graph}
    assert not names & set(block.nodes)
    assert record.sites == 1 and record.details["set"] == [1]
    assert record.nodes_before - record.nodes_after == pytest.approx(len(block.nodes), abs=3)


@pytest.mark.parametrize("options", [{"count": 0}, {"blocks": ()}])
def test_empty_skip_set_is_exact(builtin, options):
    _, proto, spec = builtin["tiny-bert"]
    feeds = spec_batches(spec, 4)[0]
    before = _ort(_fresh(proto), feeds)
    model, record = _skip(_fresh(proto), spec, **options)
    assert record.sites == 0 and record.nodes_after == record.nodes_before
    for a, b in zip(before, _ort(model, feeds)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("drop", [[0], [2], [5], [1, 2]])
def test_llama_matches_torch_without_the_layers(llama6, drop):
    module, proto, batches = llama6
    model, record = _skip(_fresh(proto), batches, blocks=tuple(drop))
    assert record.sites == len(drop)
    expected = _torch(_without(module, "layers", drop), batches[0])
    np.testing.assert_allclose(_ort(model, batches[0])[0], expected[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name, attr, drop", [
    ("tiny-bert", "encoder.layer", [3]),  # the last block's output is the graph output
    ("tiny-bert", "encoder.layer", [2, 3]),
    ("tiny-vit", "encoder.layer", [1]),
])
def test_encoders_match_torch_without_the_layers(builtin, name, attr, drop):
    module, proto, spec = builtin[name]
    feeds = spec_batches(spec, 4)[0]
    model, _ = _skip(_fresh(proto), spec, blocks=tuple(drop))
    assert [v.name for v in model.graph.outputs] == list(spec.output_names)
    for got, want in zip(_ort(model, feeds), _torch(_without(module, attr, drop), feeds)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


class _Zero(torch.nn.Module):
    """A sub-layer that contributes nothing to the residual sum."""

    def forward(self, x, *args):
        return torch.zeros_like(x)


def test_llama_sub_blocks_match_torch(llama6):
    module, proto, batches = llama6
    model, record = _skip(_fresh(proto), batches, blocks=(2, 7), sub=True)  # layer 1's attention, layer 3's MLP
    assert record.details["unit"] == "sub-block" and record.sites == 2
    reference = copy.deepcopy(module)
    reference.layers[1].self_attn = _Zero()
    reference.layers[3].mlp = _Zero()
    np.testing.assert_allclose(_ort(model, batches[0])[0], _torch(reference, batches[0])[0], atol=1e-4, rtol=1e-4)


class _Residual(torch.nn.Module):
    """BERT's "output" sub-layer with its MLP dropped: returns the residual input unchanged."""

    def forward(self, x, residual):
        return residual


def test_bert_sub_blocks_match_torch(builtin):
    module, proto, spec = builtin["tiny-bert"]
    feeds = spec_batches(spec, 4)[0]
    model, _ = _skip(_fresh(proto), spec, blocks=(0, 5), sub=True)  # layer 0's attention, layer 2's MLP
    reference = copy.deepcopy(module)
    reference.encoder.layer[0].attention = _Identity()
    reference.encoder.layer[2].output = _Residual()
    for got, want in zip(_ort(model, feeds), _torch(reference, feeds)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


class _Identity(torch.nn.Module):
    def forward(self, x, *args):
        return x


# --- the search and its record ------------------------------------------------------------------

def test_search_record_and_sites(llama6):
    _, proto, batches = llama6
    model, record = _skip(_fresh(proto), batches, count=2, generations=3)
    details = record.details
    assert record.sites == 2 and len(details["removed"]) == 2
    assert details["score"].startswith("kl") and details["search"] == "evolutionary"
    assert set(details["comparison"]) == {"chosen", "block_influence", "random"}
    assert details["comparison"]["chosen"]["score"] <= details["comparison"]["block_influence"]["score"]
    assert len(details["curve"]) == 4 and details["curve"] == sorted(details["curve"], reverse=True)
    assert all({"block_influence", "score_alone", "name"} <= set(r) for r in details["removed"])
    assert len(build_map(model).blocks) == 4


def test_same_seed_same_choice(builtin):
    _, proto, spec = builtin["tiny-bert"]
    runs = [_skip(_fresh(proto), spec, count=3, sub=True, seed=5, generations=4)[1].details for _ in range(2)]
    assert runs[0]["set"] == runs[1]["set"] and runs[0]["curve"] == runs[1]["curve"]


def test_evolutionary_finds_the_exhaustive_optimum(llama6):
    """12 sub-blocks (6 layers), choose 3: 220 sets, small enough to enumerate."""
    _, proto, batches = llama6
    exhaustive = _skip(_fresh(proto), batches, count=3, sub=True, search="exhaustive")[1].details
    evolved = _skip(_fresh(proto), batches, count=3, sub=True, generations=15)[1].details
    greedy = _skip(_fresh(proto), batches, count=3, sub=True, search="greedy")[1].details
    assert evolved["set"] == exhaustive["set"]
    assert evolved["set_score"] == pytest.approx(exhaustive["set_score"])
    assert greedy["set_score"] >= exhaustive["set_score"] - 1e-12


def test_block_influence_only(builtin):
    _, proto, spec = builtin["tiny-vit"]
    details = _skip(_fresh(proto), spec, count=2, score="bi")[1].details
    ranked = sorted(details["block_influence"].values())
    assert details["search"].startswith("block influence")
    assert sorted(r["block_influence"] for r in details["removed"]) == pytest.approx(ranked[:2], abs=1e-6)
    assert details["set"] == details["comparison"]["block_influence"]["set"]


@pytest.mark.parametrize("which, linear", [("llama", False), ("bert", False), ("llama", True), ("bert", True)])
def test_fast_evaluator_equals_rewritten_graphs(llama6, builtin, which, linear):
    if which == "llama":
        proto, batches = llama6[1], llama6[2]
    else:
        proto, batches = builtin["tiny-bert"][1], spec_batches(builtin["tiny-bert"][2], 8)
    model = _fresh(proto)
    units, main = units_of(build_map(model), sub=True), model.graph.outputs[-1].name
    kind = "kl" if main == "logits" else "cosine"
    fast = evaluator(model, units, main, batches, kind, linear)
    slow = GraphEvaluator(model, units, main, batches, kind, linear)
    assert type(fast) is not GraphEvaluator
    # the last two share a prefix with earlier ones, so they resume from cached states
    sets = [(), (1,), (0, 1, 2), (3, 7), (7, 5), (0, 1, 7)]
    for skip in map(frozenset, sets):
        assert fast.score(skip, len(batches)) == pytest.approx(slow.score(skip, len(batches)), rel=1e-4, abs=1e-7)
    assert fast.score(frozenset(), len(batches)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("blocks", [(1,), (2, 3)])
def test_linear_replacement_beats_plain_skipping(builtin, blocks):
    _, proto, spec = builtin["tiny-bert"]
    plain = _skip(_fresh(proto), spec, blocks=blocks)[1]
    model, linear = _skip(_fresh(proto), spec, blocks=blocks, replace="linear")
    assert linear.details["set_score"] < plain.details["set_score"]
    assert linear.details["replace"] == [{"span": [blocks[0], blocks[-1]], "weights": 64 * 64 + 64}]
    assert linear.param_bytes_after == plain.param_bytes_after + 4 * (64 * 64 + 64)
    assert [v.name for v in model.graph.outputs] == list(spec.output_names)
    feeds = spec_batches(spec, 4)[0]
    assert all(np.isfinite(o).all() for o in _ort(model, feeds))


def test_through_optimize_writes_an_artifact(tmp_path):
    import optimizer

    spec = registry.get("tiny-vit")
    with use_calibration(spec):
        art = optimizer.optimize("tiny-vit", passes=["skip_layers:count=1,generations=2"], output=tmp_path / "vit")
    record = art.manifest["passes"][0]
    assert record["name"] == "skip_layers" and record["sites"] == 1
    session = art.load()
    out = session.run(spec_batches(spec, 4)[0])
    assert set(out) == set(spec.output_names)


def test_calibration_sources(builtin):
    _, proto, spec = builtin["tiny-bert"]
    ctx = PassContext(example_feeds={k: v.numpy() for k, v in spec.example_inputs(2, 16).items()})
    record = run_pipeline(_fresh(proto), [PassSpec("skip_layers", {"count": 1, "generations": 1})], ctx)[1][0]
    assert record.details["calibration"].startswith("the pipeline's example feeds")
    ctx.calibration = "tiny-bert"  # the field proposed for PassContext: a built-in name, a spec or feeds
    record = run_pipeline(_fresh(proto), [PassSpec("skip_layers", {"count": 1, "generations": 1})], ctx)[1][0]
    assert record.details["calibration"] == "tiny-bert calibration split (16 samples)"
    with pytest.raises(PassError, match="give feeds for exactly the model's inputs"):
        _skip(_fresh(proto), [{"input_ids": np.zeros((1, 4), np.int64)}], count=1)


@pytest.mark.slow
def test_minilm_keeps_its_embeddings_with_a_linear_replacement(tmp_path):
    """The real MiniLM without its third block: 0.929 plain, 0.972 with replace=linear (full eval)."""
    import optimizer
    from optimizer.evaluate import evaluate

    with use_calibration("minilm"):
        art = optimizer.optimize("minilm", passes=["skip_layers:blocks=2,replace=linear,samples=96"],
                                 output=tmp_path / "minilm")
    details = art.manifest["passes"][0]["details"]
    assert details["set"] == [2] and details["set_score"] < 0.04
    assert evaluate(art.path, quick=True)["metrics"]["embedding_cosine_mean"] > 0.96


# --- what must fail -----------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"count": 4}, "budget larger than the model"),
    ({"count": 9, "sub": True}, "budget larger than the model"),
    ({"blocks": (0, 4)}, "out of range"),
    ({"blocks": (1, 1)}, "repeat"),
    ({"blocks": (0, 1, 2, 3)}, "budget larger than the model"),
])
def test_model_dependent_errors(builtin, options, message):
    _, proto, spec = builtin["tiny-bert"]
    with pytest.raises(PassError, match=message):
        _skip(_fresh(proto), spec, **options)


@pytest.mark.parametrize("options, message", [
    ({"count": "-1"}, "must be >= 0"),
    ({"count": "1", "blocks": "2"}, "not both"),
    ({}, "needs count"),
    ({"count": "1", "mode": "positional"}, "drop count, which belongs to mode=static"),
    ({"count": "1", "search": "random"}, "is not one of"),
    ({"count": "1", "samples": "0"}, "samples must be >= 1"),
])
def test_option_errors_fail_before_running(options, message):
    from optimizer.pipeline import instantiate

    with pytest.raises(PassError, match=message):
        instantiate([PassSpec("skip_layers", options)])


def test_no_blocks_is_an_error(tiny_onnx):
    from optimizer import load

    model = load(tiny_onnx)
    with pytest.raises(PassError, match="needs transformer blocks"):
        run_pipeline(model, [PassSpec("skip_layers", {"count": 1})], PassContext())


def test_exhaustive_refuses_huge_searches():
    from passes.skip_layers_search import exhaustive

    with pytest.raises(PassError, match="too slow"):
        exhaustive(60, 20, scorer=None)
