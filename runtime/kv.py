"""The KV cache of a cached decoder artifact: its layout, preallocated buffers, and the step call.

An artifact made with the ``kv_cache`` pass reads ``past_key_values.{i}.key|value`` and writes
``present.{i}.key|value`` (past and new tokens). ``KVCache`` holds two flat buffers per tensor,
each big enough for ``capacity`` tokens, and ping-pongs between them: step ``t`` reads the past
from one and ONNX Runtime writes the present straight into the other (IO binding), so decoding
allocates nothing per step and the host never concatenates. Eviction policies
(``runtime.kv_policies``) rewrite the kept columns in place.

Cases: any batch; ``capacity`` fixed when the cache is made (a longer request is refused with a
clear message); sessions without IO binding (the torch backend) get the same buffers through
plain ``run`` calls.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from runtime.errors import FeedError

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")


@dataclass(frozen=True)
class KVLayout:
    """Per layer (kv_heads, head_dim), the dtype, and the names of the cache inputs/outputs."""

    layers: list[tuple[int, int]]
    dtype: np.dtype
    static: int | None = None  # slots of a fixed-size cache (kv_cache:static=N), None when it grows

    @classmethod
    def of(cls, inputs: list[dict]) -> "KVLayout":
        found: dict[int, tuple[int, int]] = {}
        dtype, static = np.dtype(np.float32), None
        for spec in inputs:
            match = _PAST.match(spec["name"])
            if match:
                shape = spec["shape"]
                found[int(match.group(1))] = (int(shape[1]), int(shape[3]))
                dtype = np.dtype(spec["dtype"])
                static = shape[2] if isinstance(shape[2], int) else None
        if not found:
            raise FeedError("this artifact has no KV cache (no past_key_values inputs); make it with "
                            "`carve optimize MODEL -o DIR --passes kv_cache` to generate with it.")
        return cls([found[i] for i in range(len(found))], dtype, static)

    def bytes_per_token(self) -> int:
        return sum(2 * h * d for h, d in self.layers) * self.dtype.itemsize


def prefill_feeds(inputs: list[dict], feeds: dict) -> dict:
    """Feeds for a cached decoder run without a cache: an empty past and positions counted from
    the attention mask, so the artifact computes what the full-sequence graph did (a prefill)."""
    names = {spec["name"] for spec in inputs}
    if not any(_PAST.match(n) for n in names) or any(_PAST.match(k) for k in feeds) or "input_ids" not in feeds:
        return dict(feeds)
    ids = np.asarray(feeds["input_ids"])
    out = dict(feeds)
    mask = np.asarray(out.setdefault("attention_mask", np.ones_like(ids)))
    if "position_ids" in names and "position_ids" not in out:
        out["position_ids"] = np.maximum(mask.cumsum(-1) - 1, 0).astype(np.int64)
    layout = KVLayout.of(inputs)
    for layer, (heads, dim) in enumerate(layout.layers):
        for word in ("key", "value"):
            out[f"past_key_values.{layer}.{word}"] = np.zeros((ids.shape[0], heads, 0, dim), layout.dtype)
    return out


class KVCache:
    """Buffers for ``batch`` sequences of up to ``capacity`` tokens; ``length`` tokens are filled."""

    def __init__(self, layout: KVLayout, batch: int, capacity: int):
        self.layout, self.batch = layout, batch
        self.capacity = layout.static or capacity  # a static cache has exactly its slots
        self.length = 0
        # zeros, not empty: a static cache attends over unfilled slots (masked, but NaN * 0 is NaN)
        self._bufs = [[np.zeros(batch * h * self.capacity * d, layout.dtype) for _ in range(4)] for h, d in layout.layers]
        self._front = 0  # which half of each quad (0: buffers 0/1, 1: buffers 2/3) holds the past

    def shape(self, layer: int, length: int) -> tuple[int, int, int, int]:
        h, d = self.layout.layers[layer]
        return (self.batch, h, length, d)

    def past(self, layer: int, kind: int) -> np.ndarray:
        """The past of one layer's key (kind 0) or value (kind 1), as a contiguous view: the filled
        tokens, or every slot of a static cache."""
        shape = self.shape(layer, self.layout.static or self.length)
        return self._bufs[layer][2 * self._front + kind][:int(np.prod(shape))].reshape(shape)

    def next_buffer(self, layer: int, kind: int, length: int) -> np.ndarray:
        """Where the present of ``length`` tokens goes (the half that does not hold the past)."""
        shape = self.shape(layer, self.layout.static or length)
        return self._bufs[layer][2 * (1 - self._front) + kind][:int(np.prod(shape))].reshape(shape)

    def require_growing(self, what: str) -> None:
        if self.layout.static:
            raise FeedError(f"{what} needs a cache that grows; this artifact has a static {self.layout.static}-slot "
                            "cache (kv_cache:static); make it without static.")

    def advance(self, length: int) -> None:
        """The step wrote its present into the back half: it becomes the past."""
        self._front, self.length = 1 - self._front, length

    def check_room(self, new: int) -> None:
        if self.length + new > self.capacity:
            raise FeedError(f"the request needs {self.length + new} cached tokens but the cache holds {self.capacity}; "
                            "ask for fewer new tokens, a shorter prompt, or a larger capacity.")

    def keep(self, columns: np.ndarray | list[np.ndarray]) -> None:
        """Keep only these token columns (per layer when a list), in order: eviction."""
        self.require_growing("KV eviction")
        per_layer = columns if isinstance(columns, list) else [columns] * len(self.layout.layers)
        lengths = {len(c) for c in per_layer}
        if len(lengths) != 1:
            raise ValueError("every layer must keep the same number of tokens (the graph shares one mask)")
        new_length = lengths.pop()
        for layer, cols in enumerate(per_layer):
            for kind in (0, 1):
                kept = np.take(self.past(layer, kind), cols, axis=2)
                self.next_buffer(layer, kind, new_length)[...] = kept
        self.advance(new_length)

    def load(self, arrays: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Fill the cache from per-layer (key, value) arrays of the same batch (a prefix hit)."""
        self.require_growing("the prefix cache")
        length = arrays[0][0].shape[2]
        self.length = 0
        self.check_room(length)
        for layer, pair in enumerate(arrays):
            for kind in (0, 1):
                self.next_buffer(layer, kind, length)[...] = pair[kind]
        self.advance(length)

    def snapshot(self, length: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Copies of the first ``length`` cached tokens of every layer."""
        n = self.length if length is None else length
        return [(self.past(i, 0)[:, :, :n].copy(), self.past(i, 1)[:, :, :n].copy()) for i in range(len(self.layout.layers))]

    def nbytes(self) -> int:
        return self.length * self.batch * self.layout.bytes_per_token()
