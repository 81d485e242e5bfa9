"""``skip_layers``: remove the transformer blocks (or attention / MLP sub-blocks) that matter
least, chosen on calibration data (lossy; static mode).

What it does, in order:

1. finds the units (blocks, or attention and MLP sub-blocks with ``sub=true``) through the model
   map (``passes.skip_layers_rewrite``);
2. reads calibration batches (``passes.skip_layers_data``) and scores, with one reference run,
   every unit's Block Influence and, per skip set, the end-to-end score: KL of next-token
   distributions for decoders, 1 - cosine of the main output for encoders and ViTs
   (``passes.skip_layers_score``, ``passes.skip_layers_eval``);
3. chooses the skip set: the explicit ``blocks``, or ``count`` units by evolutionary (default),
   greedy or exhaustive search, or by Block Influence alone with ``score=bi``
   (``passes.skip_layers_search``);
4. rewrites: each skipped unit's output value is replaced by its input value, and what became
   dead is removed; with ``replace=linear`` each run of adjacent skipped units is replaced by a
   linear map fitted on the calibration activations instead (``passes.skip_layers_linear``).

Cases handled: encoders, ViTs and decoders with blocks found by the map; a skipped unit whose
output is a graph output; adjacent skipped units; ``count=0`` or an empty ``blocks`` (the model is
untouched). With ``draft=true`` the model is left whole (``sites`` 0) and the skipped copy is
handed to ``PassContext.draft``, which ``optimizer.draft`` finishes into the artifact's self-draft.
``PassError`` (one sentence) for: no blocks, ``count`` < 0, ``count`` >= the number of units, both ``count`` and ``blocks`` (or neither), an index out of range or repeated, an
exhaustive search too large. ``mode=positional`` (SkipDecode on a KV-cached decoder) is
``passes.skip_layers_positional``, with its own cases and errors.

The record (``details``) lists each removed unit with its Block Influence and its end-to-end
score when removed alone, the chosen set's score, the search's curve, and the chosen set against
the Block-Influence set and a random set; ``sites`` is the number of units removed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import onnx_ir as ir

from optimizer.pipeline import Pass, PassContext, PassResult, register
from passes import skip_layers_positional as positional
from passes import skip_layers_search as search
from passes.skip_layers_data import calibration_batches
from passes.skip_layers_eval import evaluator
from passes.skip_layers_linear import spans
from passes.skip_layers_rewrite import Unit, apply_skip, check_skip_set, units_of
from runtime.errors import PassError


@register
class SkipLayers(Pass):
    name = "skip_layers"
    summary = "remove the blocks (or attention/MLP sub-blocks) that matter least on calibration data (lossy)"
    exact = False

    @dataclass
    class Options:
        count: int | None = None  # how many units to remove; the search picks which
        blocks: tuple[int, ...] | None = None  # explicit unit indices (no search), e.g. 3+7
        score: Literal["auto", "kl", "cosine", "bi"] = "auto"  # auto: kl for logits, else cosine
        search: Literal["evolutionary", "greedy", "exhaustive"] = "evolutionary"
        sub: bool = False  # units are attention and MLP sub-blocks (2i, 2i+1) instead of blocks
        replace: Literal["none", "linear"] = "none"  # linear: a fitted map instead of each skipped span
        mode: Literal["static", "positional"] = "static"
        # mode=positional (SkipDecode): blocks skipped per decode position, min up to start, rising
        # linearly to max at end, counted from block first (passes.skip_layers_positional)
        min: int = 0
        max: int | None = None
        start: int = 0
        end: int = 512
        first: int = 0
        seed: int = 0
        generations: int = 20
        population: int = 12  # offspring per generation
        samples: int = 16  # calibration samples (sequences or images)
        draft: bool = False  # keep the graph whole; the skipped copy becomes the artifact's self-draft

        def validate(self) -> None:
            _validate(self)

    @property  # type: ignore[override]
    def changes_signature(self) -> bool:
        """Positional mode adds the ``skip_layers.count`` input; static mode keeps the signature."""
        return self.options.mode == "positional"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        opts = self.options
        if opts.mode == "positional":
            return positional.run(model, ctx, opts)
        units = units_of(ctx.model_map(model), opts.sub)
        what = "sub-block" if opts.sub else "block"
        explicit = check_skip_set(opts.blocks, units, what) if opts.blocks is not None else None
        if explicit is None:
            _check_budget(opts.count, len(units), what)
        if explicit == () or opts.count == 0:
            _keep_draft(model, units, (), None, ctx, opts)
            return PassResult(model=model, sites=0, details={"mode": "static", "unit": what, "removed": [],
                                                             "draft": opts.draft})
        study = _study(model, units, ctx, opts)
        wanted = len(explicit) if explicit else opts.count
        with ctx.progress.step(f"skip_layers: choosing {wanted} of {len(units)} {what}s"):
            chosen, curve, method = _choose(study, explicit, opts)
        details = _details(study, chosen, curve, method, explicit is None, opts, what)
        if _keep_draft(model, units, tuple(sorted(chosen)), study.evaluator.maps, ctx, opts):
            return PassResult(model=model, sites=0, details={**details, "draft": True})
        apply_skip(model, units, tuple(sorted(chosen)), study.evaluator.maps)
        return PassResult(model=model, sites=len(chosen), details=details)


def _keep_draft(model: ir.Model, units: list[Unit], chosen: tuple[int, ...], maps: Any, ctx: PassContext,
                opts: Any) -> bool:
    """With ``draft=true`` the skip set is applied to a copy (weights shared in memory), which the
    passes after this one finish into the artifact's ``draft/`` (``optimizer.draft``)."""
    if not opts.draft:
        return False
    draft = model.clone()
    apply_skip(draft, units, chosen, maps)
    ctx.draft = draft
    return True


def _validate(opts: Any) -> None:
    if opts.mode == "positional" and opts.draft:
        raise PassError("skip_layers draft=true makes a static self-draft; drop mode=positional or draft=true.")
    if opts.mode == "positional":
        return positional.validate(opts)
    if opts.max is not None or opts.first:
        raise PassError("skip_layers max and first (with min, start, end) schedule mode=positional; add "
                        "mode=positional or drop them.")
    if opts.count is not None and opts.blocks is not None:
        raise PassError("skip_layers takes either count (search) or blocks (explicit), not both; drop one.")
    if opts.count is None and opts.blocks is None:
        raise PassError("skip_layers needs count=N (how many blocks to remove) or blocks=I+J (which ones).")
    if opts.count is not None and opts.count < 0:
        raise PassError(f"skip_layers count must be >= 0, got {opts.count}.")
    for key in ("generations", "population", "samples"):
        if getattr(opts, key) < 1:
            raise PassError(f"skip_layers {key} must be >= 1, got {getattr(opts, key)}.")


def _check_budget(count: int, n: int, what: str) -> None:
    if count >= n:
        raise PassError(f"skip_layers count={count} is a budget larger than the model, which has {n} {what}s; "
                        f"give count < {n}.")


@dataclass
class _Study:
    """What the decisions are taken from: units, calibration, scores."""

    units: list[Unit]
    evaluator: Any
    scorer: search.Scorer
    calibration: str
    started: float


def _study(model: ir.Model, units: list[Unit], ctx: PassContext, opts: Any) -> _Study:
    start = time.perf_counter()
    batches, origin = calibration_batches(ctx, model, opts.samples)
    main = _main_output(ctx.model_map(model), model)
    kind = opts.score if opts.score in ("kl", "cosine") else ("kl" if "logits" in main.lower() else "cosine")
    with ctx.progress.step(f"skip_layers: reference run on {len(batches)} calibration batches"):
        ev = evaluator(model, units, main, batches, kind, linear=opts.replace == "linear")
    small = max(1, len(batches) // 4)  # selection on a quarter of the data, confirmation on all
    scorer = search.Scorer(ev.score, small, len(batches))
    return _Study(units, ev, scorer, origin, start)


def _main_output(model_map: Any, model: ir.Model) -> str:
    outputs = [v.name for v in model.graph.outputs]
    return model_map.main_output if model_map.main_output in outputs else outputs[0]


def _choose(study: _Study, explicit: tuple[int, ...] | None, opts: Any) -> tuple[frozenset[int], list[dict], str]:
    if explicit is not None:
        return frozenset(explicit), [], "explicit"
    n, bi = len(study.units), study.evaluator.bi
    if opts.score == "bi":
        return search.influence_set(bi, opts.count), [], "block influence (no search)"
    if opts.search == "exhaustive":
        return (*search.exhaustive(n, opts.count, study.scorer), "exhaustive")
    if opts.search == "greedy":
        return (*search.greedy(n, opts.count, study.scorer), "greedy")
    best, curve = search.evolutionary(n, opts.count, study.scorer, opts.seed, opts.generations, opts.population,
                                      search.influence_set(bi, opts.count))
    return best, curve, "evolutionary"


def _details(study: _Study, chosen: frozenset[int], curve: list[dict], method: str, compare: bool,
             opts: Any, what: str) -> dict[str, Any]:
    scorer, units, bi = study.scorer, study.units, study.evaluator.bi
    removed = [{"index": i, "name": units[i].name, "block_influence": _r(bi[i]),
                "score_alone": _r(scorer.full(frozenset({i})))} for i in sorted(chosen)]
    details: dict[str, Any] = {
        "mode": "static", "unit": what, "units": len(units), "search": method, "replace": _replacement(study, chosen),
        "score": study.evaluator.metric.describe(), "calibration": study.calibration,
        "batches": {"small": scorer.small_batches, "full": scorer.full_batches},
        "evaluator": study.evaluator.name,
        "removed": removed, "set": sorted(chosen), "set_score": _r(scorer.full(chosen)),
        "block_influence": {u.name: _r(v) for u, v in zip(units, bi)},
        "curve": [_r(p["score"]) for p in curve],  # the parent's full-set score per generation
        "curve_sets": _changes(curve),
    }
    if compare:
        details["comparison"] = _comparison(study, chosen, len(chosen), opts.seed)
    details["evaluations"] = scorer.evaluations()
    details["seconds_scoring"] = round(time.perf_counter() - study.started, 2)
    return details


def _replacement(study: _Study, chosen: frozenset[int]) -> str | list[dict]:
    """'none', or each skipped span with the size of the linear map that replaces it."""
    maps = study.evaluator.maps
    if maps is None:
        return "none"
    return [{"span": [first, last], "weights": int(maps.get(first, last)[0].size + maps.get(first, last)[1].size)}
            for first, last in spans(chosen)]


def _r(x: float) -> float:
    """Six significant digits: scores of small models can be 1e-7 and still rank."""
    return float(f"{x:.6g}")


def _changes(curve: list[dict]) -> list[dict]:
    """The generations at which the search's best set changed, with that set."""
    out: list[dict] = []
    for point in curve:
        if not out or out[-1]["set"] != point["set"]:
            out.append({"generation": point["generation"], "set": point["set"]})
    return out


def _comparison(study: _Study, chosen: frozenset[int], count: int, seed: int) -> dict[str, dict]:
    """The chosen set against Block Influence alone and a seeded random set, on the full set."""
    n, scorer = len(study.units), study.scorer
    sets = {"chosen": chosen, "block_influence": search.influence_set(study.evaluator.bi, count),
            "random": search.random_set(n, count, seed)}
    return {label: {"set": sorted(s), "score": _r(scorer.full(s))} for label, s in sets.items()}
