"""Embedding tables stored quantized, once: Gather tables and a head that reads the same table.

A *table* is a 2-D float initializer ``[R, C]`` that the model map names as an embedding (read
by a ``Gather`` on axis 0) or as the head (read by the head ``MatMul`` through ``Transpose``
with perm [1, 0]), and that nothing else reads. A tied embedding (SmolLM2: ``embed_tokens`` and
``lm_head`` share one [49152, 576] table, 113 MB of its 538 MB) is one table read both ways.

The table becomes ``DequantizeLinear(q, scale)`` and every reader reads that, so the table is
stored once, quantized, however many nodes read it. Scales run along the rows: per block of
``B`` columns (``axis=1``, ``block_size=B``, scale ``[R, ceil(C/B)]``) or per row (block 0:
``axis=0``, scale ``[R]``). For the head that is per output channel, blocked along its input
dimension: the layout of a block-wise MatMul site, which is what lets one stored table serve
both ORT kernels (``optimizer.lower.ort_wonly``). Symmetric, round to nearest; the clipping
search (``passes.quantize_block``) weights columns by the head input's calibrated mean x^2 when
the head reads the table, else uniformly. No AWQ scaling: a factor on the head's input
channels would have to divide the embedding rows too.

With ``sym=false`` a 4-bit table is asymmetric (``passes.quantize_asym``: a float offset per
block, the search for exact grids) and written in the affine form of
``passes.quantize_asym_graph`` along axis 1; the metadata is then on that form's last node.

Formats (option ``embed``): ``auto`` (the mode's bits and ``block`` in ``w8``/``w4``; tables stay
float in ``dynamic`` and ``w8a8``), ``float``, ``8`` or ``4`` (``8`` is always symmetric);
``embed_block`` gives the tables their own block (0 per row, 16, 32, 64 or 128). Skip words: ``embeddings`` keeps
Gather tables float, ``head`` keeps the head's table float; a table read both ways stays float
when either is skipped (it would have to be stored twice).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from passes import quantize_asym, quantize_asym_graph
from passes.quantize_block import Format, quantize_clipped
from passes.quantize_rewrite import META, constant, first_reader
from runtime.errors import PassError

EMBED = ("auto", "float", "8", "4")
TABLE_BLOCKS = (0, 16, 32, 64, 128)  # 16 too: a table is 1/5 of SmolLM2, its kernels take 16


@dataclass
class Table:
    value: ir.Value
    readers: list[ir.Node] = field(default_factory=list)  # Gathers and Transposes
    roles: set[str] = field(default_factory=set)
    head_input: ir.Value | None = None
    q: np.ndarray | None = None  # quantized [R, C] (int8-held) and its scales, once prepared
    scale: np.ndarray | None = None
    offset: np.ndarray | None = None  # asymmetric formats only

    @property
    def array(self) -> np.ndarray:
        return self.value.const_value.numpy().astype(np.float32)


def check_embed(embed: str, block: int | None = None) -> None:
    if str(embed) not in EMBED:
        raise PassError(f"quantize has no embed={embed!r}; embed takes one of: {', '.join(EMBED)}.")
    if block is not None and block not in TABLE_BLOCKS:
        raise PassError(f"quantize has no embed_block={block}; it takes 0 (one scale per row) or 16, 32, 64, 128 "
                        "(columns per scale).")


def table_format(opts, fmt: Format | None) -> Format | None:
    """The tables' format for these options, or None (tables stay float)."""
    embed = str(opts.embed)
    if embed == "float" or (embed == "auto" and fmt is None):
        return None
    block = opts.block if opts.embed_block is None else opts.embed_block
    if embed == "auto":
        return Format(fmt.bits, block, fmt.sym)
    return Format(int(embed), block, sym=embed == "8" or opts.sym)


def find_tables(model: ir.Model, model_map, skip: set[str]) -> tuple[list[Table], list[str]]:
    """The tables the map names (see the module docstring) and notes on those left float."""
    tables: dict[int, Table] = {}
    for name in getattr(model_map, "embeddings", None) or []:
        node = _node(model, name)
        if node is not None and node.op_type == "Gather" and node.attributes.get_int("axis", 0) == 0:
            _add(tables, node.inputs[0], node, "embeddings", None)
    head = _node(model, getattr(model_map, "head", None))
    if head is not None and head.op_type == "MatMul" and head.inputs[1] is not None:
        transpose = head.inputs[1].producer()
        if transpose is not None and transpose.op_type == "Transpose" and list(transpose.attributes.get_ints("perm", [])) == [1, 0]:
            if len(head.inputs[1].uses()) == 1:
                _add(tables, transpose.inputs[0], transpose, "head", head.inputs[0])
    kept, notes = [], []
    for table in tables.values():
        readers = {id(n) for n in table.readers}
        if any(id(use.node) not in readers for use in table.value.uses()) or table.value.is_graph_output():
            notes.append(f"table {table.value.name} stays float: other nodes read it too")
        elif table.roles & skip:
            notes.append(f"table {table.value.name} ({'+'.join(sorted(table.roles))}) stays float: skip={'+'.join(sorted(table.roles & skip))}")
        else:
            kept.append(table)
    return kept, notes


def _node(model: ir.Model, name: str | None) -> ir.Node | None:
    if not name:
        return None
    return next((n for n in model.graph if n.name == name), None)


def _add(tables: dict[int, Table], value: ir.Value | None, reader: ir.Node, role: str, head_input) -> None:
    tensor = value.const_value if value is not None and value.is_initializer() else None
    if tensor is None or tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 2:
        return
    table = tables.setdefault(id(value), Table(value))
    table.readers.append(reader)
    table.roles.add(role)
    table.head_input = head_input or table.head_input


def prepare(table: Table, fmt: Format, importance: np.ndarray | None, clip: bool) -> None:
    """Quantize the table along its rows (blocks of columns, or per row); kept on ``table``."""
    q_t, scale_t, offset_t = quantize_clipped(table.array.T, fmt, importance, clip)
    table.q, table.scale = np.ascontiguousarray(q_t.T), np.ascontiguousarray(scale_t.T)
    table.offset = None if offset_t is None else np.ascontiguousarray(offset_t.T)


def dequantized(table: Table, fmt: Format) -> np.ndarray:
    if table.offset is not None:
        return quantize_asym.dequantize(table.q.T, table.scale.T, table.offset.T, fmt.block).T
    scale = np.repeat(table.scale, fmt.block, axis=1)[:, :table.q.shape[1]] if fmt.block else table.scale[:, None]
    return table.q.astype(np.float32) * scale


def apply(graph: ir.Graph, table: Table, fmt: Format, clip: bool) -> dict:
    """Replace the table by ``DequantizeLinear`` of its prepared form; returns the record."""
    array = table.array
    name = table.value.name
    out = _written(graph, table, fmt)
    info = {"table": name, "roles": sorted(table.roles), "bits": fmt.bits, "block": fmt.block, "clip": clip,
            "readers": [n.name for n in table.readers], **({} if fmt.sym else {"sym": False})}
    out.producer().metadata_props[META] = json.dumps(info, sort_keys=True)
    error = float(np.abs(dequantized(table, fmt) - array).mean())
    table.value.replace_all_uses_with(out)
    graph.initializers.pop(name)
    return {**info, "shape": list(array.shape), "mean_abs_error": round(error, 6)}


def _written(graph: ir.Graph, table: Table, fmt: Format) -> ir.Value:
    """The table's quantized form inserted before its first reader: its float output."""
    name, before = table.value.name, first_reader(graph, table.readers)
    if table.offset is not None:
        return quantize_asym_graph.build(graph, name, table.q, table.scale, table.offset, fmt.block, 1, before)
    dtype = ir.DataType.INT4 if fmt.bits == 4 else ir.DataType.INT8
    attributes = {"axis": 1, "block_size": fmt.block} if fmt.block else {"axis": 0}
    dq = ir.node("DequantizeLinear", [constant(graph, f"{name}_int{fmt.bits}", table.q, dtype),
                                      constant(graph, f"{name}_scale", table.scale)],
                 attributes=attributes, name=f"{name}_dq")
    dq.outputs[0].name = f"{name}_dq"
    dq.outputs[0].type, dq.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(table.q.shape)
    graph.insert_before(before, [dq])
    return dq.outputs[0]
