"""Calibration: run a model over real data and collect statistics of chosen intermediate values.

``calibration_feeds(source, n)`` makes the feeds. Cases handled:
- a built-in name or a ``models.registry.ModelSpec`` of a text model (it has a tokenizer): the
  ``news`` calibration articles, tokenized, padded to the longest and cut at ``seq`` tokens;
  decoders without a pad token pad with their end-of-text token;
- a vision built-in: the ``images`` calibration crops at the model's own image size;
- a dict of arrays (one batch) or a list of such dicts: used as given, cut to ``n`` rows.

``collect(model, names, feeds)`` serializes the ``onnx_ir`` model with those values added as
graph outputs, runs ONNX Runtime batch by batch and folds every batch into a ``TensorStats``
per value, so memory holds one batch of outputs at a time (and, when the requested values of
one batch would pass ``max_bytes``, they are fetched in several passes). Statistics are over
the last axis as channels and over real tokens only: rows whose ``attention_mask`` is 0 are
left out when the value's leading axes are ``[batch, sequence]`` or their product.
Feeds are checked against the model's inputs first; a wrong name, dtype or rank is a
``PassError`` naming the input. ``gram=`` names values whose x^T x is also summed (for GPTQ). ``run_values(model, names, feeds)`` yields the values whole,
batch by batch, for statistics that keep more axes than the channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import onnx_ir as ir

from optimizer.progress import Progress
from runtime.errors import PassError

BINS = 2048


@dataclass
class Histogram:
    """A streaming histogram of |x| over ``[0, top)``; ``top`` doubles (bins merge) as needed."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))
    top: float = 0.0

    def add(self, magnitudes: np.ndarray) -> None:
        peak = float(magnitudes.max(initial=0.0))
        if self.top == 0.0:
            self.top = peak * 1.0001 if peak > 0 else 1e-30
        while peak >= self.top:
            self._double()
        idx = np.minimum((magnitudes * (BINS / self.top)).astype(np.int64), BINS - 1)
        self.counts += np.bincount(idx.ravel(), minlength=BINS)

    def _double(self) -> None:
        # Bins 2i and 2i+1 become bin i, so earlier batches stay exact at the coarser step.
        self.counts = np.concatenate([self.counts.reshape(-1, 2).sum(1), np.zeros(BINS // 2, np.int64)])
        self.top *= 2

    def percentile(self, p: float) -> float:
        """The magnitude below which ``p`` percent of the values lie (bin upper edge)."""
        total = int(self.counts.sum())
        if total == 0:
            return 0.0
        cum = np.cumsum(self.counts)
        i = int(np.searchsorted(cum, total * p / 100.0))
        return (min(i, BINS - 1) + 1) * self.top / BINS


@dataclass
class TensorStats:
    """Statistics of one value over every calibration row (rows = all axes but the last)."""

    name: str
    rows: int = 0
    minimum: float = math.inf
    maximum: float = -math.inf
    channel_absmax: np.ndarray | None = None
    channel_abssum: np.ndarray | None = None
    histogram: Histogram = field(default_factory=Histogram)
    sample: np.ndarray | None = None  # rows kept for error measurements (``keep_rows``)
    gram: np.ndarray | None = None  # sum of x^T x over all rows (``gram=`` names), float32

    @property
    def absmax(self) -> float:
        return max(abs(self.minimum), abs(self.maximum)) if self.rows else 0.0

    @property
    def channel_mean_abs(self) -> np.ndarray:
        return self.channel_abssum / max(self.rows, 1)

    def percentile(self, p: float) -> float:
        return self.histogram.percentile(p)

    def update(self, rows: np.ndarray, keep: int = 0) -> None:
        """Fold a ``[rows, channels]`` float array in; keep ``keep`` evenly spaced rows of it."""
        if rows.size == 0:
            return
        magnitudes = np.abs(rows)
        self.rows += rows.shape[0]
        self.minimum = min(self.minimum, float(rows.min()))
        self.maximum = max(self.maximum, float(rows.max()))
        peak, total = magnitudes.max(0), magnitudes.sum(0, dtype=np.float64)
        if self.channel_absmax is None:
            self.channel_absmax, self.channel_abssum = peak, total
        else:
            self.channel_absmax = np.maximum(self.channel_absmax, peak)
            self.channel_abssum = self.channel_abssum + total
        self.histogram.add(magnitudes)
        if keep > 0:
            picked = rows[np.linspace(0, len(rows) - 1, min(keep, len(rows))).astype(np.int64)]
            self.sample = picked if self.sample is None else np.concatenate([self.sample, picked])

    def add_gram(self, rows: np.ndarray) -> None:
        """Accumulate x^T x (the second moment second-order methods such as GPTQ need)."""
        product = (rows.T.astype(np.float64) @ rows.astype(np.float64)).astype(np.float32)
        self.gram = product if self.gram is None else self.gram + product


def zero_channels(stats: TensorStats, channels: np.ndarray) -> TensorStats:
    """The statistics the value would have with ``channels`` always 0 (totals from the kept sample)."""
    out = TensorStats(stats.name, rows=stats.rows, channel_absmax=stats.channel_absmax.copy(),
                      channel_abssum=stats.channel_abssum.copy())
    out.channel_absmax[channels] = 0.0
    out.channel_abssum[channels] = 0.0
    if stats.sample is not None:
        out.sample = stats.sample.copy()
        out.sample[:, channels] = 0.0
        out.minimum, out.maximum = float(out.sample.min()), float(out.sample.max())
        out.histogram.add(np.abs(out.sample))
    return out


def calibration_feeds(source: Any, n: int = 32, batch: int = 8, seq: int = 128,
                      split: str = "calib") -> list[dict[str, np.ndarray]]:
    """Batches of real calibration inputs for ``source`` (see the module docstring)."""
    if isinstance(source, dict):
        source = [source]
    if isinstance(source, list):
        return _given_feeds(source, n)
    spec = _spec_of(source)
    if spec.tokenizer is not None:
        return _text_feeds(spec, n, batch, seq, split)
    if spec.family == "vit":
        return _image_feeds(spec, n, batch, split)
    raise PassError(f"there is no calibration data for built-in model {spec.name!r}; give calibration feeds explicitly.")


def _spec_of(source: Any):
    from models import registry

    if isinstance(source, str):
        return registry.get(source)
    if hasattr(source, "example_inputs") and hasattr(source, "family"):
        return source
    raise PassError(f"cannot make calibration data from a {type(source).__name__}; give a built-in model name, "
                    "a dict of input arrays, or a list of such dicts.")


def _given_feeds(batches: list, n: int) -> list[dict[str, np.ndarray]]:
    out, rows = [], 0
    for feeds in batches:
        if not isinstance(feeds, dict) or not feeds:
            raise PassError("calibration data must be a dict of input arrays (or a list of them); got "
                            f"{type(feeds).__name__}.")
        arrays = {k: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v) for k, v in feeds.items()}
        size = len(next(iter(arrays.values())))
        take = min(size, n - rows)
        out.append({k: v[:take] for k, v in arrays.items()})
        rows += take
        if rows >= n:
            break
    return out


def _text_feeds(spec, n: int, batch: int, seq: int, split: str) -> list[dict[str, np.ndarray]]:
    from models import data

    tok = spec.tokenizer()
    if getattr(tok, "pad_token", "") is None:
        tok.pad_token = tok.eos_token
    texts = data.texts("news", split, n=n)
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=seq, return_tensors="np")
        out.append({"input_ids": enc["input_ids"].astype(np.int64),
                    "attention_mask": enc["attention_mask"].astype(np.int64)})
    return out


def _image_feeds(spec, n: int, batch: int, split: str) -> list[dict[str, np.ndarray]]:
    from models import data

    size = int(spec.example_inputs(1, 0)["pixel_values"].shape[-1])
    pixels = data.images(split, size=size, n=n)
    return [{"pixel_values": pixels[i:i + batch]} for i in range(0, len(pixels), batch)]


def complete_feeds(model: ir.Model, batches: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Text batches for a KV-cached decoder get an empty past and positions (a prefill), so the
    same calibration data serves the model before and after the ``kv_cache`` pass."""
    from optimizer.artifact import signature
    from runtime.kv import prefill_feeds

    inputs = signature(model.graph.inputs)
    return [prefill_feeds(inputs, feeds) for feeds in batches]


def check_calibration_feeds(model: ir.Model, batches: Sequence[dict[str, np.ndarray]]) -> None:
    """Raise ``PassError`` when a batch does not fit the model's inputs (names, dtype, rank, sizes)."""
    if not batches:
        raise PassError("no calibration data was given; give at least one batch of inputs.")
    inputs = {v.name: v for v in model.graph.inputs if v.name not in model.graph.initializers}
    for feeds in batches:
        missing = sorted(set(inputs) - set(feeds))
        extra = sorted(set(feeds) - set(inputs))
        if missing or extra:
            raise PassError(f"calibration data has inputs {sorted(feeds)} but the model takes {sorted(inputs)}; "
                            "give one array per model input.")
        for name, value in inputs.items():
            _check_array(name, np.asarray(feeds[name]), value)


def _check_array(name: str, array: np.ndarray, value: ir.Value) -> None:
    if value.dtype is not None and array.dtype != value.dtype.numpy():
        raise PassError(f"calibration input {name!r} has dtype {array.dtype} but the model expects "
                        f"{value.dtype.numpy()}; convert it.")
    if value.shape is None:
        return
    dims = list(value.shape)
    wrong = array.ndim != len(dims) or any(isinstance(d, int) and d != s for d, s in zip(dims, array.shape))
    if wrong:
        expected = "[" + ", ".join(str(d) for d in dims) + "]"
        raise PassError(f"calibration input {name!r} has shape {list(array.shape)} but the model expects "
                        f"{expected}; give calibration data shaped like the model's inputs.")


def collect(model: ir.Model, names: Sequence[str], batches: Iterable[dict[str, np.ndarray]],
            progress: Progress | None = None, keep_rows: int = 0,
            max_bytes: int = 1 << 30, gram: Sequence[str] = ()) -> dict[str, TensorStats]:
    """Statistics of the values ``names`` of ``model`` over ``batches`` (see module docstring)."""
    batches, names = complete_feeds(model, list(batches)), list(dict.fromkeys(names))
    check_calibration_feeds(model, batches)
    progress = progress or Progress()
    stats = {name: TensorStats(name) for name in names}
    keep = -(-keep_rows // len(batches)) if keep_rows else 0
    groups = _groups(model, list(names), batches[0], max_bytes)
    label = f"calibrating {len(names)} values on {sum(len(next(iter(b.values()))) for b in batches)} samples"
    with progress.step(label):
        for group in groups:
            run = _runner(model, group)
            for feeds in batches:
                mask = feeds.get("attention_mask")
                for name, array in zip(group, run(feeds)):
                    rows = _rows(array, mask)
                    stats[name].update(rows, keep)
                    if name in gram:
                        stats[name].add_gram(rows)
    return stats


def run_values(model: ir.Model, names: Sequence[str], batches: Iterable[dict[str, np.ndarray]]):
    """Yield, per batch, ``(feeds, {name: array})`` of the values ``names`` as ORT computes them
    (for statistics that need the full shape, such as per-head KV ranges)."""
    batches, names = complete_feeds(model, list(batches)), list(dict.fromkeys(names))
    check_calibration_feeds(model, batches)
    run = _runner(model, names)
    for feeds in batches:
        yield feeds, dict(zip(names, run(feeds)))


def _rows(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """``array`` as ``[rows, channels]`` float32, without padded tokens when that is decidable."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 0:
        return array.reshape(1, 1)
    if mask is not None and array.ndim >= 3 and array.shape[:2] == mask.shape:
        return array[mask.astype(bool)].reshape(-1, array.shape[-1])
    if mask is not None and array.ndim == 2 and array.shape[0] == mask.size:
        return array[mask.reshape(-1).astype(bool)]
    return array.reshape(-1, array.shape[-1])


def _groups(model: ir.Model, names: list[str], feeds: dict[str, np.ndarray], max_bytes: int) -> list[list[str]]:
    """Split ``names`` so that one batch's outputs of a group stay under ``max_bytes`` (estimated)."""
    values = _values_by_name(model)
    missing = [n for n in names if n not in values]
    if missing:
        raise PassError(f"the model has no value named {missing[0]!r} to calibrate; this is a bug in the pass, please report it.")
    rows = max((np.asarray(a).size for a in feeds.values()), default=1)
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        shape = values[name].shape
        width = int(shape[-1]) if shape is not None and len(shape) and isinstance(shape[-1], int) else 1
        size = 4 * rows * width
        if groups[-1] and used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def _values_by_name(model: ir.Model) -> dict[str, ir.Value]:
    values = {v.name: v for v in model.graph.inputs}
    for node in model.graph:
        values.update({v.name: v for v in node.outputs if v.name})
    return values


def _runner(model: ir.Model, names: list[str]):
    """A function feeds -> arrays of ``names``: graph inputs come from the feeds, the rest from ORT."""
    inputs = {v.name for v in model.graph.inputs}
    computed = [n for n in names if n not in inputs]
    session = _session(model, computed) if computed else None

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        got = dict(zip(computed, session.run(computed, feeds))) if session else {}
        return [feeds[n] if n in inputs else got[n] for n in names]

    return run


def _session(model: ir.Model, names: list[str]):
    """An ORT session of ``model`` that also returns ``names`` (the caller's model is not changed)."""
    import onnx
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model)
    present = {o.name for o in proto.graph.output}
    for name in names:
        if name not in present:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
