"""What KV eviction costs: perplexity and next-token agreement on a long held-out text.

``carve eval DIR --kv-policies 'window:size=256;sinks:size=256,sinks=4'`` reads ``tokens``
tokens of held-out news, prefills the first ``size - 1`` of them, then feeds the rest one at a
time through the cache (teacher forcing), letting each policy evict before every step. Per
policy it reports perplexity, the fraction of positions whose most likely next token equals the
full cache's, and the KV bytes held at the end against the full cache's (for ``minicache``
the bytes of its merged representation; its prefill is its window). The full cache is the first
row (no eviction); the policies' own summaries (``describe()``) follow the table.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from optimizer.progress import Progress
from runtime.kv import KVCache, KVLayout
from runtime.kv_policies import make_policy
from runtime.kv_step import Stepper


def eval_policies(session: Any, ids: list[int], specs: list[str], progress: Progress) -> dict[str, Any]:
    rows = []
    with progress.step(f"full cache over {len(ids)} tokens"):
        full_logp, full_top, full_bytes = _run(session, ids, None)
    rows.append(_row("full", full_logp, full_top, full_top, full_bytes, full_bytes))
    for spec in specs:
        policy = make_policy(spec)
        with progress.step(f"{spec} over {len(ids)} tokens"):
            logp, top, kv = _run(session, ids, policy)
        rows.append(_row(spec, logp, top, full_top, kv, full_bytes) | {"note": policy.describe()})
    return {"tokens": len(ids), "rows": rows}


def _run(session: Any, ids: list[int], policy) -> tuple[np.ndarray, np.ndarray, int]:
    """Log-probabilities of each next token and the argmax at each position."""
    tokens = np.asarray(ids, np.int64)[None]
    cache = KVCache(KVLayout.of(session.inputs), 1, len(ids))
    step = Stepper(session, cache)
    first = len(ids) - 1 if policy is None else policy.size - 1
    mask = np.ones((1, first), np.int64)
    logits, extra = step(tokens[:, :first], mask, np.arange(first)[None])
    pieces = [logits[0]]
    for t in range(first, len(ids) - 1):
        if policy is not None:
            mask = policy.apply(cache, mask, extra)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        logits, extra = step(tokens[:, t:t + 1], mask, np.array([[t]]))
        pieces.append(logits[0])
    all_logits = np.concatenate(pieces).astype(np.float64)
    shifted = all_logits - all_logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    target = tokens[0, 1:]
    held = cache.nbytes() if policy is None else policy.held_bytes(cache)  # minicache: the merged representation
    return logp[np.arange(len(target)), target], all_logits.argmax(-1), held


def _row(name: str, logp: np.ndarray, top: np.ndarray, full_top: np.ndarray, kv: int, full_kv: int) -> dict:
    return {"policy": name, "perplexity": float(np.exp(-logp.mean())), "token_agreement": float((top == full_top).mean()),
            "kv_bytes": kv, "kv_fraction": kv / full_kv if full_kv else None}


def format_policies(result: dict[str, Any]) -> str:
    width = max([34] + [len(r["policy"]) + 2 for r in result["rows"]])
    lines = [f"KV eviction over {result['tokens']} tokens of held-out news (teacher forcing):", "",
             f"{'policy':<{width}}{'perplexity':>12}{'agreement':>12}{'KV MB':>10}{'of full':>9}"]
    for r in result["rows"]:
        lines.append(f"{r['policy']:<{width}}{r['perplexity']:>12.3f}{r['token_agreement']:>12.4f}"
                     f"{r['kv_bytes'] / 1e6:>10.2f}{r['kv_fraction']:>9.0%}")
    notes = [r["note"] for r in result["rows"] if r.get("note")]
    return "\n".join(lines + ([""] + notes if notes else []))
