"""Trace -> passes -> artifact -> runtime reproduces torch, with dims that are really dynamic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import runtime
from models import registry
from optimizer import optimize

SHAPES = [(1, 7), (3, 19)]  # (batch, sequence); neither is the (2, 16) the trace was made at


def _check(name: str, tmp_path, atol: float = 1e-4):
    spec = registry.get(name)
    module = spec.build()
    art = optimize(name, passes=["cleanup"], output=tmp_path / name)
    session = runtime.load(art.path)
    for batch, seq in SHAPES:
        feeds = spec.example_inputs(batch, seq)
        with torch.no_grad():
            expected = module(**feeds)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run({k: v.numpy() for k, v in feeds.items()})
        for out_name, want in zip(spec.output_names, expected):
            np.testing.assert_allclose(got[out_name], want.numpy(), atol=atol, rtol=0, err_msg=f"{name}/{out_name} at {batch}x{seq}")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert", "tiny-vit"])
def test_reference_models_end_to_end(name, tmp_path):
    _check(name, tmp_path)


@pytest.mark.slow
def test_minilm_end_to_end(tmp_path):
    _check("minilm", tmp_path)


@pytest.mark.slow
def test_minilm_padding_is_respected(tmp_path):
    """A padded batch gives each sentence the embedding it has alone (the mask is live)."""
    spec = registry.get("minilm")
    tok = spec.tokenizer()
    session = optimize("minilm", output=tmp_path / "m").load()
    texts = ["A short one.", "A considerably longer sentence that needs more tokens than the first."]
    batch = tok(texts, padding=True, return_tensors="np")
    feeds = {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    together = session.run(feeds)["sentence_embedding"]
    alone = tok(texts[:1], return_tensors="np")
    single = session.run({k: alone[k].astype(np.int64) for k in ("input_ids", "attention_mask")})["sentence_embedding"]
    np.testing.assert_allclose(together[0], single[0], atol=1e-5)
