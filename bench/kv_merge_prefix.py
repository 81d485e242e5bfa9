"""Bytes and tokens of MiniCache-merged prefix-cache entries against exact ones.

    python bench/kv_merge_prefix.py out/llm [--prefix 512] [--new 32] [--spec threshold=90 ...]

Stores a ``--prefix``-token news prefix (after a first request) in a prefix cache, plain and
merged with each ``--spec`` (``from=L,threshold=D,t=T`` as the minicache policy takes them), then
runs a second request with the same prefix and another question, greedy. Prints the bytes each
cache holds, the second request's time to first token, and how many of its new tokens equal those
of the same request without any prefix cache (and how long the common start is).
"""

from __future__ import annotations

import argparse

import runtime
from runtime.generate import generate
from runtime.kv_policies import MiniCache
from runtime.prefix import PrefixCache
from runtime.text import Text

from kv_merge_angles import news_ids  # its neighbour in bench/ (the script's own folder is on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--prefix", type=int, default=512)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--spec", action="append", default=[], help="merge options, e.g. threshold=90 (repeatable)")
    args = parser.parse_args()
    session, text = runtime.load(args.artifact), Text(args.artifact)
    prefix = news_ids(args.artifact, args.prefix)
    first = prefix + text.encode("\nQuestion: who is mentioned first?\nAnswer:")
    second = prefix + text.encode("\nSummary of the text above:")
    fresh = generate(session, [second], max_new_tokens=args.new).tokens[0]
    print(f"prefix {len(prefix)} tokens, second request {len(second)} tokens, {args.new} new tokens (greedy)")
    print(f"{'prefix cache':<32}{'stored MB':>10}{'TTFT ms':>9}{'same tokens':>13}{'common start':>14}")
    for spec in [None] + args.spec:
        merge = None if spec is None else MiniCache.parse("minicache", spec).spec
        store = PrefixCache(merge=merge)
        generate(session, [first], max_new_tokens=1, prefix_cache=store)
        out = generate(session, [second], max_new_tokens=args.new, prefix_cache=store)
        tokens = out.tokens[0]
        same = sum(a == b for a, b in zip(tokens, fresh))
        start = next((i for i, (a, b) in enumerate(zip(tokens, fresh)) if a != b), len(tokens))
        name = "exact" if spec is None else f"merged {spec}"
        print(f"{name:<32}{store.nbytes() / 1e6:>10.2f}{out.ttft_s * 1e3:>9.1f}{same:>8}/{len(tokens):<4}{start:>14}")


if __name__ == "__main__":
    main()
