"""Decode speed of a KV-cached decoder: Hugging Face (eager, torch.compile) against carve's torch target.

Each system prefills one prompt, then generates ``--new-tokens`` greedily one token per call,
keeping its KV cache on the device: Hugging Face through its own ``past_key_values``, carve
through the ``kv_cache`` pass's ``past_key_values.{i}.*`` inputs and ``present.{i}.*`` outputs
(``TorchSession.run_torch``, no host copies). Timed separately: the prefill call and the
decode loop; the row's speed is decode tokens per second. Token match is the fraction of
generated tokens equal to ``hf-eager``'s at the same position.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from torch_gpu import DEFAULT_PASSES, artifact, sync

Decode = Callable[[], tuple[list[int], float, float]]  # -> tokens, prefill seconds, decode seconds


def hf_decoder(lm, ids: torch.Tensor, new_tokens: int, device: torch.device) -> Decode:
    def run():
        with torch.inference_mode():
            sync(device)
            start = time.perf_counter()
            out = lm(input_ids=ids, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            sync(device)
            prefill = time.perf_counter() - start
            tokens, past = [token], out.past_key_values
            for _ in range(new_tokens - 1):
                out = lm(input_ids=token, past_key_values=past, use_cache=True)
                token, past = out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values
                tokens.append(token)
            sync(device)
        return [int(t) for t in torch.cat(tokens, 1)[0].tolist()], prefill, time.perf_counter() - start - prefill

    return run


def carve_decoder(session, ids: torch.Tensor, new_tokens: int, device: torch.device) -> Decode:
    keys = [s for s in session.inputs if s["name"].startswith("past_key_values.")]
    logits = session.outputs[0]["name"]

    def step(tokens: torch.Tensor, start: int, past: dict) -> tuple[torch.Tensor, dict]:
        total = start + tokens.shape[1]
        feeds = {"input_ids": tokens, "attention_mask": torch.ones(1, total, dtype=torch.int64, device=device),
                 "position_ids": torch.arange(start, total, device=device)[None], **past}
        out = session.run_torch(feeds)
        present = {s["name"]: out[s["name"].replace("past_key_values.", "present.")] for s in keys}
        return out[logits][:, -1].argmax(-1, keepdim=True), present

    def run():
        empty = {s["name"]: torch.zeros(1, s["shape"][1], 0, s["shape"][3], device=device) for s in keys}
        sync(device)
        start = time.perf_counter()
        token, past = step(ids, 0, empty)
        sync(device)
        prefill = time.perf_counter() - start
        tokens = [token]
        for i in range(new_tokens - 1):
            token, past = step(token, ids.shape[1] + i, past)
            tokens.append(token)
        sync(device)
        return [int(t) for t in torch.cat(tokens, 1)[0].tolist()], prefill, time.perf_counter() - start - prefill

    return run


def decoder_systems(name: str, passes: list[str], device: torch.device, ids: torch.Tensor, new_tokens: int,
                    work: Path, backend: str | None) -> dict[str, Decode]:
    import runtime
    from models.smollm2 import load_causal_lm

    lm = load_causal_lm().to(device).eval()
    try:
        lm.set_attn_implementation("sdpa")  # Hugging Face's fast attention path, where this version has it
    except (AttributeError, ValueError):
        pass
    systems = {"hf-eager": hf_decoder(lm, ids, new_tokens, device)}
    if backend:
        systems["hf-compile"] = hf_decoder(torch.compile(lm, dynamic=True, backend=backend), ids, new_tokens, device)
    for label, specs in (("carve-kv-fp32", ["kv_cache:max_positions=1024"]), ("carve-kv-opt", passes)):
        path = artifact(name, specs, work / f"{name}-{label}").path
        for compiled in (None, backend) if backend else (None,):
            session = runtime.load(path, device=str(device), compile=compiled or False)
            systems[label + ("-compile" if compiled else "")] = carve_decoder(session, ids, new_tokens, device)
    return systems


def bench_decoder(name: str, args, work: Path) -> dict:
    device = torch.device(args.device)
    ids = torch.randint(100, 49000, (1, args.prompt), generator=torch.Generator().manual_seed(0)).to(device)
    systems = decoder_systems(name, args.passes.get(name, DEFAULT_PASSES[name]), device, ids, args.new_tokens, work,
                              None if args.no_compile else args.compile_backend)
    for _ in range(max(1, args.warmup)):
        first = {n: run() for n, run in systems.items()}
    prefill: dict[str, list[float]] = {n: [] for n in systems}
    decode: dict[str, list[float]] = {n: [] for n in systems}
    for _ in range(args.runs):
        for n, run in systems.items():
            _, p, d = run()
            prefill[n].append(p)
            decode[n].append(d)
    reference = first["hf-eager"][0]
    base = statistics.median(decode["hf-eager"])
    rows = [{"system": n, "prefill_ms": statistics.median(prefill[n]) * 1e3,
             "decode_tokens_per_s": (args.new_tokens - 1) / statistics.median(decode[n]),
             "speedup": base / statistics.median(decode[n]),
             "match": sum(a == b for a, b in zip(first[n][0], reference)) / len(reference)} for n in systems]
    return {"model": name, "kind": "decode", "batch": 1, "seq": args.prompt, "new_tokens": args.new_tokens, "rows": rows}
