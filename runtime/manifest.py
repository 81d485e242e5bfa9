"""The artifact's manifest: reading it and verifying every file against its sha256.

An artifact is a directory holding ``manifest.json`` and the files it lists (``model.onnx``,
its external data, engines). The manifest records the format and its version, the carve
version, the source model, the target, the input/output signature with symbolic shapes, every
pass with its options and what it changed, and the sha256 of every other file. Loading refuses
a directory whose manifest is missing or unreadable, or whose files do not match their hashes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from runtime.errors import ArtifactError

FORMAT = "carve-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not an artifact directory; give the -o directory of `carve optimize`.")
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} has no {MANIFEST}, so it is not a complete carve artifact; run `carve optimize` again.")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{path} is not valid JSON; the artifact is damaged, run `carve optimize` again.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a carve manifest; give the directory written by `carve optimize`.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{directory} has artifact format version {manifest.get('format_version')}, this carve reads "
            f"version {FORMAT_VERSION}; re-run `carve optimize` with this version."
        )
    return manifest


def verify_files(directory: str | Path, manifest: dict[str, Any]) -> None:
    """Check every file the manifest lists exists and has the recorded sha256."""
    directory = Path(directory)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{directory / MANIFEST} lists no files; the artifact is damaged, run `carve optimize` again.")
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing from the artifact; run `carve optimize` again.")
        if sha256_file(path) != expected.get("sha256"):
            raise ArtifactError(f"{path} does not match the sha256 in its manifest (changed or truncated); run `carve optimize` again.")
