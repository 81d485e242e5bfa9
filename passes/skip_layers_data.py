"""Layer skipping, part 2: where the calibration feeds come from.

The pass takes its decisions from real data when it can. ``calibration_batches(ctx, model,
samples)`` returns a list of feed batches and a line saying where they came from, trying in
order:

1. ``ctx.calibration`` (a field a future ``PassContext`` may carry; the quantize pass reads it
   too), then the module-level hook set with ``use_calibration(...)``; either may be a built-in
   model's name or ``models.registry.ModelSpec`` (its real calibration split is tokenized or
   loaded), a callable ``samples -> list of feed dicts``, a list of feed dicts, or one feed dict;
2. ``ctx.example_feeds`` (one batch; the built-ins' are random tokens, so say so in the record).

For a built-in spec: decoders read Shakespeare passages (``models.data.texts("shakespeare",
"calib")``), encoders news articles (``texts("news", "calib")``), both tokenized with the spec's
tokenizer to at most ``TEXT_TOKENS`` tokens; ViTs read ``models.data.images("calib")`` at the
spec's image size. Rows are grouped ``ROWS`` to a batch. Feeds that do not name exactly the
graph's inputs are rejected with a ``PassError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from runtime.errors import PassError

TEXT_TOKENS = 128
ROWS = 4

_HOOK: list[Any] = []  # a stack, so nested use_calibration blocks restore the outer source


@contextlib.contextmanager
def use_calibration(source: Any) -> Iterator[None]:
    """Within the block, skip_layers calibrates on ``source`` (a spec, callable, or feeds)."""
    _HOOK.append(source)
    try:
        yield
    finally:
        _HOOK.pop()


def calibration_batches(ctx: Any, model: ir.Model, samples: int) -> tuple[list[dict[str, np.ndarray]], str]:
    """Feed batches for calibration and a short description of their origin."""
    source = getattr(ctx, "calibration", None)
    if source is None and _HOOK:
        source = _HOOK[-1]
    if source is not None:
        batches, origin = _from_source(source, samples)
    elif getattr(ctx, "example_feeds", None):
        batches, origin = [dict(ctx.example_feeds)], "the pipeline's example feeds (no calibration data was given)"
    else:
        raise PassError("skip_layers needs calibration data, but none was given and the model has no example "
                        "inputs; optimize a built-in model or pass example_inputs.")
    batches = [{k: np.asarray(v.detach().cpu() if hasattr(v, "detach") else v) for k, v in b.items()} for b in batches]
    from optimizer.calibrate import complete_feeds

    batches = complete_feeds(model, batches)
    _check_names(batches, model)
    return batches, origin


def spec_batches(spec: Any, samples: int, rows: int = ROWS) -> list[dict[str, np.ndarray]]:
    """The calibration split of a built-in model's own data, in batches of ``rows``."""
    if spec.family == "vit":
        from models import data

        size = int(spec.example_inputs(1, 0)["pixel_values"].shape[-1])
        pixels = data.images("calib", size=size, n=samples)
        return [{"pixel_values": pixels[i:i + rows]} for i in range(0, len(pixels), rows)]
    texts = _texts(spec.family, samples)
    tok = spec.tokenizer()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # decoders (SmolLM2) ship without a pad token
    from optimizer.eval_text import encode

    return [encode(tok, texts[i:i + rows], TEXT_TOKENS) for i in range(0, len(texts), rows)]


def _texts(family: str, samples: int) -> list[str]:
    from models import data

    # Decoders are scored on next-token distributions over prose; encoders on articles.
    return data.texts("shakespeare" if family == "decoder" else "news", "calib", n=samples)


def _from_source(source: Any, samples: int) -> tuple[list[dict[str, np.ndarray]], str]:
    if isinstance(source, str):  # a built-in model's name, as the quantize pass also accepts
        from models import registry

        source = registry.get(source)
    if hasattr(source, "family") and hasattr(source, "example_inputs"):
        return spec_batches(source, samples), f"{source.name} calibration split ({samples} samples)"
    if callable(source):
        return list(source(samples)), "calibration feeds from the caller"
    if isinstance(source, dict):
        return [source], "calibration feeds from the caller (one batch)"
    return list(source), "calibration feeds from the caller"


def _check_names(batches: list[dict[str, np.ndarray]], model: ir.Model) -> None:
    wanted = {v.name for v in model.graph.inputs}
    if not batches:
        raise PassError("skip_layers was given no calibration batches; give at least one feed dict.")
    for batch in batches:
        if set(batch) != wanted:
            raise PassError(f"skip_layers calibration feeds name {sorted(batch)} but the model's inputs are "
                            f"{sorted(wanted)}; give feeds for exactly the model's inputs.")
