"""What TensorRT's ONNX parser imports: operators, opsets and data types, by TensorRT version.

Source: the operator support matrix of onnx-tensorrt (``docs/operators.md`` in
github.com/onnx/onnx-tensorrt, the parser TensorRT ships), as of TensorRT 10.15, "opset 9 to
opset 24"; 10.0 documented opset 9 to 20. Operators added during 10.x come from the same
repository's changelog and NVIDIA/TensorRT's CHANGELOG.md: ``Attention`` in 10.14;
``RotaryEmbedding``, ``RMSNormalization`` and ``TensorScatter`` in 10.15. TensorRT 11 keeps the
10.15 list (its precision builder flags and implicit calibration were removed, not operators).
Only default-domain operators are listed; other domains (``com.microsoft``) need plugins.
"""

from __future__ import annotations

Version = tuple[int, int]

DEFAULT_VERSION: Version = (10, 13)  # the version the tensorrt-stubs package describes

SUPPORTED = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos
Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand
EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow
HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not
OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round
STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size
Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu
Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split()) | {"Attention", "RotaryEmbedding", "RMSNormalization", "TensorScatter"}

# Operators that appeared after 10.0.
SINCE: dict[str, Version] = {"Attention": (10, 14), "RotaryEmbedding": (10, 15),
                             "RMSNormalization": (10, 15), "TensorScatter": (10, 15)}

# Inputs the parser needs as build-time constants (initializers or Constant outputs).
CONSTANT_INPUTS: dict[str, tuple[int, ...]] = {
    **{op: (1,) for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                           "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Squeeze", "Unsqueeze")},
    "TopK": (1,), "CumSum": (1,), "OneHot": (1,), "Dropout": (2,),
}

TOPK_MAX = 3840  # TopK's K must stay below TensorRT's limit


def max_opset(version: Version) -> int:
    """The newest ONNX opset carve emits for the parser of ``version``.

    10.15 and later document opset 24. Earlier 10.x document opset 20, but they list INT4
    DequantizeLinear, which exists only as opset 21's ``block_size`` form, so 21 is allowed.
    """
    return 24 if version >= (10, 15) else 21


def parse_version(text: str) -> Version:
    """'10.13' -> (10, 13); '11' -> (11, 0)."""
    try:
        parts = [int(p) for p in str(text).split(".")[:2]]
    except ValueError:
        parts = []
    if not parts or parts[0] not in (10, 11):
        from runtime.errors import PassError

        raise PassError(f"TensorRT version {text!r} is not one carve lowers for; give 10.x or 11.x, e.g. 10.13.")
    return (parts[0], parts[1] if len(parts) > 1 else 0)
