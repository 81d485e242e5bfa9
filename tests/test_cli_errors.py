"""Bad input through the CLI: one clear line on stderr, exit status 2, no traceback, nothing
half-written left behind."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from optimizer.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("carve: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert all(line.endswith(" ok") for line in lines[:-1]), err  # only finished-step progress
    assert "Traceback" not in err
    for needle in needles:
        assert needle in errors[0], errors[0]


def assert_nothing_written(parent: Path, name: str):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_missing_model_path(capsys, tmp_path):
    code, _, err = run_cli(capsys, "optimize", tmp_path / "nope" / "model.onnx", "-o", tmp_path / "out")
    assert_one_line_error(code, err, "does not exist")
    assert_nothing_written(tmp_path, "out")


def test_unknown_builtin_name(capsys, tmp_path):
    code, _, err = run_cli(capsys, "optimize", "no-such-model", "-o", tmp_path / "out")
    assert_one_line_error(code, err, "no-such-model")
    assert_nothing_written(tmp_path, "out")


def test_non_onnx_file(capsys, tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("these are not the weights you are looking for\n" * 20)
    code, _, err = run_cli(capsys, "optimize", bad, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "notes.onnx")
    assert_nothing_written(tmp_path, "out")


def test_truncated_onnx(capsys, tmp_path, tiny_onnx):
    data = tiny_onnx.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "optimize", cut, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "cut.onnx")
    assert_nothing_written(tmp_path, "out")


@pytest.mark.parametrize("spec, needle", [
    ("no_such_pass", "unknown pass 'no_such_pass'"),
    ("cleanup:colour=red", "has no option 'colour'"),
    ("cleanup:rounds=many", "rounds='many'"),
    ("cleanup:rounds=0", "rounds >= 1"),
    ("cleanup:rounds", "not key=value"),
])
def test_bad_pass_specs(capsys, tmp_path, tiny_onnx, spec, needle):
    code, _, err = run_cli(capsys, "optimize", tiny_onnx, "-o", tmp_path / "out", "--passes", spec)
    assert_one_line_error(code, err, needle)
    assert_nothing_written(tmp_path, "out")


def test_failing_pass_is_named_with_position(capsys, tmp_path, tiny_onnx):
    code, _, err = run_cli(capsys, "optimize", tiny_onnx, "-o", tmp_path / "out",
                           "--passes", "cleanup", "--passes", "cse;bogus")
    assert_one_line_error(code, err, "pass 3 of 3 (bogus)")


def test_unknown_target(capsys, tmp_path, tiny_onnx):
    code, _, err = run_cli(capsys, "optimize", tiny_onnx, "-o", tmp_path / "out", "--target", "abacus")
    assert_one_line_error(code, err, "abacus")


def test_output_dir_that_is_not_an_artifact(capsys, tmp_path, tiny_onnx):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("do not delete")
    code, _, err = run_cli(capsys, "optimize", tiny_onnx, "-o", out)
    assert_one_line_error(code, err, "not a carve artifact")
    assert (out / "thesis.txt").read_text() == "do not delete"


def _feeds(tmp_path, **arrays):
    args = []
    for name, value in arrays.items():
        np.save(tmp_path / f"{name}.npy", value)
        args += ["--input", f"{name}={tmp_path / (name + '.npy')}"]
    return args


def good_arrays(batch=2, seq=4):
    return {"ids": np.zeros((batch, seq), np.int64), "features": np.zeros((batch, seq, 16), np.float32)}


def test_run_works(capsys, tmp_path, tiny_artifact):
    code, out, err = run_cli(capsys, "run", tiny_artifact, *_feeds(tmp_path, **good_arrays()), "--save", tmp_path / "res")
    assert code == 0, err
    assert "hidden: float32 [2, 4, 16]" in out
    assert np.load(tmp_path / "res" / "hidden.npy").shape == (2, 4, 16)


@pytest.mark.parametrize("change, needle", [
    (lambda a: a.pop("features"), "'features' is missing"),
    (lambda a: a.update(extra=np.zeros(3, np.float32)), "no input 'extra'"),
    (lambda a: a.update(ids=a["ids"].astype(np.int32)), "dtype int32"),
    (lambda a: a.update(features=np.zeros((2, 4), np.float32)), "2 dimensions"),
    (lambda a: a.update(features=np.zeros((2, 4, 15), np.float32)), "size 15 on axis 2"),
    (lambda a: a.update(features=np.zeros((3, 4, 16), np.float32)), "dimension 'batch'"),
])
def test_run_bad_feeds(capsys, tmp_path, tiny_artifact, change, needle):
    arrays = good_arrays()
    change(arrays)
    code, _, err = run_cli(capsys, "run", tiny_artifact, *_feeds(tmp_path, **arrays), "--save", tmp_path / "res")
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "res").exists()


def test_run_input_not_npy(capsys, tmp_path, tiny_artifact):
    (tmp_path / "ids.npy").write_text("1,2,3")
    code, _, err = run_cli(capsys, "run", tiny_artifact, "--input", f"ids={tmp_path / 'ids.npy'}")
    assert_one_line_error(code, err, "not a readable .npy")


def test_artifact_with_one_byte_changed(capsys, tmp_path, tiny_artifact):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    model = art / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "run", art, *_feeds(tmp_path, **good_arrays()))
    assert_one_line_error(code, err, "does not match the sha256")


def test_artifact_missing_manifest(capsys, tmp_path, tiny_artifact):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    (art / "manifest.json").unlink()
    code, _, err = run_cli(capsys, "run", art, *_feeds(tmp_path, **good_arrays()))
    assert_one_line_error(code, err, "no manifest.json")


def test_artifact_truncated_file(capsys, tmp_path, tiny_artifact):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    model = art / "model.onnx"
    model.write_bytes(model.read_bytes()[:100])
    code, _, err = run_cli(capsys, "run", art, *_feeds(tmp_path, **good_arrays()))
    assert_one_line_error(code, err, "does not match the sha256")


def test_console_script_prints_no_traceback(tmp_path):
    """The installed entry point, in a fresh process, for one user mistake."""
    proc = subprocess.run([sys.executable, "-m", "optimizer.cli", "run", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("carve: error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("carve 0.")
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "examples:" in capsys.readouterr().out
