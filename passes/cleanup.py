"""Cleanup passes: exact rewrites that remove work without changing any output.

- ``fold_constants``: evaluates subgraphs whose inputs are all constants (onnxscript's folder),
  so shape arithmetic on static dims and weight transposes disappear.
- ``dead_code``: removes nodes whose outputs nobody reads, and unused functions and opsets.
- ``cse``: merges nodes that compute the same thing from the same inputs.
- ``cleanup``: the three above in that order, twice if the first round changed anything.

Each reports as ``sites`` the number of nodes it removed. None changes the model's signature.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer as oso

from optimizer.pipeline import Pass, PassContext, PassResult, count_nodes, register


def _removed(model: ir.Model, action) -> PassResult:
    before = count_nodes(model)
    action(model)
    return PassResult(model=model, sites=max(0, before - count_nodes(model)))


def _fold(model: ir.Model) -> None:
    oso.fold_constants(model)
    _dead(model)


def _dead(model: ir.Model) -> None:
    common.RemoveUnusedNodesPass()(model)
    common.RemoveUnusedFunctionsPass()(model)
    common.RemoveUnusedOpsetsPass()(model)


def _cse(model: ir.Model) -> None:
    common.CommonSubexpressionEliminationPass()(model)
    _dead(model)


@register
class FoldConstants(Pass):
    name = "fold_constants"
    summary = "evaluate constant subgraphs ahead of time (exact)"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return _removed(model, _fold)


@register
class DeadCode(Pass):
    name = "dead_code"
    summary = "remove nodes, functions and opsets nothing uses (exact)"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return _removed(model, _dead)


@register
class CommonSubexpressions(Pass):
    name = "cse"
    summary = "merge nodes that compute the same value (exact)"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return _removed(model, _cse)


@register
class Cleanup(Pass):
    name = "cleanup"
    summary = "fold_constants, cse and dead_code until nothing changes (exact)"

    @dataclass
    class Options:
        rounds: int = 2

        def validate(self) -> None:
            from runtime.errors import PassError

            if self.rounds < 1:
                raise PassError(f"cleanup needs rounds >= 1, got {self.rounds}.")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        total = 0
        for _ in range(self.options.rounds):
            removed = _removed(model, lambda m: (_fold(m), _cse(m))).sites
            total += removed
            if not removed:
                break
        return PassResult(model=model, sites=total, details={"nodes_removed": total})
