"""Positional layer skipping (SkipDecode) measured: decode speed and what it costs in quality.

    python bench/skip_positional.py out/base base out/r12@0:0:0:0 none out/c4 c4 out/r12 r12 [--json FILE]

Each system is an artifact directory, optionally ``@min:max:start:end`` to replace its recorded
schedule at run time (from the same ``first`` block) (``runtime.kv_step.Stepper``'s ``skip``), followed by a label. The first
system is the reference: a cached decoder without skipping (``kv_cache:layer_masks=true``).

- **speed**: greedy decoding of ``--new-tokens`` tokens after a ``--prompt-tokens`` prompt by
  every system in lockstep (step t of each, in a rotating order, before step t + 1 of any), so
  load changes on a shared machine hit all alike; ``--runs`` rounds after a warm-up round;
  medians of each system's summed decode time (prefill excluded) and their ratio to the
  reference's.
- **greedy match**: ``--prompts`` prompts of held-out news, ``--new-tokens`` greedy tokens each,
  against the reference's tokens (``optimizer.metrics.greedy_match``: the fraction reproduced
  before the first difference), and the fraction of positions whose token is the same.
- **teacher forcing**: ``--texts`` windows of held-out news, a ``--prompt-tokens`` prefill then
  ``--forced-tokens`` tokens fed one at a time through the cache (each step skips what the
  schedule says at its position); perplexity of those tokens and the fraction of positions
  whose most likely next token equals the reference's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import runtime
from models import data
from optimizer import metrics
from runtime.kv import KVCache, KVLayout
from runtime.kv_skip import SkipSchedule
from runtime.kv_step import Stepper
from runtime.text import Text


def _systems(words: list[str]) -> list[dict]:
    systems = []
    for path, label in zip(words[::2], words[1::2]):
        path, _, spec = path.partition("@")
        session = runtime.load(path, threads=2)
        recorded = SkipSchedule.of(session.manifest)
        first = recorded.first if recorded is not None else 0  # the graph fixes where skipping starts
        skip = SkipSchedule(*map(int, spec.split(":")), first=first) if spec else None
        systems.append({"label": label, "path": path, "session": session, "skip": skip,
                        "schedule": (skip or SkipSchedule.of(session.manifest))})
    return systems


def _windows(path: str, count: int, length: int) -> list[np.ndarray]:
    """``count`` consecutive windows of ``length`` tokens of held-out news."""
    text, ids = Text(path), []
    for passage in data.texts("news", "eval"):
        ids += text.encode(passage + "\n", special=not ids)
        if len(ids) >= count * length:
            break
    return [np.asarray(ids[i * length:(i + 1) * length], np.int64) for i in range(count)]


def _decode(system: dict, prompt: np.ndarray, new: int, forced: np.ndarray | None = None):
    """Prefill, then ``new`` steps (greedy, or teacher-forced on ``forced``); returns the tokens
    chosen, each step's next-token logits, and the prefill and decode seconds."""
    session = system["session"]
    cache = KVCache(KVLayout.of(session.inputs), 1, len(prompt) + new + 1)
    step = Stepper(session, cache, system["skip"])
    ids = prompt[None]
    start = time.perf_counter()
    logits, _ = step(ids, np.ones_like(ids), np.arange(len(prompt))[None])
    prefill = time.perf_counter() - start
    chosen, rows = [], [logits[0, -1]]
    for t in range(new):
        token = int(rows[-1].argmax()) if forced is None else int(forced[t])
        chosen.append(token)
        if t == new - 1:
            break
        position = len(prompt) + t
        logits, _ = step(np.array([[token]]), np.ones((1, position + 1), np.int64), np.array([[position]]))
        rows.append(logits[0, -1])
    return chosen, np.stack(rows), prefill, time.perf_counter() - start - prefill


def speed(systems: list[dict], prompt: np.ndarray, new: int, runs: int) -> dict[str, dict]:
    """Decode time per system, in lockstep: step t of every system (rotating which goes first)
    before step t + 1 of any, so a change in the machine's load hits them alike."""
    times: dict[str, list[float]] = {s["label"]: [] for s in systems}
    for r in range(runs + 1):
        spent = _lockstep(systems, prompt, new)
        if r > 0:  # round 0 warms up
            for label, seconds in spent.items():
                times[label].append(seconds)
    base = statistics.median(times[systems[0]["label"]])
    return {label: {"decode_ms": statistics.median(t) * 1e3, "decode_tokens_per_s": (new - 1) / statistics.median(t),
                    "speedup": base / statistics.median(t), "runs_ms": [round(x * 1e3, 1) for x in t]}
            for label, t in times.items()}


def _lockstep(systems: list[dict], prompt: np.ndarray, new: int) -> dict[str, float]:
    """One greedy generation by every system, interleaved step by step; decode seconds each."""
    steppers, logits = [], []
    for s in systems:
        cache = KVCache(KVLayout.of(s["session"].inputs), 1, len(prompt) + new + 1)
        steppers.append(Stepper(s["session"], cache, s["skip"]))
        out, _ = steppers[-1](prompt[None], np.ones((1, len(prompt)), np.int64), np.arange(len(prompt))[None])
        logits.append(out[0, -1])
    spent = [0.0] * len(systems)
    for t in range(new - 1):
        position = len(prompt) + t
        order = list(range(len(systems)))
        for i in order[t % len(order):] + order[:t % len(order)]:
            token = np.array([[int(logits[i].argmax())]])
            start = time.perf_counter()
            out, _ = steppers[i](token, np.ones((1, position + 1), np.int64), np.array([[position]]))
            spent[i] += time.perf_counter() - start
            logits[i] = out[0, -1]
    return {s["label"]: seconds for s, seconds in zip(systems, spent)}


def greedy(systems: list[dict], prompts: list[np.ndarray], new: int) -> dict[str, dict]:
    tokens = {s["label"]: [_decode(s, p, new)[0] for p in prompts] for s in systems}
    ref = tokens[systems[0]["label"]]
    return {label: {"greedy_match": metrics.greedy_match(ref, t),
                    "same_position": float(np.mean([np.mean(np.equal(a, b)) for a, b in zip(ref, t)]))}
            for label, t in tokens.items()}


def forced(systems: list[dict], windows: list[np.ndarray], prompt_len: int) -> dict[str, dict]:
    out: dict[str, dict] = {}
    ref_top: list[np.ndarray] = []
    for s in systems:
        logp, agree = [], []
        for i, w in enumerate(windows):
            rest = w[prompt_len:]
            _, rows, _, _ = _decode(s, w[:prompt_len], len(rest), forced=rest)
            shifted = rows.astype(np.float64) - rows.max(-1, keepdims=True)
            lp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            logp.append(lp[np.arange(len(rest)), rest])
            top = rows.argmax(-1)
            if s is systems[0]:
                ref_top.append(top)
            agree.append(np.mean(top == ref_top[i]))
        out[s["label"]] = {"perplexity": float(np.exp(-np.concatenate(logp).mean())), "top1_agreement": float(np.mean(agree))}
    return out


def _line(label: str, result: dict) -> str:
    sp = result["speed"][label]
    line = (f"{label:<10} {str(result['schedules'][label]):<60} decode {sp['decode_tokens_per_s']:6.1f} tok/s "
            f"{sp['speedup']:5.2f}x")
    if "greedy" in result:
        gr, fo = result["greedy"][label], result["forced"][label]
        line += (f"  greedy match {gr['greedy_match']:.3f} same {gr['same_position']:.3f}  ppl {fo['perplexity']:7.2f} "
                 f"top1 {fo['top1_agreement']:.3f}")
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("systems", nargs="+", help="DIR[@min:max:start:end] LABEL pairs; the first is the reference")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--forced-tokens", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--texts", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--speed-only", action="store_true", help="skip the greedy and teacher-forced measurements")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    systems = _systems(args.systems)
    prompts = [w[:args.prompt_tokens] for w in _windows(systems[0]["path"], args.prompts, args.prompt_tokens)]
    windows = _windows(systems[0]["path"], args.texts, args.prompt_tokens + args.forced_tokens)
    result = {"schedules": {s["label"]: s["schedule"] and s["schedule"].to_json() for s in systems},
              "speed": speed(systems, prompts[0], args.new_tokens, args.runs), "args": vars(args)}
    if not args.speed_only:
        result["greedy"] = greedy(systems, prompts, args.new_tokens)
        result["forced"] = forced(systems, windows, args.prompt_tokens)
    for s in systems:
        print(_line(s["label"], result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
