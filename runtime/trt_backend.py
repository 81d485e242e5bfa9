"""Running an artifact's TensorRT engines, with torch CUDA tensors as buffers.

``TensorRTSession(artifact, engine="model")`` verifies the artifact, refuses an engine built by
another TensorRT version or on another GPU (one sentence, naming both), deserializes it and
keeps one execution context and a non-default CUDA stream. ``run(feeds)`` uses TensorRT's
name-based I/O: ``set_input_shape`` and ``set_tensor_address`` per input (torch CUDA tensors,
converted from numpy when needed), output buffers sized from ``get_tensor_shape`` after the
input shapes are set, then ``execute_async_v3`` on the stream. Outputs come back as torch CUDA
tensors (``numpy=True``: numpy arrays).

``capture(feeds)`` / ``replay(feeds)`` are for static shapes, as in decoding one token at a
time: the inputs get fixed buffers, one run happens outside capture (TensorRT may allocate on
its first run), then ``execute_async_v3`` is captured into a ``torch.cuda.CUDAGraph``;
``replay`` copies the new inputs into the fixed buffers and replays the graph, with no per-call
TensorRT or launch overhead. Shapes differing from the captured ones are refused.

``tensorrt`` is imported inside the functions that need it, and every torch call goes through
the torch backend's ``CudaBuffers``: importing the ``runtime`` package imports neither, and this
module never imports torch itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from runtime.errors import ArtifactError, FeedError
from runtime.manifest import read_manifest, verify_files

_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                 "INT8": "int8", "BOOL": "bool", "UINT8": "uint8"}


def engine_names(path: str | Path) -> list[str]:
    """The engines an artifact holds (empty when none were built)."""
    return sorted((read_manifest(path).get("engines") or {}).keys())


class TensorRTSession:
    def __init__(self, path: str | Path, engine: str = "model", device: int = 0, verify: bool = True):
        import tensorrt as trt

        from runtime.torch_backend import CudaBuffers

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if verify:
            verify_files(self.path, self.manifest)
        meta = self._engine_meta(engine)
        from optimizer.lower.tensorrt_engines import refuse_mismatch

        self.cuda = CudaBuffers(device)
        self.device = self.cuda.device
        refuse_mismatch(engine, meta, trt.__version__, self.cuda.gpu)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine((self.path / meta["file"]).read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT could not deserialize {meta['file']}; rebuild it with "
                                "`python -m optimizer.lower.tensorrt_build ARTIFACT`.")
        self.context = self.engine.create_execution_context()
        self.stream = self.cuda.stream
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self._graph: Any = None
        self._static: dict[str, Any] = {}
        self._keep: dict[str, Any] = {}

    def _engine_meta(self, engine: str) -> dict[str, Any]:
        engines = self.manifest.get("engines") or {}
        if engine not in engines:
            have = ", ".join(engines) or "none"
            raise ArtifactError(f"{self.path} has no TensorRT engine {engine!r} (it has: {have}); build engines with "
                                "`python -m optimizer.lower.tensorrt_build ARTIFACT`.")
        return dict(engines[engine])

    def _dtype(self, name: str) -> str:
        return _TORCH_DTYPES[self.engine.get_tensor_dtype(name).name]

    def _bind(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Set every input's shape and address; allocate and bind outputs; returns the outputs."""
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise FeedError(f"missing input {missing[0]!r}; the engine's inputs are: {', '.join(self.inputs)}.")
        self._keep = {}
        for name in self.inputs:
            tensor = self.cuda.tensor(feeds[name], self._dtype(name))
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise FeedError(f"input {name!r} of shape {list(tensor.shape)} is outside the engine's optimization "
                                "profile; rebuild with wider shapes=... ranges.")
            self.context.set_tensor_address(name, tensor.data_ptr())
            self._keep[name] = tensor  # the buffer must outlive the asynchronous run
        outputs = {}
        for name in self.outputs:
            dims = self.context.get_tensor_shape(name)
            shape = tuple(dims[i] for i in range(len(dims)))
            outputs[name] = self.cuda.empty(shape, self._dtype(name))
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        return outputs

    def run(self, feeds: Mapping[str, Any], numpy: bool = False) -> dict[str, Any]:
        outputs = self._bind(feeds)
        self.cuda.follow_current()  # inputs were copied on the current stream
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise FeedError("TensorRT failed to run the engine; check the inputs' shapes against the manifest.")
        self.stream.synchronize()
        return {k: v.cpu().numpy() for k, v in outputs.items()} if numpy else outputs

    def capture(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Bind fixed buffers for these shapes and capture one run as a CUDA graph; returns its outputs."""
        outputs = self._bind(feeds)
        self._static = {**self._keep, **outputs}
        with self.cuda.on_stream():
            self.context.execute_async_v3(self.stream.cuda_stream)  # first run outside capture
        self.stream.synchronize()
        self._graph = self.cuda.capture(lambda: self.context.execute_async_v3(self.stream.cuda_stream))
        return outputs

    def replay(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Copy ``feeds`` into the captured buffers and replay; the outputs are the captured buffers."""
        if self._graph is None:
            raise FeedError("replay needs a captured graph; call capture(feeds) first.")
        for name in self.inputs:
            shape = self.cuda.shape(feeds[name])
            if shape != tuple(self._static[name].shape):
                raise FeedError(f"input {name!r} has shape {list(shape)} but the graph was captured with "
                                f"{list(self._static[name].shape)}; capture again for new shapes.")
        self.cuda.follow_current()  # feeds may come from the current stream
        with self.cuda.on_stream():
            for name in self.inputs:
                self.cuda.copy(self._static[name], feeds[name])
            self._graph.replay()
        self.stream.synchronize()
        return {name: self._static[name] for name in self.outputs}


def load(path: str | Path, engine: str = "model", device: int = 0, verify: bool = True) -> TensorRTSession:
    """Open engine ``engine`` of the artifact at ``path`` on CUDA device ``device``."""
    return TensorRTSession(path, engine=engine, device=device, verify=verify)
