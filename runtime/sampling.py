"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus) and eta.

``Sampler(temperature=0)`` is greedy (argmax, deterministic). Otherwise the logits are divided by
the temperature, then truncated in this order: top-k keeps the k most likely tokens; top-p the
smallest set whose probability reaches p; eta-sampling (Hewitt et al., 2022) drops tokens whose
probability is below ``min(eta, sqrt(eta) * exp(-entropy))``. The most likely token always
survives truncation. Sampling uses a seeded numpy generator, so a seed reproduces a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from runtime.errors import FeedError


@dataclass
class Sampler:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    eta: float = 0.0
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or not 0 <= self.eta < 1:
            raise FeedError("sampling needs temperature >= 0, top_k >= 0, 0 < top_p <= 1 and 0 <= eta < 1.")
        self._rng = np.random.default_rng(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """One token id per row of ``logits [batch, vocab]``."""
        if self.greedy:
            return logits.argmax(-1)
        return np.array([self._sample(row) for row in logits.astype(np.float64)])

    def _sample(self, logits: np.ndarray) -> int:
        return self.draw(self.distribution(logits))

    def distribution(self, logits: np.ndarray) -> np.ndarray:
        """The probabilities a row of logits is sampled from (temperature, then truncation,
        renormalised; zero outside the kept tokens). Speculative sampling compares two of them."""
        probs = _softmax(np.asarray(logits, np.float64) / self.temperature)
        order = np.argsort(-probs, kind="stable")
        keep = np.ones(len(order), bool)
        if self.top_k:
            keep[self.top_k:] = False
        if self.top_p < 1:
            before = np.cumsum(probs[order]) - probs[order]
            keep &= before < self.top_p
        if self.eta:
            entropy = -np.sum(probs * np.log(np.clip(probs, 1e-30, None)))
            keep &= probs[order] >= min(self.eta, np.sqrt(self.eta) * np.exp(-entropy))
        keep[0] = True
        chosen = order[keep]
        out = np.zeros_like(probs)
        out[chosen] = probs[chosen] / probs[chosen].sum()
        return out

    def draw(self, probs: np.ndarray) -> int:
        """One token from a distribution (most likely first, as the seeded stream always drew)."""
        order = np.argsort(-probs, kind="stable")
        chosen = order[probs[order] > 0]
        return int(self._rng.choice(chosen, p=probs[chosen] / probs[chosen].sum()))

    def uniform(self) -> float:
        """A uniform number in [0, 1) from the same seeded stream."""
        return float(self._rng.random())


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()
