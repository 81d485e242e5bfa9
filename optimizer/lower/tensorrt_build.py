"""Building TensorRT engines for an artifact (imported only where ``tensorrt`` imports).

    python -m optimizer.lower.tensorrt_build ARTIFACT [--workspace-gib 4] [--graph NAME=FILE ...]

For each engine the lowering planned (``manifest["lowering"]["engines"]``: one per named graph,
``prefill`` and ``decode`` for a KV-cached decoder; see ``tensorrt_profiles``):

1. the network comes from TensorRT's ONNX parser, created ``STRONGLY_TYPED`` (the graph carries
   its precision: TensorRT 11 has no precision builder flags); a parser error names the node;
2. one optimization profile with the engine's min / opt / max shapes per input;
3. a workspace limit, and the timing cache of this TensorRT version and GPU, loaded before and
   saved after, so a rebuild of a similar graph skips most tactic timing;
4. progress per build phase on stderr (``IProgressMonitor``);
5. the engine cache (``tensorrt_engines.EngineCache``) keyed by graph hash, profile, TensorRT
   version and GPU name: an unchanged engine is not rebuilt;
6. the engines are copied into ``engines/`` of the artifact and recorded in its manifest.

Named graphs: ``graphs`` maps a graph name to its ONNX file in the artifact (default
``{"model": "model.onnx"}``), so a decoder whose prefill and decode graphs are separate files
builds each from its own graph.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import tensorrt as trt

from optimizer.lower.tensorrt_engines import BuiltEngine, EngineCache, attach, cache_key, graph_sha256
from optimizer.lower.tensorrt_profiles import engine_profiles
from runtime.errors import ArtifactError, CarveError
from runtime.manifest import read_manifest, verify_files


class _Progress(trt.IProgressMonitor):
    """Prints each build phase once, with its step count, to stderr."""

    def __init__(self, label: str) -> None:
        trt.IProgressMonitor.__init__(self)
        self.label = label

    def phase_start(self, phase_name: str, parent_phase: str, num_steps: int) -> None:
        indent = "  " if parent_phase else ""
        print(f"[{self.label}] {indent}{phase_name} ({num_steps} steps)", file=sys.stderr, flush=True)

    def step_complete(self, phase_name: str, step: int) -> bool:
        return True  # returning False would cancel the build

    def phase_finish(self, phase_name: str) -> None:
        pass


def gpu_name(device: int = 0) -> str:
    import torch

    if not torch.cuda.is_available():
        raise CarveError("TensorRT engines need a CUDA GPU but torch sees none here; build on the GPU that will run them.")
    return str(torch.cuda.get_device_name(device))


def build_engine(onnx_path: Path, profile: dict[str, dict[str, list[int]]], timing_cache: Path,
                 workspace_bytes: int, label: str) -> bytes:
    """Parse ``onnx_path`` strongly typed and build one serialized engine for ``profile``."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = "; ".join(f"node {e.node_name()!r} ({e.node_operator()}): {e.desc()}" for e in errors[:3])
        raise CarveError(f"TensorRT's ONNX parser rejected {onnx_path.name} ({first}); run the legality check "
                         "(`optimizer.lower.tensorrt_legal.check`) and re-lower.")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.progress_monitor = _Progress(label)
    optimization = builder.create_optimization_profile()
    for name, shapes in profile.items():
        optimization.set_shape(name, trt.Dims(shapes["min"]), trt.Dims(shapes["opt"]), trt.Dims(shapes["max"]))
    config.add_optimization_profile(optimization)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CarveError(f"TensorRT could not build an engine from {onnx_path.name} for {label}; "
                         "see TensorRT's log above, and check the shape ranges (shapes=...).")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


def build_engines(artifact_dir: str | Path, graphs: dict[str, str] | None = None, workspace_gib: float = 4.0,
                  cache: EngineCache | None = None) -> list[BuiltEngine]:
    """Build (or take from the cache) every planned engine of the artifact and attach them."""
    directory = Path(artifact_dir)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    graphs = graphs or {"model": manifest.get("model", "model.onnx")}
    plan = _plan(manifest, graphs)
    cache = cache or EngineCache()
    gpu, version = gpu_name(), trt.__version__
    built = []
    for name, spec in plan.items():
        graph_file = graphs[spec["graph"]]
        key = cache_key(graph_sha256(directory, manifest, graph_file), spec["profile"], version, gpu)
        start, cached = time.perf_counter(), cache.get(key)
        plan_file = cached
        if plan_file is None:
            data = build_engine(directory / graph_file, spec["profile"], cache.timing_cache(version, gpu),
                                int(workspace_gib * (1 << 30)), name)
            meta = {"graph": graph_file, "profile": spec["profile"], "tensorrt": version, "gpu": gpu}
            plan_file = cache.put(key, data, meta)
        built.append(BuiltEngine(name, plan_file, graph_file, spec["profile"], version, gpu, key,
                                 time.perf_counter() - start, from_cache=cached is not None))
    attach(directory, built)
    return built


def _plan(manifest: dict[str, Any], graphs: dict[str, str]) -> dict[str, dict]:
    planned = (manifest.get("lowering") or {}).get("engines")
    if planned and all(spec["graph"] in graphs for spec in planned.values()):
        return dict(planned)
    if not str(manifest.get("target", "")).startswith("tensorrt"):
        raise ArtifactError(f"the artifact was lowered for {manifest.get('target')!r}, not TensorRT; "
                            "run `carve optimize MODEL -o DIR --target tensorrt` first.")
    return engine_profiles({name: manifest["inputs"] for name in graphs}, {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optimizer.lower.tensorrt_build",
                                     description="Build the TensorRT engines of a --target tensorrt artifact.")
    parser.add_argument("artifact")
    parser.add_argument("--workspace-gib", type=float, default=4.0)
    parser.add_argument("--graph", action="append", default=[], help="NAME=FILE: a named graph of the artifact")
    args = parser.parse_args(argv)
    graphs = dict(item.split("=", 1) for item in args.graph) or None
    try:
        for engine in build_engines(args.artifact, graphs, args.workspace_gib):
            source = "from the engine cache" if engine.from_cache else f"built in {engine.seconds:.1f} s"
            print(f"{engine.name}: {engine.plan.stat().st_size / 1e6:.1f} MB, {source}")
    except CarveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
