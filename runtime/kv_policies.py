"""KV eviction policies: which cached tokens to keep when the cache is over its budget.

Given as ``name:key=value,...`` (``carve generate --kv-policy``, ``make_policy``):
- ``window:size=N``: the last N tokens (a sliding window);
- ``sinks:size=N,sinks=S``: StreamingLLM, the first S tokens (attention sinks) plus the most
  recent ones, N in all;
- ``heavy:size=N,sinks=S,recent=R``: heavy hitters (H2O; Keyformer's accumulated-attention
  score without its Gumbel noise): the sinks, the R most recent tokens, and the tokens that
  received the most attention so far, N in all. Needs an artifact made with
  ``kv_cache:scores=true`` (its ``attention.{i}`` outputs); the choice is made per layer, the
  same count in every layer (the graph's one attention mask covers all layers);
- ``pyramid:size=N,...`` and ``adaptive:size=N,...``: heavy hitters with per-layer budgets
  averaging N, falling with depth (PyramidKV) or set from how spread each layer's attention is
  (DynamicKV-like). Need ``kv_cache:scores=true,layer_masks=true`` (one mask per layer);
- ``minicache:from=L,threshold=D,window=W,sinks=S,t=T``: no eviction; tokens older than the W
  most recent, except the first S (attention sinks, default 0), have their K and V in layer pairs (L, L+1), (L+2, L+3), ... replaced by MiniCache's
  reconstruction (``runtime.kv_merge``: one shared direction per pair, each layer's norm, pairs
  more than D degrees apart kept as they are). The graph still reads full per-layer K and V, so
  the accuracy effect is real; the bytes reported are those of the merged representation. It is
  one policy on its own (it does not combine with eviction); on an int8 cache it merges the
  dequantized vectors and requantizes them.

A policy runs between decoding steps when the cache is full: it evicts down to ``size`` minus
one sixteenth (at least one token), so the compaction runs once every few steps rather than on
every step, and the cache never holds more than ``size`` tokens. It keeps the cached
keys as they are (rotated at their original positions), and new tokens keep counting positions
from where they were, so nothing is recomputed. ``describe()`` says how many tokens and bytes
were evicted. StreamingLLM re-numbers positions inside the cache, which needs keys stored before
RoPE; carve's cache holds them after RoPE, so positions keep their original values here.
"""

from __future__ import annotations

import abc

import numpy as np

from runtime.errors import FeedError
from runtime.kv import KVCache
from runtime.kv_merge import (MergeSpec, describe_saving, merge_pair, merged_bytes, parse_number, read_vectors,
                              vector_bytes, write_vectors)


class Policy(abc.ABC):
    name = "policy"

    def __init__(self, size: int, sinks: int = 0, recent: int = 0):
        if size < 2 or sinks < 0 or recent < 0 or sinks + recent >= size:
            raise FeedError(f"KV policy {self.name} needs size >= 2 and sinks + recent < size; got size={size}, "
                            f"sinks={sinks}, recent={recent}.")
        self.size, self.sinks, self.recent = size, sinks, recent
        self.evicted_tokens = 0
        self.evicted_bytes = 0

    def apply(self, cache: KVCache, mask: np.ndarray, extra: dict) -> np.ndarray:
        """Shrink the cache so one more token fits in ``size``; returns the mask of kept tokens."""
        self.observe(cache, extra)
        if cache.length < self.size:
            return mask
        if cache.batch != 1:
            raise FeedError("KV eviction runs on one sequence at a time (padded rows would evict different tokens); "
                            "generate prompts one by one with a KV policy.")
        keep = self.choose(cache.length, self.size - max(1, self.size // 16))
        before, old = cache.nbytes(), cache.length
        cache.keep(keep)
        self.evicted_tokens += old - cache.length
        self.evicted_bytes += before - cache.nbytes()
        self.forget(keep)
        return mask[:, keep[0] if isinstance(keep, list) else keep]

    @classmethod
    def parse(cls, name: str, rest: str) -> "Policy":
        """The policy from its options ``key=value,...`` (all integers)."""
        options = {}
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            if key not in ("size", "sinks", "recent") or not value.isdigit():
                raise FeedError(f"KV policy option {item!r} is not one of size=N, sinks=N, recent=N.")
            options[key] = int(value)
        if "size" not in options:
            raise FeedError(f"KV policy {name} needs size=N (tokens to keep).")
        return cls(**options)

    def check(self, layout, outputs: list[str]) -> None:
        """Refuse, before anything is generated, an artifact this policy cannot work with."""

    def held_bytes(self, cache: KVCache) -> int:
        """The bytes the cache's tokens take in this policy's representation."""
        return cache.nbytes()

    def observe(self, cache: KVCache, extra: dict) -> None:
        pass

    def forget(self, keep) -> None:
        pass

    @abc.abstractmethod
    def choose(self, length: int, budget: int):
        """The token columns to keep: ``budget`` of the ``length`` cached (per layer when a list)."""

    def describe(self) -> str:
        return (f"KV policy {self.name} (size {self.size}): evicted {self.evicted_tokens} token slots, "
                f"{self.evicted_bytes / 1e6:.1f} MB of KV")


class Window(Policy):
    name = "window"

    def choose(self, length: int, budget: int) -> np.ndarray:
        return np.arange(length - budget, length)


class Sinks(Policy):
    name = "sinks"

    def choose(self, length: int, budget: int) -> np.ndarray:
        return np.concatenate([np.arange(self.sinks), np.arange(length - (budget - self.sinks), length)])


class Heavy(Policy):
    name = "heavy"

    def __init__(self, size: int, sinks: int = 4, recent: int = 0):
        super().__init__(size, sinks, recent or max(1, size // 4))
        self.scores: list[np.ndarray] | None = None

    def check(self, layout, outputs: list[str]) -> None:
        if not any(name.startswith("attention.") for name in outputs):
            raise FeedError(f"KV policy {self.name} needs attention scores: make the artifact with "
                            "`--passes kv_cache:scores=true`.")

    def observe(self, cache: KVCache, extra: dict) -> None:
        layers = [extra.get(f"attention.{i}") for i in range(len(cache.layout.layers))]
        if any(a is None for a in layers):
            raise FeedError("KV policy heavy needs attention scores: make the artifact with "
                            "`--passes kv_cache:scores=true`.")
        got = [a.sum(0) for a in layers]  # over the batch: one selection serves every row
        if self.scores is None:
            self.scores = got
        else:
            self.scores = [np.concatenate([s, np.zeros(len(g) - len(s))]) + g for s, g in zip(self.scores, got)]

    def choose(self, length: int, budget: int) -> list[np.ndarray]:
        return [self.heavy(layer, length, budget) for layer in range(len(self.scores))]

    def heavy(self, layer: int, length: int, budget: int) -> np.ndarray:
        """The sinks, the most recent tokens, and the most attended of the rest: ``budget`` in all."""
        fixed = np.concatenate([np.arange(self.sinks), np.arange(length - self.recent, length)])
        rest = np.setdiff1d(np.arange(length), fixed)
        top = rest[np.argsort(-self.scores[layer][rest], kind="stable")[: budget - len(fixed)]]
        return np.sort(np.concatenate([fixed, top]))

    def forget(self, keep) -> None:
        self.scores = [s[k] for s, k in zip(self.scores, keep)]


class Pyramid(Heavy):
    """Per-layer budgets falling linearly with depth, 1.5x the average ``size`` at the first layer
    and 0.5x at the last (PyramidKV); heavy hitters within each layer's budget."""

    name = "pyramid"

    def check(self, layout, outputs: list[str]) -> None:
        super().check(layout, outputs)
        if not layout.layer_masks:
            raise FeedError(f"KV policy {self.name} gives layers different budgets, which needs one attention mask "
                            "per layer: make the artifact with `--passes kv_cache:scores=true,layer_masks=true`.")

    def budgets(self, layers: int) -> np.ndarray:
        return np.maximum((self.size * np.linspace(1.5, 0.5, layers)).astype(int), self.sinks + self.recent + 2)

    def apply(self, cache: KVCache, mask: np.ndarray, extra: dict) -> np.ndarray:
        self.observe(cache, extra)
        budgets = self.budgets(len(cache.lengths))
        if all(n < b for n, b in zip(cache.lengths, budgets)):
            return mask
        if cache.batch != 1:
            raise FeedError("KV eviction runs on one sequence at a time; generate prompts one by one with a KV policy.")
        keep = [np.arange(n) if n < b else self.heavy(i, n, b - max(1, b // 16))
                for i, (n, b) in enumerate(zip(cache.lengths, budgets))]
        before, old = cache.nbytes(), sum(cache.lengths)
        cache.keep(keep)
        self.evicted_tokens += old - sum(cache.lengths)
        self.evicted_bytes += before - cache.nbytes()
        self.forget(keep)
        return mask[:, keep[0]]


class Adaptive(Pyramid):
    """Per-layer budgets from the attention itself (in the manner of DynamicKV): when the cache
    first fills, each layer's budget is made proportional to how many tokens carry 90% of the
    attention it has paid so far, then fixed; the budgets add up to ``size`` per layer."""

    name = "adaptive"
    _budgets: np.ndarray | None = None

    def budgets(self, layers: int) -> np.ndarray:
        if self._budgets is None:
            if self.scores is None or max(len(s) for s in self.scores) < self.size:
                return np.full(layers, self.size)
            spread = np.array([_tokens_for(s, 0.9) for s in self.scores], float)
            raw = spread / spread.sum() * self.size * layers
            self._budgets = np.clip(raw.astype(int), self.sinks + self.recent + 2, 2 * self.size)
        return self._budgets


def _tokens_for(scores: np.ndarray, mass: float) -> int:
    ordered = np.sort(scores)[::-1]
    return int(np.searchsorted(np.cumsum(ordered), mass * ordered.sum()) + 1)


class MiniCache(Policy):
    """MiniCache merging of adjacent layers' KV in the live cache (``runtime.kv_merge``): before
    each step, the tokens that have left the ``window`` most recent (the first ``sinks`` tokens
    excepted) get their merged pairs' K and V replaced by the reconstruction (norm times the
    shared direction), once each. Nothing is evicted; ``held_bytes`` counts merged tokens at the merged representation's size."""

    name = "minicache"

    def __init__(self, window: int = 64, spec: MergeSpec = MergeSpec(), sinks: int = 0):
        if window < 1 or sinks < 0:
            raise FeedError(f"KV policy minicache needs window >= 1 (recent tokens kept unmerged) and sinks >= 0 "
                            f"(first tokens kept unmerged), got window={window}, sinks={sinks}.")
        self.size, self.sinks, self.recent = window, sinks, window  # eval prefills size - 1 tokens
        self.window, self.spec = window, spec
        self.evicted_tokens = self.evicted_bytes = 0
        self.done = sinks  # tokens from the sinks up to this column are merged
        self.vectors = self.retained = self.saved_bytes = 0

    @classmethod
    def parse(cls, name: str, rest: str) -> "MiniCache":
        options: dict = {}
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            if key not in ("from", "threshold", "window", "sinks", "t"):
                raise FeedError(f"KV policy option {item!r} is not one of from=L, threshold=DEGREES, window=N, "
                                "sinks=S, t=T.")
            options[key] = parse_number(key, value)
        for key in ("from", "window", "sinks"):
            if key in options and options[key] != int(options[key]):
                raise FeedError(f"minicache option {key} needs a whole number, got {options[key]}.")
        spec = MergeSpec(None if "from" not in options else int(options["from"]),
                         options.get("threshold", MergeSpec.threshold), options.get("t", MergeSpec.t))
        return cls(int(options.get("window", 64)), spec, int(options.get("sinks", 0)))

    def check(self, layout, outputs: list[str]) -> None:
        for first, second in self.spec.pairs(len(layout.heads)):
            if layout.heads[first] != layout.heads[second]:
                raise FeedError(f"minicache cannot merge layers {first} and {second}: they cache "
                                f"{layout.heads[first]} and {layout.heads[second]} KV heads; start from another layer.")

    def apply(self, cache: KVCache, mask: np.ndarray, extra: dict) -> np.ndarray:
        end = cache.length - self.window
        if end <= self.done:
            return mask
        self.check(cache.layout, [])
        suffixes = [k.suffix for k in cache.layout.kinds]
        for first, second in self.spec.pairs(len(cache.layout.heads)):
            for kind in ("key", "value"):
                index = suffixes.index(kind)
                scale = suffixes.index(f"{kind}_scale") if f"{kind}_scale" in suffixes else None
                merged = merge_pair(read_vectors(cache, first, index, scale, self.done, end),
                                    read_vectors(cache, second, index, scale, self.done, end), self.spec)
                for layer, rebuilt in zip((first, second), merged.reconstruct()):
                    write_vectors(cache, layer, index, scale, self.done, end, rebuilt, merged.merged_mask)
                width = vector_bytes(cache.layout.kinds, index, scale)
                self.vectors += merged.vectors
                self.retained += len(merged.retained)
                self.saved_bytes += 2 * merged.vectors * width - merged_bytes(merged.vectors, len(merged.retained), width)
        self.done = end
        return mask

    def choose(self, length: int, budget: int) -> np.ndarray:
        return np.arange(length)  # merging evicts nothing

    def held_bytes(self, cache: KVCache) -> int:
        return cache.nbytes() - self.saved_bytes

    def describe(self) -> str:
        merged = self.vectors - self.retained
        return (f"KV policy minicache (window {self.window}, sinks {self.sinks}, threshold {self.spec.threshold:g} "
                f"degrees): merged {merged} of {self.vectors} (token, head) vector pairs in merged layer pairs, K and V "
                f"counted apart ({self.retained} retained unmerged), " + describe_saving(self.saved_bytes))


POLICIES: dict[str, type[Policy]] = {"window": Window, "sinks": Sinks, "heavy": Heavy, "pyramid": Pyramid, "adaptive": Adaptive,
            "minicache": MiniCache}


def make_policy(spec: str | None) -> Policy | None:
    """A policy from ``name:key=value,...``; None for no eviction."""
    if not spec:
        return None
    name, _, rest = spec.partition(":")
    if name not in POLICIES:
        raise FeedError(f"unknown KV policy {name!r}; the policies are: {', '.join(POLICIES)}.")
    return POLICIES[name].parse(name, rest)
