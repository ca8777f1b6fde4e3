"""The qjax command end to end, through qjax.cli.main, on small checkpoints in tmp_path."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import qjax
import qjax.io
from qjax.cli import main

RNG = np.random.default_rng(0)
TENSORS = {
    "Dense_0.kernel": RNG.standard_normal((128, 64)).astype(np.float32),
    "Dense_0.bias": RNG.standard_normal(64).astype(np.float32),
    "Embed_0.embedding": RNG.standard_normal((100, 64)).astype(np.float32),
    "blocks/0/mlp.kernel": RNG.standard_normal((64, 256)).astype(np.float32),
    "head.kernel": RNG.standard_normal((64, 32)).astype(np.float32),
    "step": np.array(3, np.int32),
}


@pytest.fixture(params=[".safetensors", ".npz"])
def checkpoint(request, tmp_path):
    path = str(tmp_path / f"model{request.param}")
    if request.param == ".npz":
        np.savez(path, **TENSORS)
    else:
        save_file(TENSORS, path)
    return path


def run(capsys, *argv):
    """main(argv) -> (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def leaf(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def test_quantize_defaults_nest_names_and_pick_flax_axes(checkpoint, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    code, stdout, err = run(capsys, "quantize", checkpoint, out)
    assert code == 0, err
    tree = qjax.io.load(out)
    assert set(tree) == {"Dense_0", "Embed_0", "blocks", "head", "step"}
    kernel = tree["Dense_0"]["kernel"]
    assert str(kernel.spec) == "int8:symmetric:scale:per_channel(axis=-1)"
    assert str(tree["Embed_0"]["embedding"].spec).endswith("per_channel(axis=0)")
    assert str(leaf(tree, "blocks/0/mlp/kernel").spec).endswith("per_channel(axis=-1)")
    # 64 x 32 = 2048 elements >= min-size 1024; the bias and step stay as they were
    assert isinstance(tree["head"]["kernel"], qjax.QArray)
    np.testing.assert_array_equal(tree["Dense_0"]["bias"], TENSORS["Dense_0.bias"])
    assert int(tree["step"]) == 3
    # the report shows the original tensor names
    for name in ("Dense_0.kernel", "Embed_0.embedding", "blocks/0/mlp.kernel", "total"):
        assert name in stdout
    assert "int8:per_channel:axis=-1" in stdout and "4 of 6 quantized" in stdout


def test_rules_override_the_flags(checkpoint, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    code, _, err = run(
        capsys,
        "quantize",
        checkpoint,
        out,
        "--dtype=int4",
        "--block-size=32",
        "--rule",
        "head/.*=keep",
        "--rule",
        ".*mlp/kernel=uint8:asymmetric:per_channel:axis=0",
        "--rule",
        "Dense_0/bias=int8",
        "--min-size=0",
    )
    assert code == 0, err
    tree = qjax.io.load(out)
    assert str(tree["Dense_0"]["kernel"].spec) == (
        "int4:symmetric:scale:per_block(axis=-2, block_size=32)"
    )
    assert str(tree["Embed_0"]["embedding"].spec).endswith("per_block(axis=1, block_size=32)")
    assert str(leaf(tree, "blocks/0/mlp/kernel").spec) == (
        "uint8:asymmetric:zero_point:per_channel(axis=0)"
    )
    assert str(tree["Dense_0"]["bias"].spec) == "int8:symmetric:scale:per_tensor"
    np.testing.assert_array_equal(tree["head"]["kernel"], TENSORS["head.kernel"])


def test_dtype_keep_applies_only_the_rules(checkpoint, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    code, _, err = run(capsys, "quantize", checkpoint, out, "--dtype=keep", "--rule=head/.*=int8")
    assert code == 0, err
    tree = qjax.io.load(out)
    assert isinstance(tree["head"]["kernel"], qjax.QArray)
    assert not isinstance(tree["Dense_0"]["kernel"], qjax.QArray)


def test_int4_per_block_takes_half_a_byte_per_value_on_disk(tmp_path, capsys):
    w = RNG.standard_normal((1024, 512)).astype(np.float32)
    save_file({"layer.kernel": w}, str(tmp_path / "w.safetensors"))
    out = tmp_path / "w4.safetensors"
    code, _, err = run(
        capsys, "quantize", tmp_path / "w.safetensors", out, "--dtype=int4", "--block-size=128"
    )
    assert code == 0, err
    scales = (1024 // 128) * 512 * 4
    assert w.size // 2 + scales < os.path.getsize(out) < w.size // 2 + scales + 4096
    with safe_open(str(out), framework="numpy") as f:
        assert f.get_slice("layer/kernel:data").get_shape() == [1024, 256]
    kernel = qjax.io.load(out)["layer"]["kernel"]
    assert kernel.packed and kernel.shape == (1024, 512)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_dequantize_round_trip_is_within_half_a_scale(checkpoint, tmp_path, capsys, suffix):
    qfile, out = tmp_path / "q.safetensors", tmp_path / f"back{suffix}"
    code, _, err = run(capsys, "quantize", checkpoint, qfile, "--dtype=int4", "--block-size=32")
    assert code == 0, err
    code, _, err = run(capsys, "dequantize", qfile, out)
    assert code == 0, err
    back = dict(np.load(out)) if suffix == ".npz" else load_file(str(out))
    assert set(back) == set(TENSORS)  # the original names, not the paths
    tree = qjax.io.load(qfile)
    for name, x in TENSORS.items():
        y, q = back[name], leaf(tree, name.replace(".", "/"))
        assert y.dtype == x.dtype and y.shape == x.shape
        if not isinstance(q, qjax.QArray):
            np.testing.assert_array_equal(y, x)
            continue
        block = np.array(x.shape) // np.array(q.scale.shape)
        half_scale = np.kron(np.asarray(q.scale), np.ones(block, np.float32)) / 2
        # symmetric int4 maps amax to 7.5 and clips it to 7: exactly half a scale (to rounding)
        assert np.all(np.abs(x - y) <= half_scale * (1 + 1e-5)), name


def test_inspect_prints_specs_and_sizes(tmp_path, capsys):
    save_file(TENSORS, str(tmp_path / "m.safetensors"))
    qfile = tmp_path / "q.safetensors"
    assert run(capsys, "quantize", tmp_path / "m.safetensors", qfile, "-q")[0] == 0
    code, out, err = run(capsys, "inspect", qfile, "--report", tmp_path / "r.json")
    assert code == 0, err
    assert "Dense_0.kernel" in out and "int8:per_channel:axis=-1" in out and "total" in out
    assert "(128, 64)" in out and "SQNR" not in out
    assert "kept as they were (2): Dense_0.bias, step" in out
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    kernel = next(r for r in rows if r["path"] == "Dense_0.kernel")
    assert kernel["bytes_after"] == 128 * 64 + 64 * 4 and kernel["bytes_before"] == 128 * 64 * 4


def test_quantize_writes_a_csv_report_and_keeps_bfloat16(tmp_path, capsys):
    tensors = {"a.kernel": TENSORS["Dense_0.kernel"].astype(ml_dtypes.bfloat16)}
    tensors["a.bias"] = TENSORS["Dense_0.bias"].astype(ml_dtypes.bfloat16)
    save_file(tensors, str(tmp_path / "m.safetensors"))
    code, out, err = run(
        capsys,
        "quantize",
        tmp_path / "m.safetensors",
        tmp_path / "q.safetensors",
        "--quiet",
        "--report",
        tmp_path / "r.csv",
    )
    assert code == 0 and out == "" and err == ""
    assert (tmp_path / "r.csv").read_text().splitlines()[0].startswith("path,quantized,shape")
    tree = qjax.io.load(tmp_path / "q.safetensors")
    assert tree["a"]["kernel"].float_dtype == "bfloat16"
    assert tree["a"]["bias"].dtype == ml_dtypes.bfloat16


def write_bad(tmp_path, tensors, name="bad.safetensors"):
    save_file(tensors, str(tmp_path / name))
    return tmp_path / name


@pytest.mark.parametrize(
    ("make_argv", "message"),
    [
        (
            lambda p: ["quantize", p / "missing.safetensors", p / "o.safetensors"],
            "missing.safetensors: No such file",
        ),
        (lambda p: ["quantize", write_bad(p, TENSORS, "m.bin"), p / "o.safetensors"], "'.bin'"),
        (lambda p: ["quantize", write_bad(p, TENSORS), p / "o.npz"], "output suffix '.npz'"),
        (
            lambda p: ["quantize", write_bad(p, TENSORS), p / "o.safetensors", "--rule", "k"],
            "must read REGEX=SPEC",
        ),
        (
            lambda p: ["quantize", write_bad(p, TENSORS), p / "o.safetensors", "--rule", "(=int8"],
            "invalid regex",
        ),
        (
            lambda p: [
                "quantize",
                write_bad(p, TENSORS),
                p / "o.safetensors",
                "--rule",
                ".*=int4:per_block",
            ],
            "per_block needs a block size",
        ),
        (
            lambda p: (
                ["quantize", write_bad(p, TENSORS), p / "o.safetensors", "--block-size=48"]
                + ["--fallback=none"]
            ),
            "'Dense_0.kernel' (shape (128, 64), read as flax [..., in, out]): block 48 does "
            "not divide axis 0 (size 128)",
        ),
        (
            lambda p: [
                "quantize",
                write_bad(p, {"w.kernel": np.full((64, 64), np.nan, np.float32)}),
                p / "o.safetensors",
            ],
            "tensor 'w.kernel' (shape (64, 64)) has 4096 NaN or inf",
        ),
        (
            lambda p: [
                "quantize",
                write_bad(p, {"a": np.ones(2, np.float32), "a.b": np.ones(2, np.float32)}),
                p / "o.safetensors",
            ],
            "clashing parameter paths",
        ),
        (
            lambda p: ["quantize", write_bad(p, TENSORS), p / "o.safetensors", "--dtype=int5"],
            "invalid choice: 'int5'",
        ),
        (
            lambda p: (
                ["quantize", write_bad(p, TENSORS), p / "o.safetensors", "--dtype=uint8"]
                + ["--formulation=scale"]
            ),
            "needs a zero point of 0",
        ),
        (
            lambda p: (
                ["quantize", write_bad(p, TENSORS), p / "o.safetensors", "--dtype=mxfp4"]
                + ["--axis=0"]
            ),
            "mxfp4 sets its own blocks",
        ),
        (
            lambda p: (
                ["quantize", write_bad(p, TENSORS), p / "o.safetensors", "--block-size=32"]
                + ["--granularity=per_channel"]
            ),
            "--block-size needs --granularity per_block",
        ),
        (
            lambda p: ["quantize", write_bad(p, TENSORS), p / "o.safetensors", "--report=r.txt"],
            "name it with .csv or .json",
        ),
        (
            lambda p: ["quantize", write_bad(p, {"a..b": np.ones(2)}), p / "o.safetensors"],
            "has an empty part",
        ),
        (lambda p: ["inspect", write_bad(p, TENSORS)], "not a qjax checkpoint"),
        (lambda p: ["inspect", p / "nothing.safetensors"], "nothing.safetensors: no such"),
        (lambda p: ["dequantize", write_bad(p, TENSORS), p / "o.safetensors"], "not a qjax"),
        (lambda p: ["quantize"], "the following arguments are required: IN, OUT"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, capsys, make_argv, message):
    code, out, err = run(capsys, *make_argv(tmp_path))
    assert code == 2 and out == ""
    assert err.startswith("qjax: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o.safetensors").exists()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


@pytest.mark.parametrize("argv", [["--help"], ["quantize", "-h"], ["inspect", "--help"]])
def test_help_exits_zero(capsys, argv):
    code, out, _ = run(capsys, *argv)
    assert code == 0 and out.startswith("usage: qjax")


def test_quantize_help_documents_layouts_and_exit_codes(capsys):
    _, out, _ = run(capsys, "quantize", "--help")
    assert "Flax kernel [..., in, out]" in out and "PyTorch *.weight [out, in, ...]" in out
    assert "REGEX=SPEC" in out and "--keep REGEX" in out and "--fallback" in out
    assert "130  interrupted" in out and "2    usage or input error" in out


def test_version(capsys):
    assert run(capsys, "--version") == (0, f"qjax {qjax.__version__}\n", "")
