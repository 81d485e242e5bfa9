"""The static-cache variant of the KV-cache rewrite (``kv_cache:static=N``).

Decode shapes stay fixed, as TensorRT engines and CUDA graphs want: every
``past_key_values.{i}.key|value`` is a preallocated ``[batch, kv_heads, N, head_dim]`` buffer,
``cache_position [sequence]`` says where the new tokens go, and ``present.{i}.*`` is the buffer
with them written in (``ScatterElements`` on the token axis). Attention runs over all N slots;
the mask allows key slot ``j`` for query ``q`` when ``j <= cache_position[q]`` and
``attention_mask[b, j]`` is 1 (``attention_mask`` is ``[batch, N]``: 1 for every filled slot,
including the new ones). Unfilled slots hold anything; the mask hides them.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

from passes.kv_cache_build import commit
from passes.kv_cache_find import SiteCache


def static_inputs(graph: ir.Graph, sites: list[SiteCache], token_dim: str, length: int) -> tuple[dict, ir.Value]:
    """``position_ids``, ``cache_position`` and the fixed-size past buffers."""
    graph.inputs.append(ir.Value(name="position_ids", shape=ir.Shape(["batch", token_dim]),
                                 type=ir.TensorType(ir.DataType.INT64)))
    where = ir.Value(name="cache_position", shape=ir.Shape([token_dim]), type=ir.TensorType(ir.DataType.INT64))
    graph.inputs.append(where)
    pasts = {}
    for site in sites:
        pair = []
        for kind, point in (("key", site.key), ("value", site.value)):
            shape = ir.Shape(["batch", point.shape[1], length, point.shape[3]])
            pair.append(ir.Value(name=f"past_key_values.{site.layer}.{kind}", shape=shape, type=point.type))
            graph.inputs.append(pair[-1])
        pasts[site.layer] = (pair[0], pair[1])
    return pasts, where


def scatter(graph: ir.Graph, site: SiteCache, past: tuple[ir.Value, ir.Value], where: ir.Value) -> None:
    """``present = past`` with the new K/V written at ``cache_position``; attention reads it."""
    for kind, point, old in (("key", site.key, past[0]), ("value", site.value, past[1])):
        users = list(point.uses())
        t = tape.Tape()
        shape = t.initializer(ir.tensor(np.array([1, 1, -1, 1], np.int64)), name=f"kv_cache_slot_shape_{site.layer}_{kind}")
        slots = t.op("Expand", [t.op("Reshape", [where, shape]), t.op("Shape", [point])])
        present = t.op("ScatterElements", [old, slots, point], {"axis": 2}, name=f"kv_cache_write_{site.layer}_{kind}")
        present.name, present.type, present.shape = f"present.{site.layer}.{kind}", point.type, old.shape
        commit(graph, t)
        for user, slot in users:
            user.replace_input_with(slot, present)
        graph.outputs.append(present)


def static_mask(graph: ir.Graph, attention_mask: ir.Value, where: ir.Value, dtype: ir.DataType) -> tuple[ir.Value, ir.Value]:
    """(additive mask, allowed) ``[batch, 1, new, N]`` from the write positions and the filled slots."""
    t = tape.Tape()
    i64 = lambda x, n: t.initializer(ir.tensor(np.array(x, np.int64)), name=f"kv_cache_static_{n}")
    slots = t.op("Squeeze", [t.op("Shape", [attention_mask], {"start": 1, "end": 2})])
    keys = t.op("Range", [i64(0, "zero"), slots, i64(1, "one")])
    causal = t.op("LessOrEqual", [t.op("Unsqueeze", [keys, i64([0], "ax0")]), t.op("Unsqueeze", [where, i64([1], "ax1")])])
    filled = t.op("Unsqueeze", [t.op("Cast", [attention_mask], {"to": ir.DataType.BOOL}), i64([1, 2], "ax12")])
    allowed = t.op("And", [t.op("Unsqueeze", [causal, i64([0, 1], "ax01")]), filled], name="kv_cache_allowed")
    fill = [t.initializer(ir.tensor(np.array(v, dtype.numpy())), name=f"kv_cache_static_fill_{i}")
            for i, v in enumerate((0, np.finfo(dtype.numpy()).min))]
    additive = t.op("Where", [allowed, fill[0], fill[1]], name="kv_cache_mask")
    commit(graph, t)
    return additive, allowed
