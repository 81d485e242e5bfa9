"""Decode speed of a KV-cached torch-target artifact against Hugging Face's own cached decoding.

Each system prefills one prompt (held-out Shakespeare, ``prompt_tokens`` long), then generates
``new_tokens`` greedily, one token per call, with its KV cache on the device: Hugging Face
through its ``past_key_values`` (eager, and under ``torch.compile``), carve through the
``kv_cache`` pass's ``past_key_values.{i}.*`` inputs and ``present.{i}.*`` outputs
(``TorchSession.run_torch``: no host copies). Prefill and the decode loop are timed separately;
the row's speed is decode tokens per second, its match the fraction of generated tokens equal
to ``hf-eager``'s at the same position.
"""

from __future__ import annotations

import importlib
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from optimizer.bench import BenchError
from optimizer.bench_generate import HF_LOADERS, bench_prompt
from optimizer.bench_torch import artifact_systems, sync
from optimizer.progress import Progress

Decode = Callable[[], tuple[list[int], float, float]]  # -> tokens, prefill seconds, decode seconds


def bench_decode(spec, artifacts: dict[str, Path], device: str, runs: int, warmup: int, backend: str | None,
                 prompt_tokens: int, new_tokens: int, progress: Progress) -> dict[str, Any]:
    import torch

    if spec.name not in HF_LOADERS:
        raise BenchError(f"{spec.name} has no Hugging Face causal LM to compare decoding with.")
    for path in artifacts.values():
        _check_layout(path)
    prompt, text = bench_prompt(spec.tokenizer(), prompt_tokens)
    ids = torch.from_numpy(prompt).to(device)
    with progress.step(f"loading {spec.name} (Hugging Face) and the artifact on {device}"):
        systems = decode_systems(spec, artifacts, ids, new_tokens, device, backend)
    with progress.step(f"timing ({warmup} warm-up and {runs} interleaved generations of {len(systems)} systems)"):
        first = {n: run() for n, run in systems.items()}
        for _ in range(max(0, warmup - 1)):
            for run in systems.values():
                run()
        prefill: dict[str, list[float]] = {n: [] for n in systems}
        decode: dict[str, list[float]] = {n: [] for n in systems}
        for _ in range(runs):
            for n, run in systems.items():
                _, p, d = run()
                prefill[n].append(p)
                decode[n].append(d)
    reference = first["hf-eager"][0]
    base = statistics.median(decode["hf-eager"])
    rows = [{"system": n, "prefill_ms": statistics.median(prefill[n]) * 1e3,
             "decode_tokens_per_s": (new_tokens - 1) / statistics.median(decode[n]),
             "speedup": base / statistics.median(decode[n]),
             "match": sum(a == b for a, b in zip(first[n][0], reference)) / len(reference)} for n in systems]
    return {"kind": "decode", "batch": 1, "prompt": text, "prompt_tokens": int(ids.shape[1]),
            "new_tokens": new_tokens, "rows": rows}


def _check_layout(artifact: Path) -> None:
    from runtime.kv import KVLayout
    from runtime.manifest import read_manifest

    layout = KVLayout.of(read_manifest(artifact)["inputs"])
    if layout.static or layout.layer_masks or len(layout.kinds) != 2:
        raise BenchError(f"{artifact} has a static, per-layer-mask or int8 KV cache; the torch decode bench runs the "
                         "default growing cache (`--passes kv_cache` without options).")


def decode_systems(spec, artifacts: dict[str, Path], ids, new_tokens: int, device: str, backend: str | None) -> dict[str, Decode]:
    import torch

    module, attr = HF_LOADERS[spec.name]
    lm = getattr(importlib.import_module(module), attr)().to(device).eval()
    try:
        lm.set_attn_implementation("sdpa")  # Hugging Face's fast attention path, where this version has it
    except (AttributeError, ValueError):
        pass
    systems = {"hf-eager": hf_decoder(lm, ids, new_tokens)}
    if backend:
        systems["hf-compile"] = hf_decoder(torch.compile(lm, dynamic=True, backend=backend), ids, new_tokens)
    for label, path in artifacts.items():
        systems |= artifact_systems(path, device, backend, lambda s: carve_decoder(s, ids, new_tokens), label)
    return systems


def hf_decoder(lm, ids, new_tokens: int) -> Decode:
    import torch

    def run():
        with torch.inference_mode():
            sync(ids.device)
            start = time.perf_counter()
            out = lm(input_ids=ids, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            sync(ids.device)
            prefill = time.perf_counter() - start
            tokens, past = [token], out.past_key_values
            for _ in range(new_tokens - 1):
                out = lm(input_ids=token, past_key_values=past, use_cache=True)
                token, past = out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values
                tokens.append(token)
            sync(ids.device)
        return [int(t) for t in torch.cat(tokens, 1)[0].tolist()], prefill, time.perf_counter() - start - prefill

    return run


def carve_decoder(session, ids, new_tokens: int) -> Decode:
    import torch

    keys = [s for s in session.inputs if s["name"].startswith("past_key_values.")]
    logits = session.outputs[0]["name"]
    device = ids.device

    def step(tokens, start: int, past: dict):
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
