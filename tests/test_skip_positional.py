"""skip_layers:mode=positional (SkipDecode on a KV-cached decoder): structure (an If per skippable
block, the count input), numerics (count 0 is the cached graph exactly; skipping s blocks from
block ``first`` equals the statically skipped model fed the full model's cache of the other
blocks, step after step), counts, the runtime's bookkeeping (Stepper against a plain loop of
Session.run calls, per-layer lengths, padding, run-time schedules, the torch target) and the
cases that must fail with a clear error."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

import optimizer
import runtime
from models import registry
from models.reference import llama
from optimizer import trace
from optimizer.pipeline import PassContext, instantiate, run_pipeline
from optimizer.progress import Progress
from optimizer.specs import PassSpec
from optimizer.structure import build_map
from optimizer.trace_cache import cached_trace
from passes.skip_layers_rewrite import apply_skip, units_of
from runtime.errors import FeedError, PassError
from runtime.generate import generate
from runtime.kv_policies import make_policy
from runtime.kv import KVCache, KVLayout
from runtime.kv_skip import COUNT, SkipSchedule
from runtime.kv_step import Stepper

LAYERS = 4
AXES = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
CACHE = PassSpec("kv_cache", {"layer_masks": True})


def _positional(**options) -> PassSpec:
    return PassSpec("skip_layers", {"mode": "positional", **options})


@pytest.fixture(scope="module")
def plain() -> bytes:
    """A 4-layer reference Llama whose predictions are not just its input token (norm gain 0.1)."""
    module = llama.build(llama.LlamaConfig(num_layers=LAYERS, seed=5))
    with torch.no_grad():
        module.norm.weight.mul_(0.1)
    model = trace(module, registry.get("tiny-llama").example_inputs(2, 12), AXES, output_names=["logits"])
    return ir.to_proto(model).SerializeToString()


def _model(proto: bytes) -> ir.Model:
    return ir.from_proto(onnx.load_from_string(proto))


def _run(proto: bytes, specs: list[PassSpec]) -> tuple[ir.Model, list]:
    return run_pipeline(_model(proto), specs, PassContext())


def _session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


def _feeds(ids: np.ndarray, past: dict, layers: int, start: int) -> dict:
    """One step's feeds for a single unpadded sequence: per-layer masks as long as each layer's cache."""
    feeds = {"input_ids": ids, "position_ids": np.arange(start, start + ids.shape[1])[None], **past}
    for i in range(layers):
        held = past[f"past_key_values.{i}.key"].shape[2]
        feeds[f"attention_mask.{i}"] = np.ones((1, held + ids.shape[1]), np.int64)
    return feeds


def _empty(layers: int) -> dict:
    return {f"past_key_values.{i}.{k}": np.zeros((1, 2, 0, 16), np.float32) for i in range(layers) for k in ("key", "value")}


def _step(session: ort.InferenceSession, feeds: dict) -> tuple[np.ndarray, dict]:
    names = [o.name for o in session.get_outputs()]
    outs = dict(zip(names, session.run(None, feeds)))
    past = {n.replace("present", "past_key_values"): v for n, v in outs.items() if n.startswith("present")}
    return outs["logits"], past


TOKENS = np.array([[3, 17, 92, 41, 8, 120, 77, 5, 60, 33, 14, 250]], np.int64)


def test_structure_and_counts(plain):
    cached, _ = _run(plain, [CACHE])
    model, records = _run(plain, [CACHE, _positional(max=3)])
    ifs = [n for n in model.graph if n.op_type == "If"]
    assert [n.name for n in ifs] == [f"skip_layers_if_{i}" for i in range(3)]
    count = next(v for v in model.graph.inputs if v.name == COUNT)
    assert count.dtype == ir.DataType.INT64 and count.shape is not None and count.shape.rank() == 0
    # the three lower blocks' matmuls moved into their branches; the top block's stay outside
    top = lambda m: sum(n.op_type == "MatMul" for n in m.graph)  # noqa: E731
    per_block = (top(cached) - 1) // LAYERS  # minus the head
    assert top(model) == per_block + 1
    for node in ifs:
        branches = {a.name: a.value for a in node.attributes.values()}
        assert sum(n.op_type == "MatMul" for n in branches["else_branch"]) == per_block
        assert [n.op_type for n in branches["then_branch"]] == ["Identity"] * 3
    record = records[-1]
    assert record.sites == 3 and record.details["mode"] == "positional"
    assert record.details["schedule"] == {"min": 0, "max": 3, "start": 0, "end": 512, "first": 0}
    assert [layer["index"] for layer in record.details["layers"]] == [0, 1, 2]


def test_count_zero_is_the_cached_graph_exactly(plain):
    cached = _session(_run(plain, [CACHE])[0])
    skipping = _session(_run(plain, [CACHE, _positional(max=3)])[0])
    past_a = past_b = _empty(LAYERS)
    for start, end in ((0, 8), (8, 9), (9, 10), (10, 12)):
        ids = TOKENS[:, start:end]
        logits_a, past_a = _step(cached, _feeds(ids, past_a, LAYERS, start))
        logits_b, past_b = _step(skipping, {**_feeds(ids, past_b, LAYERS, start), COUNT: np.array(0)})
        np.testing.assert_array_equal(logits_a, logits_b)
        for name in past_a:
            np.testing.assert_array_equal(past_a[name], past_b[name])


@pytest.mark.parametrize("first, skip", [(0, 1), (0, 3), (1, 2)])
def test_constant_skip_equals_static_skip_fed_the_other_cache(plain, first, skip):
    """Decode steps that skip ``skip`` blocks from ``first`` compute what the model without those
    blocks computes when its cache holds the full model's other layers of the prompt."""
    full = _session(_run(plain, [CACHE])[0])
    skipping = _session(_run(plain, [CACHE, _positional(max=3 - first, first=first)])[0])
    static = _model(plain)
    dropped = range(first, first + skip)
    apply_skip(static, units_of(build_map(static), False), tuple(dropped))
    reference = _session(run_pipeline(static, [CACHE], PassContext())[0])
    prompt = 8
    _, past = _step(full, _feeds(TOKENS[:, :prompt], _empty(LAYERS), LAYERS, 0))
    layer = lambda name: int(name.split(".")[1])  # noqa: E731
    lower = {n: v for n, v in past.items() if layer(n) in dropped}
    kept = [i for i in range(LAYERS) if i not in dropped]  # the reference's layer j is layer kept[j]
    ref_past = {f"past_key_values.{kept.index(layer(n))}.{n.split('.')[2]}": v
                for n, v in past.items() if layer(n) not in dropped}
    for t in range(prompt, TOKENS.shape[1]):
        ids = TOKENS[:, t:t + 1]
        logits, past = _step(skipping, {**_feeds(ids, past, LAYERS, t), COUNT: np.array(skip)})
        ref_logits, ref_past = _step(reference, _feeds(ids, ref_past, LAYERS - skip, t))
        np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-5)
        assert np.abs(logits).max() > 0.1  # not a degenerate comparison
    for name, value in lower.items():  # the skipped layers' caches never grew
        np.testing.assert_array_equal(past[name], value)
    assert past[f"past_key_values.{first + skip}.key"].shape[2] == TOKENS.shape[1]


@pytest.fixture(scope="module")
def artifacts(plain, tmp_path_factory):
    root = tmp_path_factory.mktemp("positional")
    path = root / "plain.onnx"
    path.write_bytes(plain)
    make = lambda name, *specs: optimizer.optimize(str(path), passes=list(specs), output=root / name)  # noqa: E731
    return {"cached": make("cached", "kv_cache:layer_masks=true"),
            "ramp": make("ramp", "kv_cache:layer_masks=true", "skip_layers:mode=positional,min=1,max=3,start=6,end=10"),
            "constant": make("constant", "kv_cache:layer_masks=true", "skip_layers:mode=positional,min=2,max=2"),
            "middle": make("middle", "kv_cache:layer_masks=true", "skip_layers:mode=positional,min=1,max=2,first=1,start=7,end=9")}


def _loop(session, tokens: np.ndarray, prompt: int, schedule: SkipSchedule) -> tuple[list[np.ndarray], list[int]]:
    """Teacher-forced decoding with plain Session.run calls and numpy concatenation (what Stepper
    must match): each step's logits and the layers' final cache lengths."""
    past, steps = _empty(LAYERS), []
    for start, end in [(0, prompt)] + [(t, t + 1) for t in range(prompt, tokens.shape[1])]:
        count = 0 if start == 0 else schedule.count(start)  # the graph knows first
        outs = session.run({**_feeds(tokens[:, start:end], past, LAYERS, start), COUNT: np.array(count)})
        past = {n.replace("present", "past_key_values"): v for n, v in outs.items() if n.startswith("present")}
        steps.append(outs["logits"][:, -1])
    return steps, [past[f"past_key_values.{i}.key"].shape[2] for i in range(LAYERS)]


def _stepped(session, rows: list[np.ndarray], prompt_lengths: list[int], steps: int,
             skip: SkipSchedule | None = None) -> tuple[list[np.ndarray], KVCache]:
    """Stepper over left-padded rows (prompt, then one teacher-forced token per step): each step's logits."""
    width = max(prompt_lengths)
    ids = np.zeros((len(rows), width + steps), np.int64)
    mask = np.zeros_like(ids)
    for r, (row, n) in enumerate(zip(rows, prompt_lengths)):
        ids[r, width - n:] = row[:n + steps]
        mask[r, width - n:] = 1
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    cache = KVCache(KVLayout.of(session.inputs), len(rows), width + steps)
    step = Stepper(session, cache, skip)
    out = []
    for start, end in [(0, width)] + [(t, t + 1) for t in range(width, width + steps)]:
        logits, _ = step(ids[:, start:end], mask[:, :end], positions[:, start:end])
        out.append(logits[:, -1])
    return out, cache


def test_stepper_follows_the_schedule(artifacts):
    art = artifacts["ramp"]
    schedule = SkipSchedule.of(art.manifest)
    assert schedule == SkipSchedule(1, 3, 6, 10)
    assert [schedule.count(p) for p in (0, 6, 7, 8, 9, 10, 50)] == [1, 1, 1, 2, 2, 3, 3]
    session = runtime.load(art.path)
    expected, lengths = _loop(session, TOKENS, 5, schedule)
    got, cache = _stepped(session, [TOKENS[0]], [5], TOKENS.shape[1] - 5)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    # decode steps at positions 5..11: layer 0 skips all 7, layer 1 from position 8, layer 2 from 10
    assert cache.lengths == lengths == [5, 5 + 3, 5 + 5, 12]
    unskipped, _ = _loop(session, TOKENS, 5, SkipSchedule(0, 0, 0, 0))
    assert np.abs(unskipped[-1] - got[-1]).max() > 1e-3  # skipping changed the logits


def test_stepper_skips_from_first(artifacts):
    art = artifacts["middle"]
    schedule = SkipSchedule.of(art.manifest)
    assert schedule == SkipSchedule(1, 2, 7, 9, first=1)
    session = runtime.load(art.path)
    expected, lengths = _loop(session, TOKENS, 5, schedule)
    got, cache = _stepped(session, [TOKENS[0]], [5], TOKENS.shape[1] - 5)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    # decode steps at positions 5..11: block 1 skips all 7, block 2 from position 9; blocks 0 and 3 never
    assert cache.lengths == lengths == [12, 5, 9, 12]


def test_padded_batch_equals_each_prompt_alone(artifacts):
    """With a constant count every row skips alike, so left padding must change nothing: each
    layer's mask keeps the padding masked."""
    session = runtime.load(artifacts["constant"].path)
    rows, lengths = [TOKENS[0], TOKENS[0, 2:]], [3, 6]
    together, _ = _stepped(session, rows, lengths, 4)
    for r, (row, n) in enumerate(zip(rows, lengths)):
        alone, _ = _stepped(session, [row], [n], 4)
        for a, b in zip(alone, together):
            np.testing.assert_allclose(b[r], a[0], rtol=0, atol=1e-5)


def test_batch_shares_one_count(artifacts):
    """The count follows the batch's furthest position: the long prompt's logits are as if alone."""
    session = runtime.load(artifacts["ramp"].path)
    rows, lengths = [TOKENS[0, 4:], TOKENS[0]], [3, 7]
    together, _ = _stepped(session, rows, lengths, 4)
    alone, _ = _stepped(session, [rows[1]], [7], 4)
    for a, b in zip(alone, together):
        np.testing.assert_allclose(b[1], a[0], rtol=0, atol=1e-5)


def test_run_time_schedule(artifacts):
    """Another schedule may replace the recorded one; none at all reproduces the cached artifact."""
    cached, ramp = runtime.load(artifacts["cached"].path), runtime.load(artifacts["ramp"].path)
    full, _ = _stepped(cached, [TOKENS[0]], [5], 4)
    unskipped, cache = _stepped(ramp, [TOKENS[0]], [5], 4, SkipSchedule(0, 0, 0, 0))
    for a, b in zip(full, unskipped):
        np.testing.assert_array_equal(a, b)
    assert cache.lengths == [9] * LAYERS
    with pytest.raises(FeedError, match="skips up to 4 blocks but this artifact can bypass 3"):
        _stepped(ramp, [TOKENS[0]], [5], 1, SkipSchedule(4, 4, 0, 0))
    with pytest.raises(FeedError, match="give first=0"):
        _stepped(ramp, [TOKENS[0]], [5], 1, SkipSchedule(1, 1, 0, 0, first=1))
    with pytest.raises(FeedError, match="can bypass 0"):
        _stepped(cached, [TOKENS[0]], [5], 1, SkipSchedule(1, 1, 0, 0))


def test_torch_target_runs_it_too(plain, artifacts, tmp_path):
    """The If branches lower to torch submodules; the torch backend follows the same schedule."""
    path = tmp_path / "plain.onnx"
    path.write_bytes(plain)
    art = optimizer.optimize(str(path), passes=["kv_cache:layer_masks=true",
                                                 "skip_layers:mode=positional,min=1,max=3,start=6,end=10"],
                             target="torch", output=tmp_path / "torch")
    expected, ort_cache = _stepped(runtime.load(artifacts["ramp"].path), [TOKENS[0]], [5], 7)
    got, cache = _stepped(runtime.load(art.path), [TOKENS[0]], [5], 7)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4)
    assert cache.lengths == ort_cache.lengths == [5, 8, 10, 12]


def test_generate_runs_the_schedule(artifacts):
    session = runtime.load(artifacts["ramp"].path)
    result = generate(session, [TOKENS[0, :5].tolist(), TOKENS[0, :3].tolist()], max_new_tokens=6)
    assert [len(t) for t in result.tokens] == [6, 6]


def test_plain_run_computes_every_layer(artifacts):
    cached, ramp = runtime.load(artifacts["cached"].path), runtime.load(artifacts["ramp"].path)
    feeds = {"input_ids": TOKENS[:, :9]}
    np.testing.assert_array_equal(cached.run(feeds)["logits"], ramp.run(feeds)["logits"])


def test_eviction_does_not_combine(artifacts):
    session = runtime.load(artifacts["ramp"].path)
    with pytest.raises(FeedError, match="eviction does not combine with positional"):
        generate(session, [TOKENS[0].tolist()], max_new_tokens=4, policy=make_policy("window:size=8"))


@pytest.mark.parametrize("options, message", [
    ({"max": 2, "min": 3}, "must not decrease"),
    ({"max": 2, "start": 9, "end": 4}, "start <= end"),
    ({"max": 2, "count": 1}, "drop count"),
    ({"max": 2, "sub": True}, "drop sub"),
    ({}, "needs max=N"),
    ({"max": 2, "first": -1}, "first must be >= 0"),
])
def test_option_errors(options, message):
    with pytest.raises(PassError, match=message):
        instantiate([_positional(**options)])


def test_schedule_options_need_positional_mode():
    with pytest.raises(PassError, match="add mode=positional"):
        instantiate([PassSpec("skip_layers", {"count": 1, "max": 2})])
    with pytest.raises(PassError, match="add mode=positional"):
        instantiate([PassSpec("skip_layers", {"count": 1, "first": 2})])


def test_refusals(plain):
    with pytest.raises(PassError, match="max=4 would skip every block .* which has 4"):
        _run(plain, [CACHE, _positional(max=4)])
    with pytest.raises(PassError, match="first=2 with max=3 reaches past the last block"):
        _run(plain, [CACHE, _positional(max=3, first=2)])
    with pytest.raises(PassError, match="needs a decoder with a KV cache"):
        _run(plain, [_positional(max=1)])
    with pytest.raises(PassError, match="one attention mask per layer"):
        _run(plain, [PassSpec("kv_cache"), _positional(max=1)])
    with pytest.raises(PassError, match="kv_cache:scores=true"):
        _run(plain, [PassSpec("kv_cache", {"layer_masks": True, "scores": True}), _positional(max=1)])
    with pytest.raises(PassError, match="apply mode=positional once"):
        _run(plain, [CACHE, _positional(max=1), _positional(max=1)])


def test_refuses_an_encoder():
    bert = ir.from_proto(ir.to_proto(cached_trace(registry.get("tiny-bert"), Progress())))
    with pytest.raises(PassError, match="an encoder has none"):
        run_pipeline(bert, [_positional(max=1)], PassContext())


def test_max_zero_leaves_the_model_untouched(plain):
    model, records = _run(plain, [CACHE, _positional(max=0)])
    assert records[-1].sites == 0 and COUNT not in {v.name for v in model.graph.inputs}
