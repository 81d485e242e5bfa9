"""The generation half of ``carve bench`` for decoders: tokens per second for a fixed prompt.

ORT fp32 on the plain trace (the baseline) has no KV cache, so it generates greedily by
recomputing the whole sequence for every new token; so does an artifact made without the
``kv_cache`` pass. An artifact with a KV cache generates through ``runtime.generate`` (prefill
once, then one token per step), and Hugging Face ``generate()`` keeps its own KV cache. The
table says which system does what. Every system generates exactly ``new_tokens`` tokens (no
stop at end-of-sequence), so the counts are equal, and the tokens are compared with ORT fp32's
(the greedy-match metric). The prompt is the first ``prompt_tokens`` tokens of held-out text,
or a fixed sentence when none is asked for.

A generation takes seconds, long enough for a shared machine's load to change in the middle
of one, so the recomputing systems run in lockstep: step t of each system (rotating which goes
first) before step t + 1 of any, and each system's time is the sum of its own steps. Load
changes then hit them alike. ``generate()`` is one call and is timed whole, between rounds.

An artifact with a self-draft (``skip_layers:draft=true``) gets a ``carve-speculative`` row too:
greedy speculative decoding (``runtime.speculative``, gamma chosen online by the UCBSpec bandit),
timed whole beside the plain cached row; its tokens must match ORT fp32's like every other row.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from optimizer import metrics
from optimizer.bench_systems import PAUSE_S, System, measured, skipped, tensor_bytes
from optimizer.eval_text import PROMPTS
from optimizer.progress import Progress

NEW_TOKENS = 32
PROMPT = PROMPTS[0]
RECOMPUTE = "greedy, recomputes the full sequence per token (no KV cache)"
CACHED = "greedy, runtime.generate with the artifact's KV cache"
ORDER = ["carve", "carve-speculative", "ort-fp32", "hf-generate"]
# Built-ins whose Hugging Face causal LM can run generate(): name -> loader.
HF_LOADERS = {"smollm2-135m": ("models.smollm2", "load_causal_lm")}


def bench_generation(spec, carve: System, baseline: System, want_hf: bool, runs: int, threads: int,
                     progress: Progress, artifact=None, new_tokens: int = NEW_TOKENS,
                     prompt_tokens: int | None = None) -> dict[str, Any]:
    """Time greedy generation of ``new_tokens`` tokens, interleaved, and compare the tokens."""
    tok = spec.tokenizer()
    prompt, prompt_text = bench_prompt(tok, prompt_tokens)
    cached = _cached_system(artifact, prompt, new_tokens, threads, carve)
    stepped = ([] if cached is not None else [_recompute("carve", carve)]) + [_recompute("ort-fp32", baseline)]
    whole: list[System] = [cached] if cached is not None else []
    if cached is not None:
        whole += _speculative_systems(artifact, prompt, new_tokens, threads)
    if want_hf:
        with progress.step("loading the Hugging Face model for generate()"):
            whole.append(measured("hf-generate", lambda: _hf_system(spec, prompt, tok, threads, new_tokens)))
    ready = [s for s in stepped if s.skipped is None]
    calls = [s for s in whole if s.skipped is None]
    with progress.step(f"timing generation of {new_tokens} tokens ({runs} interleaved runs each)"):
        _lockstep(ready, prompt, new_tokens, keep=False)  # warm-up
        for s in calls:
            s.outputs = s.run()
        for r in range(runs):
            _round(ready, calls, prompt, new_tokens, hf_first=r % 2 == 1)
    table = sorted(stepped + whole, key=lambda s: ORDER.index(s.name))
    return {"prompt": prompt_text, "prompt_tokens": int(prompt.shape[1]), "new_tokens": new_tokens, "runs": runs,
            "rows": _rows(table, new_tokens)}


def bench_prompt(tok, prompt_tokens: int | None) -> tuple[np.ndarray, str]:
    """The benchmark prompt: a fixed sentence, or ``prompt_tokens`` tokens of held-out Shakespeare."""
    if prompt_tokens is None:
        return np.asarray(tok(PROMPT)["input_ids"], dtype=np.int64)[None], PROMPT
    from models import data

    ids: list[int] = []
    for text in data.texts("shakespeare", "eval"):
        ids += tok(text + "\n")["input_ids"]
        if len(ids) >= prompt_tokens:
            break
    return np.asarray(ids[:prompt_tokens], dtype=np.int64)[None], f"{prompt_tokens} tokens of held-out Shakespeare"


def _cached_system(artifact, prompt: np.ndarray, new_tokens: int, threads: int, carve: System) -> System | None:
    """The artifact generating through its KV cache, when it has one."""
    from runtime.manifest import read_manifest

    if artifact is None or not any(i["name"].startswith("past_key_values") for i in read_manifest(artifact)["inputs"]):
        return None
    import runtime
    from runtime.generate import generate

    session = runtime.load(artifact, threads=threads)
    run = lambda: np.asarray(generate(session, [prompt[0].tolist()], max_new_tokens=new_tokens).tokens[0])  # noqa: E731
    return System("carve", run, carve.size_bytes, CACHED, peak_mem_bytes=carve.peak_mem_bytes)


def _speculative_systems(artifact, prompt: np.ndarray, new_tokens: int, threads: int) -> list[System]:
    """The artifact's self-draft proposing and the model verifying, gamma chosen by the bandit;
    none without a draft. Its note reports the last run's acceptance and the bandit's pulls."""
    from runtime.draft import draft_path

    if draft_path(artifact) is None:
        return []
    import runtime
    from runtime.draft import load_draft
    from runtime.speculative import speculative_generate

    session, draft = runtime.load(artifact, threads=threads, spin=False), load_draft(artifact, threads=threads)
    system = System("carve-speculative", None, _bytes(artifact), "")

    def run() -> np.ndarray:
        result = speculative_generate(session, draft, [prompt[0].tolist()], max_new_tokens=new_tokens, gamma="auto")
        system.note = f"greedy, {result.notes[0]}"
        return np.asarray(result.tokens[0])

    system.run = run
    return [system]


def _bytes(artifact) -> int:
    """The artifact's files on disk, its draft's included."""
    from pathlib import Path

    return sum(p.stat().st_size for p in Path(artifact).rglob("*") if p.is_file())


def _round(stepped: list[System], calls: list[System], prompt: np.ndarray, new_tokens: int, hf_first: bool) -> None:
    """One timed generation by every system; which half goes first alternates."""
    def time_calls() -> None:
        for s in calls:
            time.sleep(PAUSE_S)
            start = time.perf_counter()
            s.run()
            s.times.append(time.perf_counter() - start)

    if hf_first:
        time_calls()
    _lockstep(stepped, prompt, new_tokens, keep=True)
    if not hf_first:
        time_calls()


def _lockstep(systems: list[System], prompt: np.ndarray, new_tokens: int, keep: bool) -> None:
    """Generate ``new_tokens`` with every system, one step of each in turn; record the times."""
    ids = {s.name: prompt for s in systems}
    spent = {s.name: 0.0 for s in systems}
    for step in range(new_tokens):
        k = step % len(systems) if systems else 0
        for s in systems[k:] + systems[:k]:
            feeds = {"input_ids": ids[s.name], "attention_mask": np.ones_like(ids[s.name])}
            time.sleep(PAUSE_S / 4)
            start = time.perf_counter()
            logits = s.run(feeds)
            spent[s.name] += time.perf_counter() - start
            ids[s.name] = np.concatenate([ids[s.name], logits[:, -1].argmax(-1)[:, None].astype(np.int64)], axis=1)
    for s in systems:
        s.outputs = ids[s.name][0, prompt.shape[1]:]
        if keep:
            s.times.append(spent[s.name])


def _recompute(name: str, base: System) -> System:
    """A system whose ``run(feeds)`` returns the logits of the base system on any sequence."""
    if base.skipped is not None or base.run_feeds is None:
        return skipped(name, base.skipped or "cannot run other inputs")
    run_feeds = base.run_feeds
    note = RECOMPUTE + (" (baseline)" if name == "ort-fp32" else "")
    return System(name, lambda feeds: run_feeds(feeds)["logits"], base.size_bytes, note,
                  peak_mem_bytes=base.peak_mem_bytes)


def _hf_system(spec, prompt: np.ndarray, tok, threads: int, new_tokens: int) -> System:
    import importlib

    import torch

    if spec.name not in HF_LOADERS:
        return skipped("hf-generate", f"{spec.name} is a plain torch module without Hugging Face generate()")
    module, attr = HF_LOADERS[spec.name]
    torch.set_num_threads(threads)
    lm = getattr(importlib.import_module(module), attr)()
    _quiet_generation_config(lm)
    ids = torch.from_numpy(prompt)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def run() -> np.ndarray:
        out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
        return out[0, prompt.shape[1]:].numpy()

    return System("hf-generate", run, tensor_bytes(lm), "transformers generate(), greedy, with its KV cache (torch eager)")


def _quiet_generation_config(lm) -> None:
    """Drop sampling settings from the checkpoint's generation config: greedy decoding ignores
    them, and transformers warns about each one on every call."""
    config = getattr(lm, "generation_config", None)
    for name in ("temperature", "top_p", "top_k"):
        if config is not None and getattr(config, name, None) is not None:
            setattr(config, name, None)


def _rows(systems: list[System], new_tokens: int) -> list[dict[str, Any]]:
    base = next((s for s in systems if s.name == "ort-fp32" and s.times), None)
    base_ms = statistics.median(base.times) * 1e3 if base else None
    rows = []
    for s in systems:
        if s.skipped is not None or not s.times:
            rows.append({"system": s.name, "skipped": s.skipped or "not run"})
            continue
        ms = statistics.median(s.times) * 1e3
        match = metrics.greedy_match([base.outputs], [s.outputs]) if base else None
        rows.append({"system": s.name, "tokens_per_s": new_tokens / (ms / 1e3), "median_ms": ms,
                     "speedup": (base_ms / ms) if base_ms else None, "token_match": match,
                     "peak_mem_mb": _mb(s.peak_mem_bytes), "size_mb": _mb(s.size_bytes), "note": s.note})
    return rows


def _mb(n: int | None) -> float | None:
    return None if n is None else n / 1e6
