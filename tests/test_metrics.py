"""optimizer.metrics: identical outputs score perfectly, damaged ones measurably worse, and tiny
hand-computed cases come out exactly; a small real Llama shows the decoder metrics on real text."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from optimizer import metrics as M
from runtime.errors import CarveError

RNG = np.random.default_rng(0)


def _noisy(x: np.ndarray, scale: float, seed: int = 1) -> np.ndarray:
    return x + scale * np.random.default_rng(seed).standard_normal(x.shape) * x.std()


# ---------------------------------------------------------------- encoder

def test_embedding_cosine_identical_noisy_and_hand_cases():
    emb = RNG.standard_normal((20, 16))
    assert M.embedding_cosine(emb, emb) == pytest.approx({"mean": 1.0, "min": 1.0})
    noisy = M.embedding_cosine(emb, _noisy(emb, 0.5))
    assert noisy["min"] <= noisy["mean"] < 0.97
    assert M.embedding_cosine([[1, 0]], [[0, 2]])["mean"] == 0.0
    assert M.embedding_cosine([[1, 1]], [[-3, -3]])["mean"] == pytest.approx(-1.0)
    assert M.embedding_cosine([[0, 0], [1, 0]], [[0, 0], [0, 0]]) == {"mean": 0.5, "min": 0.0}
    hidden = RNG.standard_normal((2, 5, 8))  # [B, T, D] compares per token
    assert M.embedding_cosine(hidden, 3 * hidden)["min"] == pytest.approx(1.0)


def test_metric_shape_errors_are_carve_errors():
    with pytest.raises(CarveError, match="cannot be compared"):
        M.embedding_cosine(np.ones((3, 4)), np.ones((3, 5)))
    with pytest.raises(M.MetricInputError):
        M.embedding_cosine(np.ones(4), np.ones(4))
    with pytest.raises(M.MetricInputError):
        M.ranking_agreement(np.ones((2, 4)), np.ones((2, 4)))
    with pytest.raises(M.MetricInputError):
        M.saliency_correlation(np.ones((2, 4, 4)), np.ones((2, 4, 5)))


def test_linear_probe_on_real_faces():
    from models import data

    xtr, ytr = data.faces("calib", size=16)
    xte, yte = data.faces("eval", size=16)
    xtr, xte = xtr.reshape(len(xtr), -1), xte.reshape(len(xte), -1)
    clean = M.linear_probe_accuracy(xtr, ytr, xte, yte)
    assert clean == M.linear_probe_accuracy(xtr, ytr, xte, yte)  # deterministic
    assert clean >= 0.85
    noise = np.random.default_rng(3)
    damaged = M.linear_probe_accuracy(noise.standard_normal(xtr.shape), ytr,
                                      noise.standard_normal(xte.shape), yte)
    assert damaged < clean - 0.2
    with pytest.raises(M.MetricInputError, match="single class"):
        M.linear_probe_accuracy(xtr, np.zeros_like(ytr), xte, yte)


def test_ranking_agreement():
    emb = RNG.standard_normal((30, 8))
    assert M.ranking_agreement(emb, emb) == pytest.approx(1.0)
    assert M.ranking_agreement(emb, 5 * emb) == pytest.approx(1.0)  # cosine ignores scale
    damaged = M.ranking_agreement(emb, _noisy(emb, 0.7))
    assert 0.0 < damaged < 0.9
    assert abs(M.ranking_agreement(emb, RNG.standard_normal((30, 8)))) < 0.2
    ones = np.ones((4, 3))
    assert M.ranking_agreement(ones, ones) == 1.0


def test_rankdata_matches_average_ranks():
    from optimizer.metrics_util import rankdata

    np.testing.assert_array_equal(rankdata(np.array([10, 30, 20, 20])), [1, 4, 2.5, 2.5])


def test_neighbour_agreement():
    emb = RNG.standard_normal((25, 8))
    assert M.neighbour_agreement(emb, emb, k=5) == 1.0
    assert M.neighbour_agreement(emb, _noisy(emb, 1.0), k=5) < 0.8
    with pytest.raises(M.MetricInputError):
        M.neighbour_agreement(emb, emb, k=25)


# ---------------------------------------------------------------- decoder

def test_perplexity_of_uniform_logits_is_vocab_size():
    for vocab in (2, 7, 1000):
        ids = RNG.integers(0, vocab, (3, 9))
        assert M.perplexity(np.zeros((3, 9, vocab)), ids, np.ones((3, 9))) == pytest.approx(
            vocab, rel=1e-12)


def test_perplexity_hand_case_padding_and_stability():
    # One sequence [0, 1, 1]: position 0 gives p(1) = 0.75, position 1 gives p(1) = 0.5.
    logits = np.log(np.array([[[0.25, 0.75], [0.5, 0.5], [0.9, 0.1]]]))
    ids = np.array([[0, 1, 1]])
    expected = np.exp(-(np.log(0.75) + np.log(0.5)) / 2)
    assert M.perplexity(logits, ids, np.ones((1, 3))) == pytest.approx(expected, rel=1e-12)
    # Left padding with garbage logits changes nothing; huge logits do not overflow.
    padded_logits = np.concatenate([RNG.standard_normal((1, 2, 2)) * 1e3, logits], axis=1)
    padded_ids = np.array([[1, 0, 0, 1, 1]])
    mask = np.array([[0, 0, 1, 1, 1]])
    assert M.perplexity(padded_logits, padded_ids, mask) == pytest.approx(expected, rel=1e-12)
    shifted = (logits + 1e4).astype(np.float32)
    assert M.perplexity(shifted, ids) == pytest.approx(expected, rel=1e-3)
    assert M.mean_nll(logits, ids) == pytest.approx(np.log(expected))


def test_perplexity_input_errors():
    with pytest.raises(M.MetricInputError, match="do not match"):
        M.perplexity(np.zeros((1, 3, 4)), np.zeros((1, 4), dtype=int), None)
    with pytest.raises(M.MetricInputError, match="in \\[0, 4\\)"):
        M.perplexity(np.zeros((1, 3, 4)), np.array([[0, 1, 9]]), None)
    with pytest.raises(M.MetricInputError, match="no position|No position"):
        M.perplexity(np.zeros((1, 3, 4)), np.zeros((1, 3), dtype=int), np.array([[0, 0, 1]]))


def test_top1_agreement():
    logits = RNG.standard_normal((2, 6, 10))
    assert M.top1_agreement(logits, logits, np.ones((2, 6))) == 1.0
    other = logits.copy()
    other[0, 0] = -other[0, 0]  # flips the arg-max of one position
    assert M.top1_agreement(logits, other, None) == pytest.approx(11 / 12)
    mask = np.zeros((2, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = True
    assert M.top1_agreement(logits, other, mask) == 0.5
    assert M.top1_agreement(logits, _noisy(logits, 2.0)) < 0.8


def test_greedy_match_definition():
    assert M.greedy_match([[1, 2, 3, 4]], [[1, 2, 3, 4]]) == 1.0
    assert M.greedy_match([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == 0.5  # later matches do not count
    assert M.greedy_match([[1, 2, 3, 4]], [[1]]) == 0.25  # stopped early
    assert M.greedy_match([[1, 2]], [[1, 2, 3]]) == 1.0  # ran on
    assert M.greedy_match([[5, 6], [7, 8, 9, 1]], [[0, 6], [7, 8, 9, 1]]) == 0.5  # mean of 0, 1
    assert M.greedy_match([[]], [[]]) == 1.0 and M.greedy_match([[]], [[3]]) == 0.0
    assert M.greedy_match(np.array([[1, 2], [3, 4]]), np.array([[1, 2], [3, 0]])) == 0.75
    with pytest.raises(M.MetricInputError):
        M.greedy_match([[1]], [[1], [2]])


# ---------------------------------------------------------------- vision

def test_saliency_correlation():
    maps = RNG.random((4, 1, 8, 8))
    assert M.saliency_correlation(maps, maps) == pytest.approx(1.0)
    assert M.saliency_correlation(maps, 3 * maps + 2) == pytest.approx(1.0)
    assert M.saliency_correlation(maps, 1 - maps) == pytest.approx(-1.0)
    assert M.saliency_correlation(maps, _noisy(maps, 1.0)) < 0.85
    flat = np.ones((1, 4, 4))
    assert M.saliency_correlation(flat, flat) == 1.0
    assert M.saliency_correlation(flat, RNG.random((1, 4, 4))) == 0.0


# ---------------------------------------------------------------- a real (tiny) decoder

SEQ, BATCH, STEPS = 64, 16, 100


def _encode(texts: list[str], length: int):
    """Byte-level ids (byte + 1; 0 is padding), right-padded to ``length``."""
    ids = np.zeros((len(texts), length), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, text in enumerate(texts):
        raw = np.frombuffer(text.encode("utf-8")[:length], dtype=np.uint8)
        ids[i, : len(raw)], mask[i, : len(raw)] = raw.astype(np.int64) + 1, 1
    return ids, mask


@pytest.fixture(scope="module")
def tiny_llama():
    """A 2-layer Llama, seeded, trained for a few steps on calibration Shakespeare.

    One thread: a model this small gains nothing from two, and two threads spinning against
    other processes on a 2-core machine made the training ten times slower.
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from models import data

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
        pad_token_id=0, bos_token_id=None, eos_token_id=None)
    model = transformers.LlamaForCausalLM(config)
    train = data.texts("shakespeare", "calib", BATCH * STEPS)
    ids, mask = map(torch.from_numpy, _encode(train, SEQ))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for s in range(0, len(ids), BATCH):
        x, m = ids[s:s + BATCH], mask[s:s + BATCH]
        model(input_ids=x, attention_mask=m, labels=x.masked_fill(m == 0, -100)).loss.backward()
        opt.step()
        opt.zero_grad()
    yield model.eval()
    torch.set_num_threads(threads)


def _logits(model, ids, mask):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return out.logits.numpy()


def _greedy(model, prompts: np.ndarray, steps: int) -> np.ndarray:
    import torch

    ids = torch.from_numpy(prompts)
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[:, prompts.shape[1]:].numpy()


def test_zeroing_a_block_raises_perplexity_on_real_text(tiny_llama):
    from models import data

    ids, mask = _encode(data.texts("shakespeare", "eval", 16), SEQ)
    damaged = copy.deepcopy(tiny_llama)
    for p in damaged.model.layers[0].parameters():
        p.data.zero_()
    variants = (tiny_llama, copy.deepcopy(tiny_llama), damaged)
    ref, same, bad = (_logits(m, ids, mask) for m in variants)

    ppl_ref = M.perplexity(ref, ids, mask)
    assert ppl_ref < 40  # learned something: far below the 257 of a uniform guess
    assert M.perplexity(same, ids, mask) == ppl_ref
    assert M.perplexity(bad, ids, mask) > 1.5 * ppl_ref
    assert M.top1_agreement(ref, same, mask == 1) == 1.0
    assert M.top1_agreement(ref, bad, mask == 1) < 0.8

    prompts = ids[:4, :24]
    ref_gen = _greedy(tiny_llama, prompts, 12)
    assert M.greedy_match(ref_gen, _greedy(copy.deepcopy(tiny_llama), prompts, 12)) == 1.0
    assert M.greedy_match(ref_gen, _greedy(damaged, prompts, 12)) < 0.75
