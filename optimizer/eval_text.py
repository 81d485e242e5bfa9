"""Evaluation of text models (see ``optimizer.evaluate`` for what each metric means)."""

from __future__ import annotations

from typing import Any

import numpy as np

from models import data
from optimizer import metrics
from optimizer.metrics_decoder import greedy_match, nll_terms

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "To make a cup of tea, first",
    "The three primary colours are",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "The quick brown fox",
    "My favourite book is",
]


def encode(tokenizer, texts: list[str], max_len: int) -> dict[str, np.ndarray]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def _embed(run, feeds, output: str, batch: int = 8) -> np.ndarray:
    from optimizer.evaluate import batched

    return batched(run, feeds, output, batch)


def evaluate_encoder(spec, reference, test, quick: bool) -> dict[str, Any]:
    tok = spec.tokenizer()
    out = "sentence_embedding" if "sentence_embedding" in spec.output_names else spec.output_names[0]
    docs = encode(tok, data.texts("news", "eval", n=16 if quick else 64), 128)
    ref_e, test_e = _embed(reference, docs, out), _embed(test, docs, out)
    cosine = metrics.embedding_cosine(ref_e, test_e)
    probe = _polarity_probe(tok, out, reference, test, n=40 if quick else None)
    return {
        "embedding_cosine_mean": cosine["mean"], "embedding_cosine_min": cosine["min"],
        "ranking_agreement": metrics.ranking_agreement(ref_e, test_e),
        **probe, "documents": len(ref_e),
    }


def _polarity_probe(tok, out, reference, test, n: int | None) -> dict[str, float]:
    (train_s, train_y), (test_s, test_y) = data.polarity("calib"), data.polarity("eval")
    if n:
        train_s, train_y, test_s, test_y = train_s[:n], train_y[:n], test_s[:n], test_y[:n]
    train, held = encode(tok, train_s, 128), encode(tok, test_s, 128)
    scores = {}
    for label, run in (("reference", reference), ("artifact", test)):
        scores[label] = metrics.linear_probe_accuracy(_embed(run, train, out), train_y, _embed(run, held, out), test_y)
    return {"probe_accuracy_reference": scores["reference"], "probe_accuracy": scores["artifact"],
            "probe_delta_points": 100 * (scores["artifact"] - scores["reference"])}


def evaluate_decoder(spec, reference, test, quick: bool) -> dict[str, Any]:
    tok = spec.tokenizer()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    feeds = encode(tok, data.texts("shakespeare", "eval", n=4 if quick else 16), 64 if quick else 128)
    nll_ref, nll_test, agree, total = [], [], 0, 0
    for i in range(0, len(feeds["input_ids"]), 4):
        chunk = {k: v[i:i + 4] for k, v in feeds.items()}
        ref, new = reference(chunk)["logits"], test(chunk)["logits"]
        nll_ref.append(nll_terms(ref, chunk["input_ids"], chunk["attention_mask"]))
        nll_test.append(nll_terms(new, chunk["input_ids"], chunk["attention_mask"]))
        mask = chunk["attention_mask"].astype(bool)
        agree += int((ref.argmax(-1) == new.argmax(-1))[mask].sum())
        total += int(mask.sum())
    prompts, steps = (PROMPTS[:2], 6) if quick else (PROMPTS, 24)
    ref_tokens = [greedy_tokens(reference, tok, p, steps) for p in prompts]
    new_tokens = [greedy_tokens(test, tok, p, steps) for p in prompts]
    return {
        "perplexity_reference": float(np.exp(np.concatenate(nll_ref).mean())),
        "perplexity": float(np.exp(np.concatenate(nll_test).mean())),
        "top1_agreement": agree / max(total, 1),
        "greedy_match": greedy_match(ref_tokens, new_tokens),
        "tokens_scored": int(np.concatenate(nll_ref).size), "prompts": len(prompts), "new_tokens": steps,
    }


def greedy_tokens(run, tok, prompt: str, steps: int) -> np.ndarray:
    """Greedy continuation by recomputing the whole sequence each step (works on any logits graph)."""
    ids = np.asarray(tok(prompt)["input_ids"], dtype=np.int64)[None]
    start = ids.shape[1]
    for _ in range(steps):
        logits = run({"input_ids": ids, "attention_mask": np.ones_like(ids)})["logits"]
        nxt = int(logits[0, -1].argmax())
        ids = np.concatenate([ids, [[nxt]]], axis=1)
        if nxt == tok.eos_token_id:
            break
    return ids[0, start:]
