"""The model map's data types (documented, with the JSON schema, in ``optimizer.structure``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from runtime.errors import PassError

FORMAT = 1


@dataclass
class AttentionSite:
    """One attention sub-block, by value names (``softmax_node`` and ``core`` are node names).

    ``q``/``k``/``v``: the projections' outputs, bias added, before the per-head reshape, the
    transposes and RoPE (a fused QKV projection gives the same value for all three).
    ``scores``/``probs``: the Softmax's input and output (None when attention is one fused op).
    ``output``: the attention sub-block's output as it enters the residual Add (the output
    projection with its bias; in post-norm models, before the LayerNorm after that Add).
    """

    q: str | None
    k: str | None
    v: str | None
    probs: str | None
    output: str
    softmax_node: str | None
    core: str = ""
    scores: str | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None


@dataclass
class MlpSite:
    """The MLP sub-block: stream value in, output as it enters the residual Add."""

    input: str
    output: str
    intermediate: str | None = None


@dataclass
class Block:
    """One residual block: ``index`` along the stream, ``name`` (its scope path, e.g.
    ``model.layers.3`` or ``/encoder/layer.0``, or ``block.N``), the residual stream values
    entering and leaving it (a block's ``output`` is the next block's ``input``), its sites and
    the names of the nodes inside it."""

    index: int
    name: str
    input: str
    output: str
    attention: AttentionSite | None
    mlp: MlpSite | None
    nodes: list[str] = field(default_factory=list)


@dataclass
class ModelMap:
    """Where a transformer graph's blocks, tokens and ends are (see ``optimizer.structure``).

    ``embeddings``, ``final_norm_nodes`` and ``head`` are node names; ``embedding_output``,
    ``final_norm``, ``head_output``, ``token_input`` and ``main_output`` are value names.
    """

    source: str
    blocks: list[Block]
    token_axis: int | None = None
    token_dim: str | None = None
    hidden_size: int | None = None
    embeddings: list[str] = field(default_factory=list)
    embedding_output: str | None = None
    final_norm: str | None = None
    head: str | None = None
    final_norm_nodes: list[str] = field(default_factory=list)
    head_output: str | None = None
    naming: str = "index"
    token_input: str | None = None
    main_output: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """A JSON-able dict; the schema is in ``optimizer.structure``'s docstring."""
        return {"format": FORMAT, **dataclasses.asdict(self)}

    def block(self, i: int) -> Block:
        """Block ``i``; a ``PassError`` naming the valid range when there is none."""
        if not 0 <= i < len(self.blocks):
            span = f"0-{len(self.blocks) - 1}" if self.blocks else "none"
            raise PassError(f"Block {i} does not exist; this model has {len(self.blocks)} blocks ({span}).")
        return self.blocks[i]
