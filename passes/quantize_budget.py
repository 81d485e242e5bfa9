"""Mixed precision by budget: keep the most sensitive blocks float until an accuracy budget is met.

The metric is the evaluation harness's for the model's family, measured on the calibration
batches against the float model:

- decoders (the registry's family, or a main output ``logits`` ``[batch, tokens, vocab]`` read
  with an ``input_ids`` feed when the family is not known):
  perplexity increase in percent, ``100 (ppl_quantized / ppl_float - 1)`` over the real tokens
  (``optimizer.metrics_decoder.nll_terms``);
- everything else: 1 - cosine of the main output with the float model's, mean over items
  (``passes.skip_layers_score.Metric``).

How: one ORT session of a copy of the graph in which every quantized weight (site weights and
embedding tables) is a graph input, so each variant is one run with other feeds:

1. the float weights give the reference;
2. a block's sensitivity is the degradation with only that block's sites quantized;
3. everything quantized is measured; while the degradation passes the budget, the most
   sensitive block still quantized is kept float and the combination measured again (errors of
   single blocks do not add up, so every combination is measured, not summed);
4. when even every block float (only the sites outside blocks, the head and tables quantized)
   passes the budget, a ``PassError`` says so and how to relax it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

from runtime.errors import PassError


@dataclass
class Weight:
    """One quantized tensor as the budget sees it: where it is read, float and quantized forms."""

    readers: list[tuple[str, int]]  # (node name, input slot)
    float_array: np.ndarray
    quantized: Callable[[], np.ndarray]  # the dequantized weight, as the node reads it
    block: int | None


class Evaluator:
    def __init__(self, model: ir.Model, weights: list[Weight], batches: list[dict[str, np.ndarray]],
                 family: str | None = None):
        from passes.skip_layers_score import session

        self.weights, self.batches = weights, batches
        copy, self.names = _with_weight_inputs(model, weights)
        self.session = session(ir.serde.serialize_model(copy).SerializeToString())
        self.output = copy.graph.outputs[0].name
        self._quantized: dict[int, np.ndarray] = {}
        self.decoder = _is_decoder(batches, self._run(set(), reference=True), self.output, family)

    def describe(self) -> str:
        return "perplexity increase (%)" if self.decoder else "1 - cosine of the main output"

    def _array(self, i: int, quantized: bool) -> np.ndarray:
        if not quantized:
            return self.weights[i].float_array
        if i not in self._quantized:
            self._quantized[i] = self.weights[i].quantized()
        return self._quantized[i]

    def _run(self, quantized: set[int], reference: bool = False) -> list[np.ndarray]:
        feeds = {name: self._array(i, i in quantized) for i, name in enumerate(self.names)}
        outs = [self.session.run([self.output], {**batch, **feeds})[0] for batch in self.batches]
        if reference:
            self.reference = outs
        return outs

    def degradation(self, quantized: set[int]) -> float:
        outs = self._run(quantized)
        if self.decoder:
            return 100.0 * (np.exp(_nll(outs, self.batches) - _nll(self.reference, self.batches)) - 1.0)
        from passes.skip_layers_score import Metric, token_mask

        metric = Metric("cosine", self.reference, [token_mask(b, r.shape) for b, r in zip(self.batches, self.reference)])
        terms = [metric.terms(b, out) for b, out in enumerate(outs)]
        return sum(s for s, _ in terms) / max(sum(c for _, c in terms), 1)


def choose(model: ir.Model, weights: list[Weight], batches, budget: float, family: str | None = None
           ) -> tuple[set[int], dict]:
    """(blocks kept float, record) for ``budget`` (module docstring); ``family`` as the model
    registry names it, when known (else a ``logits`` output read with ``input_ids`` is a decoder)."""
    evaluator = Evaluator(model, weights, batches, family)
    blocks = sorted({w.block for w in weights if w.block is not None})
    every = set(range(len(weights)))
    sensitivity = {b: evaluator.degradation({i for i, w in enumerate(weights) if w.block == b}) for b in blocks}
    kept_float: list[int] = []
    current = evaluator.degradation(every)
    steps = [{"float_blocks": [], "degradation": current}]
    for block in sorted(blocks, key=lambda b: -sensitivity[b]):
        if current <= budget:
            break
        kept_float.append(block)
        current = evaluator.degradation({i for i, w in enumerate(weights) if w.block not in kept_float})
        steps.append({"float_blocks": list(kept_float), "degradation": current})
    if current > budget:
        raise PassError(f"budget={budget} cannot be met: with every block float the {evaluator.describe()} is "
                        f"{current:.4g} (head, tables and sites outside blocks are still quantized); raise budget, "
                        "or add skip=head+embeddings+outside.")
    record = {"metric": evaluator.describe(), "budget": budget, "samples": sum(len(next(iter(b.values()))) for b in batches),
              "sensitivity": {str(b): round(float(v), 6) for b, v in sensitivity.items()},
              "float_blocks": sorted(kept_float), "degradation": round(float(current), 6),
              "steps": [{**s, "degradation": round(float(s["degradation"]), 6)} for s in steps]}
    return set(kept_float), record


def _with_weight_inputs(model: ir.Model, weights: list[Weight]) -> tuple[ir.Model, list[str]]:
    """A copy of ``model`` whose quantized tensors are graph inputs named ``carve_budget_w{i}``."""
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    nodes = {n.name: n for n in copy.graph}
    names = []
    for i, weight in enumerate(weights):
        array = weight.float_array
        value = ir.Value(name=f"carve_budget_w{i}", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(array.shape))
        copy.graph.inputs.append(value)
        for node_name, slot in weight.readers:
            nodes[node_name].replace_input_with(slot, value)
        names.append(value.name)
    for name, value in list(copy.graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            copy.graph.initializers.pop(name)
    return copy, names


def _is_decoder(batches, outs: list[np.ndarray], output: str, family: str | None) -> bool:
    ids = batches[0].get("input_ids")
    shaped = ids is not None and outs[0].ndim == 3 and outs[0].shape[:2] == ids.shape
    if family is not None:
        return family == "decoder" and shaped
    return shaped and "logits" in output and all(int(b["input_ids"].max()) < outs[0].shape[2] for b in batches)


def _nll(outs: list[np.ndarray], batches) -> float:
    from optimizer.metrics_decoder import nll_terms

    terms = np.concatenate([nll_terms(o, b["input_ids"], b.get("attention_mask")) for o, b in zip(outs, batches)])
    return float(terms.mean())
