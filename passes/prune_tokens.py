"""``prune_tokens``: training-free token dropping and merging inside transformer blocks (lossy).

Modes (``mode``):
- ``attention`` (FastV / CLS attention): keep the tokens that receive the most attention in the
  block before the gather point, from the CLS query (``source=cls``) or averaged over queries
  (``source=mean``); ``auto`` takes CLS when a leading token is protected (MiniLM at keep 0.5
  after block 2: embedding cosine 0.920 with CLS against 0.890 with the mean), else the mean;
  ``source=next`` takes the CLS row of the pruned block itself, computed from its own query and
  key projections of every token before the gather (``passes.prune_tokens_lookahead``);
- ``pagerank`` (Zero-TPrune): weighted PageRank over that block's head-averaged attention;
- ``diverse`` (DivPrune): the max-min diverse subset of the stream's token features;
- ``frames`` (TimeChat-Online): keep the tokens that changed most since the previous frame (a
  state input/output pair carries the previous frame's features; ``changes_signature``);
- ``merge`` (ToMe): in every block from ``after`` on, merge ``r`` token pairs between attention
  and MLP by bipartite soft matching on the keys, with size-weighted averages and proportional
  attention (``passes.prune_tokens_merge``).

Placement: ``after=k`` and ``keep=r`` keep ``ceil(r * N)`` tokens from block ``k`` on (blocks
before ``k`` see every token); ``schedule=1+1+0.7+0.5+...`` gives each block's keep ratio (of the
original N; non-increasing), with a stage wherever it drops. ``threshold=t`` instead keeps the
tokens whose score is at least ``t`` times the row's mean (``frames``: whose change, 1 - cosine,
is at least ``t``); K is then data-dependent, so it is for ONNX Runtime only. ``protect``
leading tokens (the CLS) and ``protect_ids`` token ids are always kept; padding (attention mask
0) goes first. ``restore`` (auto, always, never): whether the full token set is rebuilt after
the last block, ``fill`` what dropped tokens then hold (the nearest kept token's final value,
their value when dropped, or with ``mode=frames`` and a threshold, ``cache``: their own output
from the previous call, carried as state, ``passes.prune_tokens_cache``; ``context`` says whether
the recomputed tokens then attend to every token through cached keys and values, the default,
or to the kept tokens only, ``passes.prune_tokens_context``), ``proportional`` whether kept
tokens get ``log(tokens represented)`` in later attention scores (``passes.prune_tokens_restore``).

``keep=1.0`` still inserts every stage (K = N): the outputs equal the original exactly (bit for
bit without ONNX Runtime's graph fusions, which differ around a gather). Text encoders, ViTs
and decoders (RoPE tables and causal masks are gathered like any token-indexed side value) are
handled; for decoders the pass prunes a full-sequence pass, not a KV-cached decode step.

The record (``details``) lists the stages (block, ratio, K when static), side values rewritten,
whether and why the tokens were restored, and FLOPs per block before and after
(``passes.prune_tokens_flops``); ``sites`` is the number of stages.

PassError (one sentence) for: no blocks; a keep ratio or schedule entry <= 0 or > 1; a
schedule that grows or has the wrong length; ``after`` out of range; ``attention``/``pagerank``
at block 0 (no earlier attention) or with fused attention (no probabilities); ``threshold`` with
``diverse``/``merge`` or on a target other than ``ort-cpu``; ``frames`` with a schedule;
``merge`` without ``r``; ``fill=cache`` without ``mode=frames`` and a threshold, with
``restore=never``, on a model whose outputs pool the tokens, or (``context=cached``) with a block
whose queries, keys and values come from one projection; ``context`` without ``fill=cache``; a
static K above TensorRT's 3840 on the ``tensorrt`` target; ``restore=never``
when an output is per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import onnx_ir as ir
import onnx_ir.passes.common as common

from optimizer.pipeline import Pass, PassContext, PassResult, register
from optimizer.structure import require_blocks
from passes import prune_tokens_plan as plan
from passes.prune_tokens_build import build_merge, build_prune
from passes.prune_tokens_flops import flops_table
from passes.prune_tokens_ops import fill_types


@register
class PruneTokens(Pass):
    name = "prune_tokens"
    summary = "drop or merge tokens inside the blocks: attention, pagerank, diverse, frames or merge (lossy)"
    exact = False

    def __init__(self, options=None):
        super().__init__(options)
        # only mode=frames adds state inputs and outputs; the other modes keep the signature
        self.changes_signature = self.options.mode == "frames"

    @dataclass
    class Options:
        mode: Literal["attention", "pagerank", "merge", "diverse", "frames"] = "attention"
        keep: float = 0.5  # fraction of the original tokens kept from block ``after`` on
        after: int | None = None  # default: 1 for attention/pagerank, 0 otherwise
        schedule: tuple[float, ...] | None = None  # per-block keep ratios instead of keep/after
        r: int = 0  # merge: token pairs merged per block
        threshold: float | None = None  # ORT only: a score threshold instead of a fixed K
        source: Literal["auto", "cls", "mean", "next"] = "auto"  # attention: CLS row, mean over queries, or next: the pruned block's own CLS row
        iterations: int = 10  # pagerank power iterations
        protect: int = 1  # leading tokens always kept (the CLS)
        protect_ids: tuple[int, ...] = ()  # token ids always kept (e.g. [SEP])
        restore: Literal["auto", "always", "never"] = "auto"
        fill: Literal["nearest", "last", "cache"] = "nearest"  # what restored dropped tokens hold
        context: Literal["cached", "kept"] | None = None  # fill=cache: recomputed tokens attend to all (cached keys) or kept
        proportional: bool | None = None  # log(tokens represented) in later scores; auto: when restoring by nearest

        def validate(self) -> None:
            plan.validate(self)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        opts = self.options
        model_map = require_blocks(ctx.model_map(model), "prune_tokens")
        plan.check_target(opts, ctx.target)
        before = flops_table(model_map, model, None)
        build = build_merge if opts.mode == "merge" else build_prune
        details = build(model, model_map, opts, ctx.target)
        model.graph.sort()
        fill_types(model.graph)
        common.RemoveUnusedNodesPass()(model)
        details["flops"] = flops_table(model_map, model, details.pop("tokens_per_block"), before)
        return PassResult(model=model, sites=len(details["stages"]), details=details)
