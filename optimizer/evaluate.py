"""``carve eval``: accuracy of an artifact against the unoptimized model it came from.

The reference is the source model's plain trace (for built-ins, the cached trace; for an .onnx
source, that file) run with ONNX Runtime fp32, so both sides run on the same engine and every
difference is the passes' doing. What is measured depends on the model family:

- encoder: sentence-embedding cosine (mean, min) on held-out news articles, ranking agreement
  of their pairwise similarities, and linear-probe accuracy on the polarity sentences (probe
  trained on the calibration half, scored on the evaluation half) for each model;
- decoder: perplexity of each model on held-out Shakespeare passages, top-1 next-token
  agreement, and greedy-generation token match over fixed prompts;
- vit: saliency-map correlation on held-out photo crops, and linear-probe accuracy on lfw faces
  versus non-faces (calibration half trains, evaluation half scores).
Sizes are chosen to finish in about a minute on two cores; ``quick=True`` shrinks them for tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort

from runtime.errors import CarveError
from runtime.manifest import read_manifest

RunFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class EvalError(CarveError):
    """The artifact's source cannot be evaluated (unknown family, source file gone)."""


def evaluate(artifact_dir: str | Path, quick: bool = False) -> dict[str, Any]:
    import runtime

    manifest = read_manifest(artifact_dir)
    session = runtime.load(artifact_dir)
    spec = builtin_spec(manifest)
    reference = reference_runner(manifest)
    family = manifest.get("family")
    if spec is None or family not in _FAMILIES:
        raise EvalError(f"{artifact_dir} was made from {manifest['source'].get('kind')} source with no known "
                        "task data; `carve eval` needs a built-in model (carve models lists them).")
    metrics = _FAMILIES[family](spec, reference, session.run, quick)
    return {"artifact": str(artifact_dir), "source": manifest["source"], "family": family,
            "passes": [p["name"] for p in manifest.get("passes", [])], "metrics": metrics}


def builtin_spec(manifest: dict[str, Any]):
    source = manifest.get("source") or {}
    if source.get("kind") != "builtin":
        return None
    from models import registry

    return registry.get(source["name"])


def reference_runner(manifest: dict[str, Any], threads: int | None = None) -> RunFn:
    """An ORT fp32 session of the unoptimized model the artifact was made from."""
    path = reference_path(manifest)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return lambda feeds: dict(zip(names, sess.run(names, feeds)))


def reference_path(manifest: dict[str, Any]) -> Path:
    source = manifest.get("source") or {}
    if source.get("kind") == "builtin":
        from optimizer.progress import Progress
        from optimizer.trace_cache import cached_trace_path

        return cached_trace_path(builtin_spec(manifest), Progress())
    if source.get("kind") == "onnx" and Path(source.get("path", "")).is_file():
        return Path(source["path"])
    raise EvalError(f"the artifact's source ({source.get('kind')}) is not available to compare with; "
                    "evaluate artifacts made from built-in models or .onnx files that still exist.")


def batched(run: RunFn, feeds: dict[str, np.ndarray], output: str, batch: int = 8) -> np.ndarray:
    """Run ``feeds`` in chunks of ``batch`` rows and concatenate one output."""
    n = len(next(iter(feeds.values())))
    parts = [run({k: v[i:i + batch] for k, v in feeds.items()})[output] for i in range(0, n, batch)]
    return np.concatenate(parts)


def _encoder(spec, reference, test, quick):
    from optimizer.eval_text import evaluate_encoder

    return evaluate_encoder(spec, reference, test, quick)


def _decoder(spec, reference, test, quick):
    from optimizer.eval_text import evaluate_decoder

    return evaluate_decoder(spec, reference, test, quick)


def _vit(spec, reference, test, quick):
    from optimizer.eval_vision import evaluate_vit

    return evaluate_vit(spec, reference, test, quick)


_FAMILIES = {"encoder": _encoder, "decoder": _decoder, "vit": _vit}
