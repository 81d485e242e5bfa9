"""The pass pipeline: a pass protocol, a registry by name, and the loop that runs passes in order.

A pass is a class with a registered ``name``, an ``Options`` dataclass, an ``exact`` flag (exact
passes must leave outputs numerically equal) and ``run(model, ctx) -> PassResult``. The pipeline
runs each one, verifies the graph after it (``optimizer.verify``), and keeps a ``PassRecord``
(nodes and parameter bytes before/after, seconds, sites changed, the pass's own details) that
goes into the artifact's manifest. A failing pass is named with its position in the recipe.
"""

from __future__ import annotations

import abc
import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_ir as ir

from optimizer import verify
from optimizer.progress import Progress
from optimizer.specs import PassSpec, build_options
from runtime.errors import CarveError, PassError


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) model, how many sites it rewrote, and details."""

    model: ir.Model
    sites: int = 0
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What passes may consult besides the graph: the target, example feeds, calibration data
    (the built-in model's spec when there is one: passes draw its calibration split), progress,
    and the model map."""

    target: str = "ort-cpu"
    example_feeds: dict[str, Any] | None = None
    calibration: Any = None  # a built-in ModelSpec or name, or feeds, that passes calibrate on
    progress: Progress = field(default_factory=Progress)
    draft: Any = None  # a self-draft graph a pass split off (skip_layers:draft=true); optimizer.draft finishes it
    _map: Any = None
    _map_of: int | None = None

    def model_map(self, model: ir.Model):
        """The model map of ``model``, rebuilt only when the graph object or its size changed."""
        from optimizer.structure import build_map

        key = id(model.graph) ^ len(model.graph)
        if self._map is None or self._map_of != key:
            self._map, self._map_of = build_map(model), key
        return self._map


class Pass(abc.ABC):
    """Base class of every pass; subclasses set the class attributes and implement ``run``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    exact: ClassVar[bool] = True
    changes_signature: ClassVar[bool] = False

    @dataclass
    class Options:
        pass

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    @abc.abstractmethod
    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Rewrite ``model`` (in place or as a new model) and say what changed."""


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its ``name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two passes are registered as {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    import passes  # noqa: F401  (importing the package registers every pass)

    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    passes_by_name = registry()
    if name not in passes_by_name:
        known = ", ".join(passes_by_name)
        raise PassError(f"unknown pass {name!r}; available passes are: {known}.")
    return passes_by_name[name]


@dataclass
class PassRecord:
    """One pass's entry in the manifest."""

    position: int
    name: str
    options: dict[str, Any]
    exact: bool
    nodes_before: int
    nodes_after: int
    param_bytes_before: int
    param_bytes_after: int
    seconds: float
    sites: int
    details: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def instantiate(specs: list[PassSpec]) -> list[Pass]:
    """Resolve names and options of every spec before anything runs, so typos fail fast."""
    out = []
    for position, spec in enumerate(specs, 1):
        try:
            cls = get_pass(spec.name)
            out.append(cls(build_options(cls.Options, spec.options, cls.name)))
        except PassError as exc:
            raise PassError(f"pass {position} of {len(specs)} ({spec.name}): {exc}") from exc
    return out


def run_pipeline(model: ir.Model, specs: list[PassSpec], ctx: PassContext) -> tuple[ir.Model, list[PassRecord]]:
    """Run the passes in order, verifying after each; returns the final model and the records."""
    passes = instantiate(specs)
    records = []
    for position, pass_ in enumerate(passes, 1):
        label = f"pass {position} of {len(passes)} ({pass_.name})"
        with ctx.progress.step(label):
            model, record = _run_one(pass_, position, model, ctx, label)
        records.append(record)
    return model, records


def _run_one(pass_: Pass, position: int, model: ir.Model, ctx: PassContext, label: str):
    before = verify.Signature.of(model)
    nodes_before, bytes_before = count_nodes(model), param_bytes(model)
    start = time.perf_counter()
    try:
        result = pass_.run(model, ctx)
    except CarveError as exc:
        raise type(exc)(f"{label}: {exc}") from exc
    except Exception as exc:
        if os.environ.get("CARVE_DEBUG"):
            raise
        raise PassError(f"{label} failed unexpectedly ({type(exc).__name__}: {exc}); set CARVE_DEBUG=1 for the traceback and report it.") from exc
    seconds = time.perf_counter() - start
    verify.check(result.model, before, label, allow_signature_change=pass_.changes_signature)
    record = PassRecord(
        position=position, name=pass_.name, options=dataclasses.asdict(pass_.options), exact=pass_.exact,
        nodes_before=nodes_before, nodes_after=count_nodes(result.model),
        param_bytes_before=bytes_before, param_bytes_after=param_bytes(result.model),
        seconds=round(seconds, 4), sites=result.sites, details=result.details,
    )
    return result.model, record


def count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def param_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
