"""What the feature cache saves on a stream: block evaluations, and the accuracy it costs.

``carve eval DIR --stream N`` builds a stream of nearly identical frames from held-out images
(each scene is one photo crop shown for ``scene`` frames with small sensor-like noise, then a cut
to the next photo), runs it through ``runtime.stream.StreamSession`` (the feature cache's state
carried across calls) and through the plain source trace, and reports how often the model after
the cached block ran, the block evaluations against running every block on every frame, and
the mean per-frame correlation of the main output (the saliency map for ``vit-s``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.errors import CarveError

NOISE = 0.01  # normalised pixel units: a still camera's frame-to-frame noise


def stream_frames(size: int, frames: int, scene: int, seed: int = 0) -> np.ndarray:
    """``frames`` frames ``[n, 3, size, size]``: scenes of ``scene`` noisy copies of held-out crops."""
    from models import data

    photos = data.images("eval", size=size, n=max(1, -(-frames // scene)))
    rng = np.random.default_rng(seed)
    picks = [photos[i // scene % len(photos)] for i in range(frames)]
    return np.stack([p + NOISE * rng.standard_normal(p.shape).astype(np.float32) for p in picks])


def eval_stream(artifact: str, frames: int, scene: int) -> dict[str, Any]:
    import runtime
    from optimizer.evaluate import reference_runner
    from runtime.manifest import read_manifest
    from runtime.stream import StreamSession

    manifest = read_manifest(artifact)
    record = next((p for p in manifest.get("passes", []) if p["name"] == "feature_cache"), None)
    if record is None:
        raise CarveError(f"{artifact} was not made with the feature_cache pass; --stream measures that pass.")
    session = runtime.load(artifact)
    pixels = next(i for i in manifest["inputs"] if i["name"] == "pixel_values")
    stream = StreamSession(session)
    reference = reference_runner(manifest)
    main = stream.outputs[0]
    corrs = []
    for frame in stream_frames(int(pixels["shape"][-1]), frames, scene):
        got = stream.run({"pixel_values": frame[None]})[main]
        ref = reference({"pixel_values": frame[None]})[main]
        corrs.append(float(np.corrcoef(got.ravel(), ref.ravel())[0, 1]))
    details = record["details"]
    blocks, kept = details["blocks"], details["after"] + 1
    evaluations = frames * kept + stream.recomputed * (blocks - kept)
    return {"frames": frames, "scene": scene, "recomputed": stream.recomputed, "threshold": details["threshold"],
            "block_evaluations": evaluations, "block_evaluations_without_cache": frames * blocks,
            "evaluation_ratio": frames * blocks / evaluations, "output": main,
            "correlation_mean": float(np.mean(corrs)), "correlation_min": float(np.min(corrs))}


def format_stream(r: dict[str, Any]) -> str:
    return (f"stream of {r['frames']} frames ({r['scene']} per scene, noise {NOISE}): the model after the cached block "
            f"ran {r['recomputed']} times (threshold {r['threshold']:.4g})\n"
            f"  block evaluations      {r['block_evaluations']} of {r['block_evaluations_without_cache']} "
            f"({r['evaluation_ratio']:.2f}x fewer)\n"
            f"  {r['output']} correlation with the original: mean {r['correlation_mean']:.5f}, min {r['correlation_min']:.5f}")
