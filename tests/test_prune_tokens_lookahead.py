"""prune_tokens source=next: the pruned block's own CLS attention row as the criterion.

Structure (the block's Q/K path cloned over every token), numerics (keep=1.0 exact; the score
equals the block's own CLS row read from the unpruned graph), counts, and refusals."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest

from models import data, registry
from optimizer.pipeline import PassContext, run_pipeline
from optimizer.progress import Progress
from optimizer.specs import parse_spec
from optimizer.structure import build_map
from optimizer.trace_cache import cached_trace
from optimizer.lower.tensorrt_legal import check
from runtime.errors import PassError
from test_prune_tokens import _run as run_graph, _text_feeds  # the pass's own test helpers


@pytest.fixture(scope="module")
def traced():
    return {name: ir.serde.serialize_model(cached_trace(registry.get(name), Progress()))
            for name in ("tiny-bert", "tiny-vit", "tiny-llama")}


def _prune(proto, text: str, target: str = "ort-cpu"):
    model, records = run_pipeline(ir.serde.deserialize_model(proto), parse_spec(text), PassContext(target=target))
    return model, records[0]


def _run(model, feeds, outputs=()) -> dict[str, np.ndarray]:
    return run_graph(model, feeds, outputs, optimize=False)


def test_the_query_and_key_path_is_cloned_once_per_stage(traced):
    cls, _ = _prune(traced["tiny-bert"], "prune_tokens:keep=0.5,after=2,source=cls")
    before = collections.Counter(n.op_type for n in cls.graph)
    model, record = _prune(traced["tiny-bert"], "prune_tokens:keep=0.5,after=2,source=next")
    after = collections.Counter(n.op_type for n in model.graph)
    # against the previous block's row: the Q and K projections cloned (with their bias Adds),
    # the CLS query against every key, one more Softmax
    assert after["MatMul"] - before["MatMul"] == 3
    assert after["Softmax"] - before["Softmax"] == 1
    assert record.sites == 1 and record.details["stages"][0]["block"] == 2
    cloned = [n for n in model.graph if n.name.endswith("_pruned") and n.op_type in ("MatMul", "Add")]
    assert len(cloned) == 4
    # the query projection runs for the CLS token alone (a Slice of the stream), the key projection for all
    sliced = [n for n in cloned if n.inputs[0].producer() is not None and n.inputs[0].producer().op_type == "Slice"]
    assert len(sliced) == 1 and sliced[0].op_type == "MatMul"


@pytest.mark.parametrize("name, text", [
    ("tiny-bert", "prune_tokens:keep=1.0,after=2,source=next"),
    ("tiny-vit", "prune_tokens:keep=1.0,after=0,source=next"),  # block 0 works: no previous block needed
])
def test_keep_everything_is_exact(traced, name, text):
    feeds = _text_feeds() if name == "tiny-bert" else {"pixel_values": data.images("eval", size=32, n=3)}
    before = _run(ir.serde.deserialize_model(traced[name]), feeds)
    after = _run(_prune(traced[name], text)[0], feeds)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])


def test_the_score_is_the_blocks_own_cls_row(traced):
    """The score the stage computes equals block 2's CLS attention row (mean over heads) in the
    unpruned graph, padding included as zeros."""
    feeds = _text_feeds()
    original = ir.serde.deserialize_model(traced["tiny-bert"])
    probs = build_map(original).blocks[2].attention.probs
    row = _run(original, feeds, [probs])[probs][:, :, 0, :].mean(1)
    model, record = _prune(traced["tiny-bert"], "prune_tokens:keep=0.5,after=2,source=next")
    softmax = [n for n in model.graph if n.op_type == "Softmax" and n.name.startswith("prune_tokens")]
    score = next(u.node for u in softmax[0].outputs[0].uses() if u.node.op_type == "ReduceMean").outputs[0].name
    got = _run(model, feeds, [score])[score]
    np.testing.assert_allclose(got, row, atol=1e-6)


def test_kept_tokens_follow_the_next_blocks_attention(traced):
    feeds = _text_feeds(batch=1)
    original = ir.serde.deserialize_model(traced["tiny-bert"])
    probs = build_map(original).blocks[2].attention.probs
    row = _run(original, feeds, [probs])[probs][0, :, 0, :].mean(0)
    model, record = _prune(traced["tiny-bert"], "prune_tokens:keep=0.5,after=2,source=next")
    indices = record.details["stages"][0]["indices"]
    kept = set(_run(model, feeds, [indices])[indices][0].tolist())
    ranked = [0] + [int(i) for i in np.argsort(-row) if i != 0]
    assert kept == set(ranked[:len(kept)])


def test_tensorrt_legality_of_the_lookahead(traced):
    model, _ = _prune(traced["tiny-vit"], "prune_tokens:keep=0.5,after=1,source=next", target="tensorrt")
    assert check(model) == []


@pytest.mark.parametrize("name, text, needle", [
    ("tiny-bert", "prune_tokens:keep=0.5,after=2,source=next,mode=pagerank", "criterion of mode=attention"),
    ("tiny-bert", "prune_tokens:keep=0.5,after=2,source=next,protect=0", "keep protect >= 1"),
    ("tiny-llama", "prune_tokens:keep=0.5,after=1,source=next", "grouped-query"),
])
def test_refusals(traced, name, text, needle):
    with pytest.raises(PassError, match=needle):
        _prune(traced[name], text)
