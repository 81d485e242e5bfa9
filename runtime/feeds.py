"""Checking a run's inputs against the artifact's signature before ONNX Runtime sees them.

Cases, each a ``FeedError`` with the remedy: a missing input, an input the model does not
have, a wrong dtype, a wrong rank, a static dimension of the wrong size, and a symbolic
dimension (``batch``, ``sequence``) given different sizes by different inputs.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from runtime.errors import FeedError


def check_feeds(feeds: Mapping[str, Any], inputs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    expected = {spec["name"]: spec for spec in inputs}
    missing = [name for name in expected if name not in feeds]
    if missing:
        raise FeedError(f"input {missing[0]!r} is missing; the model takes: {_signature(inputs)}.")
    unknown = [name for name in feeds if name not in expected]
    if unknown:
        raise FeedError(f"the model has no input {unknown[0]!r}; it takes: {_signature(inputs)}.")
    arrays = {name: np.asarray(value) for name, value in feeds.items()}
    sizes: dict[str, tuple[int, str]] = {}
    for name, spec in expected.items():
        _check_one(name, arrays[name], spec, sizes)
    return arrays


def _check_one(name: str, array: np.ndarray, spec: dict[str, Any], sizes: dict[str, tuple[int, str]]) -> None:
    if array.dtype.name != spec["dtype"]:
        raise FeedError(f"input {name!r} has dtype {array.dtype.name} but the model expects {spec['dtype']}; convert it (e.g. array.astype('{spec['dtype']}')).")
    shape = spec["shape"]
    if shape is None:
        return
    if array.ndim != len(shape):
        raise FeedError(f"input {name!r} has {array.ndim} dimensions {list(array.shape)} but the model expects {len(shape)} {_dims(shape)}.")
    for axis, (size, dim) in enumerate(zip(array.shape, shape)):
        if isinstance(dim, int) and size != dim:
            raise FeedError(f"input {name!r} has size {size} on axis {axis} but the model expects {dim} there {_dims(shape)}.")
        if isinstance(dim, str):
            seen = sizes.setdefault(dim, (size, name))
            if seen[0] != size:
                raise FeedError(f"dimension {dim!r} is {seen[0]} in input {seen[1]!r} but {size} in input {name!r}; inputs sharing a dimension must agree.")


def _dims(shape: list) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


def _signature(inputs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{s['name']} {s['dtype']}{_dims(s['shape']) if s['shape'] is not None else ''}" for s in inputs)
