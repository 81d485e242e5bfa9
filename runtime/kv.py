"""The KV cache of a cached decoder artifact: its layout, preallocated buffers, and the step call.

An artifact made with the ``kv_cache`` pass reads ``past_key_values.{i}.key|value`` and writes
``present.{i}.key|value`` (past and new tokens); an int8 cache (``kv_cache:kv=int8``) also has
``key_scale``/``value_scale`` tensors (one float per head and token). ``KVCache`` holds two flat
buffers per tensor, each big enough for ``capacity`` tokens, and ping-pongs between them: step
``t`` reads the past from one and ONNX Runtime writes the present straight into the other (IO
binding), so decoding allocates nothing per step and the host never concatenates. Eviction
policies (``runtime.kv_policies``) rewrite the kept columns in place.

Cases: any batch; ``capacity`` fixed when the cache is made (a longer request is refused with a
clear message); a static cache (``kv_cache:static=N``) whose buffers are its N slots; sessions
without IO binding (the torch backend) get the same buffers through plain ``run`` calls.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from runtime.errors import FeedError
from runtime.kv_skip import default_count

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value|key_scale|value_scale)$")
_ORDER = ("key", "value", "key_scale", "value_scale")


@dataclass(frozen=True)
class Kind:
    """One cached tensor per layer: its name suffix, per-token width and dtype."""

    suffix: str
    width: int
    dtype: np.dtype


@dataclass(frozen=True)
class KVLayout:
    """Per layer the kv_heads and the cached tensors (``kinds``); ``static`` slots or None."""

    heads: list[int]
    kinds: list[Kind]
    static: int | None = None  # slots of a fixed-size cache (kv_cache:static=N), None when it grows
    layer_masks: bool = False  # each layer reads attention_mask.{i} and may hold its own length

    @classmethod
    def of(cls, inputs: list[dict]) -> "KVLayout":
        heads: dict[int, int] = {}
        kinds: dict[str, Kind] = {}
        static = None
        for spec in inputs:
            match = _PAST.match(spec["name"])
            if match:
                shape = spec["shape"]
                heads[int(match.group(1))] = int(shape[1])
                kinds[match.group(2)] = Kind(match.group(2), int(shape[3]), np.dtype(spec["dtype"]))
                static = shape[2] if isinstance(shape[2], int) else None
        if not heads:
            raise FeedError("this artifact has no KV cache (no past_key_values inputs); make it with "
                            "`carve optimize MODEL -o DIR --passes kv_cache` to generate with it.")
        layer_masks = any(spec["name"].startswith("attention_mask.") for spec in inputs)
        return cls([heads[i] for i in range(len(heads))], [kinds[k] for k in _ORDER if k in kinds], static, layer_masks)

    @property
    def layers(self) -> list[tuple[int, int]]:
        """(kv_heads, head_dim) per layer."""
        return [(h, self.kinds[0].width) for h in self.heads]

    def bytes_per_token(self, layer: int | None = None) -> int:
        heads = self.heads if layer is None else [self.heads[layer]]
        return sum(h * k.width * k.dtype.itemsize for h in heads for k in self.kinds)

    def names(self, layer: int, prefix: str = "past_key_values") -> list[str]:
        return [f"{prefix}.{layer}.{k.suffix}" for k in self.kinds]


def prefill_feeds(inputs: list[dict], feeds: dict) -> dict:
    """Feeds for a cached decoder run without a cache: an empty past and positions counted from
    the attention mask, so the artifact computes what the full-sequence graph did (a prefill).
    A positionally skipping artifact not told how many layers to skip computes them all."""
    feeds = default_count(inputs, feeds)
    names = {spec["name"] for spec in inputs}
    if not any(_PAST.match(n) for n in names) or any(_PAST.match(k) for k in feeds) or "input_ids" not in feeds:
        return dict(feeds)
    ids = np.asarray(feeds["input_ids"])
    out = dict(feeds)
    mask = np.asarray(out.setdefault("attention_mask", np.ones_like(ids)))
    if "position_ids" in names and "position_ids" not in out:
        out["position_ids"] = np.maximum(mask.cumsum(-1) - 1, 0).astype(np.int64)
    layout = KVLayout.of(inputs)
    if layout.layer_masks:
        out.update({f"attention_mask.{i}": mask for i in range(len(layout.heads))})
        out.pop("attention_mask")
    for layer, heads in enumerate(layout.heads):
        for name, kind in zip(layout.names(layer), layout.kinds):
            out[name] = np.zeros((ids.shape[0], heads, layout.static or 0, kind.width), kind.dtype)
    return out


class KVCache:
    """Buffers for ``batch`` sequences of up to ``capacity`` tokens; ``length`` tokens are filled."""

    def __init__(self, layout: KVLayout, batch: int, capacity: int):
        self.layout, self.batch = layout, batch
        self.capacity = layout.static or capacity  # a static cache has exactly its slots
        self.lengths = [0] * len(layout.heads)  # equal unless per-layer eviction made them differ
        # per layer and kind two halves; zeros, not empty: a static cache attends over unfilled
        # slots (masked, but NaN * 0 is NaN)
        self._bufs = [[[np.zeros(batch * h * self.capacity * k.width, k.dtype) for _ in range(2)] for k in layout.kinds]
                      for h in layout.heads]
        self._front = 0  # which half holds the past

    def shape(self, layer: int, kind: int, length: int) -> tuple[int, int, int, int]:
        return (self.batch, self.layout.heads[layer], length, self.layout.kinds[kind].width)

    def past(self, layer: int, kind: int) -> np.ndarray:
        """The past of one layer's tensor (index into ``layout.kinds``), as a contiguous view: the
        filled tokens, or every slot of a static cache."""
        shape = self.shape(layer, kind, self.layout.static or self.lengths[layer])
        return self._bufs[layer][kind][self._front][:int(np.prod(shape))].reshape(shape)

    def next_buffer(self, layer: int, kind: int, length: int) -> np.ndarray:
        """Where the present of ``length`` tokens goes (the half that does not hold the past)."""
        shape = self.shape(layer, kind, self.layout.static or length)
        return self._bufs[layer][kind][1 - self._front][:int(np.prod(shape))].reshape(shape)

    def require_growing(self, what: str) -> None:
        if self.layout.static:
            raise FeedError(f"{what} needs a cache that grows; this artifact has a static {self.layout.static}-slot "
                            "cache (kv_cache:static); make it without static.")

    @property
    def length(self) -> int:
        """Cached tokens (the longest layer's, when per-layer eviction made them differ)."""
        return max(self.lengths)

    def advance(self, lengths: int | list[int]) -> None:
        """The step wrote its present into the back half: it becomes the past."""
        self._front = 1 - self._front
        self.lengths = list(lengths) if isinstance(lengths, list) else [lengths] * len(self.lengths)

    def check_room(self, new: int) -> None:
        if self.length + new > self.capacity:
            raise FeedError(f"the request needs {self.length + new} cached tokens but the cache holds {self.capacity}; "
                            "ask for fewer new tokens, a shorter prompt, or a larger capacity.")

    def keep(self, columns: np.ndarray | list[np.ndarray]) -> None:
        """Keep only these token columns (per layer when a list), in order: eviction."""
        self.require_growing("KV eviction")
        per_layer = columns if isinstance(columns, list) else [columns] * len(self.layout.heads)
        if len({len(c) for c in per_layer}) != 1 and not self.layout.layer_masks:
            raise FeedError("this artifact's layers share one attention mask, so every layer must keep the same "
                            "number of tokens; make it with kv_cache:layer_masks=true for per-layer budgets.")
        for layer, cols in enumerate(per_layer):
            for kind in range(len(self.layout.kinds)):
                kept = np.take(self.past(layer, kind), cols, axis=2)
                self.next_buffer(layer, kind, len(cols))[...] = kept
        self.advance([len(c) for c in per_layer])

    def load(self, arrays: list[tuple[np.ndarray, ...]]) -> None:
        """Fill the cache from per-layer arrays (one per kind) of the same batch (a prefix hit)."""
        self.require_growing("the prefix cache")
        length = arrays[0][0].shape[2]
        self.lengths = [0] * len(self.lengths)
        self.check_room(length)
        for layer, tensors in enumerate(arrays):
            for kind, array in enumerate(tensors):
                self.next_buffer(layer, kind, length)[...] = array
        self.advance(length)

    def snapshot(self, length: int | None = None) -> list[tuple[np.ndarray, ...]]:
        """Copies of the first ``length`` cached tokens of every layer (one array per kind)."""
        n = self.length if length is None else length
        return [tuple(self.past(i, k)[:, :, :n].copy() for k in range(len(self.layout.kinds)))
                for i in range(len(self.layout.heads))]

    def nbytes(self) -> int:
        return self.batch * sum(n * self.layout.bytes_per_token(i) for i, n in enumerate(self.lengths))
