"""The handlers behind each ``carve`` subcommand (parsing lives in ``optimizer.cli``)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from optimizer.cli_generate import cmd_generate  # noqa: F401  (the generate subcommand's handler)
from optimizer.progress import Progress
from optimizer.report import format_inspect, format_optimize, inspect_json
from runtime.errors import FeedError


def cmd_optimize(args) -> int:
    from optimizer.api import run_optimize

    progress = Progress(enabled=not args.json)
    result = run_optimize(args.model, passes=args.passes, target=args.target, output=args.output,
                          recipe=args.recipe, progress=progress)
    comparison = None
    if args.compare:
        comparison = _compare(result, args, progress)
    report = {"artifact": str(result.artifact.path), "manifest": result.artifact.manifest,
              "compare": comparison.to_json() if comparison else None}
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_optimize(result, comparison, args))
    return 0


def _compare(result, args, progress):
    from optimizer.compare import compare
    from optimizer.sources import feeds_for

    session = result.artifact.load()
    feeds = feeds_for(result.source, session.inputs, args.batch, args.seq)
    with progress.step(f"comparing original and optimized ({args.runs} interleaved runs each)"):
        return compare(result.original_bytes, session, feeds, runs=args.runs)


def cmd_inspect(args) -> int:
    from optimizer.sources import resolve
    from optimizer.structure import build_map

    source = resolve(args.model, progress=Progress(enabled=not args.json))
    model_map = build_map(source.model)
    if args.json:
        print(json.dumps(inspect_json(source, model_map), indent=2))
    else:
        print(format_inspect(source, model_map))
    return 0


def cmd_run(args) -> int:
    import runtime

    session = runtime.load(args.artifact, threads=args.threads, **({"device": args.device} if args.device else {}))
    feeds = dict(_read_input(item) for item in args.input)
    outputs = session.run(feeds)
    for name, value in outputs.items():
        stats = f"min {value.min():.6g} max {value.max():.6g} mean {value.mean():.6g}" if value.size and np.issubdtype(value.dtype, np.number) else ""
        print(f"{name}: {value.dtype.name} {list(value.shape)} {stats}")
    if args.save:
        _save_outputs(Path(args.save), outputs)
        print(f"saved {len(outputs)} output(s) to {args.save}")
    return 0


def _read_input(item: str) -> tuple[str, np.ndarray]:
    name, eq, file = item.partition("=")
    if not eq or not name or not file:
        raise FeedError(f"--input {item!r} is not NAME=FILE.npy; write e.g. --input input_ids=ids.npy.")
    path = Path(file)
    if not path.is_file():
        raise FeedError(f"input file {path} does not exist; give a .npy file written with numpy.save.")
    try:
        return name, np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise FeedError(f"{path} is not a readable .npy file ({exc}); write it with numpy.save.") from None


def _save_outputs(directory: Path, outputs: dict[str, np.ndarray]) -> None:
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FeedError(f"{directory} exists and is not an empty directory; choose a new --save directory.")
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for name, value in outputs.items():
            np.save(tmp / f"{name.replace('/', '_')}.npy", value)
        if directory.exists():
            directory.rmdir()
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cmd_eval(args) -> int:
    from optimizer.evaluate import evaluate

    if args.kv_policies:
        return _eval_kv(args)
    if args.stream is not None:
        from optimizer.eval_stream import eval_stream, format_stream

        result = eval_stream(args.artifact, args.stream, args.scene, "moving" if args.moving else "scenes", args.refresh)
        print(json.dumps(result, indent=2) if args.json else format_stream(result))
        return 0
    result = evaluate(args.artifact, quick=args.quick)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['artifact']}: {result['family']} from {result['source'].get('name')}, passes: {', '.join(result['passes']) or 'none'}")
    for key, value in result["metrics"].items():
        print(f"  {key:28} {value:.6g}" if isinstance(value, float) else f"  {key:28} {value}")
    return 0


def _eval_kv(args) -> int:
    import runtime
    from models import data
    from optimizer.eval_kv import eval_policies, format_policies
    from runtime.text import Text

    session, text = runtime.load(args.artifact), Text(args.artifact)
    ids: list[int] = []
    for passage in data.texts("news", "eval"):
        ids += text.encode(passage + "\n", special=not ids)
        if len(ids) >= args.kv_tokens:
            break
    specs = [s.strip() for s in args.kv_policies.split(";") if s.strip()]
    result = eval_policies(session, ids[:args.kv_tokens], specs, Progress(enabled=not args.json))
    print(json.dumps(result, indent=2) if args.json else format_policies(result))
    return 0


def cmd_bench(args) -> int:
    from optimizer.bench import bench
    from optimizer.bench_report import check_plot_path, format_bench, plot_bench

    if args.target == "torch":
        return _bench_torch(args)
    if args.plot:
        check_plot_path(args.plot)
    result = bench(args.artifact, batch=args.batch, seq=args.seq, runs=args.runs, peers=args.peers,
                   threads=args.threads, progress=Progress(enabled=not args.json),
                   new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens)
    if args.plot:
        plot_bench(result, args.plot)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(format_bench(result))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def _bench_torch(args) -> int:
    from optimizer.bench import BenchError
    from optimizer.bench_torch import bench_torch, format_torch

    if args.plot or args.peers:
        raise BenchError("--plot and --peers apply to the ORT bench; --target torch always times hf-eager, "
                         "hf-compile, carve and carve-compile.")
    result = bench_torch(args.artifact, device=args.device, runs=args.runs, warmup=args.warmup, batch=args.batch,
                         seq=args.seq, compile_backend=None if args.no_compile else args.compile_backend,
                         new_tokens=args.new_tokens or 32, prompt_tokens=args.prompt_tokens or 64,
                         threads=args.threads, progress=Progress(enabled=not args.json))
    print(json.dumps(result, indent=2, default=str) if args.json else format_torch(result))
    return 0


def cmd_passes(args) -> int:
    import dataclasses

    from optimizer.pipeline import registry

    for name, cls in registry().items():
        options = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Options))
        print(f"{name:16} {cls.summary}" + (f"\n{'':16} options: {options}" if options else ""))
    return 0


def cmd_models(args) -> int:
    from models import registry

    for name in registry.names():
        spec = registry.get(name)
        print(f"{name:14} {spec.family:8} {spec.description}")
    return 0
