"""Shared fixtures: a cache directory kept between runs, and a small ONNX model on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("CARVE_CACHE", str(ROOT / ".carve-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _Tiny:
    """A two-input model: token embedding plus a float feature, a linear layer and a norm."""

    @staticmethod
    def build():
        import torch

        class Tiny(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.embed = torch.nn.Embedding(50, 16)
                self.proj = torch.nn.Linear(16, 16)
                self.norm = torch.nn.LayerNorm(16)

            def forward(self, ids, features):
                h = self.embed(ids) + features
                return self.norm(h + torch.relu(self.proj(h)))

        return Tiny().eval()


@pytest.fixture(scope="session")
def tiny_module():
    return _Tiny.build()


@pytest.fixture(scope="session")
def tiny_example():
    import torch

    torch.manual_seed(1)
    return {"ids": torch.randint(0, 50, (2, 5)), "features": torch.randn(2, 5, 16)}


TINY_AXES = {"ids": {0: "batch", 1: "sequence"}, "features": {0: "batch", 1: "sequence"}}


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_module, tiny_example) -> Path:
    import onnx_ir as ir

    from optimizer import trace

    model = trace(tiny_module, tiny_example, TINY_AXES, output_names=["hidden"])
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    ir.save(model, path)
    return path


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_onnx) -> Path:
    from optimizer import optimize

    out = tmp_path_factory.mktemp("art") / "tiny"
    optimize(str(tiny_onnx), output=out)
    return out
