"""Accuracy metrics: how far an optimized model's outputs are from the original model's.

Every function takes plain arrays (anything ``numpy.asarray`` accepts, CPU torch tensors
included) and computes in float64 with numpy, so each metric can be tested and used on its own,
whatever backend produced the outputs. "ref" is always the unoptimized model, "test" the
optimized one. Inputs of the wrong shape raise :class:`MetricInputError`.

Encoders: :func:`embedding_cosine`, :func:`linear_probe_accuracy`, :func:`ranking_agreement`,
:func:`neighbour_agreement`. Decoders: :func:`perplexity`, :func:`top1_agreement`,
:func:`greedy_match` (in ``optimizer.metrics_decoder``). Vision: :func:`saliency_correlation`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from optimizer.metrics_decoder import greedy_match, mean_nll, perplexity, top1_agreement
from optimizer.metrics_util import MetricInputError, as_rows, pairwise_cosine, pearson, rankdata

__all__ = [
    "MetricInputError", "embedding_cosine", "linear_probe_accuracy", "ranking_agreement",
    "neighbour_agreement", "mean_nll", "perplexity", "top1_agreement", "greedy_match",
    "saliency_correlation",
]


def embedding_cosine(ref: Any, test: Any) -> dict[str, float]:
    """Row-wise cosine similarity of two embedding matrices ``[N, D]``.

    For each row i, ``cos_i = <r_i, t_i> / (|r_i| |t_i|)``; a pair of all-zero rows counts as 1
    and a zero row against a non-zero row as 0. Returns ``{"mean": mean_i cos_i,
    "min": min_i cos_i}``. Leading axes beyond the last are flattened into rows, so
    ``[B, T, D]`` hidden states compare per token.
    """
    r, t = as_rows(ref, test)
    nr, nt = np.linalg.norm(r, axis=1), np.linalg.norm(t, axis=1)
    denom = nr * nt
    safe = np.where(denom > 0, denom, 1.0)
    cos = np.where(denom > 0, np.einsum("ij,ij->i", r, t) / safe, (nr == nt).astype(np.float64))
    cos = np.clip(cos, -1.0, 1.0)
    return {"mean": float(cos.mean()), "min": float(cos.min())}


def linear_probe_accuracy(train_x: Any, train_y: Any, test_x: Any, test_y: Any) -> float:
    """Accuracy of a logistic-regression probe trained on ``train_x`` and scored on ``test_x``.

    Features are standardised with the training set's mean and standard deviation, then
    scikit-learn's ``LogisticRegression`` (L2, C=1, lbfgs, up to 2,000 iterations; no
    randomness) is fitted; the result is the fraction of ``test_y`` predicted exactly.
    Comparing the accuracy with the original model's features and with the optimized model's
    tells whether the optimization lost information a downstream task uses.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr, xte = as_rows(train_x), as_rows(test_x)
    ytr, yte = np.asarray(train_y).ravel(), np.asarray(test_y).ravel()
    if len(ytr) != len(xtr) or len(yte) != len(xte) or xtr.shape[1] != xte.shape[1]:
        raise MetricInputError(f"Probe inputs disagree: train {xtr.shape} with {len(ytr)} "
                               f"labels, test {xte.shape} with {len(yte)}; pass matching "
                               "features and labels.")
    if len(np.unique(ytr)) < 2:
        raise MetricInputError("The probe's training labels hold a single class; pass "
                               "examples of at least two classes.")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    probe.fit(xtr, ytr)
    return float(np.mean(probe.predict(xte) == yte))


def _upper(sims: np.ndarray) -> np.ndarray:
    return sims[np.triu_indices(len(sims), k=1)]


def ranking_agreement(ref_emb: Any, test_emb: Any) -> float:
    """Spearman correlation of the pairwise cosine similarities of two embedding sets ``[N, D]``.

    For every unordered pair (i, j), i < j, take ``cos(r_i, r_j)`` and ``cos(t_i, t_j)``; the
    result is the Pearson correlation of the ranks of those ``N (N - 1) / 2`` values (ties get
    their average rank), in [-1, 1]. 1 means the optimized model orders every pair of inputs
    by similarity exactly as the original does (what retrieval and clustering depend on), even
    if the values themselves moved. Needs N >= 3. When all similarities are equal in both sets
    the result is 1; in only one of them, 0.
    """
    r, t = as_rows(ref_emb, test_emb)
    if len(r) < 3:
        raise MetricInputError(f"Ranking agreement needs at least 3 embeddings, got {len(r)}; "
                               "pass more inputs.")
    a, b = rankdata(_upper(pairwise_cosine(r))), rankdata(_upper(pairwise_cosine(t)))
    return pearson(a, b)


def neighbour_agreement(ref_emb: Any, test_emb: Any, k: int = 5) -> float:
    """Mean overlap of the k nearest neighbours (by cosine, self excluded) of each embedding.

    For each row i, let ``A_i`` be the k rows most cosine-similar to ``r_i`` among the other
    rows of ref, and ``B_i`` the same in test (ties broken by lower index); the result is
    ``mean_i |A_i & B_i| / k``, in [0, 1]. Needs N > k.
    """
    r, t = as_rows(ref_emb, test_emb)
    if not 0 < k < len(r):
        raise MetricInputError(f"Neighbour agreement with k={k} needs more than k embeddings "
                               f"(got {len(r)}); pass more inputs or a smaller k.")
    overlaps = []
    for i, (sims_r, sims_t) in enumerate(zip(pairwise_cosine(r), pairwise_cosine(t), strict=True)):
        sims_r[i] = sims_t[i] = -np.inf
        a = set(np.argsort(-sims_r, kind="stable")[:k].tolist())
        b = set(np.argsort(-sims_t, kind="stable")[:k].tolist())
        overlaps.append(len(a & b) / k)
    return float(np.mean(overlaps))


def saliency_correlation(ref: Any, test: Any) -> float:
    """Mean over images of the Pearson correlation of two saliency maps, flattened.

    ``ref`` and ``test`` are ``[N, ...]`` (e.g. ``[N, H, W]`` or ``[N, 1, H, W]``); image i's
    maps are flattened to vectors r_i, t_i and ``rho_i = cov(r_i, t_i) / (std r_i std t_i)``.
    Two constant maps give 1, a constant map against a varying one 0. The result, in [-1, 1],
    is ``mean_i rho_i``; it ignores the maps' scale and offset, only their spatial pattern counts.
    """
    r = np.asarray(ref, dtype=np.float64)
    t = np.asarray(test, dtype=np.float64)
    if r.shape != t.shape or r.ndim < 2:
        raise MetricInputError(f"Saliency maps of shapes {r.shape} and {t.shape} cannot be "
                               "compared; pass two [N, ...] arrays of one shape.")
    flat_r, flat_t = r.reshape(len(r), -1), t.reshape(len(t), -1)
    return float(np.mean([pearson(a, b) for a, b in zip(flat_r, flat_t, strict=True)]))
