"""carve's torch target against the original Hugging Face models, eager and torch.compile, on one device.

Usage (from the repository root, with the venv; a CUDA machine for the numbers that matter)::

    python bench/torch_gpu.py --device cuda                       # all three models
    python bench/torch_gpu.py --device cpu --models minilm --runs 3 --warmup 1 --no-compile   # a smoke run

For each model it makes two torch-target artifacts, ``carve-fp32`` (no optimization; the cached
decoder for ``smollm2-135m``) and ``carve`` (the optimized one, ``--pass MODEL=SPEC`` or the
defaults below), and times them with ``carve bench --target torch`` (``optimizer.bench_torch``):
the Hugging Face module eager and compiled, each artifact eager and compiled, interleaved.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_PASSES = {"minilm": ["quantize:mode=dynamic"], "vit-s": ["quantize:mode=dynamic"],
                  "smollm2-135m": ["quantize:mode=w8", "kv_cache:max_positions=1024"]}
PLAIN = {"smollm2-135m": ["kv_cache:max_positions=1024"]}


def bench_model(name: str, args, work: Path) -> dict:
    from optimizer import optimize
    from optimizer.bench_torch import bench_torch

    paths = {}
    for label, passes in (("carve-fp32", PLAIN.get(name, ["cleanup"])), ("carve", args.passes.get(name, DEFAULT_PASSES[name]))):
        paths[label] = optimize(name, passes=passes, target="torch", output=work / f"{name}-{label}").path
    return bench_torch(paths["carve"], device=args.device, runs=args.runs, warmup=args.warmup, batch=args.batch,
                       seq=args.seq, compile_backend=None if args.no_compile else args.compile_backend,
                       new_tokens=args.new_tokens, prompt_tokens=args.prompt, threads=args.threads,
                       also={"carve-fp32": paths["carve-fp32"]})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
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
    from optimizer.bench_torch import format_torch

    args = parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="carve-bench-") as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            result = bench_model(name, args, Path(tmp))
            print("\n" + format_torch(result), flush=True)
            results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
