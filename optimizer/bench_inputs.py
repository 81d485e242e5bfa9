"""What ``carve bench`` feeds every system, and how it scores each system's outputs.

Timing on real inputs rather than random ids matters once passes prune tokens or skip work by
content, and it lets the same run report accuracy: text models get held-out text (news for
encoders, Shakespeare for decoders) tokenized to exactly batch x seq tokens, ViTs held-out
photo crops. Accuracy is measured against ORT fp32 on those very inputs, on the model's main
output: the sentence embedding, the logits (one row per real token), or the saliency map.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from models import data
from optimizer import metrics
from optimizer.compare import output_agreement

DEFAULTS = {"encoder": (8, 128), "decoder": (1, 128), "vit": (8, 0)}  # (batch, seq)
TEXT_SOURCE = {"encoder": "news", "decoder": "shakespeare"}
MAIN_OUTPUTS = ("sentence_embedding", "logits", "saliency", "cls_embedding")


def default_sizes(family: str | None) -> tuple[int, int]:
    return DEFAULTS.get(family or "", (8, 128))


def bench_feeds(spec, family: str | None, inputs: list[dict], batch: int, seq: int) -> tuple[dict, str]:
    """The feeds for (batch, seq) and a phrase saying what they are."""
    names = [i["name"] for i in inputs]
    if spec is None or family not in DEFAULTS:
        from optimizer.sources import feeds_from_signature

        return feeds_from_signature(inputs, {"batch": batch, "sequence": seq}), \
            f"batch {batch} x {seq} synthetic inputs (the source has no task data)"
    if family == "vit":
        size = int(spec.example_inputs(1, 0)["pixel_values"].shape[-1])
        pixels = _fill(list(data.images("eval", size=size, n=batch)), batch)
        return {"pixel_values": np.stack(pixels)}, f"{batch} photo crops {size}x{size} (eval split)"
    source = TEXT_SOURCE[family]
    feeds = tokenize(spec.tokenizer(), _fill(data.texts(source, "eval", n=batch), batch), seq)
    return {k: v for k, v in feeds.items() if k in names}, f"batch {batch} x {seq} tokens of {source} (eval split)"


def tokenize(tok, texts: list[str], seq: int) -> dict[str, np.ndarray]:
    """Exactly ``seq`` tokens per text: truncated, or padded (the mask marks the padding)."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    return {k: np.asarray(v).astype(np.int64) for k, v in enc.items()}


def _fill(items: list, n: int) -> list:
    """``items`` repeated to ``n`` entries when the split holds fewer than asked."""
    if not items:
        return items
    return (items * math.ceil(n / len(items)))[:n]


def main_output(names: list[str]) -> str:
    """The output accuracy is judged on: the one a user of the model consumes."""
    return next((n for n in MAIN_OUTPUTS if n in names), names[0])


def agreement(reference: dict[str, np.ndarray], outputs: Any, main: str, feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """How close a system's main output is to ORT fp32's on the bench inputs (empty if absent)."""
    if not isinstance(outputs, dict) or main not in outputs or main not in reference:
        return {}
    ref, new = np.asarray(reference[main]), np.asarray(outputs[main])
    if ref.shape != new.shape:
        return {}
    if main == "logits" and ref.ndim == 3:
        return _logit_agreement(ref, new, feeds.get("attention_mask"))
    found = output_agreement(ref, new)
    return {"cosine_mean": found["cosine_mean"], "cosine_min": found["cosine_min"], "max_abs_err": found["max_abs_err"]}


def _logit_agreement(ref: np.ndarray, new: np.ndarray, mask: np.ndarray | None) -> dict[str, float]:
    """Per-token cosine of the logit rows and top-1 agreement, over real (unpadded) tokens."""
    keep = np.ones(ref.shape[:2], dtype=bool) if mask is None else mask.astype(bool)
    cosine = metrics.embedding_cosine(ref[keep], new[keep])
    return {"cosine_mean": cosine["mean"], "cosine_min": cosine["min"],
            "top1_agreement": metrics.top1_agreement(ref, new, keep),
            "max_abs_err": float(np.abs(ref[keep].astype(np.float64) - new[keep]).max())}
