"""ONNX element types as torch dtypes, and onnx_ir tensors as torch tensors.

Cases: the numeric and bool types map one to one; int4/uint4 (stored one value per byte by
``onnx_ir``'s numpy view) become int8/uint8 tensors holding the same values; float8 types
become torch's float8 dtypes where this torch has them (their bytes reinterpreted, not
converted). A type torch lacks raises ``KeyError`` naming it, which the lowering reports.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

_BY_IR = {
    ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16, ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.DOUBLE: torch.float64, ir.DataType.INT8: torch.int8, ir.DataType.UINT8: torch.uint8,
    ir.DataType.INT16: torch.int16, ir.DataType.INT32: torch.int32, ir.DataType.INT64: torch.int64,
    ir.DataType.BOOL: torch.bool, ir.DataType.INT4: torch.int8, ir.DataType.UINT4: torch.uint8,
}
for _name, _torch_name in (("UINT16", "uint16"), ("UINT32", "uint32"), ("UINT64", "uint64"),
                           ("FLOAT8E4M3FN", "float8_e4m3fn"), ("FLOAT8E5M2", "float8_e5m2"),
                           ("FLOAT8E4M3FNUZ", "float8_e4m3fnuz"), ("FLOAT8E5M2FNUZ", "float8_e5m2fnuz")):
    if hasattr(torch, _torch_name):
        _BY_IR[getattr(ir.DataType, _name)] = getattr(torch, _torch_name)

# ONNX's integer codes (Cast's ``to``) as torch dtypes.
TORCH_DTYPES = {int(k): v for k, v in _BY_IR.items()}
_FLOAT8 = {torch.float8_e4m3fn, torch.float8_e5m2} | {getattr(torch, n) for n in ("float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n)}


def torch_dtype(dtype: ir.DataType) -> torch.dtype:
    if dtype not in _BY_IR:
        raise KeyError(f"element type {dtype.name} has no torch equivalent")
    return _BY_IR[dtype]


def to_torch(tensor) -> torch.Tensor:
    """An onnx_ir tensor (or anything with ``.dtype`` and ``.numpy()``) as a torch tensor it owns."""
    target = torch_dtype(tensor.dtype)
    array = tensor.numpy()
    if target in _FLOAT8:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint8).copy()).view(target)
    if tensor.dtype in (ir.DataType.INT4, ir.DataType.UINT4):
        array = array.astype(np.int8 if tensor.dtype == ir.DataType.INT4 else np.uint8)
    return torch.from_numpy(np.array(array, copy=True))
