"""carve's minimal runtime: load an artifact and run it. Imports no torch (but in its torch backend)."""

from __future__ import annotations

from pathlib import Path

from runtime.errors import ArtifactError, CarveError, FeedError
from runtime.session import Session

__all__ = ["load", "Session", "CarveError", "ArtifactError", "FeedError"]


def load(path: str | Path, threads: int | None = None, verify: bool = True, spin: bool = True, **options) -> Session:
    """Open the artifact directory ``path`` (written by ``carve optimize``) for running.

    The manifest's target picks the backend: ``torch`` artifacts run as a torch GraphModule
    (``options``: ``device``, ``compile``, ``matmul``; see ``runtime.torch_backend``), every
    other target with ONNX Runtime on the CPU. ``spin=False`` stops ONNX Runtime's idle threads from
    spin-waiting, for sessions that take turns with another (a speculative draft and its model).
    """
    from runtime.manifest import read_manifest

    if read_manifest(path).get("target") == "torch":
        from runtime.torch_backend import TorchSession

        return TorchSession(path, threads=threads, verify=verify, **options)
    if options:
        raise ArtifactError(f"{path} is an ONNX Runtime artifact; {', '.join(sorted(options))} apply only to "
                            "artifacts made with --target torch.")
    return Session(path, threads=threads, verify=verify, spin=spin)
