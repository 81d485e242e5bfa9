"""Calibrating the feature cache's threshold on real images.

Each calibration scene is a held-out photo crop followed by copies with growing noise (the
changes a still camera sees, from sensor noise to a real change). For each copy the model is
run once (ONNX Runtime, with the chosen block's input and output as extra outputs): the copy's
residual change against the scene's first frame is what the criterion would see, and the
correlation of the copy's main output with the first frame's is what reusing would cost. The
threshold is the largest change below which every calibrated reuse kept ``min_corr``; the curve
(change, correlation) goes into the pass record.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from optimizer.structure_types import Block
from runtime.errors import PassError

NOISE = (0.0, 0.003, 0.01, 0.03, 0.1, 0.3)  # in normalised pixel units (ImageNet std ~ 1)


def calibrate(model: ir.Model, block: Block, ctx: Any, opts: Any) -> tuple[float, list[list[float]]]:
    frames = _scenes(model, ctx, opts.calib_frames)
    run = _runner(model, block)
    pairs = []
    with ctx.progress.step(f"calibrating the feature cache on {len(frames)} frames"):
        for scene in frames:
            first = run(scene[:1])
            for frame in scene[1:]:
                got = run(frame[None])
                pairs.append((_change(got[1] - got[0], first[1] - first[0]), _corr(got[2], first[2])))
    pairs.sort()
    threshold = 0.0
    for i, (change, corr) in enumerate(pairs):
        if corr < opts.min_corr:
            break
        following = pairs[i + 1][0] if i + 1 < len(pairs) else change * 1.5
        threshold = (change + following) / 2
    return float(threshold), [[round(c, 6), round(q, 6)] for c, q in pairs]


def _scenes(model: ir.Model, ctx: Any, n_frames: int) -> list[np.ndarray]:
    spec = ctx.calibration
    pixels = next((v for v in model.graph.inputs if v.name == "pixel_values"), None)
    if spec is None or getattr(spec, "family", None) != "vit" or pixels is None:
        raise PassError("feature_cache threshold=auto calibrates on images and this model is not a built-in vision "
                        "model; give the threshold, e.g. feature_cache:threshold=0.05.")
    from models import data

    size = int(pixels.shape[-1])
    scenes = max(1, n_frames // len(NOISE))
    rng = np.random.default_rng(0)
    out = []
    for image in data.images("calib", size=size, n=scenes):
        noise = rng.standard_normal((len(NOISE),) + image.shape).astype(np.float32)
        out.append(image[None] + np.asarray(NOISE, np.float32)[:, None, None, None] * noise)
    return out


def _runner(model: ir.Model, block: Block):
    import onnxruntime as ort

    copy = ir.from_proto(ir.to_proto(model))
    values = {v.name: v for node in copy.graph for v in node.outputs}
    values.update({v.name: v for v in copy.graph.inputs})
    main = copy.graph.outputs[0].name
    for name in (block.input, block.output):
        if values[name] not in copy.graph.outputs:
            copy.graph.outputs.append(values[name])
    session = ort.InferenceSession(ir.to_proto(copy).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [block.input, block.output, main]
    return lambda x: session.run(names, {"pixel_values": x})


def _change(residual: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(residual - reference).sum() / (np.abs(reference).sum() + 1e-12))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])
