"""The Python API: ``optimize(model_or_path, ...) -> Artifact``.

Example::

    import optimizer, runtime
    art = optimizer.optimize("minilm", passes=["cleanup"], output="out/minilm")
    session = art.load()
    outputs = session.run(feeds)

``passes`` is a list of inline specs (``"name:key=value,..."``) or ``PassSpec`` objects, or
``recipe=`` a TOML file; with neither, the ``cleanup`` pass runs.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from optimizer.artifact import Artifact, write_artifact
from optimizer.draft import check_draft_plan, finish_draft
from optimizer.lower import TARGETS, lower
from optimizer.pipeline import PassContext, PassRecord, run_pipeline
from optimizer.progress import Progress
from optimizer.sources import Source, resolve
from optimizer.specs import PassSpec, load_recipe, parse_spec
from runtime.errors import PassError

DEFAULT_PASSES = ("cleanup",)


@dataclass
class Optimized:
    """Everything one optimize run produced, for the CLI's report."""

    artifact: Artifact
    source: Source
    records: list[PassRecord]
    original_bytes: bytes  # the unoptimized graph, serialized before any pass ran


def optimize(model_or_path: Any, example_inputs: Any = None, passes: Sequence[str | PassSpec] | None = None,
             target: str = "ort-cpu", output: str | Path | None = None, recipe: str | Path | None = None,
             dynamic_axes=None, output_names=None, progress: bool = False) -> Artifact:
    """Optimize a model and write an artifact; returns it (``.path``, ``.manifest``, ``.load()``)."""
    return run_optimize(model_or_path, example_inputs, passes, target, output, recipe,
                        dynamic_axes, output_names, Progress(enabled=progress)).artifact


def run_optimize(model_or_path, example_inputs=None, passes=None, target="ort-cpu", output=None, recipe=None,
                 dynamic_axes=None, output_names=None, progress: Progress | None = None) -> Optimized:
    progress = progress or Progress()
    specs, target = _plan(passes, recipe, target)
    source = resolve(model_or_path, example_inputs, dynamic_axes, output_names, progress)
    import onnx_ir as ir

    original = ir.serde.serialize_model(source.model).SerializeToString()
    ctx = PassContext(target=target, example_feeds=source.example_feeds, calibration=source.spec, progress=progress)
    model, records = run_pipeline(source.model, specs, ctx)
    draft = finish_draft(ctx, specs, records, target)  # skip_layers:draft=true's skipped copy, or None
    with progress.step(f"lowering for {target}"):
        model, lowering = lower(model, target)
    out = Path(output) if output is not None else Path(tempfile.mkdtemp(prefix="carve-")) / "artifact"
    from optimizer.tokenizer_files import tokenizer_files

    fields = {"source": source.info, "family": source.family, "target": target}
    if draft is not None:
        draft.fields = {**fields, **draft.fields}
    with progress.step(f"writing {out}"):
        artifact = write_artifact(model, out, {**fields, "passes": [r.to_json() for r in records], "lowering": lowering},
                                  extra_files=tokenizer_files(source), draft=draft)
    _build_engines(artifact, target, progress)
    return Optimized(artifact, source, records, original)


def _build_engines(artifact: Artifact, target: str, progress: Progress) -> None:
    """TensorRT targets get their engines built into the artifact where TensorRT is installed
    (elsewhere the lowering already said how to build them later)."""
    if not target.startswith("tensorrt"):
        return
    from optimizer.lower.tensorrt import tensorrt_available

    if tensorrt_available():
        from optimizer.lower.tensorrt_build import build_engines

        with progress.step("building TensorRT engines"):
            build_engines(artifact.path)
        artifact.manifest = Artifact.open(artifact.path).manifest


def _plan(passes, recipe, target) -> tuple[list[PassSpec], str]:
    specs: list[PassSpec] = []
    if recipe is not None:
        loaded = load_recipe(recipe)
        specs.extend(loaded.passes)
        target = loaded.target or target
    for item in passes or ():
        specs.extend(parse_spec(item) if isinstance(item, str) else [item])
    if not specs and recipe is None:
        specs = [PassSpec(name) for name in DEFAULT_PASSES]
    if target not in TARGETS:
        raise PassError(f"unknown target {target!r}; the targets are: {', '.join(TARGETS)}.")
    from optimizer.pipeline import instantiate

    check_draft_plan(instantiate(specs), target)  # unknown names and bad options fail before any tracing
    return specs, target
