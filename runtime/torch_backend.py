"""A loaded ``torch``-target artifact, run as a ``torch.fx.GraphModule`` on any torch device.

``TorchSession`` verifies the artifact like the ONNX Runtime session, reads ``model.onnx``,
rebuilds the GraphModule from it (``optimizer.lower.torch``: no pickled code is ever loaded),
moves it to ``device`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``...), and optionally wraps it in
``torch.compile``. Feeds are checked against the manifest (``runtime.feeds``) and may be numpy
arrays or torch tensors; ``run`` returns numpy arrays, ``run_torch`` device tensors.

Cases refused with one sentence: a device name torch does not know or that this machine
lacks, a ``matmul`` choice that is not one of ``auto``/``dequantize``/``int8``/``fp8``, an fp8
choice where torch has no float8 matmul, inputs torch rejects while running. torch is imported
only here, when such an artifact is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from runtime.errors import ArtifactError, CarveError, FeedError
from runtime.feeds import check_feeds
from runtime.manifest import read_manifest, verify_files


class DeviceError(CarveError):
    """The requested torch device does not exist or is not available here."""


class TorchSession:
    def __init__(self, path: str | Path, threads: int | None = None, verify: bool = True, device: str = "cpu",
                 compile: bool | str = False, matmul: str = "auto"):
        import torch

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if verify:
            verify_files(self.path, self.manifest)
        self.inputs: list[dict[str, Any]] = self.manifest["inputs"]
        self.outputs: list[dict[str, Any]] = self.manifest["outputs"]
        self.device = _device(device)
        if threads:
            torch.set_num_threads(threads)
        self.module = _build(self.path / self.manifest.get("model", "model.onnx"), matmul, self.device)
        self._forward = _compiled(self.module, compile)
        self._order = [spec["name"] for spec in self.inputs]

    @property
    def providers(self) -> list[str]:
        return [f"torch:{self.device}"]

    def run(self, feeds: Mapping[str, Any], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Like the ONNX Runtime session: a cached decoder given no cache prefills, a feature-cache
        artifact given no state recomputes (``runtime.kv.prefill_feeds``, ``runtime.stream``)."""
        from runtime.kv import prefill_feeds
        from runtime.stream import stateless_feeds

        if all(isinstance(v, np.ndarray) for v in feeds.values()):
            feeds = stateless_feeds(self.inputs, prefill_feeds(self.inputs, dict(feeds)))
        values = self.run_torch(feeds, outputs)
        return {name: value.detach().cpu().numpy() for name, value in values.items()}

    def run_torch(self, feeds: Mapping[str, Any], outputs: list[str] | None = None) -> dict[str, Any]:
        """Like ``run``, but returns torch tensors on the session's device (no copy back)."""
        import torch

        names = outputs or [spec["name"] for spec in self.outputs]
        unknown = [n for n in names if n not in {spec["name"] for spec in self.outputs}]
        if unknown:
            raise FeedError(f"the model has no output {unknown[0]!r}; its outputs are: {', '.join(s['name'] for s in self.outputs)}.")
        check_feeds({k: _described(v) if isinstance(v, torch.Tensor) else v for k, v in feeds.items()}, self.inputs)
        args = [_on_device(feeds[name], self.device) for name in self._order]
        try:
            with torch.inference_mode():
                values = self._forward(*args)
        except (RuntimeError, ValueError, IndexError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise FeedError(f"torch rejected the inputs ({first}); check their shapes against `carve inspect`.") from exc
        by_name = dict(zip([spec["name"] for spec in self.outputs], values))
        return {name: by_name[name] for name in names}


def _device(name: str):
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"{name!r} is not a torch device; give cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} was asked for but this torch ({torch.__version__}) sees no CUDA GPU; "
                          "use --device cpu, or a machine and torch build with CUDA.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {name!r} is not available here; use --device cpu.")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise DeviceError(f"device type {device.type!r} is not supported; give cpu, cuda, cuda:N or mps.")
    return device


def _build(model_path: Path, matmul: str, device):
    import onnx_ir as ir

    from optimizer.lower.torch import build_graph_module

    try:
        model = ir.load(model_path)
        ir.external_data.load_to_model(model)
    except Exception as exc:  # onnx_ir raises protobuf and OS errors alike
        raise ArtifactError(f"cannot read {model_path} ({type(exc).__name__}); re-run `carve optimize`.") from exc
    if matmul == "fp8" and not _has_fp8(device):
        raise DeviceError(f"matmul='fp8' needs torch._scaled_mm with float8 on {device}; this device lacks it, "
                          "use matmul='int8' or 'auto'.")
    return build_graph_module(model, matmul=matmul, device=str(device)).to(device)


def _has_fp8(device) -> bool:
    import torch

    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu"


def _compiled(module, compile: bool | str):
    if not compile:
        return module
    import torch

    backend = compile if isinstance(compile, str) else "inductor"
    return torch.compile(module, backend=backend, dynamic=True)


def _described(tensor) -> np.ndarray:
    """A zero-byte numpy view with the tensor's dtype and shape, for the feed checks (no device copy)."""
    import torch

    dtype = torch.empty(0, dtype=tensor.dtype).numpy().dtype
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape=tuple(tensor.shape), strides=(0,) * tensor.dim())


def _on_device(value, device):
    import torch

    tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
    return tensor.to(device)


class CudaBuffers:
    """torch's CUDA side for backends that run their own kernels on torch buffers (TensorRT
    engines, ``runtime.trt_backend``): a device, a non-default stream, tensors and CUDA graphs.
    Keeping these here keeps every torch import of the runtime in its torch backend."""

    def __init__(self, index: int):
        import torch

        self._torch = torch
        self.device = torch.device("cuda", index)
        self.gpu = str(torch.cuda.get_device_name(index))
        self.stream = torch.cuda.Stream(device=self.device)

    def tensor(self, value: Any, dtype: str) -> Any:
        """``value`` (numpy or torch) as a contiguous tensor of ``dtype`` on the device."""
        return self._torch.as_tensor(value).to(self.device, getattr(self._torch, dtype)).contiguous()

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        return self._torch.empty(shape, dtype=getattr(self._torch, dtype), device=self.device)

    def shape(self, value: Any) -> tuple[int, ...]:
        return tuple(self._torch.as_tensor(value).shape)

    def follow_current(self) -> None:
        """Make the stream wait for work queued on the current stream (input copies)."""
        self.stream.wait_stream(self._torch.cuda.current_stream(self.device))

    def on_stream(self):
        return self._torch.cuda.stream(self.stream)

    def capture(self, run) -> Any:
        """``run()`` captured into a CUDA graph on the stream."""
        graph = self._torch.cuda.CUDAGraph()
        with self._torch.cuda.graph(graph, stream=self.stream):
            run()
        return graph

    def copy(self, target: Any, value: Any) -> None:
        target.copy_(self._torch.as_tensor(value), non_blocking=True)
