"""MiniCache-style merging of adjacent layers' KV: one shared direction plus each layer's norm.

In the middle-to-deep layers of a decoder, the K (and V) vector a token has in layer l points
in nearly the same direction as in layer l+1 (MiniCache). A merged pair of layers keeps, per
token and head, one direction (the SLERP of both unit directions at ``t``, 0.5 by default) and
each layer's norm; a layer's vector is reconstructed as its norm times the shared direction.
Token pairs whose angle exceeds ``threshold`` degrees are retained: both vectors are kept as
they are (full size, plus an index).

Cases:
- layers pair up as (from, from+1), (from+2, from+3), ... to the last layer; an odd layer left
  at the end stays whole, and so do the layers before ``from``. The default ``from`` is the
  middle layer (``layers // 2``), moved down so that at least one pair exists;
- a model with one layer, or a ``from`` that leaves no pair, is refused with a FeedError;
- ``threshold=0`` merges nothing (every vector is kept exactly); two identical layers merge with
  no loss beyond float rounding;
- a zero vector has no direction: its angle to anything counts as 90 degrees, and if merged it
  is reconstructed as zero (its norm) while the other layer keeps its own direction; opposite
  vectors (180 degrees) have no interpolated direction and always stay unmerged;
- keys are cached after RoPE. Both layers' keys at one position are rotated by the same
  orthogonal matrix (same head_dim, same frequencies), which keeps their norms and the angle
  between them, and SLERP commutes with it: merging post-RoPE keys is the same as merging them
  before RoPE and rotating afterwards.

``merge_pair`` compresses one pair of ``[batch, heads, tokens, head_dim]`` float arrays into a
``MergedPair`` (what a store holds); ``MergedLayers`` does it for a whole cache snapshot (the
prefix cache's merged entries); ``merged_bytes`` is the byte count of that representation,
which the live-cache policy (``runtime.kv_policies.MiniCache``) reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.errors import FeedError
from runtime.kv import KVCache

NORM_BYTES = 4  # one float32 norm per layer, token and head
INDEX_BYTES = 4  # one int32 index per retained token and head
SCALE_FLOOR = 1e-8  # as in the int8 cache graph (passes.kv_cache_int8): a zero vector keeps a usable scale


@dataclass(frozen=True)
class MergeSpec:
    """Which layers merge and how: ``start`` (None: the middle layer), ``threshold`` in degrees
    (token pairs further apart stay unmerged), ``t`` (the SLERP interpolation weight)."""

    start: int | None = None
    threshold: float = 30.0
    t: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 180:
            raise FeedError(f"minicache threshold must be an angle in degrees from 0 to 180, got {self.threshold}; "
                            "pairs of vectors at that angle or wider stay unmerged.")
        if not 0 <= self.t <= 1:
            raise FeedError(f"minicache t must be between 0 and 1 (the SLERP weight of the second layer), got {self.t}.")
        if self.start is not None and self.start < 0:
            raise FeedError(f"minicache from must be a layer index (0 or more), got {self.start}.")

    def pairs(self, layers: int) -> list[tuple[int, int]]:
        """The merged layer pairs of a model with ``layers`` layers."""
        if layers < 2:
            raise FeedError(f"minicache merges pairs of adjacent layers, and this model has {layers} layer; "
                            "use another KV policy for it.")
        start = min(layers // 2, layers - 2) if self.start is None else self.start
        if start > layers - 2:
            raise FeedError(f"minicache from={start} leaves no pair of layers to merge: this model has {layers} "
                            f"layers (0 to {layers - 1}); choose from={layers - 2} or lower.")
        return [(layer, layer + 1) for layer in range(start, layers - 1, 2)]


def parse_number(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise FeedError(f"minicache option {key}={value!r} needs a number.") from None


def angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle in degrees between ``a`` and ``b`` along the last axis (90 where either is zero)."""
    return np.degrees(np.arccos(np.clip((_unit(a) * _unit(b)).sum(-1), -1.0, 1.0)))


def slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Spherical interpolation between unit vectors (last axis), renormalised; at t=0.5 it is the
    direction of ``a + b``. Nearly parallel or opposite pairs (sine near 0) fall back to the linear
    blend, which for parallel ones is the same direction and for opposite ones zero."""
    cos = np.clip((a * b).sum(-1, keepdims=True), -1.0, 1.0)
    omega = np.arccos(cos)
    sin = np.sin(omega)
    safe = sin > 1e-6
    wa = np.where(safe, np.sin((1 - t) * omega) / np.where(safe, sin, 1), 1 - t)
    wb = np.where(safe, np.sin(t * omega) / np.where(safe, sin, 1), t)
    return _unit(wa * a + wb * b)


@dataclass
class MergedPair:
    """One merged pair of layers' K or V: ``direction [b, h, n, d]`` (the shared unit direction;
    at retained positions layer a's own vector), ``norms [b, h, n, 2]``, the flat indices of the
    retained (token, head) positions and layer b's own vectors there (``second [r, d]``)."""

    direction: np.ndarray
    norms: np.ndarray
    retained: np.ndarray
    second: np.ndarray

    @property
    def vectors(self) -> int:
        return int(np.prod(self.direction.shape[:3]))

    @property
    def merged(self) -> int:
        return self.vectors - len(self.retained)

    @property
    def merged_mask(self) -> np.ndarray:
        """``[b, h, n]``: true where the pair was merged (not retained)."""
        mask = np.ones(self.direction.shape[:3], bool)
        mask.reshape(-1)[self.retained] = False
        return mask

    @property
    def nbytes(self) -> int:
        return self.direction.nbytes + self.norms.nbytes + self.retained.nbytes + self.second.nbytes

    def reconstruct(self) -> tuple[np.ndarray, np.ndarray]:
        """Both layers' arrays: norm times the shared direction, retained positions as they were."""
        a = self.direction * self.norms[..., :1]
        b = self.direction * self.norms[..., 1:]
        width = a.shape[-1]
        flat_a, flat_b = a.reshape(-1, width), b.reshape(-1, width)
        flat_a[self.retained] = self.direction.reshape(-1, width)[self.retained]
        flat_b[self.retained] = self.second
        return a, b


def merge_pair(a: np.ndarray, b: np.ndarray, spec: MergeSpec) -> MergedPair:
    """Merge layer a's and layer b's ``[batch, heads, tokens, head_dim]`` float vectors."""
    norms = np.stack([np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)], -1).astype(a.dtype)
    unit_a, unit_b = _unit(a), _unit(b)
    direction = slerp(unit_a, unit_b, spec.t).astype(a.dtype)
    # strictly below the threshold, so threshold 0 merges nothing, not even parallel pairs; opposite
    # vectors have no interpolated direction (it comes out zero) and stay unmerged too
    keep = ~(angles(a, b) < spec.threshold) | ~direction.any(-1)
    retained = np.flatnonzero(keep).astype(np.int32)
    width = a.shape[-1]
    direction.reshape(-1, width)[retained] = a.reshape(-1, width)[retained]
    return MergedPair(direction, norms, retained, b.reshape(-1, width)[retained].copy())


def merged_bytes(vectors: int, retained: int, one_vector: int) -> int:
    """Bytes of a merged pair of ``vectors`` (token, head) positions per layer, a vector taking
    ``one_vector`` bytes: one direction and two norms each, plus the retained positions' second
    vector and index."""
    return vectors * (one_vector + 2 * NORM_BYTES) + retained * (one_vector + INDEX_BYTES)


def describe_saving(saved: int) -> str:
    """What merging saved, or what it cost where retained pairs outweigh merged ones."""
    if saved >= 0:
        return f"{saved / 1e6:.1f} MB of KV saved"
    return f"the merged form takes {-saved / 1e6:.1f} MB more than the full cache (retained pairs carry norms and indices)"


def vector_bytes(kinds, index: int, scale: int | None) -> int:
    """Bytes of one cached vector, its int8 scale included."""
    size = kinds[index].width * kinds[index].dtype.itemsize
    return size + (kinds[scale].width * kinds[scale].dtype.itemsize if scale is not None else 0)


class MergedLayers:
    """A whole cache snapshot (per layer a (key, value) pair of float arrays) with the spec's
    layer pairs merged; ``restore()`` gives the per-layer arrays back, reconstructed."""

    def __init__(self, layers: list[tuple[np.ndarray, ...]], spec: MergeSpec):
        if any(len(t) != 2 or t[0].dtype.kind != "f" for t in layers):
            raise FeedError("merged prefix entries need a float KV cache (key and value only); this artifact's "
                            "cache is int8 (kv_cache:kv=int8): use the prefix cache without merging for it.")
        self.pairs = spec.pairs(len(layers))
        paired = {layer for pair in self.pairs for layer in pair}
        self.whole = {i: tensors for i, tensors in enumerate(layers) if i not in paired}
        self.merged = {pair: tuple(merge_pair(layers[pair[0]][k], layers[pair[1]][k], spec) for k in range(2))
                       for pair in self.pairs}
        self.layers = len(layers)

    def restore(self) -> list[tuple[np.ndarray, ...]]:
        out: dict[int, tuple[np.ndarray, ...]] = dict(self.whole)
        for (first, second), kinds in self.merged.items():
            key_a, key_b = kinds[0].reconstruct()
            value_a, value_b = kinds[1].reconstruct()
            out[first], out[second] = (key_a, value_a), (key_b, value_b)
        return [out[i] for i in range(self.layers)]

    @property
    def nbytes(self) -> int:
        whole = sum(a.nbytes for tensors in self.whole.values() for a in tensors)
        return whole + sum(m.nbytes for kinds in self.merged.values() for m in kinds)

    @property
    def counts(self) -> tuple[int, int]:
        """(merged, retained) (token, head) positions over every pair, K and V."""
        kinds = [m for pair in self.merged.values() for m in pair]
        return sum(m.merged for m in kinds), sum(len(m.retained) for m in kinds)


def read_vectors(cache: KVCache, layer: int, kind: int, scale: int | None, start: int, end: int) -> np.ndarray:
    """Float vectors of tokens ``start:end`` (dequantized from an int8 cache)."""
    values = cache.past(layer, kind)[:, :, start:end]
    if scale is None:
        return values
    return values.astype(np.float32) * cache.past(layer, scale)[:, :, start:end]


def write_vectors(cache: KVCache, layer: int, kind: int, scale: int | None, start: int, end: int,
                  values: np.ndarray, where: np.ndarray) -> None:
    """Store the vectors of tokens ``start:end`` back in place where ``where [b, h, n]`` is true
    (the merged ones: retained vectors stay bit for bit as they were). An int8 cache is
    requantized as the graph quantizes (one scale per head and token, absolute maximum to 127,
    round half to even)."""
    if scale is not None:
        steps = np.maximum(np.abs(values).max(-1, keepdims=True) / 127.0, SCALE_FLOOR).astype(np.float32)
        levels = np.clip(np.round(values / steps), -127, 127).astype(np.int8)
        cache.past(layer, scale)[:, :, start:end][where] = steps[where]
        values = levels
    cache.past(layer, kind)[:, :, start:end][where] = values[where]


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
