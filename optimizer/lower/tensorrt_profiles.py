"""Optimization profiles for TensorRT engines, from the artifact's symbolic input shapes.

An artifact's signature names its dynamic dimensions (``batch``, ``sequence``, a KV cache's
``past_sequence``). TensorRT needs, per input, the min / opt / max shape an engine must serve;
carve derives them from ranges per dimension name: ``shapes=batch=1:4:16,sequence=1:128:512``
overrides the defaults below. A name without a range of its own takes the range of the first
default whose keyword it contains (``past`` before ``batch`` before ``seq``/``len``/``token``),
so ``total_sequence`` reads as a sequence.

``engine_profiles`` plans the engines: one per named graph; a decoder whose inputs include a
KV cache (``past_key_values.*``) gets two engines from the same graph, ``prefill`` (no past,
``sequence`` in its range) and ``decode`` (one new token, the past in its range), so that each
is tuned for its shapes and the decode engine can be replayed as a CUDA graph.
"""

from __future__ import annotations

from typing import Any

from runtime.errors import PassError

Range = tuple[int, int, int]
DEFAULT_RANGES: dict[str, Range] = {"batch": (1, 1, 8), "sequence": (1, 128, 512), "past": (0, 128, 2048)}
_KEYWORDS = (("past", "past"), ("batch", "batch"), ("seq", "sequence"), ("len", "sequence"), ("token", "sequence"))


def parse_shapes(text: str | None) -> dict[str, Range]:
    """'batch=1:4:16,sequence=1:128:512' -> {'batch': (1, 4, 16), ...}."""
    ranges: dict[str, Range] = {}
    for item in (text or "").replace(";", ",").split(","):
        if not item.strip():
            continue
        name, eq, spec = item.partition("=")
        parts = spec.split(":")
        try:
            low, opt, high = (int(p) for p in parts) if len(parts) == 3 else (0, 0, -1)
        except ValueError:
            low, opt, high = 0, 0, -1
        if not eq or not name.strip() or not 0 <= low <= opt <= high:
            raise PassError(f"shape range {item.strip()!r} is not NAME=MIN:OPT:MAX with 0 <= MIN <= OPT <= MAX; "
                            "write e.g. shapes=batch=1:4:16,sequence=1:128:512.")
        ranges[name.strip()] = (low, opt, high)
    return ranges


def range_of(dim: str, ranges: dict[str, Range]) -> Range:
    if dim in ranges:
        return ranges[dim]
    merged = {**DEFAULT_RANGES, **ranges}
    for keyword, default in _KEYWORDS:
        if keyword in dim.lower():
            return merged[default]
    raise PassError(f"no shape range for the dynamic dimension {dim!r}; give one as shapes={dim}=MIN:OPT:MAX.")


def profile(inputs: list[dict[str, Any]], ranges: dict[str, Range], fixed: dict[str, Range] | None = None) -> dict:
    """{input: {'min': [...], 'opt': [...], 'max': [...]}} for manifest-style ``inputs`` (name, shape);
    ``fixed`` gives some dimension names a range of this engine's own."""
    fixed = fixed or {}
    result = {}
    for spec in inputs:
        shape = spec.get("shape")
        if shape is None:
            raise PassError(f"input {spec['name']!r} has no known rank; export the model with static ranks for TensorRT.")
        dims = [_dim_range(spec["name"], i, d, ranges, fixed) for i, d in enumerate(shape)]
        result[spec["name"]] = {key: [d[k] for d in dims] for k, key in enumerate(("min", "opt", "max"))}
    return result


def _dim_range(name: str, index: int, dim: int | str | None, ranges: dict[str, Range], fixed: dict[str, Range]) -> Range:
    if isinstance(dim, int):
        return (dim, dim, dim)
    if dim is None:
        raise PassError(f"dimension {index} of input {name!r} has no name or size; name it in the export's dynamic axes.")
    if dim in fixed:
        return fixed[dim]
    return range_of(dim, ranges)


def engine_profiles(graphs: dict[str, list[dict[str, Any]]], ranges: dict[str, Range]) -> dict[str, dict]:
    """Engines to build: {engine name: {'graph': graph name, 'profile': ...}} for named graphs' inputs."""
    engines: dict[str, dict] = {}
    for graph, inputs in graphs.items():
        past = sorted({d for s in inputs if s["name"].startswith("past_key_values") for d in s.get("shape") or []
                       if isinstance(d, str) and "past" in d})
        if not past:
            engines[graph] = {"graph": graph, "profile": profile(inputs, ranges)}
            continue
        names = {d for s in inputs for d in s.get("shape") or [] if isinstance(d, str)}
        seq = sorted({d for s in inputs if s["name"] == "input_ids" for d in s.get("shape") or []
                      if isinstance(d, str) and "batch" not in d})
        total = sorted(d for d in names if "total" in d)
        prefix = "" if graph == "model" else f"{graph}."
        prefill = {**{d: (0, 0, 0) for d in past}, **{d: range_of(seq[0], ranges) for d in total if seq}}
        low, opt, high = range_of(past[0], ranges)
        decode = {**{d: (1, 1, 1) for d in seq}, **{d: (low + 1, opt + 1, high + 1) for d in total}}
        engines[f"{prefix}prefill"] = {"graph": graph, "profile": profile(inputs, ranges, prefill)}
        engines[f"{prefix}decode"] = {"graph": graph, "profile": profile(inputs, ranges, decode)}
    return engines
