"""The quantize pass's steps beyond the matmul sites, in the order the pass runs them.

- ``validate``: the options ``embed``, ``kv``, ``budget`` and ``gptq``;
- ``Tables``: embedding tables found, quantized and written (``passes.quantize_embed``);
- ``lift_opset``: opset 21 when int4 or block-wise weights or tables need it
  (``passes.quantize_wonly.ensure_opset``);
- ``kv_scales`` / ``record_kv``: KV-cache scales from the float model (``passes.quantize_kv``);
- ``budget``: the blocks kept float to meet ``budget`` (``passes.quantize_budget``), from the
  planned (smoothed, quantized but not yet written) weights and tables.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes import quantize_embed as embed
from passes import quantize_kv
from passes.quantize_block import Format, dequantize
from passes.quantize_sites import skip_words
from passes.quantize_wonly import ensure_opset, importance
from runtime.errors import PassError


def validate(opts) -> None:
    embed.check_embed(opts.embed, opts.embed_block)
    quantize_kv.check_kv(opts.kv)
    if opts.budget is not None and opts.budget <= 0:
        raise PassError(f"quantize needs budget > 0 (the allowed degradation), got {opts.budget}.")
    if opts.gptq and opts.mode not in ("w8", "w4"):
        raise PassError(f"gptq applies to the weight-only modes w8 and w4; drop it for mode {opts.mode}.")
    if opts.budget is not None and opts.mode not in ("w8", "w4"):
        raise PassError(f"budget= applies to the weight-only modes w8 and w4 (it simulates weights only); "
                        f"drop it for mode {opts.mode}.")


def lift_opset(model: ir.Model, *formats: Format | None) -> list[str]:
    notes = []
    for fmt in formats:
        note = ensure_opset(model, fmt) if fmt is not None else None
        if note:
            notes.append(note)
    return notes


class Tables:
    """The embedding tables of one run: found, prepared, then written."""

    def __init__(self, tables: list[embed.Table], fmt: Format | None, notes: list[str], clip: bool = False):
        self.tables, self.fmt, self.notes, self.clip = tables, fmt, notes, clip

    @classmethod
    def find(cls, model: ir.Model, model_map, opts, fmt: Format | None) -> "Tables":
        table_fmt = embed.table_format(opts, fmt)
        if table_fmt is None:
            return cls([], None, [])
        tables, notes = embed.find_tables(model, model_map, skip_words(opts.skip))
        return cls(tables, table_fmt if tables else None, notes)

    def head_inputs(self) -> list[str]:
        return [t.head_input.name for t in self.tables if t.head_input is not None]

    def prepare(self, stats: dict, clip: bool) -> None:
        self.clip = clip
        for table in self.tables:
            st = stats.get(table.head_input.name) if table.head_input is not None else None
            embed.prepare(table, self.fmt, importance(st), clip)

    def apply(self, graph: ir.Graph) -> dict:
        if not self.tables:
            return {}
        return {"tables": [embed.apply(graph, t, self.fmt, self.clip) for t in self.tables]}


def kv_scales(model: ir.Model, model_map, batches, kv: str) -> dict | None:
    if kv == "none":
        return None
    scales, notes = quantize_kv.compute(model, model_map, batches, kv)
    return {**scales, "notes": notes} if notes else scales


def record_kv(model: ir.Model, scales: dict) -> None:
    quantize_kv.record(model, {k: v for k, v in scales.items() if k != "notes"})


def budget(model: ir.Model, plans, tables: Tables, batches, opts, ctx) -> tuple[set[int], dict | None]:
    if opts.budget is None:
        return set(), None
    from passes.quantize_budget import choose

    weights = [_site_weight(site, plan, quantized, opts) for plan in plans
               for site, quantized in zip(plan.sites, plan.quantized)]
    weights += [_table_weight(t, tables.fmt) for t in tables.tables]
    with ctx.progress.step(f"measuring {len({w.block for w in weights} - {None})} blocks' sensitivity for budget={opts.budget}"):
        return choose(model, weights, batches, opts.budget, _family(ctx))


def _family(ctx) -> str | None:
    source = getattr(ctx, "calibration", None)
    if isinstance(source, str):
        from models import registry

        try:
            return registry.get(source).family
        except Exception:  # not a built-in name: decided from the outputs
            return None
    return getattr(source, "family", None)


def _site_weight(site, plan, planned: tuple, opts):
    """The site's weight as its node reads it now (Gemm with transB reads it transposed)."""
    from passes.quantize import scaled_weight
    from passes.quantize_budget import Weight
    from passes.quantize_wonly import weight_format

    fmt = weight_format(opts) if opts.per_channel else None
    transposed = site.node.op_type == "Gemm" and site.node.attributes.get_int("transB", 0)

    def layout(array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array.T if transposed else array, dtype=np.float32)

    def quantized() -> np.ndarray:
        q, scale, offset = planned
        return layout(dequantize(q, scale, fmt, offset) if fmt is not None else q.astype(np.float32) * scale)

    return Weight([(site.node.name, 1)], layout(scaled_weight(site, plan)), quantized, site.block)


def _table_weight(table: embed.Table, fmt: Format):
    from passes.quantize_budget import Weight

    return Weight([(n.name, 0) for n in table.readers], table.array, lambda: embed.dequantized(table, fmt), None)
