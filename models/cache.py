"""Where carve keeps what it derives once and reuses: converted weights, traced graphs.

``$CARVE_CACHE`` if set, else ``~/.cache/carve``. Entries are written atomically (a temporary
name, then ``os.replace``) so a run that is cut off never leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("CARVE_CACHE") or Path.home() / ".cache" / "carve")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_key(*items: object) -> str:
    """A short stable hash of JSON-serialisable items (source, options, versions)."""
    blob = json.dumps(items, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]
