"""Prefix cache: requests that start with the same tokens reuse the KV computed for them.

Prompts are cut into blocks of ``block`` tokens; each block's key is a hash chained over every
block before it (so a key names a whole prefix, as in vLLM's automatic prefix caching). After a
prefill, the prompt's KV is stored once and every full block's key points at it. A new request
looks up its blocks in order; the longest hit is copied into its cache, and only the rest of the
prompt is prefilled. At least one prompt token is always recomputed (its logits choose the first
new token). Entries are dropped oldest first beyond ``max_bytes``.

With ``merge`` (a ``runtime.kv_merge.MergeSpec``), entries are stored MiniCache-merged: per pair
of adjacent deep layers one direction per token and head plus each layer's norm (pairs further
apart than the threshold kept whole), and reconstructed when reused, so ``nbytes()`` really
shrinks while reuse becomes approximate. Merging needs a float cache (not ``kv_cache:kv=int8``)
and a model with at least two layers from the spec's start; otherwise ``store`` refuses.

Exact without ``merge``: a token's K and V depend only on the tokens before it, and RoPE
positions are absolute, so reused entries equal what the prefill would compute (up to float
summation order).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from runtime.kv import KVCache
from runtime.kv_merge import MergedLayers, MergeSpec

Entry = list[tuple[np.ndarray, ...]] | MergedLayers


class PrefixCache:
    def __init__(self, block: int = 16, max_bytes: int = 1 << 30, merge: MergeSpec | None = None):
        self.block, self.max_bytes, self.merge = block, max_bytes, merge
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._keys: dict[bytes, tuple[int, int]] = {}  # prefix hash -> (entry id, tokens)
        self._next = 0
        self.hits = 0

    def _chain(self, ids: np.ndarray):
        digest = b""
        for end in range(self.block, len(ids) + 1, self.block):
            digest = hashlib.sha256(digest + ids[end - self.block:end].astype(np.int64).tobytes()).digest()
            yield digest, end

    def restore(self, cache: KVCache, ids: np.ndarray) -> int:
        """Load the longest stored prefix of ``ids [1, n]`` (leaving one token) into ``cache``."""
        best = None
        for digest, end in self._chain(ids[0, :-1]):
            if digest not in self._keys:
                break
            best = self._keys[digest]
        if best is None:
            return 0
        entry, tokens = best
        self._entries.move_to_end(entry)
        stored = self._entries[entry]
        layers = stored.restore() if isinstance(stored, MergedLayers) else stored
        cache.load([tuple(a[:, :, :tokens] for a in tensors) for tensors in layers])
        self.hits += 1
        return tokens

    def store(self, ids: np.ndarray, cache: KVCache) -> None:
        """Remember the KV of the prompt ``ids [n]`` just prefilled into ``cache``."""
        blocks = list(self._chain(ids))
        if not blocks or blocks[-1][0] in self._keys:
            return
        snapshot = cache.snapshot(blocks[-1][1])
        stored = snapshot if self.merge is None else MergedLayers(snapshot, self.merge)
        entry, self._next = self._next, self._next + 1
        self._entries[entry] = stored
        for digest, end in blocks:
            self._keys[digest] = (entry, end)
        self._trim()

    def nbytes(self) -> int:
        """Bytes the stored entries take (merged entries at their merged size)."""
        return sum(_entry_bytes(e) for e in self._entries.values())

    def _trim(self) -> None:
        while len(self._entries) > 1 and self.nbytes() > self.max_bytes:
            old, _ = self._entries.popitem(last=False)
            self._keys = {d: (e, n) for d, (e, n) in self._keys.items() if e != old}


def _entry_bytes(entry: Entry) -> int:
    if isinstance(entry, MergedLayers):
        return entry.nbytes
    return sum(a.nbytes for tensors in entry for a in tensors)
