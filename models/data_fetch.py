"""Set-up step: copy gensim's test-data text files into carve's cache.

gensim's wheel (28 MB, compiled) ships ``gensim/test/test_data/lee_background.cor`` (the Lee
news corpus) and ``pang_lee_polarity.cor`` (labelled movie-review sentences). carve needs only
those two files, so it neither installs nor imports gensim: ``python -m models.data fetch`` asks
pip to download one pinned wheel (``pip download --no-deps``; pip's own configuration and index
apply), reads the two files out of the zip and writes them, checked against pinned sha256
digests, into ``models.cache.cache_dir("data")``. An installed gensim or a wheel given with
``--wheel`` is used instead when present. Loaders never fetch: they raise ``ModelLoadError``
naming this command when a file is missing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from models.cache import cache_dir
from runtime.errors import ModelLoadError

GENSIM_VERSION = "4.4.0"
MEMBER_DIR = "gensim/test/test_data/"
FILES = {
    "lee_background.cor": "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    "pang_lee_polarity.cor": "662c1b7c3bd0612eaaaf3f0c694cbd3897e30c0d87d2940b46c9fd0d15ed70c1",
}
# One fixed wheel whatever the host: the files are identical in every build, and pinning the
# tags makes the download the same bytes everywhere.
PIP_TAGS = ["--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
            "--implementation", "cp", "--abi", "cp311"]
FETCH_HINT = "run `python -m models.data fetch` once (set-up) to copy it from the gensim wheel"


def data_dir() -> Path:
    return cache_dir("data")


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def read_cached(name: str) -> bytes:
    """The bytes of a fetched file, checked against its pinned digest."""
    path = data_dir() / name
    if not path.is_file():
        raise ModelLoadError(f"The data file {name} is not in carve's cache ({path.parent}); "
                             f"{FETCH_HINT}.")
    blob = path.read_bytes()
    if _sha256(blob) != FILES[name]:
        raise ModelLoadError(f"The cached data file {path} is corrupt (its sha256 differs); "
                             f"delete it and {FETCH_HINT}.")
    return blob


def missing() -> list[str]:
    """Names of the files not yet (or not correctly) in the cache."""
    out = []
    for name, digest in FILES.items():
        path = data_dir() / name
        if not path.is_file() or _sha256(path.read_bytes()) != digest:
            out.append(name)
    return out


def _write_atomic(path: Path, blob: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _store(name: str, blob: bytes, origin: str) -> None:
    if _sha256(blob) != FILES[name]:
        raise ModelLoadError(f"{name} in {origin} does not match the pinned sha256; "
                             f"use gensim {GENSIM_VERSION}'s wheel.")
    _write_atomic(data_dir() / name, blob)


def from_wheel(wheel: Path) -> None:
    """Copy the files out of a gensim wheel (a zip) into the cache."""
    try:
        with zipfile.ZipFile(wheel) as z:
            blobs = {name: z.read(MEMBER_DIR + name) for name in FILES}
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise ModelLoadError(f"Could not read gensim's test data from {wheel} ({e}); "
                             f"pass a gensim {GENSIM_VERSION} wheel.") from None
    for name, blob in blobs.items():
        _store(name, blob, str(wheel))


def from_installed() -> bool:
    """Copy the files from an installed gensim, if there is one with matching files."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        return False
    folder = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"
    blobs = {n: (folder / n).read_bytes() for n in FILES if (folder / n).is_file()}
    if len(blobs) != len(FILES) or any(_sha256(b) != FILES[n] for n, b in blobs.items()):
        return False
    for name, blob in blobs.items():
        _store(name, blob, str(folder))
    return True


def download_wheel(dest: Path) -> Path:
    """``pip download`` the pinned gensim wheel into ``dest`` and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", f"gensim=={GENSIM_VERSION}", "--no-deps",
           "--only-binary=:all:", *PIP_TAGS, "--quiet", "--dest", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("gensim-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ModelLoadError(f"pip could not download the gensim {GENSIM_VERSION} wheel "
                             f"({tail[0]}); check access to PyPI or pass --wheel FILE.")
    return wheels[0]


def fetch(wheel: Path | None = None) -> Path:
    """Make sure both files are in the cache; return the cache folder.

    Order: files already cached and intact; ``wheel`` if given; an installed gensim; else a
    pinned wheel downloaded with pip into a temporary folder that is removed afterwards.
    """
    if wheel is not None:
        from_wheel(Path(wheel))
    elif missing() and not from_installed():
        with tempfile.TemporaryDirectory(prefix="carve-gensim-") as tmp:
            from_wheel(download_wheel(Path(tmp)))
    return data_dir()
