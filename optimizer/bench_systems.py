"""The systems ``carve bench`` times: each one a ready-to-call forward pass over fixed inputs.

A :class:`System` wraps whatever runs the model (carve's runtime, an ONNX Runtime session, a
torch module) behind ``run() -> {output name: array}``, so the timing loop treats them alike.
Building one is measured for memory: the growth of the process's resident set (RSS), sampled
by a background thread while the system is created and run once. That figure is approximate:
memory freed earlier may be reused, allocators keep pages, and 5 ms sampling can miss a short
peak; it tells a 4x smaller model from a larger one, not a few megabytes apart.
"""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

Outputs = dict[str, np.ndarray]


@dataclass
class System:
    """One row of the bench: how to run it and what was measured about it."""

    name: str
    run: Callable[[], Any] | None = None
    size_bytes: int | None = None
    note: str = ""
    skipped: str | None = None  # the reason, when the system could not be built here
    peak_mem_bytes: int | None = None
    outputs: Any = None  # what the first run returned
    times: list[float] = field(default_factory=list)
    run_feeds: Callable[[Outputs], Outputs] | None = None  # the same system on other inputs


class MemoryWatch:
    """Peak RSS growth over a ``with`` block, sampled every few milliseconds by a thread."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.base = self.peak = 0

    def __enter__(self) -> MemoryWatch:
        gc.collect()
        release_free_memory()
        self.base = self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.base)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._process.memory_info().rss)


PAUSE_S = 0.02  # idle time before each timed run (not counted)


def interleave(systems: list[System], runs: int, seed: int = 0) -> None:
    """Time ``runs`` rounds, each running every system once, appending to ``system.times``.

    Each round runs the systems in a fresh shuffled order (seeded, so reruns match), so no
    system always follows the same neighbour: whatever one system leaves behind (caches, the
    frequency it ran the cores at, thread pools that spin a while after finishing) falls on
    all the others alike. Each run also starts after a short untimed pause, so those thread
    pools are asleep rather than competing. A fixed order made two identical graphs differ by
    10% or more on two cores.
    """
    import random

    rng = random.Random(seed)
    for _ in range(runs):
        order = list(systems)
        rng.shuffle(order)
        for s in order:
            time.sleep(PAUSE_S)
            start = time.perf_counter()
            s.run()
            s.times.append(time.perf_counter() - start)


def release_free_memory() -> None:
    """Hand memory that is free but still held by the C allocator back to the system (glibc's
    ``malloc_trim``), so what an earlier step freed is not silently reused and hidden from the
    next system's RSS growth. A no-op where there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measured(name: str, factory: Callable[[], System], optional: bool = True) -> System:
    """Build a system and run it once under a MemoryWatch; a peer that fails becomes a skipped
    row with the reason (third-party tools failing on a graph is a result, not a crash)."""
    from optimizer.peers import PeerUnavailable

    try:
        with MemoryWatch() as watch:
            system = factory()
            if system.skipped is None:
                system.outputs = system.run()
    except PeerUnavailable as exc:
        return System(name, skipped=str(exc))
    except Exception as exc:  # noqa: BLE001 - a peer's own failure is reported in its row
        if not optional:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        return System(name, skipped=f"{type(exc).__name__}: {first}")
    system.peak_mem_bytes = watch.growth
    return system


def ort_system(name: str, path: Path, feeds: Outputs, threads: int, note: str = "") -> System:
    """An ONNX Runtime CPU session on ``path`` with the same thread setting as every other."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    mine = {k: v for k, v in feeds.items() if k in wanted}
    run_feeds = lambda f: dict(zip(names, sess.run(names, f)))  # noqa: E731
    return System(name, lambda: run_feeds(mine), onnx_size(path), note, run_feeds=run_feeds)


def carve_system(artifact: Path, feeds: Outputs, threads: int) -> System:
    import runtime

    session = runtime.load(artifact, threads=threads, verify=False)  # bench() verified it first
    files = [artifact / name for name in session.manifest.get("files", {})]
    size = sum(p.stat().st_size for p in files if p.is_file())
    wanted = {spec["name"] for spec in session.inputs}
    mine = {k: v for k, v in feeds.items() if k in wanted}
    passes = ", ".join(p["name"] for p in session.manifest.get("passes", [])) or "no passes"
    return System("carve", lambda: session.run(mine), size, f"the artifact ({passes})", run_feeds=session.run)


def torch_system(spec, feeds: Outputs, threads: int) -> System:
    """The source torch module, eager, under ``no_grad``; outputs named as the trace names them."""
    import torch

    torch.set_num_threads(threads)
    module = spec.build().eval()
    tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}

    def run() -> Outputs:
        with torch.no_grad():
            out = module(**tensors)
        values = out if isinstance(out, (tuple, list)) else (out,)
        return {name: v.numpy() for name, v in zip(spec.output_names, values)}

    return System("torch-eager", run, tensor_bytes(module), "spec.build() eager fp32 (size: its tensors in memory)")


def onnx_size(path: Path) -> int:
    """Bytes on disk of an .onnx file and the external data file beside it, if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def tensor_bytes(module) -> int:
    """Bytes of a torch module's parameters and buffers, tied weights counted once."""
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def skipped(name: str, reason: str) -> System:
    return System(name, skipped=reason)
