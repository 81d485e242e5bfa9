"""Evaluation of vision transformers (see ``optimizer.evaluate`` for what each metric means)."""

from __future__ import annotations

from typing import Any

import numpy as np

from models import data
from optimizer import metrics


def evaluate_vit(spec, reference, test, quick: bool) -> dict[str, Any]:
    from optimizer.evaluate import batched

    size = int(spec.example_inputs(1, 0)["pixel_values"].shape[-1])
    images = {"pixel_values": data.images("eval", size=size, n=8 if quick else 32)}
    result: dict[str, Any] = {"images": len(images["pixel_values"])}
    if "saliency" in spec.output_names:
        ref, new = batched(reference, images, "saliency"), batched(test, images, "saliency")
        result["saliency_correlation"] = metrics.saliency_correlation(ref, new)
    feature = "cls_embedding" if "cls_embedding" in spec.output_names else spec.output_names[-1]
    result.update(_faces_probe(reference, test, feature, size, quick))
    return result


def _faces_probe(reference, test, feature: str, size: int, quick: bool) -> dict[str, float]:
    from optimizer.evaluate import batched

    (train_x, train_y), (test_x, test_y) = data.faces("calib", size=size), data.faces("eval", size=size)
    if quick:
        train_x, train_y = _few_each(train_x, train_y, 10)
        test_x, test_y = _few_each(test_x, test_y, 10)
    scores = {}
    for label, run in (("reference", reference), ("artifact", test)):
        a = batched(run, {"pixel_values": train_x}, feature)
        b = batched(run, {"pixel_values": test_x}, feature)
        scores[label] = metrics.linear_probe_accuracy(a.reshape(len(a), -1), train_y, b.reshape(len(b), -1), test_y)
    return {"faces_probe_accuracy_reference": scores["reference"], "faces_probe_accuracy": scores["artifact"],
            "faces_probe_delta_points": 100 * (scores["artifact"] - scores["reference"])}


def _few_each(x: np.ndarray, y: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    pick = np.concatenate([np.flatnonzero(y == label)[:n] for label in np.unique(y)])
    return x[pick], y[pick]
