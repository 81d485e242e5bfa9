"""Finishing a self-draft: the skipped copy a pass split off runs the passes after that pass.

``skip_layers:...,draft=true`` keeps the main graph whole and leaves a copy with the skip set
applied in ``PassContext.draft``. The draft must be the same model as the main artifact except
for the skipped blocks (same tokenizer, vocabulary and cache interface), so the passes after
``skip_layers`` (``kv_cache`` above all) run on it as well, with the same calibration, and it is
lowered for the same target. ``optimizer.artifact.write_artifact`` writes it into ``draft/``.

Cases: no draft asked for (nothing to do); a draft with later passes; a draft from the last pass.
Refused before anything is traced (``PassError``): two passes asking for a draft; a TensorRT
target (its engines would be built for the main graph only).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from optimizer.artifact import DraftPart
from optimizer.lower import lower
from optimizer.pipeline import PassContext, PassRecord, run_pipeline
from optimizer.specs import PassSpec
from runtime.errors import PassError


def check_draft_plan(passes: list[Any], target: str) -> None:
    """Refuse draft requests this build cannot honour, before any tracing."""
    asking = [i for i, p in enumerate(passes, 1) if getattr(p.options, "draft", False)]
    if len(asking) > 1:
        raise PassError(f"passes {' and '.join(map(str, asking))} both ask for a self-draft; an artifact has one "
                        "draft, so set draft=true on one skip_layers pass only.")
    if asking and target.startswith("tensorrt"):
        raise PassError("a self-draft (draft=true) is written for ONNX Runtime and torch targets only; drop "
                        "draft=true or use --target ort-cpu.")


def finish_draft(ctx: PassContext, specs: list[PassSpec], records: list[PassRecord], target: str) -> DraftPart | None:
    """Run the passes after the drafting one on the draft and lower it; None without a draft."""
    if ctx.draft is None:
        return None
    split = next(r for r in records if r.details.get("draft"))
    rest = specs[split.position:]
    draft_ctx = PassContext(target=target, example_feeds=ctx.example_feeds, calibration=ctx.calibration,
                            progress=ctx.progress)
    with ctx.progress.step(f"self-draft: the {len(rest)} passes after skip_layers"):
        model, later = run_pipeline(ctx.draft, rest, draft_ctx)
    skipped = [u["name"] for u in split.details.get("removed", [])]
    applied = dataclasses.replace(split, sites=len(skipped), details={**split.details, "draft": "applied"})
    later = [dataclasses.replace(r, position=r.position + split.position) for r in later]
    draft_records = records[:split.position - 1] + [applied] + later
    model, lowering = lower(model, target)
    return DraftPart(model, {"passes": [r.to_json() for r in draft_records], "lowering": lowering}, skipped)
