"""Mixed precision by budget: sensitivity per block, the most sensitive blocks kept float.

tiny-bert (an encoder: the budget is 1 - cosine of its main output) with w4 weights, whose
error is large enough on random weights for a budget to bite. The recorded degradation is
checked against an independent ORT run of the resulting graph on the same calibration data.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from models import registry
from optimizer.calibrate import calibration_feeds
from optimizer.pipeline import PassContext, instantiate, run_pipeline
from optimizer.progress import Progress
from optimizer.specs import PassSpec
from optimizer.trace_cache import cached_trace
from passes.quantize_rewrite import META
from runtime.errors import PassError

SAMPLES = 8


def _quantize(name: str, options: dict):
    model = cached_trace(registry.get(name), Progress())
    ctx = PassContext(calibration=name)
    out, records = run_pipeline(model, [PassSpec("quantize", {"calib_samples": str(SAMPLES), **options})], ctx)
    return out, records[0]


def _outputs(model: ir.Model, batches) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    return [sess.run(None, b)[0] for b in batches]


def _one_minus_cosine(ref: list[np.ndarray], test: list[np.ndarray]) -> float:
    a = np.concatenate([r.reshape(len(r), -1) for r in ref]).astype(np.float64)
    b = np.concatenate([t.reshape(len(t), -1) for t in test]).astype(np.float64)
    return float(np.mean(1 - (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


@pytest.fixture(scope="module")
def unconstrained():
    return _quantize("tiny-bert", {"mode": "w4", "block": "32", "embed": "float", "budget": "1"})[1].details["budget"]


def test_sensitivity_is_measured_per_block(unconstrained):
    assert unconstrained["metric"] == "1 - cosine of the main output"
    assert set(unconstrained["sensitivity"]) == {"0", "1", "2", "3"}
    assert all(v > 0 for v in unconstrained["sensitivity"].values())
    assert unconstrained["float_blocks"] == [] and unconstrained["degradation"] <= 1


def test_tight_budget_keeps_the_most_sensitive_blocks_float(unconstrained):
    sensitivity = unconstrained["sensitivity"]
    budget = unconstrained["degradation"] * 0.6  # must keep at least one block float
    model, record = _quantize("tiny-bert", {"mode": "w4", "block": "32", "embed": "float", "budget": str(budget)})
    details = record.details["budget"]
    kept = details["float_blocks"]
    assert kept and details["degradation"] <= budget
    ranked = sorted(sensitivity, key=lambda b: -sensitivity[b])
    assert [str(b) for b in sorted(kept)] == sorted(ranked[:len(kept)])
    # Structure and counts: the float blocks' sites read float weights, the others DequantizeLinear.
    quantized = [n for n in model.graph if n.op_type == "MatMul" and META in n.metadata_props]
    assert len(quantized) == record.details["quantized"] == 24 - 6 * len(kept)
    assert not any(f"block.{b}." in group["sites"][0] for b in kept for group in record.details["groups"]
                   if not group.get("kept_float"))
    # The recorded degradation is what the graph does on the same calibration data.
    batches = calibration_feeds("tiny-bert", SAMPLES)
    reference = _outputs(cached_trace(registry.get("tiny-bert"), Progress()), batches)
    assert _one_minus_cosine(reference, _outputs(model, batches)) == pytest.approx(details["degradation"], rel=1e-3, abs=1e-6)


def test_impossible_budget_is_a_clear_error():
    """int4 embedding tables alone cost more than this budget, and they are not blocks."""
    with pytest.raises(PassError, match=r"budget=1e-09 cannot be met: with every block float"):
        _quantize("tiny-bert", {"mode": "w4", "budget": "1e-9"})


def test_decoder_budget_is_a_perplexity_increase():
    _, record = _quantize("tiny-llama", {"mode": "w8", "budget": "50"})
    details = record.details["budget"]
    assert details["metric"] == "perplexity increase (%)" and set(details["sensitivity"]) == {"0", "1"}


@pytest.mark.parametrize("options, needle", [
    ({"mode": "dynamic", "budget": "1"}, "weight-only modes"),
    ({"mode": "w4", "budget": "0"}, "budget > 0"),
])
def test_bad_budget_options(options, needle):
    with pytest.raises(PassError, match=needle):
        instantiate([PassSpec("quantize", options)])
