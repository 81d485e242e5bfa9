"""What reuse across calls saves on a stream: block evaluations, wall time, and the accuracy it costs.

``carve eval DIR --stream N`` builds a stream of nearly identical frames and runs it through
``runtime.stream.StreamSession`` (the artifact's state carried across calls) and through the
plain source trace, frame by frame in one loop (both warmed up first), and reports:
- how much was reused: for ``feature_cache``, how often the model after the cached block ran;
  for ``prune_tokens:mode=frames``, the token-block evaluations skipped (dropped tokens times the
  blocks they skip, from the artifact's counter with a threshold, from the record's K without);
- token-block evaluations against running every block on every token of every frame (and, for
  the feature cache, whole-block evaluations);
- the mean and worst per-frame correlation of the main output (the saliency map for ``vit-s``)
  with the original's, and the two total wall times and their ratio.
``refresh=N`` drops the carried state every N frames (``StreamSession(refresh=N)``).

Streams: ``scenes`` (the default): each scene is one held-out photo crop shown for ``scene``
frames with small sensor-like noise, then a cut to the next photo; ``moving``: a still photo
with a patch of another photo moving a few pixels per frame (``models.data.frame_stream``).
"""

from __future__ import annotations

import time
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


def _reuse_record(artifact: str, manifest: dict[str, Any]) -> dict[str, Any]:
    for record in manifest.get("passes", []):
        if record["name"] == "feature_cache":
            return record
        if record["name"] == "prune_tokens" and record["details"].get("mode") == "frames":
            return record
    raise CarveError(f"{artifact} was made with neither feature_cache nor "
                     "prune_tokens:mode=frames; --stream measures reuse across calls, which those passes add.")


def _state_tokens(manifest: dict[str, Any]) -> int:
    """The token count N, from the state input's ``[batch, N, hidden]`` shape."""
    spec = next(i for i in manifest["inputs"] if i["name"] in ("feature_cache.residual", "prune_tokens_previous_frame"))
    return int(spec["shape"][1])


def eval_stream(artifact: str, frames: int, scene: int, source: str = "scenes", refresh: int = 0) -> dict[str, Any]:
    import runtime
    from optimizer.evaluate import reference_runner
    from runtime.manifest import read_manifest
    from runtime.stream import StreamSession

    if frames < 1 or scene < 1 or refresh < 0:
        raise CarveError(f"--stream needs at least 1 frame, --scene at least 1 and --refresh at least 0 (0: never); "
                         f"got {frames}, {scene} and {refresh}.")
    manifest = read_manifest(artifact)
    record = _reuse_record(artifact, manifest)
    pixels = next(i for i in manifest["inputs"] if i["name"] == "pixel_values")
    clip = _frames(source, int(pixels["shape"][-1]), frames, scene)
    stream = StreamSession(runtime.load(artifact), refresh=refresh)
    reference = reference_runner(manifest)
    main = stream.outputs[0]
    stream.run({"pixel_values": clip[:1]}), reference({"pixel_values": clip[:1]})  # warm-up
    stream.reset()
    stream.calls = stream.recomputed = stream.token_blocks_saved = 0
    corrs, seconds, reference_seconds = [], 0.0, 0.0
    for frame in clip:
        start = time.perf_counter()
        got = stream.run({"pixel_values": frame[None]})[main]
        middle = time.perf_counter()
        ref = reference({"pixel_values": frame[None]})[main]
        seconds, reference_seconds = seconds + middle - start, reference_seconds + time.perf_counter() - middle
        corrs.append(float(np.corrcoef(got.ravel(), ref.ravel())[0, 1]))
    result = {"pass": record["name"], "source": source, "frames": frames, "scene": scene, "refresh": refresh,
              "output": main, "correlation_mean": float(np.mean(corrs)), "correlation_min": float(np.min(corrs)),
              "seconds": seconds, "reference_seconds": reference_seconds, "time_ratio": reference_seconds / seconds}
    result.update(_evaluations(record, stream, frames, _state_tokens(manifest)))
    return result


def _frames(source: str, size: int, frames: int, scene: int) -> np.ndarray:
    if source == "moving":
        from models import data

        return data.frame_stream(frames, size=size)[0]
    if source != "scenes":
        raise CarveError(f"unknown stream {source!r}; give scenes or moving.")
    return stream_frames(size, frames, scene)


def _evaluations(record: dict[str, Any], stream: Any, frames: int, tokens: int) -> dict[str, Any]:
    details = record["details"]
    if record["name"] == "feature_cache":
        blocks, kept = details["blocks"], details["after"] + 1
        evaluations = frames * kept + stream.recomputed * (blocks - kept)
        saved = (frames * blocks - evaluations) * tokens
        out = {"recomputed": stream.recomputed, "threshold": details["threshold"], "block_evaluations": evaluations,
               "block_evaluations_without_cache": frames * blocks, "evaluation_ratio": frames * blocks / evaluations}
    else:
        blocks = len(details["flops"]["blocks"])
        stage = details["stages"][0]
        if isinstance(stage["tokens"], int):  # a static K: every frame drops N - K tokens
            saved = frames * (tokens - stage["tokens"]) * (blocks - stage["block"])
        else:
            saved = stream.token_blocks_saved
        out = {"fill": details.get("fill"), "after": stage["block"], "threshold": _threshold(record)}
    total = frames * tokens * blocks
    return out | {"tokens": tokens, "blocks": blocks, "token_block_evaluations": total - saved,
                  "token_block_evaluations_without_reuse": total, "token_block_ratio": total / (total - saved),
                  "saved_fraction": saved / total}


def _threshold(record: dict[str, Any]) -> float | None:
    value = (record.get("options") or {}).get("threshold")
    return None if value is None else float(value)


def format_stream(r: dict[str, Any]) -> str:
    what = (f"scenes of {r['scene']} frames, noise {NOISE}" if r["source"] == "scenes"
            else "a patch moving over a still photo")
    refresh = f", state dropped every {r['refresh']} frames" if r.get("refresh") else ""
    lines = [f"stream of {r['frames']} frames ({what}) through {r['pass']}{refresh}"]
    if r["pass"] == "feature_cache":
        lines.append(f"  the model after the cached block ran {r['recomputed']} times (threshold {r['threshold']:.4g})")
        lines.append(f"  block evaluations      {r['block_evaluations']} of {r['block_evaluations_without_cache']} "
                     f"({r['evaluation_ratio']:.2f}x fewer)")
    else:
        lines.append(f"  frames mode, fill={r['fill']}, gather at block {r['after']}, threshold {r['threshold']}")
    lines.append(f"  token-block evaluations {r['token_block_evaluations']} of {r['token_block_evaluations_without_reuse']} "
                 f"({r['token_block_ratio']:.2f}x fewer, {100 * r['saved_fraction']:.1f}% saved)")
    lines.append(f"  {r['output']} correlation with the original: mean {r['correlation_mean']:.5f}, "
                 f"min {r['correlation_min']:.5f}")
    lines.append(f"  wall time {r['seconds']:.3f} s against {r['reference_seconds']:.3f} s for the plain trace "
                 f"({r['time_ratio']:.2f}x)")
    return "\n".join(lines)
