"""Layer skipping, part 5: choosing which ``count`` units to skip.

Every strategy sees units as indices ``0..n-1`` and skip sets as frozensets, and scores them
through a ``Scorer`` (end-to-end score, lower is better, memoised, at two sizes: ``small``, the
first calibration batches, and ``full``, all of them). Ties are broken by the sorted indices, so
every strategy is deterministic for its seed.

- ``evolutionary`` (EvoPress): a parent skip set; each generation makes up to ``population``
  distinct offspring by mutation (swap a skipped unit for a kept one, one to three times, one
  swap most often), ranks them on the small subset, confirms the best ``survivors`` on the full
  set, and keeps the best of those and the parent (so the full-set score never gets worse). The
  first parent is the best of the Block-Influence set and random sets. The curve records the
  parent's full-set score after each generation.
- ``greedy``: remove, one at a time, the unit whose removal (with those already removed) scores
  best on the full set.
- ``exhaustive``: every set of size ``count`` on the full set (refused above
  ``MAX_EXHAUSTIVE`` sets).
- ``influence_set``: the ``count`` units of lowest Block Influence (ShortGPT; no search).
- ``random_set``: a seeded random set, the baseline the others are compared with.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable

from runtime.errors import PassError

MAX_EXHAUSTIVE = 5000
Skip = frozenset[int]


class Scorer:
    """Memoised end-to-end scores of skip sets on the small subset and on the full set."""

    def __init__(self, score: Callable[[Skip, int], float], small_batches: int, full_batches: int):
        self._score, self.small_batches, self.full_batches = score, small_batches, full_batches
        self._memo: dict[tuple[Skip, int], float] = {}

    def small(self, skip: Skip) -> float:
        return self._at(skip, self.small_batches)

    def full(self, skip: Skip) -> float:
        return self._at(skip, self.full_batches)

    def _at(self, skip: Skip, batches: int) -> float:
        key = (frozenset(skip), batches)
        if key not in self._memo:
            self._memo[key] = self._score(key[0], batches)
        return self._memo[key]

    def evaluations(self) -> dict[str, int]:
        """Distinct skip sets scored at each size (what the search cost)."""
        sizes = [b for _, b in self._memo]
        return {"small": sizes.count(self.small_batches) if self.small_batches != self.full_batches else 0,
                "full": sizes.count(self.full_batches)}


def _order(skip: Skip) -> tuple[int, ...]:
    return tuple(sorted(skip))


def influence_set(influence: list[float], count: int) -> Skip:
    """The ``count`` units with the lowest Block Influence (index breaks ties)."""
    return frozenset(sorted(range(len(influence)), key=lambda i: (influence[i], i))[:count])


def random_set(n: int, count: int, seed: int) -> Skip:
    return frozenset(random.Random(seed).sample(range(n), count))


def exhaustive(n: int, count: int, scorer: Scorer) -> tuple[Skip, list[dict]]:
    total = math.comb(n, count)
    if total > MAX_EXHAUSTIVE:
        raise PassError(f"an exhaustive search over {total} skip sets (choose {count} of {n}) is too slow; "
                        f"use search=evolutionary or greedy, or a model with fewer blocks.")
    sets = [frozenset(c) for c in itertools.combinations(range(n), count)]
    best = min(sets, key=lambda s: (scorer.full(s), _order(s)))
    return best, [{"generation": 0, "score": scorer.full(best), "set": list(_order(best)), "candidates": total}]


def greedy(n: int, count: int, scorer: Scorer) -> tuple[Skip, list[dict]]:
    chosen: Skip = frozenset()
    curve = []
    for step in range(1, count + 1):
        options = [chosen | {i} for i in range(n) if i not in chosen]
        chosen = min(options, key=lambda s: (scorer.full(s), _order(s)))
        curve.append({"generation": step, "score": scorer.full(chosen), "set": list(_order(chosen))})
    return chosen, curve


def evolutionary(n: int, count: int, scorer: Scorer, seed: int, generations: int, population: int,
                 start: Skip) -> tuple[Skip, list[dict]]:
    rng = random.Random(seed)
    survivors = max(2, population // 4)
    first = _distinct([start] + [frozenset(rng.sample(range(n), count)) for _ in range(4 * population)], population)
    parent = _select(first, scorer, survivors, None)
    curve = [_point(0, parent, scorer)]
    for generation in range(1, generations + 1):
        offspring = _distinct([_mutate(parent, n, rng) for _ in range(20 * population)], population, exclude=parent)
        if not offspring:
            break  # every neighbour of the parent is the parent itself (e.g. count == 0)
        parent = _select(offspring, scorer, survivors, parent)
        curve.append(_point(generation, parent, scorer))
    return parent, curve


def _point(generation: int, parent: Skip, scorer: Scorer) -> dict:
    return {"generation": generation, "score": scorer.full(parent), "set": list(_order(parent))}


def _select(candidates: list[Skip], scorer: Scorer, survivors: int, parent: Skip | None) -> Skip:
    """Rank on the small subset, confirm the best few (and the parent) on the full set."""
    ranked = sorted(candidates, key=lambda s: (scorer.small(s), _order(s)))[:survivors]
    if parent is not None:
        ranked.append(parent)
    return min(ranked, key=lambda s: (scorer.full(s), _order(s)))


def _mutate(parent: Skip, n: int, rng: random.Random) -> Skip:
    """Swap skipped units for kept ones: one swap most often, up to three (escapes local optima)."""
    skipped, kept = sorted(parent), sorted(set(range(n)) - parent)
    swaps = min(rng.randint(1, 3), rng.randint(1, 3), len(skipped), len(kept))
    out, back = rng.sample(skipped, swaps), rng.sample(kept, swaps)
    return frozenset((parent - set(out)) | set(back))


def _distinct(candidates: list[Skip], limit: int, exclude: Skip | None = None) -> list[Skip]:
    seen: dict[Skip, None] = {}
    for c in candidates:
        if c != exclude and c not in seen:
            seen[c] = None
            if len(seen) == limit:
                break
    return list(seen)
