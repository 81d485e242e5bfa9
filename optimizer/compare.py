"""Side-by-side comparison of the unoptimized graph and an artifact, in one process.

Used by ``carve optimize --compare``: both run on the same feeds with ONNX Runtime, interleaved
(original, optimized, original, ...) after warm-up so that machine noise hits both alike; the
report gives the median latencies, their ratio, and how far each output moved (max absolute
error, and row-wise cosine similarity with its mean and minimum).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort


@dataclass
class Comparison:
    original_ms: float
    optimized_ms: float
    outputs: dict[str, dict[str, float]]
    runs: int

    @property
    def speedup(self) -> float:
        return self.original_ms / self.optimized_ms

    def to_json(self) -> dict[str, Any]:
        return {"original_ms": self.original_ms, "optimized_ms": self.optimized_ms,
                "speedup": self.speedup, "runs": self.runs, "outputs": self.outputs}


def compare(original: bytes, session, feeds: dict[str, np.ndarray], runs: int = 20, warmup: int = 3,
            threads: int | None = None) -> Comparison:
    reference = _ort_session(original, threads)
    names = [spec["name"] for spec in session.outputs]
    ref_out = dict(zip(names, reference.run(names, feeds)))
    new_out = session.run(feeds)
    accuracy = {name: output_agreement(ref_out[name], new_out[name]) for name in names}
    times_ref, times_new = _interleaved(lambda: reference.run(names, feeds), lambda: session.run(feeds), runs, warmup)
    return Comparison(statistics.median(times_ref) * 1e3, statistics.median(times_new) * 1e3, accuracy, runs)


def output_agreement(ref: np.ndarray, new: np.ndarray) -> dict[str, float]:
    ref64, new64 = ref.astype(np.float64), new.astype(np.float64)
    rows_ref = ref64.reshape(ref64.shape[0], -1) if ref64.ndim > 1 else ref64[None]
    rows_new = new64.reshape(rows_ref.shape)
    dots = (rows_ref * rows_new).sum(1)
    norms = np.linalg.norm(rows_ref, axis=1) * np.linalg.norm(rows_new, axis=1)
    cosine = np.where(norms > 0, dots / np.maximum(norms, 1e-30), 1.0)
    return {"max_abs_err": float(np.abs(ref64 - new64).max()) if ref.size else 0.0,
            "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min())}


def _interleaved(run_a, run_b, runs: int, warmup: int) -> tuple[list[float], list[float]]:
    for _ in range(warmup):
        run_a(), run_b()
    times_a, times_b = [], []
    for _ in range(runs):
        for fn, sink in ((run_a, times_a), (run_b, times_b)):
            start = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - start)
    return times_a, times_b


def _ort_session(model_bytes: bytes, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
