"""The quantize pass's convolution sites (``w8a8`` only): int8 weights and static int8 inputs.

A site is a 2-D ``Conv`` or ``ConvTranspose`` with a constant float32 weight, one group and no
dilation: a vision model's decoder (the ViT-S saliency head's three 4x4 stride-2 transposed
convolutions are a quarter of its quantized time) or stem. The decision has the MatMul sites'
form: a static symmetric ``QuantizeLinear``/``DequantizeLinear`` pair on the input (scale from
the calibrated ``percentile`` of |x|) and ``DequantizeLinear(W_int8, scale, axis)`` per output
channel (axis 0 for Conv's ``[out, in, kh, kw]``, axis 1 for ConvTranspose's
``[in, out, kh, kw]``), with ``carve.quantize`` metadata (role ``conv``). Lowering for ORT CPU:
``optimizer.lower.ort_conv``.

Cases: the ``skip`` words apply as to the MatMul sites (a conv the model map names as an
embedding has role ``embeddings``; any other is ``outside`` a block, so ``skip=outside`` leaves
every conv float); ``dynamic`` and the weight-only modes leave convolutions float (ORT CPU has
no fast dynamically quantized convolution); grouped, dilated, 1-D/3-D convolutions and
non-constant or non-float32 weights are not sites.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from passes import quantize_math as qm
from passes.quantize_math import QMAX
from passes.quantize_rewrite import META, activation_qdq, read_dequantized

OPS = ("Conv", "ConvTranspose")


@dataclass
class ConvSite:
    node: ir.Node
    weight: np.ndarray  # as stored: Conv [out, in, kh, kw], ConvTranspose [in, out, kh, kw]
    role: str  # embeddings or outside
    block: None = None

    @property
    def name(self) -> str:
        return f"{self.role}:{self.node.name}"

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def axis(self) -> int:
        """The weight's output-channel axis."""
        return 1 if self.node.op_type == "ConvTranspose" else 0


def find_conv_sites(model: ir.Model, model_map) -> list[ConvSite]:
    """Every quantizable 2-D convolution of ``model``, in graph order."""
    embeddings = set(getattr(model_map, "embeddings", None) or [])
    sites = []
    for node in model.graph:
        weight = _weight(node)
        if weight is not None:
            sites.append(ConvSite(node, weight, "embeddings" if node.name in embeddings else "outside"))
    return sites


def _weight(node: ir.Node) -> np.ndarray | None:
    if node.op_type not in OPS or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    attrs = node.attributes
    if attrs.get_int("group", 1) != 1 or any(d != 1 for d in attrs.get_ints("dilations", [1, 1])):
        return None
    tensor = ir.convenience.get_const_tensor(node.inputs[1]) if node.inputs[1] is not None else None
    if tensor is None or tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 4:
        return None
    return tensor.numpy().astype(np.float32)


def quantize_weight(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel (``axis``): (q, scale[out])."""
    moved = np.moveaxis(weight, axis, -1)  # [..., out], read as [K, N] by the matmul quantizer
    q, scale = qm.quantize_weight(moved.reshape(-1, moved.shape[-1]))
    return np.moveaxis(q.reshape(moved.shape), -1, axis), scale


def apply(graph: ir.Graph, sites: list[ConvSite], stats: dict, percentile: float) -> list[dict]:
    """Write every site's decision; one record per input (its scale, its sites' weight errors)."""
    by_input: dict[int, list[ConvSite]] = {}
    for site in sites:
        by_input.setdefault(id(site.input), []).append(site)
    records = []
    for group in by_input.values():
        x = group[0].input
        act_scale = float(max(stats[x.name].percentile(percentile), 1e-8) / QMAX)
        errors = [_quantize(graph, site) for site in group]
        activation_qdq(graph, x, group, act_scale)
        records.append({"input": x.name, "sites": [s.name for s in group], "activation_scale": act_scale,
                        "weight_error": round(max(errors), 5), "smooth_alpha": 0.0})
    return records


def _quantize(graph: ir.Graph, site: ConvSite) -> float:
    """Give the site its int8 weight and metadata; the largest weight error relative to max |W|."""
    q, scale = quantize_weight(site.weight, site.axis)
    shape = [1] * 4
    shape[site.axis] = -1
    error = float(np.abs(q * scale.reshape(shape) - site.weight).max() / max(np.abs(site.weight).max(), 1e-12))
    read_dequantized(graph, site.node, site.node.inputs[1].name or site.node.name, q, scale, {"axis": site.axis})
    site.node.metadata_props[META] = json.dumps(
        {"mode": "w8a8", "site": site.name, "role": "conv", "block": None, "bits": 8, "per_channel": True},
        sort_keys=True)
    return error
