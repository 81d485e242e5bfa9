"""The int8 KV cache of the KV-cache rewrite (``kv_cache:kv=int8``).

The cache stores K and V as int8 with one float scale per head and token (symmetric, the
token's absolute maximum over ``head_dim`` maps to 127), a quarter of fp32's bytes plus
``1/head_dim`` for the scales. Per layer the graph reads ``past_key_values.{i}.key|value`` (int8)
and ``past_key_values.{i}.key_scale|value_scale`` (float ``[batch, kv_heads, past, 1]``),
quantizes the new tokens' K and V (``Round`` is round-half-to-even), writes both halves to the
``present`` outputs, and attends over the dequantized cache, new tokens included, so every step
sees exactly what later steps will read back.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

from passes.kv_cache_build import PAST_DIM, TOTAL_DIM, commit
from passes.kv_cache_find import SiteCache

SCALE_FLOOR = 1e-8  # an all-zero head and token still gets a usable scale


def int8_inputs(graph: ir.Graph, sites: list[SiteCache], token_dim: str) -> dict[int, dict[str, ir.Value]]:
    graph.inputs.append(ir.Value(name="position_ids", shape=ir.Shape(["batch", token_dim]),
                                 type=ir.TensorType(ir.DataType.INT64)))
    pasts = {}
    for site in sites:
        found = {}
        for kind, point in (("key", site.key), ("value", site.value)):
            heads, dim = point.shape[1], point.shape[3]
            found[kind] = ir.Value(name=f"past_key_values.{site.layer}.{kind}", shape=ir.Shape(["batch", heads, PAST_DIM, dim]),
                                   type=ir.TensorType(ir.DataType.INT8))
            found[f"{kind}_scale"] = ir.Value(name=f"past_key_values.{site.layer}.{kind}_scale",
                                              shape=ir.Shape(["batch", heads, PAST_DIM, 1]), type=point.type)
        for name in ("key", "value", "key_scale", "value_scale"):
            graph.inputs.append(found[name])
        pasts[site.layer] = found
    return pasts


def int8_concat(graph: ir.Graph, site: SiteCache, past: dict[str, ir.Value]) -> None:
    for kind, point in (("key", site.key), ("value", site.value)):
        users = list(point.uses())
        t = tape.Tape()
        const = lambda x, n: t.initializer(ir.tensor(np.array(x, point.dtype.numpy())), name=f"kv_cache_int8_{n}_{site.layer}_{kind}")
        axes = t.initializer(ir.tensor(np.array([3], np.int64)), name=f"kv_cache_int8_axes_{site.layer}_{kind}")
        peak = t.op("ReduceMax", [t.op("Abs", [point]), axes], {"keepdims": 1})
        scale = t.op("Max", [t.op("Div", [peak, const(127.0, "levels")]), const(SCALE_FLOOR, "floor")])
        levels = t.op("Clip", [t.op("Round", [t.op("Div", [point, scale])]), const(-127.0, "low"), const(127.0, "high")])
        new_q = t.op("Cast", [levels], {"to": ir.DataType.INT8})
        present_q = t.op("Concat", [past[kind], new_q], {"axis": 2}, name=f"kv_cache_concat_{site.layer}_{kind}")
        present_s = t.op("Concat", [past[f"{kind}_scale"], scale], {"axis": 2})
        restored = t.op("Mul", [t.op("Cast", [present_q], {"to": point.dtype}), present_s],
                        name=f"kv_cache_dequantize_{site.layer}_{kind}")
        _name(present_q, f"present.{site.layer}.{kind}", ir.DataType.INT8, point.shape[1], point.shape[3])
        _name(present_s, f"present.{site.layer}.{kind}_scale", point.dtype, point.shape[1], 1)
        commit(graph, t)
        for user, slot in users:
            user.replace_input_with(slot, restored)
        graph.outputs.extend([present_q, present_s])


def _name(value: ir.Value, name: str, dtype: ir.DataType, heads: int, width: int) -> None:
    value.name, value.type = name, ir.TensorType(dtype)
    value.shape = ir.Shape(["batch", heads, TOTAL_DIM, width])
