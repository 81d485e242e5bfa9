"""KV-cache scales: per layer and per KV head, the calibrated absmax of keys (after RoPE) and values.

Where the cached tensors are, for each block's attention site of the model map:

- the key: among the values that depend on the map's ``k`` (the K projection's output) and
  feed the attention scores (the Softmax input) without depending on ``q``, the last one in
  graph order whose static shape is ``[batch, kv_heads, tokens, head_dim]``: after RoPE,
  before a grouped-query repeat to all heads, before the transpose for ``Q K^T``;
- the value: likewise from ``v`` to the attention output, not depending on the probabilities.

These are the tensors a KV cache stores (``past_key_values.{i}.key|value`` are
``[batch, kv_heads, past, head_dim]``): where the ``kv_cache`` pass accepts the site, its own
cache points (``passes.kv_cache_find.find_site``) are used, so both passes name the same
tensors; the search above is the fallback (sites without a causal mask). A block whose site lacks K or V, shares one value for
Q/K/V (fused projection) or has no such value with a static shape gets no entry and a note.

Statistics: |x| maximum per KV head over batch, tokens and channels, padded tokens (``attention_
mask`` 0) left out. Stored form ``carve.kv_scales`` (format 1), in the pass details, in the
model's metadata (JSON) and, per tensor, on its producing node::

    {"format": 1, "kv": "int8", "layers": [{"layer": 0, "key": VALUE, "value": VALUE,
      "key_absmax": [per head], "value_absmax": [...],
      "key_int8": [absmax / 127], "value_int8": [...],
      "key_fp8_e4m3": [absmax / 448], "value_fp8_e4m3": [...]}]}

Scales are symmetric (zero point 0): ``q = round(x / scale)`` per head; ``kv`` (int8 or fp8) says
which one the cache pass should use; both are always computed.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from passes.graph_util import values_by_name
from runtime.errors import PassError

KEY = "carve.kv_scales"
KV = ("none", "int8", "fp8")
INT8_MAX, FP8_E4M3_MAX = 127.0, 448.0


def check_kv(kv: str) -> None:
    if kv not in KV:
        raise PassError(f"quantize has no kv={kv!r}; kv takes one of: {', '.join(KV)}.")


def locate(model: ir.Model, model_map) -> tuple[list[tuple[int, str, str]], list[str]]:
    """[(layer, key value, value value)] and notes for the blocks without them."""
    values = values_by_name(model.graph)
    found, notes = [], []
    for block in getattr(model_map, "blocks", None) or []:
        att = block.attention
        if att is None or not (att.k and att.v and att.q) or len({att.q, att.k, att.v}) < 3 or not att.kv_heads:
            notes.append(f"block {block.index}: no separate K and V projections with known heads; no KV scales")
            continue
        key, value = _cache_points(model, values, block.index, att)
        if key is None or value is None:
            notes.append(f"block {block.index}: no [batch, kv_heads, tokens, head_dim] key/value tensor found")
            continue
        found.append((block.index, key, value))
    return found, notes


def _cache_points(model: ir.Model, values, layer: int, att) -> tuple[str | None, str | None]:
    """The kv_cache pass's own cache points when it accepts the site, else the search by shape."""
    from passes.kv_cache_find import find_site, shape_only

    try:
        found = find_site(model.graph, values, layer, att, shape_only(model.graph))
        return found.key.name, found.value.name
    except PassError:  # not a site the cache rewrite takes (e.g. no causal mask): search by shape
        scores = att.scores or _softmax_input(model, att.softmax_node)
        return _cached(values, att.k, scores, att.q, att), _cached(values, att.v, att.output, att.probs, att)




def _softmax_input(model: ir.Model, name: str | None) -> str | None:
    node = next((n for n in model.graph if n.name == name), None) if name else None
    return node.inputs[0].name if node is not None else None


def _cached(values, start: str | None, end: str | None, exclude: str | None, att) -> str | None:
    if start not in values or end not in values:
        return None
    after_start = _descendants(values[start])
    before_end = _ancestors(values[end])
    excluded = _descendants(values[exclude]) if exclude in values else set()
    order = {id(v): i for i, v in enumerate(values.values())}
    candidates = [v for v in after_start if v in before_end and v not in excluded and _kv_shaped(v, att)]
    return max(candidates, key=lambda v: order.get(id(v), -1)).name if candidates else None


def _kv_shaped(value: ir.Value, att) -> bool:
    dims = list(value.shape) if value.shape is not None else []
    return len(dims) == 4 and dims[1] == att.kv_heads and dims[3] == att.head_dim


def _descendants(start: ir.Value) -> set[ir.Value]:
    seen, stack = {start}, [start]
    while stack:
        for use in stack.pop().uses():
            for out in use.node.outputs:
                if out not in seen:
                    seen.add(out)
                    stack.append(out)
    return seen


def _ancestors(end: ir.Value) -> set[ir.Value]:
    seen, stack = {end}, [end]
    while stack:
        producer = stack.pop().producer()
        for value in producer.inputs if producer is not None else ():
            if value is not None and value not in seen:
                seen.add(value)
                stack.append(value)
    return seen


def absmax_per_head(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """|x| max per head of a [batch, heads, tokens, dim] array over its real tokens."""
    x = np.abs(np.asarray(array, np.float32)).transpose(0, 2, 1, 3)  # [batch, tokens, heads, dim]
    if mask is not None and mask.shape == x.shape[:2]:
        x = x[mask.astype(bool)]
    else:
        x = x.reshape(-1, *x.shape[2:])
    return x.max(axis=(0, 2)) if len(x) else np.zeros(x.shape[1], np.float32)


def compute(model: ir.Model, model_map, batches, kv: str) -> tuple[dict, list[str]]:
    """The ``carve.kv_scales`` record (module docstring) from calibration ``batches``."""
    from optimizer.calibrate import run_values

    sites, notes = locate(model, model_map)
    if not sites:
        raise PassError("kv scales need attention sites with separate K and V projections and known KV heads; "
                        "this model map has none, so drop kv=.")
    peaks: dict[str, np.ndarray] = {}
    for feeds, arrays in run_values(model, [n for _, k, v in sites for n in (k, v)], batches):
        for name, array in arrays.items():
            head = absmax_per_head(array, feeds.get("attention_mask"))
            peaks[name] = head if name not in peaks else np.maximum(peaks[name], head)
    layers = [_layer(i, key, value, peaks) for i, key, value in sites]
    return {"format": 1, "kv": kv, "layers": layers}, notes


def _layer(index: int, key: str, value: str, peaks: dict[str, np.ndarray]) -> dict:
    out = {"layer": index, "key": key, "value": value}
    for kind, name in (("key", key), ("value", value)):
        peak = np.maximum(peaks[name].astype(np.float64), 1e-8)
        out[f"{kind}_absmax"] = [round(float(p), 6) for p in peak]
        out[f"{kind}_int8"] = [float(p / INT8_MAX) for p in peak]
        out[f"{kind}_fp8_e4m3"] = [float(p / FP8_E4M3_MAX) for p in peak]
    return out


def record(model: ir.Model, scales: dict) -> None:
    """Write the record into the model's metadata and each tensor's producing node."""
    model.metadata_props[KEY] = json.dumps(scales, sort_keys=True)
    values = values_by_name(model.graph)
    for layer in scales["layers"]:
        for kind in ("key", "value"):
            producer = values[layer[kind]].producer() if layer[kind] in values else None
            if producer is not None:
                producer.metadata_props[KEY] = json.dumps(
                    {"layer": layer["layer"], "kind": kind, "absmax": layer[f"{kind}_absmax"],
                     "int8": layer[f"{kind}_int8"], "fp8_e4m3": layer[f"{kind}_fp8_e4m3"]}, sort_keys=True)
