"""One forward step of a cached decoder: new tokens in, logits out, the KV cache advanced.

With ONNX Runtime the past is bound as input straight from the cache's buffers and the present
is bound as output into the cache's other half (``runtime.kv``), so nothing is copied on the
host; other backends (torch) get numpy feeds and their present is copied into the cache.
Extra outputs (``attention.{i}``, per-key attention received, when the artifact has them) are
returned for the eviction policies that need them. An artifact that skips layers positionally
(``skip_layers:mode=positional``) gets each step's ``skip_layers.count`` from its schedule, and its
skipped layers' caches do not grow (``runtime.kv_skip``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime import kv_skip
from runtime.kv import KVCache


class Stepper:
    def __init__(self, session: Any, cache: KVCache, skip: kv_skip.SkipSchedule | None = None):
        """``skip`` overrides a positionally skipping artifact's recorded schedule (measurements)."""
        self.session, self.cache = session, cache
        self.ort = getattr(session, "_ort", None)
        names = [spec["name"] for spec in session.outputs]
        self.extra = [n for n in names if n.startswith("attention.")]
        self.logits = names[0]
        self.skip = kv_skip.schedule_for(getattr(session, "manifest", None), skip)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> tuple[np.ndarray, dict]:
        cache = self.cache
        new = input_ids.shape[1]
        cache.check_room(new)
        totals = [n + new for n in cache.lengths]
        total = max(totals)
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if self.skip is not None:  # positional skipping: `count` layers from `first` keep their cache
            count = kv_skip.step_count(self.skip, cache.lengths, position_ids)
            feeds[kv_skip.COUNT] = np.array(count, np.int64)
            feeds.update(kv_skip.prefix_masks(feeds.pop("attention_mask"), cache.lengths, new))
            totals = kv_skip.present_lengths(cache.lengths, new, count, self.skip.first)
        elif cache.layout.layer_masks:  # the shared mask becomes one per layer
            feeds.update(_layer_masks(feeds.pop("attention_mask"), totals))
        if cache.layout.static:  # fixed-size buffers: say where the new tokens go, mask the empty slots
            feeds["cache_position"] = np.arange(cache.length, total, dtype=np.int64)
            feeds["attention_mask"] = np.pad(attention_mask, ((0, 0), (0, cache.layout.static - total)))
        if self.ort is not None and hasattr(self.ort, "io_binding"):
            logits, extra = self._bound(feeds, totals)
        else:
            logits, extra = self._plain(feeds, totals)
        cache.advance(totals)
        return logits, extra

    def _bound(self, feeds: dict, totals: list[int]) -> tuple[np.ndarray, dict]:
        io = self.ort.io_binding()
        for name, array in feeds.items():
            io.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in [self.logits] + self.extra:  # bound first: copy_outputs_to_cpu follows binding order
            io.bind_output(name, "cpu")
        layout = self.cache.layout
        for layer in range(len(layout.heads)):
            pairs = zip(layout.names(layer), layout.names(layer, "present"), layout.kinds)
            for kind, (past, present, spec) in enumerate(pairs):
                io.bind_cpu_input(past, self.cache.past(layer, kind))
                out = self.cache.next_buffer(layer, kind, totals[layer])
                io.bind_output(present, "cpu", 0, spec.dtype, list(out.shape), out.ctypes.data)
        self.ort.run_with_iobinding(io)
        values = io.copy_outputs_to_cpu()
        return values[0], dict(zip(self.extra, values[1:1 + len(self.extra)]))

    def _plain(self, feeds: dict, totals: list[int]) -> tuple[np.ndarray, dict]:
        layout = self.cache.layout
        for layer in range(len(layout.heads)):
            for kind, name in enumerate(layout.names(layer)):
                feeds[name] = self.cache.past(layer, kind)
        outs = self.session.run(feeds)
        for layer in range(len(layout.heads)):
            for kind, name in enumerate(layout.names(layer, "present")):
                self.cache.next_buffer(layer, kind, totals[layer])[...] = outs[name]
        return np.asarray(outs[self.logits]), {n: np.asarray(outs[n]) for n in self.extra}


def _layer_masks(mask: np.ndarray, totals: list[int]) -> dict[str, np.ndarray]:
    """Each layer's ``attention_mask.{i}``: the shared mask while the layers hold the same tokens;
    after per-layer eviction (one sequence, no padding) all ones of the layer's own length."""
    if len(set(totals)) == 1 and mask.shape[1] == totals[0]:
        return {f"attention_mask.{i}": mask for i in range(len(totals))}
    return {f"attention_mask.{i}": np.ones((mask.shape[0], n), mask.dtype) for i, n in enumerate(totals)}
