"""Angles between adjacent layers' cached K and V vectors (what MiniCache merging relies on).

    python bench/kv_merge_angles.py out/llm [--tokens 1000] [--pre-rope]

Prefills ``--tokens`` tokens of held-out news (as ``carve eval --kv-policies`` reads them) through
a ``kv_cache`` artifact and prints, for every pair of adjacent layers, percentiles of the angle
between the two layers' vectors per (token, head), and the fraction under 15/30/45/60 degrees.
``--pre-rope`` (SmolLM2 only, needs torch) also takes the keys before RoPE from the Hugging Face
model's ``k_proj`` outputs and prints how far their angles are from the cached (post-RoPE) ones.
"""

from __future__ import annotations

import argparse

import numpy as np

import runtime
from models import data
from runtime.kv import KVCache, KVLayout
from runtime.kv_merge import angles
from runtime.kv_step import Stepper
from runtime.text import Text

LIMITS = (15, 30, 45, 60)


def news_ids(artifact: str, tokens: int) -> list[int]:
    text, ids = Text(artifact), []
    for passage in data.texts("news", "eval"):
        ids += text.encode(passage + "\n", special=not ids)
        if len(ids) >= tokens:
            break
    return ids[:tokens]


def cached_kv(artifact: str, ids: list[int]) -> list[tuple[np.ndarray, ...]]:
    session = runtime.load(artifact)
    cache = KVCache(KVLayout.of(session.inputs), 1, len(ids))
    tokens = np.asarray([ids], np.int64)
    Stepper(session, cache)(tokens, np.ones_like(tokens), np.arange(len(ids))[None])
    return cache.snapshot()


def pre_rope_keys(ids: list[int]) -> list[np.ndarray]:
    import torch

    from models.smollm2 import load_causal_lm

    lm, keys = load_causal_lm(), []
    heads = lm.config.num_key_value_heads
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, i, out: keys.append(out.detach()))
             for layer in lm.model.layers]
    with torch.no_grad():
        lm(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    return [k.reshape(1, len(ids), heads, -1).transpose(1, 2).numpy() for k in keys]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--pre-rope", action="store_true")
    args = parser.parse_args()
    ids = news_ids(args.artifact, args.tokens)
    layers = cached_kv(args.artifact, ids)
    print(f"{len(ids)} tokens; angle in degrees between layer l and l+1 per (token, head)")
    print(f"{'pair':>7} {'kind':>5} {'p10':>6} {'p50':>6} {'p90':>6} " + " ".join(f"<{x:>3}" for x in LIMITS))
    for layer in range(len(layers) - 1):
        for kind, name in enumerate(("key", "value")):
            found = angles(layers[layer][kind], layers[layer + 1][kind]).ravel()
            cuts = np.percentile(found, [10, 50, 90])
            shares = " ".join(f"{(found < x).mean():4.0%}" for x in LIMITS)
            print(f"{layer:>3}-{layer + 1:<3} {name:>5} {cuts[0]:6.1f} {cuts[1]:6.1f} {cuts[2]:6.1f} {shares}")
    if args.pre_rope:
        keys = pre_rope_keys(ids)
        gaps = [np.abs(angles(keys[i], keys[i + 1]) - angles(layers[i][0], layers[i + 1][0])).max()
                for i in range(len(keys) - 1)]
        print(f"pre-RoPE against cached (post-RoPE) key angles: largest difference {max(gaps):.2e} degrees")


if __name__ == "__main__":
    main()
