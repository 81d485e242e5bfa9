"""The ``feature_cache`` pass: skip the rest of the model when an input barely changed since the last call.

For streams of nearly identical inputs (video frames, a repeated image, iterative refinement),
the first block's residual (its output minus its input) says how much the input changed. The
pass keeps the model up to block ``after`` as it is and moves everything after it into the
then-branch of an ONNX ``If``: the branch runs only when the relative L1 change of that residual
against the one of the last computed call is at least ``threshold``; otherwise the outputs of
the previous call are returned as they are (first-block-residual caching, as TeaCache/FBCache do
for diffusion transformers).

State crosses calls through the graph's signature (the runtime carries it, ``runtime.stream``):
- inputs ``feature_cache.residual`` (the last computed residual) and
  ``feature_cache.previous.{output}`` (the last outputs);
- outputs: the model's own, then ``feature_cache.residual`` (updated only when recomputed) and
  ``feature_cache.recomputed`` (a bool, for counting).
A call without state (zeros) always recomputes, so the first call and ``carve run`` are exact.

``threshold``: a number, or ``auto`` (the default): calibrated on a stream of real images
(held-out crops, each repeated with small noise, then cut to the next) as the largest change at
which reusing the previous output kept the main output's correlation at ``min_corr``.
Per-token reuse (only the changed tokens recomputed) is ``prune_tokens:mode=frames,fill=cache``:
it needs that pass's token gather, side-value rewrites and restore, not an ``If``, so
``per_token=true`` here is refused with that pointer.
Cases refused with a reason: no blocks, ``after`` outside the model, outputs not computed from
the residual stream, ``auto`` on a model without image calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from optimizer.pipeline import Pass, PassContext, PassResult, register
from passes.feature_cache_build import wrap_tail
from runtime.errors import PassError


@register
class FeatureCache(Pass):
    name = "feature_cache"
    summary = "reuse the previous call's outputs when the first block's residual barely changed (streams)"
    exact = False
    changes_signature = True

    @dataclass
    class Options:
        after: int = 0
        threshold: str = "auto"
        min_corr: float = 0.98
        calib_frames: int = 48
        per_token: bool = False  # refused: per-token reuse is prune_tokens' frames mode (module doc)

        def validate(self) -> None:
            if self.per_token:
                raise PassError("feature_cache reuses whole outputs; per-token reuse is "
                                "prune_tokens:mode=frames,fill=cache,threshold=t (unchanged tokens are dropped and "
                                "take their previous outputs), use that instead.")
            if self.threshold != "auto":
                try:
                    value = float(self.threshold)
                except ValueError:
                    raise PassError(f"feature_cache threshold must be a number or auto, got {self.threshold!r}.") from None
                if value < 0:
                    raise PassError(f"feature_cache threshold must be >= 0, got {value}.")
            if not 0 < self.min_corr <= 1:
                raise PassError(f"feature_cache needs 0 < min_corr <= 1, got {self.min_corr}.")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        opts = self.options
        model_map = ctx.model_map(model)
        if not model_map.blocks:
            raise PassError("the model map found no blocks in this model; feature_cache reuses the blocks after the first.")
        block = model_map.block(opts.after)
        if opts.after >= len(model_map.blocks) - 1:
            raise PassError(f"feature_cache after={opts.after} leaves no block to skip; this model has "
                            f"{len(model_map.blocks)} blocks, so after must be below {len(model_map.blocks) - 1}.")
        details = {"after": opts.after, "blocks": len(model_map.blocks)}
        if opts.threshold == "auto":
            from passes.feature_cache_calib import calibrate

            threshold, curve = calibrate(model, block, ctx, opts)
            details.update(threshold=threshold, calibration=curve, min_corr=opts.min_corr)
        else:
            threshold = float(opts.threshold)
            details["threshold"] = threshold
        moved = wrap_tail(model.graph, block, threshold)
        details["nodes_moved"] = moved
        return PassResult(model=model, sites=len(model_map.blocks) - opts.after - 1, details=details)
