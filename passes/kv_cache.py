"""The ``kv_cache`` pass: a decoder's full-sequence graph becomes one that reads and writes a KV cache.

The result has the Optimum / ONNX Runtime GenAI interface:
inputs ``input_ids [batch, sequence]``, ``attention_mask [batch, total_sequence]`` (past and new
tokens), ``position_ids [batch, sequence]``, ``past_key_values.{i}.key|value [batch, kv_heads,
past_sequence, head_dim]``; outputs the model's own (``logits``) then ``present.{i}.key|value``
(past and new); with ``scores=true`` also ``attention.{i} [batch, past+new]``, the attention each
cached token received (for heavy-hitter eviction); with ``static=N`` the cache is a fixed
``N``-slot buffer written at ``cache_position`` (``passes.kv_cache_static``); with ``kv=int8``
the cache is int8 with per-head, per-token scales (``passes.kv_cache_int8``); with
``layer_masks=true`` each layer reads its own ``attention_mask.{i}`` instead of the shared one, so
layers may hold different numbers of tokens (per-layer eviction budgets). One graph serves prefill (past length 0) and decoding. It is exact: with empty
past and ``position_ids = 0..n-1`` the logits equal the input graph's, and decoding token by token
gives the logits the full graph gives for the whole sequence.

Cases (each attention site found by the model map, see ``passes.kv_cache_find``):
- K and V are cached after RoPE and before grouped-query repeats: the cache holds ``kv_heads``;
- the score mask (additive ``Add`` or ``Where``) is replaced by one causal-and-padding mask built
  from ``attention_mask``; ``Shape`` reads of ``attention_mask`` move to ``input_ids`` (both were
  ``[batch, sequence]``; now only ``input_ids`` has the new tokens' length);
- RoPE tables computed from the length become lookups by ``position_ids`` in a table of
  ``max_positions`` rows (``passes.kv_cache_tables``);
- refused with a reason: no attention sites (not a decoder), a fused attention op, a model already
  cached (it has ``past_key_values`` inputs), no ``attention_mask`` input, an encoder (no causal
  mask: a cache would change its outputs), other ops reading the cached length.

The manifest records per layer the cache shape, and the KV bytes per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from optimizer.pipeline import Pass, PassContext, PassResult, register
from passes import kv_cache_build as build
from passes import kv_cache_int8 as kv_int8
from passes.graph_util import values_by_name
from passes import kv_cache_static as kv_static
from passes.kv_cache_find import SiteCache, find_site, shape_only
from passes.kv_cache_tables import rows
from runtime.errors import PassError


@register
class KVCache(Pass):
    name = "kv_cache"
    summary = "decoder graph reads/writes a KV cache (past_key_values -> present), one graph for prefill and decode (exact)"
    exact = True
    changes_signature = True

    @dataclass
    class Options:
        max_positions: int = 4096
        scores: bool = False
        static: int = 0
        kv: str = "float"
        layer_masks: bool = False

        def validate(self) -> None:
            if self.layer_masks and (self.static or self.kv != "float"):
                raise PassError("kv_cache layer_masks works with a float cache that grows; drop static and kv=int8.")
            if self.kv not in ("float", "int8"):
                raise PassError(f"kv_cache kv must be float or int8, got {self.kv!r}.")
            if self.kv == "int8" and self.static:
                raise PassError("kv_cache kv=int8 works with a cache that grows; drop static or kv=int8.")
            if self.max_positions < 2:
                raise PassError(f"kv_cache needs max_positions >= 2, got {self.max_positions}.")
            if self.static < 0 or self.static > self.max_positions:
                raise PassError(f"kv_cache static={self.static} must be between 1 and max_positions "
                                f"({self.max_positions}), or 0 for a cache that grows.")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        ids, mask_input = _inputs(graph)
        model_map = ctx.model_map(model)
        sites = _sites(graph, model_map)
        static = self.options.static
        _redirect_shapes(graph, mask_input, ids, static or build.TOTAL_DIM)
        tables = _table_rows(graph, sites, ids, self.options.max_positions)
        token_dim = ids.shape[1] if ids.shape is not None else "sequence"
        dtype = sites[0].key.dtype
        int8 = self.options.kv == "int8"
        if static:
            pasts, where = kv_static.static_inputs(graph, sites, token_dim, static)
            additive, allowed = kv_static.static_mask(graph, mask_input, where, dtype)
        elif self.options.layer_masks:
            pasts = build.new_inputs(graph, sites, token_dim, per_layer=True)
        else:
            pasts = (kv_int8.int8_inputs if int8 else build.new_inputs)(graph, sites, token_dim)
            additive, allowed = build.mask(graph, ids, mask_input, dtype)
        for site in sites:
            build.follow_length(graph, site)
            if static:
                kv_static.scatter(graph, site, pasts[site.layer], where)
            elif self.options.layer_masks:
                build.concat(graph, site, pasts[site.layer], per_layer=True)
                additive, allowed = build.mask(graph, ids, _layer_mask(graph, site.layer, ids), dtype, tag=f"_{site.layer}")
            else:
                (kv_int8.int8_concat if int8 else build.concat)(graph, site, pasts[site.layer])
            build.apply_mask(graph, site, additive, allowed)
        for site in sites if self.options.scores else ():
            build.attention_output(graph, site, self.options.layer_masks)
        position_ids = next(v for v in graph.inputs if v.name == "position_ids")
        _replace_tables(graph, sites, tables, position_ids)
        RemoveUnusedNodesPass()(model)
        graph.sort()
        _infer_types(model)
        _check_mask_use(mask_input)
        if self.options.layer_masks:  # every layer reads its own mask now
            graph.inputs.remove(mask_input)
        return PassResult(model=model, sites=len(sites), details=_details(sites, self.options))


def _inputs(graph: ir.Graph) -> tuple[ir.Value, ir.Value]:
    names = {v.name: v for v in graph.inputs}
    if any(n.startswith("past_key_values") for n in names):
        raise PassError("the model already reads a KV cache (it has past_key_values inputs); kv_cache applies to a "
                        "full-sequence graph.")
    if "input_ids" not in names or "attention_mask" not in names:
        raise PassError("kv_cache needs a decoder with inputs input_ids and attention_mask; this model has "
                        f"{', '.join(names) or 'no inputs'}.")
    return names["input_ids"], names["attention_mask"]


def _sites(graph: ir.Graph, model_map) -> list[SiteCache]:
    attention = [(b.index, b.attention) for b in model_map.blocks if b.attention is not None]
    if not attention:
        raise PassError("the model map found no attention in this model; kv_cache applies to transformer decoders.")
    values = values_by_name(graph)
    derived = shape_only(graph)
    return [find_site(graph, values, index, site, derived) for index, site in attention]




def _table_rows(graph: ir.Graph, sites: list[SiteCache], ids: ir.Value, length: int):
    operands = []
    for site in sites:
        for node, slot in site.tables:
            if node.inputs[slot] not in operands:
                operands.append(node.inputs[slot])
    return dict(zip(map(id, operands), rows(graph, operands, ids, length))) if operands else {}


def _redirect_shapes(graph: ir.Graph, mask_input: ir.Value, ids: ir.Value, total: int | str) -> None:
    mask_input.shape = ir.Shape([ids.shape[0] if ids.shape is not None else "batch", total])
    for user, slot in list(mask_input.uses()):
        if user.op_type in {"Shape", "Size"}:
            user.replace_input_with(slot, ids)


def _replace_tables(graph: ir.Graph, sites: list[SiteCache], tables: dict, position_ids: ir.Value) -> None:
    done: dict[int, ir.Value] = {}
    for site in sites:
        for node, slot in site.tables:
            operand = node.inputs[slot]
            if id(operand) not in done:
                other = next(v for i, v in enumerate(node.inputs) if i != slot)
                rank = max(len(operand.shape or ()), len(other.shape or ()))
                done[id(operand)] = build.lookup(graph, operand, tables[id(operand)], position_ids, rank)
            node.replace_input_with(slot, done[id(operand)])


def _infer_types(model: ir.Model) -> None:
    """Types (and shapes where known) for the values the rewrite created, so later passes that cut
    the graph into pieces see typed boundaries. ONNX's inference keeps declared types."""
    from onnx_ir.passes.common import ShapeInferencePass

    ShapeInferencePass()(model)  # in place; on failure it leaves the model as it was


def _layer_mask(graph: ir.Graph, layer: int, ids: ir.Value) -> ir.Value:
    """``attention_mask.{layer}``: this layer's cached tokens and the new ones (layers may keep
    different numbers of tokens, as per-layer eviction budgets do)."""
    value = ir.Value(name=f"attention_mask.{layer}", shape=ir.Shape(["batch", build.dims(layer, True)[1]]),
                     type=ids.type)
    graph.inputs.append(value)
    return value


def _check_mask_use(mask_input: ir.Value) -> None:
    stray = [u.name for u, _ in mask_input.uses() if not (u.name or "").startswith("kv_cache")]
    if stray:
        raise PassError(f"attention_mask is still read by {', '.join(stray[:3])} after the rewrite; kv_cache does not "
                        "know what those nodes compute with the old mask length.")


def _details(sites: list[SiteCache], opts) -> dict:
    layers = [{"layer": s.layer, "kv_heads": s.key.shape[1], "head_dim": s.key.shape[3]} for s in sites]
    itemsize = sites[0].key.dtype.itemsize
    if opts.kv == "int8":  # one byte per element plus one scale per head and token
        per_token = sum(2 * layer["kv_heads"] * (layer["head_dim"] + itemsize) for layer in layers)
    else:
        per_token = sum(2 * layer["kv_heads"] * layer["head_dim"] * itemsize for layer in layers)
    return {"layers": layers, "kv_bytes_per_token": per_token, "max_positions": opts.max_positions,
            "dtype": sites[0].key.dtype.name.lower(), "interface": "optimum", "scores": opts.scores,
            "static": opts.static or None, "kv": opts.kv, "layer_masks": opts.layer_masks}
