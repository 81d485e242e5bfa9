"""carve's minimal runtime: load an artifact and run it. Imports no torch (but in its torch backend)."""

from __future__ import annotations

from pathlib import Path

from runtime.errors import ArtifactError, CarveError, FeedError
from runtime.session import Session

__all__ = ["load", "Session", "CarveError", "ArtifactError", "FeedError"]


def load(path: str | Path, threads: int | None = None, verify: bool = True) -> Session:
    """Open the artifact directory ``path`` (written by ``carve optimize``) for running."""
    return Session(path, threads=threads, verify=verify)
