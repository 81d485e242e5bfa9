"""``carve bench DIR --target torch``: a torch-target artifact against the original model on one torch device.

Systems, each built, run once, warmed up, then timed in rounds (every system once per round, in a
shuffled order, as ``carve bench`` does) with the device synchronized after every call:

- ``hf-eager``: the original Hugging Face / torch module, eager (the baseline of every ratio);
- ``hf-compile``: the same module under ``torch.compile``;
- ``carve``: the artifact through ``runtime.torch_backend`` (its GraphModule, eager);
- ``carve-compile``: the artifact's GraphModule under ``torch.compile``.

Encoders and ViTs report the latency of one batch (median ms, speed-up, and the main output's
worst row cosine against ``hf-eager``). A KV-cached decoder reports prefill time and decode
tokens/s of greedy generation with every cache kept on the device, and the fraction of tokens
equal to ``hf-eager``'s (``optimizer.bench_torch_decode``). ``--no-compile`` drops the compile
rows (compiling takes minutes on a CPU). Cases refused with one sentence: an artifact not made
with ``--target torch``, one not made from a built-in model (no original to compare with), a
device this machine lacks.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable

from optimizer.bench import BenchError, check_sizes
from optimizer.bench_inputs import default_sizes
from optimizer.progress import Progress

Call = Callable[[], Any]


def bench_torch(artifact: str | Path, device: str | None = None, runs: int = 20, warmup: int = 3,
                batch: int | None = None, seq: int | None = None, compile_backend: str | None = "inductor",
                new_tokens: int = 32, prompt_tokens: int = 64, threads: int | None = None,
                progress: Progress | None = None, also: dict[str, Path] | None = None) -> dict[str, Any]:
    """Time the artifact against the original module on ``device`` (default: cuda when present);
    ``also`` adds more torch-target artifacts of the same model as rows (label -> directory)."""
    import torch

    from optimizer.evaluate import builtin_spec
    from runtime.manifest import read_manifest, verify_files

    progress = progress or Progress()
    check_sizes(batch, seq, runs, threads)
    check_sizes(new_tokens, prompt_tokens, runs, None, ("--new-tokens", "--prompt-tokens"))
    if warmup < 0:
        raise BenchError(f"--warmup must be 0 or more, got {warmup}.")
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    verify_files(artifact, manifest)
    if manifest.get("target") != "torch":
        raise BenchError(f"{artifact} was made for {manifest.get('target')}; `--target torch` times artifacts made "
                         "with `carve optimize ... --target torch` (or drop --target to time this one on ORT).")
    spec = builtin_spec(manifest)
    if spec is None:
        raise BenchError(f"{artifact} was not made from a built-in model, so there is no original module to time it "
                         "against; make it from one of `carve models`.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    head = {"artifact": str(artifact), "model": spec.name, "family": spec.family, "device": device,
            "device_name": _device_name(device), "torch": torch.__version__, "runs": runs, "warmup": warmup,
            "passes": [p["name"] for p in manifest.get("passes", [])]}
    if any(i["name"].startswith("past_key_values.") for i in manifest["inputs"]):
        from optimizer.bench_torch_decode import bench_decode

        return head | bench_decode(spec, _labelled(artifact, also), device, runs, warmup, compile_backend,
                                   prompt_tokens, new_tokens, progress)
    batch, seq = batch or default_sizes(spec.family)[0], seq or default_sizes(spec.family)[1]
    return head | _bench_latency(spec, _labelled(artifact, also), manifest, device, batch, seq, runs, warmup, compile_backend, progress)


def _labelled(artifact: Path, also: dict[str, Path] | None) -> dict[str, Path]:
    return {"carve": artifact} | {label: Path(path) for label, path in (also or {}).items()}


def _bench_latency(spec, artifacts: dict[str, Path], manifest: dict, device: str, batch: int, seq: int, runs: int, warmup: int,
                   backend: str | None, progress: Progress) -> dict[str, Any]:
    import torch

    from optimizer.bench_inputs import main_output

    names = [o["name"] for o in manifest["outputs"]]
    main = main_output(names)
    index = names.index(main)  # the trace keeps the module's output order
    with progress.step(f"loading {spec.name} and the artifact on {device}"):
        feeds = {k: v.to(device) for k, v in spec.example_inputs(batch, seq).items()}
        systems = module_systems(spec.build().eval().to(device), feeds, index, backend)
        for label, path in artifacts.items():
            systems |= artifact_systems(path, device, backend, lambda s: _artifact_call(s, feeds, main), label)
    with progress.step(f"timing ({warmup} warm-up and {runs} interleaved runs of {len(systems)} systems)"):
        reference = systems["hf-eager"]()
        agreement = {name: worst_cosine(reference, call()) for name, call in systems.items()}
        times = interleave(systems, runs, warmup, torch.device(device))
    base = statistics.median(times["hf-eager"])
    rows = [{"system": n, "median_ms": statistics.median(t) * 1e3, "speedup": base / statistics.median(t),
             "cos_min": agreement[n]} for n, t in times.items()]
    return {"kind": "latency", "batch": batch, "seq": seq if spec.family != "vit" else None, "main_output": main,
            "rows": rows}


def module_systems(module, feeds: dict, index: int, backend: str | None) -> dict[str, Call]:
    """``hf-eager`` (and ``hf-compile``): the original module's main output on ``feeds``."""
    import torch

    def call_of(m) -> Call:
        def call():
            with torch.inference_mode():
                out = m(**feeds)
            return out[index] if isinstance(out, (tuple, list)) else out
        return call

    systems = {"hf-eager": call_of(module)}
    if backend:
        systems["hf-compile"] = call_of(torch.compile(module, backend=backend))
    return systems


def artifact_systems(artifact: Path, device: str, backend: str | None, make_call: Callable[[Any], Call],
                     label: str = "carve") -> dict[str, Call]:
    """``carve`` (and ``carve-compile``): the artifact's GraphModule, eager and compiled."""
    import runtime

    systems = {}
    for compiled in (None, backend) if backend else (None,):
        session = runtime.load(artifact, device=device, compile=compiled or False)
        systems[label + ("-compile" if compiled else "")] = make_call(session)
    return systems


def _artifact_call(session, feeds: dict, main: str) -> Call:
    return lambda: session.run_torch(feeds, outputs=[main])[main]


def interleave(systems: dict[str, Call], runs: int, warmup: int, device) -> dict[str, list[float]]:
    """Seconds per call of every system: ``warmup`` untimed rounds, then ``runs`` rounds of the
    bench's shuffled interleaving (``optimizer.bench_systems.interleave``), each call ending
    with the device synchronized so its time includes the work it queued."""
    from optimizer.bench_systems import System
    from optimizer.bench_systems import interleave as shuffled_rounds

    rows = [System(name, _synced(call, device)) for name, call in systems.items()]
    for _ in range(warmup):
        for row in rows:
            row.run()
    shuffled_rounds(rows, runs)
    return {row.name: row.times for row in rows}


def _synced(call: Call, device) -> Call:
    def run():
        out = call()
        sync(device)
        return out
    return run


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def worst_cosine(a, b) -> float:
    """The lowest cosine between matching rows (batch items) of two outputs."""
    import torch

    a, b = a.detach().reshape(len(a), -1).cpu().double(), b.detach().reshape(len(b), -1).cpu().double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())


def _device_name(device: str) -> str:
    import torch

    from runtime.torch_backend import _device

    resolved = _device(device)  # a device this machine lacks fails here, with one sentence
    return torch.cuda.get_device_name(resolved) if resolved.type == "cuda" else resolved.type


def format_torch(result: dict[str, Any]) -> str:
    size = f"batch {result['batch']}" + (f" x {result['seq']} tokens" if result.get("seq") else "")
    if result["kind"] == "decode":
        size = f"{result['prompt_tokens']}-token prompt, {result['new_tokens']} new tokens, greedy"
    lines = [f"{result['model']} on {result['device']} ({result['device_name']}, torch {result['torch']}): "
             f"{size}; medians of {result['runs']} interleaved runs after {result['warmup']} warm-up rounds"]
    if result["kind"] == "latency":
        lines.append(f"{'system':16} {'median ms':>10} {'speed-up':>9} {'cos min':>9}")
        lines += [f"{r['system']:16} {r['median_ms']:10.2f} {r['speedup']:8.2f}x {r['cos_min']:9.5f}" for r in result["rows"]]
    else:
        lines.append(f"{'system':16} {'prefill ms':>10} {'decode tok/s':>13} {'speed-up':>9} {'token match':>12}")
        lines += [f"{r['system']:16} {r['prefill_ms']:10.2f} {r['decode_tokens_per_s']:13.1f} {r['speedup']:8.2f}x "
                  f"{r['match']:12.3f}" for r in result["rows"]]
    lines.append("speed-up: against hf-eager (the original module, eager); columns: docs/metrics.md")
    return "\n".join(lines)
