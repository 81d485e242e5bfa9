"""Deterministic calibration / evaluation splits by hashing.

Every item of a data set has a stable key (a document's text, a play's file name, an image's
name). Items are ranked by ``sha256(salt + key)``; the first ``round(fraction * count)`` of that
ranking form the ``calib`` split and the rest the ``eval`` split. The ranking depends only on the
keys, never on a random generator, a platform or the order the files were read in, so both splits
are the same on every machine, never overlap, and together hold every item exactly once.
Within a split items stay in hash order, a fixed pseudo-random shuffle, so taking the first
``n`` gives a sample spread over the whole source rather than its first chapter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from runtime.errors import CarveError

T = TypeVar("T")
SPLITS = ("calib", "eval")
SALT = "carve-data-v1:"


class DataError(CarveError):
    """A data set was asked for with an unknown name, split or size."""


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    return split


def hash_rank(keys: Sequence[str]) -> list[int]:
    """Indices of ``keys`` sorted by their salted sha256 (ties broken by index)."""
    digests = [hashlib.sha256((SALT + k).encode("utf-8")).hexdigest() for k in keys]
    return sorted(range(len(keys)), key=lambda i: (digests[i], i))


def split_indices(keys: Sequence[str], split: str, fraction: float) -> list[int]:
    """Indices of the items of ``split``: the first ``fraction`` of the hash ranking is calib."""
    check_split(split)
    order = hash_rank(keys)
    n_calib = int(round(fraction * len(order)))
    return order[:n_calib] if split == "calib" else order[n_calib:]


def split_stratified(keys: Sequence[str], labels: Sequence[int], split: str,
                     fraction: float) -> list[int]:
    """Like :func:`split_indices` but within each label, so both splits keep the class balance.

    The result is in hash order over all the chosen items (classes interleaved).
    """
    check_split(split)
    chosen: list[int] = []
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        picked = split_indices([keys[i] for i in members], split, fraction)
        chosen.extend(members[j] for j in picked)
    rank = {i: r for r, i in enumerate(hash_rank(keys))}
    return sorted(chosen, key=rank.__getitem__)


def check_count(n: int | None) -> int | None:
    """``n`` itself if it is None or a whole number of at least zero."""
    if n is not None and (not isinstance(n, (int, np.integer)) or n < 0):
        raise DataError(f"Asked for {n!r} items; ask for a whole number of zero or more.")
    return n


def take(items: Sequence[T], n: int | None) -> list[T]:
    """The first ``n`` items (all of them when ``n`` is None)."""
    return list(items[: check_count(n)])


def dedupe(items: Sequence[str]) -> list[str]:
    """The items with exact repeats removed, first occurrence kept, order preserved."""
    return list(dict.fromkeys(items))
