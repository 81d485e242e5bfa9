"""A loaded artifact, run with ONNX Runtime on the CPU.

``Session`` verifies the artifact (manifest, file hashes), opens ``model.onnx`` with ONNX
Runtime, and checks every feed against the manifest's signature before running, so a wrong
name, dtype or shape is one clear ``FeedError`` rather than an ONNX Runtime stack dump. A
KV-cached decoder given only ``input_ids`` (and ``attention_mask``) runs as a prefill: an empty
past and positions from the mask are filled in (``runtime.kv.prefill_feeds``); a feature-cache
artifact given no state gets zeros, which always recompute (``runtime.stream``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnxruntime as ort

from runtime.errors import ArtifactError, FeedError
from runtime.feeds import check_feeds
from runtime.kv import prefill_feeds
from runtime.stream import stateless_feeds
from runtime.manifest import read_manifest, verify_files


class Session:
    def __init__(self, path: str | Path, threads: int | None = None, verify: bool = True, spin: bool = True):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if verify:
            verify_files(self.path, self.manifest)
        self.inputs: list[dict[str, Any]] = self.manifest["inputs"]
        self.outputs: list[dict[str, Any]] = self.manifest["outputs"]
        self._ort = _open(self.path / self.manifest.get("model", "model.onnx"), threads, spin)

    @property
    def providers(self) -> list[str]:
        """The execution providers ONNX Runtime actually uses for this session."""
        return self._ort.get_providers()

    def run(self, feeds: Mapping[str, Any], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        arrays = check_feeds(stateless_feeds(self.inputs, prefill_feeds(self.inputs, feeds)), self.inputs)
        names = outputs or [spec["name"] for spec in self.outputs]
        unknown = [n for n in names if n not in {spec["name"] for spec in self.outputs}]
        if unknown:
            raise FeedError(f"the model has no output {unknown[0]!r}; its outputs are: {', '.join(s['name'] for s in self.outputs)}.")
        try:
            values = self._ort.run(names, arrays)
        except (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ort.capi.onnxruntime_pybind11_state.RuntimeException) as exc:
            first = str(exc).strip().splitlines()[0][:300]
            raise FeedError(f"ONNX Runtime rejected the inputs ({first}); check their shapes against `carve inspect`.") from exc
        return dict(zip(names, values))


def _open(model_path: Path, threads: int | None, spin: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not spin:  # sessions that take turns (speculative decoding): idle threads spinning slow the other one
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own pybind types
        first = str(exc).strip().splitlines()[0][:300]
        raise ArtifactError(f"ONNX Runtime cannot load {model_path} ({first}); re-run `carve optimize`.") from exc
