"""Decoder metrics: perplexity, next-token agreement, greedy-generation agreement.

All computations are float64 numpy. Shapes: ``logits [B, T, V]``, ``input_ids [B, T]``,
``attention_mask [B, T]`` (1 for real tokens, 0 for padding, left or right).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from optimizer.metrics_util import MetricInputError

CHUNK = 128  # positions converted to float64 at a time


def _batch(logits: Any, input_ids: Any, attention_mask: Any) -> tuple[np.ndarray, ...]:
    lg, ids = np.asarray(logits), np.asarray(input_ids)
    mask = np.ones(ids.shape, dtype=bool) if attention_mask is None else np.asarray(attention_mask)
    if lg.ndim != 3 or ids.shape != lg.shape[:2] or mask.shape != ids.shape:
        raise MetricInputError(f"Logits {lg.shape}, input_ids {ids.shape} and attention_mask "
                               f"{mask.shape} do not match; pass [B, T, V], [B, T] and [B, T].")
    if ids.size and (ids.min() < 0 or ids.max() >= lg.shape[2]):
        raise MetricInputError(f"Token ids must lie in [0, {lg.shape[2]}) to index the logits; "
                               "pass the ids the logits were computed from.")
    return lg, ids, mask.astype(bool)


def _log_softmax_at(rows: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``log softmax(rows)[k, targets[k]]`` in float64, stable (max subtracted first)."""
    x = rows.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(x - top).sum(axis=1))
    return x[np.arange(len(x)), targets] - lse


def nll_terms(logits: Any, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
    """The next-token negative log-likelihoods that :func:`perplexity` averages, as a 1-D array.

    Position t of sequence b predicts token ``input_ids[b, t + 1]``; it counts when both
    ``attention_mask[b, t]`` and ``attention_mask[b, t + 1]`` are 1 (so padding on either side
    and the first token, which nothing predicts, are left out).
    """
    lg, ids, mask = _batch(logits, input_ids, attention_mask)
    terms = []
    for b in range(lg.shape[0]):
        keep = np.flatnonzero(mask[b, :-1] & mask[b, 1:])
        for start in range(0, keep.size, CHUNK):  # bounds the float64 copy of the logits
            pos = keep[start:start + CHUNK]
            terms.append(-_log_softmax_at(lg[b, pos], ids[b, pos + 1]))
    return np.concatenate(terms) if terms else np.zeros(0)


def mean_nll(logits: Any, input_ids: Any, attention_mask: Any = None) -> float:
    """Mean next-token negative log-likelihood in nats (see :func:`nll_terms` for the positions)."""
    terms = nll_terms(logits, input_ids, attention_mask)
    if terms.size == 0:
        raise MetricInputError("No position has a next token to predict (every sequence has "
                               "fewer than 2 unpadded tokens); pass longer inputs.")
    return float(terms.mean())


def perplexity(logits: Any, input_ids: Any, attention_mask: Any = None) -> float:
    """``exp`` of the mean next-token negative log-likelihood over all counted positions.

    ``PPL = exp( -(1/N) sum_{b,t} log softmax(logits[b, t])[input_ids[b, t + 1]] )`` over the N
    positions where ``attention_mask[b, t] = attention_mask[b, t + 1] = 1``; the log-softmax is
    computed in float64 with the row maximum subtracted. Positions are pooled over the batch
    (a token-weighted mean, not a mean of per-sequence perplexities). Uniform logits over V
    tokens give exactly V; a model that always puts all mass on the right token gives 1.
    Non-finite logits give a non-finite result.
    """
    return float(np.exp(mean_nll(logits, input_ids, attention_mask)))


def top1_agreement(ref_logits: Any, test_logits: Any, mask: Any = None) -> float:
    """Fraction of positions whose arg-max token is the same in both logits ``[..., V]``.

    Counted over the positions where ``mask`` (shape ``logits.shape[:-1]``, default all) is
    true. Both models see the same input (teacher forcing), so this measures next-token
    agreement position by position, unaffected by earlier disagreements. Arg-max ties go to
    the lowest token id.
    """
    r, t = np.asarray(ref_logits), np.asarray(test_logits)
    m = np.ones(r.shape[:-1], dtype=bool) if mask is None else np.asarray(mask).astype(bool)
    if r.shape != t.shape or r.ndim < 2 or m.shape != r.shape[:-1]:
        raise MetricInputError(f"Logits {r.shape} and {t.shape} with mask {m.shape} do not "
                               "match; pass two [..., V] arrays of one shape and a [...] mask.")
    if not m.any():
        raise MetricInputError("The mask selects no position; pass a mask with some ones.")
    same = np.argmax(r, axis=-1) == np.argmax(t, axis=-1)
    return float(same[m].mean())


def _prefix_score(ref: np.ndarray, test: np.ndarray) -> float:
    if len(ref) == 0:
        return 1.0 if len(test) == 0 else 0.0
    n = min(len(ref), len(test))
    diverged = np.flatnonzero(ref[:n] != test[:n])
    matched = int(diverged[0]) if diverged.size else n
    return matched / len(ref)


def greedy_match(ref_tokens: Sequence[Any], test_tokens: Sequence[Any]) -> float:
    """Mean over prompts of the fraction of the reference continuation reproduced before divergence.

    ``ref_tokens[i]`` and ``test_tokens[i]`` are the tokens the original and the optimized
    model generated greedily for prompt i (generated tokens only, the prompt left out; keep the
    end-of-sequence token in if stopping matters). With ``m_i`` the length of their longest
    common prefix, prompt i scores ``m_i / len(ref_tokens[i])``: every token after the first
    difference counts as lost, because the two continuations are then conditioned on different
    text. A test sequence that stops early loses the rest; one that runs on past the reference's
    end is not penalised. An empty reference scores 1 against an empty test, else 0. The result,
    in [0, 1], is the unweighted mean over prompts. Sequences may be ragged (lists of lists).
    """
    if len(ref_tokens) != len(test_tokens) or len(ref_tokens) == 0:
        raise MetricInputError(f"Got {len(ref_tokens)} reference and {len(test_tokens)} test "
                               "generations; pass one of each per prompt (at least one).")
    scores = [_prefix_score(np.asarray(r).ravel(), np.asarray(t).ravel())
              for r, t in zip(ref_tokens, test_tokens, strict=True)]
    return float(np.mean(scores))
