"""Make the ``tensorrt-stubs`` package usable by mypy: a mended copy in a stub folder.

``tensorrt-stubs`` (MIT licence, PyPI; installed at set-up with ``pip install --no-deps``
because it declares a dependency on ``tensorrt`` itself) ships ``tensorrt/__init__.pyi`` and
``tensorrt_bindings/{__init__,tensorrt}.pyi``. Two kinds of line in ``tensorrt.pyi`` do not
parse: parameters named ``in`` (a keyword), renamed ``in_``; and ``channel_axis: int``
without a default after defaulted parameters, given ``= ...``. The copy goes to the folder
given on the command line (default ``build/typings``), for ``MYPYPATH``.

    python typings/mend_tensorrt_stubs.py [OUT]
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

FILES = ("tensorrt/__init__.pyi", "tensorrt_bindings/__init__.pyi", "tensorrt_bindings/tensorrt.pyi")
_IN_PARAM = re.compile(r"([(,]\s*)in(\s*:)")
_CHANNEL_AXIS = re.compile(r"(, channel_axis: int)(\))")


def mend(text: str) -> tuple[str, int]:
    """The stub text with its unparsable lines mended, and how many lines changed."""
    lines, changed = [], 0
    for line in text.splitlines(keepends=True):
        new = line
        if line.lstrip().startswith("def "):
            new = _IN_PARAM.sub(r"\1in_\2", new)
            new = _CHANNEL_AXIS.sub(r"\1 = ...\2", new)
        changed += new != line
        lines.append(new)
    return "".join(lines), changed


def write_stubs(out: Path) -> int:
    """Copy the installed stubs into ``out``, mended; returns the number of lines changed."""
    try:
        dist = metadata.distribution("tensorrt-stubs")
    except metadata.PackageNotFoundError:
        raise SystemExit("tensorrt-stubs is not installed; run `pip install --no-deps tensorrt-stubs==10.13.0.35.1`.")
    changed = 0
    for name in FILES:
        source = Path(str(dist.locate_file(name)))
        text, count = mend(source.read_text())
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        changed += count
    return changed


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "build/typings")
    print(f"wrote mended TensorRT stubs to {folder} ({write_stubs(folder)} lines mended)")
