"""Positional layer skipping (SkipDecode) at run time: the schedule and what each step feeds.

An artifact made with ``skip_layers:mode=positional`` reads an int64 scalar input
``skip_layers.count``: a step with count ``s`` bypasses blocks ``first .. first+s-1`` (``first`` is
0 in SkipDecode proper; their hidden output is their input and their cache gets nothing new). The schedule that picks ``s`` lives in the pass's
record in the manifest; ``SkipSchedule.of(manifest)`` reads it back.

Cases:
- a prefill (more than one new token, or an empty cache) computes every layer: count 0;
- a decode step at position ``p`` (the largest ``position_ids`` of the batch, so every sequence
  shares one count) skips ``count(p)`` blocks; the schedule never decreases with ``p``, so a layer
  skipped once stays skipped and each layer's cache holds a prefix of the sequence;
- ``layer_masks``: layer ``i`` holds the first ``lengths[i]`` columns of the shared mask, so its
  own mask is that prefix plus the new tokens' columns (left padding stays masked);
- a plain ``Session.run`` without ``skip_layers.count`` gets 0 (every layer computed: exact);
- another schedule may replace the recorded one at run time (the graph depends only on ``first``
  and ``max``), as long as it starts at the same block and skips no more than ``max``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from runtime.errors import FeedError

COUNT = "skip_layers.count"


@dataclass(frozen=True)
class SkipSchedule:
    """Blocks skipped at position ``p``: ``min`` up to ``start``, ``max`` from ``end``, rising
    linearly (rounded down) in between; counted from block ``first`` upwards."""

    min: int
    max: int
    start: int
    end: int
    first: int = 0

    def count(self, position: int) -> int:
        if position <= self.start:
            return self.min
        if position >= self.end:
            return self.max
        return self.min + (self.max - self.min) * (position - self.start) // (self.end - self.start)

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def of(cls, manifest: dict[str, Any] | None) -> "SkipSchedule | None":
        """The schedule of an artifact's positional skip_layers pass, or None without one."""
        for record in (manifest or {}).get("passes", []):
            details = record.get("details", {})
            if record.get("name") == "skip_layers" and details.get("mode") == "positional" and "schedule" in details:
                return cls(**details["schedule"])
        return None


def schedule_for(manifest: dict[str, Any] | None, override: SkipSchedule | None) -> SkipSchedule | None:
    """The artifact's schedule, or ``override`` when it fits the artifact (it may not skip blocks
    the graph cannot bypass)."""
    recorded = SkipSchedule.of(manifest)
    if override is None:
        return recorded
    if recorded is None or override.max > recorded.max:
        can = 0 if recorded is None else recorded.max
        raise FeedError(f"the schedule skips up to {override.max} blocks but this artifact can bypass {can}; make it "
                        f"with skip_layers:mode=positional,max={override.max} or lower the schedule's max.")
    if override.first != recorded.first:
        raise FeedError(f"the schedule skips from block {override.first} but this artifact bypasses blocks from "
                        f"{recorded.first}; give first={recorded.first}.")
    return override


def step_count(schedule: SkipSchedule, lengths: list[int], position_ids: np.ndarray) -> int:
    """The count a step feeds: 0 for a prefill, else the schedule at the newest position."""
    if position_ids.shape[1] > 1 or max(lengths) == 0:
        return 0
    return schedule.count(int(position_ids[:, -1].max()))


def present_lengths(lengths: list[int], new: int, count: int, first: int) -> list[int]:
    """Each layer's cached tokens after the step: skipped layers do not grow."""
    return [n if first <= layer < first + count else n + new for layer, n in enumerate(lengths)]


def prefix_masks(mask: np.ndarray, lengths: list[int], new: int) -> dict[str, np.ndarray]:
    """``attention_mask.{i}`` per layer: the prefix of the shared mask the layer holds, then the
    new tokens' columns (what the graph's mask for that layer spans, skipped or not)."""
    return {f"attention_mask.{i}": np.concatenate([mask[:, :n], mask[:, mask.shape[1] - new:]], axis=1)
            for i, n in enumerate(lengths)}


def default_count(inputs: list[dict], feeds: dict) -> dict:
    """``feeds`` with count 0 added when the artifact skips positionally and none was given."""
    if COUNT in feeds or not any(spec["name"] == COUNT for spec in inputs):
        return feeds
    return {**feeds, COUNT: np.zeros((), np.int64)}
