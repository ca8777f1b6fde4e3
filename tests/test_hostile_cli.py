"""Hostile inputs to the ``qjax`` command: every failure is one line and a documented code.

Classes (issue 11 item 9, issue 10 CLI):
* damaged inputs: bit-flipped and malformed ``.npz`` / ``.safetensors``, pickles, odd
  members, directories and devices given as files: exit 2, one line naming the path;
* hostile outputs and environments: devices, FIFOs, directories, the input itself, a
  full disk, no permission, Ctrl-C, internal errors: 2 / 130 / 1, one line, nothing
  left behind;
* rules: unmatched --rule / --keep / --drop, strictness and fallbacks, layouts;
* round trips: PyTorch- and Flax-layout files without flags, names, non-float tensors,
  --keep / --drop, permissions, progress lines in CI logs.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import qjax
from qjax import checkpoints, cli, files
from qjax.cli import main

RNG = np.random.default_rng(9)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, argv, *fragments, code=2):
    """Runs argv; checks the exit code, one stderr line naming every fragment, no traceback."""
    got, _, err = run(capsys, *argv)
    assert got == code, (got, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert str(fragment) in err, (fragment, err)
    return err


def no_temporaries(folder):
    return not [f for f in os.listdir(folder) if f.endswith(".tmp")]


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.fixture
def good_npz(tmp_path):
    w = RNG.standard_normal((64, 64)).astype(np.float32)
    return _npz(tmp_path / "m.npz", **{"layer.kernel": w, "layer.bias": w[0]})


# ----------------------------------------------------------------------------- damaged inputs


def test_bit_flipped_npz_is_one_line(tmp_path, capsys, good_npz):
    data = bytearray(good_npz.read_bytes())
    refused = 0
    for i in range(len(data) - 200, len(data), 7):  # the zip central directory and its end
        flipped = tmp_path / f"flip{i}.npz"
        corrupted = bytearray(data)
        corrupted[i] ^= 0xFF
        flipped.write_bytes(bytes(corrupted))
        code, _, err = run(capsys, "quantize", flipped, tmp_path / "o.safetensors", "-q")
        assert code in (0, 2) and "Traceback" not in err, err
        if code == 2:
            assert err.count("\n") == 1 and str(flipped) in err
            refused += 1
    assert refused > 10


def test_malformed_npy_header_inside_npz(tmp_path, capsys):
    headers = [
        b"{'descr': '<f4', 'fortran_order': False, 'shape': (2, ",  # tokenize.TokenError
        b"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)",  # SyntaxError
        b"{'descr': '<f4', 'fortran_order': False}",  # a key missing
        b"{'descr': 'nope', 'fortran_order': False, 'shape': (2,)}",  # bad dtype
        b"[1, 2, 3]",  # not a dict
        b"{'descr': '<f4', 'fortran_order': False, 'shape': (-2,)}",  # negative shape
    ]
    for i, header in enumerate(headers):
        header = header + b" " * (-(10 + len(header) + 1) % 64) + b"\n"
        npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 24
        path = tmp_path / f"bad{i}.npz"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("w.npy", npy)
        one_line_error(capsys, ["quantize", path, tmp_path / "o.safetensors"], path)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda p: p.write_bytes(b""), "not a valid .npz"),
        (lambda p: p.write_bytes(b"PK\x03\x04" + b"\0" * 40), "not a valid .npz"),
        (lambda p: np.savez(p, w=np.array([{"a": 1}], dtype=object)), "Python objects"),
        (lambda p: np.savez(p, s=np.array(["text"])), "has dtype <U4"),
        (lambda p: zipfile.ZipFile(p, "w").writestr("notes.txt", "hi"), "is not a .npy array"),
        (lambda p: np.savez(p, c=np.ones(2, np.complex64)), "has dtype complex64"),
    ],
    ids=["empty", "zip-stub", "pickle", "strings", "other-member", "complex"],
)
def test_npz_that_qjax_cannot_read(tmp_path, capsys, make, fragment):
    path = tmp_path / "in.npz"
    make(path)
    one_line_error(capsys, ["quantize", path, tmp_path / "o.safetensors"], path, fragment)
    assert not (tmp_path / "o.safetensors").exists() and no_temporaries(tmp_path)


def test_truncated_npz_data_is_one_line(tmp_path, capsys, good_npz):
    data = good_npz.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    one_line_error(capsys, ["quantize", cut, tmp_path / "o.safetensors"], cut)


@pytest.mark.parametrize(
    "content",
    [b"", b"\xff" * 8, (100).to_bytes(8, "little") + b"{" * 100, b"{}" * 40],
    ids=["empty", "huge-length", "bad-json", "no-length"],
)
def test_damaged_safetensors_input(tmp_path, capsys, content):
    path = tmp_path / "in.safetensors"
    path.write_bytes(content)
    one_line_error(capsys, ["quantize", path, tmp_path / "o.safetensors"], path)
    one_line_error(capsys, ["inspect", path], path)
    one_line_error(capsys, ["dequantize", path, tmp_path / "o.npz"], path)
    one_line_error(capsys, ["plan", path], path)


def test_directories_devices_and_missing_files_as_inputs(tmp_path, capsys):
    folder = tmp_path / "d.npz"
    folder.mkdir()
    one_line_error(capsys, ["quantize", folder, tmp_path / "o.safetensors"], folder, "directory")
    one_line_error(capsys, ["inspect", tmp_path], tmp_path, "directory")
    one_line_error(capsys, ["plan", "/dev/null"], "/dev/null", "character device")
    one_line_error(capsys, ["quantize", tmp_path / "no.npz", tmp_path / "o.safetensors"], "no.npz")
    one_line_error(capsys, ["dequantize", tmp_path / "no.safetensors", tmp_path / "o.npz"], "no.")


# ----------------------------------------------------------------------------- hostile outputs


@pytest.mark.parametrize("kind", ["devnull", "fifo", "directory", "input", "suffix", "no-dir"])
def test_outputs_that_are_refused_before_any_work(tmp_path, capsys, good_npz, kind):
    assert run(capsys, "quantize", good_npz, tmp_path / "q.safetensors", "-q")[0] == 0
    qfile = tmp_path / "q.safetensors"
    outs = {  # (quantize OUT, dequantize OUT)
        "devnull": (os.devnull, os.devnull),
        "fifo": (tmp_path / "p.safetensors", tmp_path / "p.npz"),
        "directory": (tmp_path / "d.safetensors", tmp_path / "d.npz"),
        "input": (good_npz, qfile),
        "suffix": (tmp_path / "o.txt", tmp_path / "o.txt"),
        "no-dir": (tmp_path / "no" / "o.safetensors", tmp_path / "no" / "o.npz"),
    }[kind]
    for out in outs:
        if kind == "fifo":
            os.mkfifo(out)
        if kind == "directory":
            out.mkdir()
    before = good_npz.read_bytes(), qfile.read_bytes()
    one_line_error(capsys, ["quantize", good_npz, outs[0]], outs[0])
    one_line_error(capsys, ["dequantize", qfile, outs[1]], outs[1])
    if kind == "devnull":
        assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert (good_npz.read_bytes(), qfile.read_bytes()) == before and no_temporaries(tmp_path)


def test_disk_full_says_no_space_left_on_the_output(tmp_path, capsys, good_npz, monkeypatch):
    out = tmp_path / "o.safetensors"
    run(capsys, "quantize", good_npz, out, "-q")
    before = out.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    argv = ["quantize", good_npz, out, "--dtype=int4"]
    err = one_line_error(capsys, argv, f"no space left on {out}")
    assert ".tmp" not in err and "SafetensorError" not in err
    err = one_line_error(capsys, ["dequantize", out, tmp_path / "b.npz"], "no space left on")
    assert out.read_bytes() == before and no_temporaries(tmp_path)
    assert not (tmp_path / "b.npz").exists()


def test_permission_denied_names_the_path(tmp_path, capsys, good_npz, monkeypatch):
    real_open = os.open

    def denied(path, flags, mode=0o777, **kwargs):
        if str(path).endswith(".tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    out = tmp_path / "o.safetensors"
    err = one_line_error(capsys, ["quantize", good_npz, out], f"{out}: Permission denied")
    assert ".tmp" not in err
    monkeypatch.undo()
    denied_read = PermissionError(errno.EACCES, "Permission denied", str(good_npz))
    monkeypatch.setattr(files.NpzCheckpoint, "read", _raise(denied_read))
    one_line_error(capsys, ["quantize", good_npz, out], f"{good_npz}: Permission denied")


def _raise(error):
    def raiser(*args, **kwargs):
        raise error

    return raiser


@pytest.mark.parametrize(
    ("error", "code", "fragment"),
    [
        (KeyboardInterrupt(), 130, "qjax: interrupted"),
        (RuntimeError("boom"), 1, "internal error: RuntimeError: boom"),
        (AttributeError("x"), 1, "please report it"),
        (MemoryError(), 1, "out of memory"),
        (BrokenPipeError(errno.EPIPE, "Broken pipe"), 2, ""),
    ],
)
def test_interrupts_and_internal_errors_are_one_line(
    tmp_path, capsys, good_npz, monkeypatch, error, code, fragment
):
    monkeypatch.setattr(checkpoints, "quantize_checkpoint", _raise(error))
    monkeypatch.setattr(os, "dup2", lambda *a: None)  # BrokenPipe: keep pytest's stdout
    got, out, err = run(capsys, "quantize", good_npz, tmp_path / "o.safetensors")
    assert got == code and out == "" and "Traceback" not in err
    assert err.count("\n") == (1 if fragment else 0) and fragment in err
    assert no_temporaries(tmp_path)


def test_ctrl_c_while_qjax_imports_is_one_line_and_130(monkeypatch, capsys):
    """The qjax command starts in qjax_launcher, which imports nothing heavy: a Ctrl-C
    while qjax and JAX import (seconds) ends it like one in qjax.cli.main does."""
    import builtins
    import sys

    import qjax_launcher

    real_import = builtins.__import__

    def interrupted_import(name, *args, **kwargs):
        if name == "qjax.cli":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "qjax.cli")
    monkeypatch.setattr(builtins, "__import__", interrupted_import)
    with pytest.raises(SystemExit) as exited:
        qjax_launcher.main()
    assert exited.value.code == 130
    assert capsys.readouterr().err == "qjax: interrupted\n"


def test_the_qjax_command_starts_in_the_launcher():
    import tomllib

    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts == {"qjax": "qjax_launcher:main"}


def test_ctrl_c_while_writing_leaves_the_old_output(tmp_path, capsys, good_npz, monkeypatch):
    out = tmp_path / "o.safetensors"
    run(capsys, "quantize", good_npz, out, "-q")
    before = out.read_bytes()
    monkeypatch.setattr(os, "replace", _raise(KeyboardInterrupt()))
    got, _, err = run(capsys, "quantize", good_npz, out, "--dtype=int4")
    assert got == 130 and err == "qjax: interrupted\n"
    assert out.read_bytes() == before and no_temporaries(tmp_path)


def test_help_documents_the_exit_codes(capsys):
    for argv in (["--help"], ["quantize", "--help"], ["dequantize", "--help"], ["plan", "-h"]):
        code, out, _ = run(capsys, *argv)
        assert code == 0
        assert "130  interrupted" in out and "1    unexpected internal error" in out
        assert "2    usage or input error" in out


# ----------------------------------------------------------------------------- rules


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--rule", "nothing.*=int4"], "--rule: rule 'nothing.*' matched nothing"),
        (["--rule", "nothing.*=int4"], "list the paths with qjax plan FILE"),
        (["--keep", "absent"], "--keep: rule 'absent' matched nothing"),
        (["--drop", "gone", "--drop", "layer.*"], "--drop: rule 'gone' matched nothing"),
        (
            ["--keep", "layer.*", "--rule", ".*kernel=int4"],
            "every tensor it matches was taken by --keep or --drop first (e.g. 'layer.kernel'",
        ),
        (["--keep", "("], "--keep '(': invalid regex"),
        (["--layout", "jax"], "invalid choice: 'jax'"),
        (["--fallback", "per_tensor"], "invalid choice: 'per_tensor'"),
        (["--block-size", "0"], "must be > 0"),
        (["--min-size", "x"], "must be an integer"),
        (["--dtype", "keep", "--block-size", "32"], "--dtype keep turns the catch-all rule off"),
        (["--calibration", "best"], "cannot read 'best'"),
        (["--rule", "layer.kernel=int8:per_channel:per_tensor"], "contradicts"),
    ],
)
def test_rules_that_do_nothing_or_cannot_be_read(tmp_path, capsys, good_npz, flags, fragment):
    one_line_error(capsys, ["quantize", good_npz, tmp_path / "o.safetensors", *flags], fragment)
    one_line_error(capsys, ["plan", good_npz, *flags], fragment)
    assert not (tmp_path / "o.safetensors").exists()


def test_fallback_is_shown_and_strict_refuses_it(tmp_path, capsys):
    conv = RNG.standard_normal((3, 3, 16, 32)).astype(np.float32)
    path = _npz(tmp_path / "float_params.npz", **{"params/Conv_0/kernel": conv})
    out = tmp_path / "q.safetensors"
    code, stdout, err = run(capsys, "quantize", path, out, "--dtype", "int4", "--block-size", "32")
    assert code == 0, err
    assert "params/Conv_0/kernel: fallback per_channel(axis=-1): block 32 does not divide" in stdout
    assert str(qjax.load(out)["params"]["Conv_0"]["kernel"].spec).endswith("per_channel(axis=-1)")
    for flag in ("--strict", "--fallback=none"):
        one_line_error(
            capsys,
            ["quantize", path, out, "--dtype", "int4", "--block-size", "32", flag],
            "'params/Conv_0/kernel'",
            "block 32 does not divide axis 2 (size 16)",
        )
    code, stdout, _ = run(capsys, "plan", path, "--dtype", "int4", "--block-size", "32")
    assert code == 0 and "fallback per_channel" in stdout and "flax" in stdout


# ----------------------------------------------------------------------------- round trips


def _torch_checkpoint(path):
    tensors = {
        "embeddings.word_embeddings.weight": RNG.standard_normal((1001, 64)).astype(np.float32),
        "embeddings.position_ids": np.arange(128, dtype=np.int64).reshape(1, 128),
        "encoder.layer.0.attention.self.query.weight": RNG.standard_normal((96, 64)).astype(
            np.float32
        ),
        "encoder.layer.0.attention.self.query.bias": np.zeros(96, np.float32),
        "encoder.layer.0.output.LayerNorm.weight": np.ones(64, np.float32),
        "pooler.dense.weight": RNG.standard_normal((64, 64)).astype(np.float64),
        "mask": np.array([True, False]),
        "bf16.weight": RNG.standard_normal((64, 32)).astype(ml_dtypes.bfloat16),
    }
    save_file(tensors, str(path))
    return tensors


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_pytorch_layout_file_round_trips_without_flags(tmp_path, capsys, suffix):
    tensors = _torch_checkpoint(tmp_path / "model.safetensors")
    q, back = tmp_path / "q.safetensors", tmp_path / f"back{suffix}"
    argv = ["quantize", tmp_path / "model.safetensors", q, "--dtype", "int4", "--block-size", "32"]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    tree = qjax.load(q)  # no x64: position_ids comes back as a NumPy int64 array
    assert not jax.config.jax_enable_x64
    ids = tree["embeddings"]["position_ids"]
    assert isinstance(ids, np.ndarray) and ids.dtype == np.int64
    embed = tree["embeddings"]["word_embeddings"]["weight"]
    assert embed.scale.shape == (1001, 2)  # per row, blocked along the features
    query = tree["encoder"]["layer"]["0"]["attention"]["self"]["query"]["weight"]
    assert query.scale.shape == (96, 2)  # [out, in]: blocks along in
    code, _, err = run(capsys, "dequantize", q, back)
    assert code == 0, err
    restored = dict(np.load(back)) if suffix == ".npz" else load_file(str(back))
    assert set(restored) == set(tensors)  # original names
    for name, x in tensors.items():
        y = restored[name]
        expected = np.float32 if suffix == ".npz" and x.dtype == ml_dtypes.bfloat16 else x.dtype
        assert y.shape == x.shape and y.dtype == expected, name
        if x.dtype in (np.int64, np.bool_) or x.ndim < 2:
            np.testing.assert_array_equal(y, x)
    code, stdout, _ = run(capsys, "inspect", q)
    assert "embeddings.position_ids" in stdout and "axis=1" in stdout and "axis=-1" not in stdout
    assert "kept as they were (4):" in stdout


def test_keep_and_drop(tmp_path, capsys):
    tensors = _torch_checkpoint(tmp_path / "model.safetensors")
    q = tmp_path / "q.safetensors"
    argv = ["quantize", tmp_path / "model.safetensors", q, "--keep", r".*word_embeddings.*"]
    argv += ["--drop", "pooler/.*", "--drop", "mask"]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    flat = qjax.io.load_tensors(q)
    assert set(flat) == set(tensors) - {"pooler.dense.weight", "mask"}
    kept = flat["embeddings.word_embeddings.weight"]
    assert isinstance(kept, jax.Array) and kept.dtype == np.float32
    assert isinstance(flat["encoder.layer.0.attention.self.query.weight"], qjax.QArray)
    assert "dropped (2): mask, pooler.dense.weight" in stdout
    # --drop comes first: a --keep that only names dropped tensors matches nothing
    argv += ["--keep", "mask"]
    one_line_error(capsys, argv, "--keep: rule 'mask' matched nothing")


def test_float64_tensors_dequantize_to_float64(tmp_path, capsys):
    x = RNG.standard_normal((64, 64))
    path = _npz(tmp_path / "f64.npz", w=x)
    run(capsys, "quantize", path, tmp_path / "q.safetensors", "-q")
    assert run(capsys, "dequantize", tmp_path / "q.safetensors", tmp_path / "b.npz")[0] == 0
    back = np.load(tmp_path / "b.npz")["w"]
    assert back.dtype == np.float64 and np.max(np.abs(back - x)) < np.max(np.abs(x)) / 100


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_outputs_follow_the_umask(tmp_path, capsys, good_npz, umask):
    old = os.umask(umask)
    try:
        run(capsys, "quantize", good_npz, tmp_path / "q.safetensors", "-q")
        run(capsys, "dequantize", tmp_path / "q.safetensors", tmp_path / "b.safetensors", "-q")
        report = ["--report", tmp_path / "r.csv"]
        run(capsys, "quantize", good_npz, tmp_path / "q2.safetensors", "-q", *report)
    finally:
        os.umask(old)
    for name in ("q.safetensors", "b.safetensors", "q2.safetensors"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name


def test_ci_logs_get_progress_lines_and_short_runs_stay_quiet(
    tmp_path, capsys, good_npz, monkeypatch
):
    code, _, err = run(capsys, "quantize", good_npz, tmp_path / "q.safetensors")
    assert code == 0 and err == ""  # quick: no progress lines
    monkeypatch.setattr(cli, "PROGRESS_INTERVAL_S", 0.0)
    code, _, err = run(capsys, "quantize", good_npz, tmp_path / "q.safetensors")
    assert code == 0
    lines = err.splitlines()
    assert any(line.startswith("qjax quantize: 2 tensors, ") for line in lines), err
    code, _, err = run(capsys, "dequantize", tmp_path / "q.safetensors", tmp_path / "b.npz")
    assert code == 0 and "qjax dequantize: " in err
    code, _, err = run(capsys, "quantize", good_npz, tmp_path / "q.safetensors", "-q")
    assert err == ""


def test_bad_report_paths_are_refused_before_any_work(tmp_path, capsys, good_npz):
    os.mkfifo(tmp_path / "r.csv")
    out = tmp_path / "q.safetensors"
    for report, fragment in (
        (tmp_path / "r.csv", "r.csv: is a FIFO"),
        (tmp_path / "no" / "r.json", "r.json: directory"),
        (tmp_path, "name it with .csv or .json"),
    ):
        one_line_error(capsys, ["quantize", good_npz, out, "--report", report], fragment)
        assert not out.exists()


def test_readme_style_example_on_float_params(tmp_path, capsys):
    params = {
        "params/Conv_0/kernel": RNG.standard_normal((3, 3, 1, 16)).astype(np.float32),
        "params/Conv_0/bias": np.zeros(16, np.float32),
        "params/Conv_1/kernel": RNG.standard_normal((3, 3, 16, 32)).astype(np.float32),
        "params/Dense_0/kernel": RNG.standard_normal((512, 64)).astype(np.float32),
        "params/Dense_1/kernel": RNG.standard_normal((64, 10)).astype(np.float32),
    }
    path = _npz(tmp_path / "float_params.npz", **params)
    out = tmp_path / "model-int4.safetensors"
    code, stdout, err = run(capsys, "quantize", path, out, "--dtype", "int4", "--block-size", "32")
    assert code == 0, err
    assert "params/Conv_1/kernel: fallback" in stdout and "params/Dense_0/kernel " in stdout
    assert run(capsys, "inspect", out)[0] == 0
    assert run(capsys, "dequantize", out, tmp_path / "back.npz")[0] == 0
    assert set(np.load(tmp_path / "back.npz")) == set(params)


@pytest.mark.parametrize(
    ("dtype", "bad", "count"),
    [
        (np.float64, 1e39, 1),
        (np.float64, -np.inf, 1),
        (ml_dtypes.bfloat16, np.nan, 1),
        (np.float16, np.inf, 1),
        (np.float32, np.nan, 1),
    ],
)
def test_values_that_are_not_finite_in_float32_name_the_tensor(tmp_path, capsys, dtype, bad, count):
    w = np.ones((64, 64), dtype)
    w[3, 5] = bad
    path = tmp_path / "w.safetensors"  # safetensors holds bfloat16, npz does not
    save_file({"layer.kernel": w}, str(path))
    out = tmp_path / "q.safetensors"
    one_line_error(
        capsys,
        ["quantize", path, out],
        f"tensor 'layer.kernel' (shape (64, 64)) has {count} NaN or inf value(s) in float32",
        r"--keep 'layer\.kernel'",
    )
    assert not out.exists() and no_temporaries(tmp_path)
    code, _, err = run(capsys, "quantize", path, out, "-q", "--keep", r"layer\.kernel")
    assert code == 0, err
    kept = qjax.io.load_tensors(out, check_finite=False)["layer.kernel"]
    assert np.asarray(kept).dtype == w.dtype


def test_float8_safetensors_inputs_quantize(tmp_path, capsys):
    w = RNG.standard_normal((64, 64)).astype(ml_dtypes.float8_e4m3fn)
    source, out = tmp_path / "m.safetensors", tmp_path / "q.safetensors"
    save_file({"w": w, "e5m2": RNG.standard_normal(8).astype(ml_dtypes.float8_e5m2)}, source)
    assert run(capsys, "quantize", source, out, "--dtype", "int8", "-q")[0] == 0
    loaded = qjax.load(out)
    q = loaded["w"]
    spec = qjax.QuantSpec("int8", granularity=qjax.per_channel(-1))
    expected = qjax.quantize(w.astype(np.float32), spec)
    assert q.float_dtype == w.dtype  # dequantizes back to the input's float8
    np.testing.assert_array_equal(q.data, expected.data)
    np.testing.assert_array_equal(q.scale, expected.scale)
    assert np.asarray(loaded["e5m2"]).dtype == ml_dtypes.float8_e5m2  # small: kept as read


def test_big_endian_npz_inputs_quantize(tmp_path, capsys):
    w = RNG.standard_normal((64, 64)).astype(">f4")
    ids = np.arange(2**40, 2**40 + 8, dtype=">i8")
    source, out = tmp_path / "m.npz", tmp_path / "q.safetensors"
    np.savez(source, w=w, ids=ids)
    assert run(capsys, "quantize", source, out, "-q")[0] == 0
    assert np.array_equal(load_file(out)["ids"], ids.astype("<i8"))
    back = tmp_path / "back.npz"
    assert run(capsys, "dequantize", out, back, "-q")[0] == 0
    assert np.load(back)["w"].dtype == np.float32


def test_npz_header_larger_than_its_member_is_damaged_not_out_of_memory(tmp_path, capsys):
    member = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": (2_000_000, 200_000)}
    np.lib.format.write_array_header_1_0(member, header)
    member.write(np.ones(4, np.float32).tobytes())  # 16 bytes of data for 1.6 TB declared
    source = tmp_path / "big.npz"
    with zipfile.ZipFile(source, "w") as zf:
        zf.writestr("w.npy", member.getvalue())
    one_line_error(capsys, ["plan", source], "damaged", "2000000")


def test_plain_sub_byte_integer_leaves_dequantize_as_bytes(tmp_path, capsys):
    codes = np.arange(-4, 4).astype(ml_dtypes.int4)
    source = tmp_path / "t.safetensors"
    qjax.save(source, {"codes": codes, "w": np.ones((4, 4), np.float32)})
    for suffix in (".safetensors", ".npz"):
        out = tmp_path / f"o{suffix}"
        assert run(capsys, "dequantize", source, out, "-q")[0] == 0
        back = load_file(out) if suffix == ".safetensors" else dict(np.load(out))
        assert back["codes"].dtype == np.int8
        np.testing.assert_array_equal(back["codes"], np.arange(-4, 4))


def test_a_qjax_file_is_not_quantized_again(tmp_path, capsys, good_npz):
    quantized = tmp_path / "q.safetensors"
    assert run(capsys, "quantize", good_npz, quantized, "-q")[0] == 0
    for argv in (["quantize", quantized, tmp_path / "qq.safetensors"], ["plan", quantized]):
        one_line_error(capsys, argv, "is a qjax file (quantized already)", "qjax dequantize")
    assert not (tmp_path / "qq.safetensors").exists()


def test_kept_non_finite_buffers_come_back_from_inspect_and_dequantize(tmp_path, capsys):
    source = tmp_path / "m.safetensors"
    mask = np.triu(np.full((8, 8), -np.inf, np.float32), 1)
    weight = RNG.standard_normal((64, 64)).astype(np.float32)
    save_file(
        {"attn.masked_bias": np.array(-np.inf, np.float32), "mask": mask, "fc.weight": weight},
        source,
    )
    quantized, back = tmp_path / "q.safetensors", tmp_path / "b.safetensors"
    assert run(capsys, "quantize", source, quantized, "--keep", "mask", "-q")[0] == 0
    code, out, err = run(capsys, "inspect", quantized)
    assert code == 0 and "attn.masked_bias" in out, err
    assert run(capsys, "dequantize", quantized, back, "-q")[0] == 0
    restored = load_file(back)
    np.testing.assert_array_equal(restored["mask"], mask)
    np.testing.assert_array_equal(restored["attn.masked_bias"], np.float32(-np.inf))


def test_a_lookup_table_rule_on_an_empty_tensor(tmp_path, capsys):
    source, quantized, back = (tmp_path / n for n in ("m.npz", "q.safetensors", "b.npz"))
    np.savez(source, **{"a.empty.weight": np.zeros((0, 64), np.float32)})
    assert run(capsys, "quantize", source, quantized, "--rule", "a.empty.weight=nf4", "-q")[0] == 0
    assert run(capsys, "dequantize", quantized, back, "-q")[0] == 0
    assert np.load(back)["a.empty.weight"].shape == (0, 64)


def test_a_sharded_checkpoint_index_or_folder_says_to_go_shard_by_shard(tmp_path, capsys):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {}}')
    for given in (index, tmp_path):
        one_line_error(capsys, ["plan", given], "sharded checkpoint", "one shard file at a time")


def test_float8_weights_with_their_own_scales_are_not_requantized_without_them(tmp_path, capsys):
    name = "model.layers.0.mlp.down_proj.weight"
    tensors = {
        name: RNG.standard_normal((256, 256)).astype(ml_dtypes.float8_e4m3fn),
        f"{name}_scale_inv": RNG.random((2, 2)).astype(np.float32) + 1,  # DeepSeek-V3 style
    }
    source, out = tmp_path / "m.safetensors", tmp_path / "q.safetensors"
    save_file(tensors, source)
    one_line_error(capsys, ["quantize", source, out], f"{name!r} is float8_e4m3fn", "_scale_inv")
    assert run(capsys, "quantize", source, out, "--keep", "model.*weight", "-q")[0] == 0
    code, stdout, err = run(capsys, "plan", source, "--min-size", "0", "--keep", ".*weight")
    assert code == 0 and "a weight_scale_inv (name it to quantize it)" in stdout, err
