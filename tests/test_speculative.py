"""Self-draft and speculative decoding: the draft/ layout and its hash chain, the multi-token
verification step and rollback, exactness against plain greedy decoding, acceptance counts, the
sampling rule's distribution, the UCBSpec bandit, and the refusals (no draft, another vocabulary
or tokenizer, no KV cache, gamma < 1, a batch, two drafts, TensorRT, eviction with --speculative)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

import optimizer
import runtime
from optimizer.cli import main
from runtime.bandit import UCBSpec
from runtime.draft import check_pair, load_draft
from runtime.errors import ArtifactError, FeedError, PassError
from runtime.generate import generate
from runtime.manifest import sha256_file
from runtime.sampling import Sampler
from runtime.speculative import Decoder, _accept_sampled, speculative_generate

PROMPTS = [[1, 40, 41, 42, 43, 44, 45], [1, 90, 91], [1, 120, 7, 9, 200]]
AXES = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}


def _llama(layers: int = 3, vocab: int | None = None):
    """A reference Llama with an untied random head: the tiny model's tied head echoes its input,
    so every draft would agree; this one's greedy text varies and a skipped layer disagrees."""
    import torch

    from models.reference.llama import LlamaConfig, build
    from models.reference.tokenizer import VOCAB_SIZE

    vocab = vocab or VOCAB_SIZE
    model = build(LlamaConfig(num_layers=layers, vocab_size=vocab))
    model.lm_head = torch.nn.Linear(64, vocab, bias=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn(vocab, 64, generator=torch.Generator().manual_seed(7)) * 0.3)
    return model.eval()


def _optimize(model, passes, out):
    import torch

    ids = torch.randint(10, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    return optimizer.optimize(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, passes=passes,
                              output=out, dynamic_axes=AXES, output_names=["logits"])


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    skipped = _optimize(_llama(), ["skip_layers:blocks=1,draft=true", "kv_cache"], root / "skipped")
    same = _optimize(_llama(), ["skip_layers:count=0,draft=true", "kv_cache"], root / "same")
    return {"skipped": skipped.path, "same": same.path, "root": root}


@pytest.fixture(scope="module")
def pair(arts):
    return runtime.load(arts["skipped"]), load_draft(arts["skipped"])


def test_draft_layout_and_records(arts):
    path = arts["skipped"]
    manifest = json.loads((path / "manifest.json").read_text())
    entry = manifest["draft"]
    assert entry["path"] == "draft" and entry["skipped"] == ["layers.1"]
    assert entry["manifest_sha256"] == sha256_file(path / "draft" / "manifest.json")
    assert entry["bytes"] == sum(f.stat().st_size for f in (path / "draft").iterdir())
    assert not any(name.startswith("draft") for name in manifest["files"])  # the draft hashes its own files
    draft = json.loads((path / "draft" / "manifest.json").read_text())
    assert "draft" not in draft
    assert [(p["name"], p["sites"]) for p in manifest["passes"]] == [("skip_layers", 0), ("kv_cache", 3)]
    assert [(p["name"], p["sites"]) for p in draft["passes"]] == [("skip_layers", 1), ("kv_cache", 2)]
    assert manifest["passes"][0]["details"]["draft"] is True and draft["passes"][0]["details"]["draft"] == "applied"
    pasts = lambda m: [i["name"] for i in m["inputs"] if i["name"].startswith("past_key_values")]  # noqa: E731
    assert len(pasts(manifest)) == 6 and len(pasts(draft)) == 4
    assert draft["passes"][1]["nodes_after"] < manifest["passes"][1]["nodes_after"]


def test_draft_hash_chain_is_checked(arts, tmp_path):
    copy = tmp_path / "art"
    shutil.copytree(arts["skipped"], copy)
    draft_manifest = copy / "draft" / "manifest.json"
    original = draft_manifest.read_text()
    draft_manifest.write_text(original.replace('"created"', '"created" ', 1))
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        load_draft(copy)
    draft_manifest.write_text(original)
    (copy / "draft" / "model.onnx").write_bytes(b"truncated")
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        load_draft(copy)
    shutil.rmtree(copy / "draft")
    with pytest.raises(ArtifactError, match="draft is missing"):
        load_draft(copy)


def test_several_new_tokens_after_a_past_equal_step_by_step(pair):
    model, _ = pair
    together, stepped = Decoder(model, 32), Decoder(model, 32)
    prompt, more = PROMPTS[0], [17, 23, 99, 5]
    together.feed(prompt)
    stepped.feed(prompt)
    at_once = together.feed(more)
    one_by_one = np.stack([stepped.feed([t])[0] for t in more])
    np.testing.assert_allclose(at_once, one_by_one, atol=1e-5)


def test_rollback_forgets_exactly_the_rejected_tokens(pair):
    model, draft = pair
    for session in (model, draft):
        rolled, fresh = Decoder(session, 32), Decoder(session, 32)
        rolled.feed(PROMPTS[0] + [17, 23, 99, 5, 6])
        rolled.rollback(len(PROMPTS[0]) + 2)
        assert rolled.length == len(PROMPTS[0]) + 2
        fresh.feed(PROMPTS[0] + [17, 23])
        np.testing.assert_allclose(rolled.feed([77, 78]), fresh.feed([77, 78]), atol=1e-5)


@pytest.mark.parametrize("gamma", [1, 2, 3, 6, "auto"])
def test_greedy_equals_plain_greedy(pair, gamma):
    model, draft = pair
    drafted = accepted = 0
    for prompt in PROMPTS:
        plain = generate(model, [prompt], max_new_tokens=30).tokens[0]
        result = speculative_generate(model, draft, [prompt], max_new_tokens=30, gamma=gamma)
        assert result.tokens[0] == plain
        # every round adds its accepted proposals and one token of the model's own
        assert result.new_tokens == 1 + result.rounds + result.accepted
        drafted, accepted = drafted + result.drafted, accepted + result.accepted
    assert 0 < accepted < drafted  # both acceptance and rollback happened


def test_a_static_cache_rolls_back_by_forgetting_slots(arts):
    art = _optimize(_llama(), ["skip_layers:blocks=1,draft=true", "kv_cache:static=64"], arts["root"] / "static")
    model, draft = runtime.load(art.path), load_draft(art.path)
    for prompt in PROMPTS:
        result = speculative_generate(model, draft, [prompt], max_new_tokens=30, gamma=3)
        assert result.tokens[0] == generate(model, [prompt], max_new_tokens=30).tokens[0]
        assert result.accepted < result.drafted


def test_an_identical_draft_is_always_accepted(arts):
    model, draft = runtime.load(arts["same"]), load_draft(arts["same"])
    assert json.loads((arts["same"] / "manifest.json").read_text())["draft"]["skipped"] == []
    for gamma in (1, 3, 4):
        result = speculative_generate(model, draft, [PROMPTS[1]], max_new_tokens=20, gamma=gamma)
        assert result.tokens[0] == generate(model, [PROMPTS[1]], max_new_tokens=20).tokens[0]
        assert result.rounds == math.ceil(19 / (gamma + 1)) and result.accepted == result.drafted == 19 - result.rounds
        assert result.acceptance_rate == 1.0


def test_stop_tokens_end_mid_round_and_stream(pair):
    model, draft = pair
    plain = generate(model, [PROMPTS[0]], max_new_tokens=20).tokens[0]
    stop = plain[9]
    seen: list[int] = []
    result = speculative_generate(model, draft, [PROMPTS[0]], max_new_tokens=20, gamma=6, stop_tokens=[stop],
                                  callback=lambda step, tokens: seen.append(int(tokens[0])))
    assert result.tokens[0] == plain[:plain.index(stop) + 1] == seen


def test_sampling_rule_keeps_the_model_distribution():
    sampler = Sampler(temperature=1.0, seed=0)
    logits = np.log(np.array([[0.5, 0.2, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]]))
    q = np.array([0.1, 0.6, 0.1, 0.2])  # a draft that favours the wrong token
    counts = np.zeros(4)
    for _ in range(20000):
        proposal = sampler.draw(q)
        kept, last = _accept_sampled(logits, [proposal], [q], sampler)
        counts[proposal if kept else last] += 1
    np.testing.assert_allclose(counts / counts.sum(), [0.5, 0.2, 0.2, 0.1], atol=0.015)


def test_speculative_sampling_is_seeded(pair):
    model, draft = pair
    runs = [speculative_generate(model, draft, [PROMPTS[2]], max_new_tokens=16, gamma=3,
                                 sampler=Sampler(temperature=0.9, top_p=0.95, seed=4)) for _ in range(2)]
    assert runs[0].tokens == runs[1].tokens and runs[0].new_tokens == 16 and runs[0].drafted > 0


def test_ucb_tries_every_arm_then_favours_the_best():
    bandit = UCBSpec((0, 1, 2, 3, 4, 6))
    speed = {0: 45.0, 1: 40.0, 2: 55.0, 3: 70.0, 4: 60.0, 6: 35.0}
    first = []
    for t in range(300):
        arm = bandit.choose()
        if t < 6:
            first.append(arm)
        bandit.record(arm, speed[arm] + (t % 3))  # slightly noisy rewards
    assert first == [0, 1, 2, 3, 4, 6]
    pulls = bandit.describe()["arms"]
    assert max(pulls, key=lambda a: pulls[a]["pulls"]) == "3" and pulls["3"]["pulls"] > 100
    assert bandit.describe()["best"] == 3


def test_a_bandit_carries_over_between_generations(pair):
    bandit = UCBSpec()
    runs = [speculative_generate(*pair, [prompt], max_new_tokens=20, gamma="auto", bandit=bandit) for prompt in PROMPTS]
    assert sum(bandit.pulls.values()) == sum(r.rounds for r in runs)
    assert runs[-1].bandit["arms"]["0"]["pulls"] == bandit.pulls[0]


@pytest.mark.parametrize("arms", [(), (1, 1), (-1, 2), (1.5,)])
def test_bad_arms_are_refused(arms):
    with pytest.raises(FeedError, match="arms"):
        UCBSpec(arms)


@pytest.mark.parametrize("gamma", [0, -1, "x", "2.5"])
def test_gamma_below_one_is_refused(pair, gamma):
    with pytest.raises(FeedError, match="gamma"):
        speculative_generate(*pair, [PROMPTS[0]], gamma=gamma)


def test_a_batch_is_refused(pair):
    with pytest.raises(FeedError, match="exactly one prompt"):
        speculative_generate(*pair, PROMPTS[:2])


def test_no_draft_and_no_cache_are_refused(arts, pair):
    with pytest.raises(ArtifactError, match="no self-draft"):
        load_draft(arts["skipped"] / "draft")
    plain = _optimize(_llama(layers=1), ["cleanup"], arts["root"] / "plain")
    with pytest.raises(FeedError, match="the model has no KV cache"):
        check_pair(runtime.load(plain.path), pair[1])


def test_another_vocabulary_is_refused(arts, pair):
    other = _optimize(_llama(layers=1, vocab=300), ["kv_cache"], arts["root"] / "vocab")
    with pytest.raises(FeedError, match=r"vocabulary \(300 tokens\) differs"):
        speculative_generate(pair[0], runtime.load(other.path), [PROMPTS[0]])


def test_another_tokenizer_is_refused(tmp_path, capsys):
    assert main(["optimize", "tiny-llama", "-o", str(tmp_path / "a"), "--passes", "skip_layers:blocks=1,draft=true",
                 "--passes", "kv_cache"]) == 0
    assert f"self-draft in {tmp_path / 'a' / 'draft'}: skips layers.1" in capsys.readouterr().out
    art = optimizer.artifact.Artifact.open(tmp_path / "a")
    model = runtime.load(art.path)
    assert speculative_generate(model, load_draft(art.path), [PROMPTS[0]], max_new_tokens=4).new_tokens == 4
    # Re-write the draft with another tokenizer, hashes and all, as a consistent artifact would be.
    draft_dir = art.path / "draft"
    (draft_dir / "tokenizer.json").write_text((draft_dir / "tokenizer.json").read_text().replace('"<s>"', '"<S>"', 1))
    manifest = json.loads((draft_dir / "manifest.json").read_text())
    manifest["files"]["tokenizer.json"]["sha256"] = sha256_file(draft_dir / "tokenizer.json")
    (draft_dir / "manifest.json").write_text(json.dumps(manifest))
    main_manifest = json.loads((art.path / "manifest.json").read_text())
    main_manifest["draft"]["manifest_sha256"] = sha256_file(draft_dir / "manifest.json")
    (art.path / "manifest.json").write_text(json.dumps(main_manifest))
    with pytest.raises(FeedError, match="tokenizer differs"):
        speculative_generate(model, load_draft(art.path), [PROMPTS[0]])


@pytest.mark.parametrize("passes, target, message", [
    (["skip_layers:count=1,draft=true", "skip_layers:count=0,draft=true"], "ort-cpu", "both ask for a self-draft"),
    (["skip_layers:count=1,draft=true"], "tensorrt", "ONNX Runtime and torch targets only"),
    (["skip_layers:mode=positional,max=2,draft=true"], "ort-cpu", "static self-draft"),
])
def test_draft_plans_refused_before_tracing(passes, target, message, tmp_path):
    with pytest.raises(PassError, match=message):
        optimizer.optimize("smollm2-135m", passes=passes, target=target, output=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_cli_speculative(arts, capsys):
    ids = ",".join(map(str, PROMPTS[0]))
    assert main(["generate", str(arts["skipped"]), "--ids", ids, "--max-new-tokens", "12", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)["tokens"]
    assert main(["generate", str(arts["skipped"]), "--ids", ids, "--max-new-tokens", "12", "--json",
                 "--speculative=2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == plain and report["speculative"]["gamma"] == "2" and report["speculative"]["rounds"] > 0
    assert main(["generate", str(arts["skipped"]), "--ids", ids, "--speculative", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["speculative"]["bandit"]["arms"]["1"]["pulls"] >= 1
    assert main(["generate", str(arts["skipped"] / "draft"), "--ids", ids, "--speculative"]) == 2
    assert "no self-draft" in capsys.readouterr().err
    assert main(["generate", str(arts["skipped"]), "--ids", ids, "--speculative", "--kv-policy", "window:size=8"]) == 2
    assert "does not combine" in capsys.readouterr().err
