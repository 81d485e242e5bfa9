"""Text generation with a KV-cached decoder artifact (made by the ``kv_cache`` pass).

``generate(session, prompts, ...)`` takes token ids (one list per prompt), prefills them in one
call, then decodes one token per step through the cache (``runtime.kv``), choosing tokens with
``runtime.sampling``. Batched prompts are left-padded (the attention mask hides the padding,
positions count real tokens only, as Hugging Face ``generate()`` does). A row stops at a stop
token; the call stops when every row has or at ``max_new_tokens``. ``callback(step, tokens)``
sees each step's tokens as they come (streaming). An eviction ``policy``
(``runtime.kv_policies``) may drop cached tokens between steps; a ``prefix_cache``
(``runtime.prefix``) lets a request reuse the KV of a prompt prefix seen before.

The result has the tokens, time to first token, tokens per second and the KV bytes held.
Text in and out (tokenizer, chat template) is ``runtime.text``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.errors import FeedError
from runtime.kv import KVCache, KVLayout
from runtime.kv_skip import SkipSchedule
from runtime.kv_step import Stepper
from runtime.sampling import Sampler


@dataclass
class Generation:
    tokens: list[list[int]]
    prompt_tokens: list[int]
    ttft_s: float
    seconds: float
    kv_bytes: int
    reused_prefix: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        rest = self.new_tokens - len(self.tokens)
        return rest / (self.seconds - self.ttft_s) if self.seconds > self.ttft_s else float("inf")

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "ttft_ms": self.ttft_s * 1e3, "seconds": self.seconds, "tokens_per_s": self.tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s, "kv_bytes": self.kv_bytes,
                "reused_prefix_tokens": self.reused_prefix, "notes": self.notes}


def generate(session: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, sampler: Sampler | None = None,
             stop_tokens: Sequence[int] = (), pad_token: int = 0, callback: Callable[[int, np.ndarray], None] | None = None,
             policy: Any = None, prefix_cache: Any = None, capacity: int | None = None) -> Generation:
    """Generate up to ``max_new_tokens`` tokens after each prompt (lists of token ids)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise FeedError("generate needs at least one prompt, each with at least one token.")
    if max_new_tokens < 1:
        raise FeedError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    sampler = sampler or Sampler()
    ids, mask = _left_pad(prompts, pad_token)
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    layout = KVLayout.of(session.inputs)
    if policy is not None:
        policy.check(layout, [o["name"] for o in session.outputs])
        if SkipSchedule.of(getattr(session, "manifest", None)) is not None:  # evicting breaks the skipped layers' prefixes
            raise FeedError("KV eviction does not combine with positional layer skipping; generate without a policy.")
    cache = KVCache(layout, len(prompts), capacity or ids.shape[1] + max_new_tokens)
    cache.check_room(ids.shape[1] + max_new_tokens - 1 if policy is None else ids.shape[1])
    step = Stepper(session, cache)
    start = time.perf_counter()
    reused = prefix_cache.restore(cache, ids) if prefix_cache is not None and len(prompts) == 1 else 0
    logits, extra = step(ids[:, reused:], mask, positions[:, reused:])
    if prefix_cache is not None and len(prompts) == 1:
        prefix_cache.store(ids[0], cache)
    out, done = [[] for _ in prompts], np.zeros(len(prompts), bool)
    stops = np.asarray(list(stop_tokens), np.int64)
    ttft = None
    for t in range(max_new_tokens):
        chosen = np.where(done, pad_token, sampler(logits[:, -1]))
        ttft = ttft if ttft is not None else time.perf_counter() - start
        for row, token in enumerate(chosen):
            if not done[row]:
                out[row].append(int(token))
        if callback is not None:
            callback(t, chosen)
        done |= np.isin(chosen, stops)
        if done.all() or t == max_new_tokens - 1:
            break
        if policy is not None:
            mask = policy.apply(cache, mask, extra)
        mask = np.concatenate([mask, np.ones((len(prompts), 1), mask.dtype)], axis=1)
        positions = positions[:, -1:] + 1
        logits, extra = step(chosen[:, None].astype(np.int64), mask, positions)
    seconds = time.perf_counter() - start
    notes = [policy.describe()] if policy is not None else []
    return Generation(out, [len(p) for p in prompts], ttft or seconds, seconds, cache.nbytes(), reused, notes)


def _left_pad(prompts: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask
