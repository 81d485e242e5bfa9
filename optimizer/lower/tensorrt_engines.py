"""TensorRT engines as files: the engine cache and the artifact's ``engines/`` folder.

No TensorRT here (it runs where TensorRT does not): ``tensorrt_build`` produces the bytes.

- ``cache_key(graph_sha256, profile, tensorrt_version, gpu)``: an engine is reusable exactly
  when the graph, the optimization profile, the TensorRT version and the GPU are the same;
- ``EngineCache``: ``CARVE_CACHE/engines/<key>.plan`` with a ``<key>.json`` beside it, and the
  TensorRT timing cache per (TensorRT version, GPU), which makes rebuilds of similar graphs fast;
- ``attach(artifact_dir, engines)``: copies built engines into ``engines/<name>.plan``, records
  them under ``engines`` in the manifest (file, graph, profile, TensorRT version, GPU, key) and
  adds their sha256 to ``files``; the manifest is replaced atomically, so a failed attach
  leaves the artifact as it was;
- ``refuse_mismatch(meta, tensorrt_version, gpu)``: the one-sentence error for an engine made
  by another TensorRT version or on another GPU (a plan file runs only where it was built).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import ArtifactError
from runtime.manifest import MANIFEST, read_manifest, sha256_file


@dataclass
class BuiltEngine:
    """One engine: its bytes' file, and what it was built from and for."""

    name: str
    plan: Path
    graph: str
    profile: dict[str, Any]
    tensorrt: str
    gpu: str
    key: str
    seconds: float = 0.0
    from_cache: bool = False


def cache_key(graph_sha256: str, profile: dict[str, Any], tensorrt_version: str, gpu: str) -> str:
    text = json.dumps({"graph": graph_sha256, "profile": profile, "tensorrt": tensorrt_version, "gpu": gpu},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def graph_sha256(artifact_dir: Path, manifest: dict[str, Any], graph_file: str) -> str:
    """The hash of a graph and its external data, from the manifest's own file hashes."""
    files = manifest.get("files", {})
    parts = [files.get(name, {}).get("sha256") or sha256_file(artifact_dir / name)
             for name in sorted(files) if name == graph_file or name.startswith(f"{graph_file}.")]
    if not parts:
        parts = [sha256_file(artifact_dir / graph_file)]
    return hashlib.sha256("".join(parts).encode()).hexdigest()


class EngineCache:
    def __init__(self, root: Path | None = None):
        base = root or Path(os.environ.get("CARVE_CACHE", Path.home() / ".cache" / "carve")) / "engines"
        self.root = Path(base)

    def plan(self, key: str) -> Path:
        return self.root / f"{key}.plan"

    def get(self, key: str) -> Path | None:
        path = self.plan(key)
        return path if path.is_file() and (self.root / f"{key}.json").is_file() else None

    def put(self, key: str, data: bytes, meta: dict[str, Any]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.{uuid.uuid4().hex[:8]}"
        tmp.write_bytes(data)
        os.replace(tmp, self.plan(key))
        (self.root / f"{key}.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        return self.plan(key)

    def timing_cache(self, tensorrt_version: str, gpu: str) -> Path:
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{tensorrt_version}-{gpu}").strip("-")
        return self.root / f"timing-{slug}.cache"


def attach(artifact_dir: str | Path, engines: list[BuiltEngine]) -> dict[str, Any]:
    """Copy ``engines`` into the artifact and record them in its manifest; returns the new manifest."""
    directory = Path(artifact_dir)
    manifest = read_manifest(directory)
    (directory / "engines").mkdir(exist_ok=True)
    records = dict(manifest.get("engines") or {})
    for engine in engines:
        relative = f"engines/{engine.name}.plan"
        shutil.copyfile(engine.plan, directory / relative)
        records[engine.name] = {"file": relative, "graph": engine.graph, "profile": engine.profile,
                                "tensorrt": engine.tensorrt, "gpu": engine.gpu, "key": engine.key,
                                "build_seconds": round(engine.seconds, 2), "from_cache": engine.from_cache}
        manifest["files"][relative] = {"sha256": sha256_file(directory / relative),
                                       "bytes": (directory / relative).stat().st_size}
    manifest["engines"] = records
    tmp = directory / f".{MANIFEST}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, directory / MANIFEST)
    return manifest


def refuse_mismatch(name: str, meta: dict[str, Any], tensorrt_version: str, gpu: str) -> None:
    """Raise ``ArtifactError`` when engine ``name`` was built by another TensorRT or on another GPU."""
    built_trt, built_gpu = meta.get("tensorrt"), meta.get("gpu")
    if built_trt != tensorrt_version:
        raise ArtifactError(f"engine {name!r} was built by TensorRT {built_trt} but this machine has TensorRT "
                            f"{tensorrt_version}; rebuild it here with `python -m optimizer.lower.tensorrt_build ARTIFACT`.")
    if built_gpu != gpu:
        raise ArtifactError(f"engine {name!r} was built for the GPU {built_gpu!r} but this machine's GPU is {gpu!r}; "
                            "rebuild it here with `python -m optimizer.lower.tensorrt_build ARTIFACT`.")
