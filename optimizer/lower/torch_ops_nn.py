"""ONNX operators as torch functions: linear algebra, normalization, activations with
attributes, reductions, convolution, pooling and resizing.

Conventions as in ``optimizer.lower.torch_ops``. Cases worth knowing:
- reductions take ``axes`` as an input (opset 18+) or as an attribute (older opsets), with
  ``keepdims`` and ``noop_with_empty_axes``;
- ``Conv``/``ConvTranspose`` take explicit, asymmetric or ``auto_pad`` padding in 1-3 spatial
  dims (asymmetric pads are applied with ``F.pad`` first; transposed ones crop the output);
- ``Resize`` covers the modes torch's ``interpolate`` computes identically (``RESIZE_MODES``);
  ``validate_resize`` refuses the others when the module is built, not when it runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from optimizer.lower.torch_ops import align, ints


def matmul(a, b):
    return torch.matmul(*align(a, b))


def gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    a, b = (a.T if transA else a), (b.T if transB else b)
    out = alpha * (a @ b) if alpha != 1.0 else a @ b
    return out if c is None else out + (beta * c if beta != 1.0 else c)


def softmax(x, *, axis=-1):
    return torch.softmax(x, dim=axis)


def log_softmax(x, *, axis=-1):
    return torch.log_softmax(x, dim=axis)


def layer_norm(x, scale, bias=None, *, axis=-1, epsilon=1e-5, stash_type=1):
    axis %= x.dim()
    return F.layer_norm(x, x.shape[axis:], scale, bias, epsilon)


def rms_norm(x, scale, *, axis=-1, epsilon=1e-5, stash_type=1):
    dims = tuple(range(axis % x.dim(), x.dim()))
    return x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + epsilon) * scale


def gelu(x, *, approximate="none"):
    return F.gelu(x, approximate=approximate)


def leaky_relu(x, *, alpha=0.01):
    return F.leaky_relu(x, alpha)


def elu(x, *, alpha=1.0):
    return F.elu(x, alpha)


def hard_sigmoid(x, *, alpha=0.2, beta=0.5):
    return torch.clamp(alpha * x + beta, 0.0, 1.0)


def dropout(x, ratio=None, training_mode=None, *, seed=None):
    return x  # inference: Dropout is the identity (its mask output is refused by the builder)


def _reduce(fn):
    def op(x, axes=None, *, keepdims=1, noop_with_empty_axes=0):
        dims = ints(axes)
        if not dims:
            if noop_with_empty_axes:
                return x
            dims = list(range(x.dim()))
        return fn(x, [d % x.dim() for d in dims], bool(keepdims)) if x.dim() else fn(x, [], bool(keepdims))

    op.__name__ = f"reduce_{fn.__name__}"
    return op


def _sum(x, dims, keep):
    return torch.sum(x, dim=dims, keepdim=keep) if dims else x


def _mean(x, dims, keep):
    return torch.mean(x, dim=dims, keepdim=keep) if dims else x


def _max(x, dims, keep):
    return torch.amax(x, dim=dims, keepdim=keep) if dims else x


def _min(x, dims, keep):
    return torch.amin(x, dim=dims, keepdim=keep) if dims else x


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keep)
    return x


def _l2(x, dims, keep):
    return torch.sqrt(_sum(x * x, dims, keep))


def _l1(x, dims, keep):
    return _sum(x.abs(), dims, keep)


def _sum_square(x, dims, keep):
    return _sum(x * x, dims, keep)


def _log_sum_exp(x, dims, keep):
    return torch.logsumexp(x, dim=dims, keepdim=keep) if dims else x


def top_k(x, k, *, axis=-1, largest=1, sorted=1):
    values, indices = torch.topk(x, int(ints(k)[0]), dim=axis, largest=bool(largest), sorted=True)
    return values, indices


def _arg(fn):
    def op(x, *, axis=0, keepdims=1, select_last_index=0):
        if select_last_index:
            flipped = fn(x.flip(axis), dim=axis, keepdim=bool(keepdims))
            return x.shape[axis] - 1 - flipped
        return fn(x, dim=axis, keepdim=bool(keepdims))

    op.__name__ = f"onnx_{fn.__name__}"
    return op


def einsum(*xs, equation):
    return torch.einsum(equation, *align(*xs))


def _spatial_pads(x, kernel, strides, dilations, pads, auto_pad, transposed=False):
    """ONNX pads [b1, b2, ..., e1, e2, ...] for ``x``'s spatial dims, resolving ``auto_pad``."""
    n = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER") and not transposed:
        out = []
        for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
            out.append((total // 2, total - total // 2) if auto_pad == "SAME_UPPER" else (total - total // 2, total // 2))
        return [p[0] for p in out] + [p[1] for p in out]
    return list(pads) if pads else [0] * (2 * n)


def _symmetric(pads, n):
    return all(pads[i] == pads[i + n] for i in range(n))


def conv(x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None, strides=None):
    n = w.dim() - 2
    strides, dilations = strides or [1] * n, dilations or [1] * n
    pads = _spatial_pads(x, kernel_shape or w.shape[2:], strides, dilations, pads, auto_pad)
    if not _symmetric(pads, n):
        torch_pads = [p for i in range(n - 1, -1, -1) for p in (pads[i], pads[i + n])]
        x, pads = F.pad(x, torch_pads), [0] * (2 * n)
    fn = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return fn(x, w, b, stride=strides, padding=pads[:n], dilation=dilations, groups=group)


def conv_transpose(x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None,
                   output_padding=None, output_shape=None, pads=None, strides=None):
    n = w.dim() - 2
    strides, dilations = strides or [1] * n, dilations or [1] * n
    extra = output_padding or [0] * n
    pads = list(pads) if pads else [0] * (2 * n)
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    if _symmetric(pads, n):
        return fn(x, w, b, stride=strides, padding=pads[:n], output_padding=extra, groups=group, dilation=dilations)
    out = fn(x, w, b, stride=strides, padding=0, output_padding=extra, groups=group, dilation=dilations)
    for i in range(n):  # asymmetric pads crop the full output
        out = out.narrow(2 + i, pads[i], out.shape[2 + i] - pads[i] - pads[i + n])
    return out


def batch_norm(x, scale, bias, mean, var, *, epsilon=1e-5, momentum=0.9, training_mode=0):
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, epsilon)


def _pool(kind):
    def op(x, *, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0, dilations=None, kernel_shape, pads=None,
           storage_order=0, strides=None):
        n = len(kernel_shape)
        strides = strides or [1] * n
        pads = _spatial_pads(x, kernel_shape, strides, dilations or [1] * n, pads, auto_pad)
        if not _symmetric(pads, n):
            raise ValueError(f"{kind} pooling with asymmetric pads is not supported by the torch lowering")
        if kind == "max":
            fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
            return fn(x, kernel_shape, strides, pads[:n], dilations or 1, bool(ceil_mode))
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
        return fn(x, kernel_shape, strides, pads[:n], bool(ceil_mode), bool(count_include_pad))

    op.__name__ = f"{kind}_pool"
    return op


def global_average_pool(x):
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


# (mode, coordinate_transformation_mode, nearest_mode or None) -> (torch mode, align_corners)
RESIZE_MODES = {
    ("linear", "half_pixel"): ("linear", False), ("linear", "pytorch_half_pixel"): ("linear", False),
    ("linear", "align_corners"): ("linear", True), ("cubic", "half_pixel"): ("cubic", False),
    ("cubic", "align_corners"): ("cubic", True), ("nearest", "asymmetric"): ("nearest", None),
}


def validate_resize(attrs: dict) -> str | None:
    mode, ctm = attrs.get("mode", "nearest"), attrs.get("coordinate_transformation_mode", "half_pixel")
    if (mode, ctm) not in RESIZE_MODES:
        return f"Resize mode {mode!r} with coordinate_transformation_mode {ctm!r} is not supported"
    if mode == "nearest" and attrs.get("nearest_mode", "round_prefer_floor") != "floor":
        return "Resize nearest_mode other than 'floor' is not supported"
    if mode == "cubic" and attrs.get("cubic_coeff_a", -0.75) != -0.75:
        return "Resize cubic_coeff_a other than -0.75 is not supported"
    if attrs.get("antialias", 0) or attrs.get("exclude_outside", 0):
        return "Resize with antialias or exclude_outside is not supported"
    return None


def resize(x, roi=None, scales=None, sizes=None, *, mode="nearest", coordinate_transformation_mode="half_pixel",
           nearest_mode="round_prefer_floor", cubic_coeff_a=-0.75, antialias=0, exclude_outside=0,
           extrapolation_value=0.0, keep_aspect_ratio_policy="stretch", axes=None):
    kind, corners = RESIZE_MODES[(mode, coordinate_transformation_mode)]
    spatial = x.dim() - 2
    if kind != "nearest":
        kind = {1: "linear", 2: "bilinear", 3: "trilinear"}[spatial] if kind == "linear" else "bicubic"
    if sizes is not None and ints(sizes):
        return F.interpolate(x, size=ints(sizes)[2:], mode=kind, align_corners=corners)
    factors = [float(v) for v in scales.reshape(-1).tolist()][2:]
    return F.interpolate(x, scale_factor=factors, mode=kind, align_corners=corners, recompute_scale_factor=False)


OPS = {
    "MatMul": matmul, "Gemm": gemm, "Softmax": softmax, "LogSoftmax": log_softmax,
    "LayerNormalization": layer_norm, "RMSNormalization": rms_norm, "Gelu": gelu, "LeakyRelu": leaky_relu,
    "Elu": elu, "HardSigmoid": hard_sigmoid, "Dropout": dropout,
    "ReduceSum": _reduce(_sum), "ReduceMean": _reduce(_mean), "ReduceMax": _reduce(_max),
    "ReduceMin": _reduce(_min), "ReduceProd": _reduce(_prod), "ReduceL2": _reduce(_l2), "ReduceL1": _reduce(_l1),
    "ReduceSumSquare": _reduce(_sum_square), "ReduceLogSumExp": _reduce(_log_sum_exp),
    "TopK": top_k, "ArgMax": _arg(torch.argmax), "ArgMin": _arg(torch.argmin), "Einsum": einsum,
    "Conv": conv, "ConvTranspose": conv_transpose, "BatchNormalization": batch_norm,
    "MaxPool": _pool("max"), "AveragePool": _pool("average"), "GlobalAveragePool": global_average_pool,
    "Resize": resize,
}
MULTI_OUTPUT = {"TopK"}
VALIDATORS = {"Resize": validate_resize}
