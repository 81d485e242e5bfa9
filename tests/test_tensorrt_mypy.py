"""mypy checks the TensorRT modules against the tensorrt-stubs package (TensorRT 10.13's API).

TensorRT cannot run here, so the type checker is what catches a misspelt method, a removed API
(``execute_async_v2``) or a wrong argument type before a GPU machine does. The stubs are
mended into a temporary folder first (``typings/mend_tensorrt_stubs.py``). A second run on a
deliberately wrong snippet shows that the check can fail.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["optimizer/lower/tensorrt_build.py", "optimizer/lower/tensorrt_engines.py",
           "optimizer/lower/tensorrt.py", "runtime/trt_backend.py"]
WRONG = '''
import tensorrt as trt

def run(context: trt.IExecutionContext, stream: int) -> None:
    context.execute_async_v2([], stream)

def configure(config: trt.IBuilderConfig) -> None:
    config.set_flag(trt.BuilderFlag.NOT_A_FLAG)
'''


@pytest.fixture(scope="module")
def stubs(tmp_path_factory) -> Path:
    if importlib.util.find_spec("mypy") is None:
        pytest.fail("mypy is not installed; `make setup` installs the dev extra.")
    sys.path.insert(0, str(ROOT / "typings"))
    try:
        from mend_tensorrt_stubs import write_stubs
    finally:
        sys.path.pop(0)
    folder = tmp_path_factory.mktemp("typings")
    assert write_stubs(folder) == 5  # four parameters named `in`, one `channel_axis` without a default
    return folder


def _mypy(stubs: Path, files: list[str], cache: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "typings" / "mypy.ini"),
               "--cache-dir", str(cache), *files]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={"MYPYPATH": str(stubs), "PATH": ""})


def test_tensorrt_modules_type_check(stubs, tmp_path):
    result = _mypy(stubs, MODULES, tmp_path / "cache")
    assert result.returncode == 0, result.stdout + result.stderr


def test_misuse_of_the_tensorrt_api_is_caught(stubs, tmp_path):
    wrong = tmp_path / "wrong.py"
    wrong.write_text(WRONG)
    result = _mypy(stubs, [str(wrong)], tmp_path / "cache")
    assert result.returncode == 1
    assert '"IExecutionContext" has no attribute "execute_async_v2"' in result.stdout
    assert "NOT_A_FLAG" in result.stdout
