"""Layer skipping, part 3: the numbers a skip set is judged by.

- ``Metric``: the end-to-end score of a model's main output against the original's, lower is
  better, averaged over all calibration batches:
  ``kl`` — KL(p_original || p_skipped) of the softmax over the last axis (next-token
  distributions of a decoder's logits), mean over tokens, padding excluded when a 2-D mask feed
  matches the output's first two axes;
  ``cosine`` — 1 - cosine of each item's flattened output (a sentence embedding, a CLS
  embedding, a saliency map), mean over items; when every original value is >= 0 (a sigmoid
  map such as vit-s's saliency) both sides are centred first, because the cosine of two
  positive maps stays near 1 whatever their pattern (centred, it is the Pearson correlation).
- ``block_influence``: ShortGPT's BI = 1 - mean cos(x_in, x_out) over tokens, per unit.
- ``reference_run``: one ORT run of the original graph per batch with chosen intermediate
  values added as outputs (the helper the evaluators share).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort


def session(model_bytes: bytes) -> ort.InferenceSession:
    """A quiet CPU session (the pass runs on the build machine's CPU whatever the target)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def reference_run(model: ir.Model, extra: list[str], batches: list[dict[str, np.ndarray]]
                  ) -> list[dict[str, np.ndarray]]:
    """Run the original graph on every batch, returning its outputs plus the ``extra`` values."""
    proto = ir.serde.serialize_model(model)
    present = {o.name for o in proto.graph.output}
    dtypes = _dtypes(model)
    for name in dict.fromkeys(extra):
        if name not in present:
            info = (onnx.helper.make_tensor_value_info(name, dtypes[name], None) if name in dtypes
                    else onnx.helper.make_empty_tensor_value_info(name))
            proto.graph.output.append(info)
    sess = session(proto.SerializeToString())
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(names, batch))) for batch in batches]


def _dtypes(model: ir.Model) -> dict[str, int]:
    out = {v.name: int(v.dtype) for v in model.graph.inputs if v.dtype is not None}
    for node in model.graph:
        out.update((v.name, int(v.dtype)) for v in node.outputs if v.dtype is not None)
    return out


def token_mask(batch: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray | None:
    """The batch's padding mask when one matches ``shape[:2]`` ([batch, tokens]); else None."""
    for name, value in batch.items():
        if "mask" in name.lower() and value.ndim == 2 and len(shape) >= 3 and value.shape == tuple(shape[:2]):
            return value.astype(bool)
    return None


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """log(sum(exp(x))) over the last axis, accumulated in float64."""
    top = x.max(axis=-1, keepdims=True)
    return top[..., 0].astype(np.float64) + np.log(np.exp(x - top).sum(axis=-1, dtype=np.float64))


class Metric:
    """The end-to-end score of skipped-model outputs against the original's (see module doc)."""

    def __init__(self, kind: str, references: list[np.ndarray], masks: list[np.ndarray | None]):
        self.kind, self.masks = kind, masks
        self.centred = kind == "cosine" and all(float(r.min()) >= 0.0 for r in references)
        self.prepared = [self._prepare(r) for r in references]

    def describe(self) -> str:
        if self.kind == "kl":
            return "kl: KL divergence of next-token distributions from the original's, mean over tokens"
        centred = " (centred: the output is non-negative)" if self.centred else ""
        return f"cosine: 1 - cosine of the main output with the original's{centred}, mean over items"

    def _prepare(self, ref: np.ndarray):
        if self.kind == "kl":
            ref = ref.astype(np.float32, copy=False)
            lse = _logsumexp(ref)
            return ref, np.exp(ref - lse[..., None]).astype(np.float32), lse
        return self._rows(ref)

    def _rows(self, x: np.ndarray) -> np.ndarray:
        rows = x.reshape(len(x), -1).astype(np.float64)
        return rows - rows.mean(axis=1, keepdims=True) if self.centred else rows

    def terms(self, b: int, test: np.ndarray) -> tuple[float, int]:
        """(sum, count) of the per-token or per-item scores of batch ``b``."""
        if self.kind == "kl":
            # KL = sum p (log p - log q) = sum p (ref - test) - lse(ref) + lse(test): differences
            # first, so that two close models' KL is not lost in the rounding of their entropies.
            ref, p, lse = self.prepared[b]
            test = test.astype(np.float32, copy=False)
            per_token = (p * (ref - test)).sum(axis=-1, dtype=np.float64) - lse + _logsumexp(test)
            per_token = np.maximum(per_token, 0.0)
            mask = self.masks[b]
            chosen = per_token[mask] if mask is not None else per_token.ravel()
            return float(chosen.sum()), int(chosen.size)
        return float((1.0 - _row_cosine(self.prepared[b], self._rows(test))).sum()), len(test)


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine; two zero rows count as equal (1), a zero row against another as 0."""
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    denom = na * nb
    dots = np.einsum("...i,...i->...", a, b)
    return np.where(denom > 0, dots / np.where(denom > 0, denom, 1.0), (na == nb).astype(np.float64))


def block_influence(runs: list[dict[str, np.ndarray]], masks: list[np.ndarray | None], a: str, b: str) -> float:
    """BI = 1 - mean over (unpadded) tokens of cos(stream before, stream after)."""
    total, count = 0.0, 0
    for run, mask in zip(runs, masks):
        cos = _row_cosine(run[a].astype(np.float64), run[b].astype(np.float64))
        chosen = cos[mask] if mask is not None and cos.shape == mask.shape else cos.ravel()
        total, count = total + float(chosen.sum()), count + chosen.size
    return 1.0 - total / max(count, 1)
