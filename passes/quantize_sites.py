"""Where the quantize pass can act: MatMul and Gemm nodes with a constant 2-D float weight.

``find_sites(model, model_map)`` lists them in graph order, each with its weight as ``[K, N]``
(a Gemm with ``transB=1`` is read transposed), the block it belongs to and its role there,
read from the model map: ``q``, ``k``, ``v`` (the projection whose output, bias included, is
the map's Q/K/V value), ``attn_out`` (produces the attention output), ``mlp`` (any other
matmul of a block), ``head`` (the map's head node), ``embeddings`` (a map embedding node) or
``outside``. When the map has no blocks every site is ``outside`` and only ``head`` and
``embeddings`` can still be told apart.

Not sites: MatMuls of two activations (attention scores), weights of rank other than 2,
weights that are not float32 (fp16/bf16 models are not handled yet), Gemm with ``transA=1``
or ``alpha``/``beta`` other than 1.

``select(sites, skip)`` drops the sites named by the ``skip`` words: ``head``, ``embeddings``,
``first`` and ``last`` (the first and last block), ``attention``, ``mlp``, ``outside`` and
``blockN`` (block index N).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from runtime.errors import PassError

SKIP_WORDS = ("head", "embeddings", "first", "last", "attention", "mlp", "outside", "blockN")
# float32 only: the decision's DequantizeLinear yields float32, and ORT's int8 kernels take float32.
_FLOATS = {ir.DataType.FLOAT}


@dataclass
class Site:
    node: ir.Node
    weight: np.ndarray  # [K, N] float32, as the MatMul multiplies it
    role: str
    block: int | None

    @property
    def name(self) -> str:
        where = f"block.{self.block}." if self.block is not None else ""
        return f"{where}{self.role}:{self.node.name}"

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]


def find_sites(model: ir.Model, model_map) -> list[Site]:
    """Every quantizable matmul of ``model`` (see the module docstring)."""
    node_roles, value_roles = _roles(model_map), attention_roles(model_map)
    blocks = _block_of(model_map)
    sites = []
    for node in model.graph:
        weight = _weight(node)
        if weight is None:
            continue
        block = blocks.get(node.name)
        role = node_roles.get(node.name) or _output_role(node, value_roles, block)
        sites.append(Site(node, weight, role, block))
    return sites


def read_weight(node: ir.Node) -> np.ndarray | None:
    """The constant weight of a MatMul/Gemm as ``[K, N]`` float32, or None when it is not a site."""
    return _weight(node)


def _weight(node: ir.Node) -> np.ndarray | None:
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    if node.op_type == "Gemm" and not _plain_gemm(node):
        return None
    value = node.inputs[1]
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.dtype not in _FLOATS or len(tensor.shape) != 2:
        return None
    if value.producer() is not None and value.producer().op_type not in ("Constant",):
        return None
    weight = tensor.numpy().astype(np.float32)
    transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
    return weight.T.copy() if transposed else weight


def _plain_gemm(node: ir.Node) -> bool:
    attrs = node.attributes
    return (attrs.get_int("transA", 0) == 0 and attrs.get_float("alpha", 1.0) == 1.0
            and attrs.get_float("beta", 1.0) == 1.0)


def _roles(model_map) -> dict[str, str]:
    """Node name -> role for the nodes the map names directly (head, embeddings)."""
    roles: dict[str, str] = {}
    if model_map is None:
        return roles
    for name in getattr(model_map, "embeddings", None) or []:
        roles[name] = "embeddings"
    if getattr(model_map, "head", None):
        roles[model_map.head] = "head"
    return roles


def _block_of(model_map) -> dict[str, int]:
    found: dict[str, int] = {}
    for block in getattr(model_map, "blocks", None) or []:
        for name in block.nodes:
            found[name] = block.index
    return found


def _output_role(node: ir.Node, roles: dict[str, str], block: int | None) -> str:
    """Role from the map's attention values (``roles``): follow the output through one bias Add."""
    if block is None:
        return "outside"
    produced = {node.outputs[0].name}
    for use in node.outputs[0].uses():
        if use.node.op_type == "Add":
            produced.add(use.node.outputs[0].name)
    for value_name in produced:
        if value_name in roles:
            return roles[value_name]
    return "mlp"


def attention_roles(model_map) -> dict[str, str]:
    """Value name -> q/k/v/attn_out for every block's attention site."""
    roles: dict[str, str] = {}
    for block in getattr(model_map, "blocks", None) or []:
        att = block.attention
        if att is None:
            continue
        for role in ("q", "k", "v"):
            value = getattr(att, role)
            if value and value not in roles:
                roles[value] = role
        if att.output:
            roles[att.output] = "attn_out"
    return roles


def skip_words(skip: tuple[str, ...]) -> set[str]:
    """The normalized ``skip`` words; an unknown word is a ``PassError``."""
    wanted = set()
    for word in skip:
        word = word.strip().lower()
        if word and word not in SKIP_WORDS[:-1] and not re.fullmatch(r"block\d+", word):
            raise PassError(f"quantize cannot skip {word!r}; skip takes words joined by + from: {', '.join(SKIP_WORDS)}.")
        if word:
            wanted.add(word)
    return wanted


def select(sites: list[Site], skip: tuple[str, ...], blocks: int) -> tuple[list[Site], list[Site], list[str]]:
    """(kept, skipped, notes) for the ``skip`` words."""
    wanted = skip_words(skip)
    notes = [f"skip={word} ignored: the model map found no blocks" for word in sorted(wanted)
             if blocks == 0 and (word in ("first", "last", "attention", "mlp") or word.startswith("block"))]
    kept, skipped = [], []
    for site in sites:
        (skipped if _skipped(site, wanted, blocks) else kept).append(site)
    return kept, skipped, notes


def _skipped(site: Site, wanted: set[str], blocks: int) -> bool:
    if site.role in ("head", "embeddings", "outside") and site.role in wanted:
        return True
    if site.block is None:
        return False
    return ((site.block == 0 and "first" in wanted) or (site.block == blocks - 1 and "last" in wanted)
            or f"block{site.block}" in wanted
            or (site.role in ("q", "k", "v", "attn_out") and "attention" in wanted)
            or (site.role == "mlp" and "mlp" in wanted))
