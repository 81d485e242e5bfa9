"""Human-readable and JSON reports printed by ``carve optimize`` and ``carve inspect``."""

from __future__ import annotations

from collections import Counter
from typing import Any

from optimizer.pipeline import count_nodes, param_bytes


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def format_optimize(result, comparison, args) -> str:
    art = result.artifact
    lines = [f"wrote {art.path} (target {art.manifest['target']}, source {_source_name(result.source.info)})",
             f"  {'#':>2}  {'pass':16} {'sites':>6}  {'nodes':>15}  {'parameters':>21}  {'time':>7}"]
    for r in result.records:
        nodes = f"{r.nodes_before} -> {r.nodes_after}"
        params = f"{_mb(r.param_bytes_before)} -> {_mb(r.param_bytes_after)}"
        lines.append(f"  {r.position:>2}  {r.name:16} {r.sites:>6}  {nodes:>15}  {params:>21}  {r.seconds:6.2f}s")
    draft = art.manifest.get("draft")
    if draft:
        lines.append(f"  self-draft in {art.path / draft['path']}: skips {', '.join(draft['skipped']) or 'nothing'} "
                     f"({_mb(draft['bytes'])} on disk, not shared with the main model)")
    if comparison is not None:
        lines += _format_comparison(comparison, args, result.source.family)
    return "\n".join(lines)


def _format_comparison(c, args, family=None) -> list[str]:
    shape = f"batch {args.batch}" + ("" if family == "vit" else f", sequence {args.seq}")
    lines = [f"compared with the original on ONNX Runtime CPU ({shape}, median of {c.runs} interleaved runs):",
             f"  original {c.original_ms:.2f} ms, optimized {c.optimized_ms:.2f} ms: speed-up {c.speedup:.2f}x"]
    for name, acc in c.outputs.items():
        lines.append(f"  {name}: cosine mean {acc['cosine_mean']:.6f} min {acc['cosine_min']:.6f}, "
                     f"max abs error {acc['max_abs_err']:.2e}")
    return lines


def _source_name(info: dict[str, Any]) -> str:
    return info.get("name") or info.get("path") or info.get("class") or info.get("kind", "?")


def inspect_json(source, model_map) -> dict[str, Any]:
    from optimizer.artifact import signature

    graph = source.model.graph
    return {
        "source": source.info,
        "family": source.family,
        "inputs": signature(graph.inputs),
        "outputs": signature(graph.outputs),
        "nodes": count_nodes(source.model),
        "parameter_bytes": param_bytes(source.model),
        "op_types": dict(Counter(n.op_type for n in graph).most_common()),
        "map": model_map.to_json(),
    }


def format_inspect(source, model_map) -> str:
    from optimizer.structure import format_map

    data = inspect_json(source, model_map)
    sig = lambda specs: ", ".join(f"{s['name']} {s['dtype']}{s['shape']}" for s in specs)  # noqa: E731
    ops = ", ".join(f"{op} {n}" for op, n in list(data["op_types"].items())[:8])
    return "\n".join([
        f"model: {_source_name(source.info)} ({source.info.get('kind')})",
        f"inputs: {sig(data['inputs'])}",
        f"outputs: {sig(data['outputs'])}",
        f"nodes: {data['nodes']} ({ops}, ...)",
        f"parameters: {_mb(data['parameter_bytes'])}",
        format_map(model_map),
    ])
