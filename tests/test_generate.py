"""The generation runtime: cached greedy equals recomputation, sampling, stops, eviction, prefix reuse, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

import optimizer
import runtime
from optimizer.cli import main
from runtime.errors import FeedError
from runtime.generate import generate
from runtime.kv_policies import make_policy
from runtime.prefix import PrefixCache
from runtime.sampling import Sampler
from runtime.text import Text


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    plain = optimizer.optimize("tiny-llama", passes=["cleanup"], output=root / "plain")
    cached = optimizer.optimize("tiny-llama", passes=["kv_cache:scores=true"], output=root / "cached")
    return runtime.load(plain.path), runtime.load(cached.path), cached.path


def _recompute(session, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        ids = np.array([seq])
        logits = session.run({"input_ids": ids, "attention_mask": np.ones_like(ids)})["logits"]
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


PROMPTS = [[1, 40, 41, 42, 43, 44, 45], [1, 90, 91], [1, 120, 7, 9, 200]]


def test_cached_greedy_equals_recomputation(arts):
    plain, cached, _ = arts
    for prompt in PROMPTS:
        assert generate(cached, [prompt], max_new_tokens=12).tokens[0] == _recompute(plain, prompt, 12)


def test_batched_prompts_with_padding_equal_single_ones(arts):
    _, cached, _ = arts
    batch = generate(cached, PROMPTS, max_new_tokens=8)
    for prompt, tokens in zip(PROMPTS, batch.tokens):
        assert tokens == generate(cached, [prompt], max_new_tokens=8).tokens[0]
    assert batch.new_tokens == 24 and batch.ttft_s > 0 and batch.tokens_per_s > 0


def test_prefill_only_feeds_run_a_cached_artifact(arts):
    plain, cached, _ = arts
    ids = np.array([PROMPTS[0]])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    np.testing.assert_array_equal(cached.run(feeds)["logits"], plain.run(feeds)["logits"])


def test_sampling_is_seeded_and_truncates():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = [Sampler(temperature=1.0, seed=3)(logits)[0] for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same draw
    top1 = Sampler(temperature=1.0, top_k=1, seed=0)
    assert all(top1(logits)[0] == 0 for _ in range(20))
    nucleus = Sampler(temperature=1.0, top_p=0.6, seed=0)
    assert {int(nucleus(logits)[0]) for _ in range(200)} == {0, 1}
    eta = Sampler(temperature=1.0, eta=0.1, seed=0)
    assert 3 not in {int(eta(logits)[0]) for _ in range(200)}
    with pytest.raises(FeedError, match="top_p"):
        Sampler(top_p=0)


def test_stop_tokens_and_streaming(arts):
    _, cached, _ = arts
    first = generate(cached, [PROMPTS[0]], max_new_tokens=6).tokens[0]
    seen = []
    stop = first[-1]
    out = generate(cached, [PROMPTS[0]], max_new_tokens=6, stop_tokens=[stop],
                   callback=lambda step, toks: seen.append(int(toks[0])))
    expected = first[:first.index(stop) + 1]  # up to and including the first stop token
    assert out.tokens[0] == expected and seen == expected


@pytest.mark.parametrize("spec", ["window:size=6", "sinks:size=6,sinks=2", "heavy:size=8,sinks=2,recent=2"])
def test_policies_bound_the_cache(arts, spec):
    _, cached, _ = arts
    policy = make_policy(spec)
    out = generate(cached, [PROMPTS[0]], max_new_tokens=12, policy=policy)
    assert len(out.tokens[0]) == 12
    assert out.kv_bytes <= policy.size * cached_layout_bytes(cached)
    assert policy.evicted_tokens > 0 and "evicted" in out.notes[0]


def cached_layout_bytes(session) -> int:
    from runtime.kv import KVLayout

    return KVLayout.of(session.inputs).bytes_per_token()


def test_policy_errors(arts):
    _, cached, _ = arts
    with pytest.raises(FeedError, match="unknown KV policy"):
        make_policy("lru:size=4")
    with pytest.raises(FeedError, match="needs size"):
        make_policy("window")
    with pytest.raises(FeedError, match="one sequence at a time"):
        generate(cached, PROMPTS[:2], max_new_tokens=8, policy=make_policy("window:size=4"))


def test_prefix_cache_reuses_blocks_and_keeps_tokens(arts):
    _, cached, _ = arts
    shared = list(range(10, 50))
    cache = PrefixCache(block=8)
    generate(cached, [shared + [7, 8]], max_new_tokens=4, prefix_cache=cache)
    second = generate(cached, [shared + [9]], max_new_tokens=4, prefix_cache=cache)
    assert second.reused_prefix == 40 and cache.hits == 1
    assert second.tokens == generate(cached, [shared + [9]], max_new_tokens=4).tokens


def test_static_cache_generates_the_same_tokens(arts, tmp_path):
    _, cached, _ = arts
    static = runtime.load(optimizer.optimize("tiny-llama", passes=["kv_cache:static=32"], output=tmp_path / "s").path)
    assert generate(static, PROMPTS, max_new_tokens=10).tokens == generate(cached, PROMPTS, max_new_tokens=10).tokens
    with pytest.raises(FeedError, match="cache holds 32"):
        generate(static, [PROMPTS[0]], max_new_tokens=40)
    with pytest.raises(FeedError, match="needs a cache that grows"):
        generate(static, [PROMPTS[0]], max_new_tokens=30, policy=make_policy("window:size=8"))


def test_int8_cache_generates_and_reuses_prefixes(arts, tmp_path):
    _, cached, _ = arts
    int8 = runtime.load(optimizer.optimize("tiny-llama", passes=["kv_cache:kv=int8"], output=tmp_path / "q").path)
    out = generate(int8, [PROMPTS[0]], max_new_tokens=10)
    assert out.tokens == generate(cached, [PROMPTS[0]], max_new_tokens=10).tokens
    assert out.kv_bytes * 3 < generate(cached, [PROMPTS[0]], max_new_tokens=10).kv_bytes
    cache = PrefixCache(block=4)
    generate(int8, [PROMPTS[0] + [5]], max_new_tokens=3, prefix_cache=cache)
    again = generate(int8, [PROMPTS[0] + [6]], max_new_tokens=3, prefix_cache=cache)
    assert again.reused_prefix == 4 and again.tokens == generate(int8, [PROMPTS[0] + [6]], max_new_tokens=3).tokens
    policy = make_policy("window:size=6")
    assert len(generate(int8, [PROMPTS[0]], max_new_tokens=12, policy=policy).tokens[0]) == 12


def test_prompt_longer_than_the_cache(arts):
    _, cached, _ = arts
    with pytest.raises(FeedError, match="cache holds 4"):
        generate(cached, [PROMPTS[0]], max_new_tokens=4, capacity=4)


def test_text_and_chat_template(arts):
    _, _, path = arts
    text = Text(path)
    ids = text.encode("hello")
    assert text.decode(ids) == "hello"
    from models import registry

    messages = [{"role": "user", "content": "hi"}]
    expected = registry.get("tiny-llama").tokenizer().apply_chat_template(messages, add_generation_prompt=True,
                                                                          tokenize=True, return_dict=False)
    assert text.chat("hi") == list(expected)  # the same ids as transformers' apply_chat_template
    assert text.stop_tokens() == [2]


def test_cli_generate(arts, capsys):
    _, _, path = arts
    assert main(["generate", str(path), "--prompt", "Once", "--max-new-tokens", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["new_tokens"] <= 5 and "text" in report and report["ttft_ms"] > 0
    assert main(["generate", str(path), "--ids", "1,40,41", "--max-new-tokens", "3", "--ignore-eos"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "3"], "give the prompt with --prompt"),
    (["--ids", "1,x"], "--ids takes integers"),
    (["--prompt", "a", "--kv-policy", "window:size=x"], "is not one of size=N"),
])
def test_cli_generate_errors(arts, capsys, argv, message):
    _, _, path = arts
    assert main(["generate", str(path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_generate_needs_a_cache(arts, capsys):
    plain, _, _ = arts
    assert main(["generate", str(plain.path), "--ids", "1,2"]) == 2
    assert "--passes kv_cache" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_cached_greedy_equals_hugging_face(tmp_path):
    import torch

    from models.smollm2 import load_causal_lm

    art = optimizer.optimize("smollm2-135m", passes=["kv_cache"], output=tmp_path / "llm")
    session, text = runtime.load(art.path), Text(art.path)
    lm = load_causal_lm()
    for prompt in ("The capital of France is", "def fibonacci(n):"):
        ids = text.encode(prompt)
        ours = generate(session, [ids], max_new_tokens=16).tokens[0]
        with torch.no_grad():
            ref = lm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=16, min_new_tokens=16, pad_token_id=2)
        assert ours == ref[0, len(ids):].tolist()


@pytest.mark.parametrize("spec", ["pyramid:size=12,sinks=1,recent=2", "adaptive:size=8,sinks=1,recent=2"])
def test_per_layer_budgets(tmp_path, spec):
    art = optimizer.optimize("tiny-llama", passes=["kv_cache:scores=true,layer_masks=true"], output=tmp_path / "l")
    session = runtime.load(art.path)
    plain = optimizer.optimize("tiny-llama", passes=["kv_cache"], output=tmp_path / "p")
    assert generate(session, PROMPTS, max_new_tokens=6).tokens == generate(runtime.load(plain.path), PROMPTS,
                                                                             max_new_tokens=6).tokens
    policy = make_policy(spec)
    out = generate(session, [PROMPTS[0]], max_new_tokens=20, policy=policy)
    assert len(out.tokens[0]) == 20 and policy.evicted_tokens > 0
    if spec.startswith("pyramid"):
        budgets = policy.budgets(2)
        assert budgets[0] > budgets[1] and budgets.sum() == 24


def test_per_layer_budgets_need_layer_masks(arts):
    _, cached, _ = arts
    with pytest.raises(FeedError, match="layer_masks=true"):
        generate(cached, [PROMPTS[0]], max_new_tokens=20, policy=make_policy("pyramid:size=8,sinks=1,recent=2"))
