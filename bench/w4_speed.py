"""Several quantized decoder artifacts timed side by side: prefill and, with a KV cache, decoding.

    python bench/w4_speed.py out/w4-sym out/w4-asym [--rounds 15] [--seq 128] [--new-tokens 32]

``carve bench`` times one artifact against ORT fp32 and ORT's tools; this compares artifacts
with each other (e.g. symmetric against asymmetric int4) in one process, rounds interleaved
(the order rotating) after one warm-up round, so that a shared machine's load hits them alike.
Per artifact: the median time of a 1 x ``--seq`` prefill of random tokens, and, when the
artifact has a KV cache, the median time of greedy generation of ``--new-tokens`` tokens after
a short prompt (``runtime.generate``), as tokens per second. Ratios are against the first one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import runtime
from runtime.generate import generate
from runtime.manifest import read_manifest

PROMPT = [1, 504, 3458, 282, 260, 1345, 28, 2162]  # a short fixed prompt of SmolLM2 token ids


def _has_cache(path: str) -> bool:
    return any(i["name"].startswith("past_key_values") for i in read_manifest(path)["inputs"])


def _prefill(session, seq: int):
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 1000, (1, seq), dtype=np.int64),
             "attention_mask": np.ones((1, seq), np.int64)}
    names = {i["name"] for i in session.inputs}
    return lambda: session.run({k: v for k, v in feeds.items() if k in names})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    jobs = {}
    for path in args.artifacts:
        session = runtime.load(path, threads=args.threads)
        if _has_cache(path):
            jobs[path, "decode"] = lambda s=session: generate(s, [PROMPT], max_new_tokens=args.new_tokens)
        else:
            jobs[path, "prefill"] = _prefill(session, args.seq)
    times: dict = {key: [] for key in jobs}
    keys = list(jobs)
    for round_ in range(args.rounds + 1):
        for key in keys[round_ % len(keys):] + keys[:round_ % len(keys)]:
            start = time.perf_counter()
            jobs[key]()
            if round_:  # the first round warms up
                times[key].append(time.perf_counter() - start)
    first = {}
    for (path, what), values in times.items():
        median = statistics.median(values)
        first.setdefault(what, median)
        rate = f", {args.new_tokens / median:.1f} tokens/s" if what == "decode" else ""
        print(f"{what:8s} {path}: median {median * 1000:.1f} ms{rate}, speed {first[what] / median:.2f}x the first")


if __name__ == "__main__":
    main()
