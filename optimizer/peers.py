"""The peer graphs ``carve bench`` times an artifact against, built with ONNX Runtime's own tools.

- ``ort-quant``: ``onnxruntime.quantization.quantize_dynamic(per_channel=True)`` of the plain
  fp32 trace, what a user gets from ORT with one call;
- ``ort-opt+quant``: ORT's transformers optimizer (``optimize_model``, fusions for the model
  type) followed by the same ``quantize_dynamic``, ORT's recommended CPU recipe.

Building them takes seconds (a minute for a 135M-parameter decoder), so the results are cached
under ``models.cache.cache_dir("peers", ...)``, keyed by the trace's path, size and mtime and
the ORT version; an entry appears by a final rename, so a cut-off build leaves nothing usable.
What ORT's optimizer fused is stored next to the graph, so a cached peer still reports it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from models.cache import cache_dir, cache_key
from optimizer.progress import Progress
from runtime.errors import CarveError

# The model type ORT's transformers optimizer is told, per carve family. A decoder has no
# Llama entry; "gpt2" runs the generic fusions (RMSNorm, skip-norm) and leaves the rest alone.
ORT_MODEL_TYPES = {"encoder": "bert", "vit": "vit", "decoder": "gpt2"}
PEER_GRAPHS = ("ort-quant", "ort-opt+quant")


class PeerUnavailable(CarveError):
    """A peer cannot be built for this model; the bench shows the reason in its row."""


def peer_graph(kind: str, trace: Path, family: str | None, progress: Progress) -> tuple[Path, str]:
    """The cached peer graph ``kind`` made from ``trace`` and a note on how it was made."""
    model_type = ORT_MODEL_TYPES.get(family or "")
    if kind == "ort-opt+quant" and model_type is None:
        raise PeerUnavailable("ORT's transformers optimizer needs a model type and this model's family is unknown")
    folder = cache_dir("peers", f"{kind.replace('+', '-')}-{_trace_key(trace, kind, model_type)}")
    path, note_file = folder / "model.onnx", folder / "note.json"
    if not path.is_file():
        with progress.step(f"building peer {kind} (once; cached afterwards)"), _quiet():
            built, text = _build(kind, trace, folder, model_type)
        note_file.write_text(json.dumps({"text": text}))
        os.replace(built, path)
    note = json.loads(note_file.read_text()) if note_file.is_file() else {}
    return path, note.get("text", "")


def _trace_key(trace: Path, kind: str, model_type: str | None) -> str:
    import onnxruntime

    data = trace.with_name(trace.name + ".data")
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in (trace, data) if p.is_file()]
    return cache_key(str(trace.resolve()), stats, onnxruntime.__version__, kind, model_type)


def _build(kind: str, trace: Path, folder: Path, model_type: str | None) -> tuple[Path, str]:
    """Write the peer into ``folder`` under a temporary name; returns that name and a note."""
    work = folder / f"building-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        source, text = trace, "quantize_dynamic(per_channel=True) of the fp32 trace"
        if kind == "ort-opt+quant":
            source, text = _ort_optimize(trace, work / "optimized.onnx", model_type)
        out = folder / f"{work.name}.onnx"
        try:
            _quantize(source, out)
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        return out, text
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _ort_optimize(trace: Path, out: Path, model_type: str) -> tuple[Path, str]:
    """ORT's transformers optimizer on the trace; the note lists the fusions it found."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(trace), model_type=model_type, num_heads=0, hidden_size=0, use_gpu=False)
    optimized.save_model_to_file(str(out), use_external_data_format=False)
    stats = optimized.get_fused_operator_statistics() or {}
    fused = ", ".join(f"{op} {n}" for op, n in stats.items() if n) or "nothing"
    missing = "" if stats.get("Attention") or stats.get("MultiHeadAttention") else "; no attention fusion"
    return out, f"optimize_model(model_type={model_type!r}) fused {fused}{missing}; then quantize_dynamic"


def _quantize(source: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(out), per_channel=True, weight_type=QuantType.QInt8)


@contextlib.contextmanager
def _quiet():
    """ORT's tools print advice and shape-inference failures to stdout and the root logger;
    they would corrupt ``--json`` output and read like errors, so both are muted meanwhile."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)
