"""carve's torch target against the original Hugging Face models, eager and torch.compile, on one device.

Usage (from the repository root, with the venv; a CUDA machine for the numbers that matter)::

    python bench/torch_gpu.py --device cuda                       # all three models
    python bench/torch_gpu.py --device cpu --models minilm --runs 3 --warmup 1   # a smoke run

Encoders (``minilm``: batch x 128 tokens; ``vit-s``: batch x 224x224 images) report latency;
the decoder (``smollm2-135m``) reports prefill time and decode tokens/s with a KV cache
(``bench/torch_gpu_decode.py``). Systems per model: the Hugging Face / torch module in eager
mode and under ``torch.compile`` (``hf-eager``, ``hf-compile``), and carve's torch-target
artifacts, fp32 and optimized (``--pass MODEL=SPEC``), each eager and compiled. On CUDA the optimized
artifacts' quantized matmuls run ``torch._int_mm`` (``runtime.torch_backend``, ``matmul=auto``).

Every system is built, run once, warmed up, then timed round-robin (run i of every system,
then run i+1), synchronizing the device around each call; the table has medians, the speed-up
against ``hf-eager``, and the main output's agreement with ``hf-eager`` on the same inputs
(cosine for encoders, greedy-token match for the decoder).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_PASSES = {"minilm": ["quantize:mode=dynamic"], "vit-s": ["quantize:mode=dynamic"],
                  "smollm2-135m": ["quantize:mode=dynamic", "kv_cache:max_positions=1024"]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(systems: dict[str, Callable[[], Any]], runs: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of every system: ``warmup`` untimed rounds, then ``runs`` timed ones."""
    for _ in range(warmup):
        for run in systems.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(runs):
        for name, run in systems.items():
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def artifact(name: str, passes: list[str], out: Path):
    from optimizer import optimize

    return optimize(name, passes=passes, target="torch", output=out)


def encoder_systems(name: str, passes: list[str], device: torch.device, batch: int, seq: int, work: Path,
                    backend: str | None) -> tuple[dict, dict]:
    """name -> call returning the main output (device tensor), and the inputs used."""
    import runtime
    from models import registry

    spec = registry.get(name)
    feeds = {k: v.to(device) for k, v in spec.example_inputs(batch, seq).items()}
    module = spec.build().eval().to(device)
    main = 1 if name == "vit-s" else 0  # vit-s: cls_embedding; minilm: the sentence embedding

    def hf(m):
        def call():
            with torch.inference_mode():
                out = m(**feeds)
            return out[main] if isinstance(out, (tuple, list)) else out
        return call

    systems = {"hf-eager": hf(module)}
    if backend:
        systems["hf-compile"] = hf(torch.compile(module, backend=backend))
    for label, specs in (("carve-fp32", ["cleanup"]), ("carve-opt", passes)):
        path = artifact(name, specs, work / f"{name}-{label}").path
        for compiled in (None, backend) if backend else (None,):
            session = runtime.load(path, device=str(device), compile=compiled or False)
            output = session.outputs[main]["name"]
            systems[label + ("-compile" if compiled else "")] = (
                lambda s=session, o=output: s.run_torch(feeds, outputs=[o])[o])
    return systems, feeds


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().reshape(len(a), -1).cpu().double(), b.float().reshape(len(b), -1).cpu().double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())


def bench_encoder(name: str, args, work: Path) -> dict:
    device = torch.device(args.device)
    batch = args.batch or 8
    systems, _ = encoder_systems(name, args.passes.get(name, DEFAULT_PASSES[name]), device, batch, args.seq, work,
                                 None if args.no_compile else args.compile_backend)
    reference = systems["hf-eager"]()
    agreement = {n: cosine(reference, run()) for n, run in systems.items()}
    times = interleave(systems, args.runs, args.warmup, device)
    base = statistics.median(times["hf-eager"])
    rows = [{"system": n, "median_ms": statistics.median(t) * 1e3, "speedup": base / statistics.median(t),
             "cos_min": agreement[n]} for n, t in times.items()]
    return {"model": name, "kind": "latency", "batch": batch, "seq": args.seq if name != "vit-s" else None, "rows": rows}


def print_table(result: dict) -> None:
    size = f"batch {result['batch']}" + (f" x {result['seq']} tokens" if result.get("seq") else "")
    print(f"\n{result['model']} ({result['kind']}, {size}, device {result['device']})")
    if result["kind"] == "latency":
        print(f"{'system':22} {'median ms':>10} {'speed-up':>9} {'cos min':>9}")
        for r in result["rows"]:
            print(f"{r['system']:22} {r['median_ms']:10.2f} {r['speedup']:8.2f}x {r['cos_min']:9.5f}")
        return
    print(f"{'system':22} {'prefill ms':>10} {'decode tok/s':>13} {'speed-up':>9} {'token match':>12}")
    for r in result["rows"]:
        print(f"{r['system']:22} {r['prefill_ms']:10.2f} {r['decode_tokens_per_s']:13.1f} {r['speedup']:8.2f}x {r['match']:12.3f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="smollm2-135m,minilm,vit-s")
    p.add_argument("--runs", type=int, default=20, help="timed rounds (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    p.add_argument("--batch", type=int, help="encoder batch (default 8)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence for minilm (default 128)")
    p.add_argument("--prompt", type=int, default=64, help="decoder prompt tokens (default 64)")
    p.add_argument("--new-tokens", type=int, default=32, help="decoder tokens generated per run (default 32)")
    p.add_argument("--pass", dest="pass_specs", action="append", default=[], metavar="MODEL=SPEC",
                   help="passes for MODEL's optimized artifact (repeatable, in order); defaults: "
                        + "; ".join(f"{k}: {', '.join(v)}" for k, v in DEFAULT_PASSES.items()))
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend for the compile rows (default inductor; aot_eager for quick CPU checks)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (CPU runs; default: torch's own)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.passes = {}
    for item in args.pass_specs:
        model, _, spec = item.partition("=")
        args.passes.setdefault(model, []).append(spec)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name(torch.device(args.device))})" if args.device.startswith("cuda") else ""))
    with tempfile.TemporaryDirectory(prefix="carve-bench-") as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            if name == "smollm2-135m":
                from torch_gpu_decode import bench_decoder

                result = bench_decoder(name, args, Path(tmp))
            else:
                result = bench_encoder(name, args, Path(tmp))
            result["device"] = args.device
            print_table(result)
            results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
