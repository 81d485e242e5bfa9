"""Speculative decoding with self-drafts against plain cached greedy decoding, side by side.

    python bench/speculative.py out/llm-d4 [out/llm-d8@1,3,auto ...] [--gammas 1,2,3,4,6,auto] [--runs 3]
        [--new-tokens 128] [--prompts chat|shakespeare] [--count 4]

``DIR@1,3,auto`` gives one artifact its own gammas. Every artifact must have a self-draft (``skip_layers:...,draft=true``); the first one's main model
is used for every row, so drafts made from the same model are compared on one target (their main
graphs are the same). Each run generates ``--new-tokens`` greedy tokens (no stop at end of
sequence) for every prompt with every system, in rotating order (interleaved, so a shared
machine's load hits all alike), after one warm-up run each. Reported per system: median seconds
of a run (all prompts), tokens/s, speed-up over plain cached greedy (as ``carve generate`` runs
it, and with ONNX Runtime's thread spinning off, as the speculative rows run), acceptance rate,
tokens per round, whether every token equals plain greedy decoding, and for ``auto`` the bandit's
pulls.

Prompts: ``chat`` wraps the first ``--count`` of ``optimizer.eval_text.PROMPTS`` in the chat template; ``shakespeare``
continues 128 tokens of held-out Shakespeare (as ``carve bench --prompt-tokens 128``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import runtime
from runtime.draft import load_draft
from runtime.generate import generate
from runtime.manifest import read_manifest
from runtime.speculative import speculative_generate
from runtime.text import Text


def prompts(artifact: str, kind: str, count: int) -> list[list[int]]:
    text = Text(artifact)
    if kind == "chat":
        from optimizer.eval_text import PROMPTS

        return [text.chat(p, None) for p in PROMPTS[:count]]
    from models import data

    ids: list[int] = []
    for passage in data.texts("shakespeare", "eval"):
        ids += text.encode(passage + "\n")
        if len(ids) >= 128:
            break
    return [ids[:128]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--gammas", default="1,2,3,4,6,auto")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompts", choices=("chat", "shakespeare"), default="chat")
    parser.add_argument("--count", type=int, default=4, help="chat prompts (of optimizer.eval_text.PROMPTS)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()
    gammas = {a.split("@")[0]: a.split("@")[1] for a in args.artifacts if "@" in a}
    args.artifacts = [a.split("@")[0] for a in args.artifacts]
    spinning = runtime.load(args.artifacts[0], threads=args.threads)  # as plain `carve generate` loads it
    model = runtime.load(args.artifacts[0], threads=args.threads, spin=False)  # as --speculative loads it
    drafts = {a: load_draft(a, threads=args.threads) for a in args.artifacts}
    skipped = {a: len(read_manifest(a)["draft"]["skipped"]) for a in args.artifacts}
    inputs = prompts(args.artifacts[0], args.prompts, args.count)
    systems = {"plain": lambda p: generate(spinning, [p], max_new_tokens=args.new_tokens),
               "plain, no spin": lambda p: generate(model, [p], max_new_tokens=args.new_tokens)}
    for a, draft in drafts.items():
        for gamma in (gammas.get(a) or args.gammas).split(","):
            systems[f"skip {skipped[a]}, gamma={gamma}"] = (
                lambda p, d=draft, g=gamma: speculative_generate(model, d, [p], max_new_tokens=args.new_tokens, gamma=g))
    times, results = defaultdict(list), defaultdict(list)
    names = list(systems)
    for run in range(args.runs + 1):  # run 0 is the warm-up
        order = names[run % len(names):] + names[:run % len(names)]
        for name in order:
            start = time.perf_counter()
            outs = [systems[name](p) for p in inputs]
            if run:
                times[name].append(time.perf_counter() - start)
                results[name] = outs
    rows = [_row(name, times, results, len(inputs) * args.new_tokens) for name in names]
    for row in rows:
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"prompts": args.prompts, "new_tokens": args.new_tokens, "runs": args.runs, "rows": rows},
                      handle, indent=1)


def _row(name: str, times, results, tokens: int) -> dict:
    seconds = statistics.median(times[name])
    plain = statistics.median(times["plain"])
    quiet = statistics.median(times["plain, no spin"])
    outs = results[name]
    row = {"system": name, "median_s": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
           "speedup": round(plain / seconds, 3), "speedup_vs_no_spin": round(quiet / seconds, 3),
           "same_tokens": [o.tokens for o in outs] == [o.tokens for o in results["plain"]]}
    if hasattr(outs[0], "acceptance_rate"):
        drafted, accepted = sum(o.drafted for o in outs), sum(o.accepted for o in outs)
        row.update(acceptance=round(accepted / max(drafted, 1), 3),
                   tokens_per_round=round(sum(o.new_tokens for o in outs) / sum(o.rounds for o in outs), 2))
        if outs[0].bandit:
            pulls: dict[str, int] = defaultdict(int)
            for o in outs:
                for arm, v in o.bandit["arms"].items():
                    pulls[arm] += v["pulls"]
            row["pulls"] = dict(pulls)
    return row


if __name__ == "__main__":
    main()
