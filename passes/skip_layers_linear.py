"""Layer skipping, part 6 (``replace=linear``): a fitted linear map in place of a skipped span.

Bypassing a block assumes its output is close to its input. In post-norm encoders (BERT,
MiniLM) it is not: every block ends in a LayerNorm with its own gain and bias, so the next block
receives a stream of the wrong scale and offset, and dropping one of MiniLM's six blocks costs
0.07 of embedding cosine. Training-free depth pruning work (ReplaceMe, LLM-Streamline) replaces
the removed span by a linear map fitted on calibration activations instead; here:

- a *span* is a run of adjacent skipped units (``spans``); it is replaced by one map
  ``y = x W + c`` from the span's input to its output;
- ``W = I + W'`` and ``c`` are fitted by ridge least squares on the original model's
  calibration tokens (padding excluded), with the penalty on ``W'`` so that the fit shrinks
  towards the identity (the plain bypass), never towards zero; the penalty is ``RIDGE`` times the
  mean eigenvalue of the centred inputs' Gram matrix;
- the rewrite inserts ``MatMul`` and ``Add`` with ``W`` and ``c`` as initializers
  (``insert_map``): ``hidden**2`` multiply-adds per token, about a tenth of a block, and
  ``4 * hidden**2`` bytes of weights per span.

Maps are fitted on the original model's activations, also when earlier spans are skipped too
(the search scores the combination end to end, so a poor combination is not chosen).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

RIDGE = 0.1


def spans(skip: Iterable[int]) -> list[tuple[int, int]]:
    """Runs of adjacent indices as (first, last), in order: {1, 2, 5} -> [(1, 2), (5, 5)]."""
    out: list[tuple[int, int]] = []
    for i in sorted(skip):
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


class SpanMaps:
    """Linear maps for spans of units, fitted on demand from the reference run and memoised."""

    def __init__(self, runs: list[dict[str, np.ndarray]], masks: list[np.ndarray | None], units: list):
        self.runs, self.masks, self.units = runs, masks, units
        self._fits: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def get(self, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        key = (first, last)
        if key not in self._fits:
            x = self._tokens(self.units[first].input)
            self._fits[key] = fit(x, self._tokens(self.units[last].output))
        return self._fits[key]

    def apply(self, first: int, last: int, x: np.ndarray) -> np.ndarray:
        weight, bias = self.get(first, last)
        return np.matmul(x, weight) + bias

    def _tokens(self, name: str) -> np.ndarray:
        rows = []
        for run, mask in zip(self.runs, self.masks):
            value = run[name]
            rows.append(value[mask] if mask is not None else value.reshape(-1, value.shape[-1]))
        return np.concatenate(rows).astype(np.float64)


def fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least squares of ``y - x`` on ``x`` (so the fit shrinks towards y = x)."""
    residual = y - x
    mean_x, mean_r = x.mean(axis=0), residual.mean(axis=0)
    xc = x - mean_x
    gram = xc.T @ xc
    penalty = RIDGE * np.trace(gram) / len(gram)
    delta = np.linalg.solve(gram + penalty * np.eye(len(gram)), xc.T @ (residual - mean_r))
    weight = np.eye(len(gram)) + delta
    return weight.astype(np.float32), (mean_r - mean_x @ delta).astype(np.float32)


def insert_map(graph: ir.Graph, x: ir.Value, weight: np.ndarray, bias: np.ndarray, tag: str) -> ir.Value:
    """Add ``x @ weight + bias`` right after ``x`` is produced; returns the result value."""
    dtype = x.dtype or ir.DataType.FLOAT  # the map computes in the stream's own precision
    w = ir.Value(name=f"skip_layers.{tag}.weight", const_value=ir.tensor(weight.astype(dtype.numpy())))
    b = ir.Value(name=f"skip_layers.{tag}.bias", const_value=ir.tensor(bias.astype(dtype.numpy())))
    for value in (w, b):
        value.dtype, value.shape = dtype, ir.Shape(value.const_value.shape)
        graph.register_initializer(value)
    matmul = ir.node("MatMul", [x, w], name=f"skip_layers_{tag}_matmul")
    add = ir.node("Add", [matmul.outputs[0], b], name=f"skip_layers_{tag}_add")
    for node, suffix in ((matmul, "projected"), (add, "out")):
        out = node.outputs[0]
        out.name, out.dtype, out.shape = f"skip_layers.{tag}.{suffix}", x.dtype, x.shape
    producer = x.producer()
    if producer is None:  # the span starts at a graph input: the map goes first
        graph.insert_before(graph.node(0), [matmul, add])
    else:
        graph.insert_after(producer, [matmul, add])
    return add.outputs[0]
