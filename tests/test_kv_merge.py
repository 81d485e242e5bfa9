"""MiniCache merging of adjacent layers' KV: the math, the live-cache policy, merged prefix entries, eval.

Numerics: identical layers merge losslessly, threshold 0 changes nothing (generation equal to the
plain cache's, bit for bit), angles and SLERP as defined. Counts: merged and retained vectors for
known angles. Structure: the bytes of the merged representation, in the policy's accounting and
in the prefix cache's stored arrays. Negatives: a start past the last pair, a one-layer model, bad
thresholds and options, an int8 cache in the merged prefix cache.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import optimizer
import runtime
from optimizer.cli import main
from optimizer.eval_kv import format_policies
from runtime.errors import FeedError
from runtime.generate import generate
from runtime.kv import Kind, KVCache, KVLayout
from runtime.kv_merge import MergedLayers, MergeSpec, angles, merge_pair, merged_bytes, slerp
from runtime.kv_policies import MiniCache, make_policy
from runtime.prefix import PrefixCache

PROMPT = [1, 40, 41, 42, 43, 44, 45, 46, 47, 48]
SHARED = list(range(10, 50))


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    cached = optimizer.optimize("tiny-llama", passes=["kv_cache"], output=root / "cached")
    int8 = optimizer.optimize("tiny-llama", passes=["kv_cache:kv=int8"], output=root / "int8")
    return runtime.load(cached.path), runtime.load(int8.path), cached.path


def _rotated_pairs(degrees: list[float], width: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """[1, 1, n, width] vectors a (norm 2) and b (norm 3) whose angle per token is ``degrees``."""
    theta = np.radians(np.asarray(degrees, np.float64))
    a = np.zeros((1, 1, len(degrees), width))
    b = np.zeros_like(a)
    a[..., 0] = 2.0
    b[..., 0], b[..., 1] = 3.0 * np.cos(theta), 3.0 * np.sin(theta)
    return a.astype(np.float32), b.astype(np.float32)


def test_angles_and_slerp():
    a, b = _rotated_pairs([0, 30, 90, 150])
    np.testing.assert_allclose(angles(a, b)[0, 0], [0, 30, 90, 150], atol=1e-3)
    unit_a, unit_b = a / 2, b / 3
    half = slerp(unit_a, unit_b, 0.5)
    expected = (unit_a + unit_b) / np.linalg.norm(unit_a + unit_b, axis=-1, keepdims=True)
    np.testing.assert_allclose(half, expected, atol=1e-6)  # SLERP at 0.5 is the bisector
    np.testing.assert_allclose(angles(half, a)[0, 0], [0, 15, 45, 75], atol=1e-3)
    np.testing.assert_allclose(slerp(unit_a, unit_b, 0.0), unit_a, atol=1e-6)
    np.testing.assert_allclose(slerp(unit_a, unit_b, 1.0), unit_b, atol=1e-6)
    assert angles(np.zeros((1, 4)), np.ones((1, 4)))[0] == 90  # a zero vector has no direction


def test_identical_layers_merge_losslessly():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 3, 20, 16)).astype(np.float32)
    merged = merge_pair(a, a.copy(), MergeSpec(threshold=1))
    assert len(merged.retained) == 0 and merged.merged == 2 * 3 * 20
    for rebuilt in merged.reconstruct():
        np.testing.assert_allclose(rebuilt, a, rtol=1e-5, atol=1e-6)


def test_threshold_zero_keeps_every_vector_exactly():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 1, 2, 5, 8)).astype(np.float32)
    merged = merge_pair(a, a.copy(), MergeSpec(threshold=0))  # even parallel pairs stay unmerged
    assert merged.merged == 0
    merged = merge_pair(a, b, MergeSpec(threshold=0))
    rebuilt_a, rebuilt_b = merged.reconstruct()
    np.testing.assert_array_equal(rebuilt_a, a)
    np.testing.assert_array_equal(rebuilt_b, b)


def test_counts_and_reconstruction_for_known_angles():
    a, b = _rotated_pairs([5, 20, 29, 31, 60, 120])
    merged = merge_pair(a, b, MergeSpec(threshold=30))
    assert merged.merged == 3 and merged.retained.tolist() == [3, 4, 5]
    rebuilt_a, rebuilt_b = merged.reconstruct()
    np.testing.assert_allclose(np.linalg.norm(rebuilt_a, axis=-1), 2.0, rtol=1e-6)  # each layer keeps its norm
    np.testing.assert_allclose(np.linalg.norm(rebuilt_b, axis=-1), 3.0, rtol=1e-6)
    np.testing.assert_allclose(angles(rebuilt_a, a)[0, 0, :3], [2.5, 10, 14.5], atol=1e-3)  # half the angle
    np.testing.assert_array_equal(rebuilt_b[0, 0, 3:], b[0, 0, 3:])  # retained pairs as they were
    assert merged.merged_mask[0, 0].tolist() == [True, True, True, False, False, False]
    opposite = merge_pair(a, -a, MergeSpec(threshold=180))  # 180 degrees: no direction between them, kept
    assert opposite.merged == 0 and np.array_equal(opposite.reconstruct()[1], -a)


def test_merged_bytes_match_the_stored_arrays():
    a, b = _rotated_pairs([5, 20, 29, 31, 60, 120])
    merged = merge_pair(a, b, MergeSpec(threshold=30))
    assert merged.nbytes == merged_bytes(6, 3, 8 * 4) == 6 * (32 + 8) + 3 * (32 + 4)
    layers = [(a, b), (b, a), (a, a), (b, a), (a, b)]  # layers 0, 1 and 4 stay whole, (2, 3) merge
    stored = MergedLayers(layers, MergeSpec(start=2, threshold=30))
    assert stored.pairs == [(2, 3)] and stored.counts == (3 + 6, 3)  # keys a/b merge 3 of 6, values a/a all
    whole = 3 * 2 * a.nbytes
    assert stored.nbytes == whole + merged_bytes(6, 3, 32) + merged_bytes(6, 0, 32)
    restored = stored.restore()
    for layer in (0, 1, 4):
        assert all(np.array_equal(g, w) for g, w in zip(restored[layer], layers[layer]))
    for layer in (2, 3):
        np.testing.assert_allclose(restored[layer][1], a, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(restored[3][0][0, 0, 3:], b[0, 0, 3:])


def test_default_pairs_start_in_the_middle():
    assert MergeSpec().pairs(30) == [(i, i + 1) for i in range(15, 29, 2)]  # layer 29 stays whole
    assert MergeSpec().pairs(2) == [(0, 1)]
    assert MergeSpec(start=3).pairs(6) == [(3, 4)]


def test_threshold_zero_policy_generates_exactly_the_plain_tokens(arts):
    cached, int8, _ = arts
    for session in (cached, int8):
        policy = make_policy("minicache:threshold=0,window=2")
        out = generate(session, [PROMPT], max_new_tokens=12, policy=policy)
        assert out.tokens == generate(session, [PROMPT], max_new_tokens=12).tokens
        assert policy.vectors > 0 and policy.retained == policy.vectors  # looked at every pair, merged none


def test_policy_merges_old_tokens_and_reports_bytes(arts):
    cached, _, _ = arts
    policy = make_policy("minicache:threshold=180,window=4")
    out = generate(cached, [PROMPT], max_new_tokens=8, policy=policy)
    total = len(PROMPT) + 8 - 1  # tokens cached when the last step ran
    merged_tokens = total - 1 - 4  # the last step's tokens older than the window, before it ran
    layout = KVLayout.of(cached.inputs)
    assert policy.vectors == merged_tokens * layout.heads[0] * 2 and policy.retained == 0  # K and V, pair (0, 1)
    vector = layout.kinds[0].width * 4
    assert policy.saved_bytes == policy.vectors * (2 * vector - (vector + 8))
    assert "merged" in out.notes[0] and "retained" in out.notes[0]


def test_policy_on_identical_layers_keeps_the_cache():
    layout = KVLayout([2, 2], [Kind("key", 8, np.dtype("float32")), Kind("value", 8, np.dtype("float32"))])
    cache = KVCache(layout, 1, 12)
    rng = np.random.default_rng(2)
    key, value = rng.normal(size=(2, 1, 2, 10, 8)).astype(np.float32)
    cache.load([(key, value), (key.copy(), value.copy())])
    policy = MiniCache(window=3, spec=MergeSpec(threshold=5))
    policy.apply(cache, np.ones((1, 10), np.int64), {})
    assert policy.done == 7 and policy.vectors == 2 * 7 * 2 and policy.retained == 0
    for layer in range(2):
        np.testing.assert_allclose(cache.past(layer, 0), key, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cache.past(layer, 1), value, rtol=1e-5, atol=1e-6)
    assert policy.held_bytes(cache) == cache.nbytes() - 2 * 7 * 2 * (32 - 8)


def test_policy_keeps_sinks_and_the_window_unmerged():
    layout = KVLayout([2, 2], [Kind("key", 8, np.dtype("float32")), Kind("value", 8, np.dtype("float32"))])
    cache = KVCache(layout, 1, 12)
    rng = np.random.default_rng(3)
    layers = [tuple(rng.normal(size=(1, 2, 10, 8)).astype(np.float32) for _ in range(2)) for _ in range(2)]
    cache.load(layers)
    policy = make_policy("minicache:threshold=180,window=3,sinks=2")
    policy.apply(cache, np.ones((1, 10), np.int64), {})
    assert policy.vectors == 2 * (10 - 3 - 2) * 2 and policy.retained == 0
    for layer, kind in np.ndindex(2, 2):
        past, original = cache.past(layer, kind), layers[layer][kind]
        np.testing.assert_array_equal(past[:, :, :2], original[:, :, :2])  # sinks
        np.testing.assert_array_equal(past[:, :, 7:], original[:, :, 7:])  # window
        assert not np.allclose(past[:, :, 2:7], original[:, :, 2:7])


def test_merged_prefix_cache_stores_fewer_bytes(arts):
    cached, _, _ = arts
    plain, merged = PrefixCache(block=8), PrefixCache(block=8, merge=MergeSpec(threshold=180))
    exact = PrefixCache(block=8, merge=MergeSpec(threshold=0))
    for store in (plain, merged, exact):
        generate(cached, [SHARED + [7, 8]], max_new_tokens=2, prefix_cache=store)
    fresh = generate(cached, [SHARED + [9]], max_new_tokens=4).tokens
    assert generate(cached, [SHARED + [9]], max_new_tokens=4, prefix_cache=exact).tokens == fresh
    again = generate(cached, [SHARED + [9]], max_new_tokens=4, prefix_cache=merged)
    assert again.reused_prefix == 40 and len(again.tokens[0]) == 4
    vectors = 2 * 40  # kv_heads x stored tokens, per layer
    assert plain.nbytes() == 2 * 2 * vectors * 16 * 4  # two layers, K and V, head_dim 16
    assert merged.nbytes() == 2 * merged_bytes(vectors, 0, 16 * 4)  # one merged pair, K and V
    assert merged.nbytes() < 0.6 * plain.nbytes()


def test_cli_eval_reports_a_minicache_row(arts, capsys):
    _, _, path = arts
    spec = "minicache:threshold=180,window=8"
    assert main(["eval", str(path), "--kv-policies", f"window:size=16;{spec}", "--kv-tokens", "48", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    full, window, merged = result["rows"]
    assert merged["policy"] == spec and merged["kv_bytes"] < full["kv_bytes"] and 0 < merged["token_agreement"] <= 1
    vector = 16 * 4
    vectors = (48 - 1 - 1 - 8) * 2 * 2  # tokens merged before the last step, 2 heads, K and V
    assert merged["kv_bytes"] == full["kv_bytes"] - vectors * (2 * vector - (vector + 8))
    assert "KV policy minicache" in format_policies(result)


@pytest.mark.parametrize("spec, message", [
    ("minicache:threshold=200", "from 0 to 180"),
    ("minicache:threshold=-1", "from 0 to 180"),
    ("minicache:threshold=wide", "needs a number"),
    ("minicache:t=2", "between 0 and 1"),
    ("minicache:window=0", "window >= 1"),
    ("minicache:sinks=-1", "sinks >= 0"),
    ("minicache:window=2.5", "whole number"),
    ("minicache:size=8", "is not one of from=L"),
])
def test_bad_options(spec, message):
    with pytest.raises(FeedError, match=message):
        make_policy(spec)


def test_refusals(arts):
    cached, int8, _ = arts
    with pytest.raises(FeedError, match="from=1 leaves no pair of layers"):
        generate(cached, [PROMPT], max_new_tokens=4, policy=make_policy("minicache:from=1"))
    one_layer = KVLayout([2], [Kind("key", 8, np.dtype("float32")), Kind("value", 8, np.dtype("float32"))])
    with pytest.raises(FeedError, match="this model has 1 layer"):
        MiniCache().check(one_layer, [])
    with pytest.raises(FeedError, match="need a float KV cache"):
        generate(int8, [SHARED], max_new_tokens=2, prefix_cache=PrefixCache(block=8, merge=MergeSpec()))


@pytest.mark.slow
def test_smollm2_cached_keys_keep_their_pre_rope_angles(tmp_path):
    """RoPE rotates both layers' keys at a position alike, so the cached (post-RoPE) keys of adjacent
    layers are as far apart as the Hugging Face model's k_proj outputs (before RoPE) are; and on
    SmolLM2 they are far apart: the default threshold merges almost nothing."""
    import torch

    from models import data
    from models.smollm2 import load_causal_lm
    from runtime.kv_step import Stepper
    from runtime.text import Text

    art = optimizer.optimize("smollm2-135m", passes=["kv_cache"], output=tmp_path / "llm")
    session = runtime.load(art.path)
    ids = Text(art.path).encode(data.texts("news", "eval", 1)[0])[:128]
    cache = KVCache(KVLayout.of(session.inputs), 1, len(ids))
    tokens = np.asarray([ids], np.int64)
    Stepper(session, cache)(tokens, np.ones_like(tokens), np.arange(len(ids))[None])
    cached = cache.snapshot()
    lm, pre = load_causal_lm(), []
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, i, out: pre.append(out.detach().numpy()))
             for layer in lm.model.layers]
    with torch.no_grad():
        lm(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    pre = [k.reshape(1, len(ids), 3, 64).transpose(0, 2, 1, 3) for k in pre]
    for layer in (3, 15, 28):
        np.testing.assert_allclose(angles(cached[layer][0], cached[layer + 1][0]), angles(pre[layer], pre[layer + 1]),
                                   atol=0.01)
    stored = MergedLayers(cached, MergeSpec())
    merged, retained = stored.counts
    assert merged < 0.01 * (merged + retained)
