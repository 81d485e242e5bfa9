"""The pass pipeline: specs, recipes, option conversion, ordering, verification, records."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import pytest

from optimizer.pipeline import Pass, PassContext, PassResult, register, run_pipeline
from optimizer.specs import PassSpec, build_options, load_recipe, parse_spec
from runtime.errors import PassError, VerificationError


def test_parse_inline_specs():
    specs = parse_spec("quantize:mode=w8a8,alpha=0.5; cleanup")
    assert [s.name for s in specs] == ["quantize", "cleanup"]
    assert specs[0].options == {"mode": "w8a8", "alpha": "0.5"}
    with pytest.raises(PassError, match="empty"):
        parse_spec(" ; ")


@dataclass
class _Opts:
    count: int = 1
    ratio: float = 0.5
    flag: bool = False
    blocks: tuple[int, ...] = ()
    after: int | None = None
    name: str = "x"


@pytest.mark.parametrize("raw, expected", [
    ({"count": "3"}, {"count": 3}),
    ({"ratio": "0.25", "flag": "yes"}, {"ratio": 0.25, "flag": True}),
    ({"blocks": "3+7"}, {"blocks": (3, 7)}),
    ({"after": "none"}, {"after": None}),
    ({"after": "2"}, {"after": 2}),
    ({"count": 4, "flag": False, "blocks": [1, 2]}, {"count": 4, "flag": False, "blocks": (1, 2)}),  # TOML values
])
def test_option_conversion(raw, expected):
    options = build_options(_Opts, raw, "demo")
    for key, value in expected.items():
        assert getattr(options, key) == value


@pytest.mark.parametrize("raw, needle", [
    ({"count": "1.5"}, "count='1.5' of pass 'demo' is not an integer"),
    ({"flag": "maybe"}, "flag='maybe'"),
    ({"colour": "red"}, "no option 'colour'"),
    ({"blocks": "1+x"}, "blocks='1\\+x'.* joined by \\+"),
])
def test_option_errors(raw, needle):
    with pytest.raises(PassError, match=needle):
        build_options(_Opts, raw, "demo")


def test_recipe_file(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('target = "ort-cpu"\n[[pass]]\nname = "cleanup"\nrounds = 3\n[[pass]]\nname = "cse"\n')
    recipe = load_recipe(path)
    assert recipe.target == "ort-cpu"
    assert [(s.name, s.options) for s in recipe.passes] == [("cleanup", {"rounds": 3}), ("cse", {})]


@pytest.mark.parametrize("text, needle", [("[[pass]]\nrounds = 3\n", "each with a name"), ("[[pass\n", "not valid TOML")])
def test_bad_recipes(tmp_path, text, needle):
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(PassError, match=needle):
        load_recipe(path)
    with pytest.raises(PassError, match="does not exist"):
        load_recipe(tmp_path / "missing.toml")


def _graph() -> ir.Model:
    """y = Relu(x) + Relu(x): two equal nodes (for cse) feeding an Add."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", 4]))
    r1 = ir.node("Relu", [x], name="relu_a")
    r2 = ir.node("Relu", [x], name="relu_b")
    add = ir.node("Add", [r1.outputs[0], r2.outputs[0]], name="add")
    add.outputs[0].name = "y"
    add.outputs[0].dtype, add.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(["batch", 4])
    graph = ir.Graph([x], [add.outputs[0]], nodes=[r1, r2, add], opset_imports={"": 20}, name="g")
    return ir.Model(graph, ir_version=10)


@register
class _BreaksGraph(Pass):
    """A buggy pass (for tests): removes a node whose output is still used."""

    name = "test_breaks_graph"
    summary = "test only"

    def run(self, model, ctx):
        node = next(n for n in model.graph if n.name == "relu_a")
        model.graph.remove(node, safe=False)
        return PassResult(model=model, sites=1)


@register
class _ChangesSignature(Pass):
    name = "test_renames_output"
    summary = "test only"

    def run(self, model, ctx):
        model.graph.outputs[0].name = "renamed"
        return PassResult(model=model)


def test_records_and_counts():
    model, records = run_pipeline(_graph(), [PassSpec("cse"), PassSpec("dead_code")], PassContext())
    assert [r.name for r in records] == ["cse", "dead_code"]
    assert (records[0].nodes_before, records[0].nodes_after, records[0].sites) == (3, 2, 1)
    assert records[1].sites == 0 and records[0].position == 1 and records[1].position == 2
    assert records[0].exact and records[0].seconds >= 0


@pytest.mark.parametrize("name, needle", [
    ("test_breaks_graph", "pass 2 of 2 \\(test_breaks_graph\\) produced an invalid graph: node 'add'"),
    ("test_renames_output", "inputs or outputs changed"),
])
def test_verification_names_the_failing_pass(name, needle):
    with pytest.raises(VerificationError, match=needle):
        run_pipeline(_graph(), [PassSpec("cse"), PassSpec(name)], PassContext())


def test_unknown_pass_fails_before_running():
    with pytest.raises(PassError, match="pass 2 of 2 \\(nope\\): unknown pass 'nope'; available passes are: .*cleanup"):
        run_pipeline(_graph(), [PassSpec("cse"), PassSpec("nope")], PassContext())
