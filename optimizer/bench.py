"""``carve bench``: an artifact timed side by side with its peers, in one process.

Every system (the artifact, ORT fp32 on the plain trace, ORT's own quantized and optimized
graphs, the torch module; see ``optimizer.peers`` and ``optimizer.bench_systems``) is built,
run once, warmed up, then timed round-robin: run 1 of each system, run 2 of each, and so on.
Interleaving spreads the noise of a shared machine (other jobs, frequency changes, cache
state) over all systems alike, and medians ignore the odd slow run, so the ratios hold even
where the absolute milliseconds wander. Ratios are against ORT fp32 on the unoptimized trace
(``speedup = median(ort-fp32) / median(system)``, so > 1 is faster), and every row carries
its accuracy against ORT fp32 on the same inputs, so no speed-up is shown without its cost.
Decoders add a generation table (``optimizer.bench_generate``). docs/metrics.md explains
every column.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from optimizer.bench_inputs import agreement, bench_feeds, default_sizes, main_output
from optimizer.bench_systems import System, carve_system, interleave, measured, ort_system, skipped, torch_system
from optimizer.peers import PEER_GRAPHS
from optimizer.progress import Progress
from runtime.errors import CarveError

PEERS = ("carve", "ort-fp32", "ort-quant", "ort-opt+quant", "torch-eager", "hf-generate")
REQUIRED = ("carve", "ort-fp32")  # the artifact and the baseline every ratio is taken against
WARMUP = 3


class BenchError(CarveError):
    """Bad ``carve bench`` arguments (sizes, peer names, plot path)."""


def parse_peers(text: str | None, family: str | None = None) -> list[str]:
    """The systems to time, in table order; carve and ort-fp32 are always included. By default
    every peer that applies (hf-generate only for decoders); a named one that does not apply
    gets a row saying why."""
    if text is None:
        return [p for p in PEERS if p != "hf-generate" or family == "decoder"]
    asked = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in asked if p not in PEERS]
    if unknown:
        raise BenchError(f"unknown peer {unknown[0]!r}; the peers are: {', '.join(PEERS)}.")
    return [p for p in PEERS if p in asked or p in REQUIRED]


def check_sizes(batch: int | None, seq: int | None, runs: int, threads: int | None,
                flags: tuple[str, str] = ("--batch", "--seq")) -> None:
    for flag, value in ((flags[0], batch), (flags[1], seq), ("--runs", runs), ("--threads", threads)):
        if value is not None and value < 1:
            raise BenchError(f"{flag} must be at least 1, got {value}; give a positive whole number.")


def default_threads() -> int:
    """ORT's own default: one intra-op thread per physical core."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def bench(artifact: str | Path, batch: int | None = None, seq: int | None = None, runs: int = 20,
          peers: str | list[str] | None = None, threads: int | None = None,
          progress: Progress | None = None, new_tokens: int | None = None,
          prompt_tokens: int | None = None) -> dict[str, Any]:
    """Time the artifact and its peers; returns the table's data (see docs/metrics.md)."""
    from optimizer.evaluate import builtin_spec
    from runtime.manifest import read_manifest, verify_files

    progress = progress or Progress()
    check_sizes(batch, seq, runs, threads)
    check_sizes(new_tokens, prompt_tokens, runs, None, ("--new-tokens", "--prompt-tokens"))
    peers = ",".join(peers) if isinstance(peers, list) else peers
    parse_peers(peers)  # bad names fail before anything slow
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    verify_files(artifact, manifest)  # a damaged artifact fails now, not after minutes of peers
    family, spec = manifest.get("family"), builtin_spec(manifest)
    names = parse_peers(peers, family)
    batch = batch or default_sizes(family)[0]
    seq = seq or default_sizes(family)[1]
    threads = threads or default_threads()
    trace = _trace_path(manifest, spec, progress)
    feeds, described = bench_feeds(spec, family, manifest["inputs"], batch, seq)
    systems = _build(names, artifact, trace, spec, family, feeds, threads, progress)
    _time([s for s in systems.values() if s.skipped is None], runs, progress)
    main = main_output([o["name"] for o in manifest["outputs"]])
    result = {
        "artifact": str(artifact), "source": manifest.get("source"), "family": family,
        "passes": [p["name"] for p in manifest.get("passes", [])], "inputs": described,
        "batch": batch, "seq": seq if family != "vit" else None, "threads": threads, "runs": runs,
        "warmup": WARMUP, "main_output": main, "rows": _rows(systems, main, feeds), "generation": None,
    }
    if family == "decoder" and spec is not None:
        from optimizer.bench_generate import bench_generation

        more = {"new_tokens": new_tokens} if new_tokens else {}
        result["generation"] = bench_generation(spec, systems["carve"], systems["ort-fp32"], "hf-generate" in names,
                                                min(runs, 5), threads, progress, artifact=artifact,
                                                prompt_tokens=prompt_tokens, **more)
    return result


def _trace_path(manifest: dict, spec, progress: Progress) -> Path:
    """The plain fp32 graph the artifact was made from (traced now if not cached)."""
    if spec is not None:
        from optimizer.trace_cache import cached_trace_path

        return cached_trace_path(spec, progress)
    from optimizer.evaluate import reference_path

    return reference_path(manifest)


def _build(names: list[str], artifact: Path, trace: Path, spec, family: str | None,
           feeds: dict[str, np.ndarray], threads: int, progress: Progress) -> dict[str, System]:
    """Every requested system, built and run once; the baseline first, peers that fail as rows.
    Peer graphs are made (or found in the cache) before any memory is measured, so the work of
    making them never shows in a row's memory."""
    graphs = {n: _peer_graph(n, trace, family, progress) for n in names if n in PEER_GRAPHS}
    if spec is not None and "torch-eager" in names:
        _preload_torch()
    systems: dict[str, System] = {}
    with progress.step("loading ort-fp32 and the artifact"):
        systems["ort-fp32"] = measured("ort-fp32", lambda: ort_system("ort-fp32", trace, feeds, threads,
                                                                      "ORT on the plain fp32 trace (baseline)"), optional=False)
        systems["carve"] = measured("carve", lambda: carve_system(artifact, feeds, threads), optional=False)
    for name, graph in graphs.items():
        systems[name] = graph if isinstance(graph, System) else \
            measured(name, lambda: ort_system(name, graph[0], feeds, threads, graph[1]))
    if "torch-eager" in names:
        with progress.step("building the torch module"):
            systems["torch-eager"] = measured("torch-eager", lambda: torch_system(spec, feeds, threads)) if spec is not None \
                else skipped("torch-eager", "the artifact was not made from a built-in model, so there is no torch module")
    if "hf-generate" in names and family != "decoder":
        systems["hf-generate"] = skipped("hf-generate", "only decoders generate text")
    return {n: systems[n] for n in PEERS if n in systems}


def _peer_graph(name: str, trace: Path, family: str | None, progress: Progress) -> tuple[Path, str] | System:
    """The peer's graph and note, or a skipped row saying why it could not be made."""
    from optimizer.peers import PeerUnavailable, peer_graph

    try:
        return peer_graph(name, trace, family, progress)
    except PeerUnavailable as exc:
        return skipped(name, str(exc))
    except Exception as exc:  # noqa: BLE001 - ORT's tools failing on a graph is a result
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        return skipped(name, f"{type(exc).__name__} while building it: {first}")


def _preload_torch() -> None:
    """Import torch and transformers before any memory is measured, so the torch rows show the
    model's memory rather than the libraries'."""
    import torch  # noqa: F401

    try:
        import transformers  # noqa: F401
    except ImportError:
        pass


def _time(systems: list[System], runs: int, progress: Progress) -> None:
    with progress.step(f"warming up ({WARMUP} runs of each of {len(systems)} systems)"):
        for _ in range(WARMUP):
            for s in systems:
                s.run()
    with progress.step(f"timing ({runs} interleaved runs of each)"):
        interleave(systems, runs)


def _rows(systems: dict[str, System], main: str, feeds: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    base = systems["ort-fp32"]
    base_ms = statistics.median(base.times) * 1e3
    return [_row(s, base_ms, base.outputs, main, feeds) for s in systems.values()]


def _row(s: System, base_ms: float, reference: Any, main: str, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    if s.skipped is not None:
        return {"system": s.name, "skipped": s.skipped}
    ms = statistics.median(s.times) * 1e3
    return {"system": s.name, "median_ms": ms, "p90_ms": float(np.percentile(s.times, 90)) * 1e3, "min_ms": min(s.times) * 1e3,
            "speedup": base_ms / ms, "peak_mem_mb": _mb(s.peak_mem_bytes), "size_mb": _mb(s.size_bytes),
            "accuracy": agreement(reference, s.outputs, main, feeds), "note": s.note}


def _mb(n: int | None) -> float | None:
    return None if n is None else n / 1e6
